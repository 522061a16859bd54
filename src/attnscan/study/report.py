"""The study's report section (``study.md``) and its terminal table, written from the study's tables.

Every number in the text is read from the tables passed in; the wording says what each number is measured on
and how sure it is (Wilson 95 % intervals), and puts the paper's reported numbers beside ours.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

__all__ = ["markdown_table", "study_markdown"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A GitHub-style table of ``frame`` (the ``columns`` present, default all)."""
    cols = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(row[c]) for c in cols) + " |" for _, row in frame.iterrows()]
    return "\n".join(lines)


def _pct(row: Mapping[str, Any], key: str) -> str:
    """``row[key]`` as a percentage with its interval: ``refusal_rate`` reads ``refusal_low``/``refusal_high``,
    any other key ``<key>_low``/``<key>_high``."""
    value = row[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    stem = key.removesuffix("_rate")
    return f"{value:.0%} [{row[stem + '_low']:.0%}, {row[stem + '_high']:.0%}]"


def _rate(refusal: pd.DataFrame, what: str, group: str) -> Mapping[str, Any] | None:
    hit = refusal.loc[(refusal["set"] == what) & (refusal["group"] == group)]
    return None if hit.empty else hit.iloc[0].to_dict()


def _behaviour_text(refusal: pd.DataFrame) -> list[str]:
    lines = []
    bare, wrapped = _rate(refusal, "harmful", "all"), _rate(refusal, "jailbreak", "all")
    paired = _rate(refusal, "jailbreak", "requests refused bare")
    benign, risky = _rate(refusal, "benign", "all"), _rate(refusal, "benign", "looks risky")
    if bare and wrapped:
        lines.append(
            f"- Bare harmful requests: refused {bare['refusals']} of {bare['n']} "
            f"({_pct(bare, 'refusal_rate')}). Inside jailbreak wrappers: refused {wrapped['refusals']} of "
            f"{wrapped['n']} ({_pct(wrapped, 'refusal_rate')}), so attack success is {_pct(wrapped, 'asr')}."
        )
    if paired and paired["n"]:
        lines.append(
            f"- On the requests the model refuses when asked bare, the wrappers still get an answer to "
            f"{paired['n'] - paired['refusals']} of {paired['n']} prompts (ASR {_pct(paired, 'asr')})."
        )
    if benign:
        text = f"- Over-refusal: {benign['refusals']} of {benign['n']} benign requests refused"
        if risky:
            text += f", {risky['refusals']} of {risky['n']} of the risky-looking ones"
        lines.append(text + ".")
    return lines


def study_markdown(
    label: str,
    manifest: Mapping[str, Any],
    refusal: pd.DataFrame,
    defence: pd.DataFrame,
    paper: pd.DataFrame,
    judge: pd.DataFrame,
    observations: Sequence[str],
) -> str:
    """The report section of a study (module docstring)."""
    chosen = manifest["defence"]
    seconds = manifest.get("seconds", {})
    parts = [
        f"# Study: {label}",
        "",
        f"attnscan {manifest.get('attnscan_version', '')}; model `{manifest['model'].get('spec')}`; "
        f"compared in the figure with {', '.join(manifest.get('compare') or ['no other model'])}. "
        f"Wall time: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}.",
        "",
        "## Refusal and attack success (unmodified model, phrase judge)",
        "",
        *_behaviour_text(refusal),
        "",
        markdown_table(
            refusal, ["set", "group", "n", "refusals", "refusal_rate", "refusal_low", "refusal_high", "asr"]
        ),
        "",
        "## Attention scan and detectors",
        "",
        "Figure: `scan/figure.png` (one row per model), layer profile with detection AUROC: `scan/layers.png`, "
        "interactive report: `scan/report.html`.",
        "",
        *[f"- {line}" for line in observations],
        "",
        "## Layer-bypass defence",
        "",
        f"Bypassed layers: {', '.join(map(str, chosen['layers']))}, {chosen['why']}. Random controls bypass as many "
        f"layers drawn at random from the others: "
        f"{'; '.join(','.join(map(str, d)) for d in manifest.get('random_layers', [])) or 'none'}.",
        "",
        markdown_table(paper),
        "",
        markdown_table(
            defence,
            [
                "role",
                "layers",
                "jailbreak_refusal_rate",
                "blocked",
                "succeeded",
                "blocked_rate",
                "benign_retention",
                "benign_chrf",
                "perplexity",
                "perplexity_ratio",
            ],
        ),
        "",
        "Trade-off figure: `tradeoff.png`. Jailbreaks blocked: of the jailbreak prompts the unmodified model "
        "answered, the share refused under the bypass. Benign kept: benign prompts not refused; an empty or "
        "garbled answer also counts as kept, so read it with the chrF similarity and the perplexity.",
    ]
    parts += [
        "",
        "## How good is the refusal judge",
        "",
        "The phrase judge against attnscan's hand-labelled responses (refusal is the positive class; partial "
        "compliance, compliance and confused answers are not refusals; how each label was called: "
        "`judge_labels.csv`):",
        "",
        markdown_table(
            judge,
            [
                "scope",
                "n",
                "tp",
                "fp",
                "fn",
                "tn",
                "precision",
                "precision_low",
                "precision_high",
                "recall",
                "recall_low",
                "recall_high",
            ],
        ),
    ]
    parts += [
        "",
        "## What this can and cannot say",
        "",
        "A 0.5B model is far smaller than the 8B models of the paper, its safety tuning is different, and the "
        "prompt sets here are small and built-in: the intervals above are wide, and a result on this model is a "
        "check of the method, not a prediction for larger models. Compare the chosen layers with the random "
        "controls before reading anything into the bypass.",
        "",
    ]
    return "\n".join(parts)
