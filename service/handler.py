"""The request handler, split as TorchServe splits it:

- ``extract_images``: the request body -> a list of image bytes (all limits that
  need no decoding are checked here, before any expensive work),
- ``preprocess``: image bytes -> normalized (N, 1, 28, 28) batch,
- ``inference``: the batch -> probabilities, through the engine's queue,
- ``postprocess``: probabilities -> the JSON response.

``initialize`` is the engine's start (see service.inference).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import numpy as np
from flask import Request

from service import errors, preprocessing
from service.config import Config
from service.inference import InferenceEngine, Prediction
from service.store import ModelVersion

RAW_TYPES = ("image/", "application/octet-stream")
_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,", re.IGNORECASE)


def extract_images(request: Request, config: Config) -> list[bytes]:
    """The uploaded images' bytes, from multipart, a raw image body or JSON base64."""
    mimetype = request.mimetype
    if request.content_length is not None and request.content_length > config.MAX_CONTENT_LENGTH:
        raise errors.PayloadTooLarge(
            f"request body is {request.content_length} bytes; the limit is "
            f"{config.MAX_CONTENT_LENGTH}"
        )
    if mimetype == "multipart/form-data":
        files = [f for key in request.files for f in request.files.getlist(key)]
        _check_count(len(files), config)
        images = [f.read() for f in files]
    elif mimetype.startswith(RAW_TYPES):
        images = [request.get_data(cache=False)]
    elif mimetype == "application/json":
        images = _from_json(request, config)
    elif not mimetype and not request.content_length:
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


def _check_count(n: int, config: Config) -> None:
    if n == 0:
        raise errors.NoImage("the form holds no file; send it in the field 'image'")
    if n > config.MAX_IMAGES:
        raise errors.PayloadTooLarge(
            f"{n} images in one request; the limit is {config.MAX_IMAGES}", code="too_many_images"
        )


def _from_json(request: Request, config: Config) -> list[bytes]:
    try:
        body = request.get_json(force=True, silent=False, cache=False)
    except Exception as exc:  # werkzeug's BadRequest for bad JSON or bad encoding
        raise errors.BadRequest("the body is not valid JSON", code="bad_json") from exc
    if not isinstance(body, dict) or ("image" in body) == ("images" in body):
        raise errors.BadRequest(
            'send a JSON object with "image" (base64) or "images" (a list)', code="bad_json"
        )
    items = [body["image"]] if "image" in body else body["images"]
    if not isinstance(items, list):
        raise errors.BadRequest('"images" must be a list of base64 strings', code="bad_json")
    _check_count(len(items), config)
    return [_b64decode(item, i) for i, item in enumerate(items)]


def _b64decode(item: Any, index: int) -> bytes:
    if not isinstance(item, str):
        raise errors.BadRequest(f"image {index} is not a base64 string", code="bad_base64")
    text = _DATA_URL.sub("", item.strip(), count=1)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.BadRequest(f"image {index} is not valid base64", code="bad_base64") from exc


def preprocess(images: list[bytes], version: ModelVersion, config: Config) -> np.ndarray:
    """Decode and normalize every image with the answering version's mean/std."""
    norm = version.manifest["normalization"]
    batch = np.empty(
        (len(images), 1, preprocessing.MNIST_SIZE, preprocessing.MNIST_SIZE), dtype=np.float32
    )
    for i, data in enumerate(images):
        try:
            batch[i] = preprocessing.preprocess(
                data, mean=norm["mean"], std=norm["std"], max_pixels=config.MAX_IMAGE_PIXELS
            )
        except errors.ApiError as exc:
            if len(images) > 1:
                exc.message = f"image {i}: {exc.message}"
            raise
    return batch


def inference(engine: InferenceEngine, batch: np.ndarray, version: ModelVersion) -> Prediction:
    return engine.predict(batch, version.version)


def postprocess(prediction: Prediction, labels: list[str]) -> dict[str, Any]:
    rows = []
    for probs in prediction.probabilities:
        best = int(np.argmax(probs))
        rows.append(
            {
                "digit": int(labels[best]) if labels[best].isdigit() else labels[best],
                "confidence": float(probs[best]),
                "probabilities": [round(float(p), 6) for p in probs],
            }
        )
    body: dict[str, Any] = {"model": {"name": prediction.name, "version": prediction.version}}
    if len(rows) == 1:
        body["digit"] = rows[0]["digit"]
        body["confidence"] = rows[0]["confidence"]
    body["predictions"] = rows
    return body
