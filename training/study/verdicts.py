"""The lab's claims judged against the measurements: each rule reads only
results.json and returns (verdict, evidence). The thresholds of the rules are
stated in the report, so a reader can disagree with them.
"""

from __future__ import annotations

from training.study.fmt import pct, pts, ratio, spread_pct

TENFOLD = 10.0
CLEARLY_FASTER = 1.5  # a speed-up below this is "about the same"
SHIFT_FACTOR = 2.0  # "much more stable": drift at most half


def top_threshold(results: dict) -> list[str]:
    return [f"{t:g}" for t in sorted(results["config"]["lr"]["thresholds"], reverse=True)]


def _best_speedups(results: dict) -> list[tuple[str, str, dict]]:
    """(arch, threshold, ratio) at each net's best learning rate: the highest
    threshold that the BN net reached at some rate."""
    out = []
    for arch, s in results["experiments"]["lr"]["summary"].items():
        t = speed_threshold(results, s)
        r = s["speedup_at_best"][t]["steps"]
        if r is not None:
            out.append((arch, t, r))
    return out


def claim_speed(results: dict) -> tuple[str, str]:
    exps = results["experiments"]
    if "lr" not in exps:
        return "not measured", "experiment 2 was not run"
    found = _best_speedups(results)
    if not found:
        return "not measured", "no net reached the accuracy thresholds within its steps"
    parts = [
        "at each net's own best learning rate: "
        + ", ".join(
            f"{arch.upper()} {ratio(r)} fewer steps to {float(t):.0%}" for arch, t, r in found
        )
    ]
    values = [r["value"] for _, _, r in found]
    lower = [r["bound"] == ">" for _, _, r in found]
    if all(v >= TENFOLD for v in values):
        verdict = "holds"
    elif all(v >= CLEARLY_FASTER or low for v, low in zip(values, lower, strict=True)):
        verdict = "partly: faster, not tenfold" if max(values) < TENFOLD else "partly"
    elif max(values) < CLEARLY_FASTER and not any(lower):
        verdict = "does not hold"
    else:
        verdict = "partly"
    if "paper" in exps:
        m = exps["paper"]["summary"]["bn_match_speedup"]
        if m["mean"] is not None:
            parts.append(
                f"paper net: the BN net matched the plain net's final accuracy "
                f"{ratio({'value': m['mean'], 'bound': '='})} sooner"
            )
    return verdict, "; ".join(parts)


def speed_threshold(results: dict, summary: dict) -> str:
    """The threshold claim 1 judges a net at: the highest one that a run of it reached,
    with or without BN."""
    tops = top_threshold(results)
    return next(
        (t for t in tops if any(summary["best_lr"][t][k] is not None for k in ("bn", "plain"))),
        tops[0],
    )


def largest_trained_lr(summary: dict, threshold: str, batch_norm: bool) -> float | None:
    """The largest rate at which the net trained: every seed reached ``threshold``. Not
    diverging is not enough: an MLP run at lr 1 that stayed finite ended at 30%."""
    trained = [
        c["lr"]
        for c in summary["cells"]
        if c["batch_norm"] == batch_norm and c["steps_to"][threshold] is not None
    ]
    return max(trained) if trained else None


def claim_lr(results: dict) -> tuple[str, str]:
    exps = results["experiments"]
    if "lr" not in exps:
        return "not measured", "experiment 2 was not run"
    checks, parts = [], []
    for arch, s in exps["lr"]["summary"].items():
        t = speed_threshold(results, s)
        trained = {k: largest_trained_lr(s, t, k == "bn") for k in ("bn", "plain")}
        best, stable = s["best_lr"][t], s["largest_stable_lr"]
        higher = trained["bn"] is not None and trained["bn"] > (trained["plain"] or 0)
        uses = best["bn"] is not None and best["bn"] > (best["plain"] or 0)
        checks += [higher, uses]
        lrs = sorted({c["lr"] for c in s["cells"]})
        parts.append(
            f"{arch.upper()} (rates {', '.join(map(_lr, lrs))}): largest rate at which every "
            f"seed reached {float(t):.0%}: {_lr(trained['bn'])} with BN, "
            f"{_lr(trained['plain'])} without (largest without diverging: {_lr(stable['bn'])} "
            f"and {_lr(stable['plain'])}); fastest to {float(t):.0%}: {_at(best['bn'])} with "
            f"BN, {_at(best['plain'])} without"
        )
    verdict = "holds" if all(checks) else "partly" if any(checks) else "does not hold"
    return verdict, "; ".join(parts) + ' (for "activations stay in range", see claim 3)'


def _lr(value) -> str:
    return "none" if value is None else f"{value:g}"


def _at(value) -> str:
    return "not reached" if value is None else f"lr {value:g}"


def _stabler(s: dict, shift: str, width: str) -> tuple[bool, str]:
    """Is the BN net's distribution at least SHIFT_FACTOR x stabler, in median or spread?"""
    sp, sb = s["plain"][shift]["mean"], s["bn"][shift]["mean"]
    wp, wb = s["plain"][width]["mean"], s["bn"][width]["mean"]
    ok = sp >= SHIFT_FACTOR * sb or wp >= SHIFT_FACTOR * wb
    text = (
        f"the 15-85 spread changed by a factor {wp:.2f} without BN vs {wb:.2f} with, the "
        f"median moved {sp:.2f} vs {sb:.2f} spreads"
    )
    return ok, text


def claim_shift(results: dict) -> tuple[str, str]:
    exp = results["experiments"].get("paper")
    if exp is None:
        return "not measured", "experiment 1 was not run"
    s = exp["summary"]
    if s["plain"]["median_shift"]["mean"] is None or s["bn"]["median_shift"]["mean"] is None:
        return "not measured", "no sigmoid-input percentiles recorded"
    whole = {
        k: {
            "median_shift": s[k]["unit_whole"]["median_shift"],
            "width_ratio": s[k]["unit_whole"]["width_ratio"],
        }
        for k in ("plain", "bn")
    }
    early, early_text = _stabler(whole, "median_shift", "width_ratio")
    late, late_text = _stabler(s, "median_shift", "width_ratio")
    verdict = (
        "holds"
        if early and late
        else "partly: early in training"
        if early
        else "partly: late in training"
        if late
        else "does not hold"
    )
    start = exp["runs"][0]["drift"]["from_step"]
    units = results["config"]["paper"]["hidden"][-1]
    return verdict, (
        f"over the whole run, for the tracked sigmoid: {early_text}; from step {start:,} on, "
        f"for all {units} sigmoids of the layer (median): {late_text} (means over seeds)"
    )


def _clear(c: dict, a: str, b: str, what: str) -> bool:
    """Is the difference a-b larger than the seed spread of either side?"""
    x, y = c[a][what], c[b][what]
    if x["mean"] is None or y["mean"] is None:
        return False
    noise = max(x["max"] - x["min"], y["max"] - y["min"])
    return abs(x["mean"] - y["mean"]) > noise


def claim_dropout(results: dict) -> tuple[str, str]:
    exp = results["experiments"].get("dropout")
    if exp is None:
        return "not measured", "experiment 3 was not run"
    s, c = exp["summary"], exp["summary"]["configs"]
    e = s["effects"]
    if any(v["gap"] is None for v in e.values()):
        return "not measured", "a configuration diverged"
    bn_gap, dr_gap = e["bn_alone"]["gap"], e["dropout_alone"]["gap"]
    on_top = e["dropout_on_top_of_bn"]
    regularizes = bn_gap < 0
    little = regularizes and abs(bn_gap) < abs(dr_gap)  # "a little" only if at all
    together = on_top["gap"] < 0 and on_top["test_accuracy"] >= 0
    checks = [regularizes, little, together]
    verdict = "holds" if all(checks) else "partly" if any(checks) else "does not hold"

    def tag(a, b):
        return "" if _clear(c, a, b, "gap") else " (within the seed spread)"

    evidence = (
        f"train-test gap: {spread_pct(c['neither']['gap'])} with neither; BN alone changes it "
        f"by {pts(bn_gap)}{tag('bn', 'neither')}, Dropout alone by {pts(dr_gap)}"
        f"{tag('dropout', 'neither')}; Dropout on top of BN by {pts(on_top['gap'])}"
        f"{tag('bn+dropout', 'bn')} and test accuracy by {pts(on_top['test_accuracy'])}; "
        f"best test accuracy: {s['best_test']} ({pct(c[s['best_test']]['test_accuracy']['mean'])})"
    )
    return verdict, evidence


def paper_a(results: dict) -> tuple[str, str]:
    exp = results["experiments"].get("paper")
    if exp is None:
        return "not measured", "experiment 1 was not run"
    s = exp["summary"]
    ahead, match = s["bn_ahead_fraction"]["mean"], s["bn_match_speedup"]["mean"]
    fin_bn, fin_pl = s["bn"]["final_test_accuracy"], s["plain"]["final_test_accuracy"]
    if ahead is None:
        return "not measured", "no accuracy recorded"
    if ahead >= 0.75 and (match or 0) > 1 and (fin_bn["mean"] or 0) >= (fin_pl["mean"] or 0):
        verdict = "reproduces"
    elif ahead >= 0.5:
        verdict = "partly"
    else:
        verdict = "does not reproduce"
    return verdict, (
        f"BN net ahead at {ahead:.0%} of the checkpoints; final test accuracy "
        f"{spread_pct(fin_bn)} with BN vs {spread_pct(fin_pl)} without"
    )


def paper_bc(results: dict) -> tuple[str, str]:
    """Fig. 1(b, c) is claim 3 measured on the paper's net, in the paper's words."""
    verdict, evidence = claim_shift(results)
    words = {
        "holds": "reproduces",
        "does not hold": "does not reproduce",
        "partly: early in training": "partly: early in training only",
    }
    return words.get(verdict, verdict), evidence
