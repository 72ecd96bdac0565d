"""What only a real gunicorn (2 workers, 127.0.0.1, the shipped model) can show: bodies
chunked or cut short, gunicorn's own refusals, Connection: close, metrics summed across
workers, every MNIST test digit over HTTP, and versions swapped across workers. The
routes and answers themselves are tested in-process (tests/test_api.py)."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from store import ModelStore, loading
from store.publishing import publish
from training.data import to_input

from .images import png
from .support import (
    SHIPPED_STORE,
    assert_error,
    clone_version,
    copy_shipped_store,
    manifest_fields,
)
from .test_api import BAD_INPUTS

FORM_WITH_BIG_FIELD = (
    b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
    + b"x" * 600_000
    + b"\r\n--b--\r\n"
)


def test_hostile_requests_leave_every_worker_alive(shipped_server, digits):
    """Every bad input of test_api.py, chunked ones included, through gunicorn: each is
    answered in the error shape and no worker dies or restarts."""
    url = shipped_server.url
    pids = shipped_server.worker_pids()
    for kwargs, status, code in BAD_INPUTS:
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


def test_a_kept_alive_connection_serves_on_after_a_body_read_whole_or_left_unread(
    shipped_server, digits
):
    """The worker skips gthread's drain after a body the app read to its end; a body the
    app never read (a 405) is still drained, and the connection serves the next one."""
    host, port = shipped_server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(
            "POST", "/predict", body=png(digits[7][0]), headers={"Content-Type": "image/png"}
        )
        first = conn.getresponse()
        assert first.status == 200 and json.loads(first.read())["digit"] == 7
        sock = conn.sock
        conn.request("POST", "/ready", body=b"x" * 5000)  # GET only: the body is not read
        refused = conn.getresponse()
        refused.read()
        assert refused.status == 405 and refused.getheader("Connection") == "keep-alive"
        for label in (3, 1):
            conn.request(
                "POST",
                "/predict",
                body=png(digits[label][0]),
                headers={"Content-Type": "image/png"},
            )
            answer = conn.getresponse()
            assert answer.status == 200 and json.loads(answer.read())["digit"] == label
        assert conn.sock is sock, "all four on one connection"
    finally:
        conn.close()


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
    code = answer["code"] if path.startswith("/v2") else answer["error"]["code"]
    assert status == 400 and code == "bad_body", answer
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


def scrape(url: str) -> dict:
    """/metrics as {metric family: {(sample name, sorted labels without pid): value}},
    summed across workers."""
    families: dict = {}
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics").text):
        samples = families.setdefault(family.name, {})
        for s in family.samples:
            key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid")))
            samples[key] = samples.get(key, 0.0) + s.value
    return families


def delta(before: dict, after: dict, family: str, name: str, **labels: str) -> float:
    """How much the samples of ``family`` matching ``labels`` grew between two scrapes."""

    def total(scraped: dict) -> float:
        return sum(
            value
            for (sample, sample_labels), value in scraped.get(family, {}).items()
            if sample == name and labels.items() <= dict(sample_labels).items()
        )

    return total(after) - total(before)


def test_metrics_are_scraped_across_workers(shipped_server, digits):
    url = shipped_server.url
    before = scrape(url)
    for _ in range(6):  # a new connection each: the kernel spreads them over both workers
        requests.post(
            f"{url}/predict", data=png(digits[2][0]), headers={"Content-Type": "image/png"}
        )
    requests.get(f"{url}/nowhere")
    for i in range(3):  # made-up methods share one label: no series per name a client sends
        requests.request(f"X{i}QWERTY", f"{url}/nowhere")
    after = scrape(url)
    requests_total = ("digitserve_requests", "digitserve_requests_total")
    ok = {"endpoint": "/predict", "status": "200"}
    assert delta(before, after, *requests_total, **ok) == 6
    assert delta(before, after, *requests_total, endpoint="<unmatched>") == 4
    assert delta(before, after, *requests_total, endpoint="<unmatched>", method="other") == 3
    methods = {dict(labels)["method"] for _, labels in after["digitserve_requests"]}
    assert "other" in methods and not any(m.startswith("X") for m in methods), methods
    duration = ("digitserve_request_duration_seconds", "digitserve_request_duration_seconds_count")
    assert delta(before, after, *duration, **ok) == 6
    batches = ("digitserve_batch_images", "digitserve_batch_images_count")
    assert delta(before, after, *batches) == 6  # one forward each: nothing else was queued
    assert delta(before, after, "digitserve_batch_images", "digitserve_batch_images_sum") == 6
    assert delta(before, after, "digitserve_images", "digitserve_images_total") == 6
    versions = [
        s
        for f in text_string_to_metric_families(requests.get(f"{url}/metrics").text)
        for s in f.samples
        if s.name == "digitserve_model_version"
    ]
    assert len({s.labels["pid"] for s in versions}) == 2  # one per worker
    assert all(s.value >= 1 for s in versions)


def test_access_lines_are_buffered_a_second_at_most_and_all_written_at_stop(
    start_server, tmp_path, digits
):
    log = tmp_path / "access.log"
    server = start_server({"DIGITSERVE_ACCESS_LOG": str(log)}, workers=1)
    body, headers = png(digits[3][0]), {"Content-Type": "image/png"}
    assert requests.post(f"{server.url}/predict", data=body, headers=headers).ok
    deadline = time.monotonic() + 5  # FLUSH_SECONDS, and the event loop's 1 s turn
    while "POST /predict" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"POST /predict HTTP/1.1" 200' in log.read_text()
    with requests.Session() as session:  # fewer than FLUSH_LINES: still buffered at SIGTERM
        for _ in range(10):
            assert session.post(f"{server.url}/predict", data=body, headers=headers).ok
    server.stop()
    lines = [line for line in log.read_text().splitlines() if "POST /predict" in line]
    assert len(lines) == 11, lines


def test_every_mnist_test_digit_through_http_gets_its_offline_answer(shipped_server, full_test):
    """All 10,000 test digits posted as PNG files, 64 a request: each answer is the one the
    exported model gives offline for that image (same batches: same arithmetic)."""
    mv = ModelStore(SHIPPED_STORE).resolve("mnist")
    model = loading.load(mv)
    norm = mv.manifest["normalization"]
    session = requests.Session()
    mismatches, correct = [], 0
    for start in range(0, len(full_test), 64):
        chunk = full_test.images[start : start + 64]
        offline = model.predict(to_input(chunk, norm["mean"], norm["std"])).argmax(1)
        files = [("image", (f"{i}.png", png(d), "image/png")) for i, d in enumerate(chunk)]
        body = session.post(f"{shipped_server.url}/predict", files=files, timeout=60).json()
        served = np.array([p["digit"] for p in body["predictions"]])
        mismatches += [start + int(i) for i in np.flatnonzero(served != offline)]
        correct += int((served == full_test.labels[start : start + 64]).sum())
    assert mismatches == []
    # ...and so the accuracy training recorded for this version, to the image.
    assert correct == round(mv.manifest["metrics"]["test_accuracy"] * len(full_test))


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
        second = clone_version(store, store, "hot swap")
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

    bad = clone_version(store, ModelStore(tmp_path / "staging"), "corrupt", corrupt_params)
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

    broken = publish(store, "mnist", write, manifest_fields(mv.manifest)).version
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
    second = clone_version(store, store, "reloaded")
    time.sleep(1.5)  # polling is off: nobody may notice by itself
    assert {requests.get(f"{url}/metadata").json()["version"] for _ in range(10)} == {first}
    r = requests.post(f"{url}/admin/reload", headers={"Authorization": "Bearer tok"})
    assert r.status_code == 200 and r.json()["serving_version"] == second
    # The other worker looks within a second of the signal; both pids report it.
    server.wait_workers(version=second, timeout=20)
    versions = [requests.get(f"{url}/metadata").json()["version"] for _ in range(20)]
    assert set(versions) == {second}, versions
