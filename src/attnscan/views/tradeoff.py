"""The layer-bypass trade-off figure: jailbreak refusal against benign retention, one labelled point per ``k``.

A pure function of the table of :func:`attnscan.behaviour.defend.sweep`; matplotlib is imported lazily and the
figure is built with :class:`matplotlib.figure.Figure` directly (never ``pyplot``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import AttnscanError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["trade_off_figure"]


def trade_off_figure(table: pd.DataFrame, *, title: str | None = None, marked: pd.DataFrame | None = None) -> Figure:
    """Jailbreak refusal rate (y) against benign retention (x), one point per row labelled ``k=…``.

    ``table`` is :func:`attnscan.behaviour.defend.sweep`'s output (columns ``k``, ``jailbreak_refusal_rate``,
    ``benign_retention`` and, when present, their ``_low``/``_high`` Wilson bounds, drawn as error bars). Up and to
    the right is better.
    Rows at the same point share one label (``k=2,4``); each label goes to the first of a few spots around its
    point that keeps it clear of the other labels and points (:func:`_place_labels`).

    ``marked`` adds other settings as separate markers with a legend, e.g. a study's chosen layers and its
    random-layer controls (columns ``role``, ``jailbreak_refusal_rate``, ``benign_retention``; roles starting with
    ``random`` are drawn as hollow squares, any other as a star).
    """
    from matplotlib.figure import Figure

    needed = {"k", "jailbreak_refusal_rate", "benign_retention"}
    if not needed <= set(table.columns):
        raise AttnscanError(f"the sweep table lacks columns {sorted(needed - set(table.columns))}")
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = table["benign_retention"].to_numpy(dtype=float)
    y = table["jailbreak_refusal_rate"].to_numpy(dtype=float)
    xerr = yerr = None
    if {"benign_retention_low", "benign_retention_high"} <= set(table.columns):
        xerr = [x - table["benign_retention_low"].to_numpy(dtype=float), table["benign_retention_high"] - x]
    if {"jailbreak_refusal_low", "jailbreak_refusal_high"} <= set(table.columns):
        yerr = [y - table["jailbreak_refusal_low"].to_numpy(dtype=float), table["jailbreak_refusal_high"] - y]
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.75", elinewidth=1, zorder=1)
    ks = table["k"].to_numpy()
    ax.plot(x, y, color="0.6", linewidth=1, zorder=2)
    ax.scatter(x, y, c=["tab:gray" if k == 0 else "tab:red" for k in ks], zorder=3)
    if marked is not None and not marked.empty:
        _draw_marked(ax, marked)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("benign retention (share of benign prompts answered)")
    ax.set_ylabel("refusal rate on jailbreak prompts")
    # a long title (a model name and what is compared) wraps rather than running off the figure's edges
    ax.set_title(textwrap.fill(title or "Layer bypass: safety vs. helpfulness", width=48, break_on_hyphens=False))
    ax.grid(True, alpha=0.3)
    groups: dict[tuple[float, float], list[int]] = {}
    for xi, yi, k in zip(x, y, ks, strict=True):
        groups.setdefault((float(xi), float(yi)), []).append(int(k))
    _place_labels(fig, ax, [(xy, "k=" + ",".join(map(str, members))) for xy, members in groups.items()])
    return fig


def _draw_marked(ax: Axes, marked: pd.DataFrame) -> None:
    """The extra settings of :func:`trade_off_figure`: random controls as hollow squares, the rest as stars."""
    is_random = marked["role"].astype(str).str.startswith("random")
    for rows, style in (
        (marked[is_random], {"marker": "s", "facecolors": "none", "edgecolors": "tab:blue", "label": "random layers"}),
        (marked[~is_random], {"marker": "*", "s": 160, "color": "tab:orange", "label": "chosen layers"}),
    ):
        if not rows.empty:
            ax.scatter(rows["benign_retention"], rows["jailbreak_refusal_rate"], zorder=4, **style)  # type: ignore[arg-type]
    ax.legend(loc="lower left", fontsize=8, frameon=False)


# Spots for a label, as (x, y) offsets in points from its point, tried in this order: right above, left above,
# right below, left below, then the same one and two lines further up or down.
_LABEL_SPOTS = tuple((dx, dy) for dy in (4, -13, 15, -24, 26, -35) for dx in (5, -5))
_MARKER_RADIUS = 4.0  # points: the scatter markers' default size (36 pt²) is a disc of diameter 6


def _place_labels(
    fig: Figure, ax: Axes, labels: Sequence[tuple[tuple[float, float], str]], fontsize: float = 9
) -> None:
    """Annotate each ``((x, y), text)`` at the first spot of :data:`_LABEL_SPOTS` where its box overlaps no label
    placed before it and no point (else at the spot with the least overlap).

    Boxes are measured on the laid-out figure; offsets and font sizes are in points, so the arrangement holds at
    any resolution the figure is saved at.
    """
    fig.draw_without_rendering()  # run the layout so that data → display coordinates are final
    scale = fig.dpi / 72.0  # display units per point
    r = _MARKER_RADIUS * scale
    taken: list[Sequence[float]] = []  # boxes (x0, y0, x1, y1) in display units
    for xy, _ in labels:
        cx, cy = ax.transData.transform(xy)
        taken.append((cx - r, cy - r, cx + r, cy + r))
    for xy, text in labels:
        ann = ax.annotate(text, xy, textcoords="offset points", xytext=_LABEL_SPOTS[0], fontsize=fontsize)
        best, best_overlap = _LABEL_SPOTS[0], math.inf
        for spot in _LABEL_SPOTS:
            ann.set_position(spot)
            ann.set_horizontalalignment("left" if spot[0] > 0 else "right")
            box = ann.get_window_extent().padded(scale).extents
            overlap = sum(_overlap_area(box, other) for other in taken)
            if overlap < best_overlap:
                best, best_overlap = spot, overlap
            if overlap == 0:
                break
        ann.set_position(best)
        ann.set_horizontalalignment("left" if best[0] > 0 else "right")
        taken.append(ann.get_window_extent().extents)


def _overlap_area(a: Sequence[float], b: Sequence[float]) -> float:
    """Area shared by two boxes ``(x0, y0, x1, y1)``."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(width, 0.0) * max(height, 0.0)
