"""The model store: the one owner of its layout, manifest, reading, publishing and
loading. Training publishes through it and the service reads through it; it imports
neither of them.

Layout::

    <root>/<name>/<version>/<name>-symbol.json   # HybridBlock.export() output
    <root>/<name>/<version>/<name>-0000.params
    <root>/<name>/<version>/manifest.json        # written last, inside the temp dir

Versions are positive integers, monotonic and immutable; dot-folders are never
listed as versions. The modules, by concern:

- ``store.manifest``: the schema, its validation and strict JSON;
- ``store.reading``: ``ModelStore`` (list, resolve) and ``ModelVersion`` (verify);
- ``store.publishing``: ``publish`` and ``check_writable`` (training only);
- ``store.loading``: ``load`` a version as it is served (imports mxnet).
"""

from pathlib import Path

from store.errors import (
    ManifestError,
    ModelNotFound,
    PublishInterrupted,
    StoreError,
    VerificationError,
)
from store.reading import ModelStore, ModelVersion

# The repository's store, which ships the trained model.
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "model_store"

__all__ = [
    "DEFAULT_ROOT",
    "ManifestError",
    "ModelNotFound",
    "ModelStore",
    "ModelVersion",
    "PublishInterrupted",
    "StoreError",
    "VerificationError",
]
