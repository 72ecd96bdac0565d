"""Load a running server on 127.0.0.1 and print throughput and latency.

    python -m benchmarks.http_load --url http://127.0.0.1:8000 --seconds 20 --concurrency 16

Each request posts one real MNIST test digit as PNG (the way a user uploads),
from ``--concurrency`` threads, for a bounded time and count. Prints requests/s,
images/s, latency percentiles, the status counts, and the server's own
images-per-forward-pass histogram (dynamic batching) from /metrics.
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from collections import Counter
from urllib.parse import urlparse

import numpy as np
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from training.data import load_split


def png(digit: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, "PNG")
    return buf.getvalue()


def batch_histogram(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name == "digitserve_batch_images":
            for s in family.samples:
                if s.name.endswith(("_count", "_sum")):
                    out[s.name.rsplit("_", 1)[1]] = s.value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--max-requests", type=int, default=200_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("load is only sent to this machine (127.0.0.1)")
    test = load_split("test", args.data_dir)
    bodies = [png(d) for d in test.images[:1000]]
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds
    sent = iter(range(args.max_requests))
    before = batch_histogram(args.url)

    def worker(k: int) -> None:
        session = requests.Session()
        i = k
        while time.monotonic() < deadline and next(sent, None) is not None:
            t = time.perf_counter()
            r = session.post(
                f"{args.url}/predict",
                data=bodies[i % len(bodies)],
                headers={"Content-Type": "image/png"},
                timeout=60,
            )
            with lock:
                latencies.append(time.perf_counter() - t)
                statuses[r.status_code] += 1
            i += args.concurrency

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    after = batch_histogram(args.url)
    lat = np.array(latencies) * 1000
    print(
        f"{len(lat)} requests in {elapsed:.1f} s with {args.concurrency} clients: "
        f"{len(lat) / elapsed:.0f} requests/s (1 image each)"
    )
    print(
        f"latency ms: p50 {np.percentile(lat, 50):.1f}, p90 {np.percentile(lat, 90):.1f}, "
        f"p99 {np.percentile(lat, 99):.1f}, max {lat.max():.1f}"
    )
    print(f"statuses: {dict(statuses)}")
    forwards = after.get("count", 0) - before.get("count", 0)
    if forwards:
        images = after.get("sum", 0) - before.get("sum", 0)
        print(f"server: {forwards:.0f} forward passes, {images / forwards:.1f} images per pass")


if __name__ == "__main__":
    main()
