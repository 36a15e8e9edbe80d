"""Webhooks against the real binary, checked with the reference `standardwebhooks` package: a real receiver on
loopback (http.server in a thread) verifies every delivery's signature with the secret that
`denoised keys create` printed.

(a) a job's completion is delivered and verifies; `webhook_events: ["started"]` adds `started`; a key's default
    webhook URL serves jobs that name none;
(b) a receiver that fails N times and then answers 200 gets N + 1 attempts under one `webhook-id`, and the job
    view counts them;
(c) a server killed with SIGKILL after a job ended but before its webhook got through delivers it after a
    restart, under the `webhook-id` the receiver saw before the kill;
(d) with private targets not allowed, loopback, link-local (metadata), credentials, non-HTTP schemes, over-long
    URLs and unresolvable hosts are 422s naming `webhook_url`.

The servers of (a)–(c) run with `[webhooks] allow_private_targets = true`, since their receiver is on loopback.
"""

import contextlib
import http.server
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from conftest import ROOT, _config

LOOPBACK_WEBHOOKS = """
[webhooks]
allow_private_targets = true
timeout_seconds = 2
backoff_initial_millis = 200
backoff_max_seconds = 1
max_attempts = 100
"""


class Receiver:
    """A webhook receiver on 127.0.0.1: records every request (headers and raw body) and answers 500 to the
    first `failures` of them (or to all while `failing`), then 204."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.failing = False
        self.requests: list[tuple[dict, bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    fail = receiver.failing or len(receiver.requests) <= receiver.failures
                self.send_response(500 if fail else 204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def got(self) -> list[tuple[dict, bytes]]:
        with self.lock:
            return list(self.requests)

    def wait(self, count: int, timeout: float = 60) -> list[tuple[dict, bytes]]:
        deadline = time.time() + timeout
        while len(self.got()) < count:
            assert time.time() < deadline, f"only {len(self.got())} of {count} deliveries arrived"
            time.sleep(0.05)
        return self.got()

    def close(self):
        self.server.shutdown()


@contextlib.contextmanager
def receiver(failures: int = 0):
    r = Receiver(failures)
    try:
        yield r
    finally:
        r.close()


class Server:
    """`denoised serve` on a data folder that outlives the process, so the test can kill and restart it."""

    def __init__(self, folder: Path, extra_toml: str):
        self.binary = Path(os.environ.get("SERVER_BINARY", ROOT / "target" / "debug" / "denoised"))
        assert self.binary.exists(), f"{self.binary} is missing: run `cargo build` first"
        self.config = folder / "config.toml"
        self.config.write_text(_config(folder / "data") + extra_toml)
        self.env = dict(os.environ, RUST_LOG="info,ort=warn")
        self.env.pop("ORT_DYLIB_PATH", None)
        self.process = None
        self.base = None

    def keys(self, *args: str) -> list[str]:
        """Runs `denoised keys ARGS` and returns its output lines."""
        done = subprocess.run(
            [str(self.binary), "keys", *args, "--config", str(self.config)],
            capture_output=True, text=True, env=self.env, check=True,
        )
        return done.stdout.strip().splitlines()

    def create_key(self, name: str, *options: str) -> tuple[str, str]:
        """A new key and its webhook secret, as `denoised keys create` prints them (the key on the last line,
        the secret on a line of its own)."""
        lines = self.keys("create", "--name", name, *options)
        secrets = [line.split(": ", 1)[1] for line in lines if line.startswith("webhook secret: ")]
        assert len(secrets) == 1 and secrets[0].startswith("whsec_"), lines
        return lines[-1], secrets[0]

    def start(self):
        self.process = subprocess.Popen(
            [str(self.binary), "serve", "--config", str(self.config)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=self.env,
        )
        address, found = {}, threading.Event()
        process = self.process

        def read_log():
            for line in process.stderr:
                sys.stderr.write(line)
                match = re.search(r"addr=(\S+)", line)
                if match and not found.is_set():
                    address["value"] = match.group(1)
                    found.set()

        threading.Thread(target=read_log, daemon=True).start()
        assert found.wait(120), "the server did not report its address"
        self.base = f"http://{address['value']}"
        deadline = time.time() + 60
        while httpx.get(f"{self.base}/readyz").status_code != 200:
            assert time.time() < deadline, "the server never became ready"
            time.sleep(0.1)

    def kill(self):
        """SIGKILL: no shutdown, no flushing, nothing."""
        self.process.kill()
        self.process.wait(30)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            assert self.process.wait(30) == 0


@contextlib.contextmanager
def webhook_server(extra_toml: str = LOOPBACK_WEBHOOKS):
    with tempfile.TemporaryDirectory() as folder:
        s = Server(Path(folder), extra_toml)
        try:
            yield s
        finally:
            s.stop()


def submit(base: str, key: str, **fields) -> dict:
    body = {"prompt": "a red circle", "steps": 2, "model": "tiny-sd", **fields}
    response = httpx.post(f"{base}/v1/images", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code == 202, response.text
    return response.json()


def job(base: str, key: str, job_id: str) -> dict:
    return httpx.get(f"{base}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()


def wait_until(predicate, timeout: float = 60, what: str = "the condition"):
    deadline = time.time() + timeout
    while not (value := predicate()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def verified(secret: str, headers: dict, body: bytes) -> dict:
    """The payload, after the reference library checked its signature and timestamp."""
    return Webhook(secret).verify(body, headers)


def test_completion_and_started_are_delivered_signed_with_the_keys_secret():
    with webhook_server() as s, receiver() as hook:
        key, secret = s.create_key("tenant")
        s.start()
        accepted = submit(s.base, key, webhook_url=hook.url, webhook_events=["started"])
        assert (accepted["webhook"]["url"], accepted["webhook"]["status"]) == (hook.url, "pending")
        got = hook.wait(2)
        payloads = [verified(secret, headers, body) for headers, body in got]
        assert [p["type"] for p in payloads] == ["started", "completed"]
        assert all(p["job_id"] == accepted["id"] for p in payloads)
        assert payloads[0]["attempt"] == 1
        assert len(payloads[1]["images"]) == 1 and payloads[1]["timestamp"].endswith("Z")
        # Another key's secret does not verify them.
        _, other_secret = s.create_key("other")
        with pytest.raises(WebhookVerificationError):
            Webhook(other_secret).verify(got[1][1], got[1][0])
        view = wait_until(lambda: (v := job(s.base, key, accepted["id"]))["webhook"]["status"] == "delivered" and v)
        assert view["webhook"]["event"] == "completed" and view["webhook"]["attempts"] == 1
        assert "secret" not in json.dumps(view["webhook"])

        # A key's default URL serves its jobs that name none.
        default_key, default_secret = s.create_key("defaulted", "--webhook-url", hook.url)
        second = submit(s.base, default_key)
        assert second["webhook"]["url"] == hook.url
        headers, body = hook.wait(3)[2]
        payload = verified(default_secret, headers, body)
        assert (payload["type"], payload["job_id"]) == ("completed", second["id"])


def test_a_failing_receiver_gets_one_webhook_id_until_it_succeeds():
    failures = 3
    with webhook_server() as s, receiver(failures) as hook:
        key, secret = s.create_key("tenant")
        s.start()
        accepted = submit(s.base, key, webhook_url=hook.url)
        got = hook.wait(failures + 1)
        ids = {headers["webhook-id"] for headers, _ in got}
        assert len(ids) == 1, ids
        for headers, body in got:
            assert verified(secret, headers, body)["type"] == "completed"
        view = wait_until(lambda: (v := job(s.base, key, accepted["id"]))["webhook"]["status"] == "delivered" and v)
        assert view["webhook"]["attempts"] == failures + 1
        time.sleep(1.5)
        assert len(hook.got()) == failures + 1, "delivered once: no attempt after the 2xx"


def test_a_delivery_survives_kill_9_between_the_jobs_end_and_its_delivery():
    with webhook_server() as s, receiver() as hook:
        key, secret = s.create_key("tenant")
        hook.failing = True
        s.start()
        accepted = submit(s.base, key, webhook_url=hook.url)
        wait_until(lambda: job(s.base, key, accepted["id"])["status"] == "succeeded", what="the job to succeed")
        headers, _ = hook.wait(1)[0]
        before = headers["webhook-id"]
        failed_view = job(s.base, key, accepted["id"])["webhook"]
        assert failed_view["status"] == "pending", failed_view
        s.kill()
        seen_before_kill = len(hook.got())
        hook.failing = False
        s.start()
        delivered = wait_until(
            lambda: next((r for r in hook.got()[seen_before_kill:] if r[0]["webhook-id"] == before), None),
            what="the delivery after the restart",
        )
        payload = verified(secret, *delivered)
        assert (payload["type"], payload["job_id"]) == ("completed", accepted["id"])
        assert {h["webhook-id"] for h, _ in hook.got()} == {before}, "one event, one webhook-id"
        view = wait_until(lambda: (v := job(s.base, key, accepted["id"]))["webhook"]["status"] == "delivered" and v)
        assert view["webhook"]["attempts"] >= 2


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/hook",
        "https://user:password@hooks.example.com/hook",
        "ftp://hooks.example.com/hook",
        "https://hooks.example.com/" + "a" * 2100,
        "http://no-such-host.invalid/hook",
    ],
)
def test_refused_targets_are_422_naming_webhook_url(server, auth, url):
    body = {"prompt": "a red circle", "steps": 1, "model": "tiny-sd", "webhook_url": url}
    response = httpx.post(f"{server}/v1/images", json=body, headers=auth, timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "webhook_url"
