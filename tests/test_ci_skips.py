"""The CI rule: a test that skips locally (no MNIST folder, no Chromium) fails under CI=true."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SKIPPING = """
import pytest

def test_needs_the_mnist_folder():
    pytest.skip("full MNIST not found in /nowhere")

@pytest.fixture
def page():
    pytest.skip("no chromium on this machine")

def test_needs_a_browser(page):
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False
"""


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_a_skip_is_a_failure(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(SKIPPING)
    result = pytester.runpytest_inprocess("-p", "tests.ci_skips")
    result.assert_outcomes(failed=1, errors=1, xfailed=1)  # the fixture's skip: at setup
    result.stdout.fnmatch_lines(
        [
            "*skipped under CI=true, where nothing may be skipped: Skipped: full MNIST not found*",
            "*skipped under CI=true, where nothing may be skipped: Skipped: no chromium*",
        ]
    )


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_elsewhere_a_skip_stays_a_skip(pytester, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makepyfile(SKIPPING)
    result = pytester.runpytest_inprocess("-p", "tests.ci_skips")
    result.assert_outcomes(skipped=2, xfailed=1)
