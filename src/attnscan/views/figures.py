"""Publication figures: the attention-map grid, the layer profile, the bypass trade-off, and the rows to show.

Everything here is a pure function of plain data (numpy arrays, per-layer tables) or of a
:class:`~attnscan.result.ScanResult`; nothing imports model code. matplotlib is imported lazily, inside the
functions, and figures are built with :class:`matplotlib.figure.Figure` directly (never ``pyplot``), so no global
figure registry or interactive backend is involved and the module is safe on headless machines.

- :func:`grid_figure`: one row per (model, layer), columns Benign / Jailbreak / Difference; each panel a ``T x T``
  heatmap of log attention (query rows top to bottom, key columns left to right), NaN cells (above the diagonal,
  beyond every prompt's length) in a neutral grey that no colormap colour is close to.
- :func:`layer_profile_figure`: effect size with its confidence interval against relative layer depth, one line
  per model, points coloured by verdict.
- :func:`trade_off_figure`: the layer-bypass sweep of :mod:`attnscan.defend`, jailbreak refusal against benign
  retention.
- :func:`pick_rows`: which (model, layer) rows to show for ``--rows auto``.
- :func:`save_figure`: PNG / PDF / SVG by extension, written atomically.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..errors import AttnscanError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure, SubFigure
    from matplotlib.image import AxesImage
    from matplotlib.legend import Legend
    from matplotlib.lines import Line2D
    from matplotlib.typing import LineStyleType

    from ..analysis.result import ScanResult

__all__ = [
    "COLUMN_TITLES",
    "NAN_COLOR",
    "VERDICT_COLORS",
    "FigureRow",
    "grid_figure",
    "layer_profile_figure",
    "model_label",
    "pick_rows",
    "rows_from_result",
    "save_figure",
]

#: Colour of cells no prompt reaches (NaN): a neutral light grey, far from every viridis / RdBu_r / bwr colour.
NAN_COLOR = "#b8b8b8"
#: Column titles of :func:`grid_figure`, left to right.
COLUMN_TITLES = ("Benign", "Jailbreak", "Difference")
#: Fixed verdict colours of :func:`layer_profile_figure` (and of the verdict tags of :func:`grid_figure`).
VERDICT_COLORS: Mapping[str, str] = {
    "vulnerable": "#d62728",
    "mixed": "#8e44ad",
    "resilient": "#1f5fbf",
    "no significant shift": "#9a9a9a",
}
_OTHER_VERDICT_COLOR = "#3a3a3a"
# Row titles in a verdict's colour, darker where the point colour is too light for text.
_TITLE_COLORS = {**VERDICT_COLORS, "no significant shift": "#6b6b6b"}
# Line colours and markers that tell models apart in the profile; none is red, blue, purple or grey, so they
# never read as a verdict colour.
_MODEL_STYLES: tuple[tuple[str, str, LineStyleType], ...] = (
    ("#1a1a1a", "o", "-"),
    ("#1b9e77", "s", "--"),
    ("#a6761d", "^", "-."),
    ("#66a61e", "D", ":"),
    ("#e6ab02", "v", "-"),
    ("#17becf", "P", "--"),
)
SAVE_FORMATS = ("png", "pdf", "svg")

# Font sizes (points) for a 4-inch panel printed at its natural size.
_FS_SUPTITLE = 16
_FS_ROW = 14
_FS_TITLE = 13
_FS_LABEL = 11
_FS_TICK = 9.5
_MAX_TICK_INTERVALS = 8
# Legends of the layer profile: inches between an axes and its legend column, and between stacked legends.
_LEGEND_PAD = 0.12
_LEGEND_GAP = 0.15
_THRESHOLD_COLOR = "#888888"


@dataclass
class FigureRow:
    """One row of :func:`grid_figure`: a model's label, the layer and its three maps.

    ``benign`` and ``jailbreak`` are ``float [T, T]`` log attention maps (ln of the mean attention probability
    over heads and prompts, floored; NaN where no prompt reaches the cell), ``diff`` is ``float [T, T]``
    ``jailbreak - benign`` (NaN where either is NaN); row ``i`` is the query token, column ``j`` the key token.
    ``verdict`` is an optional tag shown with the row title (e.g. ``"vulnerable"``).
    """

    label: str
    layer: int
    benign: np.ndarray[Any, Any]
    jailbreak: np.ndarray[Any, Any]
    diff: np.ndarray[Any, Any]
    verdict: str | None = None

    @property
    def title(self) -> str:
        """``"MODEL - Layer L"``, the row's title."""
        return f"{self.label} - Layer {self.layer}"


def model_label(spec: str) -> str:
    """A readable model name from a model spec: the embedded name as is, the last part of a hub id or path, without
    a ``.gguf`` suffix (``"meta-llama/Llama-3.1-8B"`` -> ``"Llama-3.1-8B"``, ``"/m/tiny.gguf"`` -> ``"tiny"``)."""
    parts = [p for p in re.split(r"[/\\]", spec.strip()) if p]
    name = parts[-1] if parts else ""
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    return name or "model"


def rows_from_result(
    result: ScanResult,
    layers: Sequence[int],
    label: str | None = None,
    verdicts: Mapping[int, str] | None = None,
) -> list[FigureRow]:
    """The :class:`FigureRow` of each of ``layers`` (in that order) from a scan result with benign and jailbreak sets.

    ``label`` defaults to :func:`model_label` of ``result.manifest["model"]["spec"]`` (``"model"`` when the manifest
    has none). ``verdicts`` maps a layer to its verdict tag, e.g. ``dict(zip(table.layer, table.verdict))``; layers
    missing from it get no tag. Maps are ``float64 [T, T]`` numpy arrays.
    """
    if not layers:
        raise AttnscanError("no layers to plot: pass at least one captured layer")
    if label is None:
        model = result.manifest.get("model")
        spec = model.get("spec") if isinstance(model, Mapping) else None
        label = model_label(spec) if isinstance(spec, str) else "model"
    rows = []
    for layer in layers:
        layer = int(layer)
        rows.append(
            FigureRow(
                label=label,
                layer=layer,
                benign=result.log("benign", layer).numpy(),
                jailbreak=result.log("jailbreak", layer).numpy(),
                diff=result.diff(layer).numpy(),
                verdict=None if verdicts is None else verdicts.get(layer),
            )
        )
    return rows


def _check_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise AttnscanError(f"{name} must be two finite numbers (low, high) with low < high, got {value!r}")
    return lo, hi


def _square(name: str, row: FigureRow) -> np.ndarray[Any, Any]:
    arr = np.asarray(getattr(row, name), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise AttnscanError(f"row '{row.title}': the {name} map must be a square [T, T] array, got shape {arr.shape}")
    return arr


def _cmap(name: str | Colormap) -> Colormap:
    import matplotlib as mpl

    try:
        base = mpl.colormaps[name] if isinstance(name, str) else name
    except KeyError:
        raise AttnscanError(f"unknown colormap '{name}': use a matplotlib colormap name such as 'viridis'") from None
    return base.with_extremes(bad=NAN_COLOR)


def _extend(values: Sequence[np.ndarray[Any, Any]], lo: float, hi: float) -> str:
    """The colour bar ``extend`` that shows whether finite values fall outside ``[lo, hi]`` (clipped)."""
    below = above = False
    for v in values:
        finite = v[np.isfinite(v)]
        if finite.size:
            below = below or bool(finite.min() < lo)
            above = above or bool(finite.max() > hi)
    return {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[(below, above)]


def _panel(ax: Axes, data: np.ndarray[Any, Any], cmap: Colormap, norm: Normalize, tick_step: int | None) -> AxesImage:
    from matplotlib.ticker import MaxNLocator

    t = data.shape[0]
    # extent puts cell (i, j) on [j, j+1] x [i, i+1], so the axes run exactly 0..T and query 0 is at the top.
    im = ax.imshow(
        data,
        cmap=cmap,
        norm=norm,
        interpolation="nearest",
        origin="upper",
        extent=(0, t, t, 0),
        aspect="equal",
        rasterized=True,
    )
    if tick_step is not None and t // tick_step >= 2:
        step = tick_step * math.ceil(t / tick_step / _MAX_TICK_INTERVALS)  # a multiple of tick_step, <= 8 intervals
        ticks = np.arange(0, t + 1, step)
        if t - ticks[-1] >= step / 2:  # label the end of a grid that is not a multiple of the step
            ticks = np.append(ticks, t)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.set_xlim(0, t)
    ax.set_ylim(t, 0)
    ax.set_xlabel("Key Token", fontsize=_FS_LABEL)
    ax.set_ylabel("Query Token", fontsize=_FS_LABEL)
    ax.tick_params(labelsize=_FS_TICK, length=3)
    # No frame: a spine would cover key column 0, where attention sinks show.
    for spine in ax.spines.values():
        spine.set_visible(False)
    return im


def grid_figure(
    rows: Sequence[FigureRow],
    *,
    log_range: tuple[float, float] = (-10.0, 0.0),
    diff_range: tuple[float, float] = (-4.0, 4.0),
    tick_step: int | None = 64,
    dpi: int = 200,
    cmap: str | Colormap = "viridis",
    diff_cmap: str | Colormap = "RdBu_r",
    title: str | None = None,
) -> Figure:
    """The attention-map grid: one row per :class:`FigureRow`, columns Benign, Jailbreak and Difference.

    Each panel shows a ``[T, T]`` map with query tokens top to bottom and key tokens left to right (axes 0..T, ticks
    every ``tick_step`` tokens, or every multiple of it that keeps at most 8 intervals for long grids; matplotlib's
    own ticks when ``tick_step`` is ``None`` or would leave fewer than three).
    Benign and Jailbreak use ``cmap`` on ``log_range`` and share one colour bar ("log attention") right of the
    Jailbreak panel; Difference uses ``diff_cmap`` on ``diff_range`` with its own colour bar ("Δ log attention").
    Colour bars get arrow ends where data are clipped. NaN cells are drawn in :data:`NAN_COLOR`. Each row is a
    subfigure titled ``"MODEL - Layer L"`` (plus the verdict tag, when given); ``title`` is the figure's title.

    The figure is about 13.5 inches wide and 4.4 inches tall per row, with constrained layout; images are drawn
    with nearest-neighbour interpolation and rasterized, so PDF and SVG files stay small for large ``T``.
    """
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    if not rows:
        raise AttnscanError("no rows to plot: pass at least one FigureRow")
    log_lo, log_hi = _check_range("log_range", log_range)
    diff_lo, diff_hi = _check_range("diff_range", diff_range)
    if tick_step is not None and tick_step <= 0:
        raise AttnscanError(f"tick_step must be a positive number of tokens or None, got {tick_step}")
    log_cmap, d_cmap = _cmap(cmap), _cmap(diff_cmap)

    n = len(rows)
    top = 0.45 if title else 0.0
    layout = ConstrainedLayoutEngine(w_pad=0.06, h_pad=0.06, hspace=0.04, wspace=0.03)
    fig = Figure(figsize=(13.5, 4.4 * n + top), dpi=dpi, layout=layout)
    if title:
        fig.suptitle(title, fontsize=_FS_SUPTITLE, fontweight="bold")
    subfigs: list[SubFigure] = list(cast("np.ndarray[Any, Any]", fig.subfigures(n, 1, squeeze=False))[:, 0])
    for i, (row, sub) in enumerate(zip(rows, subfigs, strict=True)):
        benign, jailbreak, diff = (_square(k, row) for k in ("benign", "jailbreak", "diff"))
        if not benign.shape == jailbreak.shape == diff.shape:
            raise AttnscanError(
                f"row '{row.title}': maps differ in shape ({benign.shape}, {jailbreak.shape}, {diff.shape})"
            )
        axes = sub.subplots(1, 3)
        log_norm = Normalize(log_lo, log_hi)  # one norm for both log panels: their shared colour bar is exact
        ims = [
            _panel(axes[0], benign, log_cmap, log_norm, tick_step),
            _panel(axes[1], jailbreak, log_cmap, log_norm, tick_step),
            _panel(axes[2], diff, d_cmap, Normalize(diff_lo, diff_hi), tick_step),
        ]
        for j, (ax, col) in enumerate(zip(axes, COLUMN_TITLES, strict=True)):
            ax.set_title(col, fontsize=_FS_TITLE, pad=6)
            ax.set_label(f"attnscan:panel:{i}:{col.lower()}")
            if j:
                ax.set_ylabel("")
        cb_log = sub.colorbar(
            ims[1],
            ax=list(axes[:2]),
            fraction=0.04,
            pad=0.02,
            aspect=22,
            extend=_extend([benign, jailbreak], log_lo, log_hi),
        )
        cb_diff = sub.colorbar(
            ims[2], ax=axes[2], fraction=0.08, pad=0.03, aspect=22, extend=_extend([diff], diff_lo, diff_hi)
        )
        for cb, text in ((cb_log, "log attention"), (cb_diff, "Δ log attention")):
            cb.set_label(text, fontsize=_FS_LABEL)
            cb.ax.tick_params(labelsize=_FS_TICK)
        row_title = row.title if row.verdict is None else f"{row.title}  ·  {row.verdict}"
        color = "black" if row.verdict is None else _TITLE_COLORS.get(row.verdict.strip().lower(), "black")
        sub.suptitle(row_title, fontsize=_FS_ROW, fontweight="bold", color=color)
    return fig


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
    from .._io import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path


def _columns(key: str, table: pd.DataFrame, needed: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise AttnscanError(f"layer table '{key}' lacks column(s) {', '.join(missing)}: it needs {', '.join(needed)}")
    if len(table) == 0:
        raise AttnscanError(f"layer table '{key}' is empty: it needs one row per captured layer")
    out = {c: np.asarray(table[c]) for c in needed}
    if "layer" in out:
        out["layer"] = out["layer"].astype(np.int64)
    for c in ("effect", "signed_shift", "ci_low", "ci_high", "q_signed", "q_abs"):
        if c in out:
            out[c] = out[c].astype(np.float64)
    if "verdict" in out:
        out["verdict"] = np.array([str(v).strip().lower() for v in out["verdict"]], dtype=object)
    return out


_YLABELS = {
    "effect": "Effect size (Jailbreak − Benign)",
    "signed_shift": "Signed shift, nats (Jailbreak − Benign)",
}


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

    With ``detection`` (model label -> :func:`attnscan.detect.layer_detection_table` or its ``detection.csv``) a
    second panel below, on the same depth axis, shows each model's cross-validated detection AUROC per layer: the
    CP detector as a solid line with its bootstrap 95 % band, the hidden-state probe dashed, chance (0.5) dotted,
    ``threshold`` (default: the table's, else none) as a grey line, and flagged layers as filled markers.

    ``tables`` maps a model label to its layer table with columns ``layer``, ``value`` (default ``effect``),
    ``ci_low``, ``ci_high`` and ``verdict``; the interval must bound the same quantity as ``value`` (with
    :func:`attnscan.stats.layer_table` the bootstrap interval is that of ``signed_shift``, so pass
    ``value="signed_shift"`` for a band in matching units). The x axis is ``layer / (n_layers - 1)`` so models of
    different depth share it; ``n_layers``
    maps a label to its model's number of layers (e.g. ``manifest["architecture"]["n_layers"]``) and defaults to
    ``max(layer) + 1`` of the table, which understates the depth when the last layers were not captured. When all
    models have the same depth, a top axis gives absolute layer numbers; otherwise the legend gives each depth.

    Points are coloured by verdict (:data:`VERDICT_COLORS`; other verdicts dark grey), the interval is a shaded band
    in the model's line colour, and a horizontal line marks zero.

    Legends sit in one column right of the panels: "Model" and, directly below it, "Verdict" beside the top panel,
    "Detection" beside the detection panel (its line styles, chance, and the flag threshold with its value when one
    is drawn; models whose tables give different thresholds get one line each). The legends carry the labels
    ``attnscan:legend:models``, ``attnscan:legend:verdicts`` and ``attnscan:legend:detection``.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not tables:
        raise AttnscanError("no layer tables to plot: pass at least one model's table")
    needed = ("layer", value, "ci_low", "ci_high", "verdict")
    unknown = [key for key in (detection or {}) if key not in tables]
    if unknown:
        raise AttnscanError(f"detection table for '{unknown[0]}' has no layer table: key both by the same model labels")
    fig = Figure(figsize=(9.0, 8.0 if detection else 5.0), dpi=dpi, layout="constrained")
    if detection:
        ax, det_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    else:
        ax, det_ax = fig.add_subplot(), None
    ax.axhline(0.0, color="black", linewidth=0.9, zorder=1)
    depths: dict[str, int] = {}
    model_handles = []
    verdicts_seen: list[str] = []
    levels: list[float] = []  # flag thresholds of the detection panel, each drawn once
    for k, (key, table) in enumerate(tables.items()):
        cols = _columns(key, table, needed)
        order = np.argsort(cols["layer"], kind="stable")
        layer = cols["layer"][order]
        depth = int(n_layers[key]) if n_layers is not None and key in n_layers else int(layer.max()) + 1
        if layer.min() < 0 or layer.max() >= depth:
            raise AttnscanError(f"layer table '{key}' has layers outside 0..{depth - 1} for a {depth}-layer model")
        depths[key] = depth
        x = layer / (depth - 1) if depth > 1 else np.zeros(len(layer))
        effect, lo, hi = (cols[c][order].astype(np.float64) for c in (value, "ci_low", "ci_high"))
        verdict = cols["verdict"][order]
        color, marker, style = _MODEL_STYLES[k % len(_MODEL_STYLES)]
        ax.fill_between(x, lo, hi, color=color, alpha=0.14, linewidth=0, zorder=2)
        ax.plot(x, effect, color=color, linestyle=style, linewidth=1.6, zorder=3)
        point_colors = [VERDICT_COLORS.get(v, _OTHER_VERDICT_COLOR) for v in verdict]
        ax.scatter(x, effect, c=point_colors, marker=marker, s=38, edgecolors=color, linewidths=0.9, zorder=4)
        for v in verdict:
            if v not in verdicts_seen:
                verdicts_seen.append(v)
        if det_ax is not None and detection is not None and key in detection:
            level = _detection_lines(det_ax, key, detection[key], depth, color, marker, threshold)
            if level is not None and level not in levels:
                levels.append(level)
        model_handles.append(
            Line2D(
                [],
                [],
                color=color,
                linestyle=style,
                marker=marker,
                markerfacecolor="white",
                markeredgecolor=color,
                label=f"{key} ({depth} layers)",
            )
        )
    ax.set_xlim(-0.03, 1.03)
    ax.set_xticks(np.linspace(0.0, 1.0, 5))
    if det_ax is not None:
        det_ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":", zorder=1)
        det_ax.set_ylim(0.0, 1.02)
        det_ax.set_ylabel("Detection AUROC (cross-validated)", fontsize=_FS_LABEL)
        det_ax.set_xlabel("Relative layer depth  (layer / (layers − 1))", fontsize=_FS_LABEL)
        det_ax.tick_params(labelsize=_FS_TICK)
        det_ax.grid(True, color="#e6e6e6", linewidth=0.7, zorder=0)
        det_ax.set_axisbelow(True)
        det_handles = [
            Line2D([], [], color="#444444", linestyle="-", label="CP detector (95 % CI band)"),
            Line2D([], [], color="#444444", linestyle="--", label="hidden-state probe"),
            Line2D([], [], color="#444444", marker="o", linestyle="", label="flagged layer"),
            Line2D([], [], color="black", linewidth=0.8, linestyle=":", label="chance (AUROC 0.50)"),
        ]
        if levels:
            for level in levels:
                det_ax.axhline(level, color=_THRESHOLD_COLOR, linewidth=0.8, zorder=1)
            values = ", ".join(f"{v:.2f}" if round(v, 2) == v else f"{v:g}" for v in sorted(levels))
            name = "flag threshold" if len(levels) == 1 else "flag thresholds"
            det_handles.append(Line2D([], [], color=_THRESHOLD_COLOR, linewidth=0.8, label=f"{name} (AUROC {values})"))
        _side_legend(fig, det_ax, det_handles, "Detection", "attnscan:legend:detection")
    else:
        ax.set_xlabel("Relative layer depth  (layer / (layers − 1))", fontsize=_FS_LABEL)
    ax.set_ylabel(ylabel if ylabel is not None else _YLABELS.get(value, value), fontsize=_FS_LABEL)
    ax.tick_params(labelsize=_FS_TICK)
    ax.grid(True, color="#e6e6e6", linewidth=0.7, zorder=0)
    ax.set_axisbelow(True)
    if len(set(depths.values())) == 1:
        depth = next(iter(depths.values()))
        if depth > 1:
            scale = float(depth - 1)

            def to_layer(v: Any) -> Any:
                return np.asarray(v) * scale

            def to_depth(v: Any) -> Any:
                return np.asarray(v) / scale

            top = ax.secondary_xaxis("top", functions=(to_layer, to_depth))
            top.set_xlabel("Layer", fontsize=_FS_LABEL)
            top.tick_params(labelsize=_FS_TICK)
            from matplotlib.ticker import MaxNLocator

            top.xaxis.set_major_locator(MaxNLocator(nbins=min(depth, 9), integer=True))
    ordered = [v for v in VERDICT_COLORS if v in verdicts_seen] + [v for v in verdicts_seen if v not in VERDICT_COLORS]
    verdict_handles = [
        Line2D(
            [],
            [],
            linestyle="",
            marker="o",
            markersize=8,
            markerfacecolor=VERDICT_COLORS.get(v, _OTHER_VERDICT_COLOR),
            markeredgecolor="none",
            label=v,
        )
        for v in ordered
    ]
    # Both legends in one column right of the top panel, the verdicts directly below the models.
    leg_models = _side_legend(fig, ax, model_handles, "Model", "attnscan:legend:models")
    below = leg_models.get_window_extent().height / fig.dpi + _LEGEND_GAP
    _side_legend(fig, ax, verdict_handles, "Verdict", "attnscan:legend:verdicts", down=below)
    if title:
        fig.suptitle(title, fontsize=_FS_SUPTITLE - 2, fontweight="bold")
    return fig


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
        fontsize=_FS_TICK - 0.5,
        title_fontsize=_FS_LABEL - 1,
        alignment="left",
    )
    legend.set_label(label)
    ax.add_artist(legend)
    legend.set_clip_on(False)  # add_artist clips to the axes, which would hide it and keep it out of the layout
    return legend


def _detection_lines(
    ax: Axes,
    key: str,
    table: pd.DataFrame,
    depth: int,
    color: str,
    marker: str,
    threshold: float | None,
) -> float | None:
    """One model's detection AUROC per layer on ``ax`` (see :func:`layer_profile_figure`); returns its flag
    threshold (``threshold``, else the table's ``attrs["threshold"]``, else ``None``), which the caller draws."""
    if "layer" not in table.columns or not ({"cp_auroc", "probe_auroc"} & set(table.columns)):
        raise AttnscanError(
            f"detection table '{key}' needs a 'layer' column and cp_auroc and/or probe_auroc: give the "
            "detection.csv that attnscan detect train writes"
        )
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


_PICK_COLUMNS = ("layer", "effect", "q_signed", "q_abs", "verdict")
_Key = tuple[float, float, int]


def _q(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.where(np.isnan(values), np.inf, values)


def pick_rows(tables: Mapping[str, pd.DataFrame]) -> list[tuple[str, int]]:
    """The (model key, layer) rows to show for ``--rows auto``.

    Each table needs columns ``layer``, ``effect``, ``q_signed``, ``q_abs`` and ``verdict``; a missing q counts as
    least significant. With several models: the most significant layer of each, in table order, i.e. the smallest
    ``min(q_signed, q_abs)``, ties broken by the larger ``|effect|``, then the lower layer.

    With one model: up to three distinct layers, in this order: the strongest positive shift (``effect > 0`` and
    not ``"mixed"``; smallest ``q_signed``, then largest ``effect``), the most mixed layer (verdict ``"mixed"``;
    smallest ``q_abs``, then largest ``q_signed``) and the strongest negative shift (``effect < 0`` and not
    ``"mixed"``; smallest ``q_signed``, then most negative ``effect``). A kind with no candidate falls back to the
    most significant layer not yet chosen (as above), so a model with three or more layers always gives three rows.
    """
    if not tables:
        raise AttnscanError("no layer tables to pick rows from")
    cols = {key: _columns(key, table, _PICK_COLUMNS) for key, table in tables.items()}
    if len(cols) > 1:
        return [(key, _LayerRanks(c).most_significant()) for key, c in cols.items()]
    key, c = next(iter(cols.items()))
    return [(key, layer) for layer in _LayerRanks(c).three_kinds()]


class _LayerRanks:
    """Rankings of one model's layers for :func:`pick_rows` (a missing q ranks last)."""

    def __init__(self, c: Mapping[str, np.ndarray[Any, Any]]) -> None:
        self.layers = [int(v) for v in c["layer"]]
        self.qs = [float(v) for v in _q(c["q_signed"])]
        self.qa = [float(v) for v in _q(c["q_abs"])]
        self.eff = [float(v) for v in c["effect"]]
        self.verdict = [str(v) for v in c["verdict"]]

    def overall(self, i: int) -> _Key:
        return (min(self.qs[i], self.qa[i]), -abs(self.eff[i]), self.layers[i])

    def positive(self, i: int) -> _Key:
        return (self.qs[i], -self.eff[i], self.layers[i])

    def mixed(self, i: int) -> _Key:
        return (self.qa[i], -self.qs[i], self.layers[i])

    def negative(self, i: int) -> _Key:
        return (self.qs[i], self.eff[i], self.layers[i])

    def most_significant(self) -> int:
        return self.layers[min(range(len(self.layers)), key=self.overall)]

    def three_kinds(self) -> list[int]:
        """Strongest positive, most mixed, strongest negative layer; each absent kind falls back to ``overall``."""
        idx = range(len(self.layers))
        kinds: list[tuple[list[int], Callable[[int], _Key]]] = [
            ([i for i in idx if self.eff[i] > 0 and self.verdict[i] != "mixed"], self.positive),
            ([i for i in idx if self.verdict[i] == "mixed"], self.mixed),
            ([i for i in idx if self.eff[i] < 0 and self.verdict[i] != "mixed"], self.negative),
        ]
        chosen: dict[int, int] = {}
        taken: set[int] = set()
        for k in range(3):
            cands = [i for i in kinds[k][0] if self.layers[i] not in taken]
            if cands:
                chosen[k] = min(cands, key=kinds[k][1])
                taken.add(self.layers[chosen[k]])
        for k in range(3):
            rest = [i for i in idx if self.layers[i] not in taken]
            if k not in chosen and rest:
                chosen[k] = min(rest, key=self.overall)
                taken.add(self.layers[chosen[k]])
        return [self.layers[chosen[k]] for k in sorted(chosen)]


# ------------------------------------------------------------------------------------- layer-bypass trade-off


def trade_off_figure(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Jailbreak refusal rate (y) against benign retention (x), one point per row labelled ``k=…``.

    ``table`` is :func:`attnscan.defend.sweep`'s output (columns ``k``, ``jailbreak_refusal_rate``,
    ``benign_retention`` and, when present, their ``_low``/``_high`` Wilson bounds, drawn as error bars). Up and to
    the right is better.
    Rows at the same point share one label (``k=2,4``); each label goes to the first of a few spots around its
    point that keeps it clear of the other labels and points (:func:`_place_labels`).
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
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("benign retention (share of benign prompts answered)")
    ax.set_ylabel("refusal rate on jailbreak prompts")
    ax.set_title(title or "Layer bypass: safety vs. helpfulness")
    ax.grid(True, alpha=0.3)
    groups: dict[tuple[float, float], list[int]] = {}
    for xi, yi, k in zip(x, y, ks, strict=True):
        groups.setdefault((float(xi), float(yi)), []).append(int(k))
    _place_labels(fig, ax, [(xy, "k=" + ",".join(map(str, members))) for xy, members in groups.items()])
    return fig


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
