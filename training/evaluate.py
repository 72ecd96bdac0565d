"""Evaluate a published version exactly as the service loads it.

    python -m training.evaluate mnist          # the newest version
    python -m training.evaluate mnist:3        # a pinned one

Prints test accuracy, loss and the confusion matrix, and checks them against
what the manifest recorded at training time (exit 1 if they disagree).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service import model as serving
from service.config import Config
from service.store import ModelStore, StoreError, is_version
from training.data import DataError, Split, load_split, to_input

# The service's store unless told otherwise: $DIGITSERVE_STORE, else the repo's model_store/.
DEFAULT_STORE = os.environ.get("DIGITSERVE_STORE") or Config.STORE


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    confusion: np.ndarray  # (true, predicted) counts

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "loss": self.loss}


def evaluate(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    split: Split,
    mean: float,
    std: float,
    batch_size: int = 1000,
    num_classes: int = 10,
) -> Evaluation:
    """Accuracy, mean cross-entropy and confusion matrix of ``logits_fn`` on a split."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    total_loss = 0.0
    for start in range(0, len(split), batch_size):
        x = to_input(split.images[start : start + batch_size], mean, std)
        y = split.labels[start : start + batch_size]
        logits = logits_fn(x).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total_loss += float(-log_probs[np.arange(len(y)), y].sum())
        np.add.at(confusion, (y, logits.argmax(axis=1)), 1)
    n = int(confusion.sum())
    return Evaluation(float(np.trace(confusion)) / n, total_loss / n, confusion)


def format_confusion(confusion: np.ndarray) -> str:
    k = len(confusion)
    lines = ["true\\pred " + " ".join(f"{j:>5}" for j in range(k))]
    lines += [f"{i:>9} " + " ".join(f"{c:>5}" for c in row) for i, row in enumerate(confusion)]
    return "\n".join(lines)


def parse_ref(ref: str) -> tuple[str, int | None]:
    name, _, version = ref.partition(":")
    if version and not is_version(version):  # ASCII digits: isdigit() also takes '²'
        raise argparse.ArgumentTypeError(f"version in {ref!r} must be a positive integer")
    return name, int(version) if version else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=parse_ref, help="NAME or NAME:VERSION")
    parser.add_argument("--store", default=DEFAULT_STORE, help="model store folder")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (else $MNIST_DIR, ...)")
    args = parser.parse_args(argv)
    name, version = args.model
    try:
        mv = ModelStore(args.store).resolve(name, version)
        test = load_split("test", args.data_dir)
    except (StoreError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        loaded = serving.load(mv)
    except Exception as exc:  # what the service would refuse, refused with its reason
        print(
            f"error: {name} v{mv.version} cannot be loaded: {serving.failure_reason(exc)}",
            file=sys.stderr,
        )
        return 2
    norm = mv.manifest["normalization"]
    result = evaluate(loaded.logits, test, norm["mean"], norm["std"])
    print(f"{name} v{mv.version}: test accuracy {result.accuracy:.4%}, loss {result.loss:.4f}")
    print(format_confusion(result.confusion))
    recorded = mv.manifest.get("metrics", {}).get("test_accuracy")
    if recorded is not None:
        same = abs(recorded - result.accuracy) < 1e-9
        print(f"manifest recorded {recorded:.4%}: {'match' if same else 'MISMATCH'}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
