"""What digitserve changes in gunicorn, in one place: gunicorn.conf.py applies it.

- ``install_patches``: gunicorn's own error pages (a malformed request line, a URI
  or headers over the limits, refused before Flask sees the request) in the API's
  JSON error shape, and the app's ``Connection: close`` honoured. It checks that
  what it replaces exists, so a gunicorn upgrade that moves it fails at start.
- ``AccessLogger``: the access log line without gunicorn's per-request dict of every
  header and environ entry (11% of a worker's GIL time at concurrency 16).
"""

from __future__ import annotations

import http
import json
from typing import Any

import gunicorn.http.wsgi
import gunicorn.util
from gunicorn.glogging import Logger

# The line AccessLogger writes; any other access_log_format goes through gunicorn's own.
ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'


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
    ):
        if not callable(getattr(owner, name, None)):
            raise RuntimeError(
                f"digitserve: this gunicorn has no {owner.__name__}.{name}; "
                "service/gunicorn_ext.py must be updated for it"
            )
    gunicorn.util.write_error = json_error
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


class AccessLogger(Logger):
    """gunicorn's Logger with a lean ``access`` for ACCESS_LOG_FORMAT."""

    def access(self, resp, req, environ, request_time) -> None:
        if not self.access_log_enabled:
            return
        if self.cfg.access_log_format != ACCESS_LOG_FORMAT:
            super().access(resp, req, environ, request_time)
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        sent = getattr(resp, "sent", None)
        millis = request_time.seconds * 1000 + request_time.microseconds // 1000
        try:
            self.access_log.info(
                '%s "%s %s %s" %s %s %sms',
                environ.get("REMOTE_ADDR", "-"),
                environ["REQUEST_METHOD"],
                environ["RAW_URI"],
                environ["SERVER_PROTOCOL"],
                status,
                "-" if sent is None else sent,
                millis,
            )
        except Exception:
            self.exception("access log")
