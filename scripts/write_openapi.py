"""Write service/openapi.json (the API description the service serves).

    python scripts/write_openapi.py [--out service/openapi.json]

Edit this file, not the JSON; tests/test_openapi.py checks the document is a
valid OpenAPI 3.1 description whose paths and methods are exactly the app's, and that
this script still writes the committed file. It is long (about 380 lines) because it is
the document itself, written as Python data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "service" / "openapi.json"


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def json_response(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERR = {
    str(code): {"$ref": f"#/components/responses/{name}"}
    for code, name in [
        (400, "BadRequest"),
        (404, "NotFound"),
        (413, "TooLarge"),
        (415, "Unsupported"),
        (503, "Unavailable"),
    ]
}
REFUSED = {"409": {"$ref": "#/components/responses/Refused"}}
UNAVAILABLE = {"503": {"$ref": "#/components/responses/Unavailable"}}


def v2(responses: dict) -> dict:
    """The same error responses in the V2 protocol's shape ({"error": "<message>"})."""
    return {
        code: {"$ref": r["$ref"].replace("/responses/", "/responses/V2")} if "$ref" in r else r
        for code, r in responses.items()
    }


# Health and readiness answer 503 with their own body ({"ready": false, ...}), not an Error.
NOT_READY = {
    "503": json_response("Not live or not ready: the same body, false", {"type": "object"})
}
IMAGE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string", "format": "binary"},
                    }
                },
                "description": "One or more image files (any field name; 'image' by convention).",
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": ref("ImageJson")},
    },
}
VERSION_QUERY = {
    "name": "version",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1},
    "description": "Pin a model version (default: the serving one).",
}
NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
VERSION = {
    "name": "version",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}


def predict_op(summary: str, params: list, op_id: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "operationId": op_id,
            "parameters": params,
            "requestBody": IMAGE_BODY,
            "responses": {
                "200": json_response("Predictions", ref("PredictResponse")),
                **ERR,
                **REFUSED,
            },
        }
    }


def get_op(
    summary: str, op_id: str, schema: dict, params: list | None = None, extra: dict | None = None
) -> dict:
    responses = {"200": json_response(summary, schema)}
    if params:  # a malformed parameter, an unknown model or version
        responses |= {"400": ERR["400"], "404": ERR["404"]}
    op = {"summary": summary, "operationId": op_id, "responses": responses | (extra or {})}
    if params:
        op["parameters"] = params
    return {"get": op}


OBJ = {"type": "object"}
BINARY = {
    "schema": {
        "type": "string",
        "format": "binary",
        "description": "The binary tensor data extension: a JSON header of the length given "
        "by the Inference-Header-Content-Length header, then the raw little-endian tensors",
    }
}
V2_INFER_BODY = {
    "application/json": {"schema": ref("V2InferRequest")},
    "application/octet-stream": BINARY,
}
V2_INFER_OK = {
    "description": "Outputs (binary ones after a JSON header when asked for)",
    "content": {"application/json": {"schema": ref("V2InferResponse")}},
}
V2_INFER_OK["content"]["application/octet-stream"] = BINARY
DOC = {
    "openapi": "3.1.0",
    "info": {
        "title": "digitserve",
        "version": "0.1.0",
        "description": "Classifies handwritten digit images with an MXNet BatchNorm + Dropout "
        "CNN trained on MNIST. Every error has the shape "
        '{"error": {"code", "message"}}.',
    },
    "paths": {
        "/predict": predict_op("Classify one or more digit images", [VERSION_QUERY], "predict"),
        "/models/{name}/predict": predict_op(
            "Classify with a named model", [NAME, VERSION_QUERY], "predictModel"
        ),
        "/models/{name}/versions/{version}/predict": predict_op(
            "Classify with a pinned version", [NAME, VERSION], "predictVersion"
        ),
        "/metadata": get_op(
            "The serving model's manifest and version",
            "metadata",
            ref("ModelDescription"),
            extra=UNAVAILABLE,
        ),
        "/models": get_op("Models and their versions", "listModels", OBJ),
        "/models/{name}": get_op(
            "The serving version of a model",
            "getModel",
            ref("ModelDescription"),
            [NAME],
            extra=UNAVAILABLE,
        ),
        "/models/{name}/versions/{version}": get_op(
            "One version's manifest",
            "getModelVersion",
            ref("ModelDescription"),
            [NAME, VERSION],
            extra=REFUSED,
        ),
        "/health": get_op(
            "Liveness (the worker and its inference thread)",
            "health",
            OBJ,
            extra=NOT_READY,
        ),
        "/ready": get_op(
            "Readiness: 503 until the model is loaded",
            "ready",
            OBJ,
            extra=NOT_READY,
        ),
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": get_op("This document", "openapi", OBJ),
        "/admin/reload": {
            "post": {
                "summary": "Look for new versions now (every worker also polls the store)",
                "operationId": "adminReload",
                "security": [{"bearer": []}],
                "responses": {
                    "200": json_response("The serving version", OBJ),
                    "401": {"$ref": "#/components/responses/Error"},
                    "403": {"$ref": "#/components/responses/Error"},
                },
            }
        },
        "/": {
            "get": {
                "summary": "The drawing page",
                "operationId": "index",
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v2": get_op("KServe V2 server metadata", "v2ServerMetadata", OBJ),
        # The V2 paths' errors: the protocol's shape, see v2() below.
        "/v2/health/live": get_op("KServe V2 liveness", "v2Live", OBJ, extra=NOT_READY),
        "/v2/health/ready": get_op("KServe V2 readiness", "v2Ready", OBJ, extra=NOT_READY),
        "/v2/models/{name}": get_op(
            "KServe V2 model metadata", "v2ModelMetadata", OBJ, [NAME], extra=UNAVAILABLE
        ),
        "/v2/models/{name}/versions/{version}": get_op(
            "KServe V2 model version metadata",
            "v2ModelVersionMetadata",
            OBJ,
            [NAME, VERSION],
            extra=REFUSED,
        ),
        "/v2/models/{name}/ready": get_op(
            "KServe V2 model readiness", "v2ModelReady", OBJ, [NAME], extra=NOT_READY
        ),
        "/v2/models/{name}/versions/{version}/ready": get_op(
            "KServe V2 model version readiness (false when refused)",
            "v2ModelVersionReady",
            OBJ,
            [NAME, VERSION],
            extra=NOT_READY,
        ),
        "/v2/models/{name}/infer": {
            "post": {
                "summary": "KServe V2 inference on an FP32 [N,1,28,28] tensor of [0,1] pixels",
                "operationId": "v2Infer",
                "parameters": [NAME],
                "requestBody": {
                    "required": True,
                    "content": V2_INFER_BODY,
                },
                "responses": {"200": V2_INFER_OK, **ERR},
            }
        },
        "/v2/models/{name}/versions/{version}/infer": {
            "post": {
                "summary": "KServe V2 inference with a pinned version",
                "operationId": "v2InferVersion",
                "parameters": [NAME, VERSION],
                "requestBody": {
                    "required": True,
                    "content": V2_INFER_BODY,
                },
                "responses": {
                    "200": V2_INFER_OK,
                    **ERR,
                    **REFUSED,
                },
            }
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "responses": {
            name: json_response(desc, ref("Error"))
            for name, desc in [
                ("Error", "Error"),
                (
                    "BadRequest",
                    "No image, undecodable or blank image, bad JSON/base64, bad version, "
                    "a body cut short or badly chunked",
                ),
                ("NotFound", "Unknown route, model or version"),
                ("TooLarge", "Body, image count or pixel count over the limit"),
                ("Unsupported", "Unsupported content type or image format"),
                ("Refused", "The requested version failed verification or loading"),
                ("Unavailable", "Not ready, overloaded or timed out; retry"),
            ]
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                    }
                },
            },
            "V2Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {"type": "string", "description": "The message"},
                    "code": {"type": ["string", "null"], "description": "The API's error code"},
                },
            },
            "ImageJson": {
                "type": "object",
                "description": "Base64 (or data: URL) images.",
                "properties": {
                    "image": {"type": "string"},
                    "images": {"type": "array", "items": {"type": "string"}},
                },
            },
            "Prediction": {
                "type": "object",
                "required": ["digit", "confidence", "probabilities"],
                "properties": {
                    "digit": {"type": "integer", "minimum": 0, "maximum": 9},
                    "confidence": {"type": "number"},
                    "probabilities": {
                        "type": "array",
                        "items": {"type": "number"},
                        "minItems": 10,
                        "maxItems": 10,
                    },
                },
            },
            "PredictResponse": {
                "type": "object",
                "required": ["model", "predictions"],
                "properties": {
                    "model": {
                        "type": "object",
                        "required": ["name", "version"],
                        "properties": {"name": {"type": "string"}, "version": {"type": "integer"}},
                    },
                    "digit": {"type": "integer", "description": "One-image requests only"},
                    "confidence": {"type": "number", "description": "One-image requests only"},
                    "predictions": {"type": "array", "items": ref("Prediction")},
                    "latency_ms": {"type": "number"},
                },
            },
            "ModelDescription": {
                "type": "object",
                "required": ["name", "version"],
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "integer"},
                    "test_accuracy": {"type": ["number", "null"]},
                    "manifest": {"type": "object"},
                },
            },
            "V2InferRequest": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "inputs": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "shape", "datatype"],
                            "properties": {
                                "name": {"type": "string"},
                                "parameters": {
                                    "type": "object",
                                    "properties": {"binary_data_size": {"type": "integer"}},
                                },
                                "shape": {
                                    "type": "array",
                                    "description": "[N, 1, 28, 28]",
                                    "prefixItems": [
                                        {"type": "integer", "minimum": 1},
                                        {"const": 1},
                                        {"const": 28},
                                        {"const": 28},
                                    ],
                                    "minItems": 4,
                                    "items": False,
                                },
                                "datatype": {"const": "FP32"},
                                "data": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {"type": ["number", "array"]},
                                    "description": "N*784 finite numbers in row-major "
                                    "order, flat or nested as the shape (or none, and "
                                    "parameters.binary_data_size bytes after the header)",
                                },
                            },
                        },
                    },
                    "outputs": {
                        "type": "array",
                        "description": "The outputs to send (default: all), each in binary "
                        "with parameters.binary_data",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"enum": ["probabilities", "digit"]},
                                "parameters": {"type": "object"},
                            },
                        },
                    },
                    "parameters": {
                        "type": "object",
                        "description": "binary_data_output: every output in binary",
                    },
                },
            },
            "V2InferResponse": {
                "type": "object",
                "required": ["model_name", "model_version", "outputs"],
                "properties": {
                    "model_name": {"type": "string"},
                    "model_version": {"type": "string"},
                    "id": {"type": "string"},
                    "outputs": {"type": "array"},
                },
            },
        },
    },
}

for _path, _ops in DOC["paths"].items():
    if _path == "/v2" or _path.startswith("/v2/"):
        for _op in _ops.values():
            _op["responses"] = v2(_op["responses"])
DOC["components"]["responses"] |= {
    "V2" + name: json_response(r["description"], ref("V2Error"))
    for name, r in list(DOC["components"]["responses"].items())
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.parse_args().out.write_text(json.dumps(DOC, indent=2) + "\n")
