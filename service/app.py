"""The Flask application factory.

    gunicorn -c service/gunicorn.conf.py "service.app:create_app()"

Each gunicorn worker calls ``create_app`` after the fork, so each loads the
model itself and owns one inference thread (see service.inference).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, g, jsonify, request
from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge

from service import api, errors, metrics, v2
from service.config import Config
from service.inference import InferenceEngine
from store import StoreError

log = logging.getLogger("service")


def create_app(config: Config | Mapping[str, Any] | None = None) -> Flask:
    """``config``: a Config, or overrides for the environment-derived one."""
    if not isinstance(config, Config):
        config = Config.from_env(**dict(config or {}))
    logging.basicConfig(
        level=config.LOG_LEVEL.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config.from_mapping(
        MAX_CONTENT_LENGTH=config.MAX_CONTENT_LENGTH,
        MAX_FORM_PARTS=config.MAX_IMAGES + 16,
        MAX_FORM_MEMORY_SIZE=500_000,  # a form field that is not a file (Flask's default)
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False
    # '/models//mnist' is a 404 in the one error shape, not an HTML redirect to '/models/mnist'.
    app.url_map.merge_slashes = False
    app.extensions["digitserve.config"] = config
    app.extensions["digitserve.engine"] = InferenceEngine(config).start()
    app.register_blueprint(api.bp)
    app.register_blueprint(v2.bp)
    register_error_handlers(app)
    register_metrics(app)

    @app.get("/")
    def index() -> Response:
        return app.send_static_file("index.html")

    return app


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(errors.ApiError)
    def api_error(exc: errors.ApiError) -> tuple[Response, int]:
        response = jsonify(exc.to_dict())
        response.headers.update(exc.headers)
        if exc.status == 413 or isinstance(exc, errors.BadBody):
            # The body may be unread or unreadable: gunicorn closes the connection after
            # this answer, so the answer says so (honoured by gunicorn.conf.py).
            response.headers["Connection"] = "close"
        return response, exc.status

    @app.errorhandler(RequestEntityTooLarge)  # werkzeug's own: the body or the form parser
    def too_large(exc: RequestEntityTooLarge) -> tuple[Response, int]:
        limit, declared = app.config["MAX_CONTENT_LENGTH"], request.content_length
        body = f"request body is over the limit of {limit} bytes"
        form = (
            f"at most {app.config['MAX_FORM_PARTS']} parts and "
            f"{app.config['MAX_FORM_MEMORY_SIZE']} bytes in a field that is not a file"
        )
        if declared is None:  # chunked: werkzeug does not say which limit it was
            error = errors.PayloadTooLarge(f"{body}, or its form over its limits ({form})")
        elif declared <= limit:
            error = errors.PayloadTooLarge(
                f"the form is over its limits: {form}", code="form_too_large"
            )
        else:
            error = errors.PayloadTooLarge(body)
        return api_error(error)

    @app.errorhandler(StoreError)  # the store went unreadable under a running server
    def store_error(exc: StoreError) -> tuple[Response, int]:
        log.warning("model store: %s", exc)
        return api_error(
            errors.ServiceUnavailable(
                f"the model store cannot be read: {exc}", code="store_unavailable"
            )
        )

    # Raised while the body is read (by us or by werkzeug's form parser): a bad chunk
    # size, a missing chunk terminator, or a client that went away mid-body.
    @app.errorhandler(ParseException)
    @app.errorhandler(NoMoreData)
    @app.errorhandler(ClientDisconnected)
    def unreadable_body(exc: Exception) -> tuple[Response, int]:
        return api_error(errors.BadBody(f"the request body is malformed or cut short ({exc})"))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        code = (exc.name or "error").lower().replace(" ", "_")
        status = exc.code or 500
        response = jsonify({"error": {"code": code, "message": exc.description or exc.name}})
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response, status

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(
            {"error": {"code": "internal_error", "message": "internal server error"}}
        ), 500


def register_metrics(app: Flask) -> None:
    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def record(response: Response) -> Response:
        served = request._get_current_object()  # three reads: one proxy lookup
        rule = served.url_rule.rule if served.url_rule is not None else "<unmatched>"
        status = str(response.status_code)
        method = served.method if served.method in metrics.METHODS else "other"
        count, latency = metrics.request_series(rule, method, status)
        count.inc()
        latency.observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response
