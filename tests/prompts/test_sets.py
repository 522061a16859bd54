"""Prompt sets (the foundation's part: .txt files and built-in sets) and encoding onto the grid."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnscan import AttnscanError, PromptSet, encode, load_prompts
from attnscan.prompts.sets import builtin_names


def test_txt_file_one_prompt_per_line(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\n  second prompt  \nthird\n", encoding="utf-8")
    ps = load_prompts(f)
    assert ps.texts == ("first prompt", "second prompt", "third")
    prov = ps.provenance()
    assert prov["count"] == 3 and prov["source"] == str(f) and len(prov["sha256"]) == 64
    assert load_prompts(["first prompt", "second prompt", "third"]).sha256 == ps.sha256


def test_builtin_demo_sets() -> None:
    assert {"demo-benign", "demo-jailbreak"} <= set(builtin_names())
    benign = load_prompts("builtin:demo-benign")
    jail = load_prompts("builtin:demo-jailbreak")
    assert len(benign) >= 8 and len(jail) >= 8
    assert benign.source == "builtin:demo-benign"
    with pytest.raises(AttnscanError, match="unknown built-in set 'nope'"):
        load_prompts("builtin:nope")


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "holds no prompts"), (b"\n  \n", "holds no prompts"), (b"ok\n\xff\xfe bad\n", "line 2 is not valid UTF-8")],
)
def test_bad_files(tmp_path: Path, content: bytes, match: str) -> None:
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(AttnscanError, match=match):
        load_prompts(f)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(AttnscanError, match="prompt file not found"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(AttnscanError, match="is a directory"):
        load_prompts(tmp_path)
    with pytest.raises(AttnscanError, match="is empty"):
        PromptSet("x", (), "nowhere")


def test_encode_with_and_without_chat_template(tokenizer: object) -> None:
    text = "how do i kill a python process"
    with_t = encode(tokenizer, [text], 64)
    without = encode(tokenizer, [text], 64, chat_template=False)
    assert with_t.chat_template and not without.chat_template
    tok = tokenizer.convert_ids_to_tokens(list(with_t.ids[0]))  # type: ignore[attr-defined]
    assert tok[0] == "<|user|>" and tok[-1] == "<|assistant|>"
    assert tokenizer.convert_ids_to_tokens(list(without.ids[0]))[:2] == ["how", "do"]  # type: ignore[attr-defined]
    system = encode(tokenizer, [text], 64, system_prompt="you are free")
    assert system.lengths[0] > with_t.lengths[0]


def test_truncation_keeps_head_or_tail(tokenizer: object) -> None:
    text = " ".join(["the"] * 5 + ["snow"] * 5)
    head = encode(tokenizer, [text], 4, chat_template=False)
    tail = encode(tokenizer, [text], 4, chat_template=False, truncate="tail")
    assert head.truncated == 1 and head.full_lengths == (10,) and head.lengths == (4,)
    assert tokenizer.convert_ids_to_tokens(list(head.ids[0])) == ["the"] * 4  # type: ignore[attr-defined]
    assert tokenizer.convert_ids_to_tokens(list(tail.ids[0])) == ["snow"] * 4  # type: ignore[attr-defined]
    with pytest.raises(AttnscanError, match="positive"):
        encode(tokenizer, [text], 0)


def test_truncation_warning_counts_and_names_the_set() -> None:
    import warnings

    from attnscan.prompts.encoding import Encoded, warn_truncated

    enc = Encoded(ids=((1, 2, 3), (4, 5, 6)), full_lengths=(3, 9), chat_template=False)
    with pytest.warns(UserWarning, match=r"^1 of 2 jailbreak prompts are longer than 3 tokens .* first 3$"):
        warn_truncated(enc, 3, "head", "jailbreak prompts")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_truncated(Encoded(ids=((1, 2),), full_lengths=(2,), chat_template=False), 3, "tail")


def test_builtin_sets_and_composition_carry_group_labels() -> None:
    from attnscan.prompts.sets import compose, load_prompts

    jailbreak = load_prompts("builtin:jailbreak")
    templates, harmful = load_prompts("builtin:templates"), load_prompts("builtin:harmful")
    assert len(jailbreak.groups) == len(jailbreak) == len(templates) * len(harmful)
    # template-major order: prompt t * R + r wraps request r in template t, and says so
    r = len(harmful)
    for i in (0, 1, r, 3 * r + 7, len(jailbreak) - 1):
        g = jailbreak.groups[i]
        assert g["template_id"] == templates.groups[i // r]["template_id"]
        assert g["family"] == templates.groups[i // r]["family"]
        assert g["request_id"] == harmful.groups[i % r]["request_id"]
        assert g["category"] == harmful.groups[i % r]["category"]
        span = jailbreak.request_span(i)
        assert span is not None and jailbreak.texts[i][span[0] : span[1]] == harmful.texts[i % r]
    control = load_prompts("builtin:control")
    assert {type(g["looks_risky"]) for g in control.groups} == {bool}
    assert control.group("family") is not None and control.group("no-such-label") is None
    # subsampling keeps each prompt's labels with it
    some = load_prompts("builtin:jailbreak", limit=9, seed=3)
    for text, g in zip(some.texts, some.groups, strict=True):
        assert jailbreak.groups[jailbreak.texts.index(text)] == g
    # plain lists are labelled by position
    plain = compose(["A {request} B", "C {request}"], ["x", "yy"])
    assert [(g["template_id"], g["request_id"]) for g in plain.groups] == [
        ("t1", "r1"),
        ("t1", "r2"),
        ("t2", "r1"),
        ("t2", "r2"),
    ]
    assert [plain.request_span(i) for i in range(4)] == [(2, 3), (2, 4), (2, 3), (2, 4)]


def test_a_template_needs_exactly_one_slot() -> None:
    from attnscan.prompts.sets import compose

    with pytest.raises(AttnscanError, match="template 2 has 2 \\{request\\} slots"):
        compose(["ok {request}", "{request} twice {request}"], ["x"])
