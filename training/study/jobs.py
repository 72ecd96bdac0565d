"""Run the selected experiments, in this process or split over worker processes
(``--jobs``): experiment 2's nets are separate work units. Each worker loads the
data itself; results are merged in the configuration's order."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from training.study import config, dropout, lr, paper
from training.study.config import StudyConfig
from training.study.runner import StudyData, load_data

RUNNERS = {"paper": paper.run, "lr": lr.run, "dropout": dropout.run}
_data: StudyData | None = None


def units(cfg: StudyConfig) -> list[tuple[str, StudyConfig]]:
    out = []
    for name in cfg.experiments:
        if name == "lr":
            out += [(name, replace(cfg, lr=replace(cfg.lr, sweeps=(s,)))) for s in cfg.lr.sweeps]
        else:
            out.append((name, cfg))
    return out


def cost(unit: tuple[str, StudyConfig]) -> float:
    """A rough relative cost (image-steps, a conv image ~30 dense ones) to start big units first."""
    name, cfg = unit
    seeds = len(cfg.seeds)
    if name == "paper":
        return 2 * seeds * cfg.paper.steps * cfg.paper.batch_size
    if name == "dropout":
        return 4 * seeds * cfg.dropout.steps * cfg.dropout.batch_size
    s = cfg.lr.sweeps[0]
    return 2 * seeds * len(s.lrs) * s.steps * s.batch_size * (30 if s.arch == "cnn" else 1)


def _init(data_args: dict) -> None:
    global _data
    _data = load_data(**data_args)


def _work(unit: tuple[str, StudyConfig]) -> tuple[dict, float]:
    name, cfg = unit
    started = time.perf_counter()
    return RUNNERS[name](cfg, _data), time.perf_counter() - started


def run_all(
    cfg: StudyConfig, data: StudyData, data_args: dict | None, jobs: int
) -> tuple[dict, dict]:
    """The experiments' results and the seconds each took (summed over its units)."""
    global _data
    todo = units(cfg)
    if jobs > 1 and len(todo) > 1 and data_args is not None:
        order = sorted(range(len(todo)), key=lambda i: cost(todo[i]), reverse=True)
        ctx = multiprocessing.get_context("spawn")  # no fork after MXNet's threads started
        with ProcessPoolExecutor(
            jobs, mp_context=ctx, initializer=_init, initargs=(data_args,)
        ) as pool:
            got = dict(zip(order, pool.map(_work, [todo[i] for i in order]), strict=True))
        done = [got[i] for i in range(len(todo))]
    else:
        _data = data
        done = [_work(u) for u in todo]
    experiments: dict = {}
    seconds: dict = {}
    for (name, _), (result, secs) in zip(todo, done, strict=True):
        seconds[name] = seconds.get(name, 0.0) + secs
        if name not in experiments:
            experiments[name] = result
        else:  # another net of experiment 2
            experiments[name]["runs"] += result["runs"]
            experiments[name]["summary"].update(result["summary"])
    return experiments, seconds


def resummarize(results: dict) -> None:
    """Recompute each experiment's summary from its runs (in place), e.g. after the
    summaries' code changed: the runs are the measurements, the summaries derive."""
    cfg = config.from_dict(results["config"])
    exps = results["experiments"]
    if "paper" in exps:
        exps["paper"]["summary"] = paper.summarize(exps["paper"]["runs"], cfg.paper.steps)
    if "lr" in exps:
        exps["lr"]["summary"] = lr.summarize(exps["lr"]["runs"], cfg)
    if "dropout" in exps:
        exps["dropout"]["summary"] = dropout.summarize(exps["dropout"]["runs"])
