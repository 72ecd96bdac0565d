"""The KServe V2 / Open Inference Protocol REST endpoints.

``/v2/models/{name}/infer`` takes one FP32 input of shape [N, 1, 28, 28]: MNIST
pixel intensities in [0, 1] (light ink on dark, digit centred); the server
applies the model's normalization. It returns ``probabilities`` FP32 [N, 10]
and ``digit`` INT64 [N], or those of them the request's ``outputs`` name.

Errors under /v2 take the protocol's shape, ``{"error": "<message>"}``, with the
API's machine-readable ``code`` beside it. The binary tensor data extension
(``Inference-Header-Content-Length``: a JSON header, then raw little-endian
tensors), which KServe's SDK uses by default, is accepted for the input and used
for the outputs a request asks to get in binary.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify, request

from service import __version__, errors, handler, metrics
from service.api import check_model_name, config, engine, parse_version
from store.manifest import normalize

bp = Blueprint("v2", __name__, url_prefix="/v2")
SERVER = {"name": "digitserve", "version": __version__, "extensions": ["binary_tensor_data"]}
PIXEL_TOLERANCE = 1e-3  # float rounding in a client's 0-1 scaling
BINARY_HEADER = "Inference-Header-Content-Length"
OUTPUTS = {"probabilities": ("FP32", "<f4"), "digit": ("INT64", "<i8")}


@bp.after_app_request
def protocol_error_shape(response: Response) -> Response:
    """Every error answer under /v2, routing errors included (blueprint handlers do not
    see those), in the protocol's shape: the message as a string in "error"."""
    if request.path != "/v2" and not request.path.startswith("/v2/"):
        return response
    if response.status_code < 400 or not response.is_json:
        return response
    body = response.get_json(silent=True)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        shaped = {"error": str(error.get("message", "")), "code": error.get("code")}
        response.set_data(json.dumps(shaped))
    return response


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


def _body() -> dict:
    """The request's JSON object, and the binary tensors after it, if any, as
    ``body["_binary"]``: the bytes after the JSON header."""
    cfg_limit = config().MAX_CONTENT_LENGTH
    header_length = request.headers.get(BINARY_HEADER)
    if header_length is None:
        if request.mimetype != "application/json":
            raise errors.UnsupportedMediaType(
                "the V2 infer endpoint takes application/json, or a JSON header and binary "
                f"tensors with {BINARY_HEADER}"
            )
        body = handler.read_json(request, cfg_limit)
        binary = b""
    else:
        raw = handler.read_body(request, cfg_limit)
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise errors.BadRequest(
                f"{BINARY_HEADER} must be the length of the JSON header, at most the "
                f"body's {len(raw)} bytes",
                code="bad_tensor",
            )
        try:
            body = json.loads(raw[: int(header_length)])
        except (ValueError, RecursionError) as exc:
            raise errors.BadRequest("the JSON header is not valid JSON", code="bad_json") from exc
        binary = raw[int(header_length) :]
    if not isinstance(body, dict):
        raise errors.BadRequest("the inference request must be a JSON object", code="bad_tensor")
    body["_binary"] = binary
    return body


def _parameters(holder: dict, what: str) -> dict:
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise errors.BadRequest(f"{what} parameters must be an object", code="bad_tensor")
    return params


def _tensor(body: dict, max_images: int) -> tuple[np.ndarray, str | None]:
    if (
        not isinstance(body.get("inputs"), list)
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
    binary_size = _parameters(spec, "input").get("binary_data_size")
    if binary_size is not None:
        data = _binary_tensor(body["_binary"], binary_size, shape, "data" in spec)
    else:
        if body["_binary"]:
            raise errors.BadRequest(
                "binary data follows the JSON header, but the input has no binary_data_size",
                code="bad_tensor",
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


def _binary_tensor(binary: bytes, size: Any, shape: list[int], has_data: bool) -> np.ndarray:
    expected = int(np.prod(shape)) * 4
    if has_data:
        raise errors.BadRequest(
            "an input has either data or binary_data_size, not both", code="bad_tensor"
        )
    if isinstance(size, bool) or not isinstance(size, int) or size != expected:
        raise errors.BadRequest(
            f"binary_data_size must be {expected} (FP32 {shape}), not {size!r}",
            code="bad_tensor",
        )
    if len(binary) != size:
        raise errors.BadRequest(
            f"{len(binary)} bytes follow the JSON header; binary_data_size says {size}",
            code="bad_tensor",
        )
    return np.frombuffer(binary, dtype="<f4").astype(np.float32).reshape(shape)


def _requested_outputs(body: dict) -> dict[str, bool]:
    """Output name -> whether to send it in binary, in the order to send them."""
    binary_default = _parameters(body, "request").get("binary_data_output", False)
    requested = body.get("outputs")
    if requested is None:
        return {name: bool(binary_default) for name in OUTPUTS}
    if not isinstance(requested, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested
    ):
        raise errors.BadRequest('"outputs" must be a list of {"name": ...}', code="bad_tensor")
    chosen: dict[str, bool] = {}
    for output in requested:
        if output["name"] not in OUTPUTS:
            raise errors.BadRequest(
                f"unknown output {output['name']!r}; this model's outputs are "
                + ", ".join(repr(name) for name in OUTPUTS),
                code="bad_tensor",
            )
        binary = _parameters(output, "output").get("binary_data", binary_default)
        chosen[output["name"]] = bool(binary)
    return chosen


@bp.post("/models/<name>/infer")
@bp.post("/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None) -> Response:
    check_model_name(name)
    body = _body()
    pixels, input_name = _tensor(body, config().MAX_IMAGES)
    wanted = _requested_outputs(body)
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
    tensors = {"probabilities": probs.astype(np.float32), "digit": probs.argmax(axis=1)}
    outputs, blobs = [], []
    for output_name, binary in wanted.items():
        datatype, wire = OUTPUTS[output_name]
        tensor = tensors[output_name]
        out: dict[str, Any] = {
            "name": output_name,
            "datatype": datatype,
            "shape": list(tensor.shape),
        }
        if binary:
            blobs.append(tensor.astype(wire).tobytes())
            out["parameters"] = {"binary_data_size": len(blobs[-1])}
        elif output_name == "probabilities":
            out["data"] = [round(float(p), 6) for p in tensor.ravel()]
        else:
            out["data"] = [int(d) for d in tensor]
        outputs.append(out)
    answer = {
        "model_name": prediction.name,
        "model_version": str(prediction.version),
        "id": str(request_id),  # a string, as the protocol says; an integer id is echoed so
        "outputs": outputs,
    }
    if not blobs:
        return jsonify(answer)
    header = json.dumps(answer, separators=(",", ":")).encode()
    response = Response(b"".join([header, *blobs]), content_type="application/octet-stream")
    response.headers[BINARY_HEADER] = str(len(header))
    return response
