"""Train a BatchNorm + Dropout net on MNIST and publish it to the model store.

    python -m training.train                       # the shipped default (CNN)
    python -m training.train --arch mlp --epochs 5 --no-batch-norm

The exported files are loaded back with ``SymbolBlock.imports`` and compared to
the trained net before anything is published; the test metrics in the manifest
are those of the exported model. Ctrl-C or an error publishes nothing, and
``--min-accuracy 0.99`` publishes only a model that reaches 99% (exit status 3
otherwise), since a running service swaps to every new version. A run whose loss goes
to NaN stops at once and exits 3 as well; bad arguments or data exit 2.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

import numpy as np

from store import ModelStore, PublishInterrupted, StoreError, publishing
from training.cli import bounded, folder
from training.data import FILES, DataError, Split, load_split
from training.evaluate import DEFAULT_STORE
from training.model import ARCHS
from training.train import MAX_SHIFT, NotPublished, TrainConfig, publish, train

POSITIVE_INT = bounded(int, lambda v: v >= 1, "an integer of at least 1")
# Learning rate and weight decay reach MXNet as float32 (max ~3.4e38; below ~1e-38 is 0).
RATE = bounded(float, lambda v: 1e-30 <= v <= 1e30, "a number from 1e-30 to 1e30")
DECAY = bounded(float, lambda v: 0 <= v <= 1e30, "a number from 0 to 1e30")
WARMUP = bounded(float, lambda v: 0 <= v <= 1e6, "a number from 0 to 1e6")
BELOW_ONE = bounded(float, lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, TrainConfig]:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", choices=ARCHS, default=d.arch)
    p.add_argument("--no-batch-norm", dest="batch_norm", action="store_false")
    p.add_argument("--dropout", type=BELOW_ONE, default=d.dropout)
    p.add_argument("--epochs", type=POSITIVE_INT, default=d.epochs)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=d.batch_size)
    p.add_argument("--optimizer", choices=("sgd", "nag", "adam"), default=d.optimizer)
    p.add_argument("--lr", type=RATE, default=d.lr, help="peak learning rate")
    p.add_argument(
        "--momentum", type=BELOW_ONE, default=d.momentum, help="for sgd and nag (adam: unused)"
    )
    p.add_argument("--weight-decay", type=DECAY, default=d.weight_decay)
    p.add_argument("--schedule", choices=("cosine", "constant"), default=d.schedule)
    p.add_argument("--warmup-epochs", type=WARMUP, default=d.warmup_epochs)
    p.add_argument(
        "--max-shift",
        type=bounded(int, lambda v: 0 <= v <= MAX_SHIFT, f"an integer from 0 to {MAX_SHIFT}"),
        default=d.max_shift,
        help="random-shift augmentation in pixels (0: off)",
    )
    p.add_argument(
        "--seed",
        type=bounded(int, lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1"),
        default=d.seed,
    )
    p.add_argument(
        "--limit-train",
        type=POSITIVE_INT,
        default=None,
        help="train on the first N training images only (quick runs)",
    )
    p.add_argument(
        "--data-dir", type=folder, default=None, help="MNIST IDX folder (else $MNIST_DIR, ...)"
    )
    p.add_argument("--store", type=folder, default=DEFAULT_STORE, help="model store folder")
    p.add_argument("--name", default="mnist", help="model name in the store")
    p.add_argument(
        "--min-accuracy",
        type=bounded(float, lambda v: 0 < v <= 1, "a fraction above 0 and at most 1, e.g. 0.99"),
        default=None,
        help="publish only if the exported model's test accuracy reaches this "
        "fraction (e.g. 0.99); exit status 3 otherwise",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    return args, TrainConfig(**{k: getattr(args, k) for k in vars(d)})


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop): cleaned up exactly as Ctrl-C is."""


class StopSignals:
    """SIGINT and SIGTERM raise at once, except while ``deferred``: then at ``check``.

    Training defers them to between two steps. Raised anywhere, one can land in a
    finalizer, where Python only prints it: a Ctrl-C in tqdm's __del__ once let training
    run on to the end.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferred = False

    def __call__(self, signum: int, frame: object) -> None:
        self.received = signum
        if not self.deferred:
            self.check()

    def check(self) -> None:
        if self.received is not None:
            raise Terminated if self.received == signal.SIGTERM else KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    command = shlex.join(
        ["python", "-m", "training.train", *(sys.argv[1:] if argv is None else argv)]
    )
    stops = StopSignals()
    previous = {sig: signal.signal(sig, stops) for sig in StopSignals.SIGNALS}
    try:
        return train_and_publish(args, cfg, command, stops)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_and_publish(
    args: argparse.Namespace, cfg: TrainConfig, command: str, stops: StopSignals | None = None
) -> int:
    """The command's work and its exit status (0, 2, 3, or 128 + the signal that stopped it)."""
    version = None
    stops = stops or StopSignals()
    try:
        store = ModelStore(args.store)
        publishing.check_writable(store, args.name)  # before minutes of training, not after
        train_split = load_split("train", args.data_dir)
        test_split = load_split("test", args.data_dir)
        for warning in doubtful_data(train_split, test_split, cfg.limit_train):
            print(f"warning: {warning}", file=sys.stderr)
        stops.deferred = True
        try:
            result = train(
                cfg,
                train_split,
                test_split,
                progress=args.progress,
                log_epochs=True,
                between_batches=stops.check,
            )
        finally:
            stops.deferred = False
        stops.check()  # one that came in the last epoch's evaluation
        version = publish(
            store, args.name, cfg, result, train_split, test_split, command, args.min_accuracy
        )
        m = version.manifest
        print(
            f"published {version.name} v{version.version} at {version.path}: test accuracy "
            f"{m['metrics']['test_accuracy']:.4%}, {describe_timing(m['training'])}"
        )
    except (DataError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NotPublished as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as exc:
        live = (
            exc.version
            if isinstance(exc, PublishInterrupted)
            else getattr(version, "version", None)
        )
        if live is None:
            print("interrupted: nothing was published", file=sys.stderr)
        else:
            print(f"interrupted, but {args.name} v{live} was already published", file=sys.stderr)
        terminated = isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    return 0


def doubtful_data(train_split: Split, test_split: Split, limit: int | None = None) -> list[str]:
    """What is legal (a custom set with its own MD5SUMS) but most likely a mistake;
    ``limit``: the number of training images actually trained on."""
    doubts = []
    train_md5, test_md5 = (
        train_split.md5.get(FILES["train"][0]),
        test_split.md5.get(FILES["test"][0]),
    )
    if train_md5 is not None and train_md5 == test_md5:
        doubts.append(
            "the training and test images are the same file: test accuracy will "
            "not measure how the model does on unseen digits"
        )
    classes = np.unique(train_split.labels[:limit]).tolist()
    if len(classes) < 10:
        doubts.append(f"the training labels hold only the classes {classes}")
    return doubts


def describe_timing(training: dict) -> str:
    """The manifest's training time, per epoch and to 99% test accuracy, in words."""
    to_99 = training["seconds_to_99"]
    return f"{training['seconds']:.0f} s, {training['seconds_per_epoch']:.1f} s/epoch, " + (
        f"99% test accuracy after {to_99:.0f} s" if to_99 else "99% test accuracy not reached"
    )
