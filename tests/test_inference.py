"""The inference engine alone: dynamic batching, back-pressure, version binding."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from service import errors
from service.config import Config
from service.inference import InferenceEngine
from training.data import to_input


@pytest.fixture
def make_engine(tiny_store):
    engines = []

    def make(**overrides) -> InferenceEngine:
        config = Config(STORE=str(tiny_store.root), POLL_SECONDS=0, **overrides)
        engine = InferenceEngine(config).start()
        engines.append(engine)
        assert engine.ready.wait(60)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def inputs(sample_test, mv, n: int, offset: int = 0) -> np.ndarray:
    norm = mv.manifest["normalization"]
    return to_input(sample_test.images[offset : offset + n], norm["mean"], norm["std"])


def test_concurrent_requests_share_forward_passes(make_engine, sample_test):
    engine = make_engine(BATCH_WAIT_MS=200, MAX_BATCH=64)
    mv = engine.current
    model = engine._loaded[mv.version]
    sizes: list[int] = []
    original = model.predict

    def recording(batch):
        sizes.append(len(batch))
        return original(batch)

    model.predict = recording
    alone = engine.predict(inputs(sample_test, mv, 1, 5), mv.version).probabilities
    sizes.clear()
    barrier = threading.Barrier(12)
    results: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        barrier.wait()
        results[i] = engine.predict(inputs(sample_test, mv, 1, i), mv.version).probabilities

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(sizes) == 12 and len(sizes) < 12, sizes  # requests were batched together
    np.testing.assert_allclose(results[5], alone, atol=1e-6)  # and answered independently
    for i in range(12):
        expected = original(inputs(sample_test, mv, 1, i))
        np.testing.assert_allclose(results[i], expected, atol=1e-6)


def test_large_request_is_split_into_max_batch_chunks(make_engine, sample_test):
    engine = make_engine(MAX_BATCH=16)
    mv = engine.current
    model = engine._loaded[mv.version]
    sizes: list[int] = []
    original = model.predict
    model.predict = lambda batch: sizes.append(len(batch)) or original(batch)
    probs = engine.predict(inputs(sample_test, mv, 40), mv.version).probabilities
    assert sizes == [16, 16, 8]
    np.testing.assert_allclose(probs, original(inputs(sample_test, mv, 40)), atol=1e-6)


def test_a_forward_pass_that_hangs_makes_the_engine_not_alive(make_engine, sample_test):
    engine = make_engine(STALL_SECONDS=0.3)
    mv = engine.current
    model = engine._loaded[mv.version]
    original, release = model.predict, threading.Event()
    model.predict = lambda batch: release.wait(10) and original(batch)  # a stuck MXNet engine
    future = engine.submit(inputs(sample_test, mv, 1), mv.version)
    threading.Event().wait(0.8)
    assert engine.stalled and not engine.alive  # /health and /ready now fail
    release.set()
    assert future.result(10).probabilities.shape == (1, 10)
    assert engine.alive and not engine.stalled


def test_full_queue_answers_503_not_a_hang(make_engine, sample_test):
    engine = make_engine(QUEUE_SIZE=8)
    mv = engine.current
    with pytest.raises(errors.ServiceUnavailable) as err:
        engine.submit(inputs(sample_test, mv, 9), mv.version)
    assert err.value.code == "overloaded" and err.value.status == 503


def test_unknown_version_is_not_found(make_engine):
    engine = make_engine()
    with pytest.raises(errors.NotFound):
        engine.version_for(99)


def test_no_model_in_store_is_not_ready(tmp_path):
    engine = InferenceEngine(Config(STORE=str(tmp_path), POLL_SECONDS=0)).start()
    try:
        with pytest.raises(errors.ServiceUnavailable):
            for _ in range(50):  # until the first look at the (empty) store is done
                engine.version_for(None)
        assert "no loadable version" in (engine.load_error or "")
        assert not engine.ready.is_set()
    finally:
        engine.stop()
