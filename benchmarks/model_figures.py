"""Print the shipped (or any) model's figures: accuracy, training time, export check.

    python -m benchmarks.model_figures [NAME[:VERSION]] [--store model_store] [--output FILE]

Re-evaluates the exported files exactly as the service loads them and prints
them beside what the manifest recorded at training time; --output also writes them
as JSON (benchmarks/results/model_figures.json is the committed one, see docs/figures.md).
The images/s figure is a timing: it is only worth committing from a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import results
from store import ModelStore, loading
from training.data import load_split
from training.evaluate import evaluate, format_confusion, parse_ref
from training.train_cli import describe_timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", default="mnist", type=parse_ref)
    parser.add_argument("--store", default="model_store")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    meta = results.run_meta("benchmarks.model_figures")
    name, version = args.model
    mv = ModelStore(args.store).resolve(name, version)
    m, t = mv.manifest, mv.manifest["training"]
    print(f"{name} v{mv.version} ({m['arch']}), trained {m['created']} on {t['machine']}")
    print(f"command: {t['command']}")
    print(f"training: {describe_timing(t)}")
    for row in m["history"]:
        print(
            f"  epoch {row['epoch']:>2}: test accuracy {row['test_accuracy']:.4f}, "
            f"loss {row['test_loss']:.4f}, {row['epoch_seconds']:.1f} s"
        )
    test = load_split("test", args.data_dir)
    loaded = loading.load(mv)
    norm = m["normalization"]
    started = time.perf_counter()
    result = evaluate(loaded.logits, test, norm["mean"], norm["std"])
    seconds = time.perf_counter() - started
    print(
        f"exported model: test accuracy {result.accuracy:.4%} (manifest: "
        f"{m['metrics']['test_accuracy']:.4%}), loss {result.loss:.4f}; "
        f"export round trip max |diff| {m['metrics']['export_max_abs_diff']:.2e}; "
        f"offline inference {len(test) / seconds:.0f} images/s"
    )
    print(format_confusion(result.confusion))
    if args.output:
        figures = {
            "model": {"name": name, "version": mv.version, "arch": m["arch"]},
            "manifest": {
                "created": m["created"],
                "training": t,
                "history": m["history"],
                "metrics": m["metrics"],
            },
            "exported": {
                "test_images": len(test),
                "test_accuracy": result.accuracy,
                "test_loss": result.loss,
                "confusion": result.confusion.tolist(),
                "images_per_second": len(test) / seconds,
            },
        }
        results.write(args.output, {"meta": meta, **figures})


if __name__ == "__main__":
    main()
