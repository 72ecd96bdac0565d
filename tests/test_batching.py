"""The adaptive batcher alone, with a numpy stand-in for the model (no MXNet)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from service import errors
from service.batching import AdaptiveBatcher, Job, Pending


def stand_in(version: int, batch: np.ndarray) -> np.ndarray:
    """Deterministic per-row 'probabilities': each row depends on its own image only."""
    flat = batch.reshape(len(batch), -1)
    logits = np.stack([flat[:, k::10].sum(axis=1) for k in range(10)], axis=1) + version
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def batcher(**overrides) -> AdaptiveBatcher:
    settings = {"max_batch": 8, "queue_size": 64, "max_wait": 0.5} | overrides
    return AdaptiveBatcher("mnist", **settings)


def drain(b: AdaptiveBatcher) -> list[list[Job]]:
    """Run every queued job the way the engine's thread does; the batches formed."""
    batches = []
    while (item := b.next(timeout=0)) is not None:
        jobs = b.collect(item)
        b.run(jobs, stand_in)
        batches.append(jobs)
    return batches


def test_a_request_alone_goes_to_the_forward_at_once():
    b = batcher(max_wait=5.0)
    future = b.submit(images(1), 1)
    started = time.monotonic()
    drain(b)
    assert time.monotonic() - started < 0.1  # max_wait is 5 s: nothing is being prepared
    assert future.result(0).probabilities.shape == (1, 10)


def test_queued_requests_share_one_forward_up_to_max_batch():
    b = batcher(max_batch=8)
    futures = [b.submit(images(3, seed=i), 1) for i in range(4)]  # 12 images
    batches = drain(b)
    assert [sum(j.size for j in jobs) for jobs in batches] == [6, 6]  # 3 + 3 + (3 > 8 - 6)
    for i, future in enumerate(futures):
        np.testing.assert_array_equal(future.result(0).probabilities, stand_in(1, images(3, i)))
    assert b.pending_images == 0


def test_the_forward_waits_for_a_request_still_being_prepared():
    b = batcher(max_wait=2.0)
    first = b.submit(images(1), 1)
    decoding = threading.Event()

    def slow_client() -> None:
        with b.preparing():
            decoding.set()
            time.sleep(0.05)  # decoding its image
            b.submit(images(1, seed=1), 1)

    thread = threading.Thread(target=slow_client)
    thread.start()
    assert decoding.wait(5)
    started = time.monotonic()
    batches = drain(b)
    thread.join(5)
    assert [len(jobs) for jobs in batches] == [2]  # the second joined the first's forward
    assert time.monotonic() - started < 1.0  # no longer than it took to prepare
    assert first.done()


def test_the_wait_for_preparing_requests_is_bounded():
    b = batcher(max_wait=0.05)
    with b.preparing():  # a request that never arrives (its image is refused)
        b.submit(images(1), 1)
        started = time.monotonic()
        drain(b)
        assert 0.04 <= time.monotonic() - started < 1.0


def test_versions_are_never_mixed_in_one_forward():
    b = batcher()
    one, two = b.submit(images(2), 1), b.submit(images(2, seed=1), 2)
    drain(b)
    assert one.result(0).version == 1 and two.result(0).version == 2
    np.testing.assert_array_equal(two.result(0).probabilities, stand_in(2, images(2, seed=1)))


def test_a_large_request_is_split_into_max_batch_chunks():
    b = batcher(max_batch=16, queue_size=64)
    sizes: list[int] = []

    def recording(version: int, batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return stand_in(version, batch)

    future = b.submit(images(40), 1)
    b.run(b.collect(b.next(0)), recording)
    assert sizes == [16, 16, 8]
    np.testing.assert_array_equal(future.result(0).probabilities, stand_in(1, images(40)))


def test_a_failing_forward_fails_its_requests_and_frees_the_queue():
    b = batcher()
    future = b.submit(images(2), 1)

    def broken(version: int, batch: np.ndarray) -> np.ndarray:
        raise errors.Conflict("mnist v1 was refused: gone", code="version_refused")

    b.run(b.collect(b.next(0)), broken)
    with pytest.raises(errors.Conflict):
        future.result(0)
    assert b.pending_images == 0


def test_over_capacity_is_a_503_before_anything_is_queued():
    b = batcher(queue_size=8)
    b.submit(images(6), 1)
    with pytest.raises(errors.ServiceUnavailable) as err:
        b.submit(images(3), 1)
    assert err.value.code == "overloaded" and b.pending_images == 6


def test_a_control_message_waits_behind_the_jobs_before_it():
    b = batcher()
    b.submit(images(1), 1)
    b.put("reload")
    b.submit(images(1, seed=1), 1)
    first = b.collect(b.next(0))
    assert len(first) == 1  # the message ends the batch...
    assert b.next(0) == "reload"  # ...and comes next, before the later job
    assert isinstance(b.next(0), Job)


def test_a_cancelled_request_is_skipped():
    b = batcher()
    cancelled = b.submit(images(1), 1)
    kept = b.submit(images(1, seed=1), 1)
    assert cancelled.cancel()
    drain(b)
    assert kept.result(0).probabilities.shape == (1, 10) and b.pending_images == 0


def test_pending_gives_its_answer_its_error_or_says_it_was_cancelled():
    answered, failed, waiting = Pending(), Pending(), Pending()
    threading.Timer(0.05, answered.set_result, ("rows",)).start()
    assert answered.result(5) == "rows" and answered.result(0) == "rows" and answered.done()
    failed.set_running_or_notify_cancel()
    failed.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        failed.result(0)
    with pytest.raises(TimeoutError):
        waiting.result(0.01)
    assert waiting.cancel() and waiting.done()
    assert not waiting.set_running_or_notify_cancel()  # the engine skips it
    with pytest.raises(CancelledError):
        waiting.result(0)
    running = Pending()
    assert running.set_running_or_notify_cancel()
    assert not running.cancel()  # too late: its forward is under way
