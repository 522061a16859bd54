"""The study's tables, computed from response records and defence arms (no model runs here).

- :func:`refusal_table`: refusal rates with Wilson 95 % intervals for the bare harmful requests, the jailbreak
  prompts (overall, per attack family, and on the requests the model refuses when asked bare), and the benign
  prompts (overall, plain and risky-looking). Attack success (ASR) is 1 - refusal on the harmful and jailbreak
  rows.
- :func:`blocked`: of the jailbreak prompts the unmodified model did *not* refuse, the share refused under a
  defence, the paper's "jailbreaks blocked".
- :func:`defence_rows`: one row per defence arm (the chosen layers, the sweep, the random controls).
- :func:`paper_table`: our numbers beside the paper's reported 78 % / 94 %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ..behaviour.arms import DefenceArm
from ..behaviour.judges import wilson_interval
from ..prompts.sets import PromptSet

__all__ = ["PAPER", "blocked", "defence_rows", "paper_table", "refusal_table"]

# Kadali & Papalexakis (2026), "Jailbreaking Leaves a Trace": bypassing the flagged layers of an abliterated
# Llama-3.1-8B blocked 78 % of jailbreaks and kept 94 % of benign behaviour.
PAPER = {"jailbreaks_blocked": 0.78, "benign_kept": 0.94}


def _rate_row(what: str, group: str, flags: Sequence[bool], attack: bool) -> dict[str, Any]:
    n, k = len(flags), int(sum(flags))
    low, high = wilson_interval(k, n) if n else (math.nan, math.nan)
    rate = k / n if n else math.nan
    return {
        "set": what,
        "group": group,
        "n": n,
        "refusals": k,
        "refusal_rate": rate,
        "refusal_low": low,
        "refusal_high": high,
        "asr": 1 - rate if attack else math.nan,
        "asr_low": 1 - high if attack else math.nan,
        "asr_high": 1 - low if attack else math.nan,
    }


def _labels(ps: PromptSet, key: str) -> list[Any]:
    return ps.group(key) or [None] * len(ps)


def refusal_table(
    harmful: PromptSet,
    harmful_refusals: Sequence[bool],
    jailbreak: PromptSet,
    jailbreak_refusals: Sequence[bool],
    benign: PromptSet,
    benign_refusals: Sequence[bool],
) -> pd.DataFrame:
    """Refusal rates per set and group (module docstring); flags are aligned with each set's prompts.

    The row ``jailbreak / requests refused bare`` holds the jailbreak prompts whose request the model refused when
    it was asked bare: their ASR is the share of refusals the wrappers undo.
    """
    rows = [
        _rate_row("harmful", "all", harmful_refusals, True),
        _rate_row("jailbreak", "all", jailbreak_refusals, True),
    ]
    refused_bare = {rid for rid, r in zip(_labels(harmful, "request_id"), harmful_refusals, strict=True) if r}
    jb_requests = _labels(jailbreak, "request_id")
    paired = [r for rid, r in zip(jb_requests, jailbreak_refusals, strict=True) if rid in refused_bare]
    rows.append(_rate_row("jailbreak", "requests refused bare", paired, True))
    families = _labels(jailbreak, "family")
    for family in sorted({f for f in families if f is not None}):
        flags = [r for f, r in zip(families, jailbreak_refusals, strict=True) if f == family]
        rows.append(_rate_row("jailbreak", f"family: {family}", flags, True))
    rows.append(_rate_row("benign", "all", benign_refusals, False))
    risky = _labels(benign, "looks_risky")
    for name, want in (("plain", False), ("looks risky", True)):
        flags = [r for x, r in zip(risky, benign_refusals, strict=True) if bool(x) == want]
        if flags:
            rows.append(_rate_row("benign", name, flags, False))
    return pd.DataFrame(rows)


def blocked(baseline: Sequence[bool], defended: Sequence[bool]) -> tuple[int, int, float, float, float]:
    """``(blocked, succeeded, rate, low, high)``: of the jailbreaks the unmodified model answered (``baseline``
    refusal flag False), how many the defended model refused, with the Wilson interval (NaN when none succeeded)."""
    pairs = [(b, d) for b, d in zip(baseline, defended, strict=True) if not b]
    n, k = len(pairs), sum(d for _, d in pairs)
    if not n:
        return 0, 0, math.nan, math.nan, math.nan
    low, high = wilson_interval(k, n)
    return k, n, k / n, low, high


def defence_rows(baseline: DefenceArm, arms: Mapping[str, DefenceArm]) -> pd.DataFrame:
    """One row per arm (``role`` = the key: ``baseline``, ``defence``, ``sweep k=…``, ``random 1`` …) with the
    metrics of :meth:`DefenceArm.metrics` against ``baseline``, the jailbreaks blocked (:func:`blocked`) and the
    perplexity ratio to the baseline."""
    base = baseline.metrics(baseline)
    rows = []
    for role, arm in {"baseline": baseline, **arms}.items():
        row = {"role": role, **arm.metrics(baseline)}
        k, n, rate, low, high = blocked(baseline.jailbreak_refusals, arm.jailbreak_refusals)
        row.update(blocked=k, succeeded=n, blocked_rate=rate, blocked_rate_low=low, blocked_rate_high=high)
        row["perplexity_ratio"] = row["perplexity"] / base["perplexity"] if base["perplexity"] else math.nan
        rows.append(row)
    return pd.DataFrame(rows).drop(columns=["variant"])


def _summary(values: pd.Series, fmt: str = ".0%") -> str:
    """One value, or the mean and range of several (the random-layer draws), formatted with ``fmt``."""
    values = values.dropna()
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return format(values.iloc[0], fmt)
    return f"{format(values.mean(), fmt)} (range {format(values.min(), fmt)} to {format(values.max(), fmt)})"


def _with_ci(row: Mapping[str, Any], key: str) -> str:
    value = row[key]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.0%} [{row[f'{key}_low']:.0%}, {row[f'{key}_high']:.0%}]"


def paper_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The paper's two headline numbers beside this study's defence and its random-layer controls.

    ``rows`` is :func:`defence_rows`' table (a ``defence`` row and any ``random …`` rows)."""
    defence = rows.loc[rows["role"] == "defence"].iloc[0]
    randoms = rows.loc[rows["role"].str.startswith("random")]
    lines = [
        {
            "metric": "jailbreaks blocked (refused under defence, of those answered without it)",
            "paper": f"{PAPER['jailbreaks_blocked']:.0%}",
            "this study": _with_ci(defence, "blocked_rate"),
            "random layers": _summary(randoms["blocked_rate"]),
        },
        {
            "metric": "benign behaviour kept (benign prompts not refused)",
            "paper": f"{PAPER['benign_kept']:.0%}",
            "this study": _with_ci(defence, "benign_retention"),
            "random layers": _summary(randoms["benign_retention"]),
        },
        {
            "metric": "jailbreak refusal rate under defence (unmodified model: "
            f"{rows.loc[rows['role'] == 'baseline', 'jailbreak_refusal_rate'].iloc[0]:.0%})",
            "paper": "",
            "this study": f"{defence['jailbreak_refusal_rate']:.0%}",
            "random layers": _summary(randoms["jailbreak_refusal_rate"]),
        },
        {
            "metric": "benign answers' similarity to the unmodified ones (chrF)",
            "paper": "",
            "this study": f"{defence['benign_chrf']:.2f}",
            "random layers": _summary(randoms["benign_chrf"], ".2f"),
        },
        {
            "metric": "perplexity on benign text, ratio to the unmodified model",
            "paper": "",
            "this study": f"{defence['perplexity_ratio']:.2f}",
            "random layers": _summary(randoms["perplexity_ratio"], ".2f"),
        },
    ]
    return pd.DataFrame(lines)
