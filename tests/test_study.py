"""The BatchNorm study: `python -m training.study --quick` end to end (results.json,
figures, report), its pieces on small inputs, and the lab notebook at its smallest size."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from training.study import config, fmt, notebook, paper, report
from training.study import verdicts as v
from training.study.dropout import summarize as dropout_summarize
from training.study.lr import _ratio, key
from training.study.lr import summarize as lr_summarize
from training.study.runner import RunSpec, checkpoints, load_data, train_run
from training.study.stats import spread

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


# --------------------------------------------------------------------------------------------
# The verdict rules, branch by branch, on synthetic results (the summaries come from the
# experiments' own summarize functions, so they have the shape a real run gives them).

SEEDS = (1, 2)


def lr_results(sweeps: dict[str, dict[tuple[float, bool], dict]], steps: int = 1000) -> dict:
    """Experiment 2 as measured: per net, (lr, batch_norm) -> steps to each threshold (the
    same for every seed; None: not reached), the final accuracy and whether it diverged."""
    cfg = config.StudyConfig(
        seeds=SEEDS,
        lr=config.LRConfig(
            sweeps=tuple(
                config.ArchSweep(arch, tuple(sorted({lr for lr, _ in cells})), steps)
                for arch, cells in sweeps.items()
            )
        ),
    )
    runs = [
        {
            "spec": {"arch": arch, "lr": lr, "batch_norm": bn, "seed": seed},
            "diverged": cell.get("diverged", False),
            "final_test_accuracy": cell.get("final", 0.985),
            "reached": {
                key(t): None if cell[t] is None else {"step": cell[t], "seconds": cell[t] / 50}
                for t in (0.97, 0.98)
            },
        }
        for arch, cells in sweeps.items()
        for (lr, bn), cell in cells.items()
        for seed in SEEDS
    ]
    return {
        "config": asdict(cfg),
        "experiments": {"lr": {"runs": runs, "summary": lr_summarize(runs, cfg)}},
    }


def reached(to_97: int | None, to_98: int | None, **rest) -> dict:
    return {0.97: to_97, 0.98: to_98, **rest}


NEVER = reached(None, None, final=0.3)  # finite to the end, far from trained
DIVERGED = reached(None, None, final=None, diverged=True)


def speed_case(bn_steps: int | None, plain_steps: int | None) -> dict[tuple[float, bool], dict]:
    """One rate; steps to 98% with and without BN."""
    return {(0.1, True): reached(bn_steps, bn_steps), (0.1, False): reached(None, plain_steps)}


@pytest.mark.parametrize(
    ("sweeps", "verdict"),
    [
        ({"mlp": speed_case(100, 1000)}, "holds"),  # 10x
        ({"mlp": speed_case(100, 1000), "cnn": speed_case(20, 400)}, "holds"),
        ({"mlp": speed_case(500, 1000)}, "partly: faster, not tenfold"),  # 2x
        ({"mlp": speed_case(500, None)}, "partly: faster, not tenfold"),  # >= 2x: plain never
        ({"mlp": speed_case(50, 1000), "cnn": speed_case(200, 400)}, "partly"),  # 20x and 2x
        ({"mlp": speed_case(500, 1000), "cnn": speed_case(400, 400)}, "partly"),  # 2x and 1x
        ({"mlp": speed_case(400, 400)}, "does not hold"),
        ({"mlp": speed_case(400, 300)}, "does not hold"),  # BN slower
        ({"mlp": speed_case(None, None)}, "not measured"),  # no run reached a threshold
    ],
)
def test_claim_speed_verdicts(sweeps, verdict):
    assert v.claim_speed(lr_results(sweeps))[0] == verdict


def test_claim_speed_judges_each_net_at_the_highest_threshold_it_reached():
    cells = {(0.1, True): reached(100, None), (0.1, False): reached(1000, None)}
    said, evidence = v.claim_speed(lr_results({"mlp": cells}))
    assert (said, evidence) == (
        "holds",
        "at each net's own best learning rate: MLP 10.0x fewer steps to 97%",
    )
    results = lr_results({"mlp": speed_case(100, 500)})
    results["experiments"]["paper"] = {"summary": {"bn_match_speedup": {"mean": 4.0}}}
    assert v.claim_speed(results)[1].endswith(
        "paper net: the BN net matched the plain net's final accuracy 4.0x sooner"
    )
    assert v.claim_speed({"experiments": {}}) == ("not measured", "experiment 2 was not run")


# Rates 0.03, 0.1 and 1 for one net: each case says which reach 98% (steps), which not.
LR_CASES = {
    "holds": {  # BN trains at 1, where the plain net diverges, and is fastest there
        (0.03, True): reached(200, 300),
        (0.1, True): reached(100, 200),
        (1.0, True): reached(50, 80),
        (0.03, False): reached(300, 500),
        (0.1, False): reached(300, 400),
        (1.0, False): DIVERGED,
    },
    # The case: BN at lr 1 stays finite but ends at 30%. Counted as trained, that
    # made the claim hold; it is not, and BN trains at no higher rate than the plain net.
    "partly": {
        (0.03, True): reached(200, 300),
        (0.1, True): reached(100, 150),
        (1.0, True): NEVER,
        (0.03, False): reached(300, 400),
        (0.1, False): reached(400, 600),
        (1.0, False): DIVERGED,
    },
    "does not hold": {
        **{(lr, bn): reached(300, 400) for lr in (0.03, 0.1) for bn in (True, False)},
        (1.0, True): NEVER,
        (1.0, False): NEVER,
    },
}


@pytest.mark.parametrize("verdict", list(LR_CASES))
def test_claim_lr_verdicts(verdict):
    assert v.claim_lr(lr_results({"mlp": LR_CASES[verdict]}))[0] == verdict


def test_claim_lr_counts_a_rate_only_where_every_seed_reached_the_threshold():
    results = lr_results({"mlp": LR_CASES["partly"]})
    summary = results["experiments"]["lr"]["summary"]["mlp"]
    assert summary["largest_stable_lr"] == {"bn": 1.0, "plain": 0.1}  # finite is not trained
    assert v.largest_trained_lr(summary, "0.98", batch_norm=True) == 0.1
    assert v.claim_lr(results)[1] == (
        "MLP (rates 0.03, 0.1, 1): largest rate at which every seed reached 98%: 0.1 with BN, "
        "0.1 without (largest without diverging: 1 and 0.1); fastest to 98%: lr 0.1 with BN, "
        'lr 0.03 without (for "activations stay in range", see claim 3)'
    )
    one_seed = lr_results({"mlp": LR_CASES["holds"]})
    run = next(
        r
        for r in one_seed["experiments"]["lr"]["runs"]
        if r["spec"]["lr"] == 1.0 and r["spec"]["batch_norm"] and r["spec"]["seed"] == 2
    )
    run["reached"]["0.98"] = None  # seed 2 did not get there at lr 1
    cfg = config.from_dict(one_seed["config"])
    summary = lr_summarize(one_seed["experiments"]["lr"]["runs"], cfg)["mlp"]
    assert v.largest_trained_lr(summary, "0.98", batch_norm=True) == 0.1
    assert v.claim_lr({"experiments": {}}) == ("not measured", "experiment 2 was not run")


def paper_results(
    *,
    early: bool = True,
    late: bool = True,
    ahead: float | None = 0.9,
    match: float | None = 2.0,
    finals: tuple[float, float] = (0.98, 0.97),
) -> dict:
    """Experiment 1's summary: BN 5x stabler over the whole run (``early``) and after its
    first part (``late``), or as drifting as the plain net."""

    def one(x: float | None) -> dict:
        return spread([x])

    def net(bn: bool) -> dict:
        whole, after = (0.2 if bn and early else 1.0), (0.2 if bn and late else 1.0)
        return {
            "median_shift": one(after),
            "width_ratio": one(1.5),
            "unit_whole": {"median_shift": one(whole), "width_ratio": one(1.5)},
            "final_test_accuracy": one(finals[0] if bn else finals[1]),
        }

    summary = {
        "bn": net(True),
        "plain": net(False),
        "bn_ahead_fraction": one(ahead),
        "bn_match_speedup": one(match),
    }
    return {
        "config": {"paper": {"hidden": [100, 100, 100]}},
        "experiments": {"paper": {"summary": summary, "runs": [{"drift": {"from_step": 500}}]}},
    }


@pytest.mark.parametrize(
    ("early", "late", "verdict", "in_the_papers_words"),
    [
        (True, True, "holds", "reproduces"),
        (True, False, "partly: early in training", "partly: early in training only"),
        (False, True, "partly: late in training", "partly: late in training"),
        (False, False, "does not hold", "does not reproduce"),
    ],
)
def test_claim_shift_and_fig_1bc_verdicts(early, late, verdict, in_the_papers_words):
    results = paper_results(early=early, late=late)
    assert v.claim_shift(results)[0] == verdict
    assert v.paper_bc(results) == (in_the_papers_words, v.claim_shift(results)[1])


def test_claim_shift_without_measurements():
    assert v.claim_shift({"experiments": {}}) == ("not measured", "experiment 1 was not run")
    results = paper_results()
    results["experiments"]["paper"]["summary"]["bn"]["median_shift"] = spread([])
    assert v.claim_shift(results) == ("not measured", "no sigmoid-input percentiles recorded")
    width = paper_results(early=False, late=False)
    for part in (
        width["experiments"]["paper"]["summary"]["plain"],
        width["experiments"]["paper"]["summary"]["plain"]["unit_whole"],
    ):
        part["width_ratio"] = spread([3.0])  # the spread, not the median, is 2x stabler
    assert v.claim_shift(width)[0] == "holds"


@pytest.mark.parametrize(
    ("kw", "verdict"),
    [
        ({}, "reproduces"),
        ({"ahead": 0.6}, "partly"),
        ({"match": None}, "partly"),  # never matched the plain net's final accuracy
        ({"finals": (0.96, 0.97)}, "partly"),  # ahead, but ends lower
        ({"ahead": 0.4}, "does not reproduce"),
        ({"ahead": None}, "not measured"),
    ],
)
def test_fig_1a_verdicts(kw, verdict):
    assert v.paper_a(paper_results(**kw))[0] == verdict


def dropout_results(gaps: dict[str, float | None], tests: dict[str, float]) -> dict:
    """Experiment 3 as measured: each configuration's train-test gap and test accuracy,
    with a seed spread of +-0.001 (None: it diverged)."""
    runs = [
        {
            "config": name,
            "diverged": gap is None,
            **(
                {}
                if gap is None
                else {
                    "final_train_accuracy": tests[name] + gap + d,
                    "final_test_accuracy": tests[name],
                    "final_gap": gap + d,
                }
            ),
        }
        for name, gap in gaps.items()
        for d in (-0.001, 0.001)
    ]
    return {"experiments": {"dropout": {"runs": runs, "summary": dropout_summarize(runs)}}}


TESTS = {"neither": 0.97, "bn": 0.975, "dropout": 0.975, "bn+dropout": 0.98}


@pytest.mark.parametrize(
    ("gaps", "tests", "verdict"),
    [
        ({"neither": 0.03, "bn": 0.025, "dropout": 0.01, "bn+dropout": 0.008}, TESTS, "holds"),
        # BN narrows the gap more than Dropout: not "a little"
        ({"neither": 0.03, "bn": 0.005, "dropout": 0.02, "bn+dropout": 0.004}, TESTS, "partly"),
        # Dropout on top of BN narrows the gap but costs test accuracy
        (
            {"neither": 0.03, "bn": 0.025, "dropout": 0.01, "bn+dropout": 0.008},
            {**TESTS, "bn+dropout": 0.97},
            "partly",
        ),
        (
            {"neither": 0.03, "bn": 0.035, "dropout": 0.01, "bn+dropout": 0.04},
            TESTS,
            "does not hold",
        ),
        (
            {"neither": 0.03, "bn": None, "dropout": 0.01, "bn+dropout": 0.008},
            TESTS,
            "not measured",
        ),
    ],
)
def test_claim_dropout_verdicts(gaps, tests, verdict):
    assert v.claim_dropout(dropout_results(gaps, tests))[0] == verdict


def test_claim_dropout_says_which_differences_are_within_the_seed_spread():
    gaps = {"neither": 0.03, "bn": 0.0295, "dropout": 0.01, "bn+dropout": 0.008}
    evidence = v.claim_dropout(dropout_results(gaps, TESTS))[1]
    assert "BN alone changes it by -0.05 points (within the seed spread)" in evidence
    assert "Dropout alone by -2.00 points;" in evidence
    assert v.claim_dropout({"experiments": {}}) == ("not measured", "experiment 3 was not run")
