"""What behave and defend share: JSONL response records, the run description, one progress stream."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from attnscan.behaviour.behave import behave
from attnscan.behaviour.defend import defend
from attnscan.behaviour.generation import GenerationOptions
from attnscan.behaviour.judges import DEFAULT_MATCHER, DEFAULT_WINDOW, ClassifierJudge, RefusalMatcher
from attnscan.behaviour.runs import Tracker, load_jsonl, run_info, save_jsonl
from attnscan.errors import AttnscanError
from attnscan.models.loading import from_model
from attnscan.prompts.sets import PromptSet
from attnscan.testing.tiny import build_model, tiny_tokenizer

# --------------------------------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = [
        {"set": "jailbreak", "index": 0, "prompt": "ünïcødé\nline", "response": "I won't.", "refusal": True},
        {"set": "benign", "index": 1, "prompt": "x", "response": "", "refusal": False, "judge_label": None},
    ]
    path = save_jsonl(tmp_path / "out" / "r.jsonl", records)
    assert load_jsonl(path) == records
    assert [p.name for p in path.parent.iterdir()] == ["r.jsonl"]  # no temporary file left behind
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2
    save_jsonl(path, records[:1])
    assert load_jsonl(path) == records[:1]
    path.write_text(json.dumps(records[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(AttnscanError, match=r"r.jsonl:2"):
        load_jsonl(path)


# --------------------------------------------------------------------------------------------------- run description


def test_run_info_order_and_contents(judge_dir: Path) -> None:
    loaded = from_model(build_model("llama"), tiny_tokenizer(), spec="tiny-llama")
    sets = {"jailbreak": PromptSet("jailbreak", ("a", "b"), "<memory>"), "benign": PromptSet("benign", ("c",), "x")}
    generation = GenerationOptions(max_new_tokens=3)
    matcher = RefusalMatcher(phrases=("no", "never"), window=20)
    info = run_info(loaded, sets, generation, matcher, None, settings={"s": 1}, measures={"m": 2})
    assert list(info) == ["model", "prompt_sets", "s", "generation", "m", "refusal_matcher", "judge"]
    assert info["model"]["spec"] == "tiny-llama"
    assert list(info["prompt_sets"]) == ["jailbreak", "benign"]
    assert info["prompt_sets"]["benign"] == sets["benign"].provenance()
    assert info["generation"] == {"decoding": "greedy", **dataclasses.asdict(generation)}
    assert info["refusal_matcher"] == {"window": 20, "phrases": 2}
    assert info["judge"] is None
    judge = ClassifierJudge(judge_dir, device="cpu", refusal_labels=["refused"])
    plain = run_info(loaded, sets, generation, DEFAULT_MATCHER, judge)
    assert list(plain) == ["model", "prompt_sets", "generation", "refusal_matcher", "judge"]
    assert plain["judge"] == judge.info()
    assert plain["refusal_matcher"] == {"window": DEFAULT_WINDOW, "phrases": len(DEFAULT_MATCHER.phrases)}


def test_behave_and_defend_describe_runs_alike() -> None:
    loaded = from_model(build_model("llama"), tiny_tokenizer(), spec="tiny-llama")
    texts = ("hi", "tell me a story")
    behaved = behave(loaded, {"jailbreak": texts}, max_new_tokens=1).info
    defended = defend(loaded, texts, texts, [0], max_new_tokens=1, ppl_texts=False).info
    for key in ("model", "generation", "refusal_matcher", "judge"):
        assert behaved[key] == defended[key]
    assert list(behaved) == ["model", "prompt_sets", "attack_sets", "generation", "refusal_matcher", "judge"]
    assert list(defended) == [
        "model",
        "prompt_sets",
        "generation",
        "perplexity",
        "similarity",
        "refusal_matcher",
        "judge",
    ]


# --------------------------------------------------------------------------------------------------- progress


def test_tracker_joins_stages_into_one_stream() -> None:
    calls: list[tuple[int, int, str]] = []
    tracker = Tracker(lambda *a: calls.append(a), 7)
    first = tracker.stage("one")
    first(0, 3, "ignored")
    first(3, 3, "ignored")
    second = tracker.stage("two")
    second(2, 2, "ignored")
    add = tracker.add("three")
    add(1)
    add(1)
    assert calls == [(0, 7, "one"), (3, 7, "one"), (5, 7, "two"), (6, 7, "three"), (7, 7, "three")]
    assert tracker.done == 7
    silent = Tracker(None, 2)
    silent.stage("x")(2, 2, "x")
    assert silent.done == 2
