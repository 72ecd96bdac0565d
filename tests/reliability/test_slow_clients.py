"""Slow clients: 64 connections that send their headers and part of a body, then stall,
must not keep valid requests from being answered, by gunicorn alone (``make run``) or by
nginx in front of it (compose); and the stalled connections are closed in bounded time."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.support import Server

from .clients import LoadResult, Stallers, local_address, run_load
from .conftest import scaled
from .harness import Nginx, nginx_binary

pytestmark = pytest.mark.reliability

STALLED = 64
WITHIN = 2.0  # seconds
SHARE = 0.95


def probe(url: str, payloads: list[bytes], seconds: float) -> LoadResult:
    """Valid /predict requests for ``seconds``, 4 at a time, each on a new connection."""
    return run_load(local_address(url), payloads, concurrency=4, seconds=seconds, timeout=10)


def held(
    url: str,
    payloads: list[bytes],
    figure: Callable[..., None],
    front: str,
    *,
    headers_only: bool = False,
) -> None:
    seconds = scaled(15, 8)  # longer than the stalled connections' timeout: they come back
    with Stallers(local_address(url), STALLED, headers_only=headers_only) as stallers:
        time.sleep(0.5)
        assert stallers.open_now == STALLED, "the stalled connections could not all be opened"
        result = probe(url, payloads, seconds)
        still_open = stallers.open_now
    share = result.within(WITHIN)
    lat = result.latencies()
    kind = "mid-head" if headers_only else "mid-body"
    figure(
        f"stalled-{kind}-{front}",
        f"{front}: with {STALLED} connections stalled {kind}, {share:.1%} of {result.count} "
        f"valid requests answered within {WITHIN:g} s (p50 {1000 * float(np.median(lat)):.0f} "
        f"ms, max {1000 * float(lat.max()):.0f} ms); {stallers.closed_by_server} stalled "
        "connections timed out and were opened again meanwhile",
        share=share,
        requests=result.count,
        kinds=result.kinds(),
        stalled_reopened=stallers.closed_by_server,
    )
    assert still_open == STALLED
    assert share >= SHARE, result.kinds()


def closed_in_time(
    url: str, timeout: float, figure: Callable[..., None], front: str, *, headers_only: bool
) -> dict[int, int]:
    """Stalled connections (not reopened) are closed after ``timeout``; the statuses of
    what they were sent before the close."""
    with Stallers(local_address(url), STALLED, reopen=False, headers_only=headers_only) as s:
        deadline = time.monotonic() + timeout + 10
        while s.closed_by_server < STALLED and time.monotonic() < deadline:
            time.sleep(0.1)
        lifetimes = sorted(s.lifetimes)
        answers = dict(s.answers)
    kind = "mid-head" if headers_only else "mid-body"
    figure(
        f"stalled-{kind}-closed-{front}",
        f"{front}: {len(lifetimes)} of {STALLED} connections stalled {kind} closed after "
        f"{lifetimes[0] if lifetimes else float('nan'):.1f}-"
        f"{lifetimes[-1] if lifetimes else float('nan'):.1f} s (timeout {timeout:g} s); "
        f"answers {answers}",
        closed=len(lifetimes),
        answers=answers,
    )
    assert len(lifetimes) == STALLED
    assert lifetimes[-1] <= timeout + 2.5
    assert lifetimes[0] >= timeout - 1.0
    return answers


@pytest.fixture
def gunicorn_alone(start_server: Callable[..., Server], store_copy: Path) -> Server:
    """gunicorn as ``make run`` starts it; short timeouts where a test waits for them."""
    return start_server(
        {
            "DIGITSERVE_STORE": str(store_copy),
            "DIGITSERVE_HEADER_TIMEOUT": "3",
            "DIGITSERVE_BODY_TIMEOUT": "3",
        },
        workers=2,
    )


@pytest.fixture
def behind_nginx(start_server: Callable[..., Server], store_copy: Path, tmp_path: Path) -> Nginx:
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    server = start_server({"DIGITSERVE_STORE": str(store_copy)}, workers=2)
    proxy = Nginx(
        tmp_path / "nginx",
        server.port,
        {"client_header_timeout": "3s", "client_body_timeout": "3s"},
    )
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("headers_only", [False, True], ids=["mid-body", "mid-head"])
def test_gunicorn_alone_answers_while_64_connections_stall(
    gunicorn_alone, payloads, figure, headers_only
):
    held(gunicorn_alone.url, payloads, figure, "gunicorn", headers_only=headers_only)


@pytest.mark.parametrize("headers_only", [False, True], ids=["mid-body", "mid-head"])
def test_gunicorn_alone_closes_stalled_connections_with_a_408(gunicorn_alone, figure, headers_only):
    closed_in_time(gunicorn_alone.url, 3.0, figure, "gunicorn", headers_only=headers_only)


@pytest.mark.parametrize("headers_only", [False, True], ids=["mid-body", "mid-head"])
def test_nginx_answers_while_64_connections_stall(behind_nginx, payloads, figure, headers_only):
    held(behind_nginx.url, payloads, figure, "nginx", headers_only=headers_only)


@pytest.mark.parametrize("headers_only", [False, True], ids=["mid-body", "mid-head"])
def test_nginx_closes_stalled_connections(behind_nginx, figure, headers_only):
    """nginx closes a client that timed out without an answer (it would not read one);
    its access log says 408."""
    answers = closed_in_time(behind_nginx.url, 3.0, figure, "nginx", headers_only=headers_only)
    assert answers == {}, answers
    time.sleep(0.5)
    logged = [line for line in behind_nginx.access_log() if '" 408 ' in line]
    assert len(logged) == STALLED, behind_nginx.access_log()[-5:]
