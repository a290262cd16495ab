"""Warnings that point at the user's line, whichever of the library's functions led to them."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import warnings

_LIBRARY_DIRS = tuple(str(pathlib.Path(__file__).parents[1] / d) + os.sep for d in ("specpv_jax", "convert"))


class SpecPVWarning(UserWarning):
    """The library's warnings (filter them by this category)."""


def warn(message: str) -> None:
    """`warnings.warn(message, SpecPVWarning)` attributed to the first caller outside this library (and
    contextlib)."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and (frame.f_code.co_filename.startswith(_LIBRARY_DIRS)
                                        or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, SpecPVWarning, stacklevel=level)
