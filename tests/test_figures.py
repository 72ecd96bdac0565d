"""The docs' figures are the committed outputs of the commands that measured them."""

from __future__ import annotations

import json

import pytest

from benchmarks import compare_mms, docs
from benchmarks.results import RESULTS

from .conftest import ROOT

OUTPUTS = sorted(RESULTS.glob("*.json"))


@pytest.mark.parametrize("doc", docs.DOCS, ids=lambda p: p.name)
def test_rendered_figures_match_their_outputs(doc):
    text = doc.read_text()
    assert docs.BLOCK.search(text), f"{doc.name} has no generated figures"
    assert docs.render(text) == text, f"stale: run python -m benchmarks.docs ({doc.name})"


def test_every_doc_with_benchmark_figures_is_rendered():
    named = {path for path in (ROOT / "docs").glob("*.md") if "benchmarks." in path.read_text()}
    assert named - {ROOT / "docs" / "bn-study.md"} <= set(docs.DOCS)


@pytest.mark.parametrize("output", OUTPUTS, ids=lambda p: p.name)
def test_each_output_names_its_command_commit_and_date(output):
    meta = json.loads(output.read_text())["meta"]
    assert meta["command"].split()[1:3] == ["-m", f"benchmarks.{output.stem}"]
    assert len(meta["commit"]) >= 7 and isinstance(meta["dirty"], bool)
    assert meta["date"][:2] == "20" and "T" in meta["date"]


def test_the_committed_compare_mms_report_is_its_json_rendered():
    results = json.loads((RESULTS / "compare_mms.json").read_text())
    assert compare_mms.report(results) == (RESULTS / "compare_mms.md").read_text()


def test_the_figures_table_shows_every_benchmark_it_names():
    table = (ROOT / "docs" / "figures.md").read_text()
    assert "no committed output" not in table
    for name in ("model_figures", "realworld_accuracy", "compare_mms"):
        assert f"`benchmarks/results/{name}.json`: commit" in table


def test_an_unknown_block_is_an_error():
    with pytest.raises(KeyError, match="no renderer for the figures block 'nope'"):
        docs.render("<!-- figures: nope -->\n<!-- /figures -->")
