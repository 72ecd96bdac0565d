"""The study's figures, drawn from results.json alone (so they can be redrawn).

Matplotlib's object API on the Agg canvas: no pyplot, no global backend. Where
seeds are compared, the line is their mean and the band spans min to max.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

BN_COLORS = {True: "tab:blue", False: "tab:red"}
BN_NAMES = {True: "with BatchNorm", False: "without BatchNorm"}
CONFIG_COLORS = {
    "neither": "tab:red",
    "dropout": "tab:orange",
    "bn": "tab:blue",
    "bn+dropout": "tab:green",
}
CONFIG_NAMES = {
    "neither": "neither",
    "dropout": "Dropout only",
    "bn": "BatchNorm only",
    "bn+dropout": "BatchNorm + Dropout",
}
PCT_STYLES = {15: ":", 50: "-", 85: "--"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _band(ax, runs: list[dict], key: str, color: str, label: str, *, skip_zero: bool = False):
    """Mean over seeds as a line, min-max as a band, aligned on checkpoint steps."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for row in r["history"]:
            if key in row and not (skip_zero and row["step"] == 0):
                by_step[row["step"]].append(row[key])
    if not by_step:
        return
    steps = np.array(sorted(by_step))
    vals = [np.array(by_step[s]) for s in steps]
    mean = np.array([v.mean() for v in vals])
    ax.plot(steps, mean, color=color, label=f"{label} (n={len(runs)})", lw=1.6)
    if len(runs) > 1:
        ax.fill_between(
            steps, [v.min() for v in vals], [v.max() for v in vals], color=color, alpha=0.2, lw=0
        )


def _acc_ylim(ax, runs: list[dict], key: str, floor: float = 0.7):
    """Zoom to [floor, 1] when every curve is above ``floor`` after 10% of its steps."""
    vals = [
        row[key]
        for r in runs
        for row in r["history"]
        if key in row and row["step"] >= 0.1 * r["history"][-1]["step"]
    ]
    if vals and min(vals) >= floor:
        ax.set_ylim(floor, 1.0)


def paper_accuracy(exp: dict) -> Figure:
    """(a) as in the paper (linear steps, accuracy from 70% where the curves allow), and
    beside it the same curves on a log step axis, where the early difference shows."""
    fig = _figure(12, 4.2)
    axes = fig.subplots(1, 2)
    batch = exp["runs"][0]["spec"]["batch_size"]
    for ax, log_x in zip(axes, (False, True), strict=True):
        for bn in (False, True):
            runs = [r for r in exp["runs"] if r["spec"]["batch_norm"] == bn]
            _band(ax, runs, "test_accuracy", BN_COLORS[bn], BN_NAMES[bn], skip_zero=log_x)
        if log_x:
            ax.set_xscale("log")
            _log_ticks(ax, "x", [], subs=(1.0,))
            ax.set_ylim(0.0, 1.0)
        else:
            _acc_ylim(ax, exp["runs"], "test_accuracy")
        ax.set(
            xlabel=f"training step (mini-batches of {batch})" + (", log scale" * log_x),
            ylabel="test accuracy",
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right")
    axes[0].set_title("(a) Test accuracy during training")
    axes[1].set_title("the same, early steps spread out")
    return fig


def paper_sigmoid(exp: dict) -> Figure:
    """One column per seed (each seed's tracked unit is a different sigmoid), as the paper's
    Fig. 1(b) and 1(c): top row without BatchNorm, bottom row with."""
    seeds = sorted({r["spec"]["seed"] for r in exp["runs"]})
    fig = _figure(5.5 * len(seeds), 6.4)
    axes = np.array(fig.subplots(2, len(seeds), sharey=True, sharex=True, squeeze=False))
    for i, (bn, tag) in enumerate(((False, "(b) without"), (True, "(c) with"))):
        for j, seed in enumerate(seeds):
            ax = axes[i, j]
            run = next(
                (
                    r
                    for r in exp["runs"]
                    if r["spec"]["batch_norm"] == bn and r["spec"]["seed"] == seed
                ),
                None,
            )
            rows = [row for row in run["history"] if "sigmoid_input_p50" in row] if run else []
            for q, style in PCT_STYLES.items():
                ax.plot(
                    [row["step"] for row in rows],
                    [row[f"sigmoid_input_p{q}"] for row in rows],
                    style,
                    color=BN_COLORS[bn],
                    lw=1.4,
                    label=f"{q}th percentile",
                )
            ax.set_title(f"{tag} BatchNorm, seed {seed}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[i, 0].set_ylabel("sigmoid input")
        axes[i, 0].legend(loc="best", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    return fig


def _log_ticks(ax, axis: str, values: list[float], subs: tuple = (1.0, 2.0, 5.0)) -> None:
    """Plain numbers on a log axis, ticks at the values themselves."""
    fmt = FuncFormatter(lambda x, _: f"{x:,.0f}" if x >= 10 else f"{x:g}")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(fmt)
    target.set_minor_formatter(NullFormatter())
    if values:
        target.set_major_locator(FixedLocator(sorted(set(values))))
    else:
        target.set_major_locator(LogLocator(subs=subs))


def _lr_marks(ax, cells: list[dict], runs: list[dict], arch: str, value, ceiling, log_y):
    for bn in (False, True):
        lrs, means = [], []
        for c in (c for c in cells if c["batch_norm"] == bn):
            rs = [
                r
                for r in runs
                if r["spec"]["arch"] == arch
                and r["spec"]["lr"] == c["lr"]
                and r["spec"]["batch_norm"] == bn
            ]
            got = [value(r) for r in rs]
            shift = 1.06 if bn else 0.94  # side by side at each learning rate
            for v, r in zip(got, rs, strict=True):
                if v is None:
                    ax.plot(
                        [c["lr"] * shift],
                        [ceiling],
                        "x" if r["diverged"] else "^",
                        color=BN_COLORS[bn],
                        ms=7,
                        mfc="none",
                    )
                else:
                    ax.plot([c["lr"] * shift], [v], "o", color=BN_COLORS[bn], ms=4, alpha=0.7)
            if got and all(v is not None for v in got):
                lrs.append(c["lr"])
                means.append(float(np.mean(got)))
        ax.plot(lrs, means, "-", color=BN_COLORS[bn], label=BN_NAMES[bn])
    grid = sorted({c["lr"] for c in cells})
    ax.set_xscale("log")
    ax.set_xlim(grid[0] / 2, grid[-1] * 2)
    _log_ticks(ax, "x", grid)
    if log_y:
        ax.set_yscale("log")
        _log_ticks(ax, "y", [])
    ax.grid(alpha=0.3, which="both")


def lr_sweep(exp: dict, thresholds: list[str]) -> Figure:
    archs = list(exp["summary"])
    rows = len(thresholds) + 1
    fig = _figure(5.2 * len(archs), 3.1 * rows)
    axes = np.array(fig.subplots(rows, len(archs), squeeze=False))
    for j, arch in enumerate(archs):
        s = exp["summary"][arch]
        for i, t in enumerate(thresholds):
            ax = axes[i, j]

            def steps(r, t=t):
                hit = r["reached"][t]
                return hit["step"] if hit else None

            _lr_marks(ax, s["cells"], exp["runs"], arch, steps, s["steps"], True)
            ax.set(title=f"{arch.upper()}: steps to {float(t):.0%} test accuracy", ylabel="steps")
        ax = axes[-1, j]

        def final(r):  # a diverged run (stopped early or not) is an x, as in the table
            return None if r["diverged"] else r.get("final_test_accuracy")

        _lr_marks(ax, s["cells"], exp["runs"], arch, final, 0.1, False)
        ax.set(
            title=f"{arch.upper()}: test accuracy after {s['steps']} steps",
            xlabel="learning rate (SGD, momentum)",
            ylabel="test accuracy",
        )
    axes[0, 0].legend(
        loc="best", fontsize=8, title="^ not reached within the steps, x diverged", title_fontsize=8
    )
    return fig


def lr_curves(exp: dict) -> Figure:
    archs = list(exp["summary"])
    width = max(len(exp["summary"][a]["cells"]) // 2 for a in archs)
    fig = _figure(3.2 * width, 2.8 * len(archs))
    axes = np.array(fig.subplots(len(archs), width, squeeze=False, sharey=True))
    for i, arch in enumerate(archs):
        lrs = sorted({c["lr"] for c in exp["summary"][arch]["cells"]})
        for j in range(width):
            ax = axes[i, j]
            if j >= len(lrs):
                ax.set_axis_off()
                continue
            for bn in (False, True):
                runs = [
                    r
                    for r in exp["runs"]
                    if r["spec"]["arch"] == arch
                    and r["spec"]["lr"] == lrs[j]
                    and r["spec"]["batch_norm"] == bn
                ]
                _band(ax, runs, "test_accuracy", BN_COLORS[bn], BN_NAMES[bn], skip_zero=True)
            ax.set_xscale("log")
            _log_ticks(ax, "x", [], subs=(1.0,))
            ax.set_ylim(0.0, 1.0)
            ax.set_title(f"{arch.upper()}, lr={lrs[j]:g}", fontsize=10)
            ax.grid(alpha=0.3)
            if i == len(archs) - 1:
                ax.set_xlabel("step")
        axes[i, 0].set_ylabel("test accuracy")
    axes[0, 0].legend(loc="lower right", fontsize=7)
    return fig


def dropout_curves(exp: dict) -> Figure:
    fig = _figure(14, 4.2)
    axes = fig.subplots(1, 3)
    for ax, key, title in (
        (axes[0], "train_accuracy", "train accuracy (inference mode)"),
        (axes[1], "test_accuracy", "test accuracy"),
        (axes[2], "gap", "gap: train - test accuracy"),
    ):
        for cfg, color in CONFIG_COLORS.items():
            runs = [r for r in exp["runs"] if r["config"] == cfg]
            _band(ax, runs, key, color, CONFIG_NAMES[cfg], skip_zero=True)
        ax.set(title=title, xlabel="training step")
        ax.grid(alpha=0.3)
        if key != "gap":
            _acc_ylim(ax, exp["runs"], key, floor=0.9)
    axes[2].axhline(0, color="black", lw=0.6)
    axes[0].legend(loc="lower right", fontsize=8)
    return fig


def make_all(results: dict, folder: Path) -> list[str]:
    """Draw every figure the results allow into ``folder``; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    exps = results["experiments"]
    figures: dict[str, Figure] = {}
    if "paper" in exps:
        figures["paper_accuracy.png"] = paper_accuracy(exps["paper"])
        figures["paper_sigmoid_input.png"] = paper_sigmoid(exps["paper"])
    if "lr" in exps:
        thresholds = [f"{t:g}" for t in results["config"]["lr"]["thresholds"]]
        figures["lr_sweep.png"] = lr_sweep(exps["lr"], thresholds)
        figures["lr_curves.png"] = lr_curves(exps["lr"])
    if "dropout" in exps:
        figures["dropout.png"] = dropout_curves(exps["dropout"])
    for name, fig in figures.items():
        fig.savefig(folder / name)
    return list(figures)
