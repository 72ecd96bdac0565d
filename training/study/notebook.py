"""Build (and run) notebooks/batch_normalization.ipynb, the lab's notebook.

    python -m training.study.notebook            # write it, run it at its default size
    python -m training.study.notebook --no-run   # write it without outputs

The cells call the study's functions; none copies training code. The size comes
from $BN_NOTEBOOK_SCALE: ``small`` (default, minutes on a laptop CPU) or
``smoke`` (the test suite's, seconds).
"""

from __future__ import annotations

import argparse
import os
import sys

from training.data import REPO_ROOT

PATH = REPO_ROOT / "notebooks" / "batch_normalization.ipynb"
SCALE_VAR = "BN_NOTEBOOK_SCALE"

CELLS: list[tuple[str, str]] = [
    (
        "markdown",
        """\
# Batch Normalization: why it trains faster, at higher learning rates, with Dropout alongside

This notebook is the lab this product comes from, with measurements instead of claims. It
runs the three experiments of the project's BatchNorm study at a small size, with the project's
own code (`training/model.py`, `training/data.py`, `training/study/`):

1. **The BN paper's Figure 1** (Ioffe & Szegedy 2015, section 4.1): a sigmoid MLP with and
   without BatchNorm; test accuracy over training, and how the input to one sigmoid drifts.
2. **Learning rates**: the project's MLP and CNN with and without BatchNorm across learning rates.
3. **BatchNorm and Dropout**: what each does to the gap between train and test accuracy.

The full-size study (`python -m training.study`, under 45 minutes on 2 cores) is published
in [`docs/bn-study.md`](../docs/bn-study.md). Here the size comes from `$BN_NOTEBOOK_SCALE`:
`small` (default: a few minutes on a laptop CPU) or `smoke` (seconds; what the test suite runs).
At these sizes the numbers are noisy and the runs short: read the shapes, then the report.
The verdicts printed below apply the report's rules to these small runs, so they can differ
from the report's; where they do, the full-size runs are the ones to believe.""",
    ),
    (
        "code",
        """\
import os
import sys
from dataclasses import asdict
from pathlib import Path

from IPython.display import Image, Markdown, display

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "training" / "study").is_dir())
sys.path.insert(0, str(ROOT))

from training.study import config, dropout, lr, paper, plots, runner, verdicts

SCALE = os.environ.get("BN_NOTEBOOK_SCALE", "small")
cfg = config.preset(SCALE)
# The full MNIST when it is there (no download); else the sample committed for the tests.
data = runner.load_data(download=False, fallback=runner.SAMPLE_DIR,
                        limit_train=cfg.limit_train, limit_test=cfg.limit_test)
results = {"config": asdict(cfg), "experiments": {}}


def show(fig):
    display(Image(plots.png_bytes(fig)))


def verdict(name, rule):
    said, measured = rule(results)
    display(Markdown(f"**{name}: {said}.** {measured}"))


print(f"size {SCALE!r}, seeds {list(cfg.seeds)}: {len(data.train):,} training and "
      f"{len(data.test):,} test images from {Path(data.folder).name}")""",
    ),
    (
        "markdown",
        """\
## What BatchNorm computes

A BatchNorm layer sits between a layer's linear part and its activation (`Dense -> BatchNorm
-> activation` in `build_net`). For each unit it computes

$$\\hat x = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}, \\qquad y = \\gamma \\hat x + \\beta$$

with a learned scale $\\gamma$ and shift $\\beta$. Which $\\mu, \\sigma^2$ it uses depends on
the mode:

- **Training** (inside `autograd.record()`): the mean and variance **of the current mini-batch**.
  Every example's output then depends on the other examples in its batch; that noise is part of
  why BatchNorm regularizes a little. Each step also updates running averages:
  `running = 0.9 * running + 0.1 * batch` (MXNet's default momentum 0.9).
- **Inference** (outside `record()`, as in `evaluate` and the exported model): the **running**
  mean and variance, fixed numbers. BatchNorm is then a per-unit affine map, so the net is a
  plain function of each image: it gives the same answer for an image alone or in a batch.

The next cell checks both modes against the formula on a briefly trained MLP, and checks that the
model exported by `training.train.export_and_check` (what the service loads) answers the same for
an image alone as in a batch of eight.""",
    ),
    (
        "code",
        """\
import tempfile
import warnings

import numpy as np

from training.data import to_input
from training.study.runner import RunSpec, mx, train_run
from training.train import TrainResult, export_and_check

spec = RunSpec("mlp", batch_norm=True, dropout=0.5, lr=0.1, seed=1, steps=100)
_, net = train_run(spec, data, {})
x = mx.nd.array(to_input(data.test.images[:8], data.mean, data.std))

flat, dense, bn = net[0], net[1], net[2]          # Flatten -> Dense -> BatchNorm -> ...
h = dense(flat(x))                                 # the BatchNorm layer's input
gamma, beta = bn.gamma.data(), bn.beta.data()
eps = 1e-5                                         # gluon BatchNorm's default epsilon
running = gamma * (h - bn.running_mean.data()) / mx.nd.sqrt(bn.running_var.data() + eps) + beta
print("inference = formula with running statistics:",
      float(mx.nd.abs(bn(h) - running).max().asscalar()))

with tempfile.TemporaryDirectory() as tmp:
    _, metrics = export_and_check(TrainResult(net, data.mean, data.std), Path(tmp), "bn-demo",
                                  data.test)
    with warnings.catch_warnings():                # as training/train.py does on import
        warnings.simplefilter("ignore")
        exported = mx.gluon.SymbolBlock.imports(f"{tmp}/bn-demo-symbol.json", ["data"],
                                                f"{tmp}/bn-demo-0000.params")
    batch_out = exported(x).asnumpy()
    alone = np.concatenate([exported(x[i : i + 1]).asnumpy() for i in range(8)])
print("exported vs trained net, max |difference|:", metrics["export_max_abs_diff"])
print("exported model, image alone vs in a batch of 8:", float(np.abs(alone - batch_out).max()))

saved = [p.data().copy() for p in (bn.running_mean, bn.running_var)]
with mx.autograd.train_mode():                     # training mode: batch statistics
    train_out = bn(h)
    alone_train = bn(h[:1])                        # a batch of one: its own mean, variance 0
mean, var = h.mean(axis=0), ((h - h.mean(axis=0)) ** 2).mean(axis=0)
batch = gamma * (h - mean) / mx.nd.sqrt(var + eps) + beta
print("training = formula with batch statistics:",
      float(mx.nd.abs(train_out - batch).max().asscalar()))
print("training mode, image alone vs in the batch:",
      float(mx.nd.abs(alone_train - train_out[:1]).max().asscalar()),
      "(alone, every unit outputs its beta)")
bn.running_mean.set_data(saved[0])                 # train-mode calls update the running stats
bn.running_var.set_data(saved[1])""",
    ),
    (
        "markdown",
        """\
## Experiment 1: the BN paper's Figure 1

Three hidden layers of 100 sigmoid units, weights from a small Gaussian, mini-batches of 60,
the same plain SGD for both nets. The paper reports that the BN net reaches higher test accuracy
sooner (a), and that the input to a sigmoid of the last hidden layer drifts during training
without BN, in mean and spread, while with BN it stays stable (b, c). The percentiles are over a
fixed batch of test images; for the BN net, with that batch's own statistics, as in the paper.""",
    ),
    (
        "code",
        """\
results["experiments"]["paper"] = exp1 = paper.run(cfg, data)
show(plots.paper_accuracy(exp1))
show(plots.paper_sigmoid(exp1))
verdict("Fig. 1(a), higher accuracy sooner", verdicts.paper_a)
verdict("Fig. 1(b, c) and claim 3, less distribution shift", verdicts.claim_shift)""",
    ),
    (
        "markdown",
        """\
## Experiment 2: learning rates

The project's nets as `build_net` makes them, with and without BatchNorm, trained with SGD and
momentum 0.9 at several constant learning rates, the same seeds for all. Without BatchNorm a
large rate blows the activations up and the loss turns into NaN (marked x); with it, each layer's
input is renormalized at every step, so the same rate can still train. The lab says that this
is also why BN nets train faster: they tolerate the larger rates that make progress quickly.""",
    ),
    (
        "code",
        """\
results["experiments"]["lr"] = exp2 = lr.run(cfg, data)
show(plots.lr_sweep(exp2, [f"{t:g}" for t in cfg.lr.thresholds]))
show(plots.lr_curves(exp2))
verdict("Claim 1, faster training", verdicts.claim_speed)
verdict("Claim 2, higher learning rates", verdicts.claim_lr)""",
    ),
    (
        "markdown",
        """\
## Experiment 3: BatchNorm and Dropout

A 2x2 on the project's MLP: BatchNorm on/off, Dropout on/off. Train accuracy is measured in
inference mode on a fixed subset of training images, like test accuracy, so that the gap between
them is the generalization gap. The lab says BatchNorm regularizes a little (its batch noise) but
is no replacement for Dropout.""",
    ),
    (
        "code",
        """\
results["experiments"]["dropout"] = exp3 = dropout.run(cfg, data)
show(plots.dropout_curves(exp3))
for name, c in exp3["summary"]["configs"].items():
    print(f"{name:>11}: train {c['train_accuracy']['mean']:.4f}  test "
          f"{c['test_accuracy']['mean']:.4f}  gap {c['gap']['mean']:+.4f}")
verdict("Claim 4, BN regularizes a little, use it with Dropout", verdicts.claim_dropout)""",
    ),
    (
        "markdown",
        """\
## Where to go from here

- The measured answers at full size, with two seeds and the spread:
  [`docs/bn-study.md`](../docs/bn-study.md).
- Rerun them: `nice -n 10 python -m training.study --jobs 2 --publish` (`--help` for experiments,
  seeds, steps and learning rates), or `python -m training.study --quick` for a smoke run.
- Train and publish the shipped model: `python -m training.train`.""",
    ),
]


def build():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source in CELLS:
        maker = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(maker(source))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nb


def execute(nb, scale: str | None = None, timeout: int = 1800):
    """Run ``nb`` in a python3 kernel from the notebooks folder (in place)."""
    from nbclient import NotebookClient

    old = os.environ.get(SCALE_VAR)
    if scale is not None:
        os.environ[SCALE_VAR] = scale
    PATH.parent.mkdir(parents=True, exist_ok=True)
    try:
        NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(PATH.parent)}},
        ).execute()
    finally:
        if scale is not None:
            if old is None:
                os.environ.pop(SCALE_VAR, None)
            else:
                os.environ[SCALE_VAR] = old
    return nb


def main(argv: list[str] | None = None) -> int:
    import nbformat

    p = argparse.ArgumentParser(
        prog="python -m training.study.notebook",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--no-run", dest="run", action="store_false", help="write without outputs")
    p.add_argument("--scale", default="small", choices=("small", "smoke"))
    args = p.parse_args(argv)
    nb = build()
    if args.run:
        execute(nb, args.scale)
    PATH.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(PATH))
    print(f"wrote {PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
