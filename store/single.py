"""Where the served model comes from: a versioned store, or one exported version.

KServe's storage initializer (and any ``storageUri`` set-up) leaves a model in
``/mnt/models``: here that is one exported version, the folder the store keeps
per version (symbol, params, ``manifest.json``) without the ``<name>/<version>``
layout around it. ``open_store`` looks at the folder and picks:

- ``<dir>/manifest.json`` exists: a single version (``SingleVersionStore``);
- otherwise: the versioned store (``ModelStore``), ``<dir>/<name>/<version>/``.

A single version is served under the name the server is given (KServe passes the
InferenceService's name), whatever name its manifest records; its version number
is the manifest's. The folder is watched like a store: if its files are replaced by
another version, the poll picks that up, and a broken copy is refused as usual.
"""

from __future__ import annotations

import os
from pathlib import Path

from store import manifest
from store.errors import ModelNotFound, StoreError
from store.manifest import MANIFEST, validate_name
from store.reading import ModelStore, ModelVersion


class SingleVersionStore:
    """One exported version in ``root``, read through the store's reading interface
    (``versions``, ``get``, ``resolve``, ``version_path``), under any served name."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def models(self) -> list[str]:
        """No name of its own: the server names the model it serves."""
        return []

    def _manifest(self) -> dict:
        path = self.root / MANIFEST
        if not os.path.lexists(path):
            raise ModelNotFound(f"{self.root} holds no {MANIFEST}")
        return manifest.read(path)

    def versions(self, name: str) -> list[int]:
        """The folder's one version; [] while it has no manifest (a copy under way).
        StoreError if the manifest cannot be read: the registry reports it."""
        validate_name(name)
        try:
            return [self._manifest()["version"]]
        except ModelNotFound:
            return []

    def get(self, name: str, version: int) -> ModelVersion:
        data = self._manifest()
        if data["version"] != version:
            raise ModelNotFound(
                f"{self.root} holds version {data['version']} of the model, not {version}"
            )
        return ModelVersion(validate_name(name), version, self.root, data)

    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        if version is None:
            versions = self.versions(name)
            if not versions:
                raise ModelNotFound(f"{self.root} holds no {MANIFEST}")
            version = versions[0]
        return self.get(name, version)

    def version_path(self, name: str, version: int) -> Path:
        return self.root


def is_single_version(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is one exported version rather than a versioned store."""
    return os.path.lexists(Path(folder) / MANIFEST)


def open_store(folder: str | os.PathLike[str]) -> ModelStore | SingleVersionStore:
    return SingleVersionStore(folder) if is_single_version(folder) else ModelStore(folder)


__all__ = ["ModelStore", "SingleVersionStore", "StoreError", "is_single_version", "open_store"]
