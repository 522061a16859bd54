"""Behaviour measurement: what the model actually answers, and how often it refuses.

Attention maps and detectors describe representations; this module measures behaviour.
:func:`behave` generates a response to every prompt of named prompt sets
(:func:`attnscan.behaviour.generation.generate`), checks each for a refusal
(:class:`attnscan.behaviour.judges.RefusalMatcher`, optionally a
:class:`attnscan.behaviour.judges.ClassifierJudge`) and reports the refusal rate per prompt set and the attack
success rate on attack sets (ASR = 1 − refusal rate), each with a Wilson 95 % interval
(:func:`attnscan.behaviour.judges.wilson_interval`), plus every response, in a :class:`BehaviourResult`.

A response record (one JSON object per line in ``responses.jsonl``) is
``{"set", "index", "prompt", "response", "refusal", "refusal_phrase", "judge_label"?}``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .._io import atomic_dir, write_json
from .._types import ProgressFn
from ..errors import AttnscanError
from ..models.loading import LoadedModel
from ..prompts.sets import PromptSet
from .generation import DEFAULT_MAX_PROMPT_TOKENS, GenerationOptions, generate_with
from .judges import DEFAULT_MATCHER, ClassifierJudge, RefusalMatcher, judge_responses, judged_rate, wilson_interval
from .runs import RESPONSES_FILE, Tracker, load_jsonl, run_info, save_jsonl

__all__ = ["BehaviourResult", "behave", "behaviour_table"]

SUMMARY_FILE = "behaviour.csv"
META_FILE = "behaviour.json"
FORMAT = "attnscan.behaviour"


def _is_attack(name: str, attack_sets: Collection[str] | None) -> bool:
    if attack_sets is not None:
        return name in attack_sets
    return name.startswith("jailbreak") or name == "harmful"


def behaviour_table(records: Sequence[Mapping[str, Any]], attack_sets: Collection[str] | None = None) -> pd.DataFrame:
    """One row per prompt set from response records.

    Columns: ``set``, ``n``, ``refusals``, ``refusal_rate``, ``refusal_low``, ``refusal_high``, ``attack``
    (whether the set counts as an attack set: by default names starting with ``jailbreak`` and ``harmful``),
    ``asr``, ``asr_low``, ``asr_high`` (1 − refusal rate and its interval; NaN for other sets), and when the
    records carry judge labels, ``judge_refusals``, ``judge_refusal_rate``, ``judge_refusal_low``,
    ``judge_refusal_high`` (NaN when the judge has no refusal labels) and ``judge:<label>`` counts.
    """
    names: list[str] = []
    for rec in records:
        if rec["set"] not in names:
            names.append(str(rec["set"]))
    rows = []
    for name in names:
        recs = [r for r in records if r["set"] == name]
        n, k = len(recs), sum(bool(r["refusal"]) for r in recs)
        low, high = wilson_interval(k, n)
        attack = _is_attack(name, attack_sets)
        row: dict[str, Any] = {
            "set": name,
            "n": n,
            "refusals": k,
            "refusal_rate": k / n,
            "refusal_low": low,
            "refusal_high": high,
            "attack": attack,
            "asr": 1 - k / n if attack else math.nan,
            "asr_low": 1 - high if attack else math.nan,
            "asr_high": 1 - low if attack else math.nan,
        }
        if any("judge_label" in r for r in recs):
            jk, jrate, jlow, jhigh = judged_rate([r.get("judge_refusal") for r in recs])
            row.update(judge_refusals=jk, judge_refusal_rate=jrate, judge_refusal_low=jlow, judge_refusal_high=jhigh)
            for r in recs:
                key = f"judge:{r.get('judge_label')}"
                row[key] = row.get(key, 0) + 1
        rows.append(row)
    table = pd.DataFrame(rows)
    judge_cols = [c for c in table.columns if str(c).startswith("judge:")]
    if judge_cols:
        table[judge_cols] = table[judge_cols].fillna(0).astype(int)
    return table


# --------------------------------------------------------------------------------------------------- results


@dataclass
class BehaviourResult:
    """Responses and refusal statistics of one model on named prompt sets (see :func:`behave`)."""

    records: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """The per-set table of :func:`behaviour_table`."""
        return behaviour_table(self.records, self.info.get("attack_sets"))

    def responses(self, set_name: str) -> list[str]:
        """The responses of one set, in prompt order."""
        recs = sorted((r for r in self.records if r["set"] == set_name), key=lambda r: int(r["index"]))
        if not recs:
            raise AttnscanError(f"no responses for set '{set_name}': sets are {self.sets}")
        return [str(r["response"]) for r in recs]

    @property
    def sets(self) -> list[str]:
        return list(dict.fromkeys(str(r["set"]) for r in self.records))

    def refusal_rate(self, set_name: str) -> float:
        recs = [r for r in self.records if r["set"] == set_name]
        if not recs:
            raise AttnscanError(f"no responses for set '{set_name}': sets are {self.sets}")
        return sum(bool(r["refusal"]) for r in recs) / len(recs)

    def save(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``responses.jsonl``, ``behaviour.csv`` (the table) and ``behaviour.json`` (info) atomically."""
        final = Path(out)
        with atomic_dir(final, overwrite, marker=META_FILE, what="behaviour results") as tmp:
            save_jsonl(tmp / RESPONSES_FILE, self.records)
            self.table().to_csv(tmp / SUMMARY_FILE, index=False)
            write_json(tmp / META_FILE, {"format": FORMAT, **self.info})
        return final

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BehaviourResult:
        root = Path(path)
        if not (root / META_FILE).is_file():
            raise AttnscanError(f"{root} holds no behaviour results: expected {META_FILE}")
        info = json.loads((root / META_FILE).read_text(encoding="utf-8"))
        info.pop("format", None)
        return cls(records=load_jsonl(root / RESPONSES_FILE), info=info)


def behave(
    loaded: LoadedModel,
    sets: Mapping[str, PromptSet | Sequence[str]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    matcher: RefusalMatcher | None = None,
    judge: ClassifierJudge | None = None,
    attack_sets: Collection[str] | None = None,
    progress: ProgressFn | None = None,
) -> BehaviourResult:
    """Generate a response to every prompt of every set and measure refusals: the library twin of ``attnscan behave``.

    ``sets`` maps a set name (e.g. ``benign``, ``jailbreak``) to its prompts. Each response is checked with
    ``matcher`` (default :class:`attnscan.behaviour.judges.RefusalMatcher`) and, when given, labelled by ``judge``.
    ``attack_sets`` names the sets whose ASR is reported (default: names starting with ``jailbreak``, and
    ``harmful``). Generation options are those of :func:`attnscan.behaviour.generation.generate`.
    """
    if not sets:
        raise AttnscanError("no prompt sets: give at least one, e.g. {'jailbreak': load_prompts(...)}")
    options = GenerationOptions(max_new_tokens, batch_size, chat_template, system_prompt, max_prompt_tokens)
    matcher = matcher or DEFAULT_MATCHER
    prompt_sets = {
        name: ps if isinstance(ps, PromptSet) else PromptSet(name, tuple(ps), "<memory>") for name, ps in sets.items()
    }
    tracker = Tracker(progress, sum(len(ps) for ps in prompt_sets.values()))
    records: list[dict[str, Any]] = []
    for name, ps in prompt_sets.items():
        responses = generate_with(loaded, ps.texts, options, tracker.stage(name), name)
        records += _set_records(name, ps, responses, matcher, judge)
    settings = {"attack_sets": sorted(attack_sets) if attack_sets is not None else None}
    info = run_info(loaded, prompt_sets, options, matcher, judge, settings=settings)
    return BehaviourResult(records=records, info=info)


def _set_records(
    name: str, ps: PromptSet, responses: list[str], matcher: RefusalMatcher, judge: ClassifierJudge | None
) -> list[dict[str, Any]]:
    """The response records of one prompt set: the matcher's refusal call and, with a judge, its label."""
    labels, flags = judge_responses(judge, responses, ps.texts) if judge is not None else (None, None)
    records: list[dict[str, Any]] = []
    for i, (prompt, response) in enumerate(zip(ps.texts, responses, strict=True)):
        phrase = matcher.match(response)
        rec: dict[str, Any] = {
            "set": name,
            "index": i,
            "prompt": prompt,
            "response": response,
            "refusal": phrase is not None,
            "refusal_phrase": phrase,
        }
        if labels is not None and flags is not None:
            rec["judge_label"] = labels[i]
            rec["judge_refusal"] = flags[i]
        records.append(rec)
    return records
