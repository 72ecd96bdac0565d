"""The inference engine: one thread per worker owns every MXNet call.

Request threads never touch the model: they submit preprocessed images to the
batcher (service.batching) and wait on a Pending. The engine's thread

- loads the serving version at start (``ready`` is set after), through the
  version registry (service.registry),
- runs queued requests in batched forward passes,
- polls the store and hot-swaps to a newer version: a request is bound to the
  version that was current when it was submitted, so requests in flight finish
  on the old version while new ones get the new one,
- refuses a version that fails verification or loading, keeping the old one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service import errors
from service.batching import AdaptiveBatcher, Job, Pending, Prediction
from service.config import Config
from service.registry import Loader, VersionRegistry, default_loader
from store import ModelStore, ModelVersion
from store.single import SingleVersionStore, open_store

__all__ = ["InferenceEngine", "Prediction"]

log = logging.getLogger(__name__)


@dataclass
class _Reload:
    future: Pending = field(default_factory=Pending)


_STOP = object()


class InferenceEngine:
    def __init__(
        self,
        config: Config,
        store: ModelStore | SingleVersionStore | None = None,
        loader: Loader = default_loader,
    ):
        self.config = config
        # A versioned store, or one exported version (KServe's /mnt/models): store.single
        self.store = store or open_store(config.STORE)
        self.name = config.MODEL_NAME
        self.registry = VersionRegistry(
            self.store,
            self.name,
            pinned=config.MODEL_VERSION,
            keep_loaded=config.LOADED_VERSIONS,
            loader=loader,
        )
        self.batcher = AdaptiveBatcher(
            self.name,
            max_batch=config.MAX_BATCH,
            queue_size=config.QUEUE_SIZE,
            max_wait=config.BATCH_WAIT_MS / 1000,
        )
        self.ready = self.registry.ready
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._first_look_done = threading.Event()  # the start-up load tried, ok or not

    # -- request threads -------------------------------------------------------------
    def start(self) -> InferenceEngine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.batcher.put(_STOP)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The inference thread runs and is not stuck in a forward pass (gunicorn's
        heartbeat comes from another thread, so it cannot see either)."""
        return self._thread.is_alive() and not self.stalled

    @property
    def stalled(self) -> bool:
        return self.batcher.stalled(self.config.STALL_SECONDS)

    @property
    def current(self) -> ModelVersion | None:
        return self.registry.current

    @property
    def load_error(self) -> str | None:
        return self.registry.load_error

    @property
    def refused(self) -> dict[int, str]:
        return self.registry.refused

    def wait_started(self) -> None:
        """Wait (up to INFERENCE_TIMEOUT) for the start-up load to be tried, so a worker
        that booted late answers like the others instead of "nothing loaded"."""
        if self.alive:
            self._first_look_done.wait(self.config.INFERENCE_TIMEOUT)

    def version_for(self, version: int | None) -> ModelVersion:
        """The version a request will run on: pinned, or the current one.

        NotFound for an unknown version, Conflict for a refused one; while the
        start-up load runs it waits for it; with no model after that, ServiceUnavailable.
        """
        if not self._first_look_done.is_set():
            self.wait_started()
        if version is None:
            current = self.registry.current
            if current is None:
                raise errors.ServiceUnavailable("the model is not loaded yet", code="not_ready")
            return current
        return self.registry.manifest(version)

    def check_capacity(self, n: int) -> None:
        """503 now if ``n`` more images would not fit in the queue: called before the
        request's images are decoded, so an overloaded worker spends nothing on them."""
        self.batcher.check_capacity(n)

    def preparing(self) -> contextlib.AbstractContextManager[None]:
        """Wrap a request's decoding and ``submit`` in this, so a forward may wait for it."""
        return self.batcher.preparing()

    def submit(self, inputs: np.ndarray, version: int) -> Pending:
        """Queue normalized inputs for ``version``; the Pending gives a Prediction."""
        return self.batcher.submit(inputs, version)

    def result(self, future: Pending) -> Prediction:
        try:
            return future.result(timeout=self.config.INFERENCE_TIMEOUT)
        except TimeoutError as exc:
            future.cancel()
            raise errors.ServiceUnavailable(
                "inference timed out; retry shortly", code="timeout"
            ) from exc

    def predict(self, inputs: np.ndarray, version: int) -> Prediction:
        return self.result(self.submit(inputs, version))

    def reload(self, timeout: float = 60.0) -> ModelVersion | None:
        """Look at the store now (also retrying refused versions); the serving version.

        The sibling workers of a gunicorn server are told through RELOAD_FILE and
        do the same within a second."""
        if self.config.RELOAD_FILE:
            try:
                Path(self.config.RELOAD_FILE).write_text(f"{time.time_ns()}\n")
            except OSError as exc:
                log.warning("cannot signal the other workers to reload: %s", exc)
        request = _Reload()
        self.batcher.put(request)
        return request.future.result(timeout=timeout)

    # -- the engine's thread ------------------------------------------------------------
    def _forward(self, version: int, batch: np.ndarray) -> np.ndarray:
        return self.registry.model(version).predict(batch)  # Conflict if it was refused

    def _run(self) -> None:
        try:
            self.registry.refresh(initial=True)
        finally:
            self._first_look_done.set()
        poll = self.config.POLL_SECONDS
        next_poll = time.monotonic() + poll
        reload_seen = self._reload_stamp()
        stamp_checked = time.monotonic()
        while True:
            wait = max(0.0, next_poll - time.monotonic()) if poll > 0 else None
            if self.registry.current is None or self.config.RELOAD_FILE:
                wait = 1.0 if wait is None else min(wait, 1.0)
            item = self.batcher.next(timeout=wait)
            if item is _STOP:
                break
            try:
                stamp = reload_seen
                if isinstance(item, _Reload) or time.monotonic() - stamp_checked >= 0.5:
                    stamp, stamp_checked = self._reload_stamp(), time.monotonic()  # a stat call
                if isinstance(item, _Reload) or stamp != reload_seen:  # here or by a sibling
                    reload_seen = stamp
                    self.registry.forget_refusals()
                    self.registry.refresh()
                if isinstance(item, _Reload):
                    item.future.set_result(self.registry.current)
                elif isinstance(item, Job):
                    self.batcher.run(self.batcher.collect(item), self._forward)
                if self.registry.current is None or (poll > 0 and time.monotonic() >= next_poll):
                    self.registry.refresh(initial=self.registry.current is None)
                    next_poll = time.monotonic() + poll
            except Exception:  # a store hiccup must not end the worker's only inference thread
                log.exception("inference loop error; carrying on")
                if isinstance(item, _Reload) and not item.future.done():
                    item.future.set_result(self.registry.current)
        log.info("inference thread stopped")

    def _reload_stamp(self) -> int | None:
        try:
            return os.stat(self.config.RELOAD_FILE).st_mtime_ns if self.config.RELOAD_FILE else None
        except OSError:
            return None
