"""The version registry: which version is served, which are loaded, which refused.

Its methods that load or refuse run on the engine's thread only (``refresh``,
``model``); request threads read ``current``, ``refused`` and ``manifest``.
The loader is passed in: the service gives ``store.loading.load``, unit tests a
numpy stand-in, so the lifecycle is tested without MXNet.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np

from service import errors, metrics
from store import ModelNotFound, ModelStore, ModelVersion, StoreError

log = logging.getLogger(__name__)


class Model(Protocol):
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, 1, 28, 28) normalized input -> (N, classes) probabilities."""
        ...


Loader = Callable[[ModelVersion], Model]
FolderSignature = tuple[tuple[str, int, int], ...] | None


def default_loader(version: ModelVersion) -> Model:
    from store import loading  # mxnet is imported on the engine thread only

    return loading.load(version)


def default_failure_reason(exc: BaseException) -> str:
    from store import loading

    return loading.failure_reason(exc)


class VersionRegistry:
    def __init__(
        self,
        store: ModelStore,
        name: str,
        *,
        pinned: int | None = None,
        keep_loaded: int = 3,
        loader: Loader = default_loader,
        failure_reason: Callable[[BaseException], str] = default_failure_reason,
    ):
        self.store = store
        self.name = name
        self.pinned = pinned
        self.keep_loaded = max(1, keep_loaded)
        self._loader = loader
        self._failure_reason = failure_reason
        self._loaded: collections.OrderedDict[int, Model] = collections.OrderedDict()
        self._refused: dict[int, str] = {}
        self._refused_as: dict[int, FolderSignature] = {}  # the folder's signature then
        self._manifests: dict[int, ModelVersion] = {}
        self._unexpected: set[int] = set()  # versions whose reading raised a surprise
        self._listing_error: str | None = None
        self.current: ModelVersion | None = None
        self.ready = threading.Event()  # set once a version serves
        self.load_error: str | None = None

    @property
    def refused(self) -> dict[int, str]:
        return dict(self._refused)

    def loaded(self, version: int) -> Model | None:
        return self._loaded.get(version)

    def manifest(self, version: int) -> ModelVersion:
        """A version's verified manifest (cached). NotFound for an unknown version,
        Conflict for a refused or unreadable one."""
        reason = self._refused.get(version)  # one read: the engine thread may forget it
        if reason is not None:
            raise errors.Conflict(
                f"{self.name} v{version} was refused: {reason}", code="version_refused"
            )
        cached = self._manifests.get(version)
        if cached is not None:
            return cached
        try:
            mv = self.store.get(self.name, version)
        except ModelNotFound as exc:
            raise errors.NotFound(str(exc), code="version_not_found") from exc
        except StoreError as exc:
            raise errors.Conflict(
                f"{self.name} v{version} is unusable: {exc}", code="version_refused"
            ) from exc
        except Exception as exc:  # whatever a version folder holds must not kill the engine
            if version not in self._unexpected:  # not a traceback per pinned request
                self._unexpected.add(version)
                log.exception("reading %s v%d failed unexpectedly", self.name, version)
            raise errors.Conflict(
                f"{self.name} v{version} is unusable: {type(exc).__name__}",
                code="version_refused",
            ) from exc
        self._manifests[version] = mv
        return mv

    def model(self, version: int) -> Model:
        """The loaded model of ``version``, loading it first if needed (Conflict if refused)."""
        model = self._loaded.get(version)
        if model is not None:
            self._loaded.move_to_end(version)
            return model
        signature = self.folder_signature(version)
        return self._load(self.manifest(version), signature)

    def _load(self, mv: ModelVersion, signature: FolderSignature) -> Model:
        """``signature``: the folder before its manifest was read, so a copy that
        completes during a failed load is still retried."""
        try:
            loaded = self._loader(mv)  # verified, loaded and self-tested
        except Exception as exc:
            reason = self._failure_reason(exc)
            self._refuse(mv.version, reason, signature)
            raise errors.Conflict(
                f"{mv.name} v{mv.version} was refused: {reason}", code="version_refused"
            ) from exc
        metrics.MODEL_LOADS.labels(result="loaded").inc()
        self._loaded[mv.version] = loaded
        while len(self._loaded) > self.keep_loaded:
            oldest = next(iter(self._loaded))
            if self.current is not None and oldest == self.current.version:
                self._loaded.move_to_end(oldest)
                oldest = next(iter(self._loaded))
            del self._loaded[oldest]
        return loaded

    def _refuse(self, version: int, reason: str, signature: FolderSignature) -> None:
        """Never serve ``version`` (until ``forget_refusals``, or until its folder
        changes from ``signature``)."""
        self._refused[version] = reason
        self._refused_as[version] = signature
        metrics.MODEL_LOADS.labels(result="refused").inc()
        log.error("refusing %s v%d: %s", self.name, version, reason)

    def folder_signature(self, version: int) -> FolderSignature:
        """What a version folder holds (names, sizes, times): a refused version is
        retried when this changes, e.g. once a copy made file by file is complete."""
        entries = []
        try:
            for path in self.store.version_path(self.name, version).iterdir():
                st = path.stat()
                entries.append((path.name, st.st_size, st.st_mtime_ns))
        except OSError:
            return None
        return tuple(sorted(entries))

    def forget_refusals(self, changed_only: bool = False) -> None:
        for version in list(self._refused):
            if not changed_only or self.folder_signature(version) != self._refused_as.get(version):
                del self._refused[version], self._refused_as[version]
                self._manifests.pop(version, None)

    def refresh(self, initial: bool = False) -> None:
        """Serve the pinned version, or swap to the newest loadable one."""
        try:
            pinned = self.pinned
            candidates = [pinned] if pinned is not None else self.store.versions(self.name)
        except (OSError, StoreError) as exc:
            if str(exc) != self._listing_error:  # once, not at every poll
                log.warning("cannot list the model store: %s", exc)
            self._listing_error = str(exc)
            if initial and self.current is None:
                self.load_error = f"cannot list the model store: {exc}"
            return
        self._listing_error = None
        self.forget_refusals(changed_only=True)
        serving = self.current.version if self.current else 0
        for version in sorted(candidates, reverse=True):
            if version <= serving:
                break
            if version in self._refused:
                continue
            signature = self.folder_signature(version)
            try:
                mv = self.manifest(version)
                self._load(mv, signature)
            except errors.ApiError as exc:
                if isinstance(exc, errors.Conflict) and version not in self._refused:
                    self._refuse(version, exc.message, signature)  # a bad manifest
                if initial:
                    self.load_error = exc.message
                continue
            self.current = mv
            self.ready.set()
            self.load_error = None
            metrics.MODEL_VERSION.labels(model=self.name).set(mv.version)
            log.info(
                "now serving %s v%d%s", mv.name, mv.version, "" if initial else f" (was v{serving})"
            )
            return
        if initial and self.current is None:
            if self.load_error is None:
                self.load_error = f"no loadable version of {self.name!r} in {self.store.root}"
            log.warning("nothing to serve yet: %s", self.load_error)
