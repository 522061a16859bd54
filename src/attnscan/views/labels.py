"""Readable model labels: the names that key results, tables and figure rows."""

from __future__ import annotations

import re
from collections.abc import Collection

__all__ = ["model_label", "unique_label"]


def model_label(spec: str) -> str:
    """A readable model name from a model spec: the embedded name as is, the last part of a hub id or path, without
    a ``.gguf`` suffix (``"meta-llama/Llama-3.1-8B"`` -> ``"Llama-3.1-8B"``, ``"/m/tiny.gguf"`` -> ``"tiny"``)."""
    parts = [p for p in re.split(r"[/\\]", spec.strip()) if p]
    name = parts[-1] if parts else ""
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    return name or "model"


def unique_label(spec: str, taken: Collection[str]) -> str:
    """:func:`model_label` of ``spec``, with ``-2``, ``-3``, ... appended until it is not in ``taken``."""
    base = model_label(spec)
    label, k = base, 2
    while label in taken:
        label, k = f"{base}-{k}", k + 1
    return label
