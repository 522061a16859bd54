"""The HTML report: one self-contained file with provenance, verdict tables, the layer profile, interactive heatmaps,
a prompt browser and the observations.

Compute -> plain data -> renderer:

- :func:`build_digest` turns results, layer tables, observations and (optionally) prompt texts and tokens into a
  plain JSON-able dict. Heatmaps are decimated and quantised here (see *Maps* below).
- :func:`render_html` turns a digest into the HTML document. Static parts (provenance, tables, the layer profile as
  inline SVG, the prompt browser, observations) are rendered in Python with every string passed through
  :func:`html.escape`; the heatmap viewer and table sorting are a small script that reads the digest from a
  ``<script type="application/json">`` element and inserts text only through ``textContent``. The script and the
  style sheet live in ``attnscan/views/assets/report.js`` and ``report.css`` and are copied inline into every page.
- :func:`build_report` is both in one call; :func:`write_report` writes the document atomically.

The page loads nothing from the network: no CDN, no fonts, no images. A Content-Security-Policy meta tag allows only
the page's own inline script and style (by sha256 hash), so an injected ``<script>`` or ``onerror=`` could not run
even if escaping failed.

Maps: every ``[T, T]`` map is block-averaged to at most ``display_size`` cells a side (each display cell is the mean
of the non-NaN cells of an ``f x f`` block of token positions, NaN when none; ``f = ceil(T / display_size)``, raised
further while the maps of all models would exceed ``map_budget`` bytes) and quantised to one byte per cell
(255 = NaN), base64-encoded:

- log maps: linear over ``[floor, 0]`` (254 steps, 0.04 nats for the default floor of -10);
- difference: ``asinh`` companding over ``[floor, -floor]``, ``v = s * sinh((code - 127) / 127 * asinh(-floor / s))``
  with ``s = 0.25`` (about 0.01 nats near 0 and about 3 % of the value at +-4 nats).

For T = 448 with 30 layers and the default ``display_size=224`` the maps take about 6 MB of the file.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..analysis.result import ScanResult
from ..errors import AttnscanError
from .figures import NAN_COLOR, VERDICT_COLORS

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

__all__ = [
    "DEFAULT_TITLE",
    "block_mean",
    "build_digest",
    "build_report",
    "prefix_tokens",
    "prompts_from_manifest",
    "render_html",
    "write_report",
]

FloatArray = npt.NDArray[np.float64]

DEFAULT_TITLE = "attnscan report"
#: Largest side of a displayed heatmap, in cells.
DISPLAY_SIZE = 224
#: Upper bound on the base64 bytes of all heatmaps in one report; the block size grows until they fit.
MAP_BUDGET = 12_000_000
#: Example prompts shown per set in the prompt browser.
EXAMPLES = 10
#: Longest prompt text shown in the browser, in characters.
MAX_PROMPT_CHARS = 4000

_NAN_CODE = 255
_DIFF_SCALE = 0.25
_LOG_RANGE = (-10.0, 0.0)
_DIFF_RANGE = (-4.0, 4.0)
_OTHER_VERDICT_COLOR = "#3a3a3a"
# Model line colours of the profile, as in plot.layer_profile_figure: none reads as a verdict colour.
_MODEL_COLORS = ("#1a1a1a", "#1b9e77", "#a6761d", "#66a61e", "#e6ab02", "#17becf")

# (column, header, tooltip, format); the verdict table shows those present in the layer table, in this order.
_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("layer", "Layer", "Captured layer index", "int"),
    ("verdict", "Verdict", "vulnerable / mixed / resilient when q < alpha, else no significant shift", "verdict"),
    ("signed_shift", "Signed shift", "Mean block shift, jailbreak − benign (nats)", "signed"),
    ("ci_low", "CI low", "Lower end of the 95 % bootstrap interval of the signed shift", "signed"),
    ("ci_high", "CI high", "Upper end of the 95 % bootstrap interval of the signed shift", "signed"),
    ("effect", "Effect", "Standardised effect size of the shift", "signed"),
    ("q_signed", "q signed", "Benjamini–Hochberg q of the two-sided signed permutation test", "q"),
    ("q_abs", "q abs", "Benjamini–Hochberg q of the absolute-shift permutation test", "q"),
    ("mean_diff", "Mean diff", "Mean log difference over the cells both sets reach (nats)", "signed"),
    ("frac_pos", "Cells ↑", "Fraction of cells with difference above +tol", "pct"),
    ("frac_neg", "Cells ↓", "Fraction of cells with difference below −tol", "pct"),
    ("jsd", "JSD", "Mean row Jensen–Shannon divergence (nats)", "fixed4"),
    ("sink_change", "Sink Δ", "Change of attention on the first token", "signed"),
    ("entropy_change", "Entropy Δ", "Change of mean row entropy (nats)", "signed"),
)
_VERDICT_ORDER = tuple(VERDICT_COLORS)


# --------------------------------------------------------------------------------------------------------------------
# Small helpers


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _finite(value: Any) -> float | None:
    """A float, or None for NaN / inf / non-numbers (JSON has no NaN)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _plain(value: Any) -> Any:
    """A JSON-able copy of a manifest value (NaN -> None, unknown objects -> str)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return _finite(value)
    return str(value)


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0–2, 5, 7–8"``."""
    nums = sorted(int(v) for v in values)
    parts: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}–{nums[j]}")
        i = j + 1
    return ", ".join(parts)


def _texts_sha256(texts: Sequence[str]) -> str:
    """The sha256 :class:`~attnscan.prompts.PromptSet` records for its texts."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * mag >= raw:
            return m * mag
    return 10.0 * mag


def _fmt(value: Any, kind: str) -> str:
    if kind == "verdict":
        return str(value)
    f = _finite(value)
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


# --------------------------------------------------------------------------------------------------------------------
# Maps: decimation and quantisation


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


def _choose_factor(results: Mapping[str, ScanResult], display_size: int, budget: int) -> int:
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


def _colormap_hex(name: str) -> str:
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


def _maps_digest(result: ScanResult, factor: int, display_size: int) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------------------------------
# Digest


def _section(manifest: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = manifest.get(key)
    return value if isinstance(value, Mapping) else {}


def _provenance(manifest: Mapping[str, Any], result: ScanResult) -> list[list[str]]:
    """Curated ``[label, value]`` rows of a bundle manifest (the full manifest goes into the digest too)."""
    model, arch, versions = (_section(manifest, k) for k in ("model", "architecture", "versions"))
    rows: list[list[str]] = []

    def add(label: str, value: Any) -> None:
        if value is None or value == "" or value == []:
            return
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        rows.append([label, str(value)])

    add("Model spec", model.get("spec"))
    add("Source kind", model.get("kind"))
    add("Model card", model.get("card"))
    add("GGUF sha256", model.get("gguf_sha256"))
    add("GGUF file", model.get("gguf_file"))
    add("Revision", model.get("resolved_revision") or model.get("revision"))
    if arch:
        facts = [
            f"{arch.get('model_type', '?')} ({arch.get('config_class', '?')})",
            f"{arch.get('n_layers', '?')} layers",
            f"{arch.get('n_heads', '?')} heads / {arch.get('n_kv_heads', '?')} kv heads",
            f"head dim {arch.get('head_dim', '?')}",
            f"hidden {arch.get('hidden_size', '?')}",
        ]
        if arch.get("sliding_window"):
            facts.append(f"sliding window {arch.get('sliding_window')}")
        add("Architecture", ", ".join(facts))
        add("Capture route", arch.get("route"))
    add("dtype", manifest.get("dtype"))
    add("Device", manifest.get("device"))
    add("Grid length T", manifest.get("length", result.length))
    add("Alignment", manifest.get("alignment"))
    add("Statistic", manifest.get("statistic"))
    add("Floor", manifest.get("floor", result.floor))
    add("Captured layers", f"{_ranges(result.layers)} ({len(result.layers)})")
    if "chat_template" in manifest:
        add("Chat template", "on" if manifest.get("chat_template") else "off")
    add("System prompt", manifest.get("system_prompt"))
    add("Truncation", manifest.get("truncate"))
    add("Padding side", manifest.get("padding_side"))
    add("Batch size", manifest.get("batch_size"))
    add("Summary blocks", manifest.get("summary_blocks"))
    add("Seed", manifest.get("seed"))
    add("Capture time (s)", manifest.get("capture_seconds"))
    version_text = ", ".join(f"{k} {v}" for k, v in versions.items())
    if manifest.get("attnscan_version"):
        version_text = f"attnscan {manifest.get('attnscan_version')}" + (f", {version_text}" if version_text else "")
    add("Versions", version_text)
    add("Started", manifest.get("started"))
    add("Finished", manifest.get("finished"))
    add("Command line", manifest.get("command_line"))
    if result.path is not None:
        add("Bundle", str(result.path))
    return rows


def _prompt_sets(manifest: Mapping[str, Any], result: ScanResult) -> list[dict[str, Any]]:
    sets = manifest.get("prompt_sets")
    out: list[dict[str, Any]] = []
    names = list(sets) if isinstance(sets, Mapping) else []
    names += [n for n in result.sets if n not in names]
    for name in names:
        info = sets.get(name, {}) if isinstance(sets, Mapping) else {}
        info = info if isinstance(info, Mapping) else {}
        count = info.get("count", result.sets[name].n_prompts if name in result.sets else None)
        out.append(
            {
                "name": str(name),
                "source": _plain(info.get("source")),
                "count": _plain(count),
                "of": _plain(info.get("of")),
                "sha256": _plain(info.get("sha256")),
                "tokens_min": _plain(info.get("tokens_min")),
                "tokens_mean": _plain(info.get("tokens_mean")),
                "tokens_max": _plain(info.get("tokens_max")),
                "truncated": _plain(info.get("truncated")),
            }
        )
    return out


def _table_digest(table: pd.DataFrame | None) -> dict[str, Any] | None:
    if table is None:
        return None
    cols = [c for c in _COLUMNS if c[0] in table.columns]
    rows = []
    for rec in table.to_dict("records"):
        row: list[Any] = []
        for key, _, _, kind in cols:
            value = rec[key]
            row.append(str(value) if kind == "verdict" else _finite(value))
        rows.append(row)
    return {
        "columns": [c[0] for c in cols],
        "labels": [c[1] for c in cols],
        "tips": [c[2] for c in cols],
        "formats": [c[3] for c in cols],
        "rows": rows,
        "alpha": _finite(table.attrs.get("alpha")),
    }


def _layer_info(result: ScanResult, table: pd.DataFrame | None) -> list[dict[str, Any]]:
    """Per captured layer: verdict, shift, interval and q for the heatmap caption and the profile."""
    by_layer: dict[int, dict[str, Any]] = {}
    if table is not None and "layer" in table.columns:
        for rec in table.to_dict("records"):
            by_layer[int(rec["layer"])] = rec
    out = []
    for layer in result.layers:
        rec = by_layer.get(int(layer), {})
        qs = [q for q in (_finite(rec.get("q_signed")), _finite(rec.get("q_abs"))) if q is not None]
        out.append(
            {
                "layer": int(layer),
                "verdict": str(rec["verdict"]) if "verdict" in rec else None,
                "shift": _finite(rec.get("signed_shift")),
                "lo": _finite(rec.get("ci_low")),
                "hi": _finite(rec.get("ci_high")),
                "q": min(qs) if qs else None,
                "effect": _finite(rec.get("effect")),
            }
        )
    return out


def _caption(info: Mapping[str, Any]) -> str:
    text = f"Layer {info['layer']}"
    if info.get("verdict"):
        text += f" — {info['verdict']}"
    if info.get("shift") is not None:
        text += f": signed shift {_fmt(info['shift'], 'signed')} nats"
        if info.get("lo") is not None and info.get("hi") is not None:
            text += f" (95 % CI {_fmt(info['lo'], 'signed')} to {_fmt(info['hi'], 'signed')})"
    if info.get("q") is not None:
        text += f", q = {info['q']:.2g}"
    return text


def _prompt_groups(
    results: Mapping[str, ScanResult], prompts: Mapping[str, Mapping[str, Sequence[str]]], examples: int
) -> list[dict[str, Any]]:
    """Prompt browser entries: one per (set, texts), shared by the models that scanned the same texts."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for label, sets in prompts.items():
        result = results[label]
        recorded = result.manifest.get("prompt_sets", {})
        for name, texts in sets.items():
            texts = [str(t) for t in texts]
            sha = _texts_sha256(texts)
            info = recorded.get(name, {}) if isinstance(recorded, Mapping) else {}
            expected = info.get("sha256") if isinstance(info, Mapping) else None
            key = (str(name), sha)
            group = groups.get(key)
            if group is None:
                group = groups[key] = {
                    "set": str(name),
                    "sha256": sha,
                    "total": len(texts),
                    "models": [],
                    "mismatch": [],
                    "examples": [
                        {"index": i, "text": t[:MAX_PROMPT_CHARS], "chars": len(t), "tokens": {}}
                        for i, t in enumerate(texts[:examples])
                    ],
                }
            group["models"].append(label)
            if expected is not None and expected != sha:
                group["mismatch"].append(label)
            if name in result.sets:
                acc = result.sets[name]
                lengths = dict(zip(acc.prompt_ids.tolist(), acc.lengths.tolist(), strict=True))
                for ex in group["examples"]:
                    n = lengths.get(ex["index"])
                    if n is not None:
                        ex["tokens"][label] = int(n)
    return list(groups.values())


def _default_view(models: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The heatmap shown first: the first model's most significant layer (smallest q, then largest |effect|, as
    :func:`attnscan.plot.pick_rows` ranks them)."""
    info = models[0]["layers"]

    def key(i: int) -> tuple[float, float, int]:
        q = info[i]["q"]
        effect = info[i]["effect"]
        return (q if q is not None else math.inf, -abs(effect) if effect is not None else 0.0, i)

    return {"model": 0, "layer": min(range(len(info)), key=key)}


def _tokens_of(label: str, result: ScanResult, tokens: Mapping[str, Sequence[str]] | None) -> list[str] | None:
    """Token texts at grid positions 0, 1, ...: given ones, else the shared prefix the scan recorded."""
    if tokens and label in tokens:
        return [str(t) for t in tokens[label]]
    recorded = result.manifest.get("shared_prefix_tokens")
    if isinstance(recorded, list) and recorded and result.manifest.get("alignment", "absolute") == "absolute":
        return [str(t) for t in recorded]
    return None


def _detection_digest(table: pd.DataFrame | None) -> list[dict[str, Any]] | None:
    """Per-layer detection AUROC (CP with its interval, probe, flagged) from a detection table, or None."""
    if table is None:
        return None
    if "layer" not in table.columns or "cp_auroc" not in table.columns:
        raise AttnscanError("a detection table needs columns 'layer' and 'cp_auroc': give detection.csv of a detector")
    rows = []
    for _, r in table.sort_values("layer").iterrows():
        rows.append(
            {
                "layer": int(r["layer"]),
                "cp": _finite(r["cp_auroc"]),
                "lo": _finite(r.get("cp_auroc_low")),
                "hi": _finite(r.get("cp_auroc_high")),
                "probe": _finite(r.get("probe_auroc")),
                "flagged": bool(r.get("flagged", False)),
            }
        )
    return rows


def build_digest(
    results: Mapping[str, ScanResult],
    tables: Mapping[str, pd.DataFrame],
    observations: Sequence[str],
    prompts: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    tokens: Mapping[str, Sequence[str]] | None = None,
    title: str = DEFAULT_TITLE,
    *,
    display_size: int = DISPLAY_SIZE,
    map_budget: int = MAP_BUDGET,
    examples: int = EXAMPLES,
    generated: str | None = None,
    detection: Mapping[str, pd.DataFrame] | None = None,
) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-able data (see :func:`build_report` for the arguments)."""
    from .._version import __version__

    if not results:
        raise AttnscanError("no results to report: pass at least one scan result")
    for what, mapping in (
        ("tables", tables),
        ("prompts", prompts or {}),
        ("tokens", tokens or {}),
        ("detection", detection or {}),
    ):
        unknown = [k for k in mapping if k not in results]
        if unknown:
            raise AttnscanError(
                f"{what} names model '{unknown[0]}', which is not among the results ({', '.join(results)}): "
                f"key {what} by model label"
            )
    if examples < 0:
        raise AttnscanError(f"examples must be >= 0, got {examples}")
    factor = _choose_factor(results, display_size, map_budget)
    models = []
    for k, (label, result) in enumerate(results.items()):
        table = tables.get(label)
        layers = _layer_info(result, table)
        arch = result.manifest.get("architecture", {})
        n_layers = arch.get("n_layers") if isinstance(arch, Mapping) else None
        models.append(
            {
                "label": label,
                "color": _MODEL_COLORS[k % len(_MODEL_COLORS)],
                "n_layers": int(n_layers) if isinstance(n_layers, int) else None,
                "provenance": _provenance(result.manifest, result),
                "prompt_sets": _prompt_sets(result.manifest, result),
                "manifest": _plain(result.manifest),
                "table": _table_digest(table),
                "layers": layers,
                "captions": [_caption(i) for i in layers],
                "detection": _detection_digest(detection.get(label) if detection else None),
                "maps": _maps_digest(result, factor, display_size),
                "tokens": _tokens_of(label, result, tokens),
            }
        )
    return {
        "format": "attnscan-report",
        "version": 1,
        "title": str(title),
        "generated": generated or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "attnscan_version": __version__,
        "observations": [str(s) for s in observations],
        "models": models,
        "prompts": _prompt_groups(results, prompts or {}, examples),
        "prompts_given": bool(prompts),
        "view": _default_view(models),
        "colors": {
            "nan": NAN_COLOR,
            "verdicts": dict(VERDICT_COLORS),
            "log": _colormap_hex("viridis"),
            "diff": _colormap_hex("RdBu_r"),
        },
        "ranges": {"log": list(_LOG_RANGE), "diff": list(_DIFF_RANGE)},
    }


# --------------------------------------------------------------------------------------------------------------------
# Renderer


def _json_for_script(data: Any) -> str:
    """JSON that cannot end a ``<script>`` element or start an HTML comment: ``<``, ``>``, ``&`` and U+2028/2029
    become ``\\uXXXX`` escapes (still the same JSON)."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    for char, code in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, code)
    return text


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def _asset(name: str) -> str:
    """The text of ``attnscan/views/assets/<name>``, read through :mod:`importlib.resources` (so also from a wheel)."""
    return (resources.files("attnscan.views") / "assets" / name).read_text(encoding="utf-8")


def _css_rule(selector: str, declarations: str) -> str:
    return selector + "{" + declarations + "}"


def _color_rules() -> str:
    """Verdict (``.v0``-``.v3``, ``.vx``) and model (``.m0``-``.m5``) colours, from the same constants as the
    figures, so the page and the PNGs agree."""
    rules = [_css_rule(f".v{i}", f"background:{c};fill:{c}") for i, c in enumerate(VERDICT_COLORS.values())]
    rules.append(_css_rule(".vx", f"background:{_OTHER_VERDICT_COLOR};fill:{_OTHER_VERDICT_COLOR}"))
    rules += [_css_rule(f".m{i}", f"background:{c}") for i, c in enumerate(_MODEL_COLORS)]
    return "".join(rules) + "\n"


@functools.cache
def _page_assets() -> tuple[str, str]:
    """``(style, script)``: the text of the page's ``<style>`` and ``<script>`` elements, each hashed into the
    Content-Security-Policy. They are ``assets/report.css`` (plus the colour rules) and ``assets/report.js``, each
    after a newline; no data ever enters them (the script reads the digest from the JSON element)."""
    return "\n" + _asset("report.css") + _color_rules(), "\n" + _asset("report.js")


def _verdict_class(verdict: Any) -> str:
    text = str(verdict)
    return f"v{_VERDICT_ORDER.index(text)}" if text in _VERDICT_ORDER else "vx"


def _render_observations(digest: Mapping[str, Any]) -> str:
    items = "".join(f"<li>{_esc(s)}</li>" for s in digest["observations"])
    body = f"<ul class='obs'>{items}</ul>" if items else "<p class='muted'>No observations were given.</p>"
    return f"<section id='observations'><h2>Observations</h2>{body}</section>"


def _render_table(model: Mapping[str, Any], index: int) -> str:
    table = model["table"]
    if table is None:
        return f"<p class='muted'>No layer table for {_esc(model['label'])}.</p>"
    head = "".join(
        ("<th scope='col' data-type='text' class='l'" if fmt == "verdict" else "<th scope='col' data-type='num'")
        + f" title='{_esc(tip)}'>{_esc(lab)}</th>"
        for lab, tip, fmt in zip(table["labels"], table["tips"], table["formats"], strict=True)
    )
    body = []
    for row in table["rows"]:
        cells = []
        layer = None
        for key, fmt, value in zip(table["columns"], table["formats"], row, strict=True):
            if key == "layer":
                layer = value
            if fmt == "verdict":
                order = _VERDICT_ORDER.index(value) if value in _VERDICT_ORDER else len(_VERDICT_ORDER)
                chip = f"<span class='chip {_verdict_class(value)}'></span>"
                cells.append(f"<td class='l' data-v='{order}'>{chip}{_esc(value)}</td>")
            else:
                sort = "" if value is None else repr(float(value))
                cells.append(f"<td data-v='{_esc(sort)}'>{_esc(_fmt(value, fmt))}</td>")
        attr = "" if layer is None else f" data-model='{index}' data-layer='{int(layer)}'"
        body.append(f"<tr class='pick'{attr}>{''.join(cells)}</tr>")
    alpha = table.get("alpha")
    note = f" Significance level α = {alpha:g} (Benjamini–Hochberg)." if alpha is not None else ""
    return (
        f"<h3>{_esc(model['label'])}</h3>"
        f"<p class='muted'>Click a column header to sort; click a row to show that layer's heatmaps.{_esc(note)}</p>"
        f"<div class='scroll'><table class='sortable data' data-model='{index}'>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _render_profile(digest: Mapping[str, Any]) -> str:
    """The layer profile as inline SVG: signed shift and its 95 % interval against layer, points by verdict."""
    models = [m for m in digest["models"] if m["table"] is not None]
    if not models:
        return "<p class='muted'>No layer tables, so no profile.</p>"
    w, h, left, right, top, bottom = 960.0, 360.0, 70.0, 20.0, 18.0, 52.0
    pw, ph = w - left - right, h - top - bottom
    layers = [i["layer"] for m in models for i in m["layers"]]
    values = [v for m in models for i in m["layers"] for v in (i["shift"], i["lo"], i["hi"]) if v is not None]
    lo, hi = float(min([*values, 0.0])), float(max([*values, 0.0]))
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    pad = (hi - lo) * 0.06
    lo, hi = lo - pad, hi + pad
    xmin, xmax = int(min(layers)), int(max(layers))

    def x(layer: float) -> float:
        return left + (layer - xmin + 0.5) / (xmax - xmin + 1) * pw

    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * ph

    parts = [f"<rect class='frame' x='{left}' y='{top}' width='{pw}' height='{ph}'/>"]
    ystep = _nice_step(hi - lo, 6)
    digits = 0
    while digits < 6 and abs(round(ystep, digits) - ystep) > 1e-9 * ystep:
        digits += 1
    for k in range(math.ceil(lo / ystep), math.floor(hi / ystep) + 1):
        tick = k * ystep
        yy = y(tick)
        label = "0" if k == 0 else f"{tick:+.{digits}f}".replace("-", "−")
        parts.append(f"<line class='grid' x1='{left}' x2='{left + pw}' y1='{yy:.2f}' y2='{yy:.2f}'/>")
        parts.append(f"<text class='tick' x='{left - 6}' y='{yy + 4:.2f}' text-anchor='end'>{_esc(label)}</text>")
    xstep = max(1, int(_nice_step(xmax - xmin + 1, 16)))
    for layer in range(xmin, xmax + 1):
        if (layer - xmin) % xstep == 0:
            xx = x(layer)
            parts.append(f"<line class='grid' x1='{xx:.2f}' x2='{xx:.2f}' y1='{top}' y2='{top + ph}'/>")
            parts.append(f"<text class='tick' x='{xx:.2f}' y='{top + ph + 16}' text-anchor='middle'>{layer}</text>")
    parts.append(f"<line class='zero' x1='{left}' x2='{left + pw}' y1='{y(0.0):.2f}' y2='{y(0.0):.2f}'/>")
    parts.append(f"<text class='axis' x='{left + pw / 2}' y='{h - 10}' text-anchor='middle'>Layer</text>")
    parts.append(
        f"<text class='axis' transform='translate(16 {top + ph / 2}) rotate(-90)' text-anchor='middle'>"
        "Signed shift, jailbreak − benign (nats)</text>"
    )
    for index, model in enumerate(digest["models"]):
        if model["table"] is None:
            continue
        color = _esc(model["color"])
        pts = [(i["layer"], i["shift"]) for i in model["layers"] if i["shift"] is not None]
        if len(pts) > 1:
            path = " ".join(f"{x(a):.2f},{y(b):.2f}" for a, b in pts)
            parts.append(f"<polyline class='line' stroke='{color}' points='{path}'/>")
        for info in model["layers"]:
            if info["shift"] is None:
                continue
            xx = x(info["layer"])
            if info["lo"] is not None and info["hi"] is not None:
                parts.append(
                    f"<line class='ci' stroke='{color}' x1='{xx:.2f}' x2='{xx:.2f}' "
                    f"y1='{y(info['lo']):.2f}' y2='{y(info['hi']):.2f}'/>"
                )
            tip = f"{model['label']} · {_caption(info)}"
            parts.append(
                f"<circle class='pt {_verdict_class(info['verdict'])}' cx='{xx:.2f}' cy='{y(info['shift']):.2f}' "
                f"r='5' stroke='{color}' tabindex='0' data-model='{index}' data-layer='{info['layer']}'>"
                f"<title>{_esc(tip)}</title></circle>"
            )
    seen = {i["verdict"] for m in models for i in m["layers"]}
    legend = [
        f"<span class='key'><span class='chip {_verdict_class(v)}'></span>{_esc(v)}</span>"
        for v in (*_VERDICT_ORDER, *sorted(str(s) for s in seen if s not in _VERDICT_ORDER and s is not None))
        if v in seen
    ]
    if len(models) > 1:
        legend += [
            f"<span class='key'><span class='swatch m{k % len(_MODEL_COLORS)}'></span>{_esc(m['label'])}</span>"
            for k, m in enumerate(digest["models"])
            if m["table"] is not None
        ]
    return (
        f"<svg id='profile-svg' viewBox='0 0 {w:g} {h:g}' role='img' aria-label='Layer profile'>{''.join(parts)}</svg>"
        f"<div class='legend'>{''.join(legend)}</div>"
        "<p class='muted'>Points: signed shift per layer; bars: its 95 % bootstrap interval. Click a point to show "
        "that layer's heatmaps.</p>"
    )


def _render_detection(digest: Mapping[str, Any]) -> str:
    """Cross-validated detection AUROC per layer (CP line with interval bars, probe dashed), when given."""
    models = [(k, m) for k, m in enumerate(digest["models"]) if m.get("detection")]
    if not models:
        return ""
    w, h, left, right, top, bottom = 960.0, 240.0, 70.0, 20.0, 14.0, 46.0
    pw, ph = w - left - right, h - top - bottom
    layers = [r["layer"] for _, m in models for r in m["detection"]]
    xmin, xmax = int(min(layers)), int(max(layers))

    def x(layer: float) -> float:
        return left + (layer - xmin + 0.5) / (xmax - xmin + 1) * pw

    def y(v: float) -> float:
        return top + (1.0 - v) * ph

    parts = [f"<rect class='frame' x='{left}' y='{top}' width='{pw}' height='{ph}'/>"]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        cls = "zero" if tick == 0.5 else "grid"
        parts.append(f"<line class='{cls}' x1='{left}' x2='{left + pw}' y1='{y(tick):.2f}' y2='{y(tick):.2f}'/>")
        parts.append(f"<text class='tick' x='{left - 6}' y='{y(tick) + 4:.2f}' text-anchor='end'>{tick:g}</text>")
    xstep = max(1, int(_nice_step(xmax - xmin + 1, 16)))
    for layer in range(xmin, xmax + 1, xstep):
        parts.append(f"<text class='tick' x='{x(layer):.2f}' y='{top + ph + 16}' text-anchor='middle'>{layer}</text>")
    parts.append(f"<text class='axis' x='{left + pw / 2}' y='{h - 8}' text-anchor='middle'>Layer</text>")
    parts.append(
        f"<text class='axis' transform='translate(16 {top + ph / 2}) rotate(-90)' text-anchor='middle'>"
        "Detection AUROC</text>"
    )
    for index, model in models:
        color = _esc(model["color"])
        rows = [r for r in model["detection"] if r["cp"] is not None]
        if len(rows) > 1:
            path = " ".join(f"{x(r['layer']):.2f},{y(r['cp']):.2f}" for r in rows)
            parts.append(f"<polyline class='line' stroke='{color}' points='{path}'/>")
        probe = [r for r in model["detection"] if r["probe"] is not None]
        if len(probe) > 1:
            path = " ".join(f"{x(r['layer']):.2f},{y(r['probe']):.2f}" for r in probe)
            parts.append(f"<polyline class='line' stroke='{color}' stroke-dasharray='5 4' points='{path}'/>")
        for r in rows:
            xx = x(r["layer"])
            if r["lo"] is not None and r["hi"] is not None:
                parts.append(
                    f"<line class='ci' stroke='{color}' x1='{xx:.2f}' x2='{xx:.2f}' y1='{y(r['lo']):.2f}' "
                    f"y2='{y(r['hi']):.2f}'/>"
                )
            fill = color if r["flagged"] else "#ffffff"
            probe_text = f", probe {r['probe']:.3f}" if r["probe"] is not None else ""
            tip = f"{model['label']} · layer {r['layer']}: CP AUROC {r['cp']:.3f}{probe_text}" + (
                " · flagged" if r["flagged"] else ""
            )
            parts.append(
                f"<circle class='det' cx='{xx:.2f}' cy='{y(r['cp']):.2f}' r='4' stroke='{color}' fill='{fill}' "
                f"data-model='{index}' data-layer='{r['layer']}'><title>{_esc(tip)}</title></circle>"
            )
    return (
        "<h3>Jailbreak detection per layer</h3>"
        f"<svg id='detection-svg' viewBox='0 0 {w:g} {h:g}' role='img' aria-label='Detection AUROC per layer'>"
        f"{''.join(parts)}</svg>"
        "<p class='muted'>Cross-validated AUROC of the CP detector per layer (solid, bars: 95 % bootstrap interval; "
        "filled: flagged layers) and of the hidden-state probe (dashed); 0.5 is chance. A detector can separate the "
        "sets by their wrappers alone: check it on a control set (same wrappers, benign requests).</p>"
    )


def _render_heatmaps(digest: Mapping[str, Any]) -> str:
    options = "".join(f"<option value='{k}'>{_esc(m['label'])}</option>" for k, m in enumerate(digest["models"]))
    first = digest["models"][0]["maps"]["full"]
    if first["factor"] > 1:
        decimation = (
            f"Display: {first['size']}×{first['size']} cells for T = {first['extent']}, each the mean of a "
            f"{first['factor']}×{first['factor']} block of token positions (the zoomed view is finer where it can be)."
        )
    else:
        decimation = f"Display: full resolution, T = {first['extent']}."
    note = (
        f"{decimation} Log maps on viridis −10…0 (ln mean attention), difference (jailbreak − benign) on "
        "blue–white–red −4…4; grey cells are reached by no prompt. Values are stored with 8 bits (log maps to "
        "0.04 nats; the difference on an asinh scale, 0.01 nats near 0, about 3 % at ±4). Hover a cell for "
        "positions, tokens and values."
    )
    return (
        "<div class='controls'>"
        "<label>Model <select id='hm-model'>" + options + "</select></label>"
        "<button type='button' id='hm-prev' aria-label='Previous layer'>◀</button>"
        "<label>Layer <select id='hm-layer'></select></label>"
        "<button type='button' id='hm-next' aria-label='Next layer'>▶</button>"
        "<label id='hm-zoom-box'><input type='checkbox' id='hm-zoom' checked> <span id='hm-zoom-label'></span></label>"
        "</div><div id='hm-caption' class='caption'></div>"
        "<div id='hm-panels' class='panels'></div>"
        f"<p class='muted'>{_esc(note)}</p>"
    )


def _render_prompts(digest: Mapping[str, Any]) -> str:
    if not digest["prompts"]:
        reason = (
            "No prompt texts were given to the report: the bundles record each set's source, count and sha256 "
            "(see Provenance)."
        )
        return f"<p class='muted'>{_esc(reason)}</p>"
    labels = [m["label"] for m in digest["models"]]
    out = []
    for group in digest["prompts"]:
        models = [m for m in labels if m in group["models"]]
        shown = len(group["examples"])
        title = f"{group['set']} — {shown} of {group['total']} prompts"
        if len(labels) > 1:
            title += f" ({', '.join(models)})"
        warn = ""
        if group["mismatch"]:
            warn = (
                f"<p class='warn'>These texts do not match the sha256 recorded for set '{_esc(group['set'])}' by "
                f"{_esc(', '.join(group['mismatch']))}: they may not be the prompts that were scanned.</p>"
            )
        heads = "".join(
            f"<th scope='col' data-type='num'>Tokens{_esc(' · ' + m if len(models) > 1 else '')}</th>" for m in models
        )
        rows = []
        for ex in group["examples"]:
            counts = "".join(
                f"<td data-v='{_esc(ex['tokens'].get(m, ''))}'>{_esc(ex['tokens'].get(m, '—'))}</td>" for m in models
            )
            more = ""
            if ex["chars"] > len(ex["text"]):
                more = f"<span class='muted'> … ({ex['chars'] - len(ex['text'])} more characters)</span>"
            rows.append(
                f"<tr><td data-v='{ex['index']}'>{ex['index'] + 1}</td>{counts}"
                f"<td class='prompt l'><div class='ptext'>{_esc(ex['text'])}{more}</div></td></tr>"
            )
        out.append(
            f"<details class='pset' open><summary>{_esc(title)}</summary>{warn}"
            f"<p class='muted'>sha256 {_esc(group['sha256'])}. Token counts are on the grid (after the chat "
            "template, truncated to T).</p>"
            "<div class='scroll'><table class='sortable data prompts'><thead><tr>"
            f"<th scope='col' data-type='num'>#</th>{heads}"
            "<th scope='col' data-type='text' class='l'>Prompt</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div></details>"
        )
    return "".join(out)


def _render_provenance(digest: Mapping[str, Any]) -> str:
    out = []
    for model in digest["models"]:
        rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in model["provenance"])
        sets = []
        for s in model["prompt_sets"]:
            count = "—" if s["count"] is None else str(s["count"])
            if s["of"] is not None:
                count += f" of {s['of']}"
            toks = "—"
            if s["tokens_min"] is not None:
                mean = s["tokens_mean"]
                toks = f"{s['tokens_min']}–{s['tokens_max']}" + (f" (mean {mean:.1f})" if mean is not None else "")
            sets.append(
                f"<tr><td>{_esc(s['name'])}</td><td class='l'>{_esc(s['source'] or '—')}</td><td>{_esc(count)}</td>"
                f"<td>{_esc(toks)}</td><td>{_esc('—' if s['truncated'] is None else s['truncated'])}</td>"
                f"<td class='hash'>{_esc(s['sha256'] or '—')}</td></tr>"
            )
        manifest = json.dumps(model["manifest"], indent=2, ensure_ascii=False)
        out.append(
            f"<h3>{_esc(model['label'])}</h3><dl class='prov'>{rows}</dl>"
            "<div class='scroll'><table class='data'><thead><tr><th>Set</th><th class='l'>Source</th><th>Prompts</th>"
            "<th>Tokens</th><th>Truncated</th><th class='l'>sha256 of the texts</th></tr></thead>"
            f"<tbody>{''.join(sets)}</tbody></table></div>"
            f"<details><summary>Full manifest</summary><pre class='manifest'>{_esc(manifest)}</pre></details>"
        )
    return "".join(out)


def render_html(digest: Mapping[str, Any]) -> str:
    """The report document for a digest from :func:`build_digest`."""
    title = _esc(digest["title"])
    style, script = _page_assets()
    labels = ", ".join(m["label"] for m in digest["models"])
    csp = (
        "default-src 'none'; img-src data:; base-uri 'none'; form-action 'none'; "
        f"script-src {_csp_hash(script)}; style-src {_csp_hash(style)}"
    )
    tables = "".join(_render_table(m, k) for k, m in enumerate(digest["models"]))
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_esc(csp)}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<meta name='generator' content='attnscan'>"
        "<link rel='icon' href='data:,'>"
        f"<title>{title}</title><style>{style}</style></head><body>"
        f"<header><h1>{title}</h1><p class='muted'>{_esc(labels)} · generated {_esc(digest['generated'])} by "
        f"attnscan {_esc(digest['attnscan_version'])}</p>"
        "<nav><a href='#observations'>Observations</a><a href='#profile'>Layer profile</a>"
        "<a href='#heatmaps'>Heatmaps</a><a href='#verdicts'>Verdict table</a><a href='#prompts'>Prompts</a>"
        "<a href='#provenance'>Provenance</a></nav></header><main>"
        f"{_render_observations(digest)}"
        f"<section id='profile'><h2>Layer profile</h2>{_render_profile(digest)}{_render_detection(digest)}</section>"
        f"<section id='heatmaps'><h2>Attention heatmaps</h2>{_render_heatmaps(digest)}</section>"
        f"<section id='verdicts'><h2>Verdict table</h2>{tables}</section>"
        f"<section id='prompts'><h2>Prompt browser</h2>{_render_prompts(digest)}</section>"
        f"<section id='provenance'><h2>Provenance</h2>{_render_provenance(digest)}</section>"
        "</main><div id='tip' class='tip' role='status' hidden></div>"
        f"<script type='application/json' id='attnscan-data'>{_json_for_script(digest)}</script>"
        f"<script>{script}</script></body></html>\n"
    )


def build_report(
    results: Mapping[str, ScanResult],
    tables: Mapping[str, pd.DataFrame],
    observations: Sequence[str],
    prompts: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    tokens: Mapping[str, Sequence[str]] | None = None,
    title: str = DEFAULT_TITLE,
    *,
    display_size: int = DISPLAY_SIZE,
    map_budget: int = MAP_BUDGET,
    examples: int = EXAMPLES,
    generated: str | None = None,
    detection: Mapping[str, pd.DataFrame] | None = None,
) -> str:
    """One self-contained HTML document reporting one or more scans.

    Args:
        results: model label -> scan result (e.g. from :func:`attnscan.run.load_bundles`).
        tables: model label -> :func:`attnscan.stats.layer_table` of that result (a model without one gets no
            verdict table and no profile line).
        observations: sentences from :func:`attnscan.stats.observations`, shown as a list.
        prompts: model label -> {set name -> prompt texts in scan order}, for the prompt browser (the first
            ``examples`` of each set, with their token counts from the result). Texts whose sha256 differs from the
            one the manifest recorded are flagged. :func:`prompts_from_manifest` reloads them for a bundle.
        tokens: model label -> token strings at grid positions 0, 1, ... that every prompt shares (e.g. the chat
            template prefix from :func:`prefix_tokens`), shown when hovering a heatmap.
        title: the page title.
        display_size: largest heatmap side in display cells (see the module docstring).
        map_budget: upper bound on the heatmaps' base64 bytes; the block size grows until they fit.
        examples: prompts shown per set.
        generated: timestamp shown in the header (default: now, UTC).
        detection: model label -> detection table (``detection.csv`` of ``attnscan detect train``); its
            cross-validated AUROC per layer is drawn beside the layer profile.

    Every prompt, token and manifest string is escaped; data reach the page as JSON that cannot close its script
    element, and the page's script inserts text only through ``textContent``.
    """
    digest = build_digest(
        results,
        tables,
        observations,
        prompts,
        tokens,
        title,
        display_size=display_size,
        map_budget=map_budget,
        examples=examples,
        generated=generated,
        detection=detection,
    )
    return render_html(digest)


def write_report(path: str | Path, html_text: str) -> Path:
    """Write ``html_text`` to ``path`` atomically (temporary file in the same directory, then one rename)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise AttnscanError(f"cannot write {path}: directory {path.parent} does not exist; create it first")
    if path.is_dir():
        raise AttnscanError(f"cannot write the report to {path}: it is a directory; give a file name like report.html")
    from .._io import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(html_text, encoding="utf-8", newline="\n")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Inputs the bundle does not hold: prompt texts and tokens


def prompts_from_manifest(result: ScanResult) -> dict[str, list[str]]:
    """Reload the prompt texts of a result's sets from the sources its manifest records (built-in sets and local
    files; never the network), keeping only sets whose texts still match the recorded sha256.

    Returns {set name: texts}; sets that cannot be reloaded or no longer match are left out.
    """
    from ..prompts.sets import load_prompts

    sets = result.manifest.get("prompt_sets")
    out: dict[str, list[str]] = {}
    if not isinstance(sets, Mapping):
        return out
    for name, info in sets.items():
        if not isinstance(info, Mapping):
            continue
        source = info.get("source")
        if not isinstance(source, str) or source.startswith("hf:") or not info.get("sha256"):
            continue
        limit = info.get("limit")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ps = load_prompts(
                    source, str(name), limit=int(limit) if limit is not None else None, seed=int(info.get("seed", 0))
                )
        except (AttnscanError, OSError, ValueError):
            continue
        if ps.sha256 == info["sha256"]:
            out[str(name)] = list(ps.texts)
    return out


def prefix_tokens(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    length: int = 4096,
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> list[str]:
    """The decoded tokens every prompt of ``texts`` starts with after encoding (with the same options as the scan):
    typically the chat template's prefix. Pass as ``tokens={label: prefix_tokens(...)}`` to :func:`build_report`."""
    from ..prompts.encoding import encode, shared_prefix

    if not texts:
        return []
    enc = encode(tokenizer, texts, length, chat_template=chat_template, system_prompt=system_prompt)
    return [str(tokenizer.decode([token_id])) for token_id in shared_prefix(enc.ids)]
