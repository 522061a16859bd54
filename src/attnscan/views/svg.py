"""The report's charts as inline SVG: the layer profile and the detection AUROC per layer, drawn from the digest.

Every string that comes from the data (labels, captions) goes through :func:`~attnscan.views.formatting.esc`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .formatting import VERDICT_ORDER, caption, esc, nice_step, verdict_class
from .palette import MODEL_STYLES

__all__ = ["render_detection", "render_profile"]


@dataclass(frozen=True)
class _Plot:
    """A chart's box (``w`` x ``h`` with margins) and its data ranges: layers ``xmin..xmax`` (one slot each) on x,
    values ``lo..hi`` on y (up)."""

    w: float
    h: float
    left: float
    right: float
    top: float
    bottom: float
    xmin: int
    xmax: int
    lo: float
    hi: float

    @property
    def pw(self) -> float:
        return self.w - self.left - self.right

    @property
    def ph(self) -> float:
        return self.h - self.top - self.bottom

    def x(self, layer: float) -> float:
        return self.left + (layer - self.xmin + 0.5) / (self.xmax - self.xmin + 1) * self.pw

    def y(self, v: float) -> float:
        return self.top + (self.hi - v) / (self.hi - self.lo) * self.ph

    def frame(self) -> str:
        return f"<rect class='frame' x='{self.left}' y='{self.top}' width='{self.pw}' height='{self.ph}'/>"

    def axis_labels(self, below: float, ylabel: str) -> list[str]:
        """ "Layer" under the x axis (``below`` above the bottom edge) and ``ylabel`` turned along the y axis."""
        return [
            f"<text class='axis' x='{self.left + self.pw / 2}' y='{self.h - below}' text-anchor='middle'>Layer</text>",
            f"<text class='axis' transform='translate(16 {self.top + self.ph / 2}) rotate(-90)' text-anchor='middle'>"
            f"{ylabel}</text>",
        ]

    def svg(self, element_id: str, label: str, parts: Sequence[str]) -> str:
        return (
            f"<svg id='{element_id}' viewBox='0 0 {self.w:g} {self.h:g}' role='img' aria-label='{label}'>"
            f"{''.join(parts)}</svg>"
        )


# ---------------------------------------------------------------------------------------------------- layer profile


def render_profile(digest: Mapping[str, Any]) -> str:
    """The layer profile as inline SVG: signed shift and its 95 % interval against layer, points by verdict."""
    models = [m for m in digest["models"] if m["table"] is not None]
    if not models:
        return "<p class='muted'>No layer tables, so no profile.</p>"
    plot = _profile_plot(models)
    parts = [plot.frame(), *_profile_axes(plot)]
    for index, model in enumerate(digest["models"]):
        if model["table"] is not None:
            parts += _profile_series(plot, index, model)
    return (
        plot.svg("profile-svg", "Layer profile", parts)
        + f"<div class='legend'>{''.join(_profile_legend(digest))}</div>"
        "<p class='muted'>Points: signed shift per layer; bars: its 95 % bootstrap interval. Click a point to show "
        "that layer's heatmaps.</p>"
    )


def _profile_plot(models: Sequence[Mapping[str, Any]]) -> _Plot:
    """The profile's box and ranges: every shift and interval end, and zero, with 6 % to spare."""
    layers = [i["layer"] for m in models for i in m["layers"]]
    values = [v for m in models for i in m["layers"] for v in (i["shift"], i["lo"], i["hi"]) if v is not None]
    lo, hi = float(min([*values, 0.0])), float(max([*values, 0.0]))
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    pad = (hi - lo) * 0.06
    return _Plot(960.0, 360.0, 70.0, 20.0, 18.0, 52.0, int(min(layers)), int(max(layers)), lo - pad, hi + pad)


def _profile_axes(p: _Plot) -> list[str]:
    """Grid lines and ticks at round values and layers, the zero line and the axis labels."""
    parts = []
    ystep = nice_step(p.hi - p.lo, 6)
    digits = 0
    while digits < 6 and abs(round(ystep, digits) - ystep) > 1e-9 * ystep:
        digits += 1
    for k in range(math.ceil(p.lo / ystep), math.floor(p.hi / ystep) + 1):
        tick = k * ystep
        yy = p.y(tick)
        label = "0" if k == 0 else f"{tick:+.{digits}f}".replace("-", "−")
        parts.append(f"<line class='grid' x1='{p.left}' x2='{p.left + p.pw}' y1='{yy:.2f}' y2='{yy:.2f}'/>")
        parts.append(f"<text class='tick' x='{p.left - 6}' y='{yy + 4:.2f}' text-anchor='end'>{esc(label)}</text>")
    xstep = max(1, int(nice_step(p.xmax - p.xmin + 1, 16)))
    for layer in range(p.xmin, p.xmax + 1):
        if (layer - p.xmin) % xstep == 0:
            xx = p.x(layer)
            parts.append(f"<line class='grid' x1='{xx:.2f}' x2='{xx:.2f}' y1='{p.top}' y2='{p.top + p.ph}'/>")
            parts.append(f"<text class='tick' x='{xx:.2f}' y='{p.top + p.ph + 16}' text-anchor='middle'>{layer}</text>")
    parts.append(f"<line class='zero' x1='{p.left}' x2='{p.left + p.pw}' y1='{p.y(0.0):.2f}' y2='{p.y(0.0):.2f}'/>")
    return parts + p.axis_labels(10, "Signed shift, jailbreak − benign (nats)")


def _profile_series(p: _Plot, index: int, model: Mapping[str, Any]) -> list[str]:
    """One model's line, interval bars and verdict-coloured points (each with its caption as a tooltip)."""
    color = esc(model["color"])
    parts = []
    pts = [(i["layer"], i["shift"]) for i in model["layers"] if i["shift"] is not None]
    if len(pts) > 1:
        path = " ".join(f"{p.x(a):.2f},{p.y(b):.2f}" for a, b in pts)
        parts.append(f"<polyline class='line' stroke='{color}' points='{path}'/>")
    for info in model["layers"]:
        if info["shift"] is None:
            continue
        xx = p.x(info["layer"])
        if info["lo"] is not None and info["hi"] is not None:
            parts.append(
                f"<line class='ci' stroke='{color}' x1='{xx:.2f}' x2='{xx:.2f}' "
                f"y1='{p.y(info['lo']):.2f}' y2='{p.y(info['hi']):.2f}'/>"
            )
        tip = f"{model['label']} · {caption(info)}"
        parts.append(
            f"<circle class='pt {verdict_class(info['verdict'])}' cx='{xx:.2f}' cy='{p.y(info['shift']):.2f}' "
            f"r='5' stroke='{color}' tabindex='0' data-model='{index}' data-layer='{info['layer']}'>"
            f"<title>{esc(tip)}</title></circle>"
        )
    return parts


def _profile_legend(digest: Mapping[str, Any]) -> list[str]:
    """Keys of the verdicts seen (known ones in colour order, then others sorted) and, for several models, of the
    models' line colours."""
    models = [m for m in digest["models"] if m["table"] is not None]
    seen = {i["verdict"] for m in models for i in m["layers"]}
    legend = [
        f"<span class='key'><span class='chip {verdict_class(v)}'></span>{esc(v)}</span>"
        for v in (*VERDICT_ORDER, *sorted(str(s) for s in seen if s not in VERDICT_ORDER and s is not None))
        if v in seen
    ]
    if len(models) > 1:
        legend += [
            f"<span class='key'><span class='swatch m{k % len(MODEL_STYLES)}'></span>{esc(m['label'])}</span>"
            for k, m in enumerate(digest["models"])
            if m["table"] is not None
        ]
    return legend


# ------------------------------------------------------------------------------------------------- detection AUROC


def render_detection(digest: Mapping[str, Any]) -> str:
    """Cross-validated detection AUROC per layer (CP line with interval bars, probe dashed), when given."""
    models = [(k, m) for k, m in enumerate(digest["models"]) if m.get("detection")]
    if not models:
        return ""
    layers = [r["layer"] for _, m in models for r in m["detection"]]
    p = _Plot(960.0, 240.0, 70.0, 20.0, 14.0, 46.0, int(min(layers)), int(max(layers)), 0.0, 1.0)
    parts = [p.frame()]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        cls = "zero" if tick == 0.5 else "grid"
        parts.append(
            f"<line class='{cls}' x1='{p.left}' x2='{p.left + p.pw}' y1='{p.y(tick):.2f}' y2='{p.y(tick):.2f}'/>"
        )
        parts.append(f"<text class='tick' x='{p.left - 6}' y='{p.y(tick) + 4:.2f}' text-anchor='end'>{tick:g}</text>")
    xstep = max(1, int(nice_step(p.xmax - p.xmin + 1, 16)))
    for layer in range(p.xmin, p.xmax + 1, xstep):
        parts.append(
            f"<text class='tick' x='{p.x(layer):.2f}' y='{p.top + p.ph + 16}' text-anchor='middle'>{layer}</text>"
        )
    parts += p.axis_labels(8, "Detection AUROC")
    for index, model in models:
        parts += _baseline_line(p, model)
        parts += _detection_series(p, index, model)
    words = [
        f"<p>{esc(m['label']) + ': ' if len(models) > 1 else ''}{esc(m['detection_baseline']['words'])}</p>"
        for _, m in models
        if m.get("detection_baseline")
    ]
    return (
        "<h3>Jailbreak detection per layer</h3>"
        + p.svg("detection-svg", "Detection AUROC per layer", parts)
        + "<p class='muted'>Cross-validated AUROC of the CP detector per layer (solid, bars: 95 % bootstrap interval; "
        "filled: flagged layers) and of the hidden-state probe (dashed); "
        + (
            "dash-dotted: the TF-IDF text baseline on the same folds, which a detector must beat to show that the "
            "model's internals tell more than the prompt text; "
            if words
            else "no text baseline was computed (train with --baselines to compare with one); "
        )
        + "0.5 is chance. A detector can separate the sets by their wrappers alone: check it on a control set (same "
        "wrappers, benign requests).</p>" + "".join(words)
    )


def _baseline_line(p: _Plot, model: Mapping[str, Any]) -> list[str]:
    """One model's text-baseline AUROC as a dash-dotted line across the panel, with its numbers as a tooltip."""
    base = model.get("detection_baseline")
    if not base or base["text"] is None:
        return []
    y = p.y(base["text"])
    tip = f"{model['label']} · TF-IDF text baseline AUROC {base['text']:.3f}"
    return [
        f"<line class='baseline' stroke='{esc(model['color'])}' stroke-dasharray='8 3 2 3' x1='{p.left}' "
        f"x2='{p.left + p.pw}' y1='{y:.2f}' y2='{y:.2f}'><title>{esc(tip)}</title></line>"
    ]


def _detection_series(p: _Plot, index: int, model: Mapping[str, Any]) -> list[str]:
    """One model's CP line (points filled where flagged, interval bars), and its probe line dashed."""
    color = esc(model["color"])
    parts = []
    rows = [r for r in model["detection"] if r["cp"] is not None]
    if len(rows) > 1:
        path = " ".join(f"{p.x(r['layer']):.2f},{p.y(r['cp']):.2f}" for r in rows)
        parts.append(f"<polyline class='line' stroke='{color}' points='{path}'/>")
    probe = [r for r in model["detection"] if r["probe"] is not None]
    if len(probe) > 1:
        path = " ".join(f"{p.x(r['layer']):.2f},{p.y(r['probe']):.2f}" for r in probe)
        parts.append(f"<polyline class='line' stroke='{color}' stroke-dasharray='5 4' points='{path}'/>")
    for r in rows:
        xx = p.x(r["layer"])
        if r["lo"] is not None and r["hi"] is not None:
            parts.append(
                f"<line class='ci' stroke='{color}' x1='{xx:.2f}' x2='{xx:.2f}' y1='{p.y(r['lo']):.2f}' "
                f"y2='{p.y(r['hi']):.2f}'/>"
            )
        fill = color if r["flagged"] else "#ffffff"
        probe_text = f", probe {r['probe']:.3f}" if r["probe"] is not None else ""
        margin = r.get("margin")
        margin_text = "" if margin is None else f" · minus text baseline {margin:+.3f}"
        if margin is not None and r.get("margin_lo") is not None and r.get("margin_hi") is not None:
            margin_text += f" [{r['margin_lo']:+.3f}, {r['margin_hi']:+.3f}]"
        tip = f"{model['label']} · layer {r['layer']}: CP AUROC {r['cp']:.3f}{probe_text}{margin_text}" + (
            " · flagged" if r["flagged"] else ""
        )
        parts.append(
            f"<circle class='det' cx='{xx:.2f}' cy='{p.y(r['cp']):.2f}' r='4' stroke='{color}' fill='{fill}' "
            f"data-model='{index}' data-layer='{r['layer']}'><title>{esc(tip)}</title></circle>"
        )
    return parts
