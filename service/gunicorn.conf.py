"""gunicorn settings for digitserve; every one overridable by environment.

    gunicorn -c service/gunicorn.conf.py "service.app:create_app()"

The app is not preloaded: each worker loads the model after the fork (MXNet's
fork handling is fragile) and runs one inference thread; gthread request
threads only parse, preprocess and wait.
"""

import http
import json
import os
import shutil
import signal
import tempfile
import threading
import time

import gunicorn.http.wsgi
import gunicorn.util

from service.config import Config  # light: no MXNet, no Flask

_cpus = os.cpu_count() or 1
try:  # the app's settings, checked once here rather than failing in every worker
    Config.from_env().check()
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
worker_class = "gthread"
threads = _int("DIGITSERVE_THREADS", 8, minimum=1)
timeout = _int("DIGITSERVE_TIMEOUT", 60, minimum=0)  # 0: gunicorn's "never"
graceful_timeout = _int("DIGITSERVE_GRACEFUL_TIMEOUT", 30, minimum=0)
keepalive = _int("DIGITSERVE_KEEPALIVE", 5, minimum=0)
backlog = _int("DIGITSERVE_BACKLOG", 512, minimum=1)
accesslog = os.environ.get("DIGITSERVE_ACCESS_LOG", "-") or None
errorlog = "-"
loglevel = (os.environ.get("DIGITSERVE_LOG_LEVEL") or "info").lower()
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
# gunicorn >= 25's control socket: off unless asked for (several servers per host,
# read-only homes in containers).
control_socket_disable = not os.environ.get("DIGITSERVE_CONTROL_SOCKET")
if not control_socket_disable:
    control_socket = os.environ["DIGITSERVE_CONTROL_SOCKET"]
# Request-line and header bounds (gunicorn's own, before Flask sees anything).
limit_request_line = 8190
limit_request_fields = 100


def _json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own answers (a malformed request line, a URI or headers over the
    limits: refused before Flask sees the request) in the API's one error shape,
    instead of gunicorn's HTML page. The workers inherit this after the fork."""
    if status_int >= 500:  # gunicorn keeps "Bad Request" for its 501; the app's 500 code
        reason = http.HTTPStatus(status_int).phrase
    code = "internal_error" if status_int == 500 else reason.lower().replace(" ", "_")
    body = json.dumps({"error": {"code": code, "message": mesg or reason}}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


gunicorn.util.write_error = _json_error

_process_headers = gunicorn.http.wsgi.Response.process_headers


def _process_headers_closing(self, headers) -> None:
    """Honour the app's ``Connection: close`` (gunicorn drops hop-by-hop headers): the
    app sends it when it answers without reading the body, after which gunicorn closes
    the connection anyway; the client must not be told "keep-alive" first."""
    _process_headers(self, headers)
    if any(k.lower() == "connection" and v.strip().lower() == "close" for k, v in headers):
        self.force_close()


gunicorn.http.wsgi.Response.process_headers = _process_headers_closing
# Workers share the cores: split MXNet's OpenMP threads between them.
_omp = _int("DIGITSERVE_OMP_THREADS", max(1, _cpus // workers), minimum=1)
raw_env = [f"OMP_NUM_THREADS={_omp}", f"MXNET_CPU_WORKER_NTHREADS={_omp}"]

# Folders this server makes for itself, removed at exit. Kept in the environment, not
# in this module: gunicorn runs this file again on SIGHUP, and the new copy's on_exit
# must still know them.
_MADE = "_DIGITSERVE_MADE_DIRS"  # internal, not a setting


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


def on_exit(server):
    for folder in filter(None, os.environ.get(_MADE, "").split(os.pathsep)):
        shutil.rmtree(folder, ignore_errors=True)
