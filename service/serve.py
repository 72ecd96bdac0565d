"""Start the server the way KServe starts a model server:

    python -m service.serve --model_name=digits --model_dir=/mnt/models --http_port=8080

Each flag may come from the environment instead; a flag wins over its variable:

    --model_name  DIGITSERVE_MODEL_NAME   the name served at /v2/models/<name> (mnist)
    --model_dir   DIGITSERVE_STORE        a model store, or one exported version
                                          (symbol, params, manifest.json) such as
                                          KServe's /mnt/models (store.single)
    --http_port   DIGITSERVE_HTTP_PORT, then PORT (Knative sets it), else 8080
    --workers     DIGITSERVE_WORKERS      gunicorn workers, each with the model loaded

It listens on every address (0.0.0.0, as a container must; DIGITSERVE_HTTP_HOST
narrows it, e.g. to 127.0.0.1 outside a container) and then becomes gunicorn
(exec: gunicorn is PID 1, so SIGTERM stops it gracefully), with service/gunicorn.conf.py
and every other DIGITSERVE_* setting as usual. The settings are checked before the
exec, so a bad one stops the start with one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from service.config import ENV_PREFIX, Config

DEFAULT_PORT = 8080  # KServe's and Knative's default container port
CONF = Path(__file__).resolve().parent / "gunicorn.conf.py"
APP = "service.app:create_app()"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 1-65535")
    return port


def _workers(text: str) -> int:
    try:
        workers = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers") from None
    if workers < 1:
        raise argparse.ArgumentTypeError("at least 1 worker")
    return workers


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service.serve",
        description="Serve a digitserve model with KServe's model-server flags.",
    )
    # KServe spells them with underscores; the dashed forms are accepted too.
    p.add_argument("--model_name", "--model-name", dest="model_name")
    p.add_argument("--model_dir", "--model-dir", dest="model_dir")
    p.add_argument("--http_port", "--http-port", dest="http_port", type=_port)
    p.add_argument("--workers", type=_workers)
    return p


def environment(argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The environment gunicorn runs with: ``environ`` plus what the flags say.
    Raises SystemExit (argparse's, or naming the bad setting)."""
    args = parser().parse_args(argv)
    env = dict(environ)
    if args.model_name is not None:
        env[ENV_PREFIX + "MODEL_NAME"] = args.model_name
    if args.model_dir is not None:
        env[ENV_PREFIX + "STORE"] = args.model_dir
    if args.workers is not None:
        env[ENV_PREFIX + "WORKERS"] = str(args.workers)
    port = args.http_port
    if port is None:
        for name in (ENV_PREFIX + "HTTP_PORT", "PORT"):
            if env.get(name, "").strip():
                try:
                    port = _port(env[name].strip())
                except argparse.ArgumentTypeError as exc:
                    raise SystemExit(f"digitserve: {name}: {exc}") from None
                break
    host = env.get(ENV_PREFIX + "HTTP_HOST", "").strip() or "0.0.0.0"
    env[ENV_PREFIX + "BIND"] = f"{host}:{port or DEFAULT_PORT}"
    try:
        Config.from_env(env).check()
    except ValueError as exc:
        raise SystemExit(f"digitserve: {exc}") from None
    return env


def main(argv: Sequence[str] | None = None) -> None:
    env = environment(sys.argv[1:] if argv is None else argv, os.environ)
    # Run from the repository (or /app in the image) so "service" imports as it does
    # for `make run` and the image's CMD.
    os.chdir(CONF.parent.parent)
    command = [sys.executable, "-m", "gunicorn", "-c", str(CONF), APP]
    os.execve(sys.executable, command, env)


if __name__ == "__main__":
    main()
