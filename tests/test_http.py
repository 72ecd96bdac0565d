"""The service through a real gunicorn (2 workers) on 127.0.0.1 with the shipped model."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from store import ModelStore, loading
from store.publishing import publish
from training.data import to_input

from . import images
from .conftest import SHIPPED_STORE, copy_shipped_store


def png(digit: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits(sample_test) -> list[tuple[np.ndarray, int]]:
    """Ten sample digits, one per class, that the shipped model gets right offline."""
    mv = ModelStore(SHIPPED_STORE).resolve("mnist")
    loaded = loading.load(mv)
    norm = mv.manifest["normalization"]
    probs = loaded.predict(to_input(sample_test.images, norm["mean"], norm["std"]))
    chosen = {}
    for i, (p, label) in enumerate(zip(probs, sample_test.labels, strict=True)):
        if label not in chosen and p.argmax() == label and p.max() > 0.99:
            chosen[int(label)] = sample_test.images[i]
    assert len(chosen) == 10
    return [(chosen[d], d) for d in range(10)]


def assert_error(response: requests.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code:
        assert body["error"]["code"] == code, body


def test_health_ready_and_model_info(shipped_server):
    url = shipped_server.url
    assert requests.get(f"{url}/health").json() == {"status": "ok"}
    ready = requests.get(f"{url}/ready").json()
    assert ready["ready"] is True and ready["model"] == "mnist"
    meta = requests.get(f"{url}/metadata").json()
    assert meta["name"] == "mnist" and meta["version"] == ready["version"]
    assert meta["manifest"]["metrics"]["test_accuracy"] >= 0.995
    models = requests.get(f"{url}/models").json()["models"]
    assert models[0]["serving_version"] == meta["version"]
    assert requests.get(f"{url}/models/mnist").json()["version"] == meta["version"]
    assert_error(requests.get(f"{url}/models/other"), 404, "model_not_found")


@pytest.mark.parametrize("fmt", images.FORMATS)
def test_every_upload_format(shipped_server, digits, fmt):
    for digit, label in digits[::3]:
        data, mimetype = images.encode(digit, fmt)
        r = requests.post(
            f"{shipped_server.url}/predict",
            files={"image": (f"digit.{fmt.lower()}", data, mimetype)},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["digit"] == label, (fmt, label, body)
        assert body["model"]["name"] == "mnist"
        assert len(body["predictions"][0]["probabilities"]) == 10


def test_raw_body_and_json_bodies(shipped_server, digits):
    url = f"{shipped_server.url}/predict"
    digit, label = digits[7]
    data = png(digit)
    assert (
        requests.post(url, data=data, headers={"Content-Type": "image/png"}).json()["digit"]
        == label
    )
    assert (
        requests.post(url, data=data, headers={"Content-Type": "application/octet-stream"}).json()[
            "digit"
        ]
        == label
    )
    b64 = base64.b64encode(data).decode()
    assert requests.post(url, json={"image": b64}).json()["digit"] == label
    for prefix in ("data:image/png;base64,", "data:;base64,", "data:image/png;name=a.png;base64,"):
        assert requests.post(url, json={"image": prefix + b64}).json()["digit"] == label
    many = requests.post(
        url, json={"images": [base64.b64encode(png(d)).decode() for d, _ in digits]}
    ).json()
    assert [p["digit"] for p in many["predictions"]] == list(range(10))
    assert "digit" not in many  # only one-image requests get a top-level digit


def test_several_files_in_one_request_keep_their_order(shipped_server, digits):
    files = [("image", (f"{d}.png", png(img), "image/png")) for img, d in reversed(digits)]
    body = requests.post(f"{shipped_server.url}/predict", files=files).json()
    assert [p["digit"] for p in body["predictions"]] == list(range(9, -1, -1))


def test_batch_independence_over_http(shipped_server, digits, sample_test):
    url = f"{shipped_server.url}/predict"
    digit, _ = digits[3]
    alone = requests.post(url, files={"image": ("d.png", png(digit), "image/png")}).json()
    rng = np.random.default_rng(0)
    others = [
        ("image", (f"{i}.png", png(sample_test.images[i]), "image/png"))
        for i in rng.choice(len(sample_test), 20, replace=False)
    ]
    noisy = np.clip(sample_test.images[0] + rng.integers(0, 90, (28, 28)), 0, 255).astype(np.uint8)
    noise = [("image", ("n.png", png(noisy), "image/png"))]  # (pure noise is refused as blank)
    files = [*others[:10], ("image", ("d.png", png(digit), "image/png")), *noise, *others[10:]]
    batch = requests.post(url, files=files).json()
    np.testing.assert_allclose(
        batch["predictions"][10]["probabilities"],
        alone["predictions"][0]["probabilities"],
        atol=2e-6,
    )


BOMB = images.decompression_bomb()
FORM_WITH_BIG_FIELD = (
    b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
    + b"x" * 600_000
    + b"\r\n--b--\r\n"
)


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
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
                "data": images.truncated(
                    images.encode_bytes(np.full((28, 28), 200, np.uint8), "PNG")
                ),
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
    ],
    ids=lambda v: str(v)[:40] if not isinstance(v, dict) else None,
)
def test_bad_input_gets_a_clear_error_and_the_worker_survives(
    shipped_server, digits, kwargs, status, code
):
    url = shipped_server.url
    pids = shipped_server.worker_pids()
    assert_error(requests.post(f"{url}/predict", timeout=30, **kwargs), status, code)
    ok = requests.post(
        f"{url}/predict", data=png(digits[1][0]), headers={"Content-Type": "image/png"}, timeout=30
    )
    assert ok.status_code == 200 and ok.json()["digit"] == 1
    assert shipped_server.worker_pids() == pids, "no worker died or restarted"


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Content-Type": "multipart/form-data; boundary=b"}, FORM_WITH_BIG_FIELD),  # 413
        ({"Content-Type": "image/png", "Transfer-Encoding": "chunked"}, b"zz\r\n\r\n"),  # 400
    ],
)
def test_an_answer_before_the_body_is_read_says_connection_close(
    shipped_server, digits, headers, body
):
    """A client reusing the connection (http.client does, without checking) is told."""
    host, port = shipped_server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/predict", body=body, headers=headers)
        bad = conn.getresponse()
        bad.read()
        assert bad.status in (400, 413) and bad.getheader("Connection") == "close"
        conn.request(
            "POST", "/predict", body=png(digits[1][0]), headers={"Content-Type": "image/png"}
        )
        good = conn.getresponse()  # on a new connection, as the answer said
        assert good.status == 200 and json.loads(good.read())["digit"] == 1
        assert good.getheader("Connection") == "keep-alive"
    finally:
        conn.close()


def test_an_image_sent_as_a_text_field_is_explained(shipped_server, digits):
    r = requests.post(f"{shipped_server.url}/predict", files={"image": (None, "iVBORw0KGgo=")})
    assert_error(r, 400, "no_image")
    assert "fields ('image') hold text, not a file" in r.json()["error"]["message"]


def chunked(data: bytes, size: int = 1 << 20):
    """A body requests sends with Transfer-Encoding: chunked (no Content-Length)."""
    return (data[i : i + size] for i in range(0, len(data), size))


def test_chunked_bodies_obey_the_size_limit(shipped_server, digits):
    url, over = shipped_server.url, 11 * 1024 * 1024  # the limit is 10 MiB
    image = png(digits[1][0])
    body = json.dumps({"image": base64.b64encode(image).decode()}).encode()
    r = requests.post(f"{url}/predict", data=chunked(image), headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["digit"] == 1
    r = requests.post(
        f"{url}/predict", data=chunked(body), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200 and r.json()["digit"] == 1
    tensor = {"inputs": [{"name": "data", "shape": [1, 1, 28, 28], "datatype": "FP32"}]}
    too_big = [
        ("/predict", "image/png", image + b"\0" * over),  # a valid PNG, then padding
        ("/predict", "application/json", body + b" " * over),
        ("/v2/models/mnist/infer", "application/json", json.dumps(tensor).encode() + b" " * over),
    ]
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
    too_big.append(("/predict", "multipart/form-data; boundary=b", part + image + b"\0" * over))
    for path, mimetype, data in too_big:
        r = requests.post(f"{url}{path}", data=chunked(data), headers={"Content-Type": mimetype})
        assert_error(r, 413, "payload_too_large")
    r = requests.post(  # with a Content-Length: refused before the body is read
        f"{url}/v2/models/mnist/infer",
        data=b" " * over,
        headers={"Content-Type": "application/json"},
    )
    assert_error(r, 413, "payload_too_large")


def raw_exchange(url: str, request: bytes) -> tuple[int, dict]:
    """Send bytes as they are, stop sending (half-close), read the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():  # Flask streams nothing here, but be safe
        raise AssertionError(f"unexpected chunked answer: {answer[:200]!r}")
    return status, json.loads(body)


@pytest.mark.parametrize(
    ("path", "mimetype", "body"),
    [
        ("/predict", "image/png", b"zz\r\n"),  # not a chunk size
        ("/predict", "application/json", b'5\r\n{"ima'),  # the client went away mid-chunk
        ("/predict", "multipart/form-data; boundary=b", b"5\r\n--b\r\n"),
        ("/v2/models/mnist/infer", "application/json", b'5\r\n{"inp'),
        ("/predict", "image/png", b"5\r\nabcdeXX"),  # no CRLF after the chunk
    ],
)
def test_a_malformed_or_cut_chunked_body_is_a_400(shipped_server, digits, path, mimetype, body):
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {mimetype}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    status, answer = raw_exchange(shipped_server.url, head.encode() + body)
    assert status == 400 and answer["error"]["code"] == "bad_body", answer
    ok = requests.post(
        f"{shipped_server.url}/predict",
        data=png(digits[1][0]),
        headers={"Content-Type": "image/png"},
    )
    assert ok.status_code == 200


def test_a_body_shorter_than_its_content_length_is_a_400(shipped_server, digits):
    image = png(digits[1][0])
    for path, mimetype, body in [
        ("/predict", "image/png", image),
        ("/predict", "application/json", json.dumps({"image": base64.b64encode(image).decode()})),
    ]:
        data = body if isinstance(body, bytes) else body.encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {mimetype}\r\n"
            f"Content-Length: {len(data) + 100}\r\nConnection: close\r\n\r\n"
        )
        status, answer = raw_exchange(shipped_server.url, head.encode() + data)
        assert status == 400 and answer["error"]["code"] == "bad_body", answer


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),  # not a request line
        (b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n",
            431,
            "request_header_fields_too_large",
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400, "bad_request"),
        (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: brotli\r\n\r\n",
            501,
            "not_implemented",
        ),
    ],
)
def test_requests_gunicorn_refuses_get_the_json_error_shape(
    shipped_server, request_bytes, status, code
):
    """Refused by gunicorn before Flask sees them: the same JSON shape, not an HTML page."""
    got, body = raw_exchange(shipped_server.url, request_bytes)
    assert got == status and body["error"]["code"] == code, body
    assert set(body) == {"error"} and body["error"]["message"]
    assert requests.get(f"{shipped_server.url}/health").ok  # and the worker is fine


def test_routing_errors_share_the_shape(shipped_server):
    url = shipped_server.url
    assert_error(requests.get(f"{url}/nowhere"), 404, "not_found")
    r = requests.get(f"{url}/predict")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]
    assert_error(
        requests.post(
            f"{url}/predict?version=abc", data=b"x", headers={"Content-Type": "image/png"}
        ),
        400,
        "bad_version",
    )
    assert_error(
        requests.post(
            f"{url}/predict?version=999",
            data=png(np.zeros((28, 28), np.uint8)),
            headers={"Content-Type": "image/png"},
        ),
        404,
        "version_not_found",
    )
    assert_error(requests.get(f"{url}/models/mnist/versions/999"), 404, "version_not_found")
    # Unicode digits, numbers too long for a file name or for int(): 400, never a 500.
    for bad in ("\u00b2", "\u0661", "0", "-1", "1" * 10, "1" * 300, "9" * 5000):
        assert_error(requests.get(f"{url}/models/mnist/versions/{bad}"), 400, "bad_version")
        assert_error(requests.get(f"{url}/v2/models/mnist/versions/{bad}/ready"), 400)
        assert_error(
            requests.post(
                f"{url}/predict",
                params={"version": bad},
                data=b"x",
                headers={"Content-Type": "image/png"},
            ),
            400,
            "bad_version",
        )
    assert_error(requests.post(f"{url}/admin/reload"), 401, "unauthorized")
    for auth in ("Bearer wrong", "s3cret", "Basic s3cret"):  # the token needs its scheme
        r = requests.post(f"{url}/admin/reload", headers={"Authorization": auth})
        assert_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    for auth in ("Bearer s3cret", "bearer s3cret"):  # the scheme is case-insensitive
        assert requests.post(f"{url}/admin/reload", headers={"Authorization": auth}).ok
    # Doubled slashes: a 404 in the error shape, not an HTML redirect.
    assert_error(requests.get(f"{url}/models//mnist", allow_redirects=False), 404, "not_found")


def test_pinned_version_routes(shipped_server, digits):
    url = shipped_server.url
    version = requests.get(f"{url}/metadata").json()["version"]
    digit, label = digits[5]
    r = requests.post(
        f"{url}/models/mnist/versions/{version}/predict",
        data=png(digit),
        headers={"Content-Type": "image/png"},
    )
    assert r.json()["digit"] == label and r.json()["model"]["version"] == version
    r = requests.post(
        f"{url}/predict?version={version}", data=png(digit), headers={"Content-Type": "image/png"}
    )
    assert r.json()["model"]["version"] == version


def test_kserve_v2_protocol(shipped_server, digits):
    url = shipped_server.url
    assert requests.get(f"{url}/v2/health/live").json() == {"live": True}
    assert requests.get(f"{url}/v2/health/ready").json() == {"ready": True}
    meta = requests.get(f"{url}/v2/models/mnist").json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert requests.get(f"{url}/v2/models/mnist/ready").status_code == 200
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
    out = requests.post(f"{url}/v2/models/mnist/infer", json=body).json()
    assert out["id"] == "req-1" and out["model_name"] == "mnist"
    outputs = {o["name"]: o for o in out["outputs"]}
    assert outputs["digit"]["data"] == list(range(10))
    assert outputs["probabilities"]["shape"] == [10, 10]
    bad = dict(body, inputs=[dict(body["inputs"][0], shape=[10, 28, 28])])
    assert_error(requests.post(f"{url}/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    bad = dict(body, inputs=[dict(body["inputs"][0], datatype="INT8")])
    assert_error(requests.post(f"{url}/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    bad = dict(body, inputs=[dict(body["inputs"][0], data=[1.0, 2.0])])
    assert_error(requests.post(f"{url}/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    one = dict(body["inputs"][0], shape=[1, 1, 28, 28])
    for data in (["0.5"] * 784, [True] * 784, [None] * 784, [[0.5] * 28] * 27 + [[0.5]]):
        bad = dict(body, inputs=[dict(one, data=data)])
        assert_error(requests.post(f"{url}/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    bad = dict(body, inputs=[dict(body["inputs"][0], name="pixels")])
    assert_error(requests.post(f"{url}/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    nested = dict(body, id=7, inputs=[dict(one, data=pixels[0].tolist())])  # [1][28][28] lists
    out = requests.post(f"{url}/v2/models/mnist/infer", json=nested).json()
    assert out["id"] == "7" and out["outputs"][1]["data"] == [0]
    for bad_id in ({"a": [1]}, [1], True, 1.5):
        bad = dict(body, id=bad_id)
        assert_error(requests.post(f"{url}/v2/models/mnist/infer", json=bad), 400, "bad_tensor")
    # Pixels are [0, 1]: 0-255 values, or normalized ones, would give confident nonsense.
    for data in (pixels[0] * 255, pixels[0] - 0.5, np.full_like(pixels[0], -1e30)):
        bad = dict(body, inputs=[dict(one, data=data.ravel().tolist())])
        r = requests.post(f"{url}/v2/models/mnist/infer", json=bad)
        assert_error(r, 400, "bad_tensor")
        assert "[0, 1]" in r.json()["error"]["message"]
    assert_error(requests.post(f"{url}/v2/models/nope/infer", json=body), 404)


def test_drawing_page_is_served(shipped_server):
    page = requests.get(f"{shipped_server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert 'id="pad"' in page.text and "/static/app.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
    assert requests.get(f"{shipped_server.url}/static/app.js").status_code == 200


def test_metrics_are_scraped_across_workers(shipped_server, digits):
    url = shipped_server.url
    for _ in range(6):
        requests.post(
            f"{url}/predict", data=png(digits[2][0]), headers={"Content-Type": "image/png"}
        )
    requests.get(f"{url}/nowhere")
    for i in range(3):  # made-up methods share one label: no series per name a client sends
        requests.request(f"X{i}QWERTY", f"{url}/nowhere")
    families = {
        f.name: f for f in text_string_to_metric_families(requests.get(f"{url}/metrics").text)
    }
    predict_ok = sum(
        s.value
        for s in families["digitserve_requests"].samples
        if s.labels.get("endpoint") == "/predict" and s.labels.get("status") == "200"
    )
    assert predict_ok >= 6
    assert any(
        s.labels.get("endpoint") == "<unmatched>" for s in families["digitserve_requests"].samples
    )
    methods = {s.labels["method"] for s in families["digitserve_requests"].samples}
    assert "other" in methods and not any(m.startswith("X") for m in methods), methods
    counts = [
        s
        for s in families["digitserve_request_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels.get("endpoint") == "/predict"
    ]
    assert counts and sum(s.value for s in counts) >= 6
    batch = [s for s in families["digitserve_batch_images"].samples if s.name.endswith("_count")]
    assert batch[0].value >= 6
    versions = [s for s in families["digitserve_model_version"].samples]
    assert len({s.labels["pid"] for s in versions}) == 2  # one per worker
    assert all(s.value >= 1 for s in versions)


def test_mnist_through_http_matches_offline_accuracy(shipped_server, full_test):
    """The whole MNIST test set posted as PNG files scores as it does offline."""
    mv = ModelStore(SHIPPED_STORE).resolve("mnist")
    offline = mv.manifest["metrics"]["test_accuracy"]
    correct = 0
    session = requests.Session()
    for start in range(0, len(full_test), 64):
        chunk = full_test.images[start : start + 64]
        files = [("image", (f"{i}.png", png(d), "image/png")) for i, d in enumerate(chunk)]
        body = session.post(f"{shipped_server.url}/predict", files=files, timeout=60).json()
        predicted = np.array([p["digit"] for p in body["predictions"]])
        correct += int((predicted == full_test.labels[start : start + 64]).sum())
    accuracy = correct / len(full_test)
    assert abs(accuracy - offline) <= 0.001, (accuracy, offline)


def _clone_version(source: ModelStore, target: ModelStore, note: str, corrupt=None) -> int:
    """Publish a copy of the shipped version into ``target`` (optionally corrupted after)."""
    mv = source.resolve("mnist")

    def write(folder):
        for role in ("symbol", "params"):
            (folder / mv.manifest["artifacts"][role]["file"]).write_bytes(
                getattr(mv, f"{role}_file").read_bytes()
            )
        return {r: mv.manifest["artifacts"][r]["file"] for r in ("symbol", "params")}

    manifest = {
        k: v
        for k, v in mv.manifest.items()
        if k not in ("name", "version", "artifacts", "schema_version")
    }
    published = publish(target, "mnist", write, {**manifest, "note": note})
    if corrupt:
        corrupt(published)
    return published.version


def test_hot_swap_under_load_and_refusal_of_bad_versions(start_server, tmp_path, digits):
    store_dir = copy_shipped_store(tmp_path / "store")
    store = ModelStore(store_dir)
    first = store.resolve("mnist").version
    server = start_server(
        {
            "DIGITSERVE_STORE": str(store_dir),
            "DIGITSERVE_POLL_SECONDS": "0.3",
            "DIGITSERVE_ADMIN_TOKEN": "tok",
        }
    )
    url = server.url
    digit, label = digits[8]
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def load() -> None:
        session = requests.Session()
        while not stop.is_set():
            r = session.post(
                f"{url}/predict", data=png(digit), headers={"Content-Type": "image/png"}, timeout=30
            )
            seen.append((r.status_code, r.json().get("model", {}).get("version", -1)))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        second = _clone_version(store, store, "hot swap")
        server.wait_workers(version=second, timeout=20)  # every worker serves it
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert seen and all(status == 200 for status, _ in seen), set(seen)
    assert {v for _, v in seen} == {first, second}
    assert seen[-1][1] == second

    # A version whose params fail sha256 verification is refused; the old one keeps serving.
    def corrupt_params(mv):
        data = bytearray(mv.params_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        mv.params_file.write_bytes(bytes(data))

    bad = _clone_version(store, ModelStore(tmp_path / "staging"), "corrupt", corrupt_params)
    staged = tmp_path / "staging" / "mnist" / str(bad)
    manifest_file = staged / "manifest.json"
    manifest_file.write_text(manifest_file.read_text().replace(f'"version": {bad}', '"version": 3'))
    staged.rename(store_dir / "mnist" / "3")
    reload = requests.post(f"{url}/admin/reload", headers={"Authorization": "Bearer tok"})
    assert reload.status_code == 200 and reload.json()["serving_version"] == second
    assert "corrupt" in reload.json()["refused"]["3"]
    time.sleep(1.0)
    for _ in range(6):
        r = requests.post(f"{url}/predict", data=png(digit), headers={"Content-Type": "image/png"})
        assert r.json()["model"]["version"] == second and r.json()["digit"] == label
    assert_error(
        requests.post(
            f"{url}/predict?version=3", data=png(digit), headers={"Content-Type": "image/png"}
        ),
        409,
        "version_refused",
    )
    # Pinning the first version still works after the swap.
    r = requests.post(
        f"{url}/predict?version={first}", data=png(digit), headers={"Content-Type": "image/png"}
    )
    assert r.json()["model"]["version"] == first
    models = requests.get(f"{url}/models").json()["models"][0]
    assert [v["version"] for v in models["versions"]] == [first, second, 3]


def test_version_that_mxnet_cannot_load_is_refused(start_server, tmp_path, digits):
    store_dir = copy_shipped_store(tmp_path / "store")
    store = ModelStore(store_dir)
    first = store.resolve("mnist").version
    # Valid checksums, but params MXNet cannot read: refused at load, never served.
    mv = store.resolve("mnist")

    def write(folder):
        (folder / "mnist-symbol.json").write_bytes(mv.symbol_file.read_bytes())
        (folder / "mnist-0000.params").write_bytes(b"not an ndarray file")
        return {"symbol": "mnist-symbol.json", "params": "mnist-0000.params"}

    manifest = {
        k: v
        for k, v in mv.manifest.items()
        if k not in ("name", "version", "artifacts", "schema_version")
    }
    broken = publish(store, "mnist", write, manifest).version
    server = start_server({"DIGITSERVE_STORE": str(store_dir)})
    assert requests.get(f"{server.url}/metadata").json()["version"] == first
    refused = [
        v
        for v in requests.get(f"{server.url}/models").json()["models"][0]["versions"]
        if v["version"] == broken
    ]
    assert refused and "refused" in refused[0]
    # Every route that names it says so, as /openapi.json documents.
    url = f"{server.url}/v2/models/mnist/versions/{broken}"
    for _ in range(4):  # both workers
        r = requests.get(f"{url}/ready")
        assert r.status_code == 503 and r.json() == {"name": "mnist", "ready": False}
        assert_error(requests.get(url), 409, "version_refused")
        assert_error(
            requests.get(f"{server.url}/models/mnist/versions/{broken}"), 409, "version_refused"
        )
        tensor = {"inputs": [{"name": "data", "shape": [1, 1, 28, 28], "datatype": "FP32"}]}
        tensor["inputs"][0]["data"] = [0.0] * 784
        assert_error(requests.post(f"{url}/infer", json=tensor), 409, "version_refused")
    assert requests.get(f"{server.url}/v2/models/mnist/versions/{first}/ready").json()["ready"]


def test_admin_reload_swaps_every_worker(start_server, tmp_path):
    """With polling off, one POST /admin/reload (answered by one worker) moves all of them."""
    store_dir = copy_shipped_store(tmp_path / "store")
    store = ModelStore(store_dir)
    first = store.resolve("mnist").version
    server = start_server(
        {
            "DIGITSERVE_STORE": str(store_dir),
            "DIGITSERVE_POLL_SECONDS": "0",
            "DIGITSERVE_ADMIN_TOKEN": "tok",
        }
    )
    url = server.url
    second = _clone_version(store, store, "reloaded")
    time.sleep(1.5)  # polling is off: nobody may notice by itself
    assert {requests.get(f"{url}/metadata").json()["version"] for _ in range(10)} == {first}
    r = requests.post(f"{url}/admin/reload", headers={"Authorization": "Bearer tok"})
    assert r.status_code == 200 and r.json()["serving_version"] == second
    # The other worker looks within a second of the signal; both pids report it.
    server.wait_workers(version=second, timeout=20)
    versions = [requests.get(f"{url}/metadata").json()["version"] for _ in range(20)]
    assert set(versions) == {second}, versions
