"""Starts the real `denoised` binary on 127.0.0.1:0 with the tiny test fixtures and API keys on, for the
client tests; makes an admin key with `denoised keys create` first (the `api_key` fixture).

The binary comes from SERVER_BINARY (default: target/debug/denoised, which `cargo test` builds).
"""

import contextlib
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

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


def _config(data_dir: Path) -> str:
    ort = os.environ.get("ORT_DYLIB_PATH") or str(ROOT / ".ort" / "libonnxruntime.so")
    models = "".join(
        f'[[models]]\nname = "{name}"\npath = "{FIXTURES / name}"\n' for name in ["tiny-sd", "tiny-sd-inpaint"]
    )
    return f"""
[server]
bind = "127.0.0.1:0"
shutdown_grace_seconds = 5
[storage]
data_dir = "{data_dir}"
database_url = "sqlite://{data_dir}/denoised.db"
[runtime]
onnxruntime_library = "{ort}"
[queue]
lease_seconds = 5
poll_millis = 100
[auth]
enabled = true
{models}
[[workers]]
device = "cpu"
threads = 1
"""


def finished_job(base: str, key: str, route: str, body: dict, timeout: float = 300) -> tuple[dict, list[bytes]]:
    """Submits `body` to `route` with `key`, waits until the job succeeds (failing the test otherwise) and returns
    the finished job and the bytes of its images."""
    headers = {"Authorization": f"Bearer {key}"}
    response = httpx.post(f"{base}{route}", json=body, headers=headers, timeout=60)
    assert response.status_code == 202, response.text
    url = f"{base}/v1/jobs/{response.json()['id']}"
    deadline = time.time() + timeout
    while (job := httpx.get(url, headers=headers).json())["status"] in ("queued", "running"):
        assert time.time() < deadline, f"the job did not finish within {timeout} s"
        time.sleep(0.1)
    assert job["status"] == "succeeded", job
    return job, [httpx.get(f"{base}{image['url']}", headers=headers).content for image in job["images"]]


@pytest.fixture(scope="session")
def api_key(_running):
    """An admin key of the running server."""
    return _running[1]


@pytest.fixture(scope="session")
def auth(api_key):
    """The header that carries `api_key`."""
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture(scope="session")
def server(_running):
    """Base URL of a running server."""
    return _running[0]


@pytest.fixture(scope="session")
def _running():
    """(base URL, admin key) of a server started for the session; stopped with SIGTERM at the end."""
    with running_server() as started:
        yield started


@contextlib.contextmanager
def running_server(extra_toml: str = ""):
    """Starts the binary with the client-test config plus `extra_toml`; yields (base URL, admin key)."""
    binary = Path(os.environ.get("SERVER_BINARY", ROOT / "target" / "debug" / "denoised"))
    assert binary.exists(), f"{binary} is missing: run `cargo build` first"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(_config(Path(tmp) / "data") + extra_toml)
        env = dict(os.environ, RUST_LOG="info,ort=warn")
        env.pop("ORT_DYLIB_PATH", None)
        created = subprocess.run(
            [str(binary), "keys", "create", "--name", "clients", "--admin", "--config", str(config)],
            capture_output=True, text=True, env=env, check=True,
        )
        key = created.stdout.strip().splitlines()[-1]
        process = subprocess.Popen(
            [str(binary), "serve", "--config", str(config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        address = {}
        found = threading.Event()

        def read_log():
            for line in process.stderr:
                sys.stderr.write(line)
                match = re.search(r"addr=(\S+)", line)
                if match and not found.is_set():
                    address["value"] = match.group(1)
                    found.set()

        threading.Thread(target=read_log, daemon=True).start()
        assert found.wait(120), "the server did not report its address"
        base = f"http://{address['value']}"
        deadline = time.time() + 60
        while httpx.get(f"{base}/readyz").status_code != 200:
            assert time.time() < deadline, "the server never became ready"
            time.sleep(0.1)
        yield base, key
        process.terminate()
        assert process.wait(30) == 0
