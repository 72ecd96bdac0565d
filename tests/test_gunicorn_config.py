"""service/gunicorn.conf.py reads its settings from the environment as compose passes them."""

from __future__ import annotations

import contextlib
import gc
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).with_name("gunicorn")


def gunicorn_config(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIGITSERVE_")}
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run(
            [
                str(GUNICORN),
                "-c",
                "service/gunicorn.conf.py",
                "--print-config",
                "service.app:create_app()",
            ],
            cwd=ROOT,
            env={**clean, "TMPDIR": tmp, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert not os.listdir(tmp), "reading the settings must not make temp folders"
        return run


def settings(output: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in output.splitlines() if " = " in line)
    return {k.strip(): v.strip() for k, v in pairs}


def test_environment_overrides_the_defaults():
    run = gunicorn_config(
        DIGITSERVE_BIND="127.0.0.1:9123",
        DIGITSERVE_WORKERS="3",
        DIGITSERVE_THREADS="5",
        DIGITSERVE_KEEPALIVE="7",
        DIGITSERVE_LOG_LEVEL="WARNING",
    )
    assert run.returncode == 0, run.stderr
    got = settings(run.stdout)
    assert got["bind"] == "['127.0.0.1:9123']"
    assert (got["workers"], got["threads"], got["keepalive"]) == ("3", "5", "7")
    assert got["loglevel"] == "warning"


def test_empty_settings_mean_the_defaults():
    # docker-compose passes `VAR: ${VAR:-}` as an empty string when the user set nothing.
    names = ["BIND", "WORKERS", "THREADS", "TIMEOUT", "GRACEFUL_TIMEOUT", "KEEPALIVE", "BACKLOG"]
    run = gunicorn_config(**{f"DIGITSERVE_{n}": "" for n in names}, DIGITSERVE_LOG_LEVEL="")
    assert run.returncode == 0, run.stderr
    got = settings(run.stdout)
    assert got["bind"] == "['127.0.0.1:8000']"
    assert (got["threads"], got["timeout"], got["keepalive"], got["backlog"]) == (
        "16",
        "60",
        "5",
        "512",
    )
    assert got["loglevel"] == "info"


def test_a_non_number_is_named_without_a_traceback():
    run = gunicorn_config(DIGITSERVE_WORKERS="two")
    assert run.returncode != 0
    assert "DIGITSERVE_WORKERS='two' is not an integer" in run.stderr
    assert "Traceback" not in run.stderr


def test_app_settings_that_cannot_work_stop_the_server_with_one_line():
    for env, message in [
        ({"DIGITSERVE_MAX_IMAGES": "abc"}, "DIGITSERVE_MAX_IMAGES='abc' is not a number"),
        ({"DIGITSERVE_QUEUE_SIZE": "8"}, "DIGITSERVE_QUEUE_SIZE (8) is below"),
        ({"DIGITSERVE_LOG_LEVEL": "loud"}, "DIGITSERVE_LOG_LEVEL 'loud' is not a log level"),
        ({"DIGITSERVE_MAX_BATCH": "0"}, "DIGITSERVE_MAX_BATCH must be positive"),
        ({"DIGITSERVE_INFERENCE_TIMEOUT": "inf"}, "DIGITSERVE_INFERENCE_TIMEOUT must be at most"),
        ({"DIGITSERVE_BATCH_WAIT_MS": "inf"}, "DIGITSERVE_BATCH_WAIT_MS must be at most"),
        ({"DIGITSERVE_POLL_SECONDS": "nan"}, "DIGITSERVE_POLL_SECONDS must be at most"),
        ({"DIGITSERVE_BATCH_WAIT_MS": "40000"}, "DIGITSERVE_BATCH_WAIT_MS must be shorter than"),
        ({"DIGITSERVE_MODEL_NAME": "MNIST"}, "DIGITSERVE_MODEL_NAME: invalid model name"),
        (
            {"DIGITSERVE_MODEL_VERSION": "99999999999"},
            "DIGITSERVE_MODEL_VERSION must be a version from",
        ),
        ({"DIGITSERVE_WORKERS": "0"}, "DIGITSERVE_WORKERS must be at least 1"),
        ({"DIGITSERVE_THREADS": "0"}, "DIGITSERVE_THREADS must be at least 1"),
        ({"DIGITSERVE_KEEPALIVE": "-1"}, "DIGITSERVE_KEEPALIVE must be at least 0"),
        ({"DIGITSERVE_OMP_THREADS": "abc"}, "DIGITSERVE_OMP_THREADS='abc' is not an integer"),
        ({"DIGITSERVE_CPU_PINNING": "yes"}, "DIGITSERVE_CPU_PINNING is auto, 0 or 1, not 'yes'"),
        ({"DIGITSERVE_OMP_THREADS": "0"}, "DIGITSERVE_OMP_THREADS must be at least 1"),
    ]:
        run = gunicorn_config(**env)
        assert run.returncode != 0, env
        assert f"digitserve: {message}" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_temp_folders_go_after_a_reload_and_after_a_failed_start(start_server, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = start_server({"TMPDIR": str(tmp)}, workers=1)
    assert len([p for p in tmp.iterdir() if p.name.startswith("digitserve-")]) == 2
    first = server.worker_pids()
    os.kill(server.proc.pid, signal.SIGHUP)  # gunicorn re-reads this file and new workers start
    deadline = time.monotonic() + 60
    while server.worker_pids() & first or not server.worker_pids():
        assert time.monotonic() < deadline, "no new worker after SIGHUP"
        time.sleep(0.2)
    server.wait_ready()
    server.stop()
    assert not list(tmp.iterdir()), "the metrics and reload folders outlived the server"

    with socket.socket() as taken:  # a start that fails: the port is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = subprocess.run(
            [str(GUNICORN), "-c", "service/gunicorn.conf.py", "service.app:create_app()"],
            cwd=ROOT,
            env={
                **os.environ,
                "TMPDIR": str(tmp),
                "DIGITSERVE_BIND": f"127.0.0.1:{taken.getsockname()[1]}",
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode != 0
    assert not list(tmp.iterdir()), "a failed start left temp folders"


LISTEN, ESTABLISHED = "0A", "01"  # socket states in /proc/net/tcp


def socket_inodes(pid: int, port: int, state: str) -> set[str]:
    """The inodes of the sockets on local ``port`` in ``state`` that process ``pid`` holds."""
    on_port = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                on_port.add(fields[9])
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                held.add(target[8:-1])
    return on_port & held


def listening_inodes(pid: int, port: int) -> set[str]:
    return socket_inodes(pid, port, LISTEN)


def test_kept_alive_connections_are_spread_evenly_over_the_workers(start_server):
    """Left to the kernel, 32 kept-alive connections opened at once split 31/1 on a shared
    socket and 10/22 to 19/13 over SO_REUSEPORT sockets: the fuller worker answered a
    third slower. A worker takes a new one only if no other holds fewer."""
    server = start_server({}, workers=2)
    pids = sorted(server.worker_pids())
    shared = [listening_inodes(pid, server.port) for pid in pids]
    assert len(shared[0]) == 1 and shared[0] == shared[1], shared  # one socket, shared
    clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(32)]
    try:
        for client in clients:  # all connected before any request: no help from timing
            client.sendall(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n")
        for client in clients:
            client.settimeout(30)
            assert client.recv(65536).startswith(b"HTTP/1.1 200")
        counts = [len(socket_inodes(pid, server.port, ESTABLISHED)) for pid in pids]
        assert sum(counts) == 32 and max(counts) - min(counts) <= 2, counts
    finally:
        for client in clients:
            client.close()


def test_with_reuse_port_each_worker_listens_on_a_socket_of_its_own(start_server):
    server = start_server({"DIGITSERVE_REUSE_PORT": "1"}, workers=2)
    pids = server.worker_pids()
    sockets = [listening_inodes(pid, server.port) for pid in pids]
    assert len(pids) == 2 and all(len(s) == 1 for s in sockets), sockets
    assert sockets[0] != sockets[1]
    assert not listening_inodes(server.proc.pid, server.port)  # the master accepts nothing
    assert requests.get(f"{server.url}/ready", timeout=10).status_code == 200


def test_a_worker_takes_requests_only_once_its_start_up_load_is_done(start_server):
    """Once any worker answers /ready, all must: a worker still loading answers nothing."""
    server = start_server({}, workers=2, wait=False)
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, server.output()
        try:
            if requests.get(f"{server.url}/ready", timeout=(2, 30)).status_code == 200:
                break
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.05)
    answers = [requests.get(f"{server.url}/ready", timeout=5) for _ in range(40)]  # new connections
    assert all(r.status_code == 200 and r.json()["ready"] for r in answers), [
        r.text for r in answers if r.status_code != 200
    ]


def test_a_worker_freezes_what_its_start_up_made_out_of_the_collectors_sight():
    """A full collection of the ~90k start-up objects (MXNet, Flask, the model) stalled
    each worker's requests for 55-77 ms once in its first half-minute under load."""
    settings = runpy.run_path(str(ROOT / "service/gunicorn.conf.py"))
    loaded: list[bool] = []
    engine = types.SimpleNamespace(wait_started=lambda: loaded.append(True), alive=True)
    worker = types.SimpleNamespace(
        wsgi=types.SimpleNamespace(extensions={"digitserve.engine": engine}), alive=False
    )
    gc.unfreeze()
    try:
        settings["post_worker_init"](worker)
        assert loaded == [True]  # after the start-up load, not before it
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
