"""Print the shipped (or any) model's figures: accuracy, training time, export check.

    python -m benchmarks.model_figures [NAME[:VERSION]] [--store model_store]

Re-evaluates the exported files exactly as the service loads them and prints
them beside what the manifest recorded at training time.
"""

from __future__ import annotations

import argparse
import time

from store import ModelStore, loading
from training.data import load_split
from training.evaluate import evaluate, format_confusion, parse_ref
from training.train_cli import describe_timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", default="mnist", type=parse_ref)
    parser.add_argument("--store", default="model_store")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
