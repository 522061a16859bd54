"""Which layers to bypass, read from the outputs of other stages.

- :func:`layer_order`: the layers of any per-layer table (a ``layer`` column) ranked by one of its columns;
- :func:`scan_layer_order`: the layers of a scan bundle's ``layers.csv`` ranked by attention shift;
- :func:`detector_layers`: the flagged layers of a detector directory, ranked by the AUROC they were flagged on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import AttnscanError

__all__ = ["DETECTION_FILE", "detector_layers", "layer_order", "scan_layer_order"]

DETECTION_FILE = "detection.csv"


def layer_order(table: pd.DataFrame, by: str, *, descending: bool = True) -> list[int]:
    """Layers of a per-layer table (a ``layer`` column) ranked by column ``by``, largest first by default.

    Rows with NaN in ``by`` go last; ties keep the lower layer first.
    """
    if "layer" not in table.columns:
        raise AttnscanError("the table has no 'layer' column: give a per-layer table (layers.csv, detection table)")
    if by not in table.columns:
        raise AttnscanError(f"the table has no column '{by}': choose one of {', '.join(map(str, table.columns))}")
    ranked = table.sort_values(["layer"]).sort_values(by, ascending=not descending, kind="stable", na_position="last")
    return [int(x) for x in ranked["layer"]]


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise AttnscanError(f"cannot read {path} ({exc}): write it again") from None


def scan_layer_order(bundle: str | os.PathLike[str], by: str | None = None) -> tuple[list[int], str]:
    """The layers of a scan bundle's ``layers.csv`` ranked by column ``by``, largest first (:func:`layer_order`).

    ``by`` defaults to ``abs_shift`` (the mean absolute attention shift, jailbreak vs benign) and, in a bundle whose
    sets were too small for the statistics, to ``mean_abs_diff``. Returns the ranking and the column used.
    """
    root = Path(bundle)
    if not root.is_dir():
        raise AttnscanError(f"scan bundle not found: {root} (write one with attnscan scan --out DIR)")
    path = root / "layers.csv"
    if not path.is_file():
        raise AttnscanError(f"{root} holds no layers.csv: give the directory of an attnscan scan bundle")
    table = _read_table(path)
    if by is None:
        by = "abs_shift" if "abs_shift" in table.columns or "mean_abs_diff" not in table.columns else "mean_abs_diff"
    return layer_order(table, by), by


def _detector_meta(root: Path) -> dict[str, Any]:
    """The ``meta`` of ``root/detector.json`` when it can be read, else ``{}`` (no checks: see load_detector)."""
    try:
        doc = json.loads((root / "detector.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    meta = doc.get("meta") if isinstance(doc, dict) else None
    return meta if isinstance(meta, dict) else {}


def detector_layers(detector: str | os.PathLike[str], by: str | None = None) -> list[int]:
    """The flagged layers of a detector directory, ranked for a sweep.

    With a ``detection.csv`` in the directory (the per-layer table of
    :func:`attnscan.detect.detectors.layer_detection_table`, a ``flagged`` column): its flagged layers ranked by
    ``by``, largest first (default: the AUROC the layers were flagged on, ``{primary}_auroc`` with ``primary`` from
    ``detector.json``'s metadata, else ``cp_auroc``, else ascending layer). Without it: the ``flagged_layers`` (or
    ``flagged``) list of the detector's metadata (:func:`attnscan.detect.detectors.load_detector`), in the order
    stored; ``by`` then cannot be used. An empty list means the detector flagged no layer.
    """
    root = Path(detector)
    if not root.is_dir():
        raise AttnscanError(f"detector directory not found: {root} (train one with attnscan detect train)")
    path = root / DETECTION_FILE
    if path.is_file():
        table = _read_table(path)
        if "flagged" not in table.columns or "layer" not in table.columns:
            raise AttnscanError(f"{path} has no 'layer' and 'flagged' columns: write it with attnscan detect train")
        flags = table["flagged"].map(lambda x: str(x).strip().lower() in ("true", "1", "1.0", "yes"))
        flagged = table[flags.to_numpy(dtype=bool)]
        if by is None:
            primary = f"{_detector_meta(root).get('primary', 'cp')}_auroc"
            by = next((c for c in (primary, "cp_auroc") if c in table.columns), "layer")
        return layer_order(flagged, by, descending=by != "layer")
    from ..detect.store import load_detector

    _, meta = load_detector(root)
    listed = meta.get("flagged_layers", meta.get("flagged"))
    if listed is None:
        raise AttnscanError(
            f"{root} records no flagged layers (no {DETECTION_FILE}, no 'flagged_layers' in its metadata): "
            "give the layers with --layers, or retrain the detector with attnscan detect train"
        )
    if by is not None:
        raise AttnscanError(f"{root} has no {DETECTION_FILE} to rank its flagged layers by '{by}': leave out --by")
    try:
        return [int(x) for x in listed]
    except (TypeError, ValueError):
        raise AttnscanError(f"{root}: the flagged layers {listed!r} are not a list of layer numbers") from None
