"""A slow-client candidate measured by benchmarks/reliability_fronts.py: gunicorn's stock
gthread worker with a 2 s timeout on every read and write of a client socket.

A module of its own, importing only gunicorn and service.worker: gunicorn's master imports
a worker class given with -k before it sets PROMETHEUS_MULTIPROC_DIR, and prometheus_client
picks its value store when first imported.
"""

from __future__ import annotations

from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

from service.worker import TimeoutSocket


class ReadTimeoutWorker(ThreadWorker):
    """Stock gthread; each accepted socket blocks for 2 s at most."""

    timeout_s = 2.0

    def accept(self, listener: Any) -> None:
        try:
            client, address = listener.accept()
        except BlockingIOError:
            return
        sock = TimeoutSocket(client.family, client.type, client.proto, fileno=client.detach())
        sock.io_timeout = self.timeout_s
        self.nr_conns += 1
        self.enqueue_req(TConn(self.cfg, sock, address, listener.getsockname()))
