"""deploy/nginx/nginx.conf, run by Debian's nginx in front of a real gunicorn: its own
errors in the API's JSON shape (413, 502, 504), the API's passed through, whole requests
buffered, and kept-alive connections to gunicorn. (A client that times out gets no answer
from nginx, only a 408 in its log: test_slow_clients.py.)"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import Server, free_port

from .clients import Outcome, local_address, predict_request, run_load, send
from .harness import Nginx, nginx_binary, upstream_connections

pytestmark = pytest.mark.reliability


@pytest.fixture(autouse=True)
def _needs_nginx() -> None:
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")


@pytest.fixture
def gunicorn(start_server: Callable[..., Server], store_copy: Path) -> Server:
    return start_server({"DIGITSERVE_STORE": str(store_copy)}, workers=2)


@pytest.fixture
def proxy(gunicorn: Server, tmp_path: Path) -> Iterator[Nginx]:
    front = Nginx(tmp_path / "nginx", gunicorn.port, {"client_body_timeout": "2s"})
    yield front
    front.stop()


def assert_shape(outcome: Outcome, status: int, code: str) -> dict:
    assert outcome.kind == "answer" and outcome.status == status, outcome
    assert outcome.headers.get("content-type", "").startswith("application/json"), outcome
    body = outcome.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return body


def test_own_413_for_a_body_over_the_limit(proxy):
    head = (
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {10 * 1024 * 1024 + 1}\r\n\r\n"
    )
    outcome = send(local_address(proxy.url), head.encode(), timeout=10)
    assert_shape(outcome, 413, "payload_too_large")
    assert outcome.headers.get("server") == "nginx"  # nginx's, before gunicorn saw it
    # At the limit exactly, the body is read and passed on: the app judges it.
    body = bytes(10 * 1024 * 1024)
    at_limit = send(local_address(proxy.url), predict_request(body), timeout=30)
    assert_shape(at_limit, 400, "invalid_image")


def test_own_502_when_gunicorn_is_not_there(tmp_path):
    front = Nginx(tmp_path / "nginx", free_port())  # nothing listens there
    try:
        outcome = send(local_address(front.url), predict_request(b"x"), timeout=15)
        assert_shape(outcome, 502, "bad_gateway")
    finally:
        front.stop()


def test_own_504_when_gunicorn_does_not_answer(tmp_path):
    """An upstream that accepts and reads but never answers; proxy_read_timeout 2 s."""
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = silent.accept()
            except TimeoutError:
                continue
            held.append(conn)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    front = Nginx(tmp_path / "nginx", silent.getsockname()[1], {"proxy_read_timeout": "2s"})
    try:
        outcome = send(local_address(front.url), predict_request(b"x"), timeout=15)
        assert_shape(outcome, 504, "gateway_timeout")
        assert 1.5 <= outcome.seconds <= 6
    finally:
        front.stop()
        stop.set()
        acceptor.join(5)
        for conn in held:
            conn.close()
        silent.close()


def test_the_apis_answers_pass_through(proxy, pngs):
    address = local_address(proxy.url)
    ok = send(address, predict_request(pngs[0]))
    assert ok.ok and ok.json()["model"]["name"] == "mnist"
    assert_shape(send(address, predict_request(b"not an image")), 400, "invalid_image")
    missing = send(address, b"GET /models/other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert_shape(missing, 404, "model_not_found")
    # A chunked upload reaches gunicorn whole, with a length (nginx buffers it).
    chunked = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"".join(
            b"%x\r\n%s\r\n" % (len(pngs[1][i : i + 100]), pngs[1][i : i + 100])
            for i in range(0, len(pngs[1]), 100)
        )
        + b"0\r\n\r\n"
    )
    assert send(address, chunked).ok


def test_gunicorn_sees_a_request_only_once_it_is_whole(proxy, gunicorn, payloads):
    """A client that stalls mid-body costs gunicorn no connection at all."""
    idle = upstream_connections(gunicorn.port)
    with socket.create_connection(local_address(proxy.url)) as stalled:
        stalled.sendall(payloads[0][: len(payloads[0]) // 2])
        time.sleep(1.0)
        assert upstream_connections(gunicorn.port) <= idle  # nothing new opened for it


def test_connections_to_gunicorn_are_kept_alive(proxy, gunicorn, payloads, figure):
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            seen.update(upstream_connections(gunicorn.port))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = run_load(
        local_address(proxy.url), payloads, concurrency=8, seconds=30, max_requests=400
    )
    stop.set()
    watcher.join(5)
    figure(
        "nginx-keepalive",
        f"{result.count} requests through nginx at concurrency 8 (a new client connection "
        f"each) used {len(seen)} connections to gunicorn",
        requests=result.count,
        upstream_connections=len(seen),
    )
    assert result.within(10) == 1.0, result.kinds()
    assert 0 < len(seen) <= 16
