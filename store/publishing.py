"""Publishing a version: atomic, numbered under a lock, never reusing a number.

A version is built in ``<root>/<name>/.tmp-*`` and renamed into place under an
exclusive lock, so a reader sees either nothing or the complete version, and
concurrent publishers get distinct numbers. Only training writes to the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from store import manifest
from store.errors import PublishInterrupted, StoreError
from store.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    VERSION_RE,
    is_version,
    sha256_file,
    validate_name,
)
from store.reading import ModelStore, ModelVersion

_HIGH_WATER = ".last_version"  # the highest version ever published, so none is reused
_LOCK = ".publish.lock"


@contextlib.contextmanager
def _lock(store: ModelStore, name: str) -> Iterator[None]:
    folder = store.root / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / _LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def publish(
    store: ModelStore,
    name: str,
    write_artifacts: Callable[[Path], dict[str, str]],
    partial_manifest: dict,
) -> ModelVersion:
    """Publish a new version atomically and return it.

    ``write_artifacts(folder)`` writes the model files into a private temp
    folder and returns ``{"symbol": filename, "params": filename}``. The store
    hashes them, completes the manifest (name, version, artifacts, schema),
    fsyncs everything and renames the folder into place. If anything fails
    (or the process dies) no version appears; a temp folder a killed publisher
    left is harmless, and removed by a later publish once it is an hour old.
    """
    # Not check_writable(): the model folder may vanish and come back under us (a
    # failed first publish removes it); _make_temp retries that.
    folder = store.root / validate_name(name)
    existed = _nearest_existing(folder)
    tmp: Path | None = None
    version: int | None = None
    published = False
    try:
        tmp = _make_temp(name, folder)
        files = write_artifacts(tmp)
        artifacts = {
            role: {"file": fname, "sha256": sha256_file(tmp / fname)}
            for role, fname in files.items()
        }
        full = {
            **partial_manifest,
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": 1,  # numbered under the lock, once the manifest is known good
            "artifacts": artifacts,
        }
        manifest.validate_manifest(full, name=name)
        manifest.to_json(full)  # refused now, before a version number is taken
        with _lock(store, name):
            clean_stale_temp(store, name, older_than=3600)
            version = full["version"] = _next_version(folder)
            (tmp / MANIFEST).write_text(manifest.to_json(full), encoding="utf-8")
            _fsync_tree(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; readers may be another user
            os.rename(tmp, folder / str(version))
            published = True
            _fsync_dir(folder)
        return store.get(name, version)
    except BaseException as exc:
        # A signal handled as os.rename returns comes before `published = True`.
        renamed = version is not None and tmp is not None and not os.path.lexists(tmp)
        if published or (renamed and (folder / str(version)).is_dir()):
            # live already: say so rather than "nothing was published"
            if isinstance(exc, KeyboardInterrupt):
                raise PublishInterrupted(version) from exc
            if isinstance(exc, Exception):
                raise StoreError(f"{name!r} v{version} is published, but then: {exc}") from exc
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        # A failed first publish leaves none of the folders it made. Empty ones only:
        # another publisher may be in them (it retries if one vanishes under it).
        with contextlib.suppress(OSError):
            for made in (folder, *folder.parents):
                if made == existed:
                    break
                made.rmdir()
        if isinstance(exc, OSError):
            raise StoreError(f"could not publish {name!r} in {folder}: {exc}") from exc
        raise


def _make_temp(name: str, folder: Path) -> Path:
    """A private temp folder in the model's folder (made if missing). Retried: a
    publisher whose first publish failed may remove the empty folder meanwhile."""
    error: OSError | None = None
    for _ in range(3):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
        except FileNotFoundError as exc:
            error = exc
        except OSError as exc:
            error = exc
            break
    raise StoreError(f"could not publish {name!r} in {folder}: {error}") from error


def check_writable(store: ModelStore, name: str) -> Path:
    """The model's folder; StoreError if a version could not be published there
    (a bad name, a read-only store, a file in the way). Nothing is created: a
    run that fails later leaves no empty model folder behind."""
    folder = store.root / validate_name(name)
    try:
        existing = _nearest_existing(folder)  # publish makes the missing folders
        if not existing.is_dir():
            what = "a broken symbolic link" if existing.is_symlink() else "not a folder"
            raise NotADirectoryError(f"{existing} is {what}")
        tempfile.TemporaryFile(dir=existing).close()
        if existing == folder:
            for special in (_LOCK, _HIGH_WATER):
                path = folder / special
                if os.path.lexists(path) and not path.is_file():
                    raise IsADirectoryError(f"{path} is in the way: the store keeps a file there")
            _next_number(folder)  # StoreError once the numbers have run out
    except OSError as exc:
        raise StoreError(f"cannot publish into {folder}: {exc}") from exc
    return folder


def _next_number(folder: Path) -> int:
    """One above every version folder (complete or not) and every version ever
    published (the high-water mark), so a deleted version's number is never reused."""
    taken = [int(p.name) for p in folder.iterdir() if VERSION_RE.fullmatch(p.name)]
    with contextlib.suppress(OSError, ValueError):
        taken.append(int((folder / _HIGH_WATER).read_text().strip()))
    version = max(taken, default=0) + 1
    if not is_version(str(version)):
        raise StoreError(f"{folder} has used every version number up to {version - 1}")
    return version


def _next_version(folder: Path) -> int:
    """Take the next number (under the publish lock): recorded before it is used."""
    version = _next_number(folder)
    part = folder / f"{_HIGH_WATER}.part"  # replaced whole: a crash never truncates it
    try:
        with open(part, "w") as f:
            f.write(f"{version}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, folder / _HIGH_WATER)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    return version


def clean_stale_temp(store: ModelStore, name: str, older_than: float = 0.0) -> None:
    """Remove temp folders of publishes that died, untouched for ``older_than``
    seconds (a live publisher's is younger: it is written as the export runs)."""
    cutoff = time.time() - older_than
    for p in (store.root / validate_name(name)).glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if p.stat().st_mtime <= cutoff:
                shutil.rmtree(p, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a broken symlink counts)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)
