"""Adaptive batching: many requests' images in one forward pass, without idle waits.

Request threads ``submit`` normalized images and wait on a ``Pending``; the engine's
thread takes the first job and ``collect``s whatever else is already queued. It
waits (at most ``max_wait`` seconds) only while other requests are still being
prepared (``preparing``): alone, a request goes to the forward at once; under
load the next batch fills while the current forward runs, as MLServer's and
Triton's batchers do.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service import errors, metrics

log = logging.getLogger(__name__)

Forward = Callable[[int, np.ndarray], np.ndarray]  # (version, batch) -> probabilities


@dataclass
class Prediction:
    """What one request gets back: the probabilities and the version that made them."""

    name: str
    version: int
    probabilities: np.ndarray  # (N, classes)


class Pending:
    """One job's answer, with the part of concurrent.futures.Future's API the engine uses.

    A lock taken at creation and released when the answer is in: a tenth of a Future's
    cost to make and to complete (no Condition, no waiter list, no callbacks).
    """

    __slots__ = ("_error", "_ready", "_state", "_value")
    _transition = threading.Lock()  # cancel (a request thread) against running (the engine)

    def __init__(self) -> None:
        self._ready = threading.Lock()
        self._ready.acquire()
        self._state = "pending"
        self._value: Any = None
        self._error: BaseException | None = None

    def set_running_or_notify_cancel(self) -> bool:
        """False if the waiter gave up first: the job is skipped."""
        with Pending._transition:
            if self._state == "cancelled":
                return False
            self._state = "running"
            return True

    def cancel(self) -> bool:
        with Pending._transition:
            if self._state != "pending":
                return False
            self._state = "cancelled"
        return True

    def done(self) -> bool:
        return self._state in ("cancelled", "finished")

    def set_result(self, value: Any) -> None:
        self._value, self._state = value, "finished"
        self._ready.release()

    def set_exception(self, error: BaseException) -> None:
        self._error, self._state = error, "finished"
        self._ready.release()

    def result(self, timeout: float | None = None) -> Any:
        """The answer; TimeoutError after ``timeout`` seconds, CancelledError if cancelled."""
        if self._state == "cancelled":
            raise CancelledError
        if not self._ready.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError
        self._ready.release()  # a second call answers at once
        if self._error is not None:
            raise self._error
        return self._value


@dataclass
class Job:
    inputs: np.ndarray  # float32 (N, 1, 28, 28), normalized for `version`
    version: int
    future: Pending = field(default_factory=Pending)

    @property
    def size(self) -> int:
        return len(self.inputs)


class AdaptiveBatcher:
    def __init__(self, name: str, *, max_batch: int, queue_size: int, max_wait: float):
        self.name = name
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.max_wait = max_wait
        # Jobs and the engine's control messages, in order.
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._carry: object | None = None
        self._lock = threading.Lock()
        self._pending_images = 0  # queued or in a forward
        self._preparing = 0  # requests admitted and still decoding
        self.forward_since: float | None = None  # monotonic start of the forward under way

    # -- request threads ---------------------------------------------------------------
    @property
    def pending_images(self) -> int:
        return self._pending_images

    def check_capacity(self, n: int) -> None:
        """503 now if ``n`` more images would not fit in the queue."""
        if self._pending_images + n > self.queue_size:
            raise errors.ServiceUnavailable(
                "the server is overloaded; retry shortly", code="overloaded"
            )

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Around a request's decoding: the engine may wait a little for its images."""
        with self._lock:
            self._preparing += 1
        try:
            yield
        finally:
            with self._lock:
                self._preparing -= 1

    def submit(self, inputs: np.ndarray, version: int) -> Pending:
        n = len(inputs)
        with self._lock:
            self.check_capacity(n)  # again: others may have queued while this one decoded
            self._pending_images += n
        metrics.QUEUE_IMAGES.inc(n)
        job = Job(inputs, version)
        self.queue.put(job)
        return job.future

    def put(self, message: object) -> None:
        """A control message for the engine's loop, behind the jobs queued before it."""
        self.queue.put(message)

    # -- the engine's thread -------------------------------------------------------------
    def next(self, timeout: float | None) -> object | None:
        """The next job or control message; None if nothing came within ``timeout``."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def collect(self, first: Job) -> list[Job]:
        """``first`` and the jobs that join it: everything queued, up to ``max_batch``
        images, waiting only while other requests are still being prepared."""
        jobs, total = [first], first.size
        deadline = time.monotonic() + self.max_wait
        while total < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if self._preparing == 0 or remaining <= 0:
                    break
                try:
                    item = self.queue.get(timeout=min(remaining, 0.0005))
                except queue.Empty:
                    continue
            if not isinstance(item, Job) or total + item.size > self.max_batch:
                self._carry = item  # doesn't fit, or a control message: it leads next round
                break
            jobs.append(item)
            total += item.size
        return jobs

    def run(self, jobs: list[Job], forward: Forward) -> None:
        """One forward per version among ``jobs`` (in ``max_batch`` chunks); each job's
        Future gets its rows, or the error."""
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        by_version: dict[int, list[Job]] = collections.defaultdict(list)
        for job in live:
            by_version[job.version].append(job)
        for version, group in by_version.items():
            try:
                inputs = [j.inputs for j in group]
                batch = inputs[0] if len(inputs) == 1 else np.concatenate(inputs)
                started = time.perf_counter()
                self.forward_since = time.monotonic()
                try:
                    chunks = [
                        forward(version, batch[i : i + self.max_batch])
                        for i in range(0, len(batch), self.max_batch)
                    ]
                finally:
                    self.forward_since = None
                probs = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
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
        with self._lock:
            self._pending_images -= done
        metrics.QUEUE_IMAGES.dec(done)

    def stalled(self, limit: float) -> bool:
        since = self.forward_since
        return since is not None and time.monotonic() - since > limit
