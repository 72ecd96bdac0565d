"""How the served pipeline does on uploads that are not MNIST files.

    python -m benchmarks.realworld_accuracy [--n 1000] [--store model_store] [--output FILE]

Takes MNIST test digits, renders each as a user would upload it (a phone photo
of the digit written on paper, a browser-canvas PNG export with a transparent
background, and every file format), runs the service's own preprocessing and
the exported model, and prints accuracy beside the plain-MNIST accuracy; --output
also writes them as JSON (benchmarks/results/realworld_accuracy.json is the committed
one). The ms/image column is a timing, only worth reading from a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import results
from service import handler
from service.config import Config
from store import ModelStore, loading
from tests import images
from training.data import load_split, to_input


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--store", default="model_store")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output", type=Path, help="also write the figures here as JSON")
    args = p.parse_args()
    meta = results.run_meta("benchmarks.realworld_accuracy")
    mv = ModelStore(args.store).resolve("mnist")
    model = loading.load(mv)
    norm = mv.manifest["normalization"]
    test = load_split("test", args.data_dir)
    idx = np.random.default_rng(0).choice(len(test), min(args.n, len(test)), replace=False)
    digits, labels = test.images[idx], test.labels[idx]
    base = (model.predict(to_input(digits, norm["mean"], norm["std"])).argmax(1) == labels).mean()
    print(f"{mv.name} v{mv.version}, {len(idx)} MNIST test digits")
    print(f"{'MNIST (raw arrays)':<28} accuracy {base:.2%}")
    renderers: dict[str, Callable[[np.ndarray, np.random.Generator], bytes]] = {
        "phone photo (JPEG)": lambda d, r: images.phone_photo(d, r),
        "canvas PNG, black on clear": lambda d, r: images.canvas_png(d),
        "canvas PNG, white on clear": lambda d, r: images.canvas_png(d, white=True),
        **{
            f"file {fmt}": (lambda d, r, f=fmt: images.encode_bytes(d, f)) for fmt in images.FORMATS
        },
    }
    rows = []
    for name, render in renderers.items():
        rng = np.random.default_rng(1)
        files = [render(d, rng) for d in digits]
        started = time.perf_counter()
        batch = np.stack([handler.preprocess([f], norm, Config())[0] for f in files])
        ms = (time.perf_counter() - started) / len(files) * 1000
        accuracy = (model.predict(batch).argmax(1) == labels).mean()
        print(
            f"{name:<28} accuracy {accuracy:.2%} ({accuracy - base:+.2%}), "
            f"preprocessing {ms:.1f} ms/image"
        )
        rows.append({"name": name, "accuracy": float(accuracy), "ms_per_image": ms})
    if args.output:
        model = {"name": mv.name, "version": mv.version}
        figures = {"model": model, "digits": len(idx), "mnist_accuracy": float(base)}
        results.write(args.output, {"meta": meta, **figures, "uploads": rows})


if __name__ == "__main__":
    main()
