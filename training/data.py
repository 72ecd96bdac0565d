"""MNIST from the standard IDX files: find, verify (MD5 of the uncompressed
bytes), download when missing and allowed, and batch for training.

Where the data is looked for: ``--data-dir``, else ``$MNIST_DIR``, else
``../shared/data/mnist`` beside the repository (this project's CI), else the
user cache ``~/.cache/digitserve/mnist`` (where downloads go).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import math
import os
import re
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.manifest import normalize

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "MNIST_DIR"
SHARED_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "digitserve" / "mnist"

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# MD5 of the original, uncompressed IDX files.
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)


class DataError(Exception):
    """MNIST cannot be had: the message says where it looked and what to set."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # int32 (N,)
    md5: dict[str, str]

    def __len__(self) -> int:
        return len(self.labels)


def default_data_dir() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    if SHARED_DIR.is_dir():
        return SHARED_DIR
    return CACHE_DIR


def _read_raw(folder: Path, stem: str) -> bytes | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        try:
            if not path.exists():
                continue
            if not path.is_file():
                raise DataError(f"{path} is not a file")
            raw = path.read_bytes()
        except OSError as exc:  # e.g. a folder that may not be searched
            raise DataError(f"cannot read {path} ({exc})") from exc
        try:
            return gzip.decompress(raw) if path.suffix == ".gz" else raw
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path} is not a readable gzip file ({exc})") from exc
    return None


def _download(folder: Path, stem: str, timeout: float) -> tuple[bytes | None, list[str]]:
    """The file from the first mirror that serves it intact, and what each mirror failed with."""
    errors: list[str] = []
    for mirror in MIRRORS:
        try:
            with urllib.request.urlopen(f"{mirror}{stem}.gz", timeout=timeout) as resp:
                raw = gzip.decompress(resp.read())
        # URLError, timeouts, a cut connection (IncompleteRead), a bad gzip stream
        except (OSError, EOFError, zlib.error, http.client.HTTPException) as exc:
            errors.append(f"{mirror}: {exc}")
            continue
        if hashlib.md5(raw).hexdigest() != MNIST_MD5[stem]:
            errors.append(f"{mirror}: checksum mismatch")
            continue
        with contextlib.suppress(OSError):  # the cache is a convenience: an unwritable
            folder.mkdir(parents=True, exist_ok=True)  # folder still gives the data
            tmp = folder / f".{stem}.gz.part"
            tmp.write_bytes(gzip.compress(raw))
            tmp.rename(folder / f"{stem}.gz")
        return raw, errors
    return None, errors


IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


def _parse_idx(raw: bytes, stem: str, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes: images (N, 28, 28) for ndim 3, labels (N,) for 1."""
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{stem}: too short for an IDX file")
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if magic != 0x0800 + ndim:  # 0x08 = unsigned byte
        raise DataError(f"{stem}: bad IDX magic {magic:#x}")
    if ndim == 3 and tuple(dims[1:]) != IMAGE_SHAPE:
        raise DataError(f"{stem}: images are {dims[1]}x{dims[2]}, MNIST's are 28x28")
    if dims[0] == 0:
        raise DataError(f"{stem}: the file holds no items")
    count = math.prod(dims)  # Python ints: header values cannot overflow it
    if len(raw) != header + count:
        raise DataError(f"{stem}: {len(raw) - header} data bytes, header promises {count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    checksums: dict[str, str] | str | None = "auto",
    download: bool = True,
    timeout: float = 30.0,
) -> Split:
    """Load 'train' or 'test', verified against ``checksums``: by default MNIST's
    own sums, or those of an ``MD5SUMS`` file in the folder (a subset such as the
    committed test sample ships one); ``None`` skips verification. A mismatch or
    a missing file raises DataError."""
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        if folder.exists() and not folder.is_dir():
            raise DataError(f"{folder} is not a folder; point ${ENV_VAR} (or --data-dir) at one")
        has_sums = (folder / "MD5SUMS").exists()
    except OSError as exc:  # e.g. a folder that may not be searched
        raise DataError(f"cannot look into {folder} ({exc})") from exc
    if checksums == "auto":
        checksums = read_md5sums(folder) if has_sums else MNIST_MD5
    arrays, md5 = [], {}
    for stem, ndim in zip(FILES[split], (3, 1), strict=True):
        if checksums is not None and stem not in checksums:
            hint = (
                f" (it lists {stem}.gz: the sums must be of the uncompressed files)"
                if f"{stem}.gz" in checksums
                else ""
            )
            raise DataError(f"{folder / 'MD5SUMS'} has no checksum for {stem}{hint}")
        raw, failures = _read_raw(folder, stem), []
        # The mirrors serve MNIST itself: no use for a folder that declares other files.
        custom = checksums is not None and checksums.get(stem) != MNIST_MD5[stem]
        if raw is None and custom:
            raise DataError(
                f"{stem}[.gz] not found in {folder}; its MD5SUMS names other data than "
                "MNIST's, so the MNIST mirrors were not tried"
            )
        if raw is None and download:
            raw, failures = _download(folder, stem, timeout)
        if raw is None:
            tried = f" (tried {'; '.join(failures)})" if failures else ""
            raise DataError(
                f"MNIST file {stem}[.gz] not found in {folder} and could not be downloaded"
                f"{tried}. Put the four IDX files there, or point ${ENV_VAR} (or --data-dir) at "
                "a folder that has them."
            )
        md5[stem] = hashlib.md5(raw).hexdigest()
        if checksums is not None and md5[stem] != checksums[stem]:
            raise DataError(
                f"{folder / stem}: MD5 {md5[stem]} does not match the expected "
                f"{checksums[stem]}; the file is corrupt or not MNIST. Replace it, or point "
                f"${ENV_VAR} (or --data-dir) at a good copy."
            )
        arrays.append(_parse_idx(raw, stem, ndim))
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels")
    if labels.max() >= NUM_CLASSES:
        raise DataError(
            f"{folder / FILES[split][1]}: label {labels.max()} found; MNIST's are 0 to 9"
        )
    return Split(images, labels.astype(np.int32), md5)


_MD5SUMS_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](\S+)")  # md5sum's text and binary modes


def read_md5sums(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Checksums from an ``MD5SUMS`` file as ``md5sum`` writes it (``<md5>  <stem>``),
    as the test sample ships. DataError if it cannot be read or a line is not one."""
    path = Path(folder) / "MD5SUMS"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} ({exc})") from exc
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _MD5SUMS_LINE.fullmatch(line.strip())
        if match is None:
            raise DataError(f"{path}, line {number}: not '<md5>  <file name>': {line[:80]!r}")
        sums[match[2].removeprefix("./")] = match[1].lower()  # as `md5sum ./file` writes
    return sums


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of the [0, 1]-scaled pixels: the normalization the model expects."""
    x = images.astype(np.float64) / 255.0
    return float(x.mean()), float(x.std())


def to_input(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), normalized as in the manifest."""
    return normalize(images.astype(np.float32)[:, None] / 255.0, {"mean": mean, "std": std})


def random_shift(images: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background."""
    if max_shift <= 0:
        return images
    n, h, w = images.shape
    pad = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    dy = rng.integers(0, 2 * max_shift + 1, n)
    dx = rng.integers(0, 2 * max_shift + 1, n)
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    return pad[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def batches(
    split: Split,
    batch_size: int,
    *,
    mean: float,
    std: float,
    rng: np.random.Generator | None = None,
    max_shift: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Normalized (x, y) mini-batches; shuffled and augmented when ``rng`` is given."""
    n = len(split)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        images = split.images[idx]
        if rng is not None and max_shift:
            images = random_shift(images, rng, max_shift)
        yield to_input(images, mean, std), split.labels[idx]
