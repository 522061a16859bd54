"""The study's prompt sets and tables, checked against hand-computed examples."""

from __future__ import annotations

import math
from collections import Counter

import pandas as pd
import pytest

from attnscan.behaviour.arms import DefenceArm
from attnscan.errors import AttnscanError
from attnscan.prompts.sets import PromptSet
from attnscan.study.plan import StudyOptions, study_sets
from attnscan.study.tables import blocked, defence_rows, paper_table, refusal_table


def test_study_sets_wrap_each_request_in_distinct_templates_evenly() -> None:
    sets = study_sets(StudyOptions(requests=12, wraps=3, benign=10, seed=4))
    assert len(sets.harmful) == 12 and len(sets.jailbreak) == 36 and len(sets.benign) == 10
    harmful_ids = sets.harmful.group("request_id")
    jb_requests, jb_templates = sets.jailbreak.group("request_id"), sets.jailbreak.group("template_id")
    assert jb_requests is not None and jb_templates is not None and harmful_ids is not None
    assert Counter(jb_requests) == dict.fromkeys(harmful_ids, 3)  # the same requests, three wrappers each
    per_request: dict[str, set[str]] = {}
    for rid, tid in zip(jb_requests, jb_templates, strict=True):
        per_request.setdefault(rid, set()).add(tid)
    assert all(len(t) == 3 for t in per_request.values())
    uses = Counter(jb_templates)
    assert max(uses.values()) - min(uses.values()) <= 1  # 36 prompts over 18 templates: two each
    for text, request, (start, end) in zip(
        sets.jailbreak.texts, jb_requests, (sets.jailbreak.request_span(i) for i in range(36)), strict=True
    ):
        assert text[start:end] == sets.harmful.texts[harmful_ids.index(request)]
    assert sum(bool(x) for x in sets.benign.group("looks_risky") or []) == 5
    again = study_sets(StudyOptions(requests=12, wraps=3, benign=10, seed=4))
    other = study_sets(StudyOptions(requests=12, wraps=3, benign=10, seed=5))
    assert again.jailbreak.texts == sets.jailbreak.texts and other.jailbreak.texts != sets.jailbreak.texts


@pytest.mark.parametrize(
    ("keywords", "words"),
    [
        ({"requests": 1}, "--requests must be at least 2"),
        ({"sweep": (1, 1)}, "--sweep takes distinct"),
        ({"sweep": (0, 2)}, "--sweep takes distinct"),
        ({"requests": 500}, "more than the 71 built-in requests"),
        ({"wraps": 40}, "more than the 18 built-in templates"),
    ],
)
def test_bad_plans_are_user_errors(keywords: dict[str, object], words: str) -> None:
    with pytest.raises(AttnscanError, match=words):
        study_sets(StudyOptions(**keywords))  # type: ignore[arg-type]


def _set(name: str, groups: list[dict[str, object]]) -> PromptSet:
    return PromptSet(name, tuple(f"{name} {i}" for i in range(len(groups))), "<memory>", groups=tuple(groups))


def test_refusal_table_by_hand() -> None:
    harmful = _set("harmful", [{"request_id": r} for r in ("a", "b", "c")])
    jailbreak = _set(
        "jailbreak",
        [
            {"request_id": "a", "family": "dan"},
            {"request_id": "a", "family": "fiction"},
            {"request_id": "b", "family": "dan"},
            {"request_id": "c", "family": "fiction"},
        ],
    )
    benign = _set("benign", [{"looks_risky": x} for x in (False, False, True, True)])
    table = refusal_table(
        harmful, [True, True, False], jailbreak, [False, True, False, True], benign, [False, False, True, False]
    )
    rows = {(r.set, r.group): r for r in table.itertuples()}
    assert rows[("harmful", "all")].refusals == 2 and rows[("harmful", "all")].asr == pytest.approx(1 / 3)
    assert rows[("jailbreak", "all")].refusal_rate == 0.5
    # requests a and b were refused bare; their three wrapped prompts were refused once
    paired = rows[("jailbreak", "requests refused bare")]
    assert (paired.n, paired.refusals) == (3, 1)
    assert (rows[("jailbreak", "family: dan")].n, rows[("jailbreak", "family: dan")].refusals) == (2, 0)
    assert rows[("jailbreak", "family: fiction")].refusal_rate == 1.0
    assert rows[("benign", "looks risky")].refusal_rate == 0.5 and rows[("benign", "plain")].refusals == 0
    assert math.isnan(rows[("benign", "all")].asr)
    low, high = rows[("jailbreak", "all")].refusal_low, rows[("jailbreak", "all")].refusal_high
    assert low == pytest.approx(0.15003898915214947) and high == pytest.approx(0.8499610108478506)  # Wilson, n=4, k=2


def test_blocked_counts_only_jailbreaks_that_succeeded_without_defence() -> None:
    assert blocked([True, False, False, False], [True, True, False, True])[:3] == (2, 3, pytest.approx(2 / 3))
    k, n, rate, low, _high = blocked([True, True], [False, False])
    assert (k, n) == (0, 0) and math.isnan(rate) and math.isnan(low)


def _arm(name: str, layers: tuple[int, ...], jb: list[bool], bn: list[bool], ppl: float) -> DefenceArm:
    return DefenceArm(name, layers, ["x"] * len(jb), jb, ["same answer"] * len(bn), bn, ppl)


def test_defence_rows_and_the_paper_table() -> None:
    base = _arm("baseline", (), [True, False, False, False], [False, False], 10.0)
    arms = {
        "defence": _arm("bypass", (3, 5), [True, True, True, False], [False, True], 12.0),
        "random 1": _arm("bypass", (1, 7), [True, False, False, False], [False, False], 30.0),
        "random 2": _arm("bypass", (0, 2), [False, False, True, False], [True, True], 50.0),
    }
    rows = defence_rows(base, arms)
    assert list(rows["role"]) == ["baseline", "defence", "random 1", "random 2"]
    d = rows.set_index("role")
    assert d.loc["defence", "blocked_rate"] == pytest.approx(2 / 3) and d.loc["defence", "succeeded"] == 3
    assert d.loc["random 2", "blocked"] == 1 and d.loc["defence", "perplexity_ratio"] == pytest.approx(1.2)
    paper = paper_table(rows)
    assert list(paper["paper"][:2]) == ["78%", "94%"]
    assert paper.loc[0, "this study"].startswith("67% [")
    assert paper.loc[1, "this study"].startswith("50% [")
    assert paper.loc[0, "random layers"] == "17% (range 0% to 33%)"
    assert paper.loc[1, "random layers"] == "50% (range 0% to 100%)"
    assert isinstance(paper, pd.DataFrame)
