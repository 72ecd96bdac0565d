"""service/gunicorn_ext.py in-process: one send for a small response, the access log line."""

from __future__ import annotations

import datetime
import logging
import sys
import threading
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
    assert path.read_text() == ""  # buffered...
    logger.flush_access()
    assert path.read_text() == LINE  # ...until flushed


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
    logger.flush_access()
    assert capsys.readouterr().out == LINE


def test_access_lines_go_out_together_when_enough_wait(access_logger, tmp_path):
    path = tmp_path / "access.log"
    logger = access_logger(str(path))
    for _ in range(gunicorn_ext.FLUSH_LINES - 1):
        log_one(logger)
    assert path.read_text() == ""
    log_one(logger)
    assert path.read_text() == LINE * gunicorn_ext.FLUSH_LINES


def test_a_quiet_servers_access_line_goes_out_within_a_second(access_logger, tmp_path, monkeypatch):
    path = tmp_path / "access.log"
    logger = access_logger(str(path))
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    log_one(logger)
    now[0] += gunicorn_ext.FLUSH_SECONDS - 0.01
    logger.flush_due()  # what the worker's event loop calls each turn (at most 1 s apart)
    assert path.read_text() == ""
    now[0] += 0.01
    logger.flush_due()
    assert path.read_text() == LINE
    now[0] += 5
    log_one(logger)  # the first line after a quiet spell waits its second too
    assert path.read_text() == LINE
    now[0] += gunicorn_ext.FLUSH_SECONDS
    log_one(logger)  # a request after it takes both out
    assert path.read_text() == LINE * 3


def test_access_lines_from_many_threads_each_written_once(access_logger, tmp_path):
    path = tmp_path / "access.log"
    logger = access_logger(str(path))

    def serve(thread: int) -> None:
        for i in range(500):
            environ = {"REMOTE_ADDR": f"10.0.0.{thread}", "REQUEST_METHOD": "GET"}
            environ |= {"RAW_URI": f"/{i}", "SERVER_PROTOCOL": "HTTP/1.1"}
            resp = types.SimpleNamespace(status="200 OK", sent=1)
            logger.access(resp, None, environ, datetime.timedelta(0))

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logger.flush_access()
    lines = path.read_text().splitlines()
    assert sorted(lines) == sorted(
        f'10.0.0.{t} "GET /{i} HTTP/1.1" 200 1 0ms' for t in range(8) for i in range(500)
    )
    for t in range(8):  # each thread's lines in the order it wrote them
        mine = [line for line in lines if line.startswith(f"10.0.0.{t} ")]
        assert mine == [f'10.0.0.{t} "GET /{i} HTTP/1.1" 200 1 0ms' for i in range(500)]


def test_buffered_access_lines_go_to_the_file_being_rotated_out(access_logger, tmp_path):
    path = tmp_path / "access.log"
    logger = access_logger(str(path))
    log_one(logger)
    path.rename(tmp_path / "access.log.1")  # logrotate, then USR1
    logger.reopen_files()
    assert (tmp_path / "access.log.1").read_text() == LINE
    log_one(logger)
    logger.flush_access()
    assert path.read_text() == LINE
