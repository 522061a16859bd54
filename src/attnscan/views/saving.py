"""Writing a figure: PNG / PDF / SVG by extension, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .._io import atomic_file
from ..errors import AttnscanError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SAVE_FORMATS", "save_figure"]

SAVE_FORMATS = ("png", "pdf", "svg")


def save_figure(fig: Figure, path: str | Path, dpi: int = 200) -> Path:
    """Write ``fig`` to ``path`` in the format of its extension (``.png`` at ``dpi``, ``.pdf``, ``.svg``).

    The file is written to a temporary file in the same directory and renamed over ``path`` in one step, so a reader
    never sees a partial figure. Raises :class:`~attnscan.errors.AttnscanError` for an unsupported extension, a
    missing parent directory or a non-positive ``dpi``. Returns ``path``.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in SAVE_FORMATS:
        raise AttnscanError(
            f"cannot save a figure as '{path.name}': unsupported extension '{path.suffix or '(none)'}'; "
            f"use {', '.join('.' + f for f in SAVE_FORMATS)}"
        )
    if not path.parent.is_dir():
        raise AttnscanError(f"cannot save {path}: directory {path.parent} does not exist; create it first")
    if dpi <= 0:
        raise AttnscanError(f"dpi must be positive, got {dpi}")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path
