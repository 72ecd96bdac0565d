"""The reliability tests: load and faults against real servers on 127.0.0.1.

    make reliability                 # the full run (about 6 minutes) through
                                     # benchmarks/reliability.py: its figures go to
                                     # benchmarks/results/reliability.json
    make reliability QUICK=1         # the bounded run CI does (shorter soak, fewer rounds)

Every module here sets ``pytestmark = pytest.mark.reliability`` (kept out of the default
``make test``), and every test records its figures with ``figure(...)``; the run prints
them at the end and, with DIGITSERVE_RELIABILITY_OUT set, writes them there as JSON.
Load tests: run them alone on the machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Server, copy_shipped_store

from .clients import digit_pngs, predict_request
from .harness import load_average

QUICK = os.environ.get("DIGITSERVE_RELIABILITY", "").lower() == "quick"
_FIGURES: list[dict[str, Any]] = []


def scaled(full: float, quick: float) -> float:
    """A duration or count: the full run's, or the bounded (CI) run's."""
    return quick if QUICK else full


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[..., None]:
    """figure(name, text, **values): one figure of this test, with the load average."""

    def record(name: str, text: str, **values: Any) -> None:
        entry = {
            "test": request.node.nodeid,
            "name": name,
            "text": text,
            "values": values,
            "load_average": load_average(),
            "quick": QUICK,
        }
        _FIGURES.append(entry)
        print(f"\nFIGURE {name}: {text} (load average {entry['load_average']})")

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for entry in _FIGURES:
        terminalreporter.write_line(
            f"{entry['name']}: {entry['text']} [load {entry['load_average']}]"
        )
    out = os.environ.get("DIGITSERVE_RELIABILITY_OUT")
    if out:  # benchmarks/reliability.py adds the run's command, commit, date and load
        Path(out).write_text(json.dumps({"cpus": os.cpu_count(), "figures": _FIGURES}, indent=2))


@pytest.fixture(scope="session")
def pngs() -> list[bytes]:
    return [png for png, _ in digit_pngs(20)]


@pytest.fixture(scope="session")
def payloads(pngs: list[bytes]) -> list[bytes]:
    """Whole /predict requests (new connection each: Connection: close)."""
    return [predict_request(png) for png in pngs]


@pytest.fixture
def store_copy(tmp_path: Path) -> Path:
    return copy_shipped_store(tmp_path / "model_store")


@pytest.fixture
def served(start_server: Callable[..., Server], store_copy: Path) -> Iterator[Server]:
    """gunicorn as ``make run`` starts it (2 workers) on a copy of the shipped store."""
    server = start_server({"DIGITSERVE_STORE": str(store_copy)}, workers=2)
    server.store_dir = store_copy  # type: ignore[attr-defined]
    yield server
