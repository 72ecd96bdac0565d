"""digitserve inference service: the Flask app (``service.app.create_app``), served
by gunicorn (``service/gunicorn.conf.py``). It reads models through ``store``."""

import tomllib
from importlib import metadata
from pathlib import Path


def _version() -> str:
    try:
        return metadata.version("digitserve")
    except metadata.PackageNotFoundError:  # run from a tree that is not installed (the image)
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]


__version__ = _version()
