"""The words for a detector's results, shared by the terminal (``attnscan detect train|eval``), the HTML report and
the observations of ``attnscan run``: whether the internals beat the text baseline and by how much, the flag rates
per family and on risky-looking benign prompts, and the rank stability of refits. Each function words numbers it
is given; none computes any."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .store import TrainedDetector

__all__ = [
    "baseline_sentence",
    "detection_note",
    "families_sentence",
    "margin_sentence",
    "stability_sentence",
]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and value == value


def margin_sentence(kind: str, margin: Any, low: Any, high: Any, where: str = "") -> str:
    """Whether the ``kind`` detector beats the text baseline (the 95 % interval of ``margin`` = detector AUROC minus
    text AUROC lies above zero), by how much, with the interval; ``where`` (e.g. ``"at layer 5 "``) is inserted."""
    name = f"the {kind.upper() if kind == 'cp' else kind} detector {where}".rstrip()
    if not _finite(margin):
        return f"{name[0].upper()}{name[1:]} has no text baseline to compare with."
    if not (_finite(low) and _finite(high)):
        return (
            f"{name[0].upper()}{name[1:]} differs from the text baseline by {margin:+.3f} AUROC "
            "(no interval without bootstrap resamples, so no verdict)."
        )
    interval = f"95% CI {low:+.3f} to {high:+.3f}"
    if low > 0:
        return f"{name[0].upper()}{name[1:]} beats the text baseline by {margin:+.3f} AUROC ({interval})."
    return (
        f"{name[0].upper()}{name[1:]} does not beat the text baseline: difference {margin:+.3f} AUROC ({interval}), "
        "so these prompts give no evidence that the model's internals tell more than a classifier of the text."
    )


def baseline_sentence(record: Mapping[str, Any], where: str = "on the same folds") -> str:
    """The baselines' AUROCs: prompt length alone and the TF-IDF text classifier with its interval."""
    text = record.get("text_auroc")
    parts = [f"prompt length alone {record['length_auroc']:.3f}"] if _finite(record.get("length_auroc")) else []
    if _finite(text):
        low, high = record.get("text_auroc_low"), record.get("text_auroc_high")
        ci = f" (95% CI {low:.3f} to {high:.3f})" if _finite(low) and _finite(high) else ""
        parts.append(f"a TF-IDF text classifier {text:.3f}{ci}")
    return f"Baseline AUROCs {where}: " + ", ".join(parts) + "." if parts else ""


def stability_sentence(record: Mapping[str, Any] | None, label: str = "Stability") -> str | None:
    """How alike refits on resampled training sets rank held-out prompts (``meta["stability"]``), or None;
    ``label`` starts the sentence."""
    if not record or not _finite(record.get("spearman_mean")):
        return None
    mean, low = record["spearman_mean"], record.get("spearman_min")
    worst = f", lowest pair {low:.2f}" if _finite(low) else ""
    verdict = "alike" if mean >= 0.9 else "fairly alike" if mean >= 0.7 else "differently"
    return (
        f"{label}: {record['resamples']} refits on resampled training {record['resampled']} rank held-out prompts "
        f"{verdict} (mean Spearman correlation {mean:.2f}{worst})."
    )


def _rate(row: Mapping[str, Any]) -> str:
    low, high = row.get("rate_low"), row.get("rate_high")
    ci = f" [{low:.2f}-{high:.2f}]" if _finite(low) and _finite(high) else ""
    return f"{row['rate']:.2f}{ci} ({row['flagged']}/{row['n']})"


def families_sentence(rows: Sequence[Mapping[str, Any]], threshold: Any = None) -> str | None:
    """The spread of the TPR across attack families and the FPR on risky-looking benign prompts against the rest,
    from :func:`attnscan.detect.rates.subset_rates` rows; None when the rows split nothing."""
    families = [r for r in rows if r["role"] == "jailbreak" and r["subset"] != "all" and r["n"]]
    risky = {r["subset"]: r for r in rows if r["role"] == "benign" and r["subset"] in ("looks_risky", "other")}
    parts = []
    if len(families) > 1:
        lo = min(families, key=lambda r: (r["rate"], r["subset"]))
        hi = max(families, key=lambda r: (r["rate"], r["subset"]))
        parts.append(
            f"the TPR ranges over {len(families)} jailbreak wrappers from {_rate(lo)} for {lo['subset']} to "
            f"{_rate(hi)} for {hi['subset']}"
        )
    if len(risky) == 2 and risky["looks_risky"]["n"]:
        parts.append(
            f"benign prompts that look risky are flagged at FPR {_rate(risky['looks_risky'])}, the other benign "
            f"prompts at {_rate(risky['other'])}"
        )
    if not parts:
        return None
    at = f" (threshold {threshold:.3g})" if _finite(threshold) else ""
    text = "; ".join(parts)
    return f"At the operating point{at}, {text} (95% Wilson intervals)."


def detection_note(trained: TrainedDetector, with_control: bool) -> str:
    """What a run's detectors found, in the terms a reviewer needs: against what, on which folds, whether they
    beat reading the prompt text (by how much, with the interval), how the flags fall per family and on risky
    benign prompts, and how stable the detector is."""
    table, best = trained.table, trained.best_layer
    row = table.loc[table["layer"] == best].iloc[0]
    negatives = (
        "benign prompts and control prompts (the same jailbreak wrappers around harmless requests)"
        if with_control
        else "benign prompts"
    )
    folds = "holding out whole template families" if trained.cv == "grouped" else "stratified folds"
    primary = trained.primary
    other = "cp" if primary == "probe" else "probe"
    names = {"cp": "CP detector", "probe": "pooled-state probe"}
    note = (
        f"Detection from hidden states, jailbreak vs {negatives}: the {names[primary]} (the primary detector) is "
        f"best at layer {best} (cross-validated AUROC {row[f'{primary}_auroc']:.3f}, 95% CI "
        f"{row[f'{primary}_auroc_low']:.3f} to {row[f'{primary}_auroc_high']:.3f}, {folds}; the "
        f"{names[other]} {row[f'{other}_auroc']:.3f} there); {len(trained.flagged_layers)} of {len(table)} layers "
        "reach the flagging threshold."
    )
    if f"{primary}_auroc_stratified" in row:
        note += f" Stratified folds (every wrapper seen in training) give {row[f'{primary}_auroc_stratified']:.3f}."
    if "text_auroc" in row:
        note += " " + baseline_sentence(row.to_dict())
        margin = (row["text_margin"], row["text_margin_low"], row["text_margin_high"])
        note += " " + margin_sentence(trained.primary, *margin, where=f"at layer {best}")
    families = trained.meta.get("families")
    if isinstance(families, dict):
        sentence = families_sentence(families.get("rows", []), families.get("threshold"))
        note += f" {sentence}" if sentence else ""
    stability = stability_sentence(trained.meta.get("stability"))
    note += f" {stability}" if stability else ""
    if not with_control:
        note += (
            " Without a control set the detector can separate the sets by their wrappers alone: give one (same "
            "wrappers, harmless requests) to make it look for the request."
        )
    return note
