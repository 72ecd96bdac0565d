"""Reading the store: list models and versions, resolve the newest, verify a version."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from store import manifest
from store.errors import ModelNotFound, StoreError, VerificationError
from store.manifest import MANIFEST, NAME_RE, VERSION_RE, is_version, sha256_file, validate_name


@dataclass(frozen=True)
class ModelVersion:
    """One published version: where its files are and what its manifest says."""

    name: str
    version: int
    path: Path
    manifest: dict

    @property
    def symbol_file(self) -> Path:
        return self.path / self.manifest["artifacts"]["symbol"]["file"]

    @property
    def params_file(self) -> Path:
        return self.path / self.manifest["artifacts"]["params"]["file"]

    def verify(self) -> None:
        """Check every artifact's sha256 against the manifest (VerificationError if not)."""
        for role, art in self.manifest["artifacts"].items():
            path = self.path / art["file"]
            try:
                if not path.is_file():
                    what = "is not a regular file" if os.path.lexists(path) else "is missing"
                    raise VerificationError(
                        f"{self.name} v{self.version}: {role} file {path} {what}"
                    )
                actual = sha256_file(path)
            except OSError as exc:
                raise VerificationError(
                    f"{self.name} v{self.version}: {role} file {path} unreadable ({exc})"
                ) from exc
            if actual != art["sha256"]:
                raise VerificationError(
                    f"{self.name} v{self.version}: {role} file {path.name} is corrupt "
                    f"(sha256 {actual[:12]}..., manifest says {art['sha256'][:12]}...)"
                )


class ModelStore:
    """A store folder, read side. Publishing is ``store.publishing``: only training writes."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name)
        )

    def versions(self, name: str) -> list[int]:
        """The published versions, ascending. A version folder that cannot be read is
        listed (``get`` then says why it is unusable); StoreError if the model's folder
        itself cannot be listed."""
        folder = self.root / validate_name(name)
        try:
            if not folder.is_dir():
                return []
            candidates = [p for p in folder.iterdir() if VERSION_RE.fullmatch(p.name)]
        except OSError as exc:
            raise StoreError(f"cannot list {folder}: {exc}") from exc
        return sorted(int(p.name) for p in candidates if has_manifest(p))

    def get(self, name: str, version: int) -> ModelVersion:
        path = self.version_path(name, version)
        if not is_version(str(version)) or not has_manifest(path):
            raise ModelNotFound(f"model {name!r} has no version {version}")
        return ModelVersion(
            name, version, path, manifest.read(path / MANIFEST, name=name, version=version)
        )

    def version_path(self, name: str, version: int) -> Path:
        """The folder of a version (which may not exist)."""
        return self.root / validate_name(name) / str(version)

    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        """A pinned version, or the newest one when ``version`` is None."""
        if version is None:
            versions = self.versions(name)
            if not versions:
                if not self.root.is_dir():
                    what = "is not a folder" if os.path.lexists(self.root) else "does not exist"
                    raise ModelNotFound(f"the model store {self.root} {what}")
                raise ModelNotFound(f"no published version of model {name!r} in {self.root}")
            version = versions[-1]
        return self.get(name, version)


def has_manifest(folder: Path) -> bool:
    """A complete version (its manifest is written last); one that cannot be looked
    into counts as published, so that reading it reports why it is unusable."""
    try:
        return (folder / MANIFEST).is_file()
    except OSError:
        return True
