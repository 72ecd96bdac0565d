"""The service's app with a fault a test can set off: its next forward pass hangs, or
ends the inference thread (a helper for gunicorn, not a test module).

    gunicorn -c service/gunicorn.conf.py "tests.faulty_app:create_app()"

The fault is armed by writing "hang" or "die" into the file named by $TEST_FAULT_FILE;
the forward pass that finds it removes it, so the worker started in place of the one
that failed serves normally.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from flask import Flask

from service import app as service_app

FAULT_FILE = "TEST_FAULT_FILE"


def create_app() -> Flask:
    app = service_app.create_app()
    engine = app.extensions["digitserve.engine"]
    forward, armed = engine._forward, Path(os.environ[FAULT_FILE])

    def faulty_forward(version: int, batch: np.ndarray) -> np.ndarray:
        try:
            fault = armed.read_text().strip()
            armed.unlink()
        except FileNotFoundError:
            return forward(version, batch)
        if fault == "hang":  # as a deadlocked MXNet engine would
            threading.Event().wait()
        # Not an Exception, which the batcher reports to the waiting requests: this one
        # ends the thread, like any error outside the batcher's reach.
        raise SystemExit(f"inference thread ended by the test fault {fault!r}")

    engine._forward = faulty_forward
    return app
