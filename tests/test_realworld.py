"""Uploads that are not MNIST files are classified about as well as MNIST itself:
phone photos of a digit on paper and canvas exports with a transparent background,
through the service's own preprocessing and the shipped model."""

from __future__ import annotations

import numpy as np
import pytest

from service import handler
from service.config import Config
from store import loading
from training.data import to_input

from . import images


@pytest.fixture(scope="module")
def shipped(shipped_store):
    mv = shipped_store.resolve("mnist")
    return loading.load(mv), mv.manifest["normalization"]


@pytest.mark.parametrize(
    ("render", "count", "allowed_drop"),
    [
        (
            lambda d, rng: images.phone_photo(d, rng, long_side=int(rng.integers(300, 600))),
            150,
            0.02,
        ),
        (lambda d, rng: images.canvas_png(d), 300, 0.01),
        (lambda d, rng: images.canvas_png(d, white=True), 300, 0.01),
    ],
    ids=["phone-photo", "canvas-black", "canvas-white"],
)
def test_real_world_uploads_score_like_mnist(shipped, sample_test, render, count, allowed_drop):
    model, norm = shipped
    digits, labels = sample_test.images[:count], sample_test.labels[:count]
    mnist = (model.predict(to_input(digits, norm["mean"], norm["std"])).argmax(1) == labels).mean()
    rng = np.random.default_rng(0)
    batch = np.stack([handler.preprocess([render(d, rng)], norm, Config())[0] for d in digits])
    accuracy = (model.predict(batch).argmax(1) == labels).mean()
    assert accuracy >= mnist - allowed_drop, (accuracy, mnist)
