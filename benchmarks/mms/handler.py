"""A minimal MMS handler for digitserve's exported MNIST model, written as a typical MMS
user would: one image per request, Pillow decode, a Gluon SymbolBlock forward pass.

benchmarks/compare_mms.py archives it with model-archiver next to the model files and
the model's manifest.json (file names, input name, normalization, labels). It runs in
MMS's own Python (Python 3.11, mxnet 1.9.1), not in the project's venv.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import mxnet as mx
import numpy as np
from PIL import Image


class MnistService:
    def __init__(self) -> None:
        self.net: Any = None
        self.mean = 0.0
        self.std = 1.0
        self.labels: list[str] = []

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "manifest.json")) as f:
            manifest = json.load(f)
        self.mean = float(manifest["normalization"]["mean"])
        self.std = float(manifest["normalization"]["std"])
        self.labels = list(manifest["labels"])
        files = manifest["artifacts"]
        self.net = mx.gluon.SymbolBlock.imports(
            os.path.join(model_dir, files["symbol"]["file"]),
            [manifest["input"]["name"]],
            os.path.join(model_dir, files["params"]["file"]),
            ctx=mx.cpu(),
        )
        self.net.hybridize()

    def predict(self, body: bytes) -> dict[str, Any]:
        image = Image.open(io.BytesIO(body)).convert("L").resize((28, 28))
        x = (np.asarray(image, np.float32) / 255.0 - self.mean) / self.std
        data = mx.nd.array(x.reshape(1, 1, 28, 28))
        probs = mx.nd.softmax(self.net(data)).asnumpy()[0]
        best = int(probs.argmax())
        return {
            "digit": self.labels[best],
            "predictions": {label: float(p) for label, p in zip(self.labels, probs, strict=True)},
        }


_service = MnistService()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
    """MMS entry point: ``data`` is a batch of requests (one here, batch size 1)."""
    if _service.net is None:
        _service.initialize(context)
    if data is None:  # MMS calls the handler with None once to initialize
        return None
    out = []
    for request in data:
        body = request.get("body") or request.get("data")
        out.append(json.dumps(_service.predict(bytes(body))))
    return out
