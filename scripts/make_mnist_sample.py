"""Cut the committed test fixture tests/data/mnist-sample from the real MNIST files.

    python scripts/make_mnist_sample.py [--data-dir DIR]

Takes the first 1000 training and 500 test images (their IDX headers rewritten
to the new counts) and writes MD5SUMS of the uncompressed files beside them.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import struct
from pathlib import Path

from training.data import FILES, load_split

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "mnist-sample"
COUNTS = {"train": 1000, "test": 500}


def idx_bytes(array) -> bytes:
    ndim = array.ndim
    return struct.pack(f">{1 + ndim}I", 0x0800 + ndim, *array.shape) + array.tobytes()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    sums = []
    for split, n in COUNTS.items():
        data = load_split(split, args.data_dir, download=False)
        for stem, array in zip(
            FILES[split], (data.images[:n], data.labels[:n].astype("uint8")), strict=True
        ):
            raw = idx_bytes(array)
            (OUT / f"{stem}.gz").write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
            sums.append(f"{hashlib.md5(raw).hexdigest()}  {stem}")
    (OUT / "MD5SUMS").write_text("\n".join(sums) + "\n")


if __name__ == "__main__":
    main()
