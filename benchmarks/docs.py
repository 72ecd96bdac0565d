"""The docs' figures, rendered from the benchmarks' committed outputs.

    python -m benchmarks.docs            # rewrite the generated blocks of docs/*.md
    python -m benchmarks.docs --check    # exit 1 if a block differs from its outputs

A generated block sits between ``<!-- figures: NAME ... -->`` and ``<!-- /figures -->``
in a Markdown file; NAME picks its renderer below, which reads only JSON written by a
benchmark's --output into benchmarks/results/ (each with its command, commit and date).
To refresh a figure, rerun the command that the block names, then this.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator

from benchmarks import compare_mms, reliability_fronts
from benchmarks.results import REPO, load

DOCS = (
    REPO / "docs" / "figures.md",
    REPO / "docs" / "performance.md",
    REPO / "docs" / "reliability.md",
)
BLOCK = re.compile(r"(<!-- figures: (\S+)[^\n]*-->\n)(.*?)(<!-- /figures -->)", re.DOTALL)
COMMANDS = {
    "model_figures": "python -m benchmarks.model_figures --output "
    "benchmarks/results/model_figures.json",
    "realworld_accuracy": "python -m benchmarks.realworld_accuracy --output "
    "benchmarks/results/realworld_accuracy.json",
    "compare_mms": "python -m benchmarks.compare_mms --out benchmarks/results",
    "startup_memory": "python -m benchmarks.startup_memory --output "
    "benchmarks/results/startup_memory.json",
    "reliability": "python -m benchmarks.reliability --output benchmarks/results/reliability.json",
    "reliability_fronts": "python -m benchmarks.reliability_fronts --output "
    "benchmarks/results/reliability_fronts.json",
}


def source(name: str, results: dict) -> str:
    """Where a figure comes from: the output file, its commit and date."""
    m = results["meta"]
    dirty = " (dirty)" if m["dirty"] else ""
    return f"`benchmarks/results/{name}.json`: commit {m['commit']}{dirty}, {m['date'][:10]}"


def missing(name: str) -> str:
    return f"no committed output yet: run `{COMMANDS[name]}`"


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def figures_table() -> str:
    rows = ["| what | figure | from |", "|---|---|---|"]
    mf = load("model_figures")
    if mf is None:
        rows.append(f"| shipped model | {missing('model_figures')} | |")
    else:
        ex, man = mf["exported"], mf["manifest"]
        t, recorded = man["training"], man["metrics"]["test_accuracy"]
        agree = "agree" if round(ex["test_accuracy"], 4) == round(recorded, 4) else "DIFFER"
        epoch = next((h["epoch"] for h in man["history"] if h["test_accuracy"] >= 0.99), None)
        to_99 = (
            f"99% test accuracy after {t['seconds_to_99']:.0f} s (epoch {epoch})"
            if epoch
            else "99% test accuracy not reached"
        )
        load_before = mf["meta"]["loadavg_before"][0]
        src = source("model_figures", mf)
        rows += [
            f"| {mf['model']['name']} v{mf['model']['version']}, MNIST test accuracy | "
            f"{ex['test_accuracy']:.2%} on {ex['test_images']:,} digits (manifest "
            f"{recorded:.2%}: they {agree}) | {src} |",
            f"| its training (`{t['command']}`, {len(man['history'])} epochs, {t['machine']}) "
            f"| {t['seconds']:.0f} s, {t['seconds_per_epoch']:.0f} s/epoch, {to_99} | same |",
            "| export round trip (trained net vs `SymbolBlock.imports`) | max abs difference "
            f"{man['metrics']['export_max_abs_diff']:g} | same |",
            f"| offline inference, batches of 1,000 | {ex['images_per_second']:,.0f} images/s "
            f"(load average {load_before:g} before the run) | same |",
        ]
    rows.append(
        "| the MNIST test set posted through HTTP | same answers as offline | "
        "`pytest tests/test_http.py -k mnist_through_http` |"
    )
    rw = load("realworld_accuracy")
    if rw is None:
        rows.append(f"| uploads that are not MNIST files | {missing('realworld_accuracy')} | |")
    else:
        acc = {r["name"]: r["accuracy"] for r in rw["uploads"]}
        files = [a for name, a in acc.items() if name.startswith("file ")]
        canvas = [a for name, a in acc.items() if name.startswith("canvas")]
        base = f"{rw['mnist_accuracy']:.2%}"
        rows += [
            f"| phone photos of digits on paper (JPEG) / canvas PNG exports | "
            f"{acc['phone photo (JPEG)']:.2%} / {_range(canvas, '.2%')}, against {base} on the "
            f"same {rw['digits']:,} MNIST digits | {source('realworld_accuracy', rw)} |",
            f"| every upload format ({len(files)}: PNG 8/16-bit, palette, alpha, GIF, BMP, WebP, "
            f"TIFF, JPEG incl. CMYK and EXIF-rotated) | {_range(files, '.2%')} | same |",
        ]
    cm = load("compare_mms")
    if cm is None:
        rows.append(f"| HTTP throughput against MMS 1.1.11 | {missing('compare_mms')} | |")
    else:
        rows.append(
            "| HTTP throughput against MMS 1.1.11 on the same model, one image per request, "
            f"wrk | {throughput(cm)}; details in [docs/performance.md](performance.md) | "
            f"{source('compare_mms', cm)} |"
        )
    return "\n".join(rows)


def _per_concurrency(cm: dict) -> Iterator[tuple[int, float, list[tuple[dict, dict]]]]:
    """(concurrency, median ratio, (digitserve, MMS) figures of each round that has both)."""
    for row in cm["summary"]:
        c = row["concurrency"]
        pts = [[r.get(s, {}).get(str(c)) for s in ("digitserve", "mms")] for r in cm["rounds"]]
        both = [(d, m) for d, m in pts if d and m]
        if both:
            yield c, row["ratio_median"], both


def throughput(cm: dict) -> str:
    """Per concurrency: digitserve's and MMS's req/s over the rounds, and the ratios."""
    return "; ".join(
        f"concurrency {c}: {_range([d['rps'] for d, _ in both], ',.0f')} requests/s against "
        f"MMS's {_range([m['rps'] for _, m in both], ',.0f')} "
        f"({_range([d['rps'] / m['rps'] for d, m in both], '.2f')}x, median {median:.2f}x)"
        for c, median, both in _per_concurrency(cm)
    )


def _ratios(both: list[tuple[dict, dict]]) -> str:
    return ", ".join(f"{d['rps'] / m['rps']:.2f}" for d, m in both)


def compare_mms_run() -> str:
    cm = load("compare_mms")
    return missing("compare_mms") if cm is None else compare_mms.report(cm).rstrip("\n")


def compare_mms_verdict() -> str:
    cm = load("compare_mms")
    if cm is None:
        return missing("compare_mms")
    return "\n".join(
        f"- concurrency {c}: digitserve answered more requests in "
        f"{sum(d['rps'] > m['rps'] for d, m in both)} of {len(both)} rounds and had the lower "
        f"p99 in {sum(d['latency_ms']['p99'] < m['latency_ms']['p99'] for d, m in both)}; "
        f"ratios {_ratios(both)}, median {median:.2f}x"
        for c, median, both in _per_concurrency(cm)
    )


def real_uploads() -> str:
    cm = load("compare_mms")
    alone = (cm or {}).get("digitserve_alone", {})
    if not all(k in alone and alone[k].get("server_latency_ms") for k in ("canvas", "photo")):
        return missing("compare_mms")
    canvas, photo = alone["canvas"]["server_latency_ms"], alone["photo"]["server_latency_ms"]
    return (
        "From the same run, digitserve alone at concurrency 1, the server's own `latency_ms`: "
        f"a 280x280 canvas PNG {canvas['p50']:.2f} ms median (p90 {canvas['p90']:.2f}), a "
        f"~{cm['meta']['bodies']['photo']['mean_megapixels']:g} MP phone JPEG "
        f"{photo['p50']:.2f} ms (p90 {photo['p90']:.2f}). Against the goals of 4 ms for the "
        f"canvas and 8 ms for the photo: canvas {_goal(canvas['p50'], 4)}, photo "
        f"{_goal(photo['p50'], 8)}."
    )


def _goal(ms: float, goal: float) -> str:
    return "under it" if ms < goal else "misses it"


def startup_memory() -> str:
    sm = load("startup_memory")
    if sm is None:
        return f"Start-up and memory: {missing('startup_memory')} (on a quiet machine)."
    return (
        f"Start-up and memory (`{COMMANDS['startup_memory']}`): {sm['ready_seconds']:.2f} s "
        f"from launch until all {sm['workers']} workers serve; {_range(sm['rss_mb'], '.0f')} "
        f"MB resident per worker after {sm['requests']:,} requests "
        f"({source('startup_memory', sm)})."
    )


# docs/reliability.md: the reliability tests' figures, each with the load average.
RELIABILITY_ROWS = {
    "stalled-mid-body-gunicorn": "slow clients, gunicorn alone (`make run`), mid-body",
    "stalled-mid-head-gunicorn": "slow clients, gunicorn alone, mid-head",
    "stalled-mid-body-nginx": "slow clients, behind nginx, mid-body",
    "stalled-mid-head-nginx": "slow clients, behind nginx, mid-head",
    "stalled-mid-body-closed-gunicorn": "stalled connections closed, gunicorn (3 s timeouts)",
    "stalled-mid-head-closed-gunicorn": "the same, mid-head",
    "stalled-mid-body-closed-nginx": "stalled connections closed, nginx (3 s timeouts)",
    "stalled-mid-head-closed-nginx": "the same, mid-head",
    "nginx-keepalive": "nginx keeps its connections to gunicorn alive",
    "soak": "soak",
    "sigkill-worker": "SIGKILL of a worker under load",
    "sigterm-burst": "SIGTERM drain, a burst in the backlog",
    "sigterm-steady": "SIGTERM drain under steady load",
    "publish-under-load": "a new version published under load",
    "broken-versions": "broken versions published under load",
    "store-full": "the store on a full disk",
    "store-read-only": "the store read-only",
}
_TMP = re.compile(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ]+/")


def reliability() -> str:
    rel = load("reliability")
    if rel is None:
        return missing("reliability")
    figures = {f["name"]: f for f in rel["figures"]}
    status = "passed" if rel["pytest_exit_status"] == 0 else "FAILED"
    rows = [
        f"From {source('reliability', rel)} ({status}; `make reliability`, "
        f"{rel['meta']['nproc']} cores):",
        "",
        "| what | figure | load average |",
        "|---|---|---|",
    ]
    for name, what in RELIABILITY_ROWS.items():
        f = figures.get(name)
        text = _TMP.sub(".../", f["text"]) if f else "not in this run"
        rows.append(f"| {what} | {text} | {f['load_average'] if f else ''} |")
    return "\n".join(rows)


def _fronts(part: str) -> str:
    fronts = load("reliability_fronts")
    if fronts is None or part not in fronts:
        return missing("reliability_fronts")
    table = (
        reliability_fronts.candidates_table
        if part == "candidates"
        else reliability_fronts.nginx_table
    )(fronts)
    return f"{table}\n\nFrom {source('reliability_fronts', fronts)}."


BLOCKS: dict[str, Callable[[], str]] = {
    "table": figures_table,
    "compare-mms": compare_mms_run,
    "compare-mms-verdict": compare_mms_verdict,
    "real-uploads": real_uploads,
    "startup-memory": startup_memory,
    "reliability": reliability,
    "reliability-candidates": lambda: _fronts("candidates"),
    "reliability-nginx": lambda: _fronts("nginx"),
}


def render(text: str) -> str:
    """``text`` with each generated block rendered anew from the outputs."""

    def block(m: re.Match) -> str:
        if m.group(2) not in BLOCKS:
            raise KeyError(f"no renderer for the figures block {m.group(2)!r}")
        return f"{m.group(1)}{BLOCKS[m.group(2)]()}\n{m.group(4)}"

    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = p.parse_args(argv)
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path.relative_to(REPO))
            if not args.check:
                path.write_text(new)
    verb = "stale" if args.check else "rewritten"
    print(f"{verb}: {', '.join(map(str, stale))}" if stale else "up to date", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
