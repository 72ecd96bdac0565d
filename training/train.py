"""The training recipe: its config, the loop, the export check and publishing.

``train`` fits a BatchNorm + Dropout net; ``publish`` exports it, loads the files back
with ``SymbolBlock.imports``, compares them with the trained net and evaluates the
exported model before the store makes it a version. The command line
(``python -m training.train``) is ``training.train_cli``.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import mxnet as mx
    from mxnet import autograd, gluon

from store import ModelStore, ModelVersion, StoreError, publishing
from store.manifest import MIN_STD
from training.data import DataError, Split, batches, pixel_stats, to_input
from training.evaluate import evaluate
from training.model import build_net

INPUT_NAME = "data"
EXPORT_TOLERANCE = 1e-5
MAX_SHIFT = 14  # half the image: a larger shift can move a digit out of the frame


@dataclass
class TrainConfig:
    arch: str = "cnn"
    batch_norm: bool = True
    dropout: float = 0.5
    epochs: int = 12
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine (with warmup) | constant
    warmup_epochs: float = 1.0
    max_shift: int = 2  # random-shift augmentation, pixels
    seed: int = 42  # 0 to 2**32 - 1 (MXNet's and NumPy's seed range)
    limit_train: int | None = None  # train on the first N images (smoke runs)


class NotPublished(Exception):
    """The trained model failed a check before publishing; nothing was published."""


class Diverged(NotPublished):
    """The training loss went to NaN or infinity: the weights are lost."""


class ExportMismatch(NotPublished):
    """The exported model does not compute what the trained net computes."""


class BelowMinimumAccuracy(NotPublished):
    """The exported model scored below --min-accuracy."""


@dataclass
class TrainResult:
    net: gluon.HybridBlock
    mean: float
    std: float
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    seconds_to_99: float | None = None


def seed_everything(seed: int) -> np.random.Generator:
    mx.random.seed(seed)
    np.random.seed(seed)
    return np.random.default_rng(seed)


def make_trainer(net: gluon.Block, cfg: TrainConfig, steps_per_epoch: int) -> gluon.Trainer:
    total = max(1, cfg.epochs * steps_per_epoch)
    params: dict = {"learning_rate": cfg.lr, "wd": cfg.weight_decay}
    if cfg.optimizer in ("sgd", "nag"):  # adam has its own moment estimates
        params["momentum"] = cfg.momentum
    if cfg.schedule == "cosine":
        warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
        params["lr_scheduler"] = mx.lr_scheduler.CosineScheduler(
            max_update=total,
            base_lr=cfg.lr,
            final_lr=0.0,
            warmup_steps=warmup,
            warmup_begin_lr=cfg.lr / 10,
        )
    return gluon.Trainer(net.collect_params(), cfg.optimizer, params)


def train(
    cfg: TrainConfig,
    train_split: Split,
    test_split: Split,
    *,
    progress: bool = True,
    log_epochs: bool = False,
    between_batches: Callable[[], None] | None = None,
) -> TrainResult:
    """Train a network as ``cfg`` says. ``between_batches`` runs after each step: the
    command raises there a stop signal whose exception a finalizer swallowed."""
    rng = seed_everything(cfg.seed)
    if cfg.limit_train is not None:
        train_split = Split(
            train_split.images[: cfg.limit_train],
            train_split.labels[: cfg.limit_train],
            train_split.md5,
        )
    mean, std = pixel_stats(train_split.images)
    if not std >= MIN_STD:  # blank images: normalizing by ~0 would give NaN or nonsense
        raise DataError(
            f"the training images have almost no contrast (pixel std {std:.2e}, at least "
            f"{MIN_STD} is needed): they are blank or nearly so"
        )
    net = build_net(cfg.arch, batch_norm=cfg.batch_norm, dropout=cfg.dropout)
    net.initialize(mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2))
    net.hybridize(static_alloc=True, static_shape=True)
    steps_per_epoch = -(-len(train_split) // cfg.batch_size)
    trainer = make_trainer(net, cfg, steps_per_epoch)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    result = TrainResult(net, mean, std)
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(
            batches(
                train_split, cfg.batch_size, mean=mean, std=std, rng=rng, max_shift=cfg.max_shift
            ),
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        )
        for x, y in bar:
            data, label = mx.nd.array(x), mx.nd.array(y)
            with autograd.record():
                out = net(data)
                loss = loss_fn(out, label)
            loss.backward()
            trainer.step(len(y))
            loss_sum += float(loss.sum().asscalar())
            if not math.isfinite(loss_sum):  # NaN weights never recover: stop now
                raise Diverged(
                    f"training diverged in epoch {epoch} (the loss is {loss_sum}) at "
                    f"--lr {cfg.lr:g}: nothing was published; try a lower --lr"
                )
            correct += int((out.argmax(axis=1).asnumpy() == y).sum())
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
            if between_batches is not None:
                between_batches()
        # Evaluation runs outside record()/train_mode(): running BN statistics, no Dropout.
        test = evaluate(lambda b: net(mx.nd.array(b)).asnumpy(), test_split, mean, std)
        elapsed = time.perf_counter() - started
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "test_loss": test.loss,
            "test_accuracy": test.accuracy,
            "lr": trainer.learning_rate,
            "epoch_seconds": time.perf_counter() - epoch_start,
            "elapsed_seconds": elapsed,
        }
        result.history.append(row)
        if result.seconds_to_99 is None and test.accuracy >= 0.99:
            result.seconds_to_99 = elapsed
        if progress or log_epochs:
            print(
                f"epoch {epoch}: train loss {row['train_loss']:.4f} acc "
                f"{row['train_accuracy']:.4f} | test loss {test.loss:.4f} acc "
                f"{test.accuracy:.4f} | {row['epoch_seconds']:.1f}s",
                file=sys.stderr,
            )
    result.train_seconds = time.perf_counter() - started
    return result


def non_finite_parameter(net: gluon.Block) -> str | None:
    """The name of a parameter holding NaN or infinity (a diverged net), if any."""
    for name, param in net.collect_params().items():
        if not np.isfinite(param.data().asnumpy()).all():
            return name
    return None


def export_and_check(
    result: TrainResult, folder: Path, name: str, test_split: Split
) -> tuple[dict[str, str], dict]:
    """Export into ``folder``, load it back as the service will, compare outputs and
    evaluate the exported model. Returns the artifact files and the metrics."""
    bad = non_finite_parameter(result.net)
    if bad is not None:
        raise Diverged(f"parameter {bad} holds NaN or infinity: nothing was published")
    try:
        result.net.export(str(folder / name), epoch=0)
    except (mx.base.MXNetError, OSError) as exc:  # a full disk comes as an MXNetError
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise StoreError(f"could not export into {folder}: {lines[-1] if lines else exc}") from exc
    files = {"symbol": f"{name}-symbol.json", "params": f"{name}-0000.params"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = gluon.SymbolBlock.imports(
            str(folder / files["symbol"]), [INPUT_NAME], str(folder / files["params"])
        )
    probe = to_input(test_split.images[:256], result.mean, result.std)
    diff = float(
        np.abs(
            loaded(mx.nd.array(probe)).asnumpy() - result.net(mx.nd.array(probe)).asnumpy()
        ).max()
    )
    if not diff <= EXPORT_TOLERANCE:  # NaN-safe: NaN fails every comparison
        raise ExportMismatch(f"exported model differs from the trained one by {diff:.2e}")
    test = evaluate(lambda b: loaded(mx.nd.array(b)).asnumpy(), test_split, result.mean, result.std)
    if not math.isfinite(test.loss):
        raise Diverged(f"the exported model's test loss is {test.loss}: nothing was published")
    metrics = {
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "export_max_abs_diff": diff,
        "confusion": test.confusion.tolist(),
    }
    return files, metrics


def build_manifest(
    cfg: TrainConfig, result: TrainResult, train_split: Split, test_split: Split, command: str
) -> dict:
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mxnet_version": mx.__version__,
        "input": {"name": INPUT_NAME, "shape": [-1, 1, 28, 28], "dtype": "float32"},
        "normalization": {"mean": result.mean, "std": result.std, "scale": 1 / 255},
        "labels": [str(d) for d in range(10)],
        "arch": cfg.arch,
        "hyperparameters": vars(cfg).copy(),
        "training": {
            "seconds": result.train_seconds,
            "seconds_per_epoch": result.train_seconds / max(1, cfg.epochs),
            "seconds_to_99": result.seconds_to_99,
            "train_images": len(train_split)
            if cfg.limit_train is None
            else min(cfg.limit_train, len(train_split)),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.system()}",
            "command": command,
        },
        "data": {"md5": {**train_split.md5, **test_split.md5}},
        "history": result.history,
    }


def publish(
    store: ModelStore,
    name: str,
    cfg: TrainConfig,
    result: TrainResult,
    train_split: Split,
    test_split: Split,
    command: str,
    min_accuracy: float | None = None,
) -> ModelVersion:
    """Export, check and publish; a running service hot-swaps to the new version,
    so ``min_accuracy`` keeps a weak retrain from ever becoming visible."""
    manifest = build_manifest(cfg, result, train_split, test_split, command)

    def write(folder: Path) -> dict[str, str]:
        files, metrics = export_and_check(result, folder, name, test_split)
        if min_accuracy is not None and metrics["test_accuracy"] < min_accuracy:
            raise BelowMinimumAccuracy(
                f"test accuracy {metrics['test_accuracy']:.4%} is below "
                f"--min-accuracy {min_accuracy:.4%}: nothing was published"
            )
        manifest["metrics"] = metrics  # read by publish() after this returns
        return files

    return publishing.publish(store, name, write, manifest)


if __name__ == "__main__":
    from training.train_cli import main  # the command line lives beside the recipe

    sys.exit(main())
