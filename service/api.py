"""The REST API: prediction, model information, health, metrics and admin."""

from __future__ import annotations

import hmac
import json
import time
from functools import cache
from importlib import resources
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from service import errors, handler, metrics
from service.config import Config
from service.inference import InferenceEngine
from store import ModelVersion, StoreError
from store.manifest import is_version

bp = Blueprint("api", __name__)


def engine() -> InferenceEngine:
    return current_app.extensions["digitserve.engine"]


def config() -> Config:
    return current_app.extensions["digitserve.config"]


def parse_version(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not is_version(raw):  # ASCII digits only: str.isdigit() also takes '²' and '١'
        raise errors.BadRequest(
            f"version must be a positive integer, not {raw!r}", code="bad_version"
        )
    return int(raw)


def check_model_name(name: str) -> None:
    if name != engine().name:
        raise errors.NotFound(
            f"no model named {name!r}; this server serves {engine().name!r}", code="model_not_found"
        )


def classify(version: int | None) -> Response:
    cfg = config()
    started = time.perf_counter()
    eng = engine()
    # The request itself, not its proxy: the handler reads some 20 attributes of it.
    images = handler.extract_images(request._get_current_object(), cfg)
    mv = eng.version_for(version)
    eng.check_capacity(len(images))
    with eng.preparing():  # the forward under way may wait for these images
        batch = handler.preprocess(images, mv.manifest["normalization"], cfg)
        future = handler.inference(eng, batch, mv)
    prediction = eng.result(future)
    body = handler.postprocess(prediction, mv.manifest["labels"])
    body["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    metrics.IMAGES.inc(len(images))
    # Plain floats, ints and strings: json.dumps as is (13 us; jsonify, which sorts the keys
    # through the app's JSON provider, 19).
    return Response(json.dumps(body, separators=(",", ":")), mimetype="application/json")


@bp.post("/predict")
def predict() -> Response:
    return classify(parse_version(request.args.get("version")))


@bp.post("/models/<name>/predict")
def predict_model(name: str) -> Response:
    check_model_name(name)
    return classify(parse_version(request.args.get("version")))


@bp.post("/models/<name>/versions/<version>/predict")
def predict_version(name: str, version: str) -> Response:
    check_model_name(name)
    return classify(parse_version(version))


def describe(mv: ModelVersion, *, full: bool = True) -> dict[str, Any]:
    m = mv.manifest
    summary = {
        "name": mv.name,
        "version": mv.version,
        "created": m.get("created"),
        "arch": m.get("arch"),
        "test_accuracy": m.get("metrics", {}).get("test_accuracy"),
        "input": m["input"],
        "labels": m["labels"],
    }
    if full:
        summary["manifest"] = {k: v for k, v in m.items() if k not in ("history",)}
    return summary


@bp.get("/metadata")
def metadata() -> Response:
    mv = engine().version_for(None)
    return jsonify(describe(mv))


@bp.get("/models")
def models() -> Response:
    eng = engine()
    eng.wait_started()
    current = eng.current
    refused = eng.refused
    versions = []
    try:
        published = eng.store.versions(eng.name)
        store_error = None
    except StoreError as exc:  # e.g. the store is unreadable: say so, keep serving
        published, store_error = [], str(exc)
    for v in published:
        entry: dict[str, Any] = {
            "version": v,
            "serving": current is not None and current.version == v,
        }
        if v in refused:
            entry["refused"] = refused[v]
        versions.append(entry)
    return jsonify(
        {
            "models": [
                {
                    "name": eng.name,
                    "serving_version": current.version if current else None,
                    "pinned": config().MODEL_VERSION is not None,
                    "versions": versions,
                    **({"store_error": store_error} if store_error else {}),
                }
            ]
        }
    )


@bp.get("/models/<name>")
def model(name: str) -> Response:
    check_model_name(name)
    return jsonify(describe(engine().version_for(None), full=False))


@bp.get("/models/<name>/versions/<version>")
def model_version(name: str, version: str) -> Response:
    check_model_name(name)
    return jsonify(describe(engine().version_for(parse_version(version))))


@bp.get("/health")
def health() -> tuple[Response, int]:
    alive = engine().alive
    return jsonify({"status": "ok" if alive else "inference thread stopped"}), (
        200 if alive else 503
    )


@bp.get("/ready")
def ready() -> tuple[Response, int]:
    eng = engine()
    current = eng.current
    if current is None or not eng.alive:
        return jsonify({"ready": False, "reason": eng.load_error or "loading the model"}), 503
    return jsonify({"ready": True, "model": current.name, "version": current.version}), 200


@bp.get("/metrics")
def metrics_page() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


@bp.post("/admin/reload")
def admin_reload() -> Response:
    token = config().ADMIN_TOKEN
    if not token:
        raise errors.ApiError(
            "admin endpoints are disabled; set DIGITSERVE_ADMIN_TOKEN", status=403, code="forbidden"
        )
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise errors.Unauthorized("missing or wrong admin token (Authorization: Bearer <token>)")
    current = engine().reload()
    return jsonify(
        {
            "serving_version": current.version if current else None,
            "refused": {str(k): v for k, v in engine().refused.items()},
        }
    )


@cache
def openapi_document() -> dict:
    return json.loads(resources.files("service").joinpath("openapi.json").read_text())


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())
