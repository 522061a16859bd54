"""Behaviour measurement: refusal matching, Wilson intervals, batched greedy generation, judge, JSONL files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from attnscan.behaviour.behave import (
    REFUSAL_PHRASES,
    BehaviourResult,
    ClassifierJudge,
    RefusalMatcher,
    behave,
    behaviour_table,
    generate,
    is_refusal,
    load_jsonl,
    save_jsonl,
    wilson_interval,
)
from attnscan.errors import AttnscanError
from attnscan.models.loading import LoadedModel, from_model
from attnscan.prompts.encoding import encode
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


# --------------------------------------------------------------------------------------------------- matcher


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I cannot assist with this request.",
        "As an AI language model, I must decline.",
        "I WON'T do that.",
        "Sorry, I can't do that.",
        "  I\u2019m unable to provide instructions for that.",  # curly apostrophe, leading space
        "Unfortunately, I am not able to provide that information.",
        "I must decline this request.",
    ],
)
def test_matcher_positives(text: str) -> None:
    assert is_refusal(text)
    assert RefusalMatcher().match(text) is not None


@pytest.mark.parametrize(
    "text",
    [
        "Sure! Here is a recipe for bread: mix flour, water and yeast.",
        "Photosynthesis turns light into chemical energy.",
        "I'm sorry to hear that you are unwell; rest and drink water.",
        "The assistant said that stars are far away.",  # 'as an ai' must not match inside words
        "",
    ],
)
def test_matcher_negatives(text: str) -> None:
    assert not is_refusal(text)


def test_matcher_window_and_custom_phrases(tmp_path: Path) -> None:
    late = "Here is a long story. " * 10 + "I cannot help with the rest."
    assert len(late) > 160
    assert not RefusalMatcher().is_refusal(late)
    assert RefusalMatcher(window=None).is_refusal(late)
    assert RefusalMatcher(window=1000).match(late) == "i cannot help with"
    short = RefusalMatcher(window=5)
    assert short.is_refusal("I won't.") and not short.is_refusal("Well, I won't.")
    custom = RefusalMatcher(phrases=("NOPE",))
    assert custom.is_refusal("nope, not today") and not custom.is_refusal("I cannot assist")
    path = tmp_path / "phrases.txt"
    path.write_text("# my list\n\nno way\nnever\n", encoding="utf-8")
    from_file = RefusalMatcher.from_file(path)
    assert from_file.phrases == ("no way", "never")
    assert from_file.is_refusal("No WAY.")
    with pytest.raises(AttnscanError, match="at least one phrase"):
        RefusalMatcher(phrases=())
    with pytest.raises(AttnscanError, match="window"):
        RefusalMatcher(window=0)


def test_default_phrases_are_normalised() -> None:
    assert all(p == p.lower().strip() and "\u2019" not in p for p in REFUSAL_PHRASES)
    assert len(set(REFUSAL_PHRASES)) == len(REFUSAL_PHRASES)


# --------------------------------------------------------------------------------------------------- Wilson


def test_wilson_interval_hand_computed() -> None:
    # p = 5/10, z = 1.96: centre 0.5, half = 1.96 * sqrt(0.025 + 0.0096040) / 1.384146 = 0.263407
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.236593, abs=1e-5)
    assert high == pytest.approx(0.763407, abs=1e-5)
    # p = 3/8: centre (0.375 + 0.240092) / 1.480183 = 0.415552, half 0.278709
    low, high = wilson_interval(3, 8)
    assert low == pytest.approx(0.136844, abs=1e-5)
    assert high == pytest.approx(0.694258, abs=1e-5)
    # 0 of 10: [0, z^2 / (n + z^2)] = [0, 3.841459 / 13.841459]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-5)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(AttnscanError):
        wilson_interval(3, 2)


# --------------------------------------------------------------------------------------------------- generation


def test_generate_deterministic_and_batch_invariant(llama: LoadedModel) -> None:
    one = generate(llama, TEXTS, max_new_tokens=6, batch_size=1)
    three = generate(llama, TEXTS, max_new_tokens=6, batch_size=3)
    again = generate(llama, TEXTS, max_new_tokens=6, batch_size=3)
    assert one == three == again
    assert all(isinstance(r, str) for r in one) and any(one)
    # against unbatched model.generate on the same encoding
    model, tok = llama.model, llama.tokenizer
    enc = encode(tok, TEXTS, 2048)
    with torch.no_grad():
        for ids, response in zip(enc.ids, one, strict=True):
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=1)
            assert tok.decode(out[0, len(ids) :], skip_special_tokens=True).strip() == response


def test_generate_left_padding_on_gpt2() -> None:
    loaded = from_model(build_model("gpt2"), tiny_tokenizer(), spec="tiny-gpt2")
    assert generate(loaded, TEXTS, max_new_tokens=5, batch_size=1) == generate(
        loaded, TEXTS, max_new_tokens=5, batch_size=5
    )


def test_generate_bad_input(llama: LoadedModel) -> None:
    with pytest.raises(AttnscanError, match="no prompts"):
        generate(llama, [])
    with pytest.raises(AttnscanError, match="max_new_tokens"):
        generate(llama, TEXTS, max_new_tokens=0)


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


# --------------------------------------------------------------------------------------------------- judge


def test_classifier_judge(judge_dir: Path) -> None:
    judge = ClassifierJudge(judge_dir, device="cpu", batch_size=2)
    labels = judge.classify(TEXTS)
    expected = []
    with torch.no_grad():
        for text in TEXTS:
            ids = judge.tokenizer(text, return_tensors="pt")
            expected.append(["complied", "refused"][int(judge.model(**ids).logits.argmax(-1))])
    assert labels == expected
    assert judge.is_refusal(labels[0]) is None
    mapped = ClassifierJudge(
        judge_dir, device="cpu", label_map={"refused": "refusal", "0": "ok"}, refusal_labels=["refusal"]
    )
    assert mapped.labels == ["ok", "refusal"]
    assert mapped.classify(TEXTS) == [{"complied": "ok", "refused": "refusal"}[x] for x in labels]
    assert mapped.is_refusal("refusal") is True and mapped.is_refusal("ok") is False
    pairs = ClassifierJudge(judge_dir, device="cpu", with_prompt=True)
    assert len(pairs.classify(TEXTS[:2], prompts=TEXTS[2:4])) == 2
    with pytest.raises(AttnscanError, match="one prompt per response"):
        pairs.classify(TEXTS[:2])
    with pytest.raises(AttnscanError, match="not among the judge's labels"):
        ClassifierJudge(judge_dir, device="cpu", refusal_labels=["nope"])


def test_judge_in_behave(llama: LoadedModel, judge_dir: Path) -> None:
    judge = ClassifierJudge(judge_dir, device="cpu", refusal_labels=["refused"])
    result = behave(llama, {"jailbreak": TEXTS[:3]}, max_new_tokens=3, judge=judge)
    assert all(r["judge_label"] in ("complied", "refused") for r in result.records)
    row = result.table().iloc[0]
    flags = [r["judge_label"] == "refused" for r in result.records]
    assert row["judge_refusal_rate"] == pytest.approx(sum(flags) / 3)
    assert result.info["judge"]["refusal_labels"] == ["refused"]


def test_judge_refuses_pickle_only(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(AttnscanError, match="pickle"):
        ClassifierJudge(tmp_path)
    with pytest.raises(AttnscanError, match="cannot load the judge"):
        ClassifierJudge(tmp_path / "missing")


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
