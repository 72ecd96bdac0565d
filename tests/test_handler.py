"""service.handler's limits, checked before the expensive steps."""

from __future__ import annotations

import base64
import io
import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from service import decoding, errors, handler
from service.config import Config


def drawn_png(size: tuple[int, int], stroke: bool = True) -> bytes:
    """White paper, with a dark vertical stroke (a "1") unless ``stroke`` is False."""
    image = Image.new("L", size, 255)
    if stroke:
        w, h = size
        ImageDraw.Draw(image).line([(w // 2, h // 5), (w // 2, 4 * h // 5)], 0, max(2, w // 10))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


NORMALIZATION = {"mean": 0.13, "std": 0.31}


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """The sizes of the images whose pixels were decompressed."""
    seen: list[tuple[int, int]] = []
    load = decoding.load_image

    def spy(image, **kwargs):
        seen.append(image.size)
        return load(image, **kwargs)

    def spy_mnist(data):
        seen.append((28, 28))
        return decode_mnist(data)

    decode_mnist = decoding.decode_mnist_png
    monkeypatch.setattr(decoding, "load_image", spy)
    monkeypatch.setattr(decoding, "decode_mnist_png", spy_mnist)
    return seen


def test_a_bomb_anywhere_in_the_request_stops_it_before_any_decoding(decoded):
    config = Config(MAX_IMAGE_PIXELS=1_000_000)
    images = [drawn_png((28, 28))] * 3 + [drawn_png((2000, 2000))]
    with pytest.raises(errors.PayloadTooLarge) as info:
        handler.preprocess(images, NORMALIZATION, config)
    assert info.value.message.startswith("image 3: image is 2000x2000")
    assert decoded == []


def test_the_request_total_is_limited_too(decoded):
    config = Config(MAX_IMAGE_PIXELS=1_000_000, MAX_REQUEST_PIXELS=1_500_000)
    images = [drawn_png((1000, 900)), drawn_png((1000, 900))]  # each under the image limit
    with pytest.raises(errors.PayloadTooLarge, match="1800000 pixels; the limit is 1500000"):
        handler.preprocess(images, NORMALIZATION, config)
    assert decoded == []


def test_images_within_the_limits_are_all_decoded(decoded):
    batch = handler.preprocess(
        [drawn_png((28, 28)), drawn_png((300, 200))], NORMALIZATION, Config()
    )
    assert batch.shape == (2, 1, 28, 28) and batch.dtype == np.float32
    assert decoded == [(28, 28), (300, 200)]


def test_a_blank_image_is_refused_not_answered(decoded):
    with pytest.raises(errors.InvalidImage) as info:
        handler.preprocess(
            [drawn_png((28, 28)), drawn_png((280, 280), stroke=False)], NORMALIZATION, Config()
        )
    assert info.value.code == "blank_image" and info.value.status == 400
    assert info.value.message == "image 1: no digit found: the image is blank"


@given(st.binary(min_size=1, max_size=200))
def test_base64_in_every_common_spelling_decodes_to_the_same_bytes(data):
    spellings = [
        base64.b64encode(data).decode(),
        base64.b64encode(data).decode().rstrip("="),  # unpadded
        base64.urlsafe_b64encode(data).decode(),  # URL-safe alphabet
        base64.urlsafe_b64encode(data).decode().rstrip("="),
        "data:image/png;base64," + base64.b64encode(data).decode(),
        "\n".join(textwrap.wrap(base64.b64encode(data).decode(), 76)),  # MIME line breaks
    ]
    for text in spellings:
        assert handler._b64decode(text, 0) == data


@pytest.mark.parametrize("text", ["!!!", "A", "AAAAA", "AB=C", "é"])
def test_what_is_not_base64_is_a_400(text):
    with pytest.raises(errors.BadRequest) as info:
        handler._b64decode(text, 0)
    assert info.value.code == "bad_base64"
