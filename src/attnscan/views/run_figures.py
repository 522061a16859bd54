"""The figures of a run directory: the attention-map grid of the chosen rows and the layer profile.

:func:`draw` is what ``attnscan run`` and ``attnscan figure`` draw from results and their layer tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AttnscanError
from .grid import grid_figure, pick_rows, rows_from_result
from .palette import DIFF_RANGE, LOG_RANGE
from .profile import layer_profile_figure
from .saving import save_figure

if TYPE_CHECKING:
    from ..analysis.result import ScanResult

__all__ = ["draw", "profile_tables"]


def profile_tables(tables: Mapping[str, Any]) -> dict[str, Any]:
    """Tables for the layer profile: the signed shift (nats) with its bootstrap interval, and the verdict."""
    out = {}
    for label, table in tables.items():
        t = table[["layer", "signed_shift", "ci_low", "ci_high", "verdict"]].copy()
        out[label] = t.rename(columns={"signed_shift": "effect"})
    return out


def draw(
    results: Mapping[str, ScanResult],
    tables: Mapping[str, Any],
    rows: list[tuple[str, int]] | None,
    figure_path: Path | None,
    profile_path: Path | None,
    *,
    dpi: int = 200,
    log_range: tuple[float, float] = LOG_RANGE,
    diff_range: tuple[float, float] = DIFF_RANGE,
    detection: Mapping[str, Any] | None = None,
) -> list[tuple[str, int]]:
    """Draw the grid figure (``rows``, or :func:`~attnscan.views.grid.pick_rows` when None) and the layer profile
    (with detection AUROC below it when given) to the paths given; return the (model, layer) rows shown."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    chosen = rows if rows is not None else pick_rows(tables)
    for label, layer in chosen:
        if layer not in results[label].layers:
            captured = ", ".join(map(str, results[label].layers))
            raise AttnscanError(f"{label} layer {layer} was not captured: captured layers are {captured}")
    if figure_path is not None:
        fig_rows = []
        for label, layer in chosen:
            table = tables[label]
            verdict = dict(zip(table["layer"].astype(int), table["verdict"], strict=True))
            fig_rows.extend(rows_from_result(results[label], [layer], label=label, verdicts=verdict))
        fig = grid_figure(fig_rows, log_range=log_range, diff_range=diff_range, dpi=dpi)
        save_figure(fig, figure_path, dpi=dpi)
        plt.close(fig)
    if profile_path is not None:
        n_layers = {k: int(r.manifest.get("architecture", {}).get("n_layers", 0)) or None for k, r in results.items()}
        fig = layer_profile_figure(
            profile_tables(tables),
            n_layers={k: v for k, v in n_layers.items() if v},
            ylabel="Signed shift, jailbreak − benign (nats)",
            dpi=dpi,
            detection=detection or None,
        )
        save_figure(fig, profile_path, dpi=dpi)
        plt.close(fig)
    return chosen
