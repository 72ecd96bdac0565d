"""Load a server with PNG posts on new connections and say what became of each request:
answered (with its status), never received (connect() failed or timed out), or received
and lost (connected, then reset or closed without an answer). Python's standard library
only (scripts/container-e2e.sh runs it with the host's python3).

    python3 scripts/drain_probe.py --url http://127.0.0.1:8000 --png-dir DIR \\
        --concurrency 16 --seconds 10 --until-refused

Prints one JSON line. --until-refused: stop 1 s after the first refused connection
(the server being stopped), instead of at --seconds.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import socket
import threading
import time
from collections import Counter
from urllib.parse import urlparse


def request(address: tuple[str, int], body: bytes, timeout: float) -> str:
    try:
        sock = socket.create_connection(address, timeout=2)
    except OSError:
        return "not received"
    try:
        sock.settimeout(timeout)
        head = (
            f"POST /predict HTTP/1.1\r\nHost: {address[0]}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        if not answer.startswith(b"HTTP/1."):
            return "lost"
        return f"HTTP {answer.split()[1].decode()}"
    except OSError:
        return "lost"
    finally:
        sock.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--png-dir", required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--until-refused", action="store_true")
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    url = urlparse(args.url)
    if url.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit("this probe loads 127.0.0.1 only")
    address = ("127.0.0.1", url.port or 80)
    bodies = [f.read_bytes() for f in sorted(pathlib.Path(args.png_dir).glob("*.png"))]
    if not bodies:
        raise SystemExit(f"no PNGs in {args.png_dir}")
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds
    refused_at: list[float] = []

    def client(k: int) -> None:
        i = k
        while time.monotonic() < deadline:
            if refused_at and time.monotonic() > refused_at[0] + 1:
                return
            outcome = request(address, bodies[i % len(bodies)], args.timeout)
            i += args.concurrency
            with lock:
                counts[outcome] += 1
                if outcome == "not received" and args.until_refused and not refused_at:
                    refused_at.append(time.monotonic())
            if outcome == "not received":
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(dict(counts), sort_keys=True))


if __name__ == "__main__":
    main()
