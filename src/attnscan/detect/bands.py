"""The band probe: one logistic probe on the pooled features of a band of neighbouring layers.

A per-layer probe reads one layer's pooled vector. What tells a harmful request from a harmless one may be spread
over several layers, so ``band=W`` also cross-validates, for every chosen layer ``L``, a probe on the concatenation
of the pooled vectors (the same pooling as the per-layer probe, :mod:`attnscan.detect.inputs`) of ``L`` and of the
``W`` chosen layers on each side of it (fewer at the ends of the chosen layers: with layers 0, 3, 6, 9 and
``band=1`` the band of 0 is 0 and 3, that of 3 is 0, 3 and 6). It is the probe
(:class:`~attnscan.detect.detectors.ProbeDetector`: standardised features, L2 logistic regression) on
``float [N, n·H]``, cross-validated on the same folds, with the
same bootstrap resamples, as the per-layer detectors (:func:`attnscan.detect.metrics.layer_detection`), so its
numbers compare with theirs directly. A band that covers every chosen layer is the probe over all of them.

It is reported, not kept: ``detection.csv`` gains ``band_layers`` (the band's layers, e.g. ``"3,6,9"``) and the
probe's metric columns with the prefix ``band_`` (``band_auroc``, its interval, ``band_tpr5`` ..., and the side
cross-validations' ``band_auroc_requests`` ...), but the detector directory holds no band probe, so ``detect
score`` and ``detect eval`` do not use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

from ..errors import AttnscanError
from .detectors import FloatArray
from .folds import Folds
from .metrics import layer_detection

__all__ = ["add_band", "band_detection", "band_windows", "check_band"]


def check_band(band: int | None) -> None:
    """Refuse a band half-width below 1 (``None`` means no band probe)."""
    if band is not None and band < 1:
        raise AttnscanError(f"band must be at least 1 (layers on each side), got {band}: leave it out for none")


def band_windows(layers: Sequence[int], band: int) -> dict[int, tuple[int, ...]]:
    """``{layer: the layers of its band}``: each layer with the ``band`` chosen layers on each side of it."""
    ordered = sorted(int(x) for x in layers)
    return {layer: tuple(ordered[max(0, i - band) : i + band + 1]) for i, layer in enumerate(ordered)}


def band_detection(
    pooled: Mapping[int, npt.ArrayLike],
    y: npt.NDArray[np.int64],
    layers: Sequence[int],
    band: int,
    plans: Mapping[str, Folds],
    *,
    seed: int,
    n_bootstrap: int,
    C: float,
) -> tuple[pd.DataFrame, dict[tuple[str, str, int], FloatArray]]:
    """One row per layer: ``layer``, ``band_layers`` and the band probe's ``band_*`` metric columns (see the module
    docstring); and the out-of-fold scores behind them, ``oof[(cv, "band", layer)]`` (``cv`` as in
    :class:`~attnscan.detect.metrics.LayerDetection`). Layers whose bands coincide share one cross-validation."""
    check_band(band)
    windows = band_windows(layers, band)
    distinct = sorted(set(windows.values()))
    inputs = {
        i: np.concatenate([np.asarray(pooled[layer], dtype=np.float32) for layer in window], axis=1)
        for i, window in enumerate(distinct)
    }
    detection = layer_detection(None, inputs, y, plans, seed=seed, flag_on="probe", n_bootstrap=n_bootstrap, C=C)
    table = detection.table.set_index("layer")
    columns = [c for c in table.columns if c.startswith("probe_")]
    rows = []
    oof: dict[tuple[str, str, int], FloatArray] = {}
    for layer, window in windows.items():
        i = distinct.index(window)
        oof.update({(cv, "band", layer): detection.oof[(cv, "probe", i)] for cv in plans})
        row = table.loc[i, columns]
        rows.append(
            {
                "layer": layer,
                "band_layers": ",".join(map(str, window)),
                **{"band_" + c.removeprefix("probe_"): row[c] for c in columns},
            }
        )
    return pd.DataFrame(rows), oof


def add_band(table: pd.DataFrame, banded: pd.DataFrame) -> pd.DataFrame:
    """The detection ``table`` with the band probe's columns (:func:`band_detection`) after its own, attrs kept."""
    out = table.merge(banded, on="layer", how="left")
    out.attrs.update(table.attrs)
    return out
