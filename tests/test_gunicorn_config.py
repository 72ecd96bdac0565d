"""service/gunicorn.conf.py reads its settings from the environment as compose passes them."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).with_name("gunicorn")


def gunicorn_config(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIGITSERVE_")}
    # --print-config never runs on_exit: give it a folder so it makes no temp dirs of its own.
    with tempfile.TemporaryDirectory() as tmp:
        clean |= {"PROMETHEUS_MULTIPROC_DIR": tmp, "DIGITSERVE_RELOAD_FILE": f"{tmp}/reload"}
        return subprocess.run(
            [
                str(GUNICORN),
                "-c",
                "service/gunicorn.conf.py",
                "--print-config",
                "service.app:create_app()",
            ],
            cwd=ROOT,
            env={**clean, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )


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
        "8",
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
    ]:
        run = gunicorn_config(**env)
        assert run.returncode != 0, env
        assert f"digitserve: {message}" in run.stderr and "Traceback" not in run.stderr, run.stderr
