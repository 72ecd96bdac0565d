"""Soak: 2 minutes at concurrency 32 (wrk, kept-alive connections, real digit PNGs).
0 errors; each worker's RSS grows less than 10%; the p99 of the last 20 s is within 20%
of the first 20 s. The run is wrk in back-to-back windows, each its own latency figure,
with the workers' RSS read between them."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import scaled
from .harness import WrkRun, rss_kib, run_wrk, write_bodies, wrk_binary

pytestmark = pytest.mark.reliability


def test_soak_at_concurrency_32(served, pngs, tmp_path: Path, figure):
    if wrk_binary() is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    window = scaled(20, 10)
    windows = int(scaled(6, 3))
    bodies = write_bodies(tmp_path / "bodies", pngs)
    # Warm-up, not counted: the first forward passes, allocator growth, the OS caches.
    run_wrk(served.url, bodies, seconds=scaled(10, 5), connections=32)
    workers = sorted(served.worker_pids())
    assert len(workers) == 2
    rss_start = {pid: rss_kib(pid) for pid in workers}
    runs: list[WrkRun] = []
    for _ in range(windows):
        runs.append(run_wrk(served.url, bodies, seconds=window, connections=32))
    rss_end = {pid: rss_kib(pid) for pid in workers}
    assert sorted(served.worker_pids()) == workers, "a worker was restarted during the soak"

    total = sum(r.requests for r in runs)
    errors = {k: sum(r.errors[k] for r in runs) for k in runs[0].errors}
    growth = {pid: rss_end[pid] / rss_start[pid] - 1 for pid in workers}
    first, last = runs[0].latency_ms["p99"], runs[-1].latency_ms["p99"]
    figure(
        "soak",
        f"{windows * window:g} s at concurrency 32: {total} requests "
        f"({total / sum(r.seconds for r in runs):.0f}/s), errors {errors}; worker RSS "
        + ", ".join(
            f"{rss_start[p] / 1024:.0f} -> {rss_end[p] / 1024:.0f} MiB ({growth[p]:+.1%})"
            for p in workers
        )
        + f"; p99 first {window:g} s {first:.1f} ms, last {last:.1f} ms ({last / first - 1:+.1%}); "
        + "p99 by window "
        + ", ".join(f"{r.latency_ms['p99']:.1f}" for r in runs)
        + " ms",
        requests=total,
        errors=errors,
        rss_kib={"start": rss_start, "end": rss_end},
        p99_ms=[r.latency_ms["p99"] for r in runs],
        rates=[r.rate for r in runs],
    )
    assert sum(errors.values()) == 0, errors
    assert max(growth.values()) < 0.10, growth
    # "Within 20%": the end is not more than 20% slower than the start (a faster end is a
    # start slowed by something else on the machine, not a degradation).
    assert last <= 1.2 * first, (first, last)
