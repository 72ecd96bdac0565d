"""The OpenAPI document: valid, and exactly the app's routes; responses match it."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from openapi_spec_validator import validate
from PIL import Image

from service.api import openapi_document

from .conftest import ROOT


@pytest.fixture
def client(app):
    """Flask's own test client: these tests read its responses as Flask gives them."""
    return app.test_client()


def app_routes(app) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        routes |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    return routes


def test_document_is_valid_openapi():
    validate(openapi_document())


def test_document_describes_exactly_the_routes(client):
    doc = openapi_document()
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == app_routes(client.application)


def schema(name: str) -> dict:
    doc = openapi_document()
    return {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}


def test_responses_match_their_schemas(client, sample_test):
    buf = io.BytesIO()
    Image.fromarray(sample_test.images[0]).save(buf, "PNG")
    ok = client.post("/predict", data=buf.getvalue(), content_type="image/png")
    assert ok.status_code == 200
    jsonschema.validate(ok.get_json(), schema("PredictResponse"))
    err = client.post("/predict", data=b"nope", content_type="image/png")
    assert err.status_code == 400
    jsonschema.validate(err.get_json(), schema("Error"))
    jsonschema.validate(client.get("/metadata").get_json(), schema("ModelDescription"))


def test_the_committed_document_is_what_the_script_writes(tmp_path):
    out = tmp_path / "openapi.json"
    subprocess.run(
        [sys.executable, "scripts/write_openapi.py", "--out", str(out)],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    assert out.read_bytes() == (ROOT / "service" / "openapi.json").read_bytes()


def test_served_document_is_the_file(client):
    served = client.get("/openapi.json").get_json()
    assert served == json.loads(json.dumps(openapi_document()))


def test_generated_requests_get_documented_answers_and_never_a_5xx(shipped_server, tmp_path):
    """schemathesis generates requests from the document, valid and not, against a real
    gunicorn: every answer must be a documented status with a schema-conforming body,
    and none a server error. Seeded, so a failure reproduces."""
    cli = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run(
        [
            str(cli),
            "run",
            f"{shipped_server.url}/openapi.json",
            "--url",
            shipped_server.url,
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance",
            "--max-examples",
            "15",
            "--seed",
            "20260101",
            "--request-timeout",
            "30",
            "-H",
            "Authorization: Bearer s3cret",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # its reports folder
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\d+ generated", run.stdout), run.stdout[-2000:]
