"""Experiment 2: the project's MLP and CNN, with and without BatchNorm, across
learning rates (SGD with momentum, constant rate): steps and seconds to reach
the accuracy thresholds, final accuracy, divergence, and BN's speed-up factor.
"""

from __future__ import annotations

from training.study.config import StudyConfig
from training.study.runner import RunSpec, StudyData, checkpoints, first_step_at, subset, train_run
from training.study.stats import log, spread
from training.train import TrainConfig

DROPOUT = TrainConfig().dropout  # the project's nets as shipped: Dropout in the dense part


def key(threshold: float) -> str:
    return f"{threshold:g}"


def run(cfg: StudyConfig, data: StudyData) -> dict:
    lc = cfg.lr
    runs = []
    for sweep in lc.sweeps:
        evals = {"test": subset(data.test, sweep.eval_images)}
        at = checkpoints(sweep.steps, *sweep.checkpoints)
        for lr in sweep.lrs:
            for bn in (False, True):
                for seed in cfg.seeds:
                    spec = RunSpec(
                        sweep.arch,
                        bn,
                        DROPOUT,
                        lr,
                        seed,
                        sweep.steps,
                        batch_size=sweep.batch_size,
                        momentum=lc.momentum,
                        weight_decay=lc.weight_decay,
                    )
                    record, _ = train_run(spec, data, evals, at=at, final={"test": data.test})
                    record["reached"] = {}
                    for t in lc.thresholds:
                        hit = first_step_at(record["history"], "test_accuracy", t)
                        record["reached"][key(t)] = (
                            {"step": hit[0], "seconds": hit[1]} if hit else None
                        )
                    log(
                        f"[lr] {sweep.arch} {'BN' if bn else 'no BN'} lr={lr:g} seed {seed}: "
                        f"{record['steps_done']} steps in {record['train_seconds']:.0f}s, "
                        + (
                            record["divergence"]
                            if record["diverged"]
                            else f"test accuracy {record['final_test_accuracy']:.4f}"
                        )
                    )
                    runs.append(record)
    return {"runs": runs, "summary": summarize(runs, cfg)}


def _ratio(slow: dict | None, fast: dict | None, total: float) -> dict | None:
    """slow/fast with a bound when one side never reached the threshold."""
    if fast is None:
        return None if slow is None else {"value": slow["mean"] / total, "bound": "<"}
    if slow is None:
        return {"value": total / fast["mean"], "bound": ">"}
    return {"value": slow["mean"] / fast["mean"], "bound": "="}


def summarize(runs: list[dict], cfg: StudyConfig) -> dict:
    out = {}
    n_seeds = len(cfg.seeds)
    for sweep in cfg.lr.sweeps:
        cells = []
        for lr in sweep.lrs:
            for bn in (False, True):
                rs = [
                    r
                    for r in runs
                    if r["spec"]["arch"] == sweep.arch
                    and r["spec"]["lr"] == lr
                    and r["spec"]["batch_norm"] == bn
                ]
                cell = {
                    "lr": lr,
                    "batch_norm": bn,
                    "runs": len(rs),
                    "diverged": sum(r["diverged"] for r in rs),
                    "final_accuracy": spread(r.get("final_test_accuracy") for r in rs),
                    "steps_to": {},
                    "seconds_to": {},
                }
                for t in cfg.lr.thresholds:
                    hits = [r["reached"][key(t)] for r in rs]
                    done = len(hits) == n_seeds and all(hits)
                    cell["steps_to"][key(t)] = spread(h["step"] for h in hits) if done else None
                    cell["seconds_to"][key(t)] = (
                        spread(h["seconds"] for h in hits) if done else None
                    )
                    cell.setdefault("reached_by", {})[key(t)] = sum(bool(h) for h in hits)
                cells.append(cell)
        out[sweep.arch] = {
            "cells": cells,
            "steps": sweep.steps,
            **_speedups(cells, sweep, cfg.lr.thresholds),
        }
    return out


def _speedups(cells: list[dict], sweep, thresholds) -> dict:
    def cell(lr, bn):
        return next(c for c in cells if c["lr"] == lr and c["batch_norm"] == bn)

    best, at_best, at_equal = {}, {}, {}
    for t in map(key, thresholds):
        best[t] = {}
        for bn in (False, True):
            ok = [c for c in cells if c["batch_norm"] == bn and c["steps_to"][t]]
            pick = min(ok, key=lambda c: c["steps_to"][t]["mean"]) if ok else None
            best[t]["bn" if bn else "plain"] = pick["lr"] if pick else None
        b, p = best[t]["bn"], best[t]["plain"]
        steps_b = cell(b, True)["steps_to"][t] if b is not None else None
        steps_p = cell(p, False)["steps_to"][t] if p is not None else None
        secs_b = cell(b, True)["seconds_to"][t] if b is not None else None
        secs_p = cell(p, False)["seconds_to"][t] if p is not None else None
        at_best[t] = {
            "steps": _ratio(steps_p, steps_b, sweep.steps),
            "seconds": {"value": secs_p["mean"] / secs_b["mean"], "bound": "="}
            if (secs_p and secs_b)
            else None,
        }
        at_equal[t] = {
            f"{lr:g}": _ratio(
                cell(lr, False)["steps_to"][t], cell(lr, True)["steps_to"][t], sweep.steps
            )
            for lr in sweep.lrs
        }
    stable = {}
    for bn in (False, True):
        fine = [c["lr"] for c in cells if c["batch_norm"] == bn and not c["diverged"]]
        stable["bn" if bn else "plain"] = max(fine) if fine else None
    best_final = {}
    for bn in (False, True):
        ok = [
            c
            for c in cells
            if c["batch_norm"] == bn
            and c["final_accuracy"]["mean"] is not None
            and not c["diverged"]
        ]
        top = max(ok, key=lambda c: c["final_accuracy"]["mean"]) if ok else None
        best_final["bn" if bn else "plain"] = (
            {"lr": top["lr"], "accuracy": top["final_accuracy"]} if top else None
        )
    return {
        "best_lr": best,
        "speedup_at_best": at_best,
        "speedup_at_equal_lr": at_equal,
        "largest_stable_lr": stable,
        "best_final": best_final,
    }
