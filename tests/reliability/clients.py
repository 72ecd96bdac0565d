"""Bounded HTTP clients for the reliability tests and their figures: valid requests
that time themselves, connections that stall mid-request, and a load of many threads.

Everything here talks to 127.0.0.1 only, and every loop is bounded in time and count.
Plain sockets, not requests: a test must see exactly what happened to a request (refused,
reset, timed out, or an answer with a status), and a connection that stalls must stay
the way the test left it.
"""

from __future__ import annotations

import contextlib
import io
import json
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from tests.support import ROOT
from training.data import load_split

LOCAL_HOSTS = ("127.0.0.1", "localhost")


def local_address(url: str) -> tuple[str, int]:
    parts = urlparse(url)
    if parts.hostname not in LOCAL_HOSTS or parts.port is None:
        raise ValueError(f"{url}: the reliability clients talk to 127.0.0.1:<port> only")
    return "127.0.0.1", parts.port


def digit_pngs(count: int = 20) -> list[tuple[bytes, int]]:
    """Real MNIST test digits from the committed sample, as (PNG bytes, label)."""
    test = load_split("test", ROOT / "tests" / "data" / "mnist-sample", download=False)
    out = []
    for image, label in zip(test.images[:count], test.labels[:count], strict=True):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image)).save(buf, "PNG")
        out.append((buf.getvalue(), int(label)))
    return out


def predict_request(body: bytes, *, close: bool = True, host: str = "127.0.0.1") -> bytes:
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode() + body


@dataclass
class Outcome:
    """What happened to one request."""

    kind: str  # "answer", or the failure: refused, reset, timeout, closed, error
    status: int | None = None
    seconds: float = 0.0
    # time.monotonic() when the kernel accepted the connection (connect() returned)
    connected_at: float | None = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def connected(self) -> bool:
        return self.connected_at is not None

    @property
    def ok(self) -> bool:
        return self.kind == "answer" and self.status == 200

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def version(self) -> int | None:
        """The model version a /predict answer names."""
        if not self.ok:
            return None
        return int(self.json()["model"]["version"])


def read_response(sock: socket.socket, deadline: float) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (interim 1xx skipped), by Content-Length or to EOF."""
    buf = b""

    def more() -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer in time")
        sock.settimeout(remaining)
        return sock.recv(65536)

    while True:
        while b"\r\n\r\n" not in buf:
            chunk = more()
            if not chunk:
                raise ConnectionAbortedError("closed before an answer" if not buf else "cut")
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            continue
        length = headers.get("content-length")
        if length is not None:
            while len(buf) < int(length):
                chunk = more()
                if not chunk:
                    raise ConnectionAbortedError("body cut short")
                buf += chunk
            return status, headers, buf[: int(length)]
        while chunk := more():
            buf += chunk
        return status, headers, buf


def send(
    address: tuple[str, int],
    payload: bytes,
    timeout: float = 10.0,
    *,
    sock: socket.socket | None = None,
) -> Outcome:
    """Send one request on a new connection (or ``sock``) and classify what happened."""
    started = time.monotonic()
    deadline = started + timeout
    own = sock is None
    connected_at = None if own else started
    try:
        if own:
            sock = socket.create_connection(address, timeout=timeout)
            connected_at = time.monotonic()
        assert sock is not None
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        sock.sendall(payload)
        status, headers, body = read_response(sock, deadline)
        return Outcome("answer", status, time.monotonic() - started, connected_at, body, headers)
    except ConnectionRefusedError:
        kind = "refused"
    except (ConnectionResetError, BrokenPipeError):
        kind = "reset"
    except TimeoutError:
        kind = "timeout"
    except ConnectionAbortedError:
        kind = "closed"
    except OSError:
        kind = "error"
    finally:
        if own and sock is not None:
            sock.close()
    return Outcome(kind, None, time.monotonic() - started, connected_at)


class Stallers:
    """``count`` connections that send their headers and part of a body, then stall.

    A connection the server closes is opened again at once (``reopen``), so that
    ``count`` stay open for as long as this runs; ``closed_by_server`` counts those.
    One thread, a selector, bounded by ``stop()`` or ``max_seconds``.
    """

    def __init__(
        self,
        address: tuple[str, int],
        count: int = 64,
        *,
        body_sent: int = 100,
        body_declared: int = 5000,
        headers_only: bool = False,
        reopen: bool = True,
        max_seconds: float = 300.0,
    ):
        self.address, self.count, self.reopen = address, count, reopen
        head = (
            "POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {body_declared}\r\n"
        )
        # headers_only: the headers never end (a slow-header client).
        self.payload = (
            head.encode() if headers_only else (head + "\r\n").encode() + bytes(body_sent)
        )
        self.max_seconds = max_seconds
        self.closed_by_server = 0
        self.answers: Counter[int] = Counter()  # status of whatever the server sent first
        self.open_failures = 0
        self.open_now = 0
        self.lifetimes: list[float] = []  # seconds from open to the server's close
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stallers", daemon=True)
        self._ready = threading.Event()

    def __enter__(self) -> Stallers:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _open(self, sel: selectors.BaseSelector) -> None:
        try:
            sock = socket.create_connection(self.address, timeout=5)
            sock.sendall(self.payload)
        except OSError:
            self.open_failures += 1
            return
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, time.monotonic())
        self.open_now += 1

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        deadline = time.monotonic() + self.max_seconds
        try:
            for _ in range(self.count):
                self._open(sel)
            self._ready.set()
            while not self._stop.is_set() and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=0.1):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if data.startswith(b"HTTP/1."):
                        with contextlib.suppress(ValueError, IndexError):
                            self.answers[int(data.split()[1])] += 1
                    if data and not self.reopen:
                        continue
                    sel.unregister(sock)
                    sock.close()
                    self.open_now -= 1
                    self.closed_by_server += 1
                    self.lifetimes.append(time.monotonic() - key.data)
                    if self.reopen:
                        self._open(sel)
                if self.reopen:
                    for _ in range(self.count - self.open_now):
                        self._open(sel)
        finally:
            self._ready.set()
            for key in list(sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            sel.close()


@dataclass
class LoadResult:
    outcomes: list[tuple[float, Outcome]]  # (start, outcome), start on time.monotonic()
    seconds: float

    @property
    def count(self) -> int:
        return len(self.outcomes)

    def failures(self) -> list[tuple[float, Outcome]]:
        return [(t, o) for t, o in self.outcomes if not o.ok]

    def kinds(self) -> dict[str, int]:
        return dict(
            Counter(o.kind if o.kind != "answer" else f"HTTP {o.status}" for _, o in self.outcomes)
        )

    def within(self, seconds: float) -> float:
        """Share of the requests answered 200 within ``seconds``."""
        if not self.outcomes:
            return 0.0
        good = sum(1 for _, o in self.outcomes if o.ok and o.seconds <= seconds)
        return good / len(self.outcomes)

    def latencies(self, start: float = -np.inf, end: float = np.inf) -> np.ndarray:
        return np.array([o.seconds for t, o in self.outcomes if o.ok and start <= t < end])


def run_load(
    address: tuple[str, int],
    payloads: list[bytes],
    *,
    concurrency: int,
    seconds: float,
    max_requests: int = 1_000_000,
    timeout: float = 10.0,
    keepalive: bool = False,
    stop: threading.Event | None = None,
    on_outcome: Callable[[float, Outcome], None] | None = None,
) -> LoadResult:
    """``concurrency`` threads, each sending requests back to back (a new connection
    each unless ``keepalive``), until ``seconds`` pass, ``max_requests`` are sent or
    ``stop`` is set."""
    outcomes: list[tuple[float, Outcome]] = []
    lock = threading.Lock()
    tickets: Iterator[int] = iter(range(max_requests))
    deadline = time.monotonic() + seconds
    stop = stop or threading.Event()

    def worker(k: int) -> None:
        sock: socket.socket | None = None
        i = k
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if next(tickets, None) is None:
                    return
            payload = payloads[i % len(payloads)]
            i += concurrency
            started = time.monotonic()
            if keepalive:
                if sock is None:
                    try:
                        sock = socket.create_connection(address, timeout=timeout)
                    except OSError as exc:
                        kind = "refused" if isinstance(exc, ConnectionRefusedError) else "error"
                        outcome = Outcome(kind, None, time.monotonic() - started)
                        sock = None
                    else:
                        outcome = send(address, payload, timeout, sock=sock)
                else:
                    outcome = send(address, payload, timeout, sock=sock)
                if sock is not None and (
                    not outcome.ok or outcome.headers.get("connection", "").lower() == "close"
                ):
                    sock.close()
                    sock = None
            else:
                outcome = send(address, payload, timeout)
            with lock:
                outcomes.append((started, outcome))
            if on_outcome is not None:
                on_outcome(started, outcome)
            if outcome.kind in ("refused", "error"):
                time.sleep(0.01)  # no busy loop against a port that is gone
        if sock is not None:
            sock.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 30)
    return LoadResult(sorted(outcomes, key=lambda x: x[0]), time.monotonic() - t0)


class BackgroundLoad:
    """``run_load`` in a thread for the length of a ``with`` block (``max_seconds`` at the
    most); ``result`` once the block has ended."""

    def __init__(
        self,
        address: tuple[str, int],
        payloads: list[bytes],
        *,
        concurrency: int,
        max_seconds: float = 120.0,
        timeout: float = 30.0,
        keepalive: bool = False,
    ):
        self._stop = threading.Event()
        self._results: list[LoadResult] = []
        self._thread = threading.Thread(
            target=lambda: self._results.append(
                run_load(
                    address,
                    payloads,
                    concurrency=concurrency,
                    seconds=max_seconds,
                    timeout=timeout,
                    keepalive=keepalive,
                    stop=self._stop,
                )
            ),
            daemon=True,
        )

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)

    @property
    def result(self) -> LoadResult:
        if not self._results:
            raise RuntimeError("the load has not ended (or its thread failed)")
        return self._results[0]
