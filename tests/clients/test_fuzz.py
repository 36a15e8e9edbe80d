"""Property-based fuzzing of the whole HTTP API from its OpenAPI document with schemathesis.

A separate server with tight limits (so that generated jobs are cheap) and API keys on; schemathesis
generates valid and invalid requests for every operation and checks that no answer is a 5xx, that every
status code, content type, header and body is one the document promises, that auth is enforced, and that
unsupported methods get 405. `/v1/events` (an endless stream of every job) is excluded: a request to it
never completes by design; its behaviour is tested in tests/events.rs.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import running_server

CHEAP = """
[limits]
max_steps = 2
max_images = 2
max_side = 128
max_outstanding_per_key = 1000
"""

CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "unsupported_method",
    "ignored_auth",
    "use_after_free",
])


@pytest.fixture(scope="module")
def fuzz_target():
    with running_server(CHEAP) as started:
        yield started


def test_no_request_breaks_the_contract(fuzz_target, tmp_path):
    base, key = fuzz_target
    schemathesis = Path(sys.executable).parent / "schemathesis"
    if not schemathesis.exists():
        schemathesis = Path(shutil.which("schemathesis") or "schemathesis")
    examples = os.environ.get("FUZZ_EXAMPLES", "40")
    result = subprocess.run(
        [
            str(schemathesis), "run", f"{base}/openapi.json",
            "--header", f"Authorization: Bearer {key}",
            "--checks", CHECKS,
            "--max-examples", examples,
            "--exclude-path", "/v1/events",
            "--request-timeout", "60",
            "--seed", "20261125",
            "--generation-deterministic",
            "--no-color",
            "--report-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=1800,
    )
    output = result.stdout + result.stderr
    print(output[-6000:])
    assert result.returncode == 0, output[-12000:]
