"""The manifest: its schema, its validation and its strict JSON form.

A version's ``manifest.json`` is the contract between training (which writes it) and
the service (which refuses a version whose manifest does not validate here).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from store.errors import ManifestError, StoreError

MANIFEST = "manifest.json"
MAX_BYTES = 4 * 1024 * 1024  # the shipped one is 7 kB, its history included
SCHEMA_VERSION = 1
# Matched with fullmatch: re.match with "$" also takes a trailing newline.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")


def is_version(text: str) -> bool:
    """A version as written in a path or a query: 1 to 999,999,999, ASCII digits."""
    return bool(VERSION_RE.fullmatch(text))


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


# Normalization of pixels scaled to [0, 1]: a std outside this range is a broken manifest
# (1e-300 passed a "positive" check and served confident nonsense), and so is a mean
# far outside the pixels' range (1e308 overflows float32: every input looks the same).
MIN_STD, MAX_STD, MAX_MEAN = 1e-3, 1e3, 1e3
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # a file in the version folder


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
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
        all(is_number(norm.get(k)) for k in ("mean", "std"))
        and abs(norm["mean"]) <= MAX_MEAN
        and MIN_STD <= norm["std"] <= MAX_STD
    ):
        raise ManifestError(
            f"manifest 'normalization' needs a mean in [-{MAX_MEAN}, {MAX_MEAN}] and a std "
            f"in [{MIN_STD}, {MAX_STD}]"
        )
    metrics = data.get("metrics", {})  # optional (training records it); served in /metadata
    if not isinstance(metrics, dict) or not all(
        is_number(metrics[k]) for k in ("test_accuracy", "test_loss") if k in metrics
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


def normalize(pixels: np.ndarray, normalization: Mapping[str, float]) -> np.ndarray:
    """Pixels scaled to [0, 1] -> model input, float32 ``(x - mean) / std`` as the
    manifest's "normalization" says: the one definition training and serving share."""
    x = np.asarray(pixels, np.float32)
    return (x - np.float32(normalization["mean"])) / np.float32(normalization["std"])


def read(path: Path, *, name: str | None = None, version: int | None = None) -> dict:
    """Read and validate the manifest at ``path`` (ManifestError saying why not)."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:  # read whole into every worker: bound it first
            raise ManifestError(f"{path}: manifest is {size} bytes; the limit is {MAX_BYTES}")
        data = json.loads(
            path.read_text(encoding="utf-8"),
            parse_constant=_no_constants,
            parse_float=_finite_float,
        )
    # ValueError: also a number of over 4,300 digits; RecursionError: deep nesting
    except (OSError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from exc
    return validate_manifest(data, name=name, version=version)


def _no_constants(token: str) -> None:
    """json.loads takes NaN and Infinity, which are not JSON (and jsonify writes them bare)."""
    raise ValueError(f"{token} is not a JSON number")


def _finite_float(text: str) -> float:
    """A JSON number such as 1e400 would become inf: refused like Infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond a double")
    return value


def to_json(manifest: dict) -> str:
    """Strict JSON: a NaN or infinity (which json.dumps writes bare) is refused, and so
    is a manifest the store would refuse to read back (over MAX_BYTES)."""
    try:
        text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise ManifestError(f"manifest holds a value JSON cannot represent ({exc})") from exc
    if len(text.encode()) > MAX_BYTES:
        raise ManifestError(f"manifest is over {MAX_BYTES} bytes")
    return text
