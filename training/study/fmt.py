"""Number formatting for the report: every number printed comes through here."""

from __future__ import annotations


def pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def pts(x: float | None) -> str:
    """A difference of accuracies, in percentage points."""
    return "–" if x is None else f"{100 * x:+.2f} points"


def spread_pct(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "–"
    if s["n"] > 1 and pct(s["min"]) != pct(s["max"]):
        return f"{pct(s['mean'])} ({pct(s['min'])}–{pct(s['max'])})"
    return pct(s["mean"])


def spread_int(s: dict | None, total: int | None = None) -> str:
    if not s or s.get("mean") is None:
        return f"> {total:,}" if total else "–"
    if s["n"] > 1 and s["min"] != s["max"]:
        return f"{s['mean']:,.0f} ({s['min']:,.0f}–{s['max']:,.0f})"
    return f"{s['mean']:,.0f}"


def spread_sec(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "–"
    if s["n"] > 1:
        return f"{s['mean']:.1f} s ({s['min']:.1f}–{s['max']:.1f})"
    return f"{s['mean']:.1f} s"


def ratio(r: dict | None) -> str:
    """A speed-up: '3.2x', or a bound when one net never reached the threshold."""
    if r is None:
        return "–"
    sign = {"=": "", ">": "≥ ", "<": "≤ "}[r["bound"]]
    return f"{sign}{r['value']:.1f}x"
