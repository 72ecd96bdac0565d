"""Start-up time and worker memory of `make run`'s server, from a cold start.

    .venv/bin/python -m benchmarks.startup_memory [--requests 2000] [--output FILE]

Starts gunicorn with service/gunicorn.conf.py on a free 127.0.0.1 port, times the
launch until every worker serves the model (per-pid metrics), posts ``--requests``
MNIST test digits one at a time, then prints each worker's resident memory (VmRSS)
and stops the server by its process group. --output also writes the figures as JSON
(benchmarks/results/startup_memory.json is the committed one: from a quiet machine).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import results
from training.data import load_split

ROOT = Path(__file__).resolve().parent.parent


def served_pids(url: str) -> set[str]:
    try:
        text = requests.get(f"{url}/metrics", timeout=5).text
    except requests.RequestException:
        return set()
    return {
        s.labels["pid"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "digitserve_model_version"
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--output", type=Path, help="also write the figures here as JSON")
    args = p.parse_args()
    meta = results.run_meta("benchmarks.startup_memory")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DIGITSERVE_BIND": f"127.0.0.1:{port}",
        "DIGITSERVE_WORKERS": str(args.workers),
        "DIGITSERVE_ACCESS_LOG": "",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py"]
    started = time.monotonic()
    proc = subprocess.Popen(
        [*cmd, "service.app:create_app()"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while len(served_pids(url)) < args.workers:
            if proc.poll() is not None or time.monotonic() - started > 120:
                raise SystemExit("the server did not start")
            time.sleep(0.02)
        ready = time.monotonic() - started
        digits = load_split("test", None).images[: args.requests]
        session = requests.Session()
        for digit in digits:
            buf = io.BytesIO()
            Image.fromarray(digit).save(buf, "PNG")
            session.post(
                f"{url}/predict", data=buf.getvalue(), headers={"Content-Type": "image/png"}
            ).raise_for_status()
        pids = [int(p) for p in subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()]
        rss = {pid: rss_mb(pid) for pid in pids}
        print(f"start-up to every worker ready: {ready:.2f} s ({args.workers} workers)")
        for pid, mb in rss.items():
            print(f"worker {pid}: {mb:.0f} MB resident after {len(digits)} requests")
        if args.output:
            figures = {"workers": args.workers, "requests": len(digits), "ready_seconds": ready}
            results.write(args.output, {"meta": meta, **figures, "rss_mb": list(rss.values())})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    main()
