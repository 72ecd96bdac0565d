"""Prometheus metrics, correct under several gunicorn workers.

gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before the workers import this;
each worker then writes its samples to files there and /metrics aggregates
them (prometheus_client's multiprocess mode). Without it (tests, flask run) the
default in-process registry is used.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# Methods with their own label; any other name a client sends is "other", so
# clients cannot grow the number of series without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "digitserve_requests_total",
    "HTTP requests by endpoint, method and status",
    ["endpoint", "method", "status"],
)
LATENCY = Histogram(
    "digitserve_request_duration_seconds",
    "HTTP request latency by endpoint and status",
    ["endpoint", "status"],
    buckets=LATENCY_BUCKETS,
)
IMAGES = Counter("digitserve_images_total", "Images classified")
BATCH_IMAGES = Histogram(
    "digitserve_batch_images",
    "Images per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
FORWARD_SECONDS = Histogram(
    "digitserve_forward_seconds",
    "Time of one forward pass",
    buckets=LATENCY_BUCKETS,
)
QUEUE_IMAGES = Gauge(
    "digitserve_queue_images",
    "Images waiting for or in a forward pass",
    multiprocess_mode="livesum",
)
MODEL_VERSION = Gauge(
    "digitserve_model_version",
    "Version each worker serves by default",
    ["model"],
    multiprocess_mode="liveall",
)
MODEL_LOADS = Counter(
    "digitserve_model_loads_total",
    "Model version loads by result",
    ["result"],
)


@cache
def request_series(endpoint: str, method: str, status: str) -> tuple[Any, Any]:
    """The REQUESTS and LATENCY children of one (endpoint, method, status): labels() checks
    and locks on every call (11 us a request for both, 5 with the children kept). Bounded:
    endpoints are the app's rules, methods METHODS, statuses HTTP's."""
    return REQUESTS.labels(endpoint, method, status), LATENCY.labels(endpoint, status)


def exposition() -> tuple[bytes, str]:
    """The metrics page of the whole server (all workers when multiprocess)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
