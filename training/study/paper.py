"""Experiment 1: the BN paper's MNIST experiment (Ioffe & Szegedy 2015, 4.1, Fig. 1).

3 fully connected hidden layers of 100 sigmoids, weights from N(0, sigma^2),
softmax cross-entropy, mini-batches of 60; with and without BatchNorm on each
hidden layer. Recorded: test accuracy over training (Fig. 1a) and the 15th,
50th and 85th percentiles of the input to one sigmoid of the last hidden layer
over a fixed batch of test images (Fig. 1b, c).

The paper plots the BN net's sigmoid input in the training network (N_BN^tr),
i.e. normalized with the statistics of the batch; so does the probe here (the
probe batch's own statistics), restoring the running statistics afterwards.
"""

from __future__ import annotations

import numpy as np

from training.data import to_input
from training.study.config import StudyConfig
from training.study.runner import (
    RunSpec,
    StudyData,
    checkpoints,
    first_step_at,
    mx,
    subset,
    train_run,
)
from training.study.stats import log, spread

PERCENTILES = (15, 50, 85)


def sigmoid_input_net(net):
    """The layers up to (not including) the last hidden activation: the sigmoid's input."""
    last = max(i for i in range(len(net)) if type(net[i]).__name__ == "Activation")
    return net[:last]


class SigmoidProbe:
    """At each checkpoint: percentiles of every last-layer sigmoid input over the probe
    images; the tracked unit's go into the run history, all of them into ``table``."""

    def __init__(self, images: np.ndarray, unit: int):
        self.x = mx.nd.array(images)
        self.unit = unit
        self.table: list[np.ndarray] = []  # per checkpoint: (3, units)

    def __call__(self, net) -> dict:
        aux = [
            p
            for name, p in net.collect_params().items()
            if name.endswith(("running_mean", "running_var"))
        ]
        saved = [p.data().copy() for p in aux]
        with mx.autograd.train_mode():  # batch statistics, as N_BN^tr; no Dropout here
            out = sigmoid_input_net(net)(self.x).asnumpy()
        for p, value in zip(aux, saved, strict=True):
            p.set_data(value)
        pct = np.percentile(out, PERCENTILES, axis=0)
        self.table.append(pct)
        return {f"sigmoid_input_p{q}": float(pct[i, self.unit]) for i, q in enumerate(PERCENTILES)}


def drift(steps: list[int], table: list[np.ndarray], start: int, unit: int) -> dict:
    """How much the sigmoid-input distributions move from step ``start`` on.

    median_shift: range of the median over the checkpoints, in units of the mean
    15-85 percentile width (0 = still; 1 = moved by its own typical spread);
    width_ratio: largest over smallest 15-85 width (1 = constant spread).
    Given for the tracked unit and as the median over all units of the layer."""
    keep = [i for i, s in enumerate(steps) if s >= start]
    pct = np.stack([table[i] for i in keep])  # (checkpoints, 3, units)
    median, width = pct[:, 1, :], pct[:, 2, :] - pct[:, 0, :]
    shift = (median.max(0) - median.min(0)) / np.maximum(width.mean(0), 1e-12)
    ratio = width.max(0) / np.maximum(width.min(0), 1e-12)
    return {
        "from_step": int(steps[keep[0]]),
        "median_shift": {"unit": float(shift[unit]), "all_units": float(np.median(shift))},
        "width_ratio": {"unit": float(ratio[unit]), "all_units": float(np.median(ratio))},
    }


def unit_drift(history: list[dict], start: int) -> dict:
    """``drift`` of the tracked unit, from the percentiles in a run's history."""
    rows = [r for r in history if "sigmoid_input_p50" in r and r["step"] >= start]
    if len(rows) < 2:
        return {"median_shift": None, "width_ratio": None}
    pct = np.array([[r[f"sigmoid_input_p{q}"] for q in PERCENTILES] for r in rows])
    width = pct[:, 2] - pct[:, 0]
    return {
        "median_shift": float(np.ptp(pct[:, 1]) / max(width.mean(), 1e-12)),
        "width_ratio": float(width.max() / max(width.min(), 1e-12)),
    }


def run(cfg: StudyConfig, data: StudyData) -> dict:
    pc = cfg.paper
    probe_images = to_input(subset(data.test, pc.probe_images).images, data.mean, data.std)
    evals = {"test": subset(data.test, pc.eval_images)}
    at = checkpoints(pc.steps, n_log=20, n_lin=50)
    runs = []
    for seed in cfg.seeds:
        for bn in (False, True):
            spec = RunSpec(
                "mlp",
                bn,
                0.0,
                pc.lr,
                seed,
                pc.steps,
                batch_size=pc.batch_size,
                momentum=pc.momentum,
                hidden=pc.hidden,
                activation=pc.activation,
                init_sigma=pc.init_sigma,
            )
            probe = SigmoidProbe(probe_images, pc.unit)
            record, _ = train_run(spec, data, evals, at=at, probe=probe, final={"test": data.test})
            steps = [row["step"] for row in record["history"]][: len(probe.table)]
            if probe.table:
                record["drift"] = drift(steps, probe.table, int(pc.drift_from * pc.steps), pc.unit)
            log(
                f"[paper] {'BN' if bn else 'no BN'} seed {seed}: {record['steps_done']} steps "
                f"in {record['train_seconds']:.0f}s, test accuracy "
                f"{record.get('final_test_accuracy', float('nan')):.4f}"
            )
            runs.append(record)
    return {"runs": runs, "summary": summarize(runs, pc.steps)}


def summarize(runs: list[dict], total: int) -> dict:
    by = {bn: [r for r in runs if r["spec"]["batch_norm"] == bn] for bn in (False, True)}
    out: dict = {}
    for bn, rs in by.items():
        key = "bn" if bn else "plain"
        out[key] = {
            "final_test_accuracy": spread(r.get("final_test_accuracy") for r in rs),
            "median_shift": spread(
                r["drift"]["median_shift"]["all_units"] for r in rs if "drift" in r
            ),
            "median_shift_unit": spread(
                r["drift"]["median_shift"]["unit"] for r in rs if "drift" in r
            ),
            "width_ratio": spread(
                r["drift"]["width_ratio"]["all_units"] for r in rs if "drift" in r
            ),
            "steps_per_second": spread(r["steps_per_second"] for r in rs),
            # The tracked unit over the whole run (from step 0), from the stored history.
            "unit_whole": {
                m: spread(unit_drift(r["history"], 0)[m] for r in rs)
                for m in ("median_shift", "width_ratio")
            },
        }
    # When did the BN net first match the plain net's final accuracy (same seed)?
    matched = []
    for plain in by[False]:
        twin = next((r for r in by[True] if r["spec"]["seed"] == plain["spec"]["seed"]), None)
        target = plain["history"][-1].get("test_accuracy")
        if twin is None or target is None:
            continue
        hit = first_step_at(twin["history"], "test_accuracy", target)
        matched.append(
            {
                "seed": plain["spec"]["seed"],
                "plain_final": target,
                "bn_step": hit[0] if hit else None,
            }
        )
    out["bn_matches_plain_final"] = matched
    out["bn_match_speedup"] = spread(total / m["bn_step"] for m in matched if m["bn_step"])
    # Fraction of checkpoints (after step 0) where the BN net is ahead, over seeds.
    ahead = []
    for plain in by[False]:
        twin = next((r for r in by[True] if r["spec"]["seed"] == plain["spec"]["seed"]), None)
        if twin is None:
            continue
        pairs = [
            (a.get("test_accuracy"), b.get("test_accuracy"))
            for a, b in zip(plain["history"][1:], twin["history"][1:], strict=False)
        ]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:
            ahead.append(sum(b > a for a, b in pairs) / len(pairs))
    out["bn_ahead_fraction"] = spread(ahead)
    return out
