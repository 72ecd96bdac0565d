"""The inference engine: one thread per worker owns every MXNet call.

MXNet's threaded engine deadlocked here once with several Python threads
calling forward at once, so request threads never touch the model: they submit
preprocessed images to a queue and wait on a Future. The engine thread

- loads the serving version at start (``ready`` is set after),
- batches queued requests into one forward pass (dynamic batching: it waits up
  to ``BATCH_WAIT_MS`` for more work, up to ``MAX_BATCH`` images),
- polls the store and hot-swaps to a newer version: a request is bound to the
  version that was current when it was submitted, so requests in flight finish
  on the old version while new ones get the new one,
- refuses a version that fails verification or loading, keeping the old one.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service import errors, metrics
from service.config import Config
from service.store import ModelNotFound, ModelStore, ModelVersion, StoreError

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """What one request gets back: the probabilities and the version that made them."""

    name: str
    version: int
    probabilities: np.ndarray  # (N, classes)


@dataclass
class _Job:
    inputs: np.ndarray  # float32 (N, 1, 28, 28), normalized for `version`
    version: int
    future: Future = field(default_factory=Future)

    @property
    def size(self) -> int:
        return len(self.inputs)


@dataclass
class _Reload:
    future: Future = field(default_factory=Future)


class InferenceEngine:
    def __init__(self, config: Config, store: ModelStore | None = None):
        self.config = config
        self.store = store or ModelStore(config.STORE)
        self.name = config.MODEL_NAME
        self._queue: queue.Queue[_Job | _Reload | None] = queue.Queue()
        self._pending_images = 0
        self._pending_lock = threading.Lock()
        self._loaded: collections.OrderedDict[int, object] = collections.OrderedDict()
        self._refused: dict[int, str] = {}
        self._refused_as: dict[int, tuple | None] = {}  # the folder's signature then
        self._listing_error: str | None = None
        self._manifests: dict[int, ModelVersion] = {}
        self._unexpected: set[int] = set()  # versions whose reading raised a surprise
        self._current: ModelVersion | None = None
        self._carry: _Job | None = None
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self.ready = threading.Event()
        self._first_look_done = threading.Event()  # the start-up load tried, ok or not
        self.load_error: str | None = None
        self._stopping = False
        self._forward_since: float | None = None  # monotonic start of the forward under way

    # -- request-thread side ---------------------------------------------------------
    def start(self) -> InferenceEngine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The inference thread runs and is not stuck in a forward pass (MXNet's engine
        deadlocked here once; gunicorn's heartbeat comes from another thread)."""
        return self._thread.is_alive() and not self.stalled

    @property
    def stalled(self) -> bool:
        since = self._forward_since
        return since is not None and time.monotonic() - since > self.config.STALL_SECONDS

    @property
    def current(self) -> ModelVersion | None:
        return self._current

    def wait_started(self) -> None:
        """Wait (up to INFERENCE_TIMEOUT) for the start-up load to be tried, so a worker
        that booted late answers like the others instead of "nothing loaded"."""
        if self.alive:
            self._first_look_done.wait(self.config.INFERENCE_TIMEOUT)

    def version_for(self, version: int | None) -> ModelVersion:
        """The version a request will run on: pinned, or the current one.

        Raises NotFound for an unknown version, Conflict for a refused one. While
        the start-up load runs it waits for it (a worker that booted late must not
        fail requests the load balancer sent it, nor call a version good that its
        start-up load is about to refuse); with no model after that, ServiceUnavailable.
        """
        if not self._first_look_done.is_set():
            self.wait_started()
        if version is None:
            current = self._current
            if current is None:
                raise errors.ServiceUnavailable("the model is not loaded yet", code="not_ready")
            return current
        return self._manifest(version)

    def _manifest(self, version: int) -> ModelVersion:
        """A version's verified manifest (cached); the engine thread's own lookup, which
        must not wait for the start-up load it is itself running."""
        reason = self._refused.get(version)  # one read: the engine thread may forget it
        if reason is not None:
            raise errors.Conflict(
                f"{self.name} v{version} was refused: {reason}", code="version_refused"
            )
        cached = self._manifests.get(version)
        if cached is not None:
            return cached
        try:
            mv = self.store.get(self.name, version)
        except ModelNotFound as exc:
            raise errors.NotFound(str(exc), code="version_not_found") from exc
        except StoreError as exc:
            raise errors.Conflict(
                f"{self.name} v{version} is unusable: {exc}", code="version_refused"
            ) from exc
        except Exception as exc:  # whatever a version folder holds must not kill the engine
            if version not in self._unexpected:  # not a traceback per pinned request
                self._unexpected.add(version)
                log.exception("reading %s v%d failed unexpectedly", self.name, version)
            raise errors.Conflict(
                f"{self.name} v{version} is unusable: {type(exc).__name__}",
                code="version_refused",
            ) from exc
        self._manifests[version] = mv
        return mv

    def check_capacity(self, n: int) -> None:
        """503 now if ``n`` more images would not fit in the queue: called before the
        request's images are decoded, so an overloaded worker spends nothing on them."""
        if self._pending_images + n > self.config.QUEUE_SIZE:
            raise errors.ServiceUnavailable(
                "the server is overloaded; retry shortly", code="overloaded"
            )

    def submit(self, inputs: np.ndarray, version: int) -> Future:
        """Queue normalized inputs for ``version``; the Future gives a Prediction."""
        n = len(inputs)
        with self._pending_lock:
            self.check_capacity(n)  # again: others may have queued while this one decoded
            self._pending_images += n
        metrics.QUEUE_IMAGES.inc(n)
        job = _Job(inputs, version)
        self._queue.put(job)
        return job.future

    def predict(self, inputs: np.ndarray, version: int) -> Prediction:
        future = self.submit(inputs, version)
        try:
            return future.result(timeout=self.config.INFERENCE_TIMEOUT)
        except TimeoutError as exc:
            future.cancel()
            raise errors.ServiceUnavailable(
                "inference timed out; retry shortly", code="timeout"
            ) from exc

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
        self._queue.put(request)
        return request.future.result(timeout=timeout)

    @property
    def refused(self) -> dict[int, str]:
        return dict(self._refused)

    # -- engine-thread side -----------------------------------------------------------
    def _run(self) -> None:
        try:
            self._check_store(initial=True)
        finally:
            self._first_look_done.set()
        next_poll = time.monotonic() + self.config.POLL_SECONDS
        reload_seen = self._reload_stamp()
        while True:
            wait = max(0.0, next_poll - time.monotonic()) if self.config.POLL_SECONDS > 0 else None
            if self._current is None or self.config.RELOAD_FILE:
                wait = 1.0 if wait is None else min(wait, 1.0)
            item = self._next(timeout=wait)
            if item is None and self._stopping:
                break
            try:
                stamp = self._reload_stamp()
                if isinstance(item, _Reload) or stamp != reload_seen:  # here or by a sibling
                    reload_seen = stamp
                    self._forget_refusals(changed_only=False)
                    self._check_store()
                if isinstance(item, _Reload):
                    item.future.set_result(self._current)
                elif isinstance(item, _Job):
                    self._run_batch(self._collect(item))
                if self._current is None or (
                    self.config.POLL_SECONDS > 0 and time.monotonic() >= next_poll
                ):
                    self._check_store(initial=self._current is None)
                    next_poll = time.monotonic() + self.config.POLL_SECONDS
            except Exception:  # a store hiccup must not end the worker's only inference thread
                log.exception("inference loop error; carrying on")
                if isinstance(item, _Reload) and not item.future.done():
                    item.future.set_result(self._current)
        log.info("inference thread stopped")

    def _reload_stamp(self) -> int | None:
        try:
            return os.stat(self.config.RELOAD_FILE).st_mtime_ns if self.config.RELOAD_FILE else None
        except OSError:
            return None

    def _next(self, timeout: float | None) -> _Job | _Reload | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            self._stopping = True
        return item

    def _collect(self, first: _Job) -> list[_Job]:
        """Gather jobs for one forward: up to MAX_BATCH images or BATCH_WAIT_MS."""
        jobs, total = [first], first.size
        deadline = time.monotonic() + self.config.BATCH_WAIT_MS / 1000
        while total < self.config.MAX_BATCH:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if not isinstance(item, _Job) or total + item.size > self.config.MAX_BATCH:
                # Doesn't fit (or is a control message): it leads the next round.
                self._requeue(item)
                break
            jobs.append(item)
            total += item.size
        return jobs

    def _requeue(self, item: _Job | _Reload | None) -> None:
        if isinstance(item, _Job):
            self._carry = item
        else:
            self._queue.put(item)

    def _run_batch(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        by_version: dict[int, list[_Job]] = collections.defaultdict(list)
        for job in live:
            by_version[job.version].append(job)
        for version, group in by_version.items():
            try:
                model = self._model(version)
                batch = np.concatenate([j.inputs for j in group])
                started = time.perf_counter()
                self._forward_since = time.monotonic()
                try:
                    probs = np.concatenate(
                        [
                            model.predict(batch[i : i + self.config.MAX_BATCH])
                            for i in range(0, len(batch), self.config.MAX_BATCH)
                        ]
                    )
                finally:
                    self._forward_since = None
                metrics.FORWARD_SECONDS.observe(time.perf_counter() - started)
                metrics.BATCH_IMAGES.observe(len(batch))
                offset = 0
                for job in group:
                    job.future.set_result(
                        Prediction(self.name, version, probs[offset : offset + job.size])
                    )
                    offset += job.size
            except Exception as exc:  # reported to each waiting request, never kills the thread
                if not isinstance(exc, errors.ApiError):
                    log.exception("inference failed for %s v%d", self.name, version)
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(exc)
        done = sum(j.size for j in jobs)
        with self._pending_lock:
            self._pending_images -= done
        metrics.QUEUE_IMAGES.dec(done)

    def _model(self, version: int):
        model = self._loaded.get(version)
        if model is not None:
            self._loaded.move_to_end(version)
            return model
        signature = self._folder_signature(version)
        return self._load(self._manifest(version), signature)  # Conflict if it was refused

    def _load(self, mv: ModelVersion, signature: tuple | None):
        """``signature``: the folder as it was before its manifest was read. A refusal
        that recorded the folder as it is after the failed load would never retry a
        copy that completed meanwhile."""
        from service import model as serving  # mxnet is imported on this thread only

        try:
            loaded = serving.load(mv)  # verified, loaded and self-tested
        except Exception as exc:
            reason = serving.failure_reason(exc)
            self._refuse(mv.version, reason, signature)
            raise errors.Conflict(
                f"{mv.name} v{mv.version} was refused: {reason}", code="version_refused"
            ) from exc
        metrics.MODEL_LOADS.labels(result="loaded").inc()
        self._loaded[mv.version] = loaded
        while len(self._loaded) > max(1, self.config.LOADED_VERSIONS):
            oldest = next(iter(self._loaded))
            if self._current is not None and oldest == self._current.version:
                self._loaded.move_to_end(oldest)
                oldest = next(iter(self._loaded))
            del self._loaded[oldest]
        return loaded

    def _refuse(self, version: int, reason: str, signature: tuple | None) -> None:
        """Never serve ``version`` (until /admin/reload, or until its folder changes
        from ``signature``, taken before the attempt that failed)."""
        self._refused[version] = reason
        self._refused_as[version] = signature
        metrics.MODEL_LOADS.labels(result="refused").inc()
        log.error("refusing %s v%d: %s", self.name, version, reason)

    def _folder_signature(self, version: int) -> tuple | None:
        """What a version folder holds (names, sizes, times): a refused version is
        retried when this changes, e.g. once a copy made file by file is complete."""
        entries = []
        try:
            for path in (self.store.root / self.name / str(version)).iterdir():
                st = path.stat()
                entries.append((path.name, st.st_size, st.st_mtime_ns))
        except OSError:
            return None
        return tuple(sorted(entries))

    def _forget_refusals(self, changed_only: bool) -> None:
        for version in list(self._refused):
            if not changed_only or self._folder_signature(version) != self._refused_as.get(version):
                del self._refused[version], self._refused_as[version]
                self._manifests.pop(version, None)

    def _check_store(self, initial: bool = False) -> None:
        """Serve the pinned version, or swap to the newest loadable one."""
        pinned = self.config.MODEL_VERSION
        try:
            candidates = [pinned] if pinned is not None else self.store.versions(self.name)
        except (OSError, StoreError) as exc:
            if str(exc) != self._listing_error:  # once, not at every poll
                log.warning("cannot list the model store: %s", exc)
            self._listing_error = str(exc)
            if initial and self._current is None:
                self.load_error = f"cannot list the model store: {exc}"
            return
        self._listing_error = None
        self._forget_refusals(changed_only=True)
        current = self._current.version if self._current else 0
        for version in sorted(candidates, reverse=True):
            if version <= current:
                break
            if version in self._refused:
                continue
            signature = self._folder_signature(version)
            try:
                mv = self._manifest(version)
                self._load(mv, signature)
            except errors.ApiError as exc:
                if isinstance(exc, errors.Conflict) and version not in self._refused:
                    # a bad manifest (a missing one may still come)
                    self._refuse(version, exc.message, signature)
                if initial:
                    self.load_error = exc.message
                continue
            self._current = mv
            self.ready.set()
            self.load_error = None
            metrics.MODEL_VERSION.labels(model=self.name).set(mv.version)
            log.info(
                "now serving %s v%d%s", mv.name, mv.version, "" if initial else f" (was v{current})"
            )
            return
        if initial and self._current is None:
            if self.load_error is None:
                self.load_error = f"no loadable version of {self.name!r} in {self.store.root}"
            log.warning("nothing to serve yet: %s", self.load_error)
