"""The store's errors: one small hierarchy, caught as StoreError by both sides."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of the store's errors."""


class ModelNotFound(StoreError):
    pass


class ManifestError(StoreError):
    pass


class VerificationError(StoreError):
    pass


class PublishInterrupted(KeyboardInterrupt):
    """Ctrl-C arrived after the version was renamed into place: it is published."""

    def __init__(self, version: int):
        super().__init__(version)
        self.version = version
