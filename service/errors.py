"""The one error shape of the API: {"error": {"code": ..., "message": ...}}.

Everything a client can cause is raised as an ApiError subclass, anywhere in the
service (preprocessing included); `register_error_handlers` turns it, and every
HTTP error Flask/Werkzeug raises, into that JSON shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class ApiError(Exception):
    status = 400
    code = "bad_request"
    headers: ClassVar[Mapping[str, str]] = {}  # added to the response

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class BadBody(ApiError):
    """A body that cannot be read to its end: bad chunking, or shorter than declared."""

    status, code = 400, "bad_body"


class NoImage(ApiError):
    status, code = 400, "no_image"


class InvalidImage(ApiError):
    """Empty, truncated or undecodable image bytes."""

    status, code = 400, "invalid_image"


class PayloadTooLarge(ApiError):
    """Body, image count or pixel count over a configured limit."""

    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"
    headers: ClassVar[Mapping[str, str]] = {"WWW-Authenticate": 'Bearer realm="digitserve"'}


class Conflict(ApiError):
    status, code = 409, "conflict"


class ServiceUnavailable(ApiError):
    """Not ready yet, or overloaded: the client may retry."""

    status, code = 503, "unavailable"
