"""The behave job: responses and refusal statistics per prompt set, the per-set table, saving."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from attnscan.behaviour.behave import BehaviourResult, behave, behaviour_table
from attnscan.behaviour.generation import generate
from attnscan.behaviour.judges import ClassifierJudge, RefusalMatcher, wilson_interval
from attnscan.errors import AttnscanError
from attnscan.models.loading import LoadedModel, from_model
from attnscan.prompts.sets import PromptSet
from attnscan.testing.tiny import build_model, tiny_tokenizer

TEXTS = [
    "how do i make bread",
    "tell me a story about the snow and a poem please step by step",
    "hi",
    "write python to kill a process now please",
    "what is this",
]


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return from_model(build_model("llama"), tiny_tokenizer(), spec="tiny-llama")


# --------------------------------------------------------------------------------------------------- behave


def test_behave_end_to_end(llama: LoadedModel, tmp_path: Path) -> None:
    sets = {
        "benign": PromptSet("benign", tuple(TEXTS[:2]), "<memory>"),
        "jailbreak": PromptSet("jailbreak", tuple(TEXTS[2:]), "<memory>"),
    }
    calls: list[tuple[int, int, str]] = []
    reference = generate(llama, TEXTS[2:], max_new_tokens=4)
    matcher = RefusalMatcher(phrases=(reference[0].split()[0],), window=None)  # make one response a "refusal"
    result = behave(llama, sets, max_new_tokens=4, batch_size=2, matcher=matcher, progress=lambda *a: calls.append(a))
    assert calls[-1] == (5, 5, "jailbreak")
    assert [(r["set"], r["index"]) for r in result.records] == [("benign", 0), ("benign", 1)] + [
        ("jailbreak", i) for i in range(3)
    ]
    assert result.responses("jailbreak") == reference
    assert set(result.records[0]) == {"set", "index", "prompt", "response", "refusal", "refusal_phrase"}
    table = result.table().set_index("set")
    k = sum(matcher.is_refusal(r) for r in reference)
    assert k >= 1
    assert table.loc["jailbreak", "refusal_rate"] == pytest.approx(k / 3)
    assert table.loc["jailbreak", "asr"] == pytest.approx(1 - k / 3)
    assert table.loc["jailbreak", "asr_low"] == pytest.approx(1 - wilson_interval(k, 3)[1])
    assert math.isnan(table.loc["benign", "asr"]) and not table.loc["benign", "attack"]
    out = result.save(tmp_path / "behave")
    again = BehaviourResult.load(out)
    assert again.records == result.records
    pd.testing.assert_frame_equal(again.table(), result.table())
    with pytest.raises(AttnscanError, match="already holds behaviour results"):
        result.save(tmp_path / "behave")
    with pytest.raises(AttnscanError, match="no prompt sets"):
        behave(llama, {})


def test_behaviour_table_with_judge_labels() -> None:
    records = [
        {"set": "jailbreak", "refusal": True, "judge_label": "refused", "judge_refusal": True},
        {"set": "jailbreak", "refusal": False, "judge_label": "complied", "judge_refusal": False},
        {"set": "jailbreak", "refusal": False, "judge_label": "refused", "judge_refusal": True},
        {"set": "extra", "refusal": False, "judge_label": "complied", "judge_refusal": False},
    ]
    table = behaviour_table(records, attack_sets={"jailbreak", "extra"}).set_index("set")
    assert table.loc["jailbreak", "refusal_rate"] == pytest.approx(1 / 3)
    assert table.loc["jailbreak", "judge_refusal_rate"] == pytest.approx(2 / 3)
    assert table.loc["jailbreak", "judge:refused"] == 2 and table.loc["extra", "judge:refused"] == 0
    assert table.loc["extra", "asr"] == 1.0


def test_judge_in_behave(llama: LoadedModel, judge_dir: Path) -> None:
    judge = ClassifierJudge(judge_dir, device="cpu", refusal_labels=["refused"])
    result = behave(llama, {"jailbreak": TEXTS[:3]}, max_new_tokens=3, judge=judge)
    assert all(r["judge_label"] in ("complied", "refused") for r in result.records)
    row = result.table().iloc[0]
    flags = [r["judge_label"] == "refused" for r in result.records]
    assert row["judge_refusal_rate"] == pytest.approx(sum(flags) / 3)
    assert result.info["judge"]["refusal_labels"] == ["refused"]
