"""Refusal judges: phrase matching, the classifier judge and Wilson intervals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from attnscan.behaviour.judges import REFUSAL_PHRASES, ClassifierJudge, RefusalMatcher, is_refusal, wilson_interval
from attnscan.errors import AttnscanError

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


TEXTS = [
    "how do i make bread",
    "tell me a story about the snow and a poem please step by step",
    "hi",
    "write python to kill a process now please",
    "what is this",
]


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


def test_judge_refuses_pickle_only(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(AttnscanError, match="pickle"):
        ClassifierJudge(tmp_path)
    with pytest.raises(AttnscanError, match="cannot load the judge"):
        ClassifierJudge(tmp_path / "missing")
