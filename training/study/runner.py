"""One training run of the study: a net from ``build_net``, one seed, SGD at a
constant learning rate, evaluated at chosen checkpoint steps.

Evaluation runs in inference mode (running BatchNorm statistics, no Dropout),
as the exported model does. Training time is counted without evaluation time.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import mxnet as mx
    from mxnet import autograd, gluon

from training.data import (
    REPO_ROOT,
    DataError,
    Split,
    batches,
    default_data_dir,
    load_split,
    pixel_stats,
)
from training.evaluate import evaluate
from training.model import build_net
from training.train import TrainConfig, make_trainer, non_finite_parameter, seed_everything

SAMPLE_DIR = REPO_ROOT / "tests" / "data" / "mnist-sample"
CHANCE = 0.2  # a run whose final test accuracy is below this has not learned (10 classes)
STUCK_AFTER = 0.25  # ... and one still below it after this fraction of its steps is stopped
SUBSET_SEED = 20150211  # fixed evaluation subsets, the same for every run and seed


@dataclass(frozen=True)
class StudyData:
    train: Split
    test: Split
    mean: float
    std: float
    folder: str
    verified: str  # "MNIST MD5" or "MD5SUMS of the folder"


def load_data(
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    fallback: str | Path | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> StudyData:
    """Load both splits, verified against the MNIST sums or the folder's MD5SUMS
    (the committed sample). With ``fallback``, a folder that is missing or
    incomplete is replaced by that one (the notebook falls back to the sample)."""
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    verified = "the folder's MD5SUMS" if (folder / "MD5SUMS").is_file() else "MNIST's MD5 sums"
    try:  # load_split checks the folder's MD5SUMS where there is one, else MNIST's sums
        train = load_split("train", folder, download=download)
        test = load_split("test", folder, download=download)
    except DataError:
        if fallback is None:
            raise
        return load_data(fallback, download=False, limit_train=limit_train, limit_test=limit_test)
    if limit_train:
        train = Split(train.images[:limit_train], train.labels[:limit_train], train.md5)
    if limit_test:
        test = Split(test.images[:limit_test], test.labels[:limit_test], test.md5)
    mean, std = pixel_stats(train.images)
    return StudyData(train, test, mean, std, str(folder), verified)


def subset(split: Split, n: int | None) -> Split:
    """A fixed random subset of ``n`` images (all of them when n is None or too big)."""
    if n is None or n >= len(split):
        return split
    idx = np.sort(np.random.default_rng(SUBSET_SEED).permutation(len(split))[:n])
    return Split(split.images[idx], split.labels[idx], split.md5)


def checkpoints(total: int, n_log: int = 24, n_lin: int = 20) -> list[int]:
    """Step 0, log-spaced steps from 10 (early progress) and evenly spaced ones."""
    n_log, n_lin = min(n_log, max(2, total // 10)), min(n_lin, max(1, total // 10))
    steps = {0, total}
    if total > 10:
        steps |= set(np.rint(np.geomspace(10, total, n_log)).astype(int).tolist())
    steps |= set(np.rint(np.linspace(0, total, n_lin + 1)).astype(int).tolist())
    return sorted(s for s in steps if 0 <= s <= total)


@dataclass(frozen=True)
class RunSpec:
    arch: str
    batch_norm: bool
    dropout: float
    lr: float
    seed: int
    steps: int
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    hidden: tuple[int, ...] | None = None
    activation: str = "relu"
    init_sigma: float | None = None  # None: the project's init (He, as in training/train.py)

    def label(self) -> str:
        bn = "BN" if self.batch_norm else "no BN"
        return f"{self.arch} {bn} dropout={self.dropout} lr={self.lr} seed={self.seed}"


def make_net(spec: RunSpec) -> gluon.HybridBlock:
    net = build_net(
        spec.arch,
        batch_norm=spec.batch_norm,
        dropout=spec.dropout,
        hidden=spec.hidden,
        activation=spec.activation,
    )
    if spec.init_sigma is None:
        init = mx.init.Xavier(rnd_type="gaussian", factor_type="in", magnitude=2)
    else:
        init = mx.init.Normal(spec.init_sigma)
    net.initialize(init)
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def _stream(data: StudyData, batch_size: int, rng: np.random.Generator) -> Iterator:
    """Endless shuffled full mini-batches (the ragged end of each epoch is dropped)."""
    if len(data.train) < batch_size:
        raise ValueError(f"{len(data.train)} training images cannot fill a batch of {batch_size}")
    while True:
        for x, y in batches(data.train, batch_size, mean=data.mean, std=data.std, rng=rng):
            if len(y) == batch_size:
                yield x, y


def _finite(net: gluon.HybridBlock) -> bool:
    return non_finite_parameter(net) is None


class Diverged(Exception):
    """The net's outputs are no longer finite."""


def accuracy(net: gluon.HybridBlock, split: Split, data: StudyData) -> float:
    def logits(batch: np.ndarray) -> np.ndarray:
        out = net(mx.nd.array(batch)).asnumpy()
        if not np.isfinite(out).all():
            raise Diverged
        return out

    return evaluate(logits, split, data.mean, data.std).accuracy


def _stuck(row: dict, steps: int) -> bool:
    """Still at chance after a quarter of the run: dead (e.g. ReLUs), stop early."""
    late = row["step"] >= STUCK_AFTER * steps
    return late and row.get("test_accuracy", 1.0) < CHANCE


Probe = Callable[[gluon.HybridBlock], dict]


def train_run(
    spec: RunSpec,
    data: StudyData,
    evals: dict[str, Split],
    *,
    at: list[int] | None = None,
    probe: Probe | None = None,
    final: dict[str, Split] | None = None,
) -> tuple[dict, gluon.HybridBlock]:
    """Train ``spec``; at each step in ``at`` record the mean training loss since the
    last checkpoint, the accuracy on each of ``evals`` and whatever ``probe`` returns.
    A non-finite loss or weight stops the run as diverged. ``final`` adds end-of-run accuracies.
    Returns the JSON-ready record and the trained net."""
    wall = time.perf_counter()
    rng = seed_everything(spec.seed)
    net = make_net(spec)
    cfg = TrainConfig(
        arch=spec.arch,
        batch_norm=spec.batch_norm,
        dropout=spec.dropout,
        batch_size=spec.batch_size,
        optimizer="sgd",
        lr=spec.lr,
        momentum=spec.momentum,
        weight_decay=spec.weight_decay,
        schedule="constant",
        seed=spec.seed,
    )
    trainer = make_trainer(net, cfg, steps_per_epoch=max(1, len(data.train) // spec.batch_size))
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    stops = set(at if at is not None else checkpoints(spec.steps)) | {spec.steps}
    history: list[dict] = []
    stream = _stream(data, spec.batch_size, rng)
    loss_sum = mx.nd.zeros((1,))
    since, seconds, diverged = 0, 0.0, False

    def record(step: int) -> None:
        nonlocal loss_sum, since, diverged
        row: dict = {"step": step, "seconds": seconds}
        if since:
            loss = float(loss_sum.asscalar()) / (since * spec.batch_size)
            diverged = not (math.isfinite(loss) and _finite(net))
            row["train_loss"] = loss if math.isfinite(loss) else None
        loss_sum, since = mx.nd.zeros((1,)), 0
        if not diverged:
            try:
                for name, split in evals.items():
                    row[f"{name}_accuracy"] = accuracy(net, split, data)
            except Diverged:
                diverged = True
        if not diverged and probe is not None:
            row.update(probe(net))
        history.append(row)

    record(0)
    started = time.perf_counter()
    for step in range(1, spec.steps + 1):
        x, y = next(stream)
        data_x, label = mx.nd.array(x), mx.nd.array(y)
        with autograd.record():
            loss = loss_fn(net(data_x), label)
        loss.backward()
        trainer.step(spec.batch_size)
        loss_sum += loss.sum()
        since += 1
        if step in stops:
            mx.nd.waitall()
            seconds += time.perf_counter() - started
            record(step)
            if diverged or _stuck(history[-1], spec.steps):
                break
            started = time.perf_counter()
    result = {
        "spec": asdict(spec),
        "history": history,
        "steps_done": history[-1]["step"],
        "train_seconds": seconds,
        "steps_per_second": history[-1]["step"] / max(seconds, 1e-9),
    }
    if not diverged:
        try:
            for name, split in (final or {}).items():
                result[f"final_{name}_accuracy"] = accuracy(net, split, data)
        except Diverged:
            diverged = True
    if not diverged:
        last = result.get("final_test_accuracy", history[-1].get("test_accuracy", 1.0))
        if last < CHANCE:
            result["divergence"] = (
                f"accuracy {last:.3f} at chance after {history[-1]['step']} steps"
            )
    else:
        result["divergence"] = f"non-finite loss, weights or outputs by step {history[-1]['step']}"
    result["diverged"] = "divergence" in result
    result["wall_seconds"] = time.perf_counter() - wall  # with evaluation and set-up
    result["dense_units"] = [blk.weight.shape[0] for blk in net if type(blk).__name__ == "Dense"]
    return result, net


def first_step_at(history: list[dict], key: str, threshold: float) -> tuple[int, float] | None:
    """(step, training seconds) of the first checkpoint where ``key`` >= threshold."""
    for row in history:
        if row.get(key, -1.0) >= threshold:
            return row["step"], row["seconds"]
    return None
