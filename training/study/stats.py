"""Small helpers shared by the experiments' summaries."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np


def spread(values: Iterable[float | None]) -> dict:
    """Mean, min and max over seeds; ``n`` counts the values that exist."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": float(np.mean(vals)), "min": min(vals), "max": max(vals), "n": len(vals)}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
