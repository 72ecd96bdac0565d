"""The model store: the one owner of its layout, manifest schema, publish, list,
resolve and verify. Training publishes through it; the service reads through it.

Layout::

    <root>/<name>/<version>/<name>-symbol.json   # HybridBlock.export() output
    <root>/<name>/<version>/<name>-0000.params
    <root>/<name>/<version>/manifest.json        # written last, inside the temp dir

Versions are positive integers, monotonic and immutable. A version is built in
``<root>/<name>/.tmp-*`` and renamed into place under an exclusive lock, so a
reader sees either nothing or the complete version, and concurrent publishers
get distinct numbers. Dot-folders are never listed as versions.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the shipped one is 7 kB, its history included
SCHEMA_VERSION = 1
# Matched with fullmatch: re.match with "$" also takes a trailing newline.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")
_HIGH_WATER = ".last_version"  # the highest version ever published, so none is reused
_LOCK = ".publish.lock"


def is_version(text: str) -> bool:
    """A version as written in a path or a query: 1 to 999,999,999, ASCII digits."""
    return bool(_VERSION_RE.fullmatch(text))


# Manifest fields the service relies on, with their types. Training adds more
# (hyperparameters, history, command, ...); unknown keys are kept as they are.
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "name": str,
    "version": int,
    "created": str,
    "mxnet_version": str,
    "input": dict,
    "normalization": dict,
    "labels": list,
    "artifacts": dict,
}


class StoreError(Exception):
    """Base class of the store's errors."""


class ModelNotFound(StoreError):
    pass


class ManifestError(StoreError):
    pass


class VerificationError(StoreError):
    pass


class PublishInterrupted(KeyboardInterrupt):
    """Ctrl-C arrived after the version was renamed into place: it is published."""

    def __init__(self, version: int):
        super().__init__(version)
        self.version = version


# Normalization of pixels scaled to [0, 1]: a std outside this range is a broken manifest
# (1e-300 passed a "positive" check and served confident nonsense), and so is a mean
# far outside the pixels' range (1e308 overflows float32: every input looks the same).
MIN_STD, MAX_STD, MAX_MEAN = 1e-3, 1e3, 1e3
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # a file in the version folder


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise StoreError(
            f"invalid model name {name!r}: 1 to 64 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def validate_manifest(data: Any, *, name: str | None = None, version: int | None = None) -> dict:
    """Check a manifest's shape; return it. Raises ManifestError naming the problem."""
    try:
        return _validate_manifest(data, name, version)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # e.g. 10**400
        problem = f"{type(exc).__name__}: {exc}"[:200]
        raise ManifestError(f"manifest has a malformed value ({problem})") from exc


def _validate_manifest(data: Any, name: str | None, version: int | None) -> dict:
    if not isinstance(data, dict):
        raise ManifestError("manifest is not a JSON object")
    for key, kind in REQUIRED_FIELDS.items():
        if key not in data:
            raise ManifestError(f"manifest lacks {key!r}")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise ManifestError(f"manifest field {key!r} has the wrong type")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"unsupported manifest schema_version {data['schema_version']}")
    if name is not None and data["name"] != name:
        raise ManifestError(f"manifest names model {data['name']!r}, expected {name!r}")
    if version is not None and data["version"] != version:
        raise ManifestError(f"manifest says version {data['version']}, folder says {version}")
    inp = data["input"]
    if not (
        isinstance(inp.get("name"), str)
        and isinstance(inp.get("shape"), list)
        and all(isinstance(d, int) for d in inp["shape"])
        and inp.get("dtype") == "float32"
    ):
        raise ManifestError("manifest 'input' needs name, shape (list of int) and dtype float32")
    norm = data["normalization"]
    if not (
        all(_is_number(norm.get(k)) for k in ("mean", "std"))
        and abs(norm["mean"]) <= MAX_MEAN
        and MIN_STD <= norm["std"] <= MAX_STD
    ):
        raise ManifestError(
            f"manifest 'normalization' needs a mean in [-{MAX_MEAN}, {MAX_MEAN}] and a std "
            f"in [{MIN_STD}, {MAX_STD}]"
        )
    metrics = data.get("metrics", {})  # optional (training records it); served in /metadata
    if not isinstance(metrics, dict) or not all(
        _is_number(metrics[k]) for k in ("test_accuracy", "test_loss") if k in metrics
    ):
        raise ManifestError("manifest 'metrics' must be an object, its test metrics numbers")
    labels = data["labels"]
    if not labels or not all(isinstance(label, str) and label for label in labels):
        raise ManifestError("manifest 'labels' must be a non-empty list of non-empty strings")
    arts = data["artifacts"]
    for role in ("symbol", "params"):
        if role not in arts:
            raise ManifestError(f"manifest 'artifacts' lacks {role!r}")
    for role, art in arts.items():  # every one is verified: every one must be well-formed
        if not (isinstance(art, dict) and isinstance(art.get("file"), str)):
            raise ManifestError(f"manifest artifact {role!r} needs a 'file'")
        if not re.fullmatch(r"[0-9a-f]{64}", str(art.get("sha256", ""))):
            raise ManifestError(f"manifest artifact {role!r} has no valid sha256")
        if not _FILE_RE.fullmatch(art["file"]):
            raise ManifestError(f"manifest artifact {role!r} points outside its version folder")
    return data


@dataclass(frozen=True)
class ModelVersion:
    """One published version: where its files are and what its manifest says."""

    name: str
    version: int
    path: Path
    manifest: dict

    @property
    def symbol_file(self) -> Path:
        return self.path / self.manifest["artifacts"]["symbol"]["file"]

    @property
    def params_file(self) -> Path:
        return self.path / self.manifest["artifacts"]["params"]["file"]

    def verify(self) -> None:
        """Check every artifact's sha256 against the manifest (VerificationError if not)."""
        for role, art in self.manifest["artifacts"].items():
            path = self.path / art["file"]
            try:
                if not path.is_file():
                    what = "is not a regular file" if os.path.lexists(path) else "is missing"
                    raise VerificationError(
                        f"{self.name} v{self.version}: {role} file {path} {what}"
                    )
                actual = sha256_file(path)
            except OSError as exc:
                raise VerificationError(
                    f"{self.name} v{self.version}: {role} file {path} unreadable ({exc})"
                ) from exc
            if actual != art["sha256"]:
                raise VerificationError(
                    f"{self.name} v{self.version}: {role} file {path.name} is corrupt "
                    f"(sha256 {actual[:12]}..., manifest says {art['sha256'][:12]}...)"
                )


class ModelStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    # -- reading -----------------------------------------------------------------
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name)
        )

    def versions(self, name: str) -> list[int]:
        """The published versions, ascending. A version folder that cannot be read is
        listed (``get`` then says why it is unusable); StoreError if the model's folder
        itself cannot be listed."""
        folder = self.root / validate_name(name)
        try:
            if not folder.is_dir():
                return []
            candidates = [p for p in folder.iterdir() if _VERSION_RE.fullmatch(p.name)]
        except OSError as exc:
            raise StoreError(f"cannot list {folder}: {exc}") from exc
        return sorted(int(p.name) for p in candidates if _has_manifest(p))

    def get(self, name: str, version: int) -> ModelVersion:
        path = self.root / validate_name(name) / str(version)
        manifest_path = path / MANIFEST
        if not is_version(str(version)) or not _has_manifest(path):
            raise ModelNotFound(f"model {name!r} has no version {version}")
        try:
            size = manifest_path.stat().st_size
            if size > MAX_MANIFEST_BYTES:  # read whole into every worker: bound it first
                raise ManifestError(
                    f"{manifest_path}: manifest is {size} bytes; the limit is {MAX_MANIFEST_BYTES}"
                )
            data = json.loads(
                manifest_path.read_text(encoding="utf-8"),
                parse_constant=_no_constants,
                parse_float=_finite_float,
            )
        # ValueError: also a number of over 4,300 digits; RecursionError: deep nesting
        except (OSError, ValueError, RecursionError) as exc:
            raise ManifestError(f"{manifest_path}: unreadable manifest ({exc})") from exc
        return ModelVersion(
            name, version, path, validate_manifest(data, name=name, version=version)
        )

    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        """A pinned version, or the newest one when ``version`` is None."""
        if version is None:
            versions = self.versions(name)
            if not versions:
                if not self.root.is_dir():
                    what = "is not a folder" if os.path.lexists(self.root) else "does not exist"
                    raise ModelNotFound(f"the model store {self.root} {what}")
                raise ModelNotFound(f"no published version of model {name!r} in {self.root}")
            version = versions[-1]
        return self.get(name, version)

    # -- writing -----------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / _LOCK, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def publish(
        self,
        name: str,
        write_artifacts: Callable[[Path], dict[str, str]],
        manifest: dict,
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
        folder = self.root / validate_name(name)
        existed = _nearest_existing(folder)
        tmp: Path | None = None
        version: int | None = None
        published = False
        try:
            tmp = self._make_temp(name, folder)
            files = write_artifacts(tmp)
            artifacts = {
                role: {"file": fname, "sha256": sha256_file(tmp / fname)}
                for role, fname in files.items()
            }
            full = {
                **manifest,
                "schema_version": SCHEMA_VERSION,
                "name": name,
                "version": 1,  # numbered under the lock, once the manifest is known good
                "artifacts": artifacts,
            }
            validate_manifest(full, name=name)
            _to_json(full)  # refused now, before a version number is taken
            with self._lock(name):
                self.clean_stale_temp(name, older_than=3600)
                version = full["version"] = self._next_version(folder)
                (tmp / MANIFEST).write_text(_to_json(full), encoding="utf-8")
                _fsync_tree(tmp)
                os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; readers may be another user
                os.rename(tmp, folder / str(version))
                published = True
                _fsync_dir(folder)
            return self.get(name, version)
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

    @staticmethod
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

    def check_writable(self, name: str) -> Path:
        """The model's folder; StoreError if a version could not be published there
        (a bad name, a read-only store, a file in the way). Nothing is created: a
        run that fails later leaves no empty model folder behind."""
        folder = self.root / validate_name(name)
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
                        raise IsADirectoryError(
                            f"{path} is in the way: the store keeps a file there"
                        )
                self._next_number(folder)  # StoreError once the numbers have run out
        except OSError as exc:
            raise StoreError(f"cannot publish into {folder}: {exc}") from exc
        return folder

    @staticmethod
    def _next_number(folder: Path) -> int:
        """One above every version folder (complete or not) and every version ever
        published (the high-water mark), so a deleted version's number is never reused."""
        taken = [int(p.name) for p in folder.iterdir() if _VERSION_RE.fullmatch(p.name)]
        with contextlib.suppress(OSError, ValueError):
            taken.append(int((folder / _HIGH_WATER).read_text().strip()))
        version = max(taken, default=0) + 1
        if not is_version(str(version)):
            raise StoreError(f"{folder} has used every version number up to {version - 1}")
        return version

    @classmethod
    def _next_version(cls, folder: Path) -> int:
        """Take the next number (under the publish lock): recorded before it is used."""
        version = cls._next_number(folder)
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

    def clean_stale_temp(self, name: str, older_than: float = 0.0) -> None:
        """Remove temp folders of publishes that died, untouched for ``older_than``
        seconds (a live publisher's is younger: it is written as the export runs)."""
        cutoff = time.time() - older_than
        for p in (self.root / validate_name(name)).glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime <= cutoff:
                    shutil.rmtree(p, ignore_errors=True)


def _no_constants(token: str) -> None:
    """json.loads takes NaN and Infinity, which are not JSON (and jsonify writes them bare)."""
    raise ValueError(f"{token} is not a JSON number")


def _finite_float(text: str) -> float:
    """A JSON number such as 1e400 would become inf: refused like Infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond a double")
    return value


def _to_json(manifest: dict) -> str:
    """Strict JSON: a NaN or infinity (which json.dumps writes bare) is refused, and so
    is a manifest the store would refuse to read back (over MAX_MANIFEST_BYTES)."""
    try:
        text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise ManifestError(f"manifest holds a value JSON cannot represent ({exc})") from exc
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is over {MAX_MANIFEST_BYTES} bytes")
    return text


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (a broken symlink counts)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _has_manifest(folder: Path) -> bool:
    """A complete version (its manifest is written last); one that cannot be looked
    into counts as published, so that reading it reports why it is unusable."""
    try:
        return (folder / MANIFEST).is_file()
    except OSError:
        return True


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
