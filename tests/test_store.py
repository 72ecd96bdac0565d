"""The model store: publish, resolve, verify, atomicity and concurrency."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import (
    ManifestError,
    ModelNotFound,
    ModelStore,
    PublishInterrupted,
    StoreError,
    VerificationError,
    publishing,
)
from store.manifest import validate_manifest, validate_name
from store.publishing import check_writable, publish

BASE_MANIFEST = {
    "created": "2026-01-01T00:00:00+00:00",
    "mxnet_version": "1.9.1",
    "input": {"name": "data", "shape": [-1, 1, 28, 28], "dtype": "float32"},
    "normalization": {"mean": 0.13, "std": 0.31},
    "labels": [str(d) for d in range(10)],
}


def fake_artifacts(payload: bytes = b"weights"):
    def write(folder: Path) -> dict[str, str]:
        (folder / "m-symbol.json").write_text('{"nodes": []}')
        (folder / "m-0000.params").write_bytes(payload)
        return {"symbol": "m-symbol.json", "params": "m-0000.params"}

    return write


def test_publish_resolve_and_verify(tmp_path):
    store = ModelStore(tmp_path)
    assert store.versions("m") == []
    with pytest.raises(ModelNotFound):
        store.resolve("m")
    v1 = publish(store, "m", fake_artifacts(b"one"), BASE_MANIFEST)
    v2 = publish(store, "m", fake_artifacts(b"two"), BASE_MANIFEST)
    assert (v1.version, v2.version) == (1, 2)
    assert store.versions("m") == [1, 2]
    assert store.models() == ["m"]
    assert store.resolve("m").version == 2
    assert store.resolve("m", 1).params_file.read_bytes() == b"one"
    v1.verify()
    manifest = json.loads((v2.path / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["name"] == "m"
    assert len(manifest["artifacts"]["params"]["sha256"]) == 64
    with pytest.raises(ModelNotFound):
        store.resolve("m", 3)
    assert not list((tmp_path / "m").glob(".tmp-*"))


def test_corrupt_params_fail_verification(tmp_path):
    mv = publish(ModelStore(tmp_path), "m", fake_artifacts(), BASE_MANIFEST)
    mv.params_file.write_bytes(b"weightz")
    with pytest.raises(VerificationError, match=r"params file m-0000\.params is corrupt"):
        mv.verify()
    mv.params_file.unlink()
    with pytest.raises(VerificationError, match="is missing"):
        mv.verify()
    mv.params_file.mkdir()
    with pytest.raises(VerificationError, match="is not a regular file"):
        mv.verify()


ZEROS = "0" * 64


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.pop("labels"), "lacks 'labels'"),
        (lambda m: m.update(version="1"), "'version' has the wrong type"),
        (lambda m: m.update(version=True), "'version' has the wrong type"),
        (lambda m: m.update(schema_version=99), "unsupported"),
        (lambda m: m["normalization"].update(std=0), "std in"),
        (lambda m: m["normalization"].update(std=1e-300), "std in"),
        (lambda m: m["normalization"].update(mean=float("inf")), "a mean in"),
        (lambda m: m["normalization"].update(mean=True), "a mean in"),
        (lambda m: m["normalization"].update(mean=1e308), "a mean in"),  # inf in float32
        (lambda m: m["normalization"].update(mean=10**400), "a mean in"),
        (lambda m: m["input"].update(dtype="float16"), "dtype float32"),
        (lambda m: m.update(labels=[[[]]] * 3), "list of non-empty strings"),
        (lambda m: m.update(labels=list(range(10))), "list of non-empty strings"),
        (lambda m: m.update(labels=["0", ""]), "list of non-empty strings"),
        (lambda m: m["input"].update(shape="28x28"), "'input'"),
        (lambda m: m["artifacts"]["params"].update(sha256="abc"), "sha256"),
        (lambda m: m["artifacts"]["params"].update(file="../../etc/passwd"), "outside"),
        (lambda m: m["artifacts"].update(extra={"file": "/dev/zero", "sha256": ZEROS}), "outside"),
        (lambda m: m["artifacts"].update(extra={"sha256": ZEROS}), "'extra' needs a 'file'"),
        (lambda m: m["artifacts"].pop("symbol"), "lacks 'symbol'"),
        (lambda m: m.update(labels=[]), "empty"),
    ],
)
def test_bad_manifest_rejected(tmp_path, mutate, message):
    mv = publish(ModelStore(tmp_path), "m", fake_artifacts(), BASE_MANIFEST)
    data = json.loads((mv.path / "manifest.json").read_text())
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        validate_manifest(data)
    (mv.path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError):
        ModelStore(tmp_path).get("m", 1)


def test_an_unreadable_version_folder_is_listed_and_refused_alone(tmp_path):
    store = ModelStore(tmp_path)
    for _ in range(3):
        publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    locked = tmp_path / "m" / "2"
    real_is_file, real_read_text = Path.is_file, Path.read_text

    def denied(real):  # root ignores chmod: fake what a non-root reader sees
        def call(path: Path, *args, **kwargs):
            if path.parent == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "is_file", denied(real_is_file))
        mp.setattr(Path, "read_text", denied(real_read_text))
        assert store.versions("m") == [1, 2, 3]
        with pytest.raises(ManifestError, match="unreadable manifest"):
            store.get("m", 2)
        assert store.get("m", 3).version == 3


def test_an_unlistable_model_folder_is_a_store_error(tmp_path, monkeypatch):
    store = ModelStore(tmp_path)
    publish(store, "m", fake_artifacts(), BASE_MANIFEST)

    def iterdir(path: Path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(StoreError, match="cannot list"):
        store.versions("m")


def test_unreadable_manifest_and_mismatched_version(tmp_path):
    store = ModelStore(tmp_path)
    mv = publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    (mv.path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable"):
        store.get("m", 1)
    with open(mv.path / "manifest.json", "wb") as f:  # sparse: 1 GB that is never read
        f.truncate(1 << 30)
    with pytest.raises(ManifestError, match="the limit is"):
        store.get("m", 1)
    good = publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    os.rename(good.path, tmp_path / "m" / "7")
    with pytest.raises(ManifestError, match="folder says 7"):
        store.get("m", 7)


def test_invalid_names_and_ignored_entries(tmp_path):
    store = ModelStore(tmp_path)
    for bad in ("", "../x", "Upper", "a/b", ".hidden"):
        with pytest.raises(StoreError):
            store.versions(bad)
    publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    (tmp_path / "m" / "2").mkdir()  # no manifest: not a version
    (tmp_path / "m" / ".tmp-abc").mkdir()
    (tmp_path / "m" / "latest").mkdir()
    assert store.versions("m") == [1]


def test_version_numbers_are_never_reused(tmp_path):
    store = ModelStore(tmp_path)
    publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    v2 = publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    shutil.rmtree(v2.path)  # an operator deletes the newest version
    assert publish(store, "m", fake_artifacts(), BASE_MANIFEST).version == 3
    (tmp_path / "m" / "4").mkdir()  # a stray, incomplete version folder
    (tmp_path / "m" / "4" / "junk").write_text("x")
    assert publish(store, "m", fake_artifacts(), BASE_MANIFEST).version == 5
    assert store.versions("m") == [1, 3, 5]


def test_unwritable_store_is_a_store_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    store = ModelStore(tmp_path / "file")
    with pytest.raises(StoreError, match="cannot publish"):
        check_writable(store, "m")
    with pytest.raises(StoreError):
        publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    with pytest.raises(StoreError, match="invalid model name"):
        check_writable(ModelStore(tmp_path), "Bad Name")


def test_failed_publish_leaves_nothing(tmp_path):
    store = ModelStore(tmp_path)

    def boom(folder: Path) -> dict[str, str]:
        fake_artifacts()(folder)
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        publish(store, "m", boom, BASE_MANIFEST)
    assert store.versions("m") == []
    assert not list((tmp_path / "m").glob(".tmp-*"))


KILLED_PUBLISHER = """
import sys, time
from pathlib import Path
from store import ModelStore
from store.publishing import publish
sys.path.insert(0, {tests!r})
from test_store import BASE_MANIFEST, fake_artifacts
def slow(folder: Path):
    files = fake_artifacts(b"x" * 1000)(folder)
    print("writing", flush=True)
    time.sleep(60)
    return files
publish(ModelStore({root!r}), "m", slow, BASE_MANIFEST)
"""


def test_publish_killed_half_way_leaves_no_version(tmp_path):
    code = KILLED_PUBLISHER.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    with proc.stdout:
        assert proc.stdout.readline().strip() == b"writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    store = ModelStore(tmp_path)
    assert store.versions("m") == []
    assert list((tmp_path / "m").glob(".tmp-*")), "the half-written version stays hidden"
    assert publish(store, "m", fake_artifacts(), BASE_MANIFEST).version == 1
    assert list((tmp_path / "m").glob(".tmp-*")), "a recent one may be a live publisher's"
    stale = time.time() - 7200
    for p in (tmp_path / "m").glob(".tmp-*"):
        os.utime(p, (stale, stale))
    assert publish(store, "m", fake_artifacts(), BASE_MANIFEST).version == 2
    assert not list((tmp_path / "m").glob(".tmp-*")), "an hour-old one is removed by a publish"


def _publish_many(root: str, start: float, payload: bytes) -> list[int]:
    while time.time() < start:
        time.sleep(0.001)
    store = ModelStore(root)
    return [publish(store, "m", fake_artifacts(payload), BASE_MANIFEST).version for _ in range(5)]


def test_concurrent_publishers_get_distinct_versions(tmp_path):
    start = time.time() + 0.5
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(
            _publish_many, [(str(tmp_path), start, bytes([i]) * 10) for i in range(4)]
        )
    versions = sorted(v for r in results for v in r)
    assert versions == list(range(1, 21))
    store = ModelStore(tmp_path)
    assert store.versions("m") == versions
    for v in versions:
        store.get("m", v).verify()


def test_names_and_versions_with_a_trailing_newline_are_not_taken(tmp_path):
    with pytest.raises(StoreError, match="invalid model name"):
        validate_name("mnist\n")
    store = ModelStore(tmp_path)
    publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    shutil.copytree(tmp_path / "m" / "1", tmp_path / "m" / "2\n")
    assert store.versions("m") == [1]
    assert publish(store, "m", fake_artifacts(), BASE_MANIFEST).version == 2


def test_checking_a_store_creates_nothing_and_publish_makes_the_folders(tmp_path):
    store = ModelStore(tmp_path / "new" / "store")
    assert check_writable(store, "m") == tmp_path / "new" / "store" / "m"
    assert not (tmp_path / "new").exists()  # a run that fails later leaves nothing behind
    assert publish(store, "m", fake_artifacts(), BASE_MANIFEST).version == 1
    with pytest.raises(ModelNotFound, match="does not exist"):
        ModelStore(tmp_path / "missing").resolve("m")


def test_the_high_water_mark_is_replaced_whole(tmp_path):
    store = ModelStore(tmp_path)
    for _ in range(3):
        publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    assert (tmp_path / "m" / ".last_version").read_text() == "3\n"
    assert not list((tmp_path / "m").glob(".last_version.*"))


def test_an_interrupt_after_the_rename_reports_the_version_as_published(tmp_path, monkeypatch):
    store = ModelStore(tmp_path)
    fsync_dir = publishing._fsync_dir

    def interrupted(path):  # the model folder is flushed right after the rename
        if Path(path) == tmp_path / "m":
            raise KeyboardInterrupt
        fsync_dir(path)

    monkeypatch.setattr(publishing, "_fsync_dir", interrupted)
    with pytest.raises(PublishInterrupted) as exc:
        publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    assert exc.value.version == 1 and store.versions("m") == [1]

    def failing(path):
        if Path(path) == tmp_path / "m":
            raise OSError(5, "Input/output error")
        fsync_dir(path)

    monkeypatch.setattr(publishing, "_fsync_dir", failing)
    with pytest.raises(StoreError, match=r"'m' v2 is published, but then: .*Input/output error"):
        publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    assert store.versions("m") == [1, 2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "RecursionError|unreadable"),
        ('{"version": ' + "9" * 5000 + "}", "unreadable"),
    ],
)
def test_hostile_manifest_text_is_a_manifest_error(tmp_path, text, message):
    mv = publish(ModelStore(tmp_path), "m", fake_artifacts(), BASE_MANIFEST)
    (mv.path / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=message):
        ModelStore(tmp_path).get("m", 1)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ('"metrics": null', "'metrics' must be an object"),
        ('"metrics": [1]', "'metrics' must be an object"),
        ('"metrics": {"test_accuracy": "0.9"}', "test metrics numbers"),
        ('"metrics": {"test_accuracy": NaN}', "NaN is not a JSON number"),
        ('"metrics": {"test_loss": -Infinity}', "-Infinity is not a JSON number"),
        ('"metrics": {"test_loss": 1e400}', "1e400 is beyond a double"),  # would be inf
        ('"training": {"seconds": -1e999}', "-1e999 is beyond a double"),
    ],
)
def test_metrics_the_service_shows_must_be_well_formed(tmp_path, metrics, message):
    mv = publish(ModelStore(tmp_path), "m", fake_artifacts(), BASE_MANIFEST)
    text = (mv.path / "manifest.json").read_text()
    (mv.path / "manifest.json").write_text(text.replace("{", "{" + metrics + ", ", 1))
    with pytest.raises(ManifestError, match=message):
        ModelStore(tmp_path).get("m", 1)


def test_a_manifest_with_nan_is_not_published_and_uses_no_number(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ManifestError, match="JSON cannot represent"):
        publish(store, "m", fake_artifacts(), {**BASE_MANIFEST, "metrics": {"loss": float("nan")}})
    with pytest.raises(ManifestError, match="std in"):
        flat = {**BASE_MANIFEST, "normalization": {"mean": 0, "std": 0}}
        publish(store, "m", fake_artifacts(), flat)
    assert not (tmp_path / "m").exists()  # nothing left, not even the model folder
    assert publish(store, "m", fake_artifacts(), BASE_MANIFEST).version == 1


def test_the_version_numbers_run_out_cleanly(tmp_path):
    store = ModelStore(tmp_path)
    publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    (tmp_path / "m" / ".last_version").write_text("999999999\n")
    with pytest.raises(StoreError, match="used every version number up to 999999999"):
        check_writable(store, "m")  # before any training
    with pytest.raises(StoreError, match="used every version number up to 999999999"):
        publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    assert store.versions("m") == [1] and not list((tmp_path / "m").glob("1000000000"))


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_broken_symlink_as_the_store_is_refused_before_any_work(tmp_path, kind):
    link = tmp_path / "store"
    link.symlink_to(tmp_path / ("nowhere" if kind == "dangling" else "store"))
    with pytest.raises(StoreError, match="store is a broken symbolic link"):
        check_writable(ModelStore(link), "m")


@pytest.mark.parametrize("special", [".publish.lock", ".last_version"])
def test_a_folder_in_place_of_the_store_bookkeeping_is_refused_up_front(tmp_path, special):
    (tmp_path / "m" / special).mkdir(parents=True)
    with pytest.raises(StoreError, match=f"{special} is in the way"):
        check_writable(ModelStore(tmp_path), "m")


def test_a_failed_first_publish_removes_every_folder_it_made(tmp_path):
    store = ModelStore(tmp_path / "a" / "b" / "store")

    def failing(folder: Path) -> dict[str, str]:
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        publish(store, "m", failing, BASE_MANIFEST)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_as_the_rename_returns_still_reports_the_version(tmp_path, monkeypatch):
    """The signal is handled right after os.rename, before the flag that says so is set."""
    store = ModelStore(tmp_path)
    real_rename = os.rename

    def rename_then_interrupt(src, dst):
        real_rename(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(publishing.os, "rename", rename_then_interrupt)
    with pytest.raises(PublishInterrupted) as exc:
        publish(store, "m", fake_artifacts(), BASE_MANIFEST)
    assert exc.value.version == 1 and store.versions("m") == [1]


def test_a_manifest_too_big_to_read_back_is_not_published(tmp_path):
    store = ModelStore(tmp_path)
    huge = {**BASE_MANIFEST, "history": ["x" * 1000] * 5000}
    with pytest.raises(ManifestError, match="manifest is over"):
        publish(store, "m", fake_artifacts(), huge)
    assert not (tmp_path / "m").exists()
