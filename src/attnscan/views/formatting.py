"""Text helpers of the HTML report shared by its digest and its page: escaping, number formats, captions, and the
verdict CSS classes."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

from .palette import VERDICT_COLORS

__all__ = ["VERDICT_ORDER", "caption", "esc", "finite", "format_value", "nice_step", "verdict_class"]

#: The known verdicts in their colour order; the page's CSS classes ``.v0``-``.v3`` follow it (others: ``.vx``).
VERDICT_ORDER = tuple(VERDICT_COLORS)


def esc(value: Any) -> str:
    """``str(value)`` escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def finite(value: Any) -> float | None:
    """A float, or None for NaN / inf / non-numbers (JSON has no NaN)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def nice_step(span: float, target: int) -> float:
    """A round axis step (1, 2, 2.5 or 5 times a power of ten) giving about ``target`` steps over ``span``."""
    raw = span / max(target, 1)
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * mag >= raw:
            return m * mag
    return 10.0 * mag


def format_value(value: Any, kind: str) -> str:
    """A table value as shown on the page; ``kind`` is a format of the verdict table (``int``, ``signed``, ``q``,
    ``pct``, ``fixed4``, ``verdict``); "—" for a missing number."""
    if kind == "verdict":
        return str(value)
    f = finite(value)
    if f is None:
        return "—"
    if kind == "int":
        return str(int(f))
    if kind == "signed":
        return f"{f:+.3f}".replace("-", "−")
    if kind == "q":
        return f"{f:.2g}"
    if kind == "pct":
        return f"{f:.0%}"
    return f"{f:.4f}"


def caption(info: Mapping[str, Any]) -> str:
    """One layer's caption (heatmap title, profile tooltip) from its digest entry: verdict, signed shift, CI, q."""
    text = f"Layer {info['layer']}"
    if info.get("verdict"):
        text += f" — {info['verdict']}"
    if info.get("shift") is not None:
        text += f": signed shift {format_value(info['shift'], 'signed')} nats"
        if info.get("lo") is not None and info.get("hi") is not None:
            text += f" (95 % CI {format_value(info['lo'], 'signed')} to {format_value(info['hi'], 'signed')})"
    if info.get("q") is not None:
        text += f", q = {info['q']:.2g}"
    return text


def verdict_class(verdict: Any) -> str:
    """The CSS class of a verdict's colour: ``v0``-``v3`` in :data:`VERDICT_ORDER`, ``vx`` for any other."""
    text = str(verdict)
    return f"v{VERDICT_ORDER.index(text)}" if text in VERDICT_ORDER else "vx"
