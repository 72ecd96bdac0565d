"""Kills and drains under load.

- SIGKILL of one worker: the service answers again within 2 s; only requests in flight
  on that worker fail (at most one a client: each has one request outstanding), all of
  them sent before the kill; the master starts a new worker that serves.
- SIGTERM to the master: every request the kernel had accepted when the signal came
  (connect() returned) is answered, those in the listen backlog included; the server
  exits within its graceful timeout. Once as a burst of 32 requests with SIGTERM 5 ms
  later (the probe that found the backlog resets), repeated; once under steady load.
  A connection opened after the signal is answered or refused, except one whose
  handshake the kernel is still completing as the last listener closes: reset, and
  counted apart (docs/reliability.md: what a preStop delay is for).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import Server, copy_shipped_store

from .clients import Outcome, local_address, run_load, send
from .conftest import scaled

pytestmark = pytest.mark.reliability

GRACEFUL = 10  # DIGITSERVE_GRACEFUL_TIMEOUT of the servers here


def test_sigkill_of_a_worker_under_load(served, payloads, figure):
    address = local_address(served.url)
    victim = min(served.worker_pids())
    killed_at: list[float] = []
    gone_at: list[float] = []  # when the process had exited (its sockets closed)

    def kill_later() -> None:
        time.sleep(scaled(4, 3))
        killed_at.append(time.monotonic())
        os.kill(victim, signal.SIGKILL)
        gone_at.append(wait_exited(victim))

    killer = threading.Thread(target=kill_later)
    killer.start()
    result = run_load(address, payloads, concurrency=16, seconds=scaled(12, 8), timeout=10)
    killer.join()
    kill = killed_at[0]
    failures = result.failures()
    after = [(t, o) for t, o in result.outcomes if t >= kill]
    first_ok_after = min((t + o.seconds for t, o in after if o.ok), default=float("inf"))
    # The longest time without an answer completing, around the kill.
    done = sorted(t + o.seconds for t, o in result.outcomes if o.ok)
    gaps = [b - a for a, b in itertools.pairwise(done) if b > kill - 1]
    served.wait_workers(timeout=60)
    replaced = victim not in served.worker_pids() and len(served.worker_pids()) == 2
    # A request sent as the process is torn down can still reach its socket: the kernel
    # closes it only once the process is gone. Those are on that worker too.
    gone = gone_at[0]
    latest = max((t - kill for t, _ in failures), default=0.0)
    kinds = Counter(o.kind for _, o in failures)
    figure(
        "sigkill-worker",
        f"SIGKILL of 1 of 2 workers at concurrency 16: {len(failures)} of {result.count} "
        f"requests failed ({dict(kinds)}), the last sent {1000 * latest:+.0f} ms from the "
        f"kill, the process gone after {1000 * (gone - kill):.0f} ms; first answer after it "
        f"{first_ok_after - kill:.2f} s later; "
        f"longest pause between two answers {max(gaps, default=0):.2f} s; the master "
        "started a new worker that serves",
        failed=len(failures),
        requests=result.count,
        latest_failure_s=latest,
        gone_s=gone - kill,
        failure_offsets_ms=[round(1000 * (t - kill), 1) for t, _ in failures],
        failure_ends_ms=[round(1000 * (t + o.seconds - kill), 1) for t, o in failures],
        recovery_s=first_ok_after - kill,
        longest_gap_s=max(gaps, default=0.0),
    )
    # Only requests that were on that worker: sent before its process was gone (a few ms
    # of slack: the client's clock starts before connect()).
    assert all(t <= gone + 0.01 for t, _ in failures), "a request sent after it was gone failed"
    assert first_ok_after - kill <= 2.0
    assert max(gaps, default=0.0) <= 2.0
    assert replaced


def wait_exited(pid: int, timeout: float = 10.0) -> float:
    """When ``pid`` has exited, every thread of it: only then are its files (its listening
    socket included) closed. A killed leader turns zombie while its threads still exit."""
    deadline = time.monotonic() + timeout
    proc = Path(f"/proc/{pid}")
    while time.monotonic() < deadline:
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            threads = len(list((proc / "task").iterdir()))
        except (FileNotFoundError, ProcessLookupError):
            return time.monotonic()
        if state in ("Z", "X") and threads <= 1:
            return time.monotonic()
        time.sleep(0.001)
    raise AssertionError(f"process {pid} still runs {timeout} s after SIGKILL")


def drain_server(start_server: Callable[..., Server], store: Path) -> Server:
    return start_server(
        {"DIGITSERVE_STORE": str(store), "DIGITSERVE_GRACEFUL_TIMEOUT": str(GRACEFUL)},
        workers=2,
    )


def burst_then_sigterm(
    server: Server, payloads: list[bytes], n: int = 32
) -> tuple[list[Outcome], float]:
    """``n`` requests released at once on new connections; SIGTERM 5 ms later. Returns
    the outcomes and when the signal was sent."""
    address = local_address(server.url)
    outcomes: list[Outcome | None] = [None] * n
    go = threading.Barrier(n + 1)

    def client(i: int) -> None:
        go.wait()
        outcomes[i] = send(address, payloads[i % len(payloads)], timeout=GRACEFUL + 10)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    go.wait()
    time.sleep(0.005)
    sent_at = time.monotonic()
    os.kill(server.proc.pid, signal.SIGTERM)
    for t in threads:
        t.join(GRACEFUL + 20)
    return [o for o in outcomes if o is not None], sent_at


def unanswered(outcomes: list[Outcome], term_at: float) -> tuple[list[Outcome], list[Outcome]]:
    """The connected requests not answered: those connected before the SIGTERM (lost:
    the server had received them), and those connected after it (they raced the close)."""
    failed = [o for o in outcomes if o.connected_at is not None and not o.ok]
    lost = [o for o in failed if o.connected_at < term_at]
    return lost, [o for o in failed if o.connected_at >= term_at]


def test_sigterm_drain_answers_a_burst_in_the_backlog(start_server, tmp_path, payloads, figure):
    rounds = int(scaled(8, 3))
    answered = not_received = 0
    lost: list[Outcome] = []
    raced: list[Outcome] = []
    exits: list[float] = []
    for k in range(rounds):
        server = drain_server(start_server, copy_shipped_store(tmp_path / f"store{k}"))
        outcomes, term_at = burst_then_sigterm(server, payloads)
        server.proc.wait(GRACEFUL + 15)
        exits.append(time.monotonic() - term_at)
        answered += sum(o.ok for o in outcomes)
        # connect() refused or timed out: the kernel never accepted it
        not_received += sum(not o.connected for o in outcomes)
        round_lost, round_raced = unanswered(outcomes, term_at)
        lost += round_lost
        raced += round_raced
        assert server.proc.returncode == 0, server.output()
    figure(
        "sigterm-burst",
        f"{rounds} rounds of 32 requests at once, SIGTERM 5 ms later: {answered} answered, "
        f"{not_received} not received (connect() refused or timed out), {len(lost)} accepted "
        f"before the SIGTERM but not answered, {len(raced)} connected after it and reset "
        f"({dict(Counter(o.kind for o in raced))}); the server exited "
        f"{min(exits):.1f}-{max(exits):.1f} s after SIGTERM (graceful timeout {GRACEFUL} s)",
        answered=answered,
        not_received=not_received,
        lost=len(lost),
        raced_close=len(raced),
        exit_s=exits,
    )
    assert not lost, [o.kind for o in lost]
    assert answered + not_received + len(raced) == 32 * rounds
    assert max(exits) <= GRACEFUL + 2


def test_sigterm_drain_under_steady_load(start_server, store_copy, payloads, figure):
    server = drain_server(start_server, store_copy)
    address = local_address(server.url)
    sent_at: list[float] = []
    exited_at: list[float] = []
    stop = threading.Event()

    def term_later() -> None:
        time.sleep(3)
        sent_at.append(time.monotonic())
        os.kill(server.proc.pid, signal.SIGTERM)
        server.proc.wait(GRACEFUL + 15)
        exited_at.append(time.monotonic())
        time.sleep(0.5)  # clients keep trying: refused now
        stop.set()

    killer = threading.Thread(target=term_later)
    killer.start()
    result = run_load(
        address, payloads, concurrency=16, seconds=GRACEFUL + 20, timeout=GRACEFUL + 10, stop=stop
    )
    killer.join()
    exit_s = exited_at[0] - sent_at[0]
    lost, raced = unanswered([o for _, o in result.outcomes], sent_at[0])
    in_drain = sum(1 for t, o in result.outcomes if t >= sent_at[0] and o.ok)
    figure(
        "sigterm-steady",
        f"SIGTERM under load at concurrency 16: {result.count} requests, {len(lost)} accepted "
        f"before the SIGTERM but not answered, {in_drain} answered that started after it, "
        f"{len(raced)} connected after it and reset as the listener closed; exited in "
        f"{exit_s:.1f} s",
        lost=len(lost),
        raced_close=len(raced),
        requests=result.count,
        answered_after_term=in_drain,
        exit_s=exit_s,
    )
    assert not lost, [o.kind for o in lost]
    assert server.proc.returncode == 0
    assert exit_s <= GRACEFUL + 2
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=2).close()
