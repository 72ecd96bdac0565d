"""The figures behind docs/reliability.md's choices: slow-client mechanisms for gunicorn
alone, side by side, and what nginx in front costs.

    .venv/bin/python -m benchmarks.reliability_fronts                 # about 6 minutes
    .venv/bin/python -m benchmarks.reliability_fronts --only nginx --rounds 1

candidates: each gunicorn set-up (2 workers, the shipped model) is started alone and
measured twice: the share of valid requests (4 clients, new connections, 15 s) answered
within 2 s while 64 connections stall mid-body (reopened as soon as the server closes
one), and its throughput without them (wrk, 32 connections, 1 digit PNG a request).

nginx: wrk against gunicorn directly and through deploy/nginx/nginx.conf (Debian's
nginx, 127.0.0.1), at 1 and 32 connections, in --rounds whose order flips.

Writes reliability_fronts.json and .md to --out; prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.reliability.clients import Stallers, digit_pngs, local_address, predict_request, run_load
from tests.reliability.harness import Nginx, load_average, run_wrk, write_bodies
from tests.support import ROOT, Server, copy_shipped_store

CANDIDATES: dict[str, str] = {
    "gthread, 8 threads (before)": "-k gthread",
    "gthread, 128 threads": "-k gthread --threads 128",
    "gthread, 2 s read timeout": "-k benchmarks.read_timeout_worker.ReadTimeoutWorker",
    "buffered in the event loop (digitserve's worker)": "",
}


def start(store: Path, logs: Path, gunicorn_args: str = "") -> Server:
    env = {"DIGITSERVE_STORE": str(store), "LOG_DIR": str(logs)}
    if gunicorn_args:
        env["GUNICORN_CMD_ARGS"] = gunicorn_args
    server = Server(env, workers=2)
    server.wait_ready()
    return server


def candidates(work: Path, bodies: Path, payloads: list[bytes]) -> list[dict[str, Any]]:
    rows = []
    for name, args in CANDIDATES.items():
        store = copy_shipped_store(work / f"store-{len(rows)}")
        server = start(store, work, args)
        try:
            time.sleep(2)
            with Stallers(local_address(server.url), 64) as stallers:
                time.sleep(0.5)
                probe = run_load(
                    local_address(server.url), payloads, concurrency=4, seconds=15, timeout=10
                )
                reopened = stallers.closed_by_server
            time.sleep(1)
            wrk = run_wrk(server.url, bodies, seconds=10, connections=32)
        finally:
            server.stop()
        rows.append(
            {
                "candidate": name,
                "gunicorn_args": args or "(service/gunicorn.conf.py as it is)",
                "within_2s": probe.within(2.0),
                "valid_requests": probe.count,
                "outcomes": probe.kinds(),
                "stalled_reopened": reopened,
                "wrk_rps": wrk.rate,
                "wrk_p99_ms": wrk.latency_ms["p99"],
                "wrk_errors": wrk.error_count,
                "load_average": load_average(),
            }
        )
        print(rows[-1], flush=True)
    return rows


def nginx_cost(work: Path, bodies: Path, rounds: int, seconds: float) -> list[dict[str, Any]]:
    store = copy_shipped_store(work / "store-nginx")
    server = start(store, work)
    proxy = Nginx(work / "nginx", server.port)
    rows = []
    try:
        run_wrk(server.url, bodies, seconds=3, connections=32)  # warm-up
        for r in range(rounds):
            order = [("gunicorn", server.url), ("nginx", proxy.url)]
            if r % 2:
                order.reverse()
            for connections in (1, 32):
                for front, url in order:
                    run = run_wrk(url, bodies, seconds=seconds, connections=connections)
                    rows.append(
                        {
                            "round": r,
                            "front": front,
                            "connections": connections,
                            "rps": run.rate,
                            "latency_ms": run.latency_ms,
                            "errors": run.error_count,
                            "load_average": load_average(),
                        }
                    )
                    print(rows[-1], flush=True)
    finally:
        proxy.stop()
        server.stop()
    return rows


def markdown(result: dict[str, Any]) -> str:
    out = []
    if result.get("candidates"):
        out += [
            "| gunicorn alone | valid requests within 2 s, 64 stalled | requests | "
            "stalled closed & reopened | wrk req/s (c=32) | wrk p99 ms | load average |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in result["candidates"]:
            out.append(
                f"| {c['candidate']} | {c['within_2s']:.1%} | {c['valid_requests']} | "
                f"{c['stalled_reopened']} | {c['wrk_rps']:.0f} | {c['wrk_p99_ms']:.1f} | "
                f"{c['load_average']} |"
            )
        out.append("")
    if result.get("nginx"):
        out += [
            "| connections | gunicorn req/s | via nginx req/s | cost | gunicorn p50/p99 ms | "
            "via nginx p50/p99 ms |",
            "|---|---|---|---|---|---|",
        ]
        for connections in (1, 32):

            def pick(front: str, c: int = connections) -> list[dict[str, Any]]:
                return [x for x in result["nginx"] if x["front"] == front and x["connections"] == c]

            direct, proxied = pick("gunicorn"), pick("nginx")
            if not direct or not proxied:
                continue
            d_rps = sum(x["rps"] for x in direct) / len(direct)
            p_rps = sum(x["rps"] for x in proxied) / len(proxied)

            def lat(rows: list[dict[str, Any]]) -> str:
                p50 = sum(x["latency_ms"]["p50"] for x in rows) / len(rows)
                p99 = sum(x["latency_ms"]["p99"] for x in rows) / len(rows)
                return f"{p50:.1f} / {p99:.1f}"

            out.append(
                f"| {connections} | {d_rps:.0f} | {p_rps:.0f} | {p_rps / d_rps - 1:+.1%} | "
                f"{lat(direct)} | {lat(proxied)} |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", choices=("candidates", "nginx"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    pngs = [png for png, _ in digit_pngs(20)]
    payloads = [predict_request(png) for png in pngs]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result: dict[str, Any] = {
        "commit": commit,
        "cpus": os.cpu_count(),
        "started_load": load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="digitserve-fronts-") as tmp:
        work = Path(tmp)
        bodies = write_bodies(work / "bodies", pngs)
        if args.only in (None, "candidates"):
            result["candidates"] = candidates(work, bodies, payloads)
        if args.only in (None, "nginx"):
            result["nginx"] = nginx_cost(work, bodies, args.rounds, args.seconds)
    result["finished_load"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.only is None else f"-{args.only}"
    (args.out / f"reliability_fronts{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / f"reliability_fronts{suffix}.md").write_text(
        f"commit {commit}, load average {result['started_load']} -> {result['finished_load']}\n\n"
        + table
    )
    print(table)


if __name__ == "__main__":
    main()
