"""The report's digest: everything the HTML report shows, computed from results and tables as plain JSON-able data.

:func:`build_digest` gathers per model the provenance (curated rows and the full manifest), the prompt sets, the
verdict table, per-layer captions, the detection AUROC and the quantised heatmaps (:mod:`attnscan.views.maps`), and
across models the prompt browser entries, the default view and the colours and ranges of the page
(:mod:`attnscan.views.palette`). :func:`attnscan.views.page.render_html` turns it into the document.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._io import now_utc
from .._types import int_ranges
from ..errors import AttnscanError
from .formatting import caption, finite
from .maps import choose_factor, colormap_hex, maps_digest
from .palette import DIFF_CMAP, DIFF_RANGE, LOG_CMAP, LOG_RANGE, NAN_COLOR, VERDICT_COLORS, model_style

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped]

    from ..analysis.result import ScanResult

__all__ = ["DEFAULT_TITLE", "DISPLAY_SIZE", "EXAMPLES", "MAP_BUDGET", "MAX_PROMPT_CHARS", "build_digest"]

DEFAULT_TITLE = "attnscan report"
#: Largest side of a displayed heatmap, in cells.
DISPLAY_SIZE = 224
#: Upper bound on the base64 bytes of all heatmaps in one report; the block size grows until they fit.
MAP_BUDGET = 12_000_000
#: Example prompts shown per set in the prompt browser.
EXAMPLES = 10
#: Longest prompt text shown in the browser, in characters.
MAX_PROMPT_CHARS = 4000

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


def _plain(value: Any) -> Any:
    """A JSON-able copy of a manifest value (NaN -> None, unknown objects -> str)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return finite(value)
    return str(value)


def _texts_sha256(texts: Sequence[str]) -> str:
    """The sha256 :class:`~attnscan.prompts.sets.PromptSet` records for its texts."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


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
    add("Captured layers", f"{int_ranges(result.layers)} ({len(result.layers)})")
    fallback = manifest.get("eager_fallback")
    if isinstance(fallback, Mapping) and fallback:  # layers the chunked capture could not reproduce exactly
        by_reason: dict[str, list[int]] = {}
        for layer, reason in fallback.items():
            if str(layer).isdigit():
                by_reason.setdefault(str(reason), []).append(int(layer))
        add("Eager attention", "; ".join(f"layers {int_ranges(ls)}: {why}" for why, ls in by_reason.items()))
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
            row.append(str(value) if kind == "verdict" else finite(value))
        rows.append(row)
    return {
        "columns": [c[0] for c in cols],
        "labels": [c[1] for c in cols],
        "tips": [c[2] for c in cols],
        "formats": [c[3] for c in cols],
        "rows": rows,
        "alpha": finite(table.attrs.get("alpha")),
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
        qs = [q for q in (finite(rec.get("q_signed")), finite(rec.get("q_abs"))) if q is not None]
        out.append(
            {
                "layer": int(layer),
                "verdict": str(rec["verdict"]) if "verdict" in rec else None,
                "shift": finite(rec.get("signed_shift")),
                "lo": finite(rec.get("ci_low")),
                "hi": finite(rec.get("ci_high")),
                "q": min(qs) if qs else None,
                "effect": finite(rec.get("effect")),
            }
        )
    return out


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
    :func:`attnscan.views.grid.pick_rows` ranks them)."""
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
                "cp": finite(r["cp_auroc"]),
                "lo": finite(r.get("cp_auroc_low")),
                "hi": finite(r.get("cp_auroc_high")),
                "probe": finite(r.get("probe_auroc")),
                "flagged": bool(r.get("flagged", False)),
                "margin": finite(r.get("text_margin")),
                "margin_lo": finite(r.get("text_margin_low")),
                "margin_hi": finite(r.get("text_margin_high")),
            }
        )
    return rows


def _detection_baseline(table: pd.DataFrame | None) -> dict[str, Any] | None:
    """The text and length baselines of a detection table (``detection.csv`` with baseline columns) and the words
    on them at the best layer, or None without baselines.

    The margin columns belong to the detector the table was trained to flag with; it is recognised as the kind
    whose AUROC minus ``text_auroc`` gives ``text_margin``. The best layer is that kind's highest AUROC, as training
    picks it (:func:`attnscan.detect.metrics.best_layer`)."""
    from ..detect.metrics import best_layer
    from ..detect.summary import baseline_sentence, margin_sentence

    if table is None or "text_auroc" not in table.columns or not table["text_auroc"].notna().any():
        return None
    kind = "cp"
    if "probe_auroc" in table.columns and "text_margin" in table.columns:
        gap = (table["probe_auroc"] - table["text_auroc"] - table["text_margin"]).abs().max()
        kind = "probe" if gap < 1e-6 else "cp"
    best = best_layer(table, by=f"{kind}_auroc")
    row = table.loc[table["layer"] == best].iloc[0].to_dict()
    margin = (row.get("text_margin"), row.get("text_margin_low"), row.get("text_margin_high"))
    words = baseline_sentence(row) + " " + margin_sentence(kind, *margin, where=f"at layer {best}")
    return {
        "text": finite(row.get("text_auroc")),
        "text_lo": finite(row.get("text_auroc_low")),
        "text_hi": finite(row.get("text_auroc_high")),
        "length": finite(row.get("length_auroc")),
        "layer": best,
        "kind": kind,
        "margin": finite(margin[0]),
        "margin_lo": finite(margin[1]),
        "margin_hi": finite(margin[2]),
        "words": words.strip(),
    }


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
    """Everything the report shows, as plain JSON-able data (see :func:`attnscan.views.report.build_report` for the
    arguments)."""
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
    factor = choose_factor(results, display_size, map_budget)
    models = []
    for k, (label, result) in enumerate(results.items()):
        table = tables.get(label)
        layers = _layer_info(result, table)
        arch = result.manifest.get("architecture", {})
        n_layers = arch.get("n_layers") if isinstance(arch, Mapping) else None
        models.append(
            {
                "label": label,
                "color": model_style(k).color,
                "n_layers": int(n_layers) if isinstance(n_layers, int) else None,
                "provenance": _provenance(result.manifest, result),
                "prompt_sets": _prompt_sets(result.manifest, result),
                "manifest": _plain(result.manifest),
                "table": _table_digest(table),
                "layers": layers,
                "captions": [caption(i) for i in layers],
                "detection": _detection_digest(detection.get(label) if detection else None),
                "detection_baseline": _detection_baseline(detection.get(label) if detection else None),
                "maps": maps_digest(result, factor, display_size),
                "tokens": _tokens_of(label, result, tokens),
            }
        )
    return {
        "format": "attnscan-report",
        "version": 1,
        "title": str(title),
        "generated": generated or now_utc(),
        "attnscan_version": __version__,
        "observations": [str(s) for s in observations],
        "models": models,
        "prompts": _prompt_groups(results, prompts or {}, examples),
        "prompts_given": bool(prompts),
        "view": _default_view(models),
        "colors": {
            "nan": NAN_COLOR,
            "verdicts": dict(VERDICT_COLORS),
            "log": colormap_hex(LOG_CMAP),
            "diff": colormap_hex(DIFF_CMAP),
        },
        "ranges": {"log": list(LOG_RANGE), "diff": list(DIFF_RANGE)},
    }
