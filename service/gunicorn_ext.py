"""What digitserve changes in gunicorn, in one place: gunicorn.conf.py applies it.

- ``install_patches``: gunicorn's own error pages (a malformed request line, a URI
  or headers over the limits, refused before Flask sees the request) in the API's
  JSON error shape, and the app's ``Connection: close`` honoured. It checks that
  what it replaces exists, so a gunicorn upgrade that moves it fails at start.
- ``install_patches`` also sends a response's head and a small body in one ``sendall``
  (gunicorn sends them apart: two system calls and two packets a response).
- ``install_patches`` also formats the Date header once a second, not per response
  (email.utils.formatdate: 2.4% of a request thread's time on a 28x28 digit).
- ``AccessLogger``: the access log line without gunicorn's per-request dict of every
  header and environ entry (11% of a worker's GIL time at concurrency 16), written
  straight to its stream when it goes to a plain file or stdout: a ``logging`` record
  took 20 us of the 23 a line cost. Those lines are buffered and written together, at
  most a second late (nginx's ``access_log ... buffer= flush=``): a write and a flush
  under the handler's lock for every response had the request threads queueing on it.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import http
import json
import logging
import threading
import time
from typing import Any

import gunicorn.http.wsgi
import gunicorn.util
from gunicorn.glogging import Logger

# The line AccessLogger writes; any other access_log_format goes through gunicorn's own.
ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
_ACCESS_LINE = '%s "%s %s %s" %s %s %sms'  # ACCESS_LOG_FORMAT's fields, in order


def json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error in the API's one error shape, not an HTML page."""
    if status_int >= 500:  # gunicorn keeps "Bad Request" for its 501; the app's 500 code
        reason = http.HTTPStatus(status_int).phrase
    code = "internal_error" if status_int == 500 else reason.lower().replace(" ", "_")
    body = json.dumps({"error": {"code": code, "message": mesg or reason}}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


def install_patches() -> None:
    """Replace gunicorn.util.write_error and wrap Response.process_headers (idempotent:
    gunicorn runs its config file again on SIGHUP)."""
    for owner, name in (
        (gunicorn.util, "write_error"),
        (gunicorn.util, "write_nonblock"),
        (gunicorn.http.wsgi.Response, "process_headers"),
        (gunicorn.http.wsgi.Response, "force_close"),
        (gunicorn.http.wsgi.Response, "default_headers"),
        (gunicorn.http.wsgi.Response, "write"),
        (gunicorn.util, "http_date"),
    ):
        if not callable(getattr(owner, name, None)):
            raise RuntimeError(
                f"digitserve: this gunicorn has no {owner.__name__}.{name}; "
                "service/gunicorn_ext.py must be updated for it"
            )
    gunicorn.util.write_error = json_error
    if not getattr(gunicorn.util.http_date, "_digitserve", False):
        gunicorn.util.http_date = _once_a_second(gunicorn.util.http_date)
    original = gunicorn.http.wsgi.Response.process_headers
    if getattr(original, "_digitserve", False):
        return

    def process_headers(self, headers) -> None:
        """Honour the app's ``Connection: close`` (gunicorn drops hop-by-hop headers):
        the app sends it when it answers without reading the body, after which gunicorn
        closes the connection anyway; the client must not be told "keep-alive" first."""
        original(self, headers)
        if any(k.lower() == "connection" and v.strip().lower() == "close" for k, v in headers):
            self.force_close()

    process_headers._digitserve = True  # type: ignore[attr-defined]
    gunicorn.http.wsgi.Response.process_headers = process_headers
    gunicorn.http.wsgi.Response.write = _head_with_body(gunicorn.http.wsgi.Response.write)


def _once_a_second(http_date: Any) -> Any:
    """gunicorn.util.http_date, formatted once per second for "now" (the header has
    whole seconds); any other timestamp as before."""
    latest: tuple[int, str] = (-1, "")

    def cached(timestamp: float | None = None) -> str:
        nonlocal latest
        if timestamp is not None:
            return http_date(timestamp)
        second = int(time.time())
        if latest[0] != second:  # a race formats the same second twice: harmless
            latest = (second, http_date(second))
        return latest[1]

    cached._digitserve = True  # type: ignore[attr-defined]
    cached.__wrapped__ = http_date  # type: ignore[attr-defined]
    return cached


# Bodies up to this size go out in the head's sendall; a larger one goes after it as before.
_COALESCE_MAX = 64 * 1024


def _head_with_body(write: Any) -> Any:
    """Response.write that sends the head and a first, whole, small body in one call."""

    def write_with_head(self, arg) -> None:
        if (
            self.headers_sent
            or self.chunked
            or getattr(self, "_omits_body", False)
            or not isinstance(arg, bytes)
            or self.response_length != len(arg)
            or len(arg) > _COALESCE_MAX
        ):
            write(self, arg)
            return
        head = self.default_headers()  # what send_headers sends, then the body
        head.extend([f"{k}: {v}\r\n" for k, v in self.headers])
        head.append("\r\n")
        self.headers_sent = True
        self.sent += len(arg)
        gunicorn.util.write(self.sock, "".join(head).encode("latin-1") + arg)

    return write_with_head


# Buffered access lines go out when this many are waiting, or the oldest is this old
# (also checked by the worker's event loop each turn, so a quiet server is not behind).
FLUSH_LINES = 64
FLUSH_SECONDS = 1.0


class AccessLogger(Logger):
    """gunicorn's Logger with a lean, buffered ``access`` for ACCESS_LOG_FORMAT."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._pending: collections.deque[str] = collections.deque()  # appends: thread-safe
        self._oldest = 0.0  # monotonic time of the first pending line
        self._flushing = threading.Lock()
        atexit.register(self.flush_access)  # a worker's normal exit (sys.exit) runs it

    def access(self, resp, req, environ, request_time) -> None:
        if not self.access_log_enabled:
            return
        if self.cfg.access_log_format != ACCESS_LOG_FORMAT:
            super().access(resp, req, environ, request_time)
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        sent = getattr(resp, "sent", None)
        millis = request_time.seconds * 1000 + request_time.microseconds // 1000
        args = (
            environ.get("REMOTE_ADDR", "-"),
            environ["REQUEST_METHOD"],
            environ["RAW_URI"],
            environ["SERVER_PROTOCOL"],
            status,
            "-" if sent is None else sent,
            millis,
        )
        try:
            streams = self._plain_streams()
            if streams is None:
                self.access_log.info(_ACCESS_LINE, *args)
                return
            now = time.monotonic()
            if not self._pending:
                self._oldest = now
            self._pending.append(_ACCESS_LINE % args + "\n")
            if len(self._pending) >= FLUSH_LINES or now - self._oldest >= FLUSH_SECONDS:
                self.flush_access()
        except Exception:
            self.exception("access log")

    def flush_due(self) -> None:
        """Write the buffered lines if the oldest has waited FLUSH_SECONDS (the event loop)."""
        if self._pending and time.monotonic() - self._oldest >= FLUSH_SECONDS:
            self.flush_access()

    def flush_access(self) -> None:
        """Write every buffered line, in order, to the access log's streams."""
        if not self._flushing.acquire(blocking=False):
            return  # another thread is writing them
        try:
            lines = []
            with contextlib.suppress(IndexError):
                while True:
                    lines.append(self._pending.popleft())
            if not lines:
                return
            streams = self._plain_streams()
            if streams is None:  # reconfigured since: through logging, line by line
                for line in lines:
                    self.access_log.info(line.rstrip("\n"))
                return
            text = "".join(lines)
            for handler in streams:
                handler.acquire()
                try:
                    handler.stream.write(text)
                    handler.flush()
                finally:
                    handler.release()
        except Exception:
            self.exception("access log")
        finally:
            self._flushing.release()

    def reopen_files(self) -> None:
        """USR1 (log rotation): what is buffered goes to the file being rotated out."""
        self.flush_access()
        super().reopen_files()

    def _plain_streams(self) -> list[logging.StreamHandler] | None:
        """The access log's handlers if each only writes the message to a stream (stdout,
        a file: what --access-logfile sets up), so a line can skip the LogRecord; None
        for anything else (syslog, filters, another format, a level that drops INFO)."""
        log = self.access_log
        if log.filters or not log.isEnabledFor(logging.INFO) or not log.handlers:
            return None
        for handler in log.handlers:
            plain = (
                type(handler) in (logging.StreamHandler, logging.FileHandler)
                and not handler.filters
                and handler.level <= logging.INFO
                and handler.formatter is not None
                and handler.formatter._fmt == "%(message)s"
                and handler.stream is not None
            )
            if not plain:
                return None
        return log.handlers
