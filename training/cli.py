"""Argument types shared by the training command lines: a bad value is an argparse
error (exit 2, one line) before any work, never a traceback minutes later."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def bounded(
    convert: Callable[[str], float], ok: Callable[[float], bool], want: str
) -> Callable[[str], float]:
    """An argparse type: ``convert`` the text, then require a finite value that is ``ok``."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
            good = math.isfinite(value) and ok(value)
        except (ValueError, OverflowError):  # isfinite(10**400): too big for a float
            good = False
        if not good:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {want}")
        return value

    return parse


def folder(text: str) -> str:
    """A folder argument: '' would silently mean the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a folder")
    return text
