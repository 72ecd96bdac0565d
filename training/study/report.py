"""docs/bn-study.md from results.json: every number in it comes from the run.

About 430 lines, most of them the report's own prose: one section per claim, in order.
"""

from __future__ import annotations

import os
from pathlib import Path

from training.data import REPO_ROOT
from training.study import verdicts as v
from training.study.fmt import pct, pts, ratio, spread_int, spread_pct, spread_sec
from training.study.runner import CHANCE, STUCK_AFTER

NOTEBOOK = REPO_ROOT / "notebooks" / "batch_normalization.ipynb"
PAPER = (
    "Ioffe & Szegedy, *Batch Normalization: Accelerating Deep Network Training by "
    "Reducing Internal Covariate Shift*, ICML 2015 ([arXiv:1502.03167]"
    "(https://arxiv.org/abs/1502.03167))"
)


def header(results: dict) -> list[str]:
    m = results["meta"]
    mc, d = m["machine"], m["data"]
    minutes = m["seconds"]["total"] / 60
    per = ", ".join(f"{k} {s / 60:.1f} min" for k, s in m["seconds"].items() if k != "total")
    load = mc.get("load_average_at_start")
    return [
        "# Batch Normalization, measured: the lab's claims and the paper's MNIST experiment",
        "",
        "> Generated from the run's `results.json` by `python -m training.study`; do not "
        "edit by hand (rerun, or redraw with `--from-results`).",
        ">",
        f"> - Command: `{m['command']}` (size `{m['preset']}`)",
        f"> - Date: {m['date']}" + (f", commit `{m['git_commit']}`" if m["git_commit"] else ""),
        f"> - Machine: {mc['cpu']}, {mc['cores']} cores, {mc['system']}; Python "
        f"{mc['python']}, MXNet {mc['mxnet']}, NumPy {mc['numpy']}"
        + (f"; load average {load:.1f} at the start (the machine is shared)" if load else ""),
        f"> - Seeds: {', '.join(map(str, m['seeds']))} (every configuration runs once per "
        "seed; lines are seed means, bands and ranges span the seeds)",
        f"> - Data: {d['train_images']:,} training and {d['test_images']:,} test images from "
        f"`{Path(d['folder']).name}` (verified with {d['verified_with']}), normalized with the "
        f"training set's pixel mean {d['mean']:.4f} and std {d['std']:.4f}",
        f"> - Time: {minutes:.1f} min wall clock"
        + (f" with {m['jobs']} parallel jobs" if m.get("jobs", 1) > 1 else "")
        + f" (per experiment, summed over its runs: {per})",
        "",
        "The lab this product comes from teaches that normalizing the hidden layers "
        "(1) speeds up training, possibly tenfold, (2) allows higher learning rates because "
        "activations stay in range, (3) reduces the shift of hidden-layer distributions during "
        "training, and (4) regularizes a little, but should be used together with Dropout, not "
        "instead of it. This report measures each claim, and repeats the MNIST experiment of "
        f"{PAPER}, with this project's own nets (`training/model.py`) and data code "
        "(`training/data.py`).",
        "",
    ]


def verdict_table(results: dict) -> list[str]:
    rows = [
        ("1. BN speeds up training, possibly tenfold", v.claim_speed(results)),
        ("2. BN allows higher learning rates (activations stay in range)", v.claim_lr(results)),
        ("3. BN reduces the shift of hidden-layer distributions", v.claim_shift(results)),
        ("4. BN regularizes a little; use it with Dropout, not instead", v.claim_dropout(results)),
        ("Paper, Fig. 1(a): the BN net reaches higher test accuracy sooner", v.paper_a(results)),
        (
            "Paper, Fig. 1(b, c): sigmoid inputs stable with BN, drifting without",
            v.paper_bc(results),
        ),
    ]
    out = ["## Verdicts", "", "| Claim | Verdict | Measured |", "| --- | --- | --- |"]
    out += [f"| {claim} | **{verdict}** | {evidence} |" for claim, (verdict, evidence) in rows]
    out += [
        "",
        "How the verdicts are reached (the rules are code, in `training/study/verdicts.py`):",
        "",
        f"- Claim 1 holds at ≥ {v.TENFOLD:g}x fewer steps to the highest accuracy threshold "
        f"that the BN net reaches, each net at its own best learning rate; ≥ "
        f'{v.CLEARLY_FASTER:g}x is "faster, not tenfold".',
        "- Claim 2 holds when, for each net, BN trains at a higher rate than the net without "
        "BN, and reaches the threshold fastest at a higher rate. A net has trained at a rate "
        "when every seed reached the threshold of claim 1 (the highest one a run of that net "
        "reached, with or without BN); not diverging is not enough.",
        "- Claim 3 (and Fig. 1(b, c)) holds when, both over the whole run and after its first "
        f"{results['config']['paper']['drift_from']:.0%}, the median of the BN net's sigmoid "
        f"inputs moves at least {v.SHIFT_FACTOR:g}x less, or their spread changes by a "
        f'{v.SHIFT_FACTOR:g}x smaller factor; "partly: early in training" when only the '
        "whole run shows it.",
        "- Claim 4 holds when BN alone narrows the train-test gap, by less than Dropout alone "
        "does, and Dropout on top of BN narrows it further without costing test accuracy.",
        "- Fig. 1(a) reproduces when the BN net is ahead at ≥ 75% of the checkpoints, matches "
        "the plain net's final accuracy before the end, and ends at least as high.",
        '- "Partly" means some but not all of a claim\'s conditions hold.',
        "",
    ]
    return out


def _img(rel: str, name: str, alt: str, names: list[str]) -> list[str]:
    return [f"![{alt}]({rel}/{name})", ""] if name in names else []


def paper_section(results: dict, rel: str, names: list[str]) -> list[str]:
    exp = results["experiments"].get("paper")
    if exp is None:
        return []
    c = results["config"]["paper"]
    s = exp["summary"]
    verdict_a, _ = v.paper_a(results)
    verdict_bc, _ = v.paper_bc(results)
    out = [
        "## Experiment 1: the BN paper's Figure 1",
        "",
        f"**Setup** (paper, section 4.1): MNIST, {len(c['hidden'])} fully connected hidden "
        f"layers of {', '.join(map(str, c['hidden']))} sigmoid units, weights from a Gaussian "
        f"N(0, {c['init_sigma']:g}²) and zero biases, softmax cross-entropy, mini-batches of "
        f"{c['batch_size']}, {c['steps']:,} steps, without and with BatchNorm before each "
        f"hidden sigmoid (`build_net('mlp', batch_norm=..., dropout=0, hidden=..., "
        f"activation='sigmoid')`). The paper gives no optimizer settings; here: plain SGD, "
        f"learning rate {c['lr']:g}, momentum {c['momentum']:g}, no weight decay, the same for "
        "both nets. The paper feeds binary images; here the pixels are normalized as in the "
        "rest of the project. Test accuracy is on "
        + (
            "the whole test set"
            if c["eval_images"] is None
            else f"a fixed random subset of {c['eval_images']:,} test images"
        )
        + f" at {len(exp['runs'][0]['history'])} checkpoints; the final accuracy on the "
        "whole test set.",
        "",
        "**The paper reports** that the batch-normalized network reaches higher test accuracy "
        "sooner (Fig. 1a), and that for a typical sigmoid of the last hidden layer the "
        "distribution of its input (15th, 50th, 85th percentiles) changes significantly over "
        "training without BN, in mean and variance, while with BN it stays much more stable "
        "(Fig. 1b, c).",
        "",
        f"**Here (a): {verdict_a}.** The BN net was ahead at "
        f"{s['bn_ahead_fraction']['mean']:.0%} of the checkpoints (mean over seeds); its final "
        f"test accuracy {spread_pct(s['bn']['final_test_accuracy'])} against "
        f"{spread_pct(s['plain']['final_test_accuracy'])} without BN.",
    ]
    matched = [m for m in s["bn_matches_plain_final"] if m["bn_step"]]
    if matched:
        out[-1] += (
            " It matched the plain net's final accuracy ("
            + ", ".join(
                f"{pct(m['plain_final'])} at step {m['bn_step']:,}, seed {m['seed']}"
                for m in matched
            )
            + f") out of {c['steps']:,} steps."
        )
    out += ["", *_img(rel, "paper_accuracy.png", "Test accuracy during training", names)]
    d0 = exp["runs"][0].get("drift", {})
    out += [
        f"**Here (b, c): {verdict_bc}.** The plot follows unit {c['unit']} of the last hidden "
        f"layer over a fixed batch of {c['probe_images']:,} test images; for the BN net the "
        "input to the sigmoid is the BatchNorm output computed with that batch's statistics "
        "(the training network, N_BN^tr, as in the paper). The table measures how much the "
        "distribution moves: the range of its median over the checkpoints, in units of its "
        "mean 15-85 spread, and the largest over the smallest 15-85 spread; over the whole run "
        "for the plotted sigmoid, and from step "
        f"{d0.get('from_step', 0):,} on (after the first {c['drift_from']:.0%} of training) also "
        f"for all {c['hidden'][-1]} sigmoids of the layer (their median), to check that the "
        "plotted one is typical.",
        "",
        *_img(rel, "paper_sigmoid_input.png", "Sigmoid input percentiles", names),
        "| | without BN | with BN |",
        "| --- | --- | --- |",
        f"| whole run, plotted sigmoid: median's movement, in spreads | "
        f"{_f(s['plain']['unit_whole']['median_shift'])} | "
        f"{_f(s['bn']['unit_whole']['median_shift'])} |",
        f"| whole run, plotted sigmoid: largest / smallest spread | "
        f"{_f(s['plain']['unit_whole']['width_ratio'])} | "
        f"{_f(s['bn']['unit_whole']['width_ratio'])} |",
        f"| from step {d0.get('from_step', 0):,}, plotted sigmoid: median's movement | "
        f"{_f(s['plain']['median_shift_unit'])} | {_f(s['bn']['median_shift_unit'])} |",
        f"| from step {d0.get('from_step', 0):,}, {c['hidden'][-1]} sigmoids: median's movement | "
        f"{_f(s['plain']['median_shift'])} | {_f(s['bn']['median_shift'])} |",
        f"| from step {d0.get('from_step', 0):,}, {c['hidden'][-1]} sigmoids: largest / smallest "
        "spread | "
        f"{_f(s['plain']['width_ratio'])} | {_f(s['bn']['width_ratio'])} |",
        f"| training speed, steps/s | {_f(s['plain']['steps_per_second'], 0)} | "
        f"{_f(s['bn']['steps_per_second'], 0)} |",
        "",
    ]
    return out


def _f(s: dict, digits: int = 2) -> str:
    if s["mean"] is None:
        return "–"
    if s["n"] > 1:
        return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"
    return f"{s['mean']:.{digits}f}"


def lr_section(results: dict, rel: str, names: list[str]) -> list[str]:
    exp = results["experiments"].get("lr")
    if exp is None:
        return []
    c = results["config"]["lr"]
    spec = exp["runs"][0]["spec"]
    ts = [f"{t:g}" for t in c["thresholds"]]
    sweeps = {s["arch"]: s for s in c["sweeps"]}
    setup = "; ".join(
        f"{a.upper()}: {s['steps']:,} steps at batch {s['batch_size']}, rates "
        f"{', '.join(f'{x:g}' for x in s['lrs'])}, test accuracy at checkpoints on "
        + (
            "the whole test set"
            if s["eval_images"] is None
            else f"a fixed random {s['eval_images']:,}-image subset"
        )
        for a, s in sweeps.items()
    )
    out = [
        "## Experiment 2: learning rates",
        "",
        "**Setup**: the project's nets as built by `build_net` (BatchNorm before each hidden "
        f"activation, {spec['activation']}, Dropout {spec['dropout']:g} in the dense part) "
        "with and without BatchNorm, SGD with "
        f"momentum {c['momentum']:g}, weight decay {c['weight_decay']:g}, a constant learning "
        "rate, He initialization as in `training/train.py`, no augmentation. "
        f"{setup}. Final accuracy is on the whole test set. Steps and seconds to a threshold "
        "are those of the first checkpoint at or above it (training time only, evaluation "
        "excluded); a run diverges when its loss, weights or outputs stop being finite, or "
        f"when its test accuracy is below {CHANCE:.0%} at the end or still after "
        f"{STUCK_AFTER:.0%} of its steps (where it is stopped). Steps are the mean over the "
        "seeds that all reached the threshold, with their range; "
        '"> N" means some seed did not reach it within N steps.',
        "",
        *_img(rel, "lr_sweep.png", "Steps to accuracy and final accuracy by learning rate", names),
        *_img(rel, "lr_curves.png", "Test accuracy curves by learning rate", names),
    ]
    for arch, s in exp["summary"].items():
        out += [
            f"### {arch.upper()}",
            "",
            "| lr | BatchNorm | "
            + " | ".join(f"steps to {float(t):.0%}" for t in ts)
            + " | "
            + " | ".join(f"seconds to {float(t):.0%}" for t in ts)
            + " | final test accuracy | diverged |",
            "| --- | --- | " + "--- | " * (2 * len(ts)) + "--- | --- |",
        ]
        for cell in s["cells"]:
            out.append(
                f"| {cell['lr']:g} | {'yes' if cell['batch_norm'] else 'no'} | "
                + " | ".join(spread_int(cell["steps_to"][t], s["steps"]) for t in ts)
                + " | "
                + " | ".join(spread_sec(cell["seconds_to"][t]) for t in ts)
                + " | "
                + spread_pct(cell["final_accuracy"])
                + " | "
                + (f"{cell['diverged']}/{cell['runs']}" if cell["diverged"] else "no")
                + " |"
            )
        out.append("")
        for t in ts:
            b = s["best_lr"][t]
            at = s["speedup_at_best"][t]
            eq = ", ".join(
                f"{ratio(r)} at lr {lr}"
                for lr, r in s["speedup_at_equal_lr"][t].items()
                if r is not None
            )
            if b["bn"] is None and b["plain"] is None:
                out.append(f"- To {float(t):.0%}: no run reached it within {s['steps']:,} steps.")
                continue
            out.append(
                f"- To {float(t):.0%}: best rate {_lr(b['bn'])} with BN, {_lr(b['plain'])} "
                f"without; BN speed-up at each net's best rate {ratio(at['steps'])} in steps"
                + (f", {ratio(at['seconds'])} in seconds" if at["seconds"] else "")
                + (f"; at equal rates: {eq}" if eq else "")
                + "."
            )
        bf = s["best_final"]
        t = v.speed_threshold(results, s)
        out += [
            f"- Largest rate at which every seed reached {float(t):.0%}: "
            f"{_lr(v.largest_trained_lr(s, t, True))} with BN, "
            f"{_lr(v.largest_trained_lr(s, t, False))} without.",
            f"- Largest rate without divergence: {_lr(s['largest_stable_lr']['bn'])} with BN, "
            f"{_lr(s['largest_stable_lr']['plain'])} without. Best final accuracy: "
            + (
                f"{spread_pct(bf['bn']['accuracy'])} at lr {bf['bn']['lr']:g} with BN"
                if bf["bn"]
                else "none with BN"
            )
            + ", "
            + (
                f"{spread_pct(bf['plain']['accuracy'])} at lr {bf['plain']['lr']:g} without"
                if bf["plain"]
                else "none without"
            )
            + ".",
            "",
        ]
    return out


def _net(run: dict) -> str:
    units = " and ".join(map(str, run["dense_units"][:-1]))
    return f"hidden layers of {units} {run['spec']['activation']} units"


def _lr(x) -> str:
    return "none" if x is None else f"{x:g}"


def dropout_section(results: dict, rel: str, names: list[str]) -> list[str]:
    exp = results["experiments"].get("dropout")
    if exp is None:
        return []
    c = results["config"]["dropout"]
    s = exp["summary"]
    verdict, _ = v.claim_dropout(results)
    out = [
        "## Experiment 3: BatchNorm and Dropout",
        "",
        f"**Setup**: the project's MLP (`build_net('mlp')`: {_net(exp['runs'][0])}) in a 2x2 of "
        f"BatchNorm on/off and Dropout {c['dropout']:g} on/off, {c['steps']:,} steps at batch "
        f"{c['batch_size']}, SGD learning rate {c['lr']:g}, momentum {c['momentum']:g}, weight "
        f"decay {c['weight_decay']:g}, no augmentation: nothing else regularizes. Train "
        f"accuracy is measured like test accuracy (inference mode) on a fixed random subset of "
        f"{exp['train_eval_images']:,} training images, so the gap is the generalization gap; "
        "test accuracy on "
        + (
            "the whole test set."
            if c["eval_images"] is None
            else f"a fixed {c['eval_images']:,}-image subset at checkpoints, "
            "the whole set at the end."
        ),
        "",
        *_img(rel, "dropout.png", "Train and test accuracy and their gap", names),
        "| configuration | train accuracy | test accuracy | gap (train - test) |",
        "| --- | --- | --- | --- |",
    ]
    for name, cfg in s["configs"].items():
        out.append(
            f"| {name} | {spread_pct(cfg['train_accuracy'])} | "
            f"{spread_pct(cfg['test_accuracy'])} | {spread_pct(cfg['gap'])} |"
        )
    e = s["effects"]
    out += [
        "",
        f"**Verdict on claim 4: {verdict}.** Effect on the gap and on test accuracy "
        "(differences of seed means):",
        "",
        f"- BatchNorm alone: gap {pts(e['bn_alone']['gap'])}, test accuracy "
        f"{pts(e['bn_alone']['test_accuracy'])}",
        f"- Dropout alone: gap {pts(e['dropout_alone']['gap'])}, test accuracy "
        f"{pts(e['dropout_alone']['test_accuracy'])}",
        f"- Dropout on top of BatchNorm: gap {pts(e['dropout_on_top_of_bn']['gap'])}, test "
        f"accuracy {pts(e['dropout_on_top_of_bn']['test_accuracy'])}",
        f"- BatchNorm on top of Dropout: gap {pts(e['bn_on_top_of_dropout']['gap'])}, test "
        f"accuracy {pts(e['bn_on_top_of_dropout']['test_accuracy'])}",
        f"- Best test accuracy: {s['best_test']}; smallest gap: {s['smallest_gap']}.",
        "",
    ]
    cf = s["configs"]
    twin = {"dropout": "neither", "bn+dropout": "bn"}  # the same net without Dropout
    acc = {k: cf[k]["train_accuracy"]["mean"] for k in cf}
    test = {k: cf[k]["test_accuracy"]["mean"] for k in cf}
    under = [
        k
        for k, t in twin.items()
        if None not in (acc[k], acc[t], test[k], test[t])
        and acc[t] - acc[k] > max(0.0, test[t] - test[k])
    ]
    if under:
        pairs = ", ".join(
            f"{pct(acc[k])} for {k} against {pct(acc[twin[k]])} for {twin[k]}" for k in under
        )
        out += [
            f"With Dropout the nets fit the training set less by the end of the run (train "
            f"accuracy {pairs}): after {c['steps']:,} steps, Dropout has narrowed the gap by "
            "lowering train accuracy more than test accuracy. Whether it pays off in test "
            "accuracy with longer training is not measured here.",
            "",
        ]
    return out
    return out


def notes(results: dict, notebook: str | None) -> list[str]:
    m = results["meta"]
    return [
        "## Limits",
        "",
        f"- {len(m['seeds'])} seeds per configuration: enough to show the spread, too few for "
        "significance tests; differences inside the seed range are noise.",
        "- Accuracy thresholds are checked only at the checkpoints, so steps-to-threshold are "
        "upper bounds at the checkpoints' resolution (log-spaced early, evenly spaced later).",
        f"- Seconds are wall-clock training time on a shared {m['machine']['cores']}-core "
        "machine; they compare runs "
        "of this study with each other, not with other machines.",
        "- The paper's large speed-ups are its Inception results on ImageNet, where BN came "
        "with higher learning rates and other changes alongside; on MNIST, with nets this "
        "small, there is less room for any speed-up.",
        "",
        "## Reproduce",
        "",
        "```",
        f"{m['command']}   # this report ({m['seconds']['total'] / 60:.0f} min here)",
        "python -m training.study --quick --out /tmp/bn      # smoke run, seconds",
        "python -m training.study --from-results docs/img/bn-study/results.json --publish",
        "```",
        "",
        "The notebook "
        + (
            f"[`notebooks/batch_normalization.ipynb`]({notebook})"
            if notebook
            else "`notebooks/batch_normalization.ipynb`"
        )
        + " walks through the same three experiments at a small size.",
        "",
    ]


def render(results: dict, rel: str, names: list[str], notebook: str | None) -> str:
    lines = [
        *header(results),
        *verdict_table(results),
        *paper_section(results, rel, names),
        *lr_section(results, rel, names),
        *dropout_section(results, rel, names),
        *notes(results, notebook),
    ]
    return "\n".join(lines)


def write(results: dict, path: Path, figures: Path, names: list[str]) -> None:
    """The report at ``path``, linking the figures in ``figures`` by relative path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(figures, path.parent)).as_posix()
    inside = path.resolve().is_relative_to(REPO_ROOT)
    notebook = Path(os.path.relpath(NOTEBOOK, path.parent)).as_posix() if inside else None
    path.write_text(render(results, rel, names, notebook))
