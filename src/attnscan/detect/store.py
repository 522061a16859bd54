"""Detector files: per-layer detectors saved as ``detector.safetensors`` + ``detector.json`` (no pickle)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_dir
from ..errors import AttnscanError
from .detectors import DETECTOR_KINDS, Detector

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "STATE_FILE",
    "load_detector",
    "save_detector",
]

STATE_FILE = "detector.safetensors"
META_FILE = "detector.json"
FORMAT = "attnscan.detector"
FORMAT_VERSION = 1


def save_detector(
    path_dir: str | os.PathLike[str],
    detectors: Mapping[int, Detector],
    meta: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write per-layer detectors to ``path_dir`` as ``detector.safetensors`` + ``detector.json`` (no pickle).

    Arrays are stored under ``L{layer}/{name}``; ``detector.json`` holds the format tag, each layer's kind and
    metadata, and ``meta`` (JSON-serialisable: e.g. the model and the layers' provenance). The directory appears
    complete or not at all; an existing detector directory is replaced only with ``overwrite=True``.
    """
    from safetensors.numpy import save_file

    from .._version import __version__

    if not detectors:
        raise AttnscanError("no detectors to save")
    final = Path(path_dir)
    tensors: dict[str, np.ndarray] = {}
    layers: list[dict[str, Any]] = []
    for layer, det in sorted(detectors.items()):
        arrays, state = det.to_state()
        for name, arr in arrays.items():
            tensors[f"L{int(layer)}/{name}"] = np.ascontiguousarray(arr)
        layers.append({"layer": int(layer), "kind": det.kind, "state": state})
    try:
        text = json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "attnscan_version": __version__,
                "layers": layers,
                "meta": dict(meta or {}),
            },
            indent=2,
        )
    except (TypeError, ValueError) as exc:
        raise AttnscanError(
            f"detector metadata is not JSON-serialisable ({exc}): pass plain str/int/float/list/dict"
        ) from None
    with atomic_dir(final, overwrite, marker=META_FILE, what="a detector") as tmp:
        save_file(tensors, str(tmp / STATE_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(text + "\n", encoding="utf-8")
    return final


def load_detector(path_dir: str | os.PathLike[str]) -> tuple[dict[int, Detector], dict[str, Any]]:
    """Read what :func:`save_detector` wrote: ``({layer: detector}, meta)``."""
    from safetensors.numpy import load_file

    root = Path(path_dir)
    meta_path, state_path = root / META_FILE, root / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise AttnscanError(f"{root} is not a detector directory: expected {META_FILE} and {STATE_FILE}")
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AttnscanError(f"{meta_path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise AttnscanError(f"{meta_path} is not an attnscan detector file")
    if doc.get("format_version") != FORMAT_VERSION:
        raise AttnscanError(
            f"{meta_path} has detector format version {doc.get('format_version')}; this attnscan reads version "
            f"{FORMAT_VERSION}: upgrade attnscan or re-fit the detector"
        )
    try:
        tensors = load_file(str(state_path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise AttnscanError(f"{state_path} cannot be read as safetensors ({exc}): save the detector again") from None
    detectors: dict[int, Detector] = {}
    for entry in doc.get("layers", []):
        try:
            layer, kind = int(entry["layer"]), entry.get("kind")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise AttnscanError(f"{meta_path}: malformed layer entry {entry!r}") from None
        if kind not in DETECTOR_KINDS:
            raise AttnscanError(f"{meta_path}: layer {layer} has unknown detector kind {kind!r}")
        prefix = f"L{layer}/"
        arrays = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        detectors[layer] = DETECTOR_KINDS[kind].from_state(arrays, entry.get("state", {}))
    return detectors, dict(doc.get("meta", {}))
