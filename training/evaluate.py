"""Evaluate a published version exactly as the service loads it.

    python -m training.evaluate mnist          # the newest version
    python -m training.evaluate mnist:3        # a pinned one

Prints test accuracy, loss and the confusion matrix, and checks all three against
what the manifest recorded at training time: exit 0 if they agree, 1 if they do
not, 2 for a version that cannot be loaded or a malformed manifest. On other
test data than training recorded (by MD5) nothing is compared.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from store import DEFAULT_ROOT, ManifestError, ModelStore, StoreError, loading
from store.manifest import is_version
from training.cli import folder
from training.data import DataError, Split, load_split, to_input

# The service's store unless told otherwise: $DIGITSERVE_STORE, else the repo's model_store/.
DEFAULT_STORE = os.environ.get("DIGITSERVE_STORE") or str(DEFAULT_ROOT)


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
    name, colon, version = ref.partition(":")
    if colon and not is_version(version):  # ASCII digits: isdigit() also takes '²'
        raise argparse.ArgumentTypeError(
            f"version in {ref!r} must be a whole number from 1 to 999999999"
        )
    return name, int(version) if colon else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=parse_ref, help="NAME or NAME:VERSION")
    parser.add_argument("--store", type=folder, default=DEFAULT_STORE, help="model store folder")
    parser.add_argument(
        "--data-dir", type=folder, default=None, help="MNIST folder (else $MNIST_DIR, ...)"
    )
    args = parser.parse_args(argv)
    try:
        return run(*args.model, args.store, args.data_dir)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run(name: str, version: int | None, store: str, data_dir: str | None) -> int:
    try:
        mv = ModelStore(store).resolve(name, version)
        test = load_split("test", data_dir)
    except (StoreError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        loaded = loading.load(mv)
    except Exception as exc:  # what the service would refuse, refused with its reason
        print(
            f"error: {name} v{mv.version} cannot be loaded: {loading.failure_reason(exc)}",
            file=sys.stderr,
        )
        return 2
    norm = mv.manifest["normalization"]
    result = evaluate(loaded.logits, test, norm["mean"], norm["std"])
    print(f"{name} v{mv.version}: test accuracy {result.accuracy:.4%}, loss {result.loss:.4f}")
    print(format_confusion(result.confusion))
    try:
        return compare(mv.manifest, result, test)
    except ManifestError as exc:
        print(f"error: {name} v{mv.version}: {exc}", file=sys.stderr)
        return 2


def compare(manifest: dict, result: Evaluation, test: Split) -> int:
    """Print how the evaluation compares with the manifest's record: 0 same, 1 not.
    The store has checked that metrics is an object and its test metrics numbers;
    ManifestError for what it does not check (numbers beyond a float, the matrix)."""
    metrics = manifest.get("metrics")
    if metrics is None:
        print("the manifest records no metrics: nothing to compare")
        return 0
    data = manifest.get("data")
    recorded_md5 = data.get("md5") if isinstance(data, dict) else None
    recorded_md5 = recorded_md5 if isinstance(recorded_md5, dict) else {}
    other = [stem for stem, md5 in test.md5.items() if recorded_md5.get(stem) not in (None, md5)]
    if other:
        print(
            f"not compared: the manifest's metrics are on other test data (by MD5: "
            f"{', '.join(other)})"
        )
        return 0
    checks = []
    for key, value, close in (
        ("test_accuracy", result.accuracy, lambda a, b: abs(a - b) < 1e-9),
        ("test_loss", result.loss, lambda a, b: abs(a - b) <= 1e-6 * max(1.0, abs(b))),
    ):
        if key in metrics:
            recorded = _finite(metrics[key])
            if recorded is None:
                raise ManifestError(f"its metrics.{key} is not a finite number")
            checks.append((key, f"{recorded:.6g}", close(recorded, value)))
    if "confusion" in metrics:
        recorded = metrics["confusion"]
        if not _is_count_matrix(recorded):
            raise ManifestError("its metrics.confusion is not a matrix of counts")
        checks.append(("confusion", "matrix", recorded == result.confusion.tolist()))
    if not checks:
        print("the manifest records no test metrics: nothing to compare")
        return 0
    for key, recorded, same in checks:
        print(f"manifest recorded {key} {recorded}: {'match' if same else 'MISMATCH'}")
    return 0 if all(same for *_, same in checks) else 1


def _finite(value: float) -> float | None:
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return number if math.isfinite(number) else None


def _is_count_matrix(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(row, list)
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in row)
        for row in value
    )


if __name__ == "__main__":
    sys.exit(main())
