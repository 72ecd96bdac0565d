"""python -m training.study: run the BatchNorm study, write results.json, the
figures and the report.

    python -m training.study --quick --out /tmp/bn      # CI smoke run, seconds
    nice -n 10 python -m training.study --publish       # the published study
    python -m training.study --from-results docs/img/bn-study/results.json --publish

Without --publish everything goes to --out (results.json, figures/, bn-study.md).
With --publish the report is also written to docs/bn-study.md, its figures and
results.json to docs/img/bn-study/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from training.data import REPO_ROOT, DataError
from training.study import jobs, plots, report
from training.study.config import EXPERIMENTS, StudyConfig, preset
from training.study.runner import SAMPLE_DIR, StudyData, load_data, mx, np
from training.study.stats import log

SCHEMA = 1
DOCS = REPO_ROOT / "docs"
PUBLISHED_REPORT = DOCS / "bn-study.md"
PUBLISHED_FIGURES = DOCS / "img" / "bn-study"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine() -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "mxnet": mx.__version__,
        "numpy": np.__version__,
        "load_average_at_start": load,
    }


def run_study(
    cfg: StudyConfig, data: StudyData, command: str, data_args: dict | None = None, n_jobs: int = 1
) -> dict:
    """Run the experiments; ``data_args`` (for load_data) lets ``n_jobs`` workers load it."""
    started = dt.datetime.now(dt.UTC)
    results: dict = {
        "schema": SCHEMA,
        "meta": {
            "command": command,
            "date": started.isoformat(timespec="seconds"),
            "machine": machine(),
            "git_commit": _git_commit(),
            "preset": cfg.preset,
            "seeds": list(cfg.seeds),
            "jobs": n_jobs,
            "data": {
                "folder": data.folder,
                "verified_with": data.verified,
                "train_images": len(data.train),
                "test_images": len(data.test),
                "mean": data.mean,
                "std": data.std,
            },
            "seconds": {},
        },
        "config": asdict(cfg),
        "experiments": {},
    }
    t0 = time.perf_counter()
    results["experiments"], seconds = jobs.run_all(cfg, data, data_args, n_jobs)
    results["meta"]["seconds"] = {**seconds, "total": time.perf_counter() - t0}
    return results


def render(results: dict, out: Path, publish: bool) -> dict[str, Path]:
    """Figures and report into ``out``; with ``publish`` also into docs/."""
    written = {"results": out / "results.json"}
    names = plots.make_all(results, out / "figures")
    report.write(results, out / "bn-study.md", out / "figures", names)
    written["report"] = out / "bn-study.md"
    if publish:
        PUBLISHED_FIGURES.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(out / "figures" / name, PUBLISHED_FIGURES / name)
        shutil.copyfile(out / "results.json", PUBLISHED_FIGURES / "results.json")
        report.write(results, PUBLISHED_REPORT, PUBLISHED_FIGURES, names)
        written["published"] = PUBLISHED_REPORT
    return written


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False))
    tmp.replace(path)


def build_config(args: argparse.Namespace) -> StudyConfig:
    cfg = preset("quick" if args.quick else args.size)
    cfg = replace(cfg, experiments=tuple(args.experiments or cfg.experiments))
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    if args.limit_train is not None:
        cfg = replace(cfg, limit_train=args.limit_train or None)
    if args.paper_steps:
        cfg = replace(cfg, paper=replace(cfg.paper, steps=args.paper_steps))
    if args.dropout_steps:
        cfg = replace(cfg, dropout=replace(cfg.dropout, steps=args.dropout_steps))
    sweeps = []
    for s in cfg.lr.sweeps:
        steps = {"mlp": args.mlp_steps, "cnn": args.cnn_steps}[s.arch] or s.steps
        lrs = {"mlp": args.mlp_lrs, "cnn": args.cnn_lrs}[s.arch] or s.lrs
        sweeps.append(replace(s, lrs=tuple(lrs), steps=steps))
    return replace(cfg, lr=replace(cfg.lr, sweeps=tuple(sweeps)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="CI smoke size (same as --size quick)")
    p.add_argument("--size", choices=("full", "small", "quick", "smoke"), default="full")
    p.add_argument(
        "--experiments",
        nargs="+",
        choices=EXPERIMENTS,
        default=None,
        help="which experiments (default: all)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--paper-steps", type=int, default=None, help="experiment 1 steps")
    p.add_argument("--mlp-steps", type=int, default=None, help="experiment 2 MLP steps")
    p.add_argument("--cnn-steps", type=int, default=None, help="experiment 2 CNN steps")
    p.add_argument("--mlp-lrs", nargs="+", type=float, default=None)
    p.add_argument("--cnn-lrs", nargs="+", type=float, default=None)
    p.add_argument("--dropout-steps", type=int, default=None, help="experiment 3 steps")
    p.add_argument("--limit-train", type=int, default=None, help="first N training images")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (experiments and experiment 2's nets run in parallel)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="MNIST IDX folder (else $MNIST_DIR, ...; quick/smoke: the committed sample)",
    )
    p.add_argument("--out", type=Path, default=Path("study-out"), help="output folder")
    p.add_argument(
        "--publish", action="store_true", help="also write docs/bn-study.md and docs/img/bn-study/"
    )
    p.add_argument(
        "--from-results",
        type=Path,
        default=None,
        help="redraw figures and report from a results.json; no training",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(
        ["python", "-m", "training.study", *(sys.argv[1:] if argv is None else argv)]
    )
    if args.from_results:
        results = json.loads(args.from_results.read_text())
        jobs.resummarize(results)
        write_json(results, args.out / "results.json")
    else:
        cfg = build_config(args)
        # The smoke sizes need ~1,000 images: the committed sample, unless told otherwise.
        smoke = cfg.preset in ("quick", "smoke") and args.data_dir is None
        data_args = {
            "data_dir": SAMPLE_DIR if smoke else args.data_dir,
            "limit_train": cfg.limit_train,
            "limit_test": cfg.limit_test,
        }
        try:
            data = load_data(**data_args)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        log(
            f"study ({cfg.preset}): experiments {', '.join(cfg.experiments)}, seeds "
            f"{list(cfg.seeds)}, {len(data.train)} train / {len(data.test)} test images"
        )
        results = run_study(cfg, data, command, data_args, args.jobs)
        write_json(results, args.out / "results.json")
    written = render(results, args.out, args.publish)
    log(
        f"done in {results['meta']['seconds']['total']:.0f}s of training and evaluation: "
        + ", ".join(str(p) for p in written.values())
    )
    return 0
