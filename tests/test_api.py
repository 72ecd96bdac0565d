"""The API in-process (Flask's test client, no server): routes, answers, errors, V2."""

from __future__ import annotations

import base64
import threading
import time
import tomllib

import numpy as np
import pytest

from service.app import create_app

from . import images
from .images import png
from .support import ROOT, InProcessClient, assert_error, copy_shipped_store

BOMB = images.decompression_bomb()
# (requests' keyword arguments, status, error code): every one a 4xx in the error shape.
BAD_INPUTS = [
    ({}, 400, "no_image"),
    ({"data": b"", "headers": {"Content-Type": "image/png"}}, 400, "no_image"),
    ({"files": {"image": ("e.png", b"", "image/png")}}, 400, "no_image"),
    ({"files": {"other": (None, "text field")}}, 400, "no_image"),
    (
        {"data": images.jpeg_with_scans(5000), "headers": {"Content-Type": "image/jpeg"}},
        413,
        "payload_too_large",
    ),
    (
        {"data": b"\x89PNG\r\n\x1a\n garbage", "headers": {"Content-Type": "image/png"}},
        400,
        "invalid_image",
    ),
    (
        {
            "data": images.truncated(images.encode_bytes(np.full((28, 28), 200, np.uint8), "PNG")),
            "headers": {"Content-Type": "image/png"},
        },
        400,
        "invalid_image",
    ),
    ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_json"),
    (
        {
            "data": images.encode_bytes(np.full((280, 280), 255, np.uint8), "PNG"),
            "headers": {"Content-Type": "image/png"},
        },
        400,
        "blank_image",
    ),
    ({"json": {"picture": "x"}}, 400, "bad_json"),
    ({"json": ["x"]}, 400, "bad_json"),
    ({"json": {"image": "!!!not base64!!!"}}, 400, "bad_base64"),
    ({"json": {"image": 42}}, 400, "bad_base64"),
    ({"json": {"images": "abc"}}, 400, "bad_json"),
    ({"json": {"images": []}}, 400, "no_image"),
    ({"data": iter([b"abc"])}, 415, "unsupported_media_type"),  # chunked, no Content-Type
    (
        {"data": b"hello", "headers": {"Content-Type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),
    ({"data": BOMB, "headers": {"Content-Type": "image/png"}}, 413, "payload_too_large"),
    ({"data": b"\0" * (11 * 1024 * 1024), "headers": {"Content-Type": "image/png"}}, 413, None),
    ({"json": {"images": ["AAAA"] * 65}}, 413, "too_many_images"),
    ({"files": [("image", ("x.png", b"x", "image/png"))] * 65}, 413, None),
    ({"files": [("image", ("x.png", b"x", "image/png"))] * 81}, 413, "form_too_large"),
    (
        {"files": [("image", ("x.png", b"x", "image/png")), ("note", (None, "x" * 600_000))]},
        413,
        "form_too_large",
    ),
]


def _case_id(case) -> str:
    return str(case)[:40]


# A chunked body (an iterator) needs a real server: tests/test_http.py sends those.
IN_PROCESS_BAD_INPUTS = [
    case for case in BAD_INPUTS if not hasattr(case[0].get("data"), "__next__")
]


# werkzeug's form parser leaves the spooled files of the parts it read before refusing
# a form to the garbage collector (so under gunicorn too): not this project's leak.
@pytest.mark.filterwarnings("ignore:Exception ignored in.*SpooledTemporaryFile")
@pytest.mark.parametrize(("kwargs", "status", "code"), IN_PROCESS_BAD_INPUTS, ids=_case_id)
def test_bad_input_gets_a_clear_error(client, digits, kwargs, status, code):
    assert_error(client.post("/predict", **kwargs), status, code)
    ok = client.post("/predict", data=png(digits[1][0]), headers={"Content-Type": "image/png"})
    assert ok.status_code == 200 and ok.json()["digit"] == 1


def test_health_ready_and_model_info(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["ready"] is True and ready["model"] == "mnist"
    meta = client.get("/metadata").json()
    assert meta["name"] == "mnist" and meta["version"] == ready["version"]
    assert meta["manifest"]["metrics"]["test_accuracy"] >= 0.995
    models = client.get("/models").json()["models"]
    assert models[0]["serving_version"] == meta["version"]
    assert client.get("/models/mnist").json()["version"] == meta["version"]
    assert_error(client.get("/models/other"), 404, "model_not_found")


@pytest.mark.parametrize("fmt", images.FORMATS)
def test_every_upload_format(client, digits, fmt):
    for digit, label in digits[::3]:
        data, mimetype = images.encode(digit, fmt)
        r = client.post(
            "/predict",
            files={"image": (f"digit.{fmt.lower()}", data, mimetype)},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["digit"] == label, (fmt, label, body)
        assert body["model"]["name"] == "mnist"
        assert len(body["predictions"][0]["probabilities"]) == 10


def test_raw_body_and_json_bodies(client, digits):
    url = "/predict"
    digit, label = digits[7]
    data = png(digit)
    assert (
        client.post(url, data=data, headers={"Content-Type": "image/png"}).json()["digit"] == label
    )
    assert (
        client.post(url, data=data, headers={"Content-Type": "application/octet-stream"}).json()[
            "digit"
        ]
        == label
    )
    b64 = base64.b64encode(data).decode()
    assert client.post(url, json={"image": b64}).json()["digit"] == label
    for prefix in ("data:image/png;base64,", "data:;base64,", "data:image/png;name=a.png;base64,"):
        assert client.post(url, json={"image": prefix + b64}).json()["digit"] == label
    many = client.post(
        url, json={"images": [base64.b64encode(png(d)).decode() for d, _ in digits]}
    ).json()
    assert [p["digit"] for p in many["predictions"]] == list(range(10))
    assert "digit" not in many  # only one-image requests get a top-level digit


def test_several_files_in_one_request_keep_their_order(client, digits):
    files = [("image", (f"{d}.png", png(img), "image/png")) for img, d in reversed(digits)]
    body = client.post("/predict", files=files).json()
    assert [p["digit"] for p in body["predictions"]] == list(range(9, -1, -1))


def test_batch_independence_over_http(client, digits, sample_test):
    url = "/predict"
    digit, _ = digits[3]
    alone = client.post(url, files={"image": ("d.png", png(digit), "image/png")}).json()
    rng = np.random.default_rng(0)
    others = [
        ("image", (f"{i}.png", png(sample_test.images[i]), "image/png"))
        for i in rng.choice(len(sample_test), 20, replace=False)
    ]
    noisy = np.clip(sample_test.images[0] + rng.integers(0, 90, (28, 28)), 0, 255).astype(np.uint8)
    noise = [("image", ("n.png", png(noisy), "image/png"))]  # (pure noise is refused as blank)
    files = [*others[:10], ("image", ("d.png", png(digit), "image/png")), *noise, *others[10:]]
    batch = client.post(url, files=files).json()
    np.testing.assert_allclose(
        batch["predictions"][10]["probabilities"],
        alone["predictions"][0]["probabilities"],
        atol=2e-6,
    )


def test_an_image_sent_as_a_text_field_is_explained(client, digits):
    r = client.post("/predict", files={"image": (None, "iVBORw0KGgo=")})
    assert_error(r, 400, "no_image")
    assert "fields ('image') hold text, not a file" in r.json()["error"]["message"]


def test_routing_errors_share_the_shape(client):
    assert_error(client.get("/nowhere"), 404, "not_found")
    r = client.get("/predict")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]
    assert_error(
        client.post("/predict?version=abc", data=b"x", headers={"Content-Type": "image/png"}),
        400,
        "bad_version",
    )
    assert_error(
        client.post(
            "/predict?version=999",
            data=png(np.zeros((28, 28), np.uint8)),
            headers={"Content-Type": "image/png"},
        ),
        404,
        "version_not_found",
    )
    assert_error(client.get("/models/mnist/versions/999"), 404, "version_not_found")
    # Unicode digits, numbers too long for a file name or for int(): 400, never a 500.
    for bad in ("\u00b2", "\u0661", "0", "-1", "1" * 10, "1" * 300, "9" * 5000):
        assert_error(client.get(f"/models/mnist/versions/{bad}"), 400, "bad_version")
        assert_error(client.get(f"/v2/models/mnist/versions/{bad}/ready"), 400)
        assert_error(
            client.post(
                "/predict",
                params={"version": bad},
                data=b"x",
                headers={"Content-Type": "image/png"},
            ),
            400,
            "bad_version",
        )
    assert_error(client.post("/admin/reload"), 401, "unauthorized")
    for auth in ("Bearer wrong", "s3cret", "Basic s3cret"):  # the token needs its scheme
        r = client.post("/admin/reload", headers={"Authorization": auth})
        assert_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    for auth in ("Bearer s3cret", "bearer s3cret"):  # the scheme is case-insensitive
        assert client.post("/admin/reload", headers={"Authorization": auth}).ok
    # Doubled slashes: a 404 in the error shape, not an HTML redirect.
    assert_error(client.get("/models//mnist", allow_redirects=False), 404, "not_found")


def test_pinned_version_routes(client, digits):
    version = client.get("/metadata").json()["version"]
    digit, label = digits[5]
    r = client.post(
        f"/models/mnist/versions/{version}/predict",
        data=png(digit),
        headers={"Content-Type": "image/png"},
    )
    assert r.json()["digit"] == label and r.json()["model"]["version"] == version
    r = client.post(
        f"/predict?version={version}", data=png(digit), headers={"Content-Type": "image/png"}
    )
    assert r.json()["model"]["version"] == version


def test_kserve_v2_protocol(client, digits):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/mnist").json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert client.get("/v2/models/mnist/ready").status_code == 200
    pixels = np.stack([d for d, _ in digits]).astype(np.float32)[:, None] / 255
    body = {
        "id": "req-1",
        "inputs": [
            {
                "name": "data",
                "shape": list(pixels.shape),
                "datatype": "FP32",
                "data": pixels.ravel().tolist(),
            }
        ],
    }
    out = client.post("/v2/models/mnist/infer", json=body).json()
    assert out["id"] == "req-1" and out["model_name"] == "mnist"
    outputs = {o["name"]: o for o in out["outputs"]}
    assert outputs["digit"]["data"] == list(range(10))
    assert outputs["probabilities"]["shape"] == [10, 10]
    bad = dict(body, inputs=[dict(body["inputs"][0], shape=[10, 28, 28])])
    assert_error(client.post("/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    bad = dict(body, inputs=[dict(body["inputs"][0], datatype="INT8")])
    assert_error(client.post("/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    bad = dict(body, inputs=[dict(body["inputs"][0], data=[1.0, 2.0])])
    assert_error(client.post("/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    one = dict(body["inputs"][0], shape=[1, 1, 28, 28])
    for data in (["0.5"] * 784, [True] * 784, [None] * 784, [[0.5] * 28] * 27 + [[0.5]]):
        bad = dict(body, inputs=[dict(one, data=data)])
        assert_error(client.post("/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    bad = dict(body, inputs=[dict(body["inputs"][0], name="pixels")])
    assert_error(client.post("/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    nested = dict(body, id=7, inputs=[dict(one, data=pixels[0].tolist())])  # [1][28][28] lists
    out = client.post("/v2/models/mnist/infer", json=nested).json()
    assert out["id"] == "7" and out["outputs"][1]["data"] == [0]
    for bad_id in ({"a": [1]}, [1], True, 1.5):
        bad = dict(body, id=bad_id)
        assert_error(client.post("/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    # Pixels are [0, 1]: 0-255 values, or normalized ones, would give confident nonsense.
    for data in (pixels[0] * 255, pixels[0] - 0.5, np.full_like(pixels[0], -1e30)):
        bad = dict(body, inputs=[dict(one, data=data.ravel().tolist())])
        r = client.post("/v2/models/mnist/infer", json=bad)
        assert_error(r, 400, "bad_tensor")
        assert "[0, 1]" in r.json()["error"]
    assert_error(client.post("/v2/models/nope/infer", json=body), 404)


def test_drawing_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert 'id="pad"' in page.text and "/static/app.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    assert client.get("/static/app.js").status_code == 200


def test_server_metadata_names_the_package_version(client):
    meta = client.get("/v2").json()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["name"] == "digitserve" and meta["version"] == pyproject["project"]["version"]


def test_a_full_queue_answers_503_and_drains_when_the_forward_resumes(tmp_path, digits):
    """The forward is held, the queue filled by concurrent requests: the next one is a
    503 before any decoding; released, every queued request is answered."""
    store_dir = copy_shipped_store(tmp_path / "model_store")
    app = create_app({"STORE": str(store_dir), "POLL_SECONDS": 0, "QUEUE_SIZE": 3})
    engine = app.extensions["digitserve.engine"]
    try:
        engine.version_for(None)  # waits for the start-up load
        release = threading.Event()
        forward = engine._forward

        def held_forward(version, batch):
            release.wait(30)
            return forward(version, batch)

        engine._forward = held_forward
        body = {"data": png(digits[4][0]), "headers": {"Content-Type": "image/png"}}
        answers: list = []

        def post() -> None:
            answers.append(InProcessClient(app).post("/predict", **body))

        threads = [threading.Thread(target=post) for _ in range(3)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while engine.batcher.pending_images < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.batcher.pending_images == 3  # one in the held forward, two queued
        assert_error(InProcessClient(app).post("/predict", **body), 503, "overloaded")
        release.set()
        for thread in threads:
            thread.join(30)
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert all(a.json()["digit"] == 4 for a in answers)
        assert engine.batcher.pending_images == 0
        assert InProcessClient(app).post("/predict", **body).status_code == 200
    finally:
        release.set()
        engine.stop()
