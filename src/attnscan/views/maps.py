"""The report's heatmaps: block-averaged and quantised to one byte per cell, base64-encoded.

Every ``[T, T]`` map is block-averaged to at most ``display_size`` cells a side (each display cell is the mean of the
non-NaN cells of an ``f x f`` block of token positions, NaN when none; ``f = ceil(T / display_size)``, raised
further while the maps of all models would exceed the byte budget: :func:`choose_factor`) and quantised to one byte
per cell (255 = NaN), base64-encoded:

- log maps: linear over ``[floor, 0]`` (254 steps, 0.04 nats for the default floor of -10);
- difference: ``asinh`` companding over ``[floor, -floor]``, ``v = s * sinh((code - 127) / 127 * asinh(-floor / s))``
  with ``s = 0.25`` (about 0.01 nats near 0 and about 3 % of the value at +-4 nats).

For T = 448 with 30 layers and the default ``display_size=224`` the maps take about 6 MB of the file. When every set
reaches at most half the grid (short prompts in absolute alignment) a finer zoomed view of the reached corner is
stored too.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..errors import AttnscanError

if TYPE_CHECKING:
    from ..analysis.result import ScanResult

__all__ = ["block_mean", "choose_factor", "colormap_hex", "maps_digest"]

FloatArray = npt.NDArray[np.float64]

_NAN_CODE = 255
_DIFF_SCALE = 0.25


def block_mean(x: FloatArray, factor: int) -> FloatArray:
    """``[T, T]`` -> ``[ceil(T/f), ceil(T/f)]``: the mean of each ``f x f`` block's finite cells (NaN when none)."""
    t = x.shape[0]
    d = -(-t // factor)
    pad = d * factor - t
    if pad:
        x = np.pad(x, ((0, pad), (0, pad)), constant_values=np.nan)
    blocks = x.reshape(d, factor, d, factor)
    ok = np.isfinite(blocks)
    s = np.where(ok, blocks, 0.0).sum(axis=(1, 3))
    n = ok.sum(axis=(1, 3))
    out: FloatArray = np.where(n > 0, s / np.maximum(n, 1), np.nan)
    return out


def _quantise_log(x: FloatArray, floor: float) -> bytes:
    ok = np.isfinite(x)
    codes = np.rint((np.where(ok, x, floor) - floor) / (0.0 - floor) * 254.0).clip(0, 254)
    return np.where(ok, codes, _NAN_CODE).astype(np.uint8).tobytes()


def _quantise_diff(x: FloatArray, limit: float) -> bytes:
    ok = np.isfinite(x)
    scaled = np.arcsinh(np.where(ok, x, 0.0) / _DIFF_SCALE) / math.asinh(limit / _DIFF_SCALE)
    codes = np.rint(scaled * 127.0 + 127.0).clip(0, 254)
    return np.where(ok, codes, _NAN_CODE).astype(np.uint8).tobytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _zoom_extent(result: ScanResult) -> int | None:
    """Grid positions ``0..S-1`` that every set of the maps reaches, when that is at most half the grid (short
    prompts in absolute alignment): the report offers a zoomed view of them. None otherwise."""
    names = [k for k in _kinds(result) if k != "diff"]
    if not names:
        return None
    extent = min(int((result.count(k)[:, 0] > 0).sum()) for k in names)
    return extent if 2 <= extent <= result.length // 2 else None


def _zoom_factor(result: ScanResult, extent: int, factor: int, display_size: int) -> int:
    """Block size of the zoomed view: fits ``display_size`` and is never finer than needed to keep the zoomed maps
    smaller than the full ones (``extent / zoom_factor <= length / factor``)."""
    return max(_ceil_div(extent, display_size), _ceil_div(extent * factor, result.length))


def choose_factor(results: Mapping[str, ScanResult], display_size: int, budget: int) -> int:
    """The block size: the smallest that brings every map to ``display_size`` and all maps within ``budget``."""
    if display_size < 8:
        raise AttnscanError(f"display_size must be at least 8 cells, got {display_size}")
    longest = max(r.length for r in results.values())
    factor = max(1, _ceil_div(longest, display_size))
    extents = {k: _zoom_extent(r) for k, r in results.items()}

    def size(f: int) -> int:
        """Base64 bytes of all maps at block size ``f``."""
        total = 0
        for key, r in results.items():
            sides = [_ceil_div(r.length, f)]
            extent = extents[key]
            if extent is not None:
                sides.append(_ceil_div(extent, _zoom_factor(r, extent, f, display_size)))
            total += len(_kinds(r)) * len(r.layers) * sum(4 * _ceil_div(side * side, 3) for side in sides)
        return total

    while size(factor) > budget and factor < longest:
        factor += 1
    return factor


def _kinds(result: ScanResult) -> list[str]:
    kinds: list[str] = [k for k in ("benign", "jailbreak") if k in result.sets]
    if len(kinds) == 2:
        kinds.append("diff")
    return kinds


def colormap_hex(name: str) -> str:
    """256 colours of a matplotlib colormap as one hex string (6 characters per colour)."""
    import matplotlib as mpl

    rgba = mpl.colormaps[name](np.linspace(0.0, 1.0, 256))
    rgb: npt.NDArray[np.uint8] = np.rint(np.asarray(rgba, dtype=np.float64)[:, :3] * 255).astype(np.uint8)
    return rgb.tobytes().hex()


def _log_map(result: ScanResult, name: str, layer: int) -> FloatArray:
    """``float64 [T, T]``: the numbers of :meth:`ScanResult.log` computed in numpy from the accumulator (the torch
    version's per-call overhead dominates a report over many layers)."""
    acc = result.sets[name]
    count = acc.count.numpy()
    mean = acc.sums[acc.layer_pos(layer)].numpy() / np.maximum(count, 1)
    out: FloatArray = np.where(count > 0, np.log(np.maximum(mean, math.exp(result.floor))), np.nan)
    return out


def maps_digest(result: ScanResult, factor: int, display_size: int) -> dict[str, Any]:
    floor = float(result.floor)
    t = result.length
    kinds = _kinds(result)
    extent = _zoom_extent(result)
    views: dict[str, dict[str, Any]] = {"full": {"extent": t, "factor": factor}}
    if extent is not None:
        views["zoom"] = {"extent": extent, "factor": _zoom_factor(result, extent, factor, display_size)}
    for view in views.values():
        view["size"] = _ceil_div(view["extent"], view["factor"])
        view["data"] = {k: [] for k in kinds}
    for layer in result.layers:
        logs = {k: _log_map(result, k, layer) for k in kinds if k != "diff"}
        if "diff" in kinds:  # = ScanResult.diff(layer), from the logs computed above
            logs["diff"] = logs["jailbreak"] - logs["benign"]
        for view in views.values():
            n, f = view["extent"], view["factor"]
            for kind, full in logs.items():
                small = block_mean(full[:n, :n], f)
                code = _quantise_diff(small, -floor) if kind == "diff" else _quantise_log(small, floor)
                view["data"][kind].append(_b64(code))
    reach = {k: [int(v) for v in result.count(k)[:, 0].tolist()] for k in kinds if k != "diff"}
    return {
        "length": t,
        "full": views["full"],
        "zoom": views.get("zoom"),
        "layers": [int(x) for x in result.layers],
        "kinds": kinds,
        "encoding": {
            "log": {"kind": "linear", "lo": floor, "hi": 0.0, "nan": _NAN_CODE},
            "diff": {"kind": "asinh", "scale": _DIFF_SCALE, "max": -floor, "nan": _NAN_CODE},
        },
        "reach": reach,
    }
