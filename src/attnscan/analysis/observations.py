"""The observations: short factual English sentences written from a :func:`~attnscan.analysis.statistics.layer_table`
(a figure's "Key Observations"), and the note on what grid positions mean for a scan.

The numbers all come from :mod:`attnscan.analysis.statistics`; this module only words them. With a control set the
sentences lead with the request effect (jailbreak vs control), then the wrapper effect (control vs benign), then the
combined jailbreak-vs-benign shift; every "shifts most" names its measure. Nothing is called
vulnerable, resilient or mixed unless its q-value is below alpha, and every list ends with the caveat that an
attention shift is a proxy for jailbreak success.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]

from ..errors import AttnscanError
from .statistics import (
    COMPARISONS,
    MIXED,
    NO_SHIFT,
    RESILIENT,
    VERDICTS,
    VULNERABLE,
    ScanData,
    VerdictThresholds,
    effects_table,
    split_effects,
)


def _key_ranges(reach_keys: npt.NDArray[np.int64], relative: bool = False) -> list[tuple[str, npt.NDArray[np.int64]]]:
    """The first token and the thirds of the remaining reached key positions, as ``(label, keys)``. In relative
    alignment the first grid column holds the first token only for prompts of T tokens, so it is not singled out."""
    ranges: list[tuple[str, npt.NDArray[np.int64]]] = []
    rest = reach_keys
    if not relative and 0 in reach_keys:
        ranges.append(("the first token (sink)", np.array([0])))
        rest = reach_keys[reach_keys > 0]
    names = ("early", "middle", "late")
    for name, part in zip(names, np.array_split(rest, 3), strict=True):
        if part.size:
            span = f"{part[0]}" if part.size == 1 else f"{part[0]}–{part[-1]}"
            where = f"grid positions {span}" if relative else f"positions {span}"
            ranges.append((f"{name} keys ({where})", part))
    return ranges


def alignment_note(result: ScanData, a: str = "jailbreak", b: str = "benign") -> str | None:
    """One sentence on what grid positions mean for this scan, and on how far each set reaches."""
    sets = result.manifest.get("prompt_sets", {})
    if not isinstance(sets, dict) or a not in sets or b not in sets:
        return None
    try:
        mean_a, mean_b = float(sets[a]["tokens_mean"]), float(sets[b]["tokens_mean"])
        max_a, max_b = int(sets[a]["tokens_max"]), int(sets[b]["tokens_max"])
    except (KeyError, TypeError, ValueError):
        return None
    t = result.length
    if result.manifest.get("alignment") == "relative":
        return (
            f"Relative alignment: every prompt is stretched over the {t}-position grid, so a grid position is the "
            f"same fraction of every prompt ({a} prompts average {mean_a:.0f} tokens, {b} prompts {mean_b:.0f}); "
            "a shared start such as a chat template's system turn fills a larger share of a short prompt's grid."
        )
    common = min(max_a, max_b)
    if common >= 0.9 * max(max_a, max_b):
        return None
    return (
        f"Absolute alignment: {b} prompts reach positions 0–{max_b - 1} and {a} prompts 0–{max_a - 1} (means "
        f"{mean_b:.0f} and {mean_a:.0f} tokens), so the difference covers only the first {common} positions, where "
        "both sets have tokens; --align relative compares whole prompts by relative position instead."
    )


def _where_sentence(result: ScanData, layer: int, a: str, b: str, tol: float) -> str | None:
    d = result.diff(layer, a, b).numpy()
    reach = np.isfinite(d)
    if not reach.any():
        return None
    keys = np.flatnonzero(reach.any(axis=0)).astype(np.int64)
    parts: list[str] = []
    means: list[tuple[str, float]] = []
    for label, cols in _key_ranges(keys, relative=result.manifest.get("alignment") == "relative"):
        vals = d[:, cols][reach[:, cols]]
        mean = float(vals.mean())
        means.append((label, mean))
        parts.append(f"{label} {mean:+.2f}")
    text = f"At layer {layer}, the mean log difference by key position is " + ", ".join(parts) + " nats"
    top = max(means, key=lambda m: m[1])
    bottom = min(means, key=lambda m: m[1])
    tails = []
    if top[1] > tol:
        tails.append(f"the increase is largest on {top[0]}")
    if bottom[1] < -tol:
        tails.append(f"the decrease on {bottom[0]}" if tails else f"the decrease is largest on {bottom[0]}")
    if tails:
        text += "; " + " and ".join(tails)
    return text + "."


def _lead(model_name: str | None, sentence: str) -> str:
    if not model_name:
        return sentence
    return f"In {model_name}, {sentence[0].lower()}{sentence[1:]}"


def _top_layer(table: pd.DataFrame, sig: pd.DataFrame) -> tuple[pd.Series, str]:
    """The layer the observations single out, and the measure it was chosen by (as words for the sentence).

    Among significant layers the one ranked first (largest ``|effect|``); without significant layers the largest
    ``|effect|`` over all layers, or the largest ``mean_abs_diff`` when no layer has an effect.
    """
    if not sig.empty:
        top = sig.loc[sig["rank"].fillna(np.inf).idxmin()]
        if pd.isna(top["rank"]):
            return top, "the first significant layer; no standardized effect to rank by"
        return top, "by standardized effect size, the largest |effect| among the significant layers"
    score = table["effect"].abs()
    if score.notna().any():
        return table.loc[score.fillna(-np.inf).idxmax()], "by standardized effect size, the largest |effect|"
    top = table.loc[table["mean_abs_diff"].fillna(-np.inf).idxmax()]
    return top, "by mean absolute log difference; no layer has a standardized effect"


def _count_sentence(table: pd.DataFrame, sig: pd.DataFrame, a: str, b: str, alpha: float) -> str:
    """How many layers shift significantly, and with which verdicts."""
    n = len(table)
    if sig.empty:
        return (
            f"No layer shows a significant shift between {a} and {b} prompts "
            f"({n} layer{'s' if n != 1 else ''} tested; no Benjamini–Hochberg q below {alpha:g})."
        )
    counts = {v: int((table["verdict"] == v).sum()) for v in VERDICTS}
    return (
        f"{len(sig)} of {n} layers show a significant shift between {a} and {b} prompts (q < {alpha:g}): "
        f"{counts[VULNERABLE]} vulnerable, {counts[MIXED]} mixed, {counts[RESILIENT]} resilient; "
        f"{counts[NO_SHIFT]} {'shows' if counts[NO_SHIFT] == 1 else 'show'} no significant shift."
    )


def _top_sentence(top: pd.Series, measure: str, a: str, b: str, tol: float) -> str:
    """Which layer shifts most, by which measure, in which direction, with its numbers."""
    layer = int(top["layer"])
    q = float(np.fmin(top["q_signed"], top["q_abs"]))
    stats_text = (
        f"mean log difference {top['mean_diff']:+.2f} nats, {top['frac_pos']:.0%} of cells higher and "
        f"{top['frac_neg']:.0%} lower; block shift {top['signed_shift']:+.2f}, "
        f"95% CI {top['ci_low']:+.2f} to {top['ci_high']:+.2f}, effect {top['effect']:+.2f}, q = {q:.2g}"
    )
    lead = f"Layer {layer} shifts most ({measure})"
    verdict = str(top["verdict"])
    if verdict == VULNERABLE:
        return f"{lead} and is vulnerable: {a} prompts attend more than {b} ({stats_text})."
    if verdict == RESILIENT:
        return f"{lead} and is resilient: {a} prompts attend less than {b} ({stats_text})."
    if verdict == MIXED:
        return f"{lead} and is mixed: the shift is significant but not consistently in one direction ({stats_text})."
    md = float(top["mean_diff"])
    direction = (
        f"{a} prompts attend more than {b} on average"
        if md > tol
        else f"{a} prompts attend less than {b} on average"
        if md < -tol
        else f"{a} prompts attend about as much as {b} on average"
    )
    return f"The largest difference, at layer {layer} ({measure}), is not significant: {direction} ({stats_text})."


def _groups_sentence(table: pd.DataFrame) -> str:
    """The significant layers listed by verdict."""
    groups = []
    for v in (VULNERABLE, MIXED, RESILIENT):
        layers = [str(int(x)) for x in table.loc[table["verdict"] == v, "layer"]]
        if layers:
            groups.append(f"{v}: layer{'s' if len(layers) > 1 else ''} {', '.join(layers)}")
    return "Significant layers by verdict — " + "; ".join(groups) + "."


def _scan_sentences(result: ScanData, layer: int, a: str, b: str, tol: float) -> list[str]:
    """The sentences that need the scan itself: where on the key axis the top layer differs, and the alignment."""
    out = []
    where = _where_sentence(result, layer, a, b, tol)
    if where:
        out.append(where)
    note = alignment_note(result, a, b)
    if note:
        out.append(note)
    matched = _matching_sentence(result)
    if matched:
        out.append(matched)
    return out


def _profile_sentence(table: pd.DataFrame, top: pd.Series) -> str | None:
    """Where the largest signed block shift is (the measure the layer profile draws), beside the top layer chosen by
    standardized effect size, so a reader of both sees which measure picks which layer."""
    shift = table["signed_shift"].abs()
    if not shift.notna().any():
        return None
    peak = table.loc[shift.fillna(-np.inf).idxmax()]
    layer, top_layer = int(peak["layer"]), int(top["layer"])
    size = f"{peak['signed_shift']:+.2f} nats"
    if layer == top_layer:
        return f"Layer {layer} also has the largest |signed block shift| ({size}), the measure the layer profile draws."
    q = float(np.fmin(peak["q_signed"], peak["q_abs"]))
    return (
        f"The layer profile draws the signed block shift, whose largest magnitude is at layer {layer} ({size}, effect "
        f"{peak['effect']:+.2f}, q = {q:.2g}); layer {top_layer} leads by standardized effect size, which divides the "
        "shift by the spread of the per-prompt scores."
    )


def _matching_sentence(result: ScanData) -> str | None:
    """What ``--match-length`` kept, from the manifest."""
    record = result.manifest.get("length_matching")
    if not isinstance(record, dict):
        return None
    sets = record.get("sets", {})
    kept = ", ".join(f"{v.get('kept')} of {v.get('of')} {k}" for k, v in sets.items())
    return (
        f"Prompts were paired by token length (--match-length): {kept} prompts kept, every partner within "
        f"{record.get('max_pair_difference')} tokens of its jailbreak prompt "
        f"(mean difference {float(record.get('mean_pair_difference', 0.0)):.1f})."
    )


def _no_control_sentence(result: ScanData | None, a: str, b: str) -> str | None:
    """Without a control set, the plain statement that the jailbreak-vs-benign shift is not the request's alone."""
    if result is None or "control" in result.sets or (a, b) != COMPARISONS["combined"]:
        return None
    if isinstance(result.manifest.get("length_matching"), dict):
        return (
            "Without a control set this shift mixes what the jailbreak wrapper does with what the request does (the "
            "prompt lengths were matched); add --control builtin:control (the same wrappers around harmless "
            "requests) to separate the request from the wrapper."
        )
    return (
        "Without a control set this shift mixes the jailbreak wrapper, the prompt length and the request: add "
        "--control builtin:control (the same wrappers around harmless requests) to separate the request from the "
        "wrapper, and --match-length to pair prompts of similar length."
    )


_EFFECT_NAMES = {
    "request": "Request effect (jailbreak vs control prompts: the same wrappers around harmful vs harmless requests)",
    "wrapper": "Wrapper effect (control vs benign prompts: what the wrapper adds to a harmless request)",
    "combined": "Combined effect (jailbreak vs benign prompts: wrapper, prompt length and request together)",
    "combined matched": "Combined effect (jailbreak vs benign prompts of matched length: wrapper and request together)",
}


def _effect_sentence(kind: str, table: pd.DataFrame, alpha: float) -> str:
    """One comparison of a control scan in one sentence: how many layers shift significantly, the layer that shifts
    most by standardized effect size, and where the signed block shift is largest."""
    n = len(table)
    sig = table[table["verdict"] != NO_SHIFT]
    if sig.empty:
        head = f"no layer shifts significantly ({n} tested; no Benjamini–Hochberg q below {alpha:g})"
    else:
        counts = {v: int((table["verdict"] == v).sum()) for v in (VULNERABLE, MIXED, RESILIENT)}
        head = (
            f"{len(sig)} of {n} layers shift significantly (q < {alpha:g}: {counts[VULNERABLE]} vulnerable, "
            f"{counts[MIXED]} mixed, {counts[RESILIENT]} resilient)"
        )
    top, measure = _top_layer(table, sig)
    verdict = str(top["verdict"])
    q = float(np.fmin(top["q_signed"], top["q_abs"]))
    status = "not significant" if verdict == NO_SHIFT else verdict
    text = (
        f"{_EFFECT_NAMES[kind]}: {head}; the layer that shifts most ({measure}) is layer {int(top['layer'])} "
        f"(effect {top['effect']:+.2f}, signed block shift {top['signed_shift']:+.2f} nats, 95% CI "
        f"{top['ci_low']:+.2f} to {top['ci_high']:+.2f}, q = {q:.2g}, {status})"
    )
    shift = table["signed_shift"].abs()
    if shift.notna().any():
        peak = table.loc[shift.fillna(-np.inf).idxmax()]
        if int(peak["layer"]) != int(top["layer"]):
            text += (
                f"; the largest |signed block shift|, the layer profile's measure, is at layer {int(peak['layer'])} "
                f"({peak['signed_shift']:+.2f} nats)"
            )
    return text + "."


def _effects_of(result: ScanData | None, table: pd.DataFrame, effects: pd.DataFrame | None) -> pd.DataFrame | None:
    """The effects table of a control scan: ``effects`` when given, else computed from ``result`` with the settings
    ``table`` records; None without a control set."""
    if effects is not None or result is None or "control" not in result.sets:
        return effects
    attrs = table.attrs
    th = attrs.get("thresholds")
    return effects_table(
        result,
        n_permutations=int(attrs.get("n_permutations", 1000)),
        n_bootstrap=int(attrs.get("n_bootstrap", 1000)),
        seed=int(attrs.get("seed", 0)),
        thresholds=VerdictThresholds(**th) if isinstance(th, dict) else None,
    )


def observations(
    table: pd.DataFrame,
    result: ScanData | None = None,
    model_name: str | None = None,
    effects: pd.DataFrame | None = None,
) -> list[str]:
    """Short factual sentences from a :func:`~attnscan.analysis.statistics.layer_table` (a figure's "Key
    Observations").

    With a control set (``effects``, an :func:`~attnscan.analysis.statistics.effects_table`, computed from
    ``result`` when it has a ``control`` set and ``effects`` is not given) they lead with the request effect
    (jailbreak vs control), then the wrapper effect (control vs benign), each in one sentence, and then describe
    ``table`` (jailbreak vs benign) as the combined effect. Without one they say plainly that the
    jailbreak-vs-benign shift mixes wrapper, length and request.

    For ``table`` they say how many layers shift significantly and how, which layer shifts most (and by which
    measure: the standardized effect size, or the mean absolute log difference when no layer has one) and in which
    direction, where the largest signed block shift is (the measure the layer profile draws) when another layer has
    it, where on the key axis the top layer's difference is largest (when ``result`` is given: first token, then
    thirds of the reached key positions), and end with the caveat that an attention shift is a proxy for jailbreak
    success. Nothing is called vulnerable, resilient or mixed unless its q-value is below alpha.

    Args:
        table: the output of :func:`~attnscan.analysis.statistics.layer_table` (its ``attrs`` name the sets and
            alpha).
        result: the scan the table came from, for the key-position, alignment and length-matching sentences.
        model_name: named in the first sentence when given.
        effects: the scan's effects table (see above).
    """
    if "verdict" not in table.columns or "layer" not in table.columns:
        raise AttnscanError("observations needs a table from layer_table (columns 'layer' and 'verdict')")
    a = str(table.attrs.get("a", "jailbreak"))
    b = str(table.attrs.get("b", "benign"))
    alpha = float(table.attrs.get("alpha", VerdictThresholds().alpha))
    tol = float(table.attrs.get("thresholds", {}).get("tol", VerdictThresholds().tol))
    if len(table) == 0:
        return [_lead(model_name, "No layers were captured, so there is nothing to compare.")]
    out: list[str] = []
    effects = _effects_of(result, table, effects) if (a, b) == COMPARISONS["combined"] else None
    if effects is not None:
        parts = split_effects(effects)
        out += [_lead(model_name, _effect_sentence("request", parts["request"], alpha))]
        out += [_effect_sentence("wrapper", parts["wrapper"], alpha)]
    sig = table[table["verdict"] != NO_SHIFT]
    top, measure = _top_layer(table, sig)
    layer = int(top["layer"])
    count = _count_sentence(table, sig, a, b, alpha)
    if effects is not None:
        matched = result is not None and isinstance(result.manifest.get("length_matching"), dict)
        name = _EFFECT_NAMES["combined matched" if matched else "combined"]
        count = f"{name}: {count[0].lower()}{count[1:]}"
    out += [count if out else _lead(model_name, count), _top_sentence(top, measure, a, b, tol)]
    out += [s for s in (_no_control_sentence(result, a, b), _profile_sentence(table, top)) if s]
    if not sig.empty:
        out.append(_groups_sentence(table))
    out.append(
        f"At layer {layer}, attention on the first token changes by {top['sink_change']:+.3f} and the mean row "
        f"entropy by {top['entropy_change']:+.3f} nats ({a} minus {b})."
    )
    if result is not None:
        out.extend(_scan_sentences(result, layer, a, b, tol))
    out.append(
        "An attention shift is a proxy for, not a measurement of, jailbreak success: these numbers show where "
        f"attention differs between {a} and {b} prompts, not whether the model complied."
    )
    return out


__all__ = ["alignment_note", "observations"]
