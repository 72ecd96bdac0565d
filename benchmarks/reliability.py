"""The reliability tests (tests/reliability) as a benchmark: run them, and write their
figures with the run's command, commit, date and load to a JSON output, from which
docs/reliability.md's table is rendered (python -m benchmarks.docs).

    python -m benchmarks.reliability --output benchmarks/results/reliability.json
    python -m benchmarks.reliability --quick          # CI's bounded run, no output
    python -m benchmarks.reliability -- -k soak       # arguments after -- go to pytest

`make reliability` runs the first, `make reliability QUICK=1` the second. The exit
status is pytest's; the output is written either way, with that status in it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks.results import REPO, run_meta, write


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="the bounded run (shorter soak, fewer rounds)"
    )
    p.add_argument("--output", type=Path, help="write the figures here (JSON)")
    p.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = p.parse_args(argv)
    meta = run_meta("benchmarks.reliability")
    os.environ["DIGITSERVE_RELIABILITY"] = "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory(prefix="digitserve-reliability-") as tmp:
        figures = Path(tmp) / "figures.json"
        os.environ["DIGITSERVE_RELIABILITY_OUT"] = str(figures)
        tests = str(REPO / "tests" / "reliability")
        status = pytest.main(
            ["-m", "reliability", tests, "-p", "no:cacheprovider", *args.pytest_args]
        )
        recorded = json.loads(figures.read_text()) if figures.is_file() else {"figures": []}
    if args.output:
        write(
            args.output,
            {"meta": meta, "pytest_exit_status": int(status), "quick": args.quick, **recorded},
        )
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
