"""The committed OpenAPI document is valid OpenAPI 3.1 and is what the running server serves."""

import json
from pathlib import Path

import httpx
from openapi_spec_validator import validate

SPEC = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def test_committed_spec_is_valid_openapi():
    spec = json.loads(SPEC.read_text())
    validate(spec)
    assert spec["openapi"].startswith("3.1")


def test_server_serves_the_committed_spec_and_offline_docs(server):
    served = httpx.get(f"{server}/openapi.json").json()
    assert served == json.loads(SPEC.read_text())
    docs = httpx.get(f"{server}/docs/")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    bundle = httpx.get(f"{server}/docs/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000, "Swagger UI assets are served locally"
