"""The layer profile figure: effect size with its confidence interval against relative layer depth, one line per
model, points coloured by verdict, and optionally the detection AUROC per layer in a panel below.

A pure function of per-layer tables; matplotlib is imported lazily and the figure is built with
:class:`matplotlib.figure.Figure` directly (never ``pyplot``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AttnscanError
from .grid import layer_columns
from .palette import (
    FS_LABEL,
    FS_SUPTITLE,
    FS_TICK,
    THRESHOLD_COLOR,
    VERDICT_COLORS,
    ModelStyle,
    model_style,
    verdict_color,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.legend import Legend
    from matplotlib.lines import Line2D

__all__ = ["layer_profile_figure"]

# Legends of the layer profile: inches between an axes and its legend column, and between stacked legends.
_LEGEND_PAD = 0.12
_LEGEND_GAP = 0.15
_GRID_COLOR = "#e6e6e6"
_DEPTH_LABEL = "Relative layer depth  (layer / (layers − 1))"
_YLABELS = {
    "effect": "Effect size (Jailbreak − Benign)",
    "signed_shift": "Signed shift, nats (Jailbreak − Benign)",
}


@dataclass
class _Drawn:
    """What the model lines of :func:`layer_profile_figure` leave for its axes and legends."""

    depths: dict[str, int] = field(default_factory=dict)
    model_handles: list[Line2D] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)  # in the order first seen
    levels: list[float] = field(default_factory=list)  # flag thresholds of the detection panel, each drawn once
    text_baseline: bool = False  # some detection table carried the TF-IDF text baseline (drawn dash-dotted)


def layer_profile_figure(
    tables: Mapping[str, pd.DataFrame],
    *,
    n_layers: Mapping[str, int] | None = None,
    value: str = "effect",
    title: str | None = None,
    ylabel: str | None = None,
    dpi: int = 200,
    detection: Mapping[str, pd.DataFrame] | None = None,
    threshold: float | None = None,
) -> Figure:
    """Effect size and its confidence interval against relative layer depth, one line per model.

    With ``detection`` (model label -> :func:`attnscan.detect.detectors.layer_detection_table` or its
    ``detection.csv``) a second panel below, on the same depth axis, shows each model's cross-validated detection
    AUROC per layer: the CP detector as a solid line with its bootstrap 95 % band, the hidden-state probe dashed,
    chance (0.5) dotted, ``threshold`` (default: the table's, else none) as a grey line, and flagged layers as
    filled markers.

    ``tables`` maps a model label to its layer table with columns ``layer``, ``value`` (default ``effect``),
    ``ci_low``, ``ci_high`` and ``verdict``; the interval must bound the same quantity as ``value`` (with
    :func:`attnscan.analysis.statistics.layer_table` the bootstrap interval is that of ``signed_shift``, so pass
    ``value="signed_shift"`` for a band in matching units). The x axis is ``layer / (n_layers - 1)`` so models of
    different depth share it; ``n_layers`` maps a label to its model's number of layers (e.g.
    ``manifest["architecture"]["n_layers"]``) and defaults to ``max(layer) + 1`` of the table, which understates the
    depth when the last layers were not captured. When all models have the same depth, a top axis gives absolute
    layer numbers; otherwise the legend gives each depth.

    Points are coloured by verdict (:data:`~attnscan.views.palette.VERDICT_COLORS`; other verdicts dark grey), the
    interval is a shaded band in the model's line colour, and a horizontal line marks zero.

    Legends sit in one column right of the panels: "Model" and, directly below it, "Verdict" beside the top panel,
    "Detection" beside the detection panel (its line styles, chance, and the flag threshold with its value when one
    is drawn; models whose tables give different thresholds get one line each). The legends carry the labels
    ``attnscan:legend:models``, ``attnscan:legend:verdicts`` and ``attnscan:legend:detection``.
    """
    from matplotlib.figure import Figure

    if not tables:
        raise AttnscanError("no layer tables to plot: pass at least one model's table")
    unknown = [key for key in (detection or {}) if key not in tables]
    if unknown:
        raise AttnscanError(f"detection table for '{unknown[0]}' has no layer table: key both by the same model labels")
    fig = Figure(figsize=(9.0, 8.0 if detection else 5.0), dpi=dpi, layout="constrained")
    if detection:
        ax, det_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    else:
        ax, det_ax = fig.add_subplot(), None
    ax.axhline(0.0, color="black", linewidth=0.9, zorder=1)
    drawn = _Drawn()
    for k, (key, table) in enumerate(tables.items()):
        depth = _model_line(ax, key, table, value, model_style(k), n_layers, drawn)
        if det_ax is not None and detection is not None and key in detection:
            level = _detection_lines(det_ax, key, detection[key], depth, model_style(k), threshold)
            if level is not None and level not in drawn.levels:
                drawn.levels.append(level)
            drawn.text_baseline |= _text_baseline_line(det_ax, detection[key], model_style(k))
    ax.set_xlim(-0.03, 1.03)
    ax.set_xticks(np.linspace(0.0, 1.0, 5))
    if det_ax is not None:
        _detection_axes(fig, det_ax, drawn.levels, drawn.text_baseline)
    else:
        ax.set_xlabel(_DEPTH_LABEL, fontsize=FS_LABEL)
    ax.set_ylabel(ylabel if ylabel is not None else _YLABELS.get(value, value), fontsize=FS_LABEL)
    _style_axes(ax)
    if len(set(drawn.depths.values())) == 1:
        _layer_axis(ax, next(iter(drawn.depths.values())))
    # Both legends in one column right of the top panel, the verdicts directly below the models.
    leg_models = _side_legend(fig, ax, drawn.model_handles, "Model", "attnscan:legend:models")
    below = leg_models.get_window_extent().height / fig.dpi + _LEGEND_GAP
    _side_legend(fig, ax, _verdict_handles(drawn.verdicts), "Verdict", "attnscan:legend:verdicts", down=below)
    if title:
        fig.suptitle(title, fontsize=FS_SUPTITLE - 2, fontweight="bold")
    return fig


def _model_line(
    ax: Axes,
    key: str,
    table: pd.DataFrame,
    value: str,
    style: ModelStyle,
    n_layers: Mapping[str, int] | None,
    drawn: _Drawn,
) -> int:
    """One model's band, line and verdict-coloured points on ``ax``; records its depth, legend handle and verdicts
    in ``drawn`` and returns its depth (number of layers)."""
    from matplotlib.lines import Line2D

    cols = layer_columns(key, table, ("layer", value, "ci_low", "ci_high", "verdict"))
    order = np.argsort(cols["layer"], kind="stable")
    layer = cols["layer"][order]
    depth = int(n_layers[key]) if n_layers is not None and key in n_layers else int(layer.max()) + 1
    if layer.min() < 0 or layer.max() >= depth:
        raise AttnscanError(f"layer table '{key}' has layers outside 0..{depth - 1} for a {depth}-layer model")
    drawn.depths[key] = depth
    x = layer / (depth - 1) if depth > 1 else np.zeros(len(layer))
    effect, lo, hi = (cols[c][order].astype(np.float64) for c in (value, "ci_low", "ci_high"))
    verdict = cols["verdict"][order]
    color, marker, linestyle = style
    ax.fill_between(x, lo, hi, color=color, alpha=0.14, linewidth=0, zorder=2)
    ax.plot(x, effect, color=color, linestyle=linestyle, linewidth=1.6, zorder=3)
    point_colors = [verdict_color(v) for v in verdict]
    ax.scatter(x, effect, c=point_colors, marker=marker, s=38, edgecolors=color, linewidths=0.9, zorder=4)
    for v in verdict:
        if v not in drawn.verdicts:
            drawn.verdicts.append(v)
    drawn.model_handles.append(
        Line2D(
            [],
            [],
            color=color,
            linestyle=linestyle,
            marker=marker,
            markerfacecolor="white",
            markeredgecolor=color,
            label=f"{key} ({depth} layers)",
        )
    )
    return depth


def _style_axes(ax: Axes) -> None:
    """Tick sizes and a light grid behind the data."""
    ax.tick_params(labelsize=FS_TICK)
    ax.grid(True, color=_GRID_COLOR, linewidth=0.7, zorder=0)
    ax.set_axisbelow(True)


def _detection_axes(fig: Figure, det_ax: Axes, levels: Sequence[float], text_baseline: bool = False) -> None:
    """The detection panel's chance line, limits, labels, threshold lines and its "Detection" legend."""
    from matplotlib.lines import Line2D

    det_ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":", zorder=1)
    det_ax.set_ylim(0.0, 1.02)
    det_ax.set_ylabel("Detection AUROC (cross-validated)", fontsize=FS_LABEL)
    det_ax.set_xlabel(_DEPTH_LABEL, fontsize=FS_LABEL)
    _style_axes(det_ax)
    det_handles = [
        Line2D([], [], color="#444444", linestyle="-", label="CP detector (95 % CI band)"),
        Line2D([], [], color="#444444", linestyle="--", label="hidden-state probe"),
        Line2D([], [], color="#444444", marker="o", linestyle="", label="flagged layer"),
        Line2D([], [], color="black", linewidth=0.8, linestyle=":", label="chance (AUROC 0.50)"),
    ]
    if text_baseline:
        det_handles.append(
            Line2D([], [], color="#444444", linewidth=1.0, linestyle="-.", label="text baseline (TF-IDF, same folds)")
        )
    if levels:
        for level in levels:
            det_ax.axhline(level, color=THRESHOLD_COLOR, linewidth=0.8, zorder=1)
        values = ", ".join(f"{v:.2f}" if round(v, 2) == v else f"{v:g}" for v in sorted(levels))
        name = "flag threshold" if len(levels) == 1 else "flag thresholds"
        det_handles.append(Line2D([], [], color=THRESHOLD_COLOR, linewidth=0.8, label=f"{name} (AUROC {values})"))
    _side_legend(fig, det_ax, det_handles, "Detection", "attnscan:legend:detection")


def _layer_axis(ax: Axes, depth: int) -> None:
    """A top axis with absolute layer numbers, for models that all have ``depth`` layers (none for one layer)."""
    if depth <= 1:
        return
    from matplotlib.ticker import MaxNLocator

    scale = float(depth - 1)

    def to_layer(v: Any) -> Any:
        return np.asarray(v) * scale

    def to_depth(v: Any) -> Any:
        return np.asarray(v) / scale

    top = ax.secondary_xaxis("top", functions=(to_layer, to_depth))
    top.set_xlabel("Layer", fontsize=FS_LABEL)
    top.tick_params(labelsize=FS_TICK)
    top.xaxis.set_major_locator(MaxNLocator(nbins=min(depth, 9), integer=True))


def _verdict_handles(seen: Sequence[str]) -> list[Line2D]:
    """Legend entries of the verdicts seen: the known ones in :data:`VERDICT_COLORS` order, then the others."""
    from matplotlib.lines import Line2D

    ordered = [v for v in VERDICT_COLORS if v in seen] + [v for v in seen if v not in VERDICT_COLORS]
    return [
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            markersize=8,
            markerfacecolor=verdict_color(v),
            markeredgecolor="none",
            label=v,
        )
        for v in ordered
    ]


def _side_legend(fig: Figure, ax: Axes, handles: Sequence[Line2D], title: str, label: str, down: float = 0.0) -> Legend:
    """A legend outside ``ax`` (of ``fig``), its upper left corner just right of the axes' top right corner and
    ``down`` inches lower; labelled ``label`` so tests can find it. Constrained layout keeps room for it."""
    from matplotlib.legend import Legend
    from matplotlib.transforms import ScaledTranslation

    anchor = ax.transAxes + ScaledTranslation(_LEGEND_PAD, -down, fig.dpi_scale_trans)
    legend = Legend(
        ax,
        list(handles),
        [str(h.get_label()) for h in handles],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        bbox_transform=anchor,
        borderaxespad=0.0,
        title=title,
        fontsize=FS_TICK - 0.5,
        title_fontsize=FS_LABEL - 1,
        alignment="left",
    )
    legend.set_label(label)
    ax.add_artist(legend)
    legend.set_clip_on(False)  # add_artist clips to the axes, which would hide it and keep it out of the layout
    return legend


def _text_baseline_line(ax: Axes, table: pd.DataFrame, style: ModelStyle) -> bool:
    """The model's TF-IDF text-baseline AUROC (the same for every layer: one per training) as a dash-dotted line
    across the detection panel; whether the table had one. A detector under that line adds nothing a classifier of
    the prompt text lacks."""
    if "text_auroc" not in table.columns or not table["text_auroc"].notna().any():
        return False
    level = float(table["text_auroc"].dropna().iloc[0])
    ax.axhline(level, color=style.color, linewidth=1.0, linestyle="-.", zorder=2, label="_text_baseline")
    return True


def _detection_lines(
    ax: Axes, key: str, table: pd.DataFrame, depth: int, style: ModelStyle, threshold: float | None
) -> float | None:
    """One model's detection AUROC per layer on ``ax`` (see :func:`layer_profile_figure`); returns its flag
    threshold (``threshold``, else the table's ``attrs["threshold"]``, else ``None``), which the caller draws."""
    if "layer" not in table.columns or not ({"cp_auroc", "probe_auroc"} & set(table.columns)):
        raise AttnscanError(
            f"detection table '{key}' needs a 'layer' column and cp_auroc and/or probe_auroc: give the "
            "detection.csv that attnscan detect train writes"
        )
    color, marker = style.color, style.marker
    frame = table.sort_values("layer")
    layer = frame["layer"].to_numpy(dtype=np.int64)
    if layer.min() < 0 or layer.max() >= depth:
        raise AttnscanError(f"detection table '{key}' has layers outside 0..{depth - 1} for a {depth}-layer model")
    x = layer / (depth - 1) if depth > 1 else np.zeros(len(layer))
    if "cp_auroc" in frame.columns:
        cp = frame["cp_auroc"].to_numpy(dtype=np.float64)
        if {"cp_auroc_low", "cp_auroc_high"} <= set(frame.columns):
            lo = frame["cp_auroc_low"].to_numpy(dtype=np.float64)
            hi = frame["cp_auroc_high"].to_numpy(dtype=np.float64)
            ax.fill_between(x, lo, hi, color=color, alpha=0.14, linewidth=0, zorder=2)
        ax.plot(x, cp, color=color, linewidth=1.6, zorder=3)
        flagged = frame["flagged"].astype(bool).to_numpy() if "flagged" in frame.columns else np.zeros(len(x), bool)
        ax.scatter(x[~flagged], cp[~flagged], marker=marker, s=26, facecolors="white", edgecolors=color, zorder=4)
        ax.scatter(x[flagged], cp[flagged], marker=marker, s=30, color=color, zorder=4, label=f"_flagged:{key}")
    if "probe_auroc" in frame.columns:
        ax.plot(x, frame["probe_auroc"].to_numpy(dtype=np.float64), color=color, linestyle="--", linewidth=1.2)
    level = threshold if threshold is not None else table.attrs.get("threshold")
    return None if level is None else float(level)
