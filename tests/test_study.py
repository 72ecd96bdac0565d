"""The BatchNorm study: `python -m training.study --quick` end to end (results.json,
figures, report), its pieces on small inputs, and the lab notebook at its smallest size."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from training.study import config, fmt, notebook, paper, report
from training.study.lr import _ratio
from training.study.runner import RunSpec, checkpoints, load_data, train_run

from .conftest import ROOT, SAMPLE_DIR

FIGURES = {
    "paper_accuracy.png",
    "paper_sigmoid_input.png",
    "lr_sweep.png",
    "lr_curves.png",
    "dropout.png",
}

SPREAD = {"type": "object", "required": ["mean", "min", "max", "n"]}
RUN = {
    "type": "object",
    "required": ["spec", "history", "diverged", "train_seconds", "steps_done"],
    "properties": {
        "spec": {"type": "object", "required": ["arch", "batch_norm", "lr", "seed", "steps"]},
        "diverged": {"type": "boolean"},
        "history": {
            "type": "array",
            "minItems": 2,
            "items": {
                "type": "object",
                "required": ["step", "seconds"],
                "properties": {
                    "step": {"type": "integer", "minimum": 0},
                    "seconds": {"type": "number", "minimum": 0},
                },
            },
        },
    },
}
SCHEMA = {
    "type": "object",
    "required": ["schema", "meta", "config", "experiments"],
    "properties": {
        "schema": {"const": 1},
        "meta": {
            "type": "object",
            "required": ["command", "date", "machine", "seeds", "data", "seconds"],
            "properties": {
                "seeds": {"type": "array", "minItems": 2, "items": {"type": "integer"}},
                "machine": {"type": "object", "required": ["cpu", "cores", "mxnet"]},
                "seconds": {"type": "object", "required": ["paper", "lr", "dropout", "total"]},
            },
        },
        "experiments": {
            "type": "object",
            "required": ["paper", "lr", "dropout"],
            "properties": {
                "paper": {
                    "type": "object",
                    "required": ["runs", "summary"],
                    "properties": {
                        "runs": {"type": "array", "minItems": 4, "items": RUN},
                        "summary": {
                            "type": "object",
                            "required": ["bn", "plain", "bn_match_speedup"],
                            "properties": {
                                "bn": {
                                    "type": "object",
                                    "properties": {"final_test_accuracy": SPREAD},
                                }
                            },
                        },
                    },
                },
                "lr": {
                    "type": "object",
                    "required": ["runs", "summary"],
                    "properties": {
                        "runs": {"type": "array", "items": RUN},
                        "summary": {
                            "type": "object",
                            "required": ["mlp", "cnn"],
                            "additionalProperties": {
                                "type": "object",
                                "required": [
                                    "cells",
                                    "best_lr",
                                    "speedup_at_best",
                                    "speedup_at_equal_lr",
                                    "largest_stable_lr",
                                ],
                            },
                        },
                    },
                },
                "dropout": {
                    "type": "object",
                    "required": ["runs", "summary"],
                    "properties": {
                        "runs": {"type": "array", "minItems": 8, "items": RUN},
                        "summary": {"type": "object", "required": ["configs", "effects"]},
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, float]:
    """The CI smoke run, as a user types it, on the committed sample."""
    out = tmp_path_factory.mktemp("study")
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::RuntimeWarning",
            "-m",
            "training.study",
            "--quick",
            "--data-dir",
            str(SAMPLE_DIR),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    return out, elapsed


def test_quick_results_are_well_formed(quick):
    out, elapsed = quick
    results = json.loads((out / "results.json").read_text())
    jsonschema.validate(results, SCHEMA)
    assert results["meta"]["preset"] == "quick"
    assert results["meta"]["seconds"]["total"] < 60
    assert elapsed < 120  # with interpreter start-up, on a shared machine
    for exp in results["experiments"].values():
        for run in exp["runs"]:
            steps = [row["step"] for row in run["history"]]
            assert steps == sorted(steps) and steps[0] == 0
            accs = [v for row in run["history"] for k, v in row.items() if k.endswith("accuracy")]
            assert all(0.0 <= a <= 1.0 for a in accs)
    paper_runs = results["experiments"]["paper"]["runs"]
    assert all("sigmoid_input_p50" in run["history"][-1] for run in paper_runs)
    assert all(run["drift"]["median_shift"]["all_units"] >= 0 for run in paper_runs)


def test_quick_figures_are_valid_pngs(quick):
    out, _ = quick
    found = {p.name for p in (out / "figures").glob("*.png")}
    assert found == FIGURES
    for name in FIGURES:
        path = out / "figures" / name
        assert path.stat().st_size > 5000
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) >= 300


def test_quick_report_links_figures_and_names_the_run(quick):
    out, _ = quick
    text = (out / "bn-study.md").read_text()
    results = json.loads((out / "results.json").read_text())
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {Path(link).name for link in links} == FIGURES
    assert all(not Path(link).is_absolute() and (out / link).is_file() for link in links)
    assert results["meta"]["command"] in text and results["meta"]["date"] in text
    assert "Seeds: 1, 2" in text
    assert text.count("**") >= 12  # six verdicts, in bold
    assert "None" not in text and not re.search(r"\bnan\b", text.lower())


def test_from_results_redraws_the_same_report(quick, tmp_path):
    out, _ = quick
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.study",
            "--from-results",
            str(out / "results.json"),
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "bn-study.md").read_text() == (out / "bn-study.md").read_text()
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} == FIGURES


def test_published_report_links_resolve():
    """docs/bn-study.md, when published, links figures that are committed beside it."""
    doc = ROOT / "docs" / "bn-study.md"
    if not doc.exists():
        pytest.skip("the study has not been published yet")
    text = doc.read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert not link.startswith(("/", "http")), link
        assert (doc.parent / link).is_file(), link
    results = json.loads((ROOT / "docs" / "img" / "bn-study" / "results.json").read_text())
    jsonschema.validate(results, SCHEMA)
    assert results["meta"]["preset"] == "full"
    assert (
        report.render(
            results, "img/bn-study", sorted(FIGURES), "../notebooks/batch_normalization.ipynb"
        )
        == text
    )


def test_checkpoints_cover_the_run():
    steps = checkpoints(50_000)
    assert steps[0] == 0 and steps[-1] == 50_000 and steps == sorted(set(steps))
    assert 10 in steps and len(steps) < 60
    assert checkpoints(5) == sorted(set(checkpoints(5))) and checkpoints(5)[-1] == 5


def test_drift_measures_a_moving_median():
    steps = list(range(0, 100, 10))
    still = [np.array([[-1.0] * 3, [0.0] * 3, [1.0] * 3]) for _ in steps]
    moving = [p + s / 10 for p, s in zip(still, steps, strict=True)]
    assert paper.drift(steps, still, 0, 0)["median_shift"]["all_units"] == 0
    moved = paper.drift(steps, moving, 0, 0)
    assert moved["median_shift"]["unit"] == pytest.approx(4.5)  # 9 over a spread of 2
    assert moved["width_ratio"]["all_units"] == pytest.approx(1.0)
    assert paper.drift(steps, moving, 50, 0)["from_step"] == 50


def test_speedup_bounds():
    fast, slow = {"mean": 100.0}, {"mean": 500.0}
    assert _ratio(slow, fast, 1000) == {"value": 5.0, "bound": "="}
    assert _ratio(None, fast, 1000) == {"value": 10.0, "bound": ">"}  # plain never got there
    assert _ratio(slow, None, 1000) == {"value": 0.5, "bound": "<"}  # BN never got there
    assert _ratio(None, None, 1000) is None
    assert fmt.ratio({"value": 10.0, "bound": ">"}) == "≥ 10.0x"


def test_divergence_is_detected_and_stops_the_run():
    data = load_data(SAMPLE_DIR, limit_test=100)
    spec = RunSpec(
        "mlp", batch_norm=False, dropout=0.0, lr=1000.0, seed=1, steps=200, batch_size=50
    )
    record, _ = train_run(spec, data, {"test": data.test}, final={"test": data.test})
    assert record["diverged"] and record["steps_done"] < 200
    json.dumps(record, allow_nan=False)  # no NaN leaks into results.json


def test_presets_are_complete():
    for name in ("full", "quick", "small", "smoke"):
        cfg = config.preset(name)
        assert {s.arch for s in cfg.lr.sweeps} == {"mlp", "cnn"}
    full = config.preset("full")
    assert full.paper.steps == 50_000 and full.paper.batch_size == 60
    assert full.paper.hidden == (100, 100, 100) and full.paper.activation == "sigmoid"
    assert min(full.lr.sweeps[0].lrs) <= 0.01 and max(full.lr.sweeps[0].lrs) >= 1.0
    assert len(full.seeds) >= 2


def test_committed_notebook_matches_its_generator():
    nbformat = pytest.importorskip("nbformat")
    committed = nbformat.read(str(notebook.PATH), as_version=4)
    assert [c.source for c in committed.cells] == [c.source for c in notebook.build().cells]
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.outputs for c in code), "commit the notebook with the outputs of a real run"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


def test_notebook_runs_at_smoke_size():
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    nb = nbformat.read(str(notebook.PATH), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    notebook.execute(nb, "smoke", timeout=300)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    pngs = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 5
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "size 'smoke'" in text
    assert "image alone vs in a batch of 8" in text
