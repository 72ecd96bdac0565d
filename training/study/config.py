"""What the study runs: one dataclass per experiment and the named sizes.

``full`` is the published study (under 45 minutes on the 2-core machine, see the report),
``quick`` the CI smoke run (seconds), ``small`` and ``smoke`` the notebook's sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

EXPERIMENTS = ("paper", "lr", "dropout")


@dataclass(frozen=True)
class PaperConfig:
    """Experiment 1: Ioffe & Szegedy (2015), section 4.1, Figure 1."""

    steps: int = 50_000
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "sigmoid"
    init_sigma: float = 0.1  # "small random Gaussian values": N(0, 0.1^2), biases 0
    lr: float = 0.1  # plain SGD: the paper names no optimizer settings
    momentum: float = 0.0
    probe_images: int = 1000  # fixed test images whose sigmoid inputs are tracked
    unit: int = 0  # which sigmoid of the last hidden layer is plotted
    eval_images: int | None = None  # None: the whole test set at every checkpoint
    drift_from: float = 0.1  # drift is measured from this fraction of training on


@dataclass(frozen=True)
class ArchSweep:
    arch: str
    lrs: tuple[float, ...]
    steps: int
    batch_size: int = 128
    eval_images: int | None = None  # test images at checkpoints; the whole set at the end
    checkpoints: tuple[int, int] = (24, 20)  # log-spaced and evenly spaced checkpoints


@dataclass(frozen=True)
class LRConfig:
    """Experiment 2: the project's nets, BN on/off, across learning rates."""

    sweeps: tuple[ArchSweep, ...] = (
        ArchSweep("mlp", (0.01, 0.03, 0.1, 0.3, 1.0), steps=10_000),
        ArchSweep("cnn", (0.01, 0.03, 0.1, 1.0), steps=400, eval_images=2000, checkpoints=(12, 8)),
    )
    thresholds: tuple[float, ...] = (0.97, 0.98)
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass(frozen=True)
class DropoutConfig:
    """Experiment 3: BatchNorm on/off x Dropout on/off on the project's MLP."""

    steps: int = 9375  # 20 epochs of 60,000 images at batch 128
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    dropout: float = 0.5
    train_eval_images: int | None = 10_000  # fixed training subset for train accuracy
    eval_images: int | None = None


@dataclass(frozen=True)
class StudyConfig:
    preset: str = "full"
    seeds: tuple[int, ...] = (1, 2)
    experiments: tuple[str, ...] = EXPERIMENTS
    limit_train: int | None = None  # first N training images only (smoke runs)
    limit_test: int | None = None  # first N test images only (smoke runs)
    paper: PaperConfig = field(default_factory=PaperConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)


def preset(name: str) -> StudyConfig:
    """The named sizes; ``full`` is the published study."""
    full = StudyConfig()
    if name == "full":
        return full
    if name == "quick":  # CI smoke: every code path, a few seconds of training
        return StudyConfig(
            preset=name,
            seeds=(1, 2),
            limit_train=1000,
            limit_test=500,
            paper=replace(full.paper, steps=150, probe_images=200, eval_images=500),
            lr=replace(
                full.lr,
                sweeps=(
                    ArchSweep("mlp", (0.01, 1.0), steps=60, batch_size=64, eval_images=500),
                    ArchSweep("cnn", (0.1,), steps=4, batch_size=32, eval_images=100),
                ),
                thresholds=(0.5, 0.7),
            ),
            dropout=replace(
                full.dropout, steps=60, batch_size=64, train_eval_images=500, eval_images=500
            ),
        )
    if name == "small":  # the notebook's default: a few minutes on a laptop CPU
        return StudyConfig(
            preset=name,
            seeds=(1, 2),
            limit_train=None,
            paper=replace(full.paper, steps=3000, eval_images=2000),
            lr=replace(
                full.lr,
                sweeps=(
                    ArchSweep("mlp", (0.01, 0.1, 1.0), steps=1000, eval_images=2000),
                    ArchSweep("cnn", (0.01, 0.1), steps=60, eval_images=1000),
                ),
                thresholds=(0.95, 0.97),
            ),
            dropout=replace(full.dropout, steps=1000, train_eval_images=5000, eval_images=5000),
        )
    if name == "smoke":  # the notebook under the test suite
        q = preset("quick")
        return replace(
            q,
            preset=name,
            seeds=(1,),
            paper=replace(q.paper, steps=60),
            lr=replace(
                q.lr,
                sweeps=(
                    ArchSweep("mlp", (0.1, 1.0), steps=30, batch_size=64, eval_images=200),
                    ArchSweep("cnn", (0.1,), steps=2, batch_size=32, eval_images=50),
                ),
            ),
            dropout=replace(q.dropout, steps=30),
        )
    raise ValueError(f"unknown size {name!r}: full, quick, small or smoke")


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def from_dict(d: dict) -> StudyConfig:
    """The StudyConfig that ``dataclasses.asdict`` turned into ``d`` (results.json's config)."""
    lr = d["lr"]
    sweeps = tuple(ArchSweep(**_tuples(s)) for s in lr["sweeps"])
    top = _tuples({k: v for k, v in d.items() if k not in ("paper", "lr", "dropout")})
    return StudyConfig(
        **top,
        paper=PaperConfig(**_tuples(d["paper"])),
        lr=LRConfig(**{**_tuples(lr), "sweeps": sweeps}),
        dropout=DropoutConfig(**d["dropout"]),
    )
