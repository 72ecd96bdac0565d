"""The inference engine alone: dynamic batching, back-pressure, version binding."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service import errors
from service.config import Config
from service.inference import InferenceEngine
from store import ModelStore
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
    model = engine.registry.loaded(mv.version)
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
    model = engine.registry.loaded(mv.version)
    sizes: list[int] = []
    original = model.predict
    model.predict = lambda batch: sizes.append(len(batch)) or original(batch)
    probs = engine.predict(inputs(sample_test, mv, 40), mv.version).probabilities
    assert sizes == [16, 16, 8]
    np.testing.assert_allclose(probs, original(inputs(sample_test, mv, 40)), atol=1e-6)


def test_a_forward_pass_that_hangs_makes_the_engine_not_alive(make_engine, sample_test):
    engine = make_engine(STALL_SECONDS=0.3)
    mv = engine.current
    model = engine.registry.loaded(mv.version)
    original, release = model.predict, threading.Event()
    model.predict = lambda batch: release.wait(10) and original(batch)  # a stuck MXNet engine
    future = engine.submit(inputs(sample_test, mv, 1), mv.version)
    deadline = time.monotonic() + 10
    while not engine.stalled and time.monotonic() < deadline:
        time.sleep(0.05)
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


def clone_version(root: Path, source: int, target: int, edit=None, files=True) -> Path:
    """Copy a version folder as another number (its manifest says so), optionally edited;
    ``files=False`` copies the manifest alone, as a copy made file by file starts."""
    src, dst = root / "mnist" / str(source), root / "mnist" / str(target)
    dst.mkdir()
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["version"] = target
    if edit:
        edit(manifest)
    if files:
        for art in manifest["artifacts"].values():
            shutil.copy(src / art["file"], dst / art["file"])
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def unloadable_version(root: Path, source: int, target: int) -> Path:
    """The MXNet failure: checksums that match, params MXNet cannot read."""
    folder = clone_version(root, source, target)
    params = folder / "mnist-0000.params"
    params.write_bytes(b"not an ndarray file")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"]["params"]["sha256"] = hashlib.sha256(params.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def refusals() -> float:
    return REGISTRY.get_sample_value("digitserve_model_loads_total", {"result": "refused"}) or 0


def test_bad_versions_are_refused_with_their_cause_logged_and_counted(tmp_path, tiny_store, caplog):
    root = shutil.copytree(tiny_store.root, tmp_path / "store")
    clone_version(root, 1, 2, lambda m: m.update(labels=m["labels"][:7]))
    clone_version(root, 1, 3, lambda m: m.update(version=2))  # names another version
    (root / "mnist" / "4").mkdir()
    unloadable_version(root, 1, 5)
    clone_version(root, 1, 6)
    (root / "mnist" / "6" / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    clone_version(root, 1, 7)  # the store itself fails on it, unexpectedly
    before = refusals()
    store = ModelStore(root)
    real_get = store.get

    def get(name, version):
        if version == 7:
            raise RuntimeError("a bug in the store")
        return real_get(name, version)

    store.get = get
    engine = InferenceEngine(Config(STORE=str(root), POLL_SECONDS=0), store).start()
    try:
        assert engine.ready.wait(60) and engine.current.version == 1
        refused = engine.refused
        assert set(refused) == {2, 3, 5, 6, 7}  # 4 has no manifest: not a version (yet)
        assert "the model has 10 outputs, the manifest 7 labels" in refused[2]
        assert "says version 2, folder says 3" in refused[3]
        assert "Invalid NDArray file format" in refused[5]  # the cause, not "Traceback"
        assert "unreadable manifest" in refused[6]  # deep nesting: not a RecursionError
        assert "is unusable: RuntimeError" in refused[7]  # and the engine thread lives on
        assert engine.alive and refusals() - before == 5
        logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert all(any(f"refusing mnist v{v}" in m for m in logged) for v in (2, 3, 5, 6, 7))
    finally:
        engine.stop()


def test_a_refused_version_is_retried_once_its_folder_is_complete(tmp_path, tiny_store):
    """A copy made file by file (manifest first) is refused while incomplete, then served."""
    root = shutil.copytree(tiny_store.root, tmp_path / "store")
    engine = InferenceEngine(Config(STORE=str(root), POLL_SECONDS=0.2)).start()
    try:
        assert engine.ready.wait(60) and engine.current.version == 1
        folder = clone_version(root, 1, 2, files=False)
        deadline = time.monotonic() + 30
        while 2 not in engine.refused:
            assert time.monotonic() < deadline, "v2 was never looked at"
            time.sleep(0.1)
        assert "missing" in engine.refused[2]
        for name in ("mnist-symbol.json", "mnist-0000.params"):
            shutil.copy(root / "mnist" / "1" / name, folder / name)
        while engine.current.version != 2:
            assert time.monotonic() < deadline, f"still refused: {engine.refused}"
            time.sleep(0.1)
        assert 2 not in engine.refused
    finally:
        engine.stop()


def test_reload_retries_a_version_replaced_in_place(tmp_path, tiny_store):
    root = shutil.copytree(tiny_store.root, tmp_path / "store")
    bad = unloadable_version(root, 1, 2)
    engine = InferenceEngine(Config(STORE=str(root), POLL_SECONDS=0)).start()
    try:
        assert engine.ready.wait(60) and engine.current.version == 1
        assert "Invalid NDArray" in engine.refused[2]
        shutil.rmtree(bad)
        good = clone_version(root, 1, 2, lambda m: m.update(note="fixed"))
        assert json.loads((good / "manifest.json").read_text())["note"] == "fixed"
        assert engine.reload().version == 2  # not refused again from a cached manifest
    finally:
        engine.stop()
