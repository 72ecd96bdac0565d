"""The figures behind docs/reliability.md's choices: slow-client mechanisms for gunicorn
alone, side by side, and what nginx in front costs.

    .venv/bin/python -m benchmarks.reliability_fronts \
        --output benchmarks/results/reliability_fronts.json          # about 6 minutes
    .venv/bin/python -m benchmarks.reliability_fronts --only nginx --rounds 1

candidates: each gunicorn set-up (2 workers, the shipped model) is started alone and
measured twice: the share of valid requests (4 clients, new connections, 15 s) answered
within 2 s while 64 connections stall mid-body (reopened as soon as the server closes
one), and its throughput without them (wrk, 32 connections, 1 digit PNG a request).

nginx: wrk against gunicorn directly and through deploy/nginx/nginx.conf (Debian's
nginx, 127.0.0.1), at 1 and 32 connections, in --rounds whose order flips.

Prints the Markdown tables; --output writes the JSON (with the run's command, commit,
date and load) that docs/reliability.md's tables are rendered from (benchmarks/docs.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.results import run_meta, write
from tests.reliability.clients import Stallers, digit_pngs, local_address, predict_request, run_load
from tests.reliability.harness import Nginx, load_average, run_wrk, write_bodies
from tests.support import Server, copy_shipped_store

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
    try:
        server.wait_ready()
    except BaseException:
        server.stop()  # a set-up that cannot start leaves nothing running
        raise
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
    rows = []
    try:
        proxy = Nginx(work / "nginx", server.port)
    except BaseException:
        server.stop()
        raise
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


def candidates_table(result: dict[str, Any]) -> str:
    rows = [
        "| gunicorn alone (2 workers) | valid requests within 2 s, 64 stalled | valid requests "
        "sent | stalled connections closed (and reopened) | wrk requests/s, c=32, no stalls | "
        "wrk p99 ms | load average |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result.get("candidates", []):
        rows.append(
            f"| {c['candidate']} | {c['within_2s']:.1%} | {c['valid_requests']} | "
            f"{c['stalled_reopened']} | {c['wrk_rps']:.0f} | {c['wrk_p99_ms']:.1f} | "
            f"{c['load_average']} |"
        )
    return "\n".join(rows)


def nginx_table(result: dict[str, Any]) -> str:
    rows = [
        "| round | connections | gunicorn req/s | via nginx req/s | cost | gunicorn p50 / p99 "
        "ms | via nginx p50 / p99 ms | load average |",
        "|---|---|---|---|---|---|---|---|",
    ]
    points = {(x["round"], x["connections"], x["front"]): x for x in result.get("nginx", [])}
    for r, connections, front in sorted(points):
        if front != "gunicorn" or (r, connections, "nginx") not in points:
            continue
        d, n = points[(r, connections, "gunicorn")], points[(r, connections, "nginx")]

        def lat(x: dict[str, Any]) -> str:
            return f"{x['latency_ms']['p50']:.1f} / {x['latency_ms']['p99']:.1f}"

        rows.append(
            f"| {r + 1} | {connections} | {d['rps']:.0f} | {n['rps']:.0f} | "
            f"{n['rps'] / d['rps'] - 1:+.1%} | {lat(d)} | {lat(n)} | {n['load_average']} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", choices=("candidates", "nginx"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--output", type=Path, help="write the results here (JSON)")
    args = p.parse_args()
    pngs = [png for png, _ in digit_pngs(20)]
    payloads = [predict_request(png) for png in pngs]
    result: dict[str, Any] = {"meta": run_meta("benchmarks.reliability_fronts")}
    with tempfile.TemporaryDirectory(prefix="digitserve-fronts-") as tmp:
        work = Path(tmp)
        bodies = write_bodies(work / "bodies", pngs)
        if args.only in (None, "candidates"):
            result["candidates"] = candidates(work, bodies, payloads)
        if args.only in (None, "nginx"):
            result["nginx"] = nginx_cost(work, bodies, args.rounds, args.seconds)
    if args.output:
        write(args.output, result)
    print(candidates_table(result) + "\n\n" + nginx_table(result))


if __name__ == "__main__":
    main()
