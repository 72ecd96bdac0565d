"""service/gunicorn_ext.py in-process: one send for a small response, the access log line."""

from __future__ import annotations

import datetime
import logging
import sys
import time
import types
from email.utils import formatdate

import gunicorn.util
import pytest
from gunicorn.config import Config
from gunicorn.http.wsgi import Response

from service import gunicorn_ext
from service.gunicorn_ext import ACCESS_LOG_FORMAT, AccessLogger, install_patches

REAL_HTTP_DATE = getattr(gunicorn.util.http_date, "__wrapped__", gunicorn.util.http_date)


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))


def response(headers: list[tuple[str, str]]) -> tuple[Response, RecordingSocket]:
    install_patches()
    req = types.SimpleNamespace(version=(1, 1), method="POST", should_close=lambda: False)
    sock = RecordingSocket()
    resp = Response(req, sock, Config())
    resp.start_response("200 OK", headers)
    return resp, sock


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    monkeypatch.setattr(gunicorn.util, "http_date", lambda *a: "Wed, 02 Dec 2026 19:00:00 GMT")


def head_as_gunicorn_sends_it(resp: Response) -> bytes:
    lines = resp.default_headers() + [f"{k}: {v}\r\n" for k, v in resp.headers]
    return ("".join(lines) + "\r\n").encode("latin-1")


def test_the_date_header_is_formatted_once_a_second_as_gunicorn_formats_it(monkeypatch):
    formatted: list[float | None] = []

    def http_date(timestamp: float | None = None) -> str:
        formatted.append(timestamp)
        return f"@{timestamp}"

    monkeypatch.setattr(gunicorn.util, "http_date", http_date)
    install_patches()
    now = [1000.25]
    monkeypatch.setattr(time, "time", lambda: now[0])
    assert [gunicorn.util.http_date() for _ in range(3)] == ["@1000"] * 3
    now[0] = 1000.99
    assert gunicorn.util.http_date() == "@1000"
    now[0] = 1001.0
    assert gunicorn.util.http_date() == "@1001"
    assert gunicorn.util.http_date(5.5) == "@5.5"  # an explicit timestamp: formatted as asked
    assert formatted == [1000, 1001, 5.5]
    install_patches()  # again (gunicorn reruns its config on SIGHUP): not wrapped twice
    assert gunicorn.util.http_date() == "@1001" and formatted == [1000, 1001, 5.5]


def test_the_cached_date_is_gunicorns_own_text():
    second = int(time.time())
    text = gunicorn_ext._once_a_second(REAL_HTTP_DATE)()  # not the fixed_date fixture's
    assert text in (formatdate(second, usegmt=True), formatdate(second + 1, usegmt=True))


def test_a_small_whole_body_goes_out_with_its_head_in_one_send():
    body = b'{"digit":7}'
    resp, sock = response([("Content-Type", "application/json"), ("Content-Length", "11")])
    resp.write(body)
    assert sock.sent == [head_as_gunicorn_sends_it(resp) + body]
    assert resp.headers_sent and resp.sent == len(body)
    resp.close()  # nothing more to send
    assert len(sock.sent) == 1


@pytest.mark.parametrize(
    ("headers", "parts"),
    [
        ([("Content-Length", "11")], [b"{", b'"digit":7}']),  # the body in two writes
        ([], [b'{"digit":7}']),  # no length: gunicorn frames it (chunked)
        ([("Content-Length", str(70_000))], [b"x" * 70_000]),  # over the coalescing size
    ],
)
def test_other_bodies_go_out_as_gunicorn_sends_them(headers, parts):
    resp, sock = response(headers)
    for part in parts:
        resp.write(part)
    resp.close()
    assert sock.sent[0] == head_as_gunicorn_sends_it(resp)
    assert len(sock.sent) > 1


@pytest.fixture
def access_logger():
    """AccessLogger for a target; gunicorn's loggers are global: their handlers (open files)
    and filters go after the test."""
    made: list[AccessLogger] = []

    def make(target: str) -> AccessLogger:
        cfg = Config()
        cfg.set("accesslog", target)
        cfg.set("access_log_format", ACCESS_LOG_FORMAT)
        made.append(AccessLogger(cfg))
        log = made[-1].access_log  # pytest's log capture handlers: not what gunicorn set up
        log.handlers = [h for h in log.handlers if not type(h).__module__.startswith("_pytest")]
        return made[-1]

    yield make
    for logger in made:
        for log in (logger.access_log, logger.error_log):
            for handler in log.handlers:
                handler.close()
            log.handlers.clear()
            log.filters.clear()


def log_one(logger: AccessLogger) -> None:
    environ = {
        "REMOTE_ADDR": "127.0.0.1",
        "REQUEST_METHOD": "POST",
        "RAW_URI": "/predict?version=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
    }
    resp = types.SimpleNamespace(status="200 OK", sent=392)
    logger.access(resp, None, environ, datetime.timedelta(microseconds=3456))


LINE = '127.0.0.1 "POST /predict?version=1 HTTP/1.1" 200 392 3ms\n'


def test_the_access_line_written_straight_to_its_file(access_logger, tmp_path):
    path = tmp_path / "access.log"
    logger = access_logger(str(path))
    assert logger._plain_streams() is not None  # the fast path
    log_one(logger)
    assert path.read_text() == LINE


def test_the_access_line_through_logging_when_a_handler_is_not_a_plain_stream(
    access_logger, tmp_path
):
    path = tmp_path / "access.log"
    logger = access_logger(str(path))
    seen: list[str] = []
    logger.access_log.addFilter(lambda record: seen.append(record.getMessage()) or True)
    assert logger._plain_streams() is None
    log_one(logger)
    assert path.read_text() == LINE
    assert seen == [LINE.rstrip("\n")]


def test_the_access_line_on_stdout(access_logger, capsys):
    logger = access_logger("-")
    handler = logger.access_log.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(sys.stdout)  # capsys replaced stdout after gunicorn took it
    assert logger._plain_streams() is not None
    log_one(logger)
    assert capsys.readouterr().out == LINE
