"""The request handler, split as TorchServe splits it:

- ``extract_images``: the request body -> a list of image bytes (all limits that
  need no decoding are checked here, before any expensive work),
- ``preprocess``: image bytes -> normalized (N, 1, 28, 28) batch,
- ``inference``: the batch -> the engine's queue (a Pending of the probabilities),
- ``postprocess``: probabilities -> the JSON response.

``initialize`` is the engine's start (see service.inference).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

import numpy as np
from flask import Request
from PIL.Image import Image

from service import decoding, errors
from service.batching import Pending, Prediction
from service.config import Config
from service.inference import InferenceEngine
from service.mnist_form import MNIST_SIZE, WORK_SIZE, gray_to_mnist, to_mnist
from store import ModelVersion
from store.manifest import normalize

RAW_TYPES = ("image/", "application/octet-stream")
# data:[<media type>][;<parameter>...];base64, -- the media type and parameters may be empty
_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)
_URL_SAFE = str.maketrans("-_", "+/")


def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 when it is over ``limit`` bytes: by its Content-Length
    before reading anything, and by counting for a chunked body (no length)."""
    if request.content_length is not None:
        check_declared_length(request, limit)
        # The server's own stream, read to Content-Length as PEP 3333 allows: werkzeug's
        # wrapper around it cost 5-15 us of a ~350 us request.
        data = request.environ["wsgi.input"].read(request.content_length)
        if len(data) < request.content_length:  # the client stopped sending early
            raise errors.BadBody(
                f"the body ended after {len(data)} of the {request.content_length} bytes "
                "its Content-Length declares"
            )
        return data
    if request.environ.get("wsgi.input_terminated"):  # chunked: the server ends the stream
        data = request.environ["wsgi.input"].read(limit + 1)
    else:
        data = request.get_data(cache=False)
    if len(data) > limit:
        raise errors.PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    return data


def check_declared_length(request: Request, limit: int) -> None:
    """413 from the Content-Length alone, before a byte of the body is read."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(
            f"request body is {request.content_length} bytes; the limit is {limit}"
        )


def read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON (UTF-8, -16 or -32); 413 over ``limit``, 400 if not JSON."""
    data = read_body(request, limit)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad encoding, deep nesting
        raise errors.BadRequest("the body is not valid JSON", code="bad_json") from exc


def extract_images(request: Request, config: Config) -> list[bytes]:
    """The uploaded images' bytes, from multipart, a raw image body or JSON base64."""
    mimetype = request.mimetype
    check_declared_length(request, config.MAX_CONTENT_LENGTH)
    if mimetype == "multipart/form-data":
        files = [f for key in request.files for f in request.files.getlist(key)]
        text_fields = ", ".join(repr(k) for k in list(request.form)[:5])
        _check_count(
            len(files),
            config,
            f"the form's fields ({text_fields}) hold text, not a file: send the image as a "
            "file part with a filename, e.g. curl -F image=@digit.png"
            if text_fields
            else "the form holds no file; send it in the field 'image'",
        )
        images = [f.read() for f in files]
    elif mimetype.startswith(RAW_TYPES):
        images = [read_body(request, config.MAX_CONTENT_LENGTH)]
    elif mimetype == "application/json":
        images = _from_json(request, config)
    elif not mimetype and not _has_body(request):
        raise errors.NoImage(
            "send an image: multipart form field 'image', a raw image body, "
            'or JSON {"image": base64}'
        )
    else:
        raise errors.UnsupportedMediaType(
            f"content type {mimetype!r} is not supported; use multipart/form-data, image/*, "
            "application/octet-stream or application/json"
        )
    if not images or all(len(b) == 0 for b in images):
        raise errors.NoImage("the request holds no image data")
    for i, data in enumerate(images):
        if not data:
            raise errors.InvalidImage(f"image {i} is empty")
    return images


def _has_body(request: Request) -> bool:
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    return bool(request.content_length) or chunked


def _check_count(n: int, config: Config, when_none: str) -> None:
    if n == 0:
        raise errors.NoImage(when_none)
    if n > config.MAX_IMAGES:
        raise errors.PayloadTooLarge(
            f"{n} images in one request; the limit is {config.MAX_IMAGES}", code="too_many_images"
        )


def _from_json(request: Request, config: Config) -> list[bytes]:
    body = read_json(request, config.MAX_CONTENT_LENGTH)
    if not isinstance(body, dict) or ("image" in body) == ("images" in body):
        raise errors.BadRequest(
            'send a JSON object with "image" (base64) or "images" (a list)', code="bad_json"
        )
    items = [body["image"]] if "image" in body else body["images"]
    if not isinstance(items, list):
        raise errors.BadRequest('"images" must be a list of base64 strings', code="bad_json")
    _check_count(len(items), config, '"images" is an empty list')
    return [_b64decode(item, i) for i, item in enumerate(items)]


def _b64decode(item: Any, index: int) -> bytes:
    if not isinstance(item, str):
        raise errors.BadRequest(f"image {index} is not a base64 string", code="bad_base64")
    text = "".join(_DATA_URL.sub("", item.strip(), count=1).split())
    # Browsers' btoa and Python's b64encode pad; other clients send URL-safe or unpadded.
    text = text.translate(_URL_SAFE) + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.BadRequest(f"image {index} is not valid base64", code="bad_base64") from exc


def preprocess(images: list[bytes], normalization: dict, config: Config) -> np.ndarray:
    """Decode every image and normalize it as the answering version's manifest says:
    the model's float32 (N, 1, 28, 28) input.

    Every image's header is read and its size checked (alone and all together)
    before any is decompressed: a bomb in the last image costs no decoding of the rest."""
    # 28x28 gray PNGs (MNIST's own form) skip Pillow; every other image is opened first.
    opened = [
        None
        if decoding.is_mnist_png(data)
        else _each(i, len(images), decoding.open_image, data, max_pixels=config.MAX_IMAGE_PIXELS)
        for i, data in enumerate(images)
    ]
    total = sum(MNIST_SIZE**2 if image is None else image.width * image.height for image in opened)
    if total > config.MAX_REQUEST_PIXELS:
        raise errors.PayloadTooLarge(
            f"the request's images hold {total} pixels; the limit is {config.MAX_REQUEST_PIXELS}"
        )
    batch = np.empty((len(images), 1, MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    for i, image in enumerate(opened):
        source = images[i] if image is None else image
        batch[i, 0] = normalize(_each(i, len(images), _digit, source, config), normalization)
    return batch


def _digit(source: Image | bytes, config: Config) -> np.ndarray:
    """An opened image's (or an ``is_mnist_png`` file's) 28x28 digit in [0, 1]; a blank
    image is refused, since the model would answer a confident digit for nothing."""
    if isinstance(source, bytes):
        pixels = decoding.decode_mnist_png(source)
        if pixels is not None:
            return _inked(gray_to_mnist(pixels))
        source = decoding.open_image(source, max_pixels=config.MAX_IMAGE_PIXELS)
    return _inked(to_mnist(decoding.load_image(source, min_size=WORK_SIZE)))


def _inked(digit: np.ndarray) -> np.ndarray:
    if not digit.any():
        raise errors.InvalidImage("no digit found: the image is blank", code="blank_image")
    return digit


def _each(index: int, count: int, step, *args, **kwargs):
    """One image's step; in a batch, its error names the image."""
    try:
        return step(*args, **kwargs)
    except errors.ApiError as exc:
        if count > 1:
            exc.message = f"image {index}: {exc.message}"
        raise


def inference(engine: InferenceEngine, batch: np.ndarray, version: ModelVersion) -> Pending:
    """Queue the batch for the engine's next forward; the Pending gives a Prediction."""
    return engine.submit(batch, version.version)


def postprocess(prediction: Prediction, labels: list[str]) -> dict[str, Any]:
    rows = []
    for probs in prediction.probabilities.tolist():  # Python floats: cheaper than numpy's
        best = max(range(len(probs)), key=probs.__getitem__)  # the first maximum, as argmax
        rows.append(
            {
                "digit": int(labels[best]) if labels[best].isdigit() else labels[best],
                "confidence": probs[best],
                "probabilities": [round(p, 6) for p in probs],
            }
        )
    body: dict[str, Any] = {"model": {"name": prediction.name, "version": prediction.version}}
    if len(rows) == 1:
        body["digit"] = rows[0]["digit"]
        body["confidence"] = rows[0]["confidence"]
    body["predictions"] = rows
    return body
