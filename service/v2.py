"""The KServe V2 / Open Inference Protocol REST endpoints.

``/v2/models/{name}/infer`` takes one FP32 input of shape [N, 1, 28, 28]: MNIST
pixel intensities in [0, 1] (light ink on dark, digit centred); the server
applies the model's normalization. It returns ``probabilities`` FP32 [N, 10]
and ``digit`` INT64 [N].
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify, request

from service import __version__, errors, handler, metrics
from service.api import check_model_name, config, engine, parse_version
from store.manifest import normalize

bp = Blueprint("v2", __name__, url_prefix="/v2")
SERVER = {"name": "digitserve", "version": __version__, "extensions": []}
PIXEL_TOLERANCE = 1e-3  # float rounding in a client's 0-1 scaling


@bp.get("")
def server_metadata() -> Response:
    return jsonify(SERVER)


@bp.get("/health/live")
def live() -> tuple[Response, int]:
    alive = engine().alive
    return jsonify({"live": alive}), 200 if alive else 503


@bp.get("/health/ready")
def ready() -> tuple[Response, int]:
    ok = engine().current is not None and engine().alive
    return jsonify({"ready": ok}), 200 if ok else 503


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<version>")
def model_metadata(name: str, version: str | None = None) -> Response:
    check_model_name(name)
    mv = engine().version_for(parse_version(version))
    shape = mv.manifest["input"]["shape"]
    return jsonify(
        {
            "name": mv.name,
            "versions": [str(v) for v in engine().store.versions(mv.name)],
            "platform": "mxnet_symbol",
            "inputs": [{"name": mv.manifest["input"]["name"], "datatype": "FP32", "shape": shape}],
            "outputs": [
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": [-1, len(mv.manifest["labels"])],
                },
                {"name": "digit", "datatype": "INT64", "shape": [-1]},
            ],
        }
    )


@bp.get("/models/<name>/ready")
@bp.get("/models/<name>/versions/<version>/ready")
def model_ready(name: str, version: str | None = None) -> tuple[Response, int]:
    check_model_name(name)
    if version is None:
        engine().wait_started()
        ok = engine().current is not None
    else:
        try:
            engine().version_for(parse_version(version))  # 404 for an unknown version
            ok = True
        except errors.Conflict:  # refused: it exists, and will never be ready
            ok = False
    return jsonify({"name": name, "ready": ok}), 200 if ok else 503


def _tensor(body: Any, max_images: int) -> tuple[np.ndarray, str | None]:
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("inputs"), list)
        or len(body["inputs"]) != 1
        or not isinstance(body["inputs"][0], dict)
    ):
        raise errors.BadRequest(
            'expected {"inputs": [{"name", "shape", "datatype", "data"}]}', code="bad_tensor"
        )
    spec = body["inputs"][0]
    if spec.get("datatype") != "FP32":
        raise errors.BadRequest("input datatype must be FP32", code="bad_tensor")
    shape = spec.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 4
        and shape[1:] == [1, 28, 28]
        and isinstance(shape[0], int)
        and not isinstance(shape[0], bool)
        and shape[0] >= 1
    ):
        raise errors.BadRequest("input shape must be [N, 1, 28, 28]", code="bad_tensor")
    if shape[0] > max_images:
        raise errors.PayloadTooLarge(
            f"{shape[0]} images; the limit is {max_images}", code="too_many_images"
        )
    try:
        with warnings.catch_warnings():  # ragged lists: a warning in numpy 1.23, an error later
            warnings.simplefilter("error", np.VisibleDeprecationWarning)
            raw = np.asarray(spec.get("data"))
        if raw.dtype.kind not in "iuf":  # strings, booleans, nulls, ragged lists
            raise TypeError(f"data holds {raw.dtype.name} values")
        data = raw.astype(np.float32).reshape(shape)
    except (TypeError, ValueError, np.VisibleDeprecationWarning) as exc:
        raise errors.BadRequest(
            "input data does not match its shape or is not numeric", code="bad_tensor"
        ) from exc
    if not np.isfinite(data).all():
        raise errors.BadRequest("input data must be finite numbers", code="bad_tensor")
    if data.min() < 0 or data.max() > 1 + PIXEL_TOLERANCE:
        raise errors.BadRequest(
            f"pixels must be in [0, 1], not [{data.min():g}, {data.max():g}] (0-255 values: "
            "divide by 255; the server applies the model's own normalization)",
            code="bad_tensor",
        )
    return data, spec.get("name")


@bp.post("/models/<name>/infer")
@bp.post("/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None) -> Response:
    check_model_name(name)
    if request.mimetype != "application/json":
        raise errors.UnsupportedMediaType("the V2 infer endpoint takes application/json")
    body = handler.read_json(request, config().MAX_CONTENT_LENGTH)
    pixels, input_name = _tensor(body, config().MAX_IMAGES)
    request_id = body.get("id", "")
    if isinstance(request_id, bool) or not isinstance(request_id, str | int):
        raise errors.BadRequest('"id" must be a string', code="bad_tensor")
    mv = engine().version_for(parse_version(version))
    if input_name != mv.manifest["input"]["name"]:
        raise errors.BadRequest(
            f"unknown input {input_name!r}; this model's input is {mv.manifest['input']['name']!r}",
            code="bad_tensor",
        )
    norm = mv.manifest["normalization"]
    batch = normalize(pixels, norm)
    prediction = engine().predict(batch, mv.version)
    metrics.IMAGES.inc(len(batch))
    probs = prediction.probabilities
    return jsonify(
        {
            "model_name": prediction.name,
            "model_version": str(prediction.version),
            "id": str(request_id),  # a string, as the protocol says; an integer id is echoed so
            "outputs": [
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": list(probs.shape),
                    "data": [round(float(p), 6) for p in probs.ravel()],
                },
                {
                    "name": "digit",
                    "datatype": "INT64",
                    "shape": [len(probs)],
                    "data": [int(d) for d in probs.argmax(axis=1)],
                },
            ],
        }
    )
