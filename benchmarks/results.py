"""What a benchmark writes beside its printout: a JSON document whose "meta" names the
command, commit, date and machine load, committed under benchmarks/results/ so that the
docs' figures are rendered from it (benchmarks/docs.py)."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def run_meta(module: str) -> dict[str, Any]:
    """The run's command line (as typed: ``python -m module args``), commit, date and load."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, "-m", module, *sys.argv[1:]]),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain")),
        "nproc": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }


def write(path: Path, results: dict[str, Any]) -> None:
    """``results`` with its meta's load average after the run, as indented JSON."""
    results["meta"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def load(name: str) -> dict[str, Any] | None:
    """benchmarks/results/NAME.json, or None where that benchmark has not been committed."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
