"""gunicorn settings for digitserve; every one overridable by environment.

    gunicorn -c service/gunicorn.conf.py "service.app:create_app()"

The app is not preloaded: each worker loads the model after the fork (MXNet's
fork handling is fragile) and runs one inference thread; gthread request
threads only parse, preprocess and wait.
"""

import gc
import os
import shutil
import signal
import socket
import tempfile
import threading
import time

from service.balancing import WorkerTable, pin_to_core
from service.config import Config  # light: no MXNet, no Flask
from service.gunicorn_ext import ACCESS_LOG_FORMAT, install_patches
from service.worker import BufferedThreadWorker
from service.worker import install as install_worker

_cpus = os.cpu_count() or 1
try:  # the app's settings, checked once here rather than failing in every worker
    _app_config = Config.from_env().check()
except ValueError as exc:
    raise SystemExit(f"digitserve: {exc}") from None


def _int(name: str, default: int, minimum: int) -> int:
    """An integer setting; unset or empty (as compose passes an unset one) is the default."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"digitserve: {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SystemExit(f"digitserve: {name} must be at least {minimum}, not {value}")
    return value


bind = os.environ.get("DIGITSERVE_BIND") or "127.0.0.1:8000"
workers = _int("DIGITSERVE_WORKERS", min(_cpus, 4), minimum=1)
# gthread, reading each request whole before a thread takes it (slow clients hold no
# thread), and serving its listen queue when it stops: service/worker.py.
worker_class = "service.worker.BufferedThreadWorker"
# 16: every kept-alive connection a worker holds at concurrency 32 has a thread, so more
# requests share each forward: 1.07x the requests/s of 8 (docs/performance.md).
threads = _int("DIGITSERVE_THREADS", 16, minimum=1)
timeout = _int("DIGITSERVE_TIMEOUT", 60, minimum=0)  # 0: gunicorn's "never"
graceful_timeout = _int("DIGITSERVE_GRACEFUL_TIMEOUT", 30, minimum=0)
keepalive = _int("DIGITSERVE_KEEPALIVE", 5, minimum=0)
backlog = _int("DIGITSERVE_BACKLOG", 512, minimum=1)
# The workers share one listening socket and a new connection goes to the worker holding
# the fewest (service/balancing.py). Left to the kernel, 32 kept-alive connections split
# 31/1 on a shared socket and 10/22 to 19/13 over SO_REUSEPORT sockets (REUSE_PORT=1).
_tcp = not bind.startswith(("unix:", "fd://"))
reuse_port = _tcp and (os.environ.get("DIGITSERVE_REUSE_PORT") or "0").strip() == "1"
# auto: each worker on a core of its own when there is one core per worker; thread
# hand-offs then stay on one core (docs/performance.md).
cpu_pinning = (os.environ.get("DIGITSERVE_CPU_PINNING") or "auto").strip().lower()
if cpu_pinning not in ("auto", "0", "1"):
    raise SystemExit(f"digitserve: DIGITSERVE_CPU_PINNING is auto, 0 or 1, not {cpu_pinning!r}")
accesslog = os.environ.get("DIGITSERVE_ACCESS_LOG", "-") or None
errorlog = "-"
loglevel = (os.environ.get("DIGITSERVE_LOG_LEVEL") or "info").lower()
access_log_format = ACCESS_LOG_FORMAT
logger_class = "service.gunicorn_ext.AccessLogger"
# gunicorn >= 25's control socket: off unless asked for (several servers per host,
# read-only homes in containers).
control_socket_disable = not os.environ.get("DIGITSERVE_CONTROL_SOCKET")
if not control_socket_disable:
    control_socket = os.environ["DIGITSERVE_CONTROL_SOCKET"]
# Request-line and header bounds (gunicorn's own, before Flask sees anything).
limit_request_line = 8190
limit_request_fields = 100


install_patches()
# A client that takes longer for its request head (HEADER_TIMEOUT), or pauses longer in its
# body (BODY_TIMEOUT), is answered 408; IO_TIMEOUT bounds any read or write a request
# thread does; BUFFER_MB bounds what a worker holds of requests still arriving.
BufferedThreadWorker.configure(
    header_timeout=_int("DIGITSERVE_HEADER_TIMEOUT", 10, minimum=1),
    body_timeout=_int("DIGITSERVE_BODY_TIMEOUT", 10, minimum=1),
    io_timeout=_int("DIGITSERVE_IO_TIMEOUT", 30, minimum=1),
    max_body=_app_config.MAX_CONTENT_LENGTH,
    buffer_bytes=_int("DIGITSERVE_BUFFER_MB", 64, minimum=1) * 1024 * 1024,
)
install_worker()
# Workers share the cores: split MXNet's OpenMP threads between them.
_omp = _int("DIGITSERVE_OMP_THREADS", max(1, _cpus // workers), minimum=1)
# One thread per worker calls MXNet, so its threaded engine only adds hand-offs: the
# synchronous NaiveEngine runs the forward on that thread (docs/performance.md).
_mxnet_engine = os.environ.get("DIGITSERVE_MXNET_ENGINE") or "NaiveEngine"
raw_env = [
    f"OMP_NUM_THREADS={_omp}",
    f"MXNET_CPU_WORKER_NTHREADS={_omp}",
    f"MXNET_ENGINE_TYPE={_mxnet_engine}",
]

# Folders this server makes for itself, removed at exit. Kept in the environment, not
# in this module: gunicorn runs this file again on SIGHUP, and the new copy's on_exit
# must still know them.
_MADE = "_DIGITSERVE_MADE_DIRS"  # internal, not a setting


def on_starting(server):
    """With reuse_port the workers bind, not the master: a port already taken (by any
    socket, another digitserve's included) stops the start here, once, instead of every
    worker failing to bind and being restarted."""
    if not reuse_port:
        return
    for address in server.cfg.address:
        if not isinstance(address, tuple):
            continue
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise SystemExit(f"digitserve: Connection in use: {address}: {exc}") from None


def when_ready(server):
    """Make the server's temp folders once it has started (settings valid, socket
    bound: a failed start leaves nothing behind), before any worker is forked."""
    made = []
    # prometheus_client multiprocess mode: a fresh directory for this server's workers.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made.append(tempfile.mkdtemp(prefix="digitserve-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made[-1]
    # /admin/reload in one worker touches this file; every worker watches it.
    if not os.environ.get("DIGITSERVE_RELOAD_FILE"):
        made.append(tempfile.mkdtemp(prefix="digitserve-reload-"))
        os.environ["DIGITSERVE_RELOAD_FILE"] = os.path.join(made[-1], "reload")
    os.environ[_MADE] = os.pathsep.join(made)


def pre_fork(server, worker):
    """A slot for the worker in the table of connections (a shared socket only: with
    SO_REUSEPORT the kernel, not the workers, picks)."""
    if not server.cfg.reuse_port:
        worker.slot = WorkerTable.shared(server).claim(worker.age)


def post_fork(server, worker):
    core = pin_to_core(worker.slot, server.num_workers, cpu_pinning)
    if core is not None:
        worker.log.info("worker %s on core %d", worker.pid, core)


def post_worker_init(worker):
    """Wait for the worker's start-up load, then watch its inference thread; if it dies
    or hangs in a forward pass, stop the worker so gunicorn starts a fresh one.
    gunicorn's own timeout cannot see this: its heartbeat comes from the request loop,
    which keeps running."""
    engine = worker.wsgi.extensions["digitserve.engine"]
    # Accept no connection before the start-up load has been tried: the listening socket
    # is shared, so a worker still loading would answer /ready 503 (and hold /predict)
    # while its siblings are ready. Bounded by INFERENCE_TIMEOUT (a SIGTERM meanwhile
    # takes effect after it).
    engine.wait_started()
    # What start-up made (MXNet, Flask, the model: ~90k objects) lives as long as the
    # worker: out of the collector's sight, so no full collection stalls requests for it
    # (one of 55-77 ms in each worker's first half-minute under load). No collection
    # first: it would free ~200 objects for 55 ms while the sibling takes every connection.
    gc.freeze()

    def watch() -> None:
        while worker.alive:
            time.sleep(1.0)
            if not engine.alive:
                worker.log.critical(
                    "inference thread %s: stopping this worker",
                    "stalled in a forward pass" if engine.stalled else "died",
                )
                os.kill(os.getpid(), signal.SIGTERM)  # graceful: other requests finish
                return

    threading.Thread(target=watch, name="inference-watchdog", daemon=True).start()


def child_exit(server, worker):
    # Imported here: prometheus_client picks its value store at import time, and the
    # workers (forked from this process) must see PROMETHEUS_MULTIPROC_DIR set first.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    WorkerTable.shared(server).release(getattr(worker, "slot", None))


def on_exit(server):
    for folder in filter(None, os.environ.get(_MADE, "").split(os.pathsep)):
        shutil.rmtree(folder, ignore_errors=True)
