"""The inference watchdog (service/gunicorn.conf.py, post_worker_init): a worker whose
inference thread hangs in a forward pass or dies stops, and gunicorn starts a fresh one.

Only a real gunicorn shows it: gunicorn's own timeout cannot, since its heartbeat comes
from the request loop, which keeps running while the inference thread is gone.
"""

from __future__ import annotations

import time

import pytest
import requests

from . import images
from .support import SHIPPED_STORE

STALL_SECONDS = 1
INFERENCE_TIMEOUT = 5


def predict(url: str, digit) -> requests.Response:
    data, mimetype = images.encode(digit, "PNG")
    return requests.post(
        f"{url}/predict", data=data, headers={"Content-Type": mimetype}, timeout=60
    )


@pytest.mark.parametrize(
    ("fault", "said"), [("hang", "stalled in a forward pass"), ("die", "died")]
)
def test_a_hung_or_dead_inference_thread_stops_its_worker(start_server, tmp_path, fault, said):
    armed = tmp_path / "fault"
    server = start_server(
        {
            "DIGITSERVE_STORE": str(SHIPPED_STORE),
            "DIGITSERVE_STALL_SECONDS": str(STALL_SECONDS),
            "DIGITSERVE_INFERENCE_TIMEOUT": str(INFERENCE_TIMEOUT),
            "TEST_FAULT_FILE": str(armed),
        },
        workers=1,
        app="tests.faulty_app:create_app()",
    )
    digits, labels = images.sample_digits(1)
    assert predict(server.url, digits[0]).json()["digit"] == int(labels[0])
    [first] = server.worker_pids()

    armed.write_text(fault)
    started = time.monotonic()
    answer = predict(server.url, digits[0])
    # The request that met the fault gets its timeout answer from the stopping worker.
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "timeout", answer.text
    assert time.monotonic() - started < INFERENCE_TIMEOUT + 5
    assert not armed.exists()

    deadline = time.monotonic() + 30
    while server.worker_pids() in ({first}, set()) and time.monotonic() < deadline:
        time.sleep(0.2)
    [second] = server.worker_pids()
    assert second != first
    assert f"inference thread {said}: stopping this worker" in server.output()
    server.wait_ready()
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    assert predict(server.url, digits[0]).json()["digit"] == int(labels[0])
    assert server.proc.poll() is None  # the master lives on
