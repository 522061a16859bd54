"""The attention-map grid figure, its rows, and which (model, layer) rows to show.

- :class:`FigureRow` and :func:`rows_from_result`: a row's label, layer and three ``[T, T]`` maps.
- :func:`grid_figure`: one row per (model, layer), columns Benign / Jailbreak / Difference; each panel a ``T x T``
  heatmap of log attention (query rows top to bottom, key columns left to right), NaN cells (above the diagonal,
  beyond every prompt's length) in a neutral grey that no colormap colour is close to.
- :func:`pick_rows`: which (model, layer) rows to show for ``--rows auto``.

Everything here is a pure function of plain data (numpy arrays, per-layer tables) or of a
:class:`~attnscan.analysis.result.ScanResult`; nothing imports model code. matplotlib is imported lazily, inside the
functions, and figures are built with :class:`matplotlib.figure.Figure` directly (never ``pyplot``), so no global
figure registry or interactive backend is involved and the module is safe on headless machines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..errors import AttnscanError
from .labels import model_label
from .palette import (
    DIFF_CMAP,
    DIFF_RANGE,
    FS_LABEL,
    FS_ROW,
    FS_SUPTITLE,
    FS_TICK,
    FS_TITLE,
    LOG_CMAP,
    LOG_RANGE,
    NAN_COLOR,
    TITLE_COLORS,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure, SubFigure
    from matplotlib.image import AxesImage

    from ..analysis.result import ScanResult

__all__ = [
    "COLUMN_TITLES",
    "FigureRow",
    "grid_figure",
    "layer_columns",
    "pick_rows",
    "rows_from_result",
]

#: Column titles of :func:`grid_figure`, left to right.
COLUMN_TITLES = ("Benign", "Jailbreak", "Difference")
_MAX_TICK_INTERVALS = 8


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


def rows_from_result(
    result: ScanResult,
    layers: Sequence[int],
    label: str | None = None,
    verdicts: Mapping[int, str] | None = None,
) -> list[FigureRow]:
    """The :class:`FigureRow` of each of ``layers`` (in that order) from a scan result with benign and jailbreak sets.

    ``label`` defaults to :func:`~attnscan.views.labels.model_label` of ``result.manifest["model"]["spec"]``
    (``"model"`` when the manifest has none). ``verdicts`` maps a layer to its verdict tag, e.g.
    ``dict(zip(table.layer, table.verdict))``; layers missing from it get no tag. Maps are ``float64 [T, T]`` numpy
    arrays.
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


# ------------------------------------------------------------------------------------------------------- the grid


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
    ax.set_xlabel("Key Token", fontsize=FS_LABEL)
    ax.set_ylabel("Query Token", fontsize=FS_LABEL)
    ax.tick_params(labelsize=FS_TICK, length=3)
    # No frame: a spine would cover key column 0, where attention sinks show.
    for spine in ax.spines.values():
        spine.set_visible(False)
    return im


def grid_figure(
    rows: Sequence[FigureRow],
    *,
    log_range: tuple[float, float] = LOG_RANGE,
    diff_range: tuple[float, float] = DIFF_RANGE,
    tick_step: int | None = 64,
    dpi: int = 200,
    cmap: str | Colormap = LOG_CMAP,
    diff_cmap: str | Colormap = DIFF_CMAP,
    title: str | None = None,
) -> Figure:
    """The attention-map grid: one row per :class:`FigureRow`, columns Benign, Jailbreak and Difference.

    Each panel shows a ``[T, T]`` map with query tokens top to bottom and key tokens left to right (axes 0..T, ticks
    every ``tick_step`` tokens, or every multiple of it that keeps at most 8 intervals for long grids; matplotlib's
    own ticks when ``tick_step`` is ``None`` or would leave fewer than three).
    Benign and Jailbreak use ``cmap`` on ``log_range`` and share one colour bar ("log attention") right of the
    Jailbreak panel; Difference uses ``diff_cmap`` on ``diff_range`` with its own colour bar ("Δ log attention").
    Colour bars get arrow ends where data are clipped. NaN cells are drawn in
    :data:`~attnscan.views.palette.NAN_COLOR`. Each row is a subfigure titled ``"MODEL - Layer L"`` (plus the verdict
    tag, when given); ``title`` is the figure's title.

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
        fig.suptitle(title, fontsize=FS_SUPTITLE, fontweight="bold")
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
            ax.set_title(col, fontsize=FS_TITLE, pad=6)
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
            cb.set_label(text, fontsize=FS_LABEL)
            cb.ax.tick_params(labelsize=FS_TICK)
        row_title = row.title if row.verdict is None else f"{row.title}  ·  {row.verdict}"
        color = "black" if row.verdict is None else TITLE_COLORS.get(row.verdict.strip().lower(), "black")
        sub.suptitle(row_title, fontsize=FS_ROW, fontweight="bold", color=color)
    return fig


# ------------------------------------------------------------------------------------------- which rows to show


def layer_columns(key: str, table: pd.DataFrame, needed: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
    """The ``needed`` columns of layer table ``key`` as numpy arrays: layers as ``int64``, numbers as ``float64``,
    verdicts stripped and lower-cased. Raises :class:`~attnscan.errors.AttnscanError` for a missing column or an
    empty table."""
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
    cols = {key: layer_columns(key, table, _PICK_COLUMNS) for key, table in tables.items()}
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
