"""Give an empty model store its first version: the model shipped in the image.

    python -m store.seeding --into /var/lib/digitserve/store [--from /app/model_store]

A new PersistentVolumeClaim is empty, and a server on an empty store never becomes
ready. This copies the newest version of the shipped store (``--from``, the image's
own) into the store on the volume, through the store's atomic publish, when the
volume's store holds no version of the model yet; otherwise it does nothing, so it
is safe to run at every deploy (the Kubernetes manifests run it as a Job). The copy
is verified against its manifest's checksums first, and keeps the shipped
manifest's training record; the store numbers it (1 in an empty store).

Exit status: 0 seeded or nothing to do, 1 on an error (message on stderr).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from store import DEFAULT_ROOT, ModelStore, ModelVersion, StoreError
from store.publishing import publish

# What publish sets itself; everything else of the shipped manifest is kept.
_SET_BY_PUBLISH = ("schema_version", "name", "version", "artifacts")


def seed(into: ModelStore, source: ModelStore, name: str) -> ModelVersion | None:
    """The version published into ``into``, or None when it already had one."""
    if into.versions(name):
        return None
    shipped = source.resolve(name)
    shipped.verify()
    roles = {role: art["file"] for role, art in shipped.manifest["artifacts"].items()}

    def write(folder: Path) -> dict[str, str]:
        for file in roles.values():
            shutil.copyfile(shipped.path / file, folder / file)
        return roles

    manifest = {k: v for k, v in shipped.manifest.items() if k not in _SET_BY_PUBLISH}
    manifest["seeded_from"] = {"store": str(source.root), "version": shipped.version}
    return publish(into, name, write, manifest)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m store.seeding", description=__doc__)
    p.add_argument("--into", required=True, type=Path, help="the store to seed")
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=DEFAULT_ROOT,
        help="the shipped store (default: the image's, %(default)s)",
    )
    p.add_argument("--name", default="mnist", help="model name (%(default)s)")
    args = p.parse_args(argv)
    try:
        published = seed(ModelStore(args.into), ModelStore(args.source), args.name)
    except StoreError as exc:
        print(f"seeding: {exc}", file=sys.stderr)
        return 1
    if published is None:
        print(f"{args.into} already holds {args.name!r}: nothing to do")
    else:
        print(f"seeded {args.into} with {args.name} v{published.version} from {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
