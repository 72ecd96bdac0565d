"""Load an exported version as it is served and run it in inference mode.

Used by the service's inference thread and by ``training.evaluate`` and
``training.train`` (the export check), so what is evaluated offline is exactly
what is served. Imports mxnet: import it where a model is loaded, not for reading.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from store.reading import ModelVersion

with warnings.catch_warnings():  # mxnet 1.9.1 imports deprecated numpy/stdlib APIs
    warnings.simplefilter("ignore", DeprecationWarning)
    import mxnet as mx
    from mxnet import gluon

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A verified, loaded version. Not thread-safe: one thread calls ``predict``."""

    version: ModelVersion
    block: gluon.SymbolBlock

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def manifest(self) -> dict:
        return self.version.manifest

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 1, 28, 28) normalized input -> (N, classes) logits.

        Called outside ``autograd.record()``/``train_mode()``: BatchNorm uses its
        running statistics and Dropout is the identity, so each row depends only
        on its own image.
        """
        # Zero-copy: the engine's thread keeps ``batch`` alive and unchanged meanwhile.
        data = mx.nd.from_numpy(np.ascontiguousarray(batch, dtype=np.float32), zero_copy=True)
        return self.block(data).asnumpy()

    def self_test(self) -> None:
        """One forward on a blank input: a version that cannot run, whose outputs do not
        match its labels, or that answers NaN (a diverged training run) fails here, at
        load time, instead of on requests. Also warms up the static allocation."""
        shape = [1 if d < 0 else d for d in self.manifest["input"]["shape"]]
        probs = self.predict(np.zeros(shape, dtype=np.float32))
        labels = len(self.manifest["labels"])
        if probs.shape[-1] != labels:
            raise ValueError(
                f"the model has {probs.shape[-1]} outputs, the manifest {labels} labels"
            )
        if not np.isfinite(probs).all():
            raise ValueError("the model's outputs are not finite (NaN or infinity)")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (softmax of the logits), float64 rows summing to 1."""
        logits = self.logits(batch).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)


def load(version: ModelVersion, ctx: mx.Context | None = None) -> LoadedModel:
    """Verify the artifacts' sha256, ``SymbolBlock.imports`` them and self-test.

    Raises VerificationError for a corrupt version and mxnet.MXNetError
    (or ValueError/OSError) for files MXNet cannot load or a model that cannot
    serve; ``failure_reason`` says why in one line.
    """
    version.verify()
    input_name = version.manifest["input"]["name"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SymbolBlock.imports warns about unnamed inputs
        block = gluon.SymbolBlock.imports(
            str(version.symbol_file), [input_name], str(version.params_file), ctx=ctx or mx.cpu()
        )
    block.hybridize(static_alloc=True)
    loaded = LoadedModel(version, block)
    loaded.self_test()
    log.info("loaded model %s v%d from %s", version.name, version.version, version.path)
    return loaded


def failure_reason(exc: BaseException) -> str:
    """One line saying why a load failed. MXNetError's text starts with a C++
    traceback header; its cause is on the last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    name = type(exc).__name__
    return (line if line.startswith(name) else f"{name}: {line}")[:500]
