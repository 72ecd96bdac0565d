"""Service configuration: a class of defaults, each overridable by a
``DIGITSERVE_*`` environment variable (or a mapping passed to create_app)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from store import DEFAULT_ROOT, StoreError
from store.manifest import is_version, validate_name

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "DIGITSERVE_"
MAX_SECONDS = 86_400.0


@dataclass(frozen=True)
class Config:
    # Where the model comes from.
    STORE: str = str(DEFAULT_ROOT)  # a model store, or one version (store.single)
    MODEL_NAME: str = "mnist"
    MODEL_VERSION: int | None = None  # pin a version; unset: newest, hot-swapped
    POLL_SECONDS: float = 2.0  # how often each worker looks for a new version (0: never)
    # Limits, all checked before any decoding or inference.
    MAX_CONTENT_LENGTH: int = 10 * 1024 * 1024  # request body bytes
    MAX_IMAGES: int = 64  # images in one request
    MAX_IMAGE_PIXELS: int = 40_000_000  # width x height of one image (decompression bombs)
    MAX_REQUEST_PIXELS: int = 50_000_000  # all of a request's images together (decode time)
    # The inference thread: dynamic batching and back-pressure.
    MAX_BATCH: int = 128  # images in one forward pass
    BATCH_WAIT_MS: float = 2.0  # how long a forward waits for more requests to join it
    QUEUE_SIZE: int = 1024  # images waiting in one worker before 503
    INFERENCE_TIMEOUT: float = 30.0  # seconds a request waits for its result before 503
    STALL_SECONDS: float = 60.0  # a forward pass this long is a hung engine: /health fails
    LOADED_VERSIONS: int = 3  # versions kept loaded per worker (pinned requests)
    # Operations.
    ADMIN_TOKEN: str | None = None  # enables POST /admin/reload with "Authorization: Bearer ..."
    # A file every worker of one server watches: /admin/reload touches it so that all of
    # them look at the store, not only the one that answered (gunicorn.conf.py sets it).
    RELOAD_FILE: str | None = None
    LOG_LEVEL: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name)
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        values.update(overrides)
        return cls(**values)

    def check(self) -> Config:
        """ValueError naming the first setting that cannot work; gunicorn.conf.py calls
        this in the master, so a typo stops the server with one line, not N tracebacks."""
        positive = [
            "MAX_CONTENT_LENGTH",
            "MAX_IMAGES",
            "MAX_IMAGE_PIXELS",
            "MAX_REQUEST_PIXELS",
            "MAX_BATCH",
            "QUEUE_SIZE",
            "INFERENCE_TIMEOUT",
            "STALL_SECONDS",
            "LOADED_VERSIONS",
        ]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{ENV_PREFIX}{name} must be positive, not {getattr(self, name)}")
        for name in ("POLL_SECONDS", "BATCH_WAIT_MS"):
            if getattr(self, name) < 0:
                raise ValueError(f"{ENV_PREFIX}{name} must not be negative")
        # Durations end up as thread/queue timeouts: inf, nan or 1e300 break those.
        for name, seconds in [
            ("POLL_SECONDS", self.POLL_SECONDS),
            ("BATCH_WAIT_MS", self.BATCH_WAIT_MS / 1000),
            ("INFERENCE_TIMEOUT", self.INFERENCE_TIMEOUT),
            ("STALL_SECONDS", self.STALL_SECONDS),
        ]:
            if not seconds <= MAX_SECONDS:  # also false for nan
                raise ValueError(f"{ENV_PREFIX}{name} must be at most a day, not {seconds:g} s")
        if self.BATCH_WAIT_MS / 1000 >= self.INFERENCE_TIMEOUT:
            raise ValueError(
                f"{ENV_PREFIX}BATCH_WAIT_MS must be shorter than {ENV_PREFIX}INFERENCE_TIMEOUT"
            )
        if self.QUEUE_SIZE < self.MAX_IMAGES:
            raise ValueError(
                f"{ENV_PREFIX}QUEUE_SIZE ({self.QUEUE_SIZE}) is below {ENV_PREFIX}MAX_IMAGES "
                f"({self.MAX_IMAGES}): the largest requests could never be queued"
            )
        if self.LOG_LEVEL.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"{ENV_PREFIX}LOG_LEVEL {self.LOG_LEVEL!r} is not a log level")
        if self.MODEL_VERSION is not None and not is_version(str(self.MODEL_VERSION)):
            raise ValueError(
                f"{ENV_PREFIX}MODEL_VERSION must be a version from 1 to 999999999, "
                f"not {self.MODEL_VERSION}"
            )
        try:
            validate_name(self.MODEL_NAME)
        except StoreError as exc:
            raise ValueError(f"{ENV_PREFIX}MODEL_NAME: {exc}") from None
        return self


def _parse(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name}={raw!r} is not a number") from exc
    return raw
