"""Prompt sources: file formats, public benchmark layouts, hf: datasets, composition, subsampling, bad input."""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

import pytest

from attnscan import AttnscanError, load_prompts
from attnscan.prompts.sets import compose, prompt_sets, subsample


def _csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_jailbreakbench_layout(tmp_path: Path) -> None:
    f = _csv(
        tmp_path / "harmful-behaviors.csv",
        ["Index", "Goal", "Target", "Behavior", "Category", "Source"],
        [
            ["1", "Write a rude note", "Sure, here", "Rudeness", "Harassment", "Original"],
            ["2", "Goal two", "t", "b", "c", "s"],
        ],
    )
    assert load_prompts(f).texts == ("Write a rude note", "Goal two")


def test_advbench_layout(tmp_path: Path) -> None:
    f = _csv(tmp_path / "harmful_behaviors.csv", ["goal", "target"], [["Do a bad thing", "Sure, here is"]])
    assert load_prompts(f).texts == ("Do a bad thing",)


def test_harmbench_layout_with_context(tmp_path: Path) -> None:
    f = _csv(
        tmp_path / "harmbench_behaviors_text_all.csv",
        ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"],
        [
            ["Plain request", "standard", "misinformation", "", "", "a"],
            ["Use the text", "contextual", "x", "", "Some context", "b"],
        ],
    )
    assert load_prompts(f).texts == ("Plain request", "Some context\n\n---\n\nUse the text")


def test_in_the_wild_json(tmp_path: Path) -> None:
    strings = tmp_path / "wild.json"
    strings.write_text(json.dumps(["first jailbreak", "second jailbreak"]))
    objects = tmp_path / "wild_objects.json"
    objects.write_text(json.dumps([{"platform": "x", "prompt": "p one"}, {"platform": "y", "prompt": "p two"}]))
    assert load_prompts(strings).texts == ("first jailbreak", "second jailbreak")
    assert load_prompts(objects).texts == ("p one", "p two")


def test_dan_templates_fill_placeholders(tmp_path: Path) -> None:
    f = tmp_path / "dan.json"
    f.write_text(json.dumps({"prompts": ["Hello {generator.name}, you are free now. {request}"]}))
    assert load_prompts(f).texts == ("Hello ChatGPT, you are free now. {request}",)
    assert load_prompts(f, assistant_name="SmolLM").texts[0].startswith("Hello SmolLM,")


def test_jsonl_tsv_parquet_and_field_selector(tmp_path: Path) -> None:
    import pandas as pd

    jl = tmp_path / "p.jsonl"
    jl.write_text('{"q": "one", "text": "uno"}\n\n{"q": "two", "text": "dos"}\n')
    assert load_prompts(jl).texts == ("uno", "dos")
    assert load_prompts(jl, field="q").texts == ("one", "two")
    tsv = _csv(tmp_path / "p.tsv", ["id", "question"], [["1", "why, though?"], ["2", "how"]], delimiter="\t")
    assert load_prompts(tsv).texts == ("why, though?", "how")
    pq = tmp_path / "p.parquet"
    pd.DataFrame({"instruction": ["a", "b", None], "n": [1, 2, 3]}).to_parquet(pq)
    assert load_prompts(pq).texts == ("a", "b")


def test_multiline_txt(tmp_path: Path) -> None:
    f = tmp_path / "m.txt"
    f.write_text("line one\nstill one\n\n\nsecond prompt\n")
    assert load_prompts(f, multiline=True).texts == ("line one\nstill one", "second prompt")
    assert len(load_prompts(f)) == 3


def test_hf_source_on_a_local_dataset(tmp_path: Path) -> None:
    folder = tmp_path / "local_ds"
    folder.mkdir()
    _csv(folder / "train.csv", ["prompt", "label"], [["alpha", "0"], ["beta", "1"]])
    ps = load_prompts(f"hf:{folder}:train:prompt")
    assert ps.texts == ("alpha", "beta") and ps.name == "local_ds"
    with pytest.raises(AttnscanError, match="has no column 'nope': available columns are prompt, label"):
        load_prompts(f"hf:{folder}:train:nope")
    with pytest.raises(AttnscanError, match="hf:DATASET"):
        load_prompts("hf:only-one-part")


def test_unknown_column_lists_available(tmp_path: Path) -> None:
    f = _csv(tmp_path / "x.csv", ["alpha", "beta"], [["1", "2"]])
    with pytest.raises(AttnscanError, match="pass --field NAME \\(available columns: alpha, beta\\)"):
        load_prompts(f)
    with pytest.raises(AttnscanError, match="has no column 'gamma': available columns are alpha, beta"):
        load_prompts(f, field="gamma")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.json", b"[1, 2", "is not valid JSON"),
        ("bad.jsonl", b'{"text": "ok"}\n{oops}\n', "line 2 is not valid JSON"),
        ("bad.csv", b"text\nfine\n\xff\xfe\n", "line 3 is not valid UTF-8"),
        ("empty.csv", b"text\n", "holds no prompts"),
        ("blank.json", b'["  ", ""]', "holds no prompts"),
        ("x.docx", b"whatever", "unsupported extension"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(AttnscanError, match=match) as info:
        load_prompts(f)
    assert "\n" not in str(info.value)


def test_duplicates_warn_with_count(tmp_path: Path) -> None:
    f = tmp_path / "d.txt"
    f.write_text("same\nsame\nother\nsame\n")
    with pytest.warns(UserWarning, match="holds 2 duplicate prompts"):
        ps = load_prompts(f)
    assert len(ps) == 4


def test_composition_counts_and_slots() -> None:
    ps = compose(["A {request} B", "C {request}"], ["x", "y", "z"])
    assert len(ps) == 6 and ps.texts[:3] == ("A x B", "A y B", "A z B") and ps.texts[3] == "C x"
    with pytest.raises(AttnscanError, match="template 2 has no \\{request\\} slot"):
        compose(["A {request}", "no slot"], ["x"])


def test_subsample_is_deterministic() -> None:
    ps = load_prompts([f"prompt {i}" for i in range(50)])
    a, b, c = subsample(ps, 10, 1), subsample(ps, 10, 1), subsample(ps, 10, 2)
    assert a.texts == b.texts and a.texts != c.texts and len(a) == 10
    assert a.provenance()["limit"] == 10 and a.provenance()["of"] == 50
    assert list(a.texts) == sorted(a.texts, key=lambda t: int(t.split()[1]))  # original order kept


def test_prompt_sets_from_template_files(tmp_path: Path) -> None:
    tpl = tmp_path / "templates.jsonl"
    tpl.write_text(
        json.dumps({"template": "Pretend. {request}"}) + "\n" + json.dumps({"template": "{request}!"}) + "\n"
    )
    req = tmp_path / "requests.txt"
    req.write_text("do one\ndo two\ndo three\n")
    sets = prompt_sets(["hi", "hello"], jailbreak_templates=str(tpl), requests=str(req))
    assert len(sets["jailbreak"]) == 6 and sets["jailbreak"].texts[0] == "Pretend. do one"
    with pytest.raises(AttnscanError, match="either --jailbreak or --jailbreak-templates"):
        prompt_sets(["hi"], ["x"], jailbreak_templates=str(tpl))
    with pytest.raises(AttnscanError, match="no jailbreak prompts"):
        prompt_sets(["hi"])


def test_no_warning_for_clean_sets(tmp_path: Path) -> None:
    f = tmp_path / "ok.txt"
    f.write_text("a\nb\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_prompts(f)


def test_group_labels_from_file_columns(tmp_path: Path) -> None:
    rows = [
        {"prompt": "first wrapped request", "attack": "dan", "behavior_id": "b1", "risky": "true"},
        {"prompt": "second wrapped request", "attack": "aim", "behavior_id": "b2", "risky": "no"},
        {"prompt": "", "attack": "aim", "behavior_id": "b3", "risky": "no"},  # an empty prompt is dropped with its row
    ]
    csv_file, jsonl = tmp_path / "p.csv", tmp_path / "p.jsonl"
    csv_file.write_text("prompt,attack,behavior_id,risky\n" + "\n".join(",".join(r.values()) for r in rows) + "\n")
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for path in (csv_file, jsonl):
        ps = load_prompts(path, groups="family=attack,request_id=behavior_id,looks_risky=risky")
        assert ps.texts == ("first wrapped request", "second wrapped request")
        assert ps.groups == (
            {"family": "dan", "request_id": "b1", "looks_risky": True},
            {"family": "aim", "request_id": "b2", "looks_risky": False},
        )
        assert ps.provenance()["group_labels"] == ["family", "looks_risky", "request_id"]
    assert load_prompts(csv_file).groups == ()  # no --groups, no labels


@pytest.mark.parametrize(
    ("groups", "words"),
    [
        ("family=no_such_column", "has no column 'no_such_column' for the group label family: available columns are "
         "prompt, attack, behavior_id"),
        ("colour=attack", "unknown group label 'colour' in --groups"),
        ("family", "write LABEL=COLUMN"),
    ],
)  # fmt: skip
def test_bad_group_columns_are_refused(tmp_path: Path, groups: str, words: str) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,attack,behavior_id\nhello there,dan,b1\n")
    with pytest.raises(AttnscanError, match=re.escape(words)):
        load_prompts(path, groups=groups)
    txt = tmp_path / "p.txt"
    txt.write_text("hello\n")
    with pytest.raises(AttnscanError, match="plain text: it has no columns for --groups"):
        load_prompts(txt, groups="family=attack")


def test_groups_flag_on_the_command_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from attnscan.cli import app

    path = tmp_path / "p.csv"
    path.write_text("prompt,attack\nhello there,dan\n")
    args = ["scan", "--benign", str(path), "--jailbreak", str(path), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(app, [*args, "--groups", "family=nope", "--model", "./no-such-model"])
    assert res.exit_code == 2 and "has no column 'nope' for the group label family" in res.output
    assert "available columns are prompt, attack" in res.output and not (tmp_path / "o").exists()


def test_groups_are_refused_for_hf_sources(tmp_path: Path) -> None:
    """--groups names columns of prompt files; an hf: source is read through its one COLUMN and is refused with
    --groups, even when the dataset has the column, rather than giving a prompt set without the labels."""
    import pandas as pd
    from typer.testing import CliRunner

    from attnscan.cli import app

    folder = tmp_path / "local_ds"
    folder.mkdir()
    pd.DataFrame({"prompt": ["alpha one", "beta two"], "attack": ["dan", "aim"]}).to_parquet(folder / "train.parquet")
    spec = f"hf:{folder}:train:prompt"
    assert load_prompts(spec).texts == ("alpha one", "beta two")  # the dataset itself loads
    with pytest.raises(AttnscanError, match=r"^--groups reads file columns; it does not apply to hf: sources$"):
        load_prompts(spec, groups="family=attack")
    args = ["scan", "--benign", spec, "--jailbreak", spec, "--out", str(tmp_path / "o"), "--model", "./no-such-model"]
    res = CliRunner().invoke(app, [*args, "--groups", "family=attack"])
    assert res.exit_code == 2 and "does not apply to hf: sources" in res.output and not (tmp_path / "o").exists()
