"""Starts the real `denoised` binary on 127.0.0.1:0 with the tiny test fixtures, for the client tests.

The binary comes from SERVER_BINARY (default: target/debug/denoised, which `cargo test` builds).
"""

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
{models}
[[workers]]
device = "cpu"
threads = 1
"""


@pytest.fixture(scope="session")
def server():
    """Base URL of a running server; stopped with SIGTERM at the end."""
    binary = Path(os.environ.get("SERVER_BINARY", ROOT / "target" / "debug" / "denoised"))
    assert binary.exists(), f"{binary} is missing: run `cargo build` first"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(_config(Path(tmp) / "data"))
        env = dict(os.environ, RUST_LOG="info,ort=warn")
        env.pop("ORT_DYLIB_PATH", None)
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
        yield base
        process.terminate()
        assert process.wait(30) == 0
