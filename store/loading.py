"""Load an exported version as it is served and run it in inference mode.

Used by the service's inference thread and by ``training.evaluate`` and
``training.train`` (the export check), so what is evaluated offline is exactly
what is served. Imports mxnet: import it where a model is loaded, not for reading.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.reading import ModelVersion

with warnings.catch_warnings():  # mxnet 1.9.1 imports deprecated numpy/stdlib APIs
    warnings.simplefilter("ignore", DeprecationWarning)
    import mxnet as mx
    from mxnet import gluon

log = logging.getLogger(__name__)


# Batch sizes that get a forward of their own. MXNet plans memory once per input shape
# (static_alloc/static_shape); a batch runs in the smallest bucket that holds it, padded,
# and a larger one in chunks of the largest. Past 32 images a forward gains little per
# image, and the buckets cost ~25 MB in all (docs/performance.md).
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclass
class _Bucket:
    block: gluon.SymbolBlock
    buffer: np.ndarray  # float32 (size, *input): a smaller batch is copied in, zero-padded


@dataclass
class LoadedModel:
    """A verified, loaded version. Not thread-safe: one thread calls ``predict``."""

    version: ModelVersion
    buckets: dict[int, _Bucket]

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
        on its own image (the padding rows of a bucket change nothing).
        """
        n, largest = len(batch), BUCKETS[-1]
        if n > largest:
            return np.concatenate(
                [self.logits(batch[i : i + largest]) for i in range(0, n, largest)]
            )
        bucket = self.buckets[next(size for size in BUCKETS if size >= n)]
        if len(bucket.buffer) == n:
            data = np.ascontiguousarray(batch, dtype=np.float32)
        else:
            data = bucket.buffer
            data.setflags(write=True)  # from_numpy(zero_copy=True) made it read-only
            data[:n] = batch
            data[n:] = 0
        # Zero-copy: ``data`` stays alive and unchanged until asnumpy() has the answer.
        out = bucket.block(mx.nd.from_numpy(data, zero_copy=True)).asnumpy()
        return out[:n]

    def self_test(self) -> None:
        """A forward on a blank input in every bucket: a version that cannot run, whose
        outputs do not match its labels, or that answers NaN (a diverged training run)
        fails here, at load time, instead of on requests."""
        labels = len(self.manifest["labels"])
        for size in BUCKETS:
            probs = self.predict(np.zeros_like(self.buckets[size].buffer))
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


def fuses() -> bool:
    """Whether this MXNet can fuse Convolution + BatchNorm + ReLU for inference (oneDNN)."""
    return mx.runtime.Features().is_enabled("MKLDNN")


def _bucket(symbol: mx.sym.Symbol, inputs: list, params: Any, shape: tuple) -> _Bucket:
    """One batch size's forward: the version's graph over the shared parameters, its
    memory planned once for that shape and, with oneDNN, BatchNorm folded into the
    convolutions (a third less time a forward, outputs within ~1e-6)."""
    block = gluon.SymbolBlock(symbol, inputs, params=params)
    buffer = np.zeros(shape, dtype=np.float32)
    if fuses():
        block.optimize_for(
            mx.nd.from_numpy(buffer, zero_copy=True),
            backend="MKLDNN",
            static_alloc=True,
            static_shape=True,
        )
    else:
        block.hybridize(static_alloc=True, static_shape=True)
    return _Bucket(block, buffer)


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
        symbol = mx.sym.load(str(version.symbol_file))
        inputs = [mx.sym.var(input_name)]
        sample = [1 if d < 0 else d for d in version.manifest["input"]["shape"]][1:]
        buckets = {
            size: _bucket(symbol, inputs, block.collect_params(), (size, *sample))
            for size in BUCKETS
        }
    loaded = LoadedModel(version, buckets)
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
