"""KServe's conventions: one exported version at a model_dir, the model name and port
from flags or environment, the V2 protocol's error shape, requested outputs and the
binary tensor extension; and the store seeding the Kubernetes manifests run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from service import serve
from service.app import create_app
from store import ModelNotFound, ModelStore, StoreError, VerificationError
from store.seeding import main as seed_main
from store.seeding import seed
from store.single import SingleVersionStore, is_single_version, open_store

from .support import SHIPPED_STORE, free_port

SHIPPED_VERSION = SHIPPED_STORE / "mnist" / "1"


def single_version(folder: Path) -> Path:
    """A copy of the shipped version's folder alone, as KServe leaves it in /mnt/models."""
    shutil.copytree(SHIPPED_VERSION, folder)
    return folder


def infer_body(pixels: np.ndarray, **extra) -> dict:
    tensor = {
        "name": "data",
        "shape": list(pixels.shape),
        "datatype": "FP32",
        "data": pixels.ravel().tolist(),
    }
    return {"id": "r1", "inputs": [tensor], **extra}


@pytest.fixture(scope="module")
def pixels(sample_test) -> tuple[np.ndarray, np.ndarray]:
    """Twelve sample test digits as [0, 1] FP32 [N, 1, 28, 28], and their labels."""
    images = sample_test.images[:12].astype(np.float32)[:, None] / 255
    return images, sample_test.labels[:12]


@pytest.fixture(scope="module")
def single_client(tmp_path_factory):
    """The app serving one exported version (no store layout) as model "digits"."""
    folder = single_version(tmp_path_factory.mktemp("mnt") / "models")
    app = create_app({"STORE": str(folder), "MODEL_NAME": "digits", "POLL_SECONDS": 0})
    engine = app.extensions["digitserve.engine"]
    assert engine.ready.wait(60), engine.load_error
    yield app.test_client()
    engine.stop()


def test_the_folder_layout_is_recognised(tmp_path):
    folder = single_version(tmp_path / "models")
    assert is_single_version(folder) and isinstance(open_store(folder), SingleVersionStore)
    assert not is_single_version(SHIPPED_STORE)
    assert isinstance(open_store(SHIPPED_STORE), ModelStore)
    store = SingleVersionStore(folder)
    assert store.versions("anything") == [1]
    mv = store.resolve("digits")
    assert (mv.name, mv.version, mv.path) == ("digits", 1, folder)
    mv.verify()
    with pytest.raises(ModelNotFound, match="holds version 1"):
        store.get("digits", 2)
    empty = SingleVersionStore(tmp_path / "empty")
    assert empty.versions("digits") == []  # a copy not complete yet: nothing, not an error
    with pytest.raises(ModelNotFound):
        empty.resolve("digits")
    (folder / "manifest.json").write_text('{"version": NaN}')
    with pytest.raises(StoreError, match="unreadable manifest"):
        store.versions("digits")


def test_one_exported_version_is_served_under_the_given_name(single_client, pixels):
    images, labels = pixels
    assert single_client.get("/v2/health/ready").status_code == 200
    assert single_client.get("/v2/models/digits/ready").get_json() == {
        "name": "digits",
        "ready": True,
    }
    meta = single_client.get("/v2/models/digits").get_json()
    assert meta["name"] == "digits" and meta["versions"] == ["1"]
    out = single_client.post("/v2/models/digits/infer", json=infer_body(images)).get_json()
    assert out["model_name"] == "digits" and out["model_version"] == "1"
    digits = next(o for o in out["outputs"] if o["name"] == "digit")["data"]
    assert np.mean(np.array(digits) == labels) >= 0.9
    assert single_client.get("/ready").get_json()["version"] == 1
    missing = single_client.get("/v2/models/mnist")  # the manifest's name is not the served one
    assert missing.status_code == 404 and "digits" in missing.get_json()["error"]


def test_a_corrupt_single_version_is_refused_and_never_ready(tmp_path):
    folder = single_version(tmp_path / "models")
    params = folder / "mnist-0000.params"
    params.write_bytes(params.read_bytes()[:-16] + b"\0" * 16)
    app = create_app({"STORE": str(folder), "POLL_SECONDS": 0})
    engine = app.extensions["digitserve.engine"]
    try:
        engine.wait_started()
        client = app.test_client()
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/models/mnist/ready").status_code == 503
        assert "corrupt" in client.get("/ready").get_json()["reason"]
    finally:
        engine.stop()


def test_requested_outputs_and_their_errors(single_client, pixels):
    images, _ = pixels
    url = "/v2/models/digits/infer"
    out = single_client.post(url, json=infer_body(images, outputs=[{"name": "digit"}]))
    assert [o["name"] for o in out.get_json()["outputs"]] == ["digit"]
    for outputs in ([{"name": "logits"}], "digit", [{"parameters": {}}]):
        r = single_client.post(url, json=infer_body(images, outputs=outputs))
        assert r.status_code == 400 and r.get_json()["code"] == "bad_tensor", r.get_json()
    r = single_client.post(url, json=infer_body(images, parameters=[1]))
    assert r.status_code == 400 and "parameters" in r.get_json()["error"]


def binary_request(pixels: np.ndarray, size: int | None = None, **extra) -> tuple[bytes, dict]:
    raw = pixels.astype("<f4").tobytes()
    tensor = {"name": "data", "shape": list(pixels.shape), "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": len(raw) if size is None else size}
    header = json.dumps({"inputs": [tensor], **extra}).encode()
    headers = {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    return header + raw, headers


def test_the_binary_tensor_extension(single_client, pixels):
    images, _ = pixels
    url = "/v2/models/digits/infer"
    as_json = single_client.post(url, json=infer_body(images)).get_json()
    want = {o["name"]: o["data"] for o in as_json["outputs"]}
    body, headers = binary_request(images)
    r = single_client.post(url, data=body, headers=headers)
    assert r.status_code == 200 and r.is_json
    assert {o["name"]: o["data"] for o in r.get_json()["outputs"]} == want
    # Binary outputs: a JSON header, then each output's bytes in order.
    body, headers = binary_request(images, parameters={"binary_data_output": True})
    r = single_client.post(url, data=body, headers=headers)
    assert r.status_code == 200 and r.mimetype == "application/octet-stream"
    length = int(r.headers["Inference-Header-Content-Length"])
    header, blob = json.loads(r.data[:length]), r.data[length:]
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert [o["name"] for o in header["outputs"]] == ["probabilities", "digit"]
    probs = np.frombuffer(blob[: sizes[0]], "<f4").reshape(len(images), 10)
    digits = np.frombuffer(blob[sizes[0] : sizes[0] + sizes[1]], "<i8")
    assert len(blob) == sum(sizes) and digits.tolist() == want["digit"]
    np.testing.assert_allclose(probs.ravel(), want["probabilities"], atol=1e-6)
    # One output in binary, the other as JSON.
    outputs = [{"name": "digit", "parameters": {"binary_data": True}}, {"name": "probabilities"}]
    body, headers = binary_request(images, outputs=outputs)
    r = single_client.post(url, data=body, headers=headers)
    length = int(r.headers["Inference-Header-Content-Length"])
    header = json.loads(r.data[:length])
    assert "data" not in header["outputs"][0] and "data" in header["outputs"][1]
    assert np.frombuffer(r.data[length:], "<i8").tolist() == want["digit"]
    # Sizes that do not add up, and a header longer than the body.
    for size in (len(images.tobytes()) - 4, 3, True, "x"):
        body, headers = binary_request(images, size=size)
        r = single_client.post(url, data=body, headers=headers)
        assert r.status_code == 400 and r.get_json()["code"] == "bad_tensor", r.get_json()
    body, headers = binary_request(images)
    for bad in (str(len(body) + 1), "-1", "ten"):
        r = single_client.post(
            url, data=body, headers={**headers, "Inference-Header-Content-Length": bad}
        )
        assert r.status_code == 400, r.get_json()
    r = single_client.post(url, data=b"\0" * 100, content_type="application/octet-stream")
    assert r.status_code == 415 and isinstance(r.get_json()["error"], str)


def test_every_v2_error_has_the_protocol_shape(single_client):
    for r, status in [
        (single_client.get("/v2/models/digits/infer"), 405),  # routing: no blueprint handler
        (single_client.get("/v2/nowhere"), 404),
        (single_client.get("/v2/models/digits/versions/x"), 400),
        (single_client.get("/v2/models/digits/versions/7"), 404),
        (
            single_client.post(
                "/v2/models/digits/infer", data=b"{", content_type="application/json"
            ),
            400,
        ),
    ]:
        assert r.status_code == status
        body = r.get_json()
        assert isinstance(body["error"], str) and body["error"] and set(body) == {"error", "code"}
    # Outside /v2 the API's own shape is unchanged.
    assert set(single_client.get("/nowhere").get_json()["error"]) == {"code", "message"}
    server = single_client.get("/v2").get_json()
    assert server["name"] == "digitserve" and "binary_tensor_data" in server["extensions"]


def test_the_launcher_takes_kserve_flags_and_environment():
    env = serve.environment(
        ["--model_name=digits", "--model_dir=/mnt/models", "--http_port=9001", "--workers=3"],
        {"PATH": "/bin"},
    )
    assert env["DIGITSERVE_MODEL_NAME"] == "digits" and env["DIGITSERVE_STORE"] == "/mnt/models"
    assert env["DIGITSERVE_BIND"] == "0.0.0.0:9001" and env["DIGITSERVE_WORKERS"] == "3"
    assert serve.environment([], {})["DIGITSERVE_BIND"] == "0.0.0.0:8080"
    assert serve.environment([], {"PORT": "8012"})["DIGITSERVE_BIND"] == "0.0.0.0:8012"
    both = {"PORT": "8012", "DIGITSERVE_HTTP_PORT": "8013", "DIGITSERVE_HTTP_HOST": "127.0.0.1"}
    assert serve.environment([], both)["DIGITSERVE_BIND"] == "127.0.0.1:8013"
    assert serve.environment(["--http-port", "8014"], both)["DIGITSERVE_BIND"].endswith(":8014")
    env = serve.environment([], {"DIGITSERVE_MODEL_NAME": "from-env"})
    assert env["DIGITSERVE_MODEL_NAME"] == "from-env"
    with pytest.raises(SystemExit, match="PORT"):
        serve.environment([], {"PORT": "http"})
    with pytest.raises(SystemExit, match="MODEL_NAME"):
        serve.environment(["--model_name=Not A Name"], {})
    for bad in (["--http_port=0"], ["--http_port=x"], ["--workers=0"], ["--bogus"]):
        with pytest.raises(SystemExit):
            serve.environment(bad, {})


def test_the_launcher_becomes_gunicorn_and_serves(tmp_path):
    folder = single_version(tmp_path / "models")
    port = free_port()
    env = {
        **os.environ,
        "DIGITSERVE_HTTP_HOST": "127.0.0.1",
        "DIGITSERVE_ACCESS_LOG": "",
        "DIGITSERVE_WORKERS": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "service.serve", "--model_name=digits"),
                *(f"--model_dir={folder}", f"--http_port={port}"),
            ],
            cwd=tmp_path,  # the launcher finds its own way to the code
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        assert requests.get(f"{url}/v2/models/digits/ready", timeout=5).ok
        # exec: the launched process is gunicorn's master itself (SIGTERM reaches it).
        assert b"gunicorn" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_seeding_an_empty_store(tmp_path, capsys):
    store = ModelStore(tmp_path / "store")
    published = seed(store, ModelStore(SHIPPED_STORE), "mnist")
    assert published is not None and published.version == 1
    published.verify()
    shipped = ModelStore(SHIPPED_STORE).resolve("mnist")
    assert published.params_file.read_bytes() == shipped.params_file.read_bytes()
    assert published.manifest["metrics"] == shipped.manifest["metrics"]
    assert published.manifest["seeded_from"]["version"] == shipped.version
    assert seed(store, ModelStore(SHIPPED_STORE), "mnist") is None  # idempotent
    assert store.versions("mnist") == [1]
    assert seed_main(["--into", str(store.root), "--from", str(SHIPPED_STORE)]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_seeding_refuses_a_corrupt_shipped_model(tmp_path, capsys):
    source = tmp_path / "shipped"
    shutil.copytree(SHIPPED_STORE, source, ignore=shutil.ignore_patterns(".*"))
    (source / "mnist" / "1" / "mnist-symbol.json").write_text("{}")
    into = ModelStore(tmp_path / "store")
    with pytest.raises(VerificationError):
        seed(into, ModelStore(source), "mnist")
    assert into.versions("mnist") == []  # nothing half-made
    assert seed_main(["--into", str(into.root), "--from", str(source)]) == 1
    assert "corrupt" in capsys.readouterr().err
