"""Prompt file readers on their edges: byte-order marks, placeholders, the shapes of JSON they accept or refuse,
CSV fields past the size limit, damaged parquet, hf: specs with a config, and where each refusal points."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from attnscan import AttnscanError
from attnscan.prompts.loaders import (
    HARMBENCH_CONTEXT_SEPARATOR,
    MAX_FIELD,
    fill_placeholders,
    read_file,
    read_file_rows,
    read_hf,
    read_json,
    read_jsonl,
    read_table,
    read_txt,
)


def test_every_placeholder_spelling_is_filled() -> None:
    text = "{generator.name} {generator_name} {model_name} {assistant_name} {request} {other.name}"
    assert fill_placeholders(text, "Bot") == "Bot Bot Bot Bot {request} {other.name}"


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffprompt,attack\nhello there,dan\n".encode())
    assert read_file_rows(path, groups={"family": "attack"}) == (["hello there"], [{"family": "dan"}])


def test_a_suffix_in_capitals_picks_the_same_reader(tmp_path: Path) -> None:
    path = tmp_path / "P.TSV"
    path.write_text("id\tquestion\n1\twhy, though?\n")
    assert read_file_rows(path) == (["why, though?"], [{}])


def test_harmbench_context_is_stripped_and_blank_context_ignored(tmp_path: Path) -> None:
    path = tmp_path / "hb.csv"
    frame = pd.DataFrame(
        {
            "Behavior": ["use it", "plain"],
            "FunctionalCategory": ["contextual", "standard"],
            "SemanticCategory": ["x", "y"],
            "ContextString": ["  the context \n", "   "],
        }
    )
    frame.to_csv(path, index=False)
    texts, _ = read_file_rows(path)
    assert texts == ["the context" + HARMBENCH_CONTEXT_SEPARATOR + "use it", "plain"]


def test_missing_cells_drop_the_prompt_or_the_label(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["a", None, "c"], "attack": ["dan", "aim", None]}).to_parquet(path)
    assert read_file_rows(path, groups={"family": "attack"}) == (["a", "c"], [{"family": "dan"}, {}])


# ------------------------------------------------------------------------------------------------- JSON


def test_an_object_holding_one_list_among_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"name": "set", "version": 2, "prompts": ["one", "two"]}))
    assert read_json(path) == (["one", "two"], [{}, {}])


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"a": ["x"], "b": ["y"]}, "is a JSON object; expected a list of prompts (or an object with exactly one list"),
        ({"a": "x"}, "is a JSON object; expected a list of prompts"),
        (3, "holds a JSON int: give a list of strings or objects"),
        ("text", "holds a JSON str: give a list of strings or objects"),
        (["a", {"prompt": "b"}], "mixes strings and objects: give a list of strings or a list of objects"),
    ],
)
def test_json_shapes_that_are_refused(tmp_path: Path, data: object, words: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AttnscanError, match=f"^{path}.* " + words.replace("(", r"\(")):
        read_json(path)


def test_a_list_of_strings_has_no_fields_or_columns(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["one", "two"]))
    with pytest.raises(AttnscanError, match="is a list of strings: it has no field 'text'; drop --field"):
        read_json(path, field="text")
    with pytest.raises(AttnscanError, match="is a list of strings: it has no columns for --groups; drop --groups"):
        read_json(path, groups={"family": "attack"})
    assert read_json(path, groups={}) == (["one", "two"], [{}, {}])


def test_columns_of_objects_are_gathered_from_every_object(tmp_path: Path) -> None:
    """A key that only a later object has is still a column (here the group column)."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": "b", "attack": "dan"}\n')
    assert read_jsonl(path, groups={"family": "attack"}) == (["a", "b"], [{}, {"family": "dan"}])


def test_an_empty_jsonl_file_holds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n  \n")
    assert read_jsonl(path) == ([], [])


def test_json_nested_too_deeply_is_refused(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "p.json"
    path.write_text(deep)
    with pytest.raises(AttnscanError, match=r"p\.json nests JSON lists or objects too deeply to read: fix the file"):
        read_json(path)
    lines = tmp_path / "p.jsonl"
    lines.write_text('"fine"\n' + deep + "\n")
    with pytest.raises(AttnscanError, match=r"p\.jsonl line 2 nests JSON too deeply to read: fix the line"):
        read_jsonl(lines)


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('[\n"a",\n"b"\n"c"]')
    with pytest.raises(AttnscanError, match=r"p\.json is not valid JSON \(line 4: Expecting ',' delimiter\): fix"):
        read_json(path)


# ------------------------------------------------------------------------------------------------- tables


def test_a_field_past_the_csv_default_limit_is_read_and_the_limit_restored(tmp_path: Path) -> None:
    long = "word " * 40_000  # 200 000 characters: past csv's default 131 072
    path = tmp_path / "p.csv"
    path.write_text(f"prompt\n{long}\n")
    before = csv.field_size_limit()
    assert read_table(path)[0] == [long]
    assert csv.field_size_limit() == before


def test_a_field_past_our_limit_names_the_line_where_its_row_starts(tmp_path: Path) -> None:
    """csv counts only the lines of the rows it finished; the row it could not read starts one line later."""
    path = tmp_path / "p.csv"
    path.write_text("prompt\nfirst\nsecond\n" + "x" * (MAX_FIELD + 1) + "\n")
    before = csv.field_size_limit()
    with pytest.raises(AttnscanError, match=r"p\.csv line 4 cannot be read as CSV \(field larger than field limit"):
        read_table(path)
    assert csv.field_size_limit() == before


def test_a_header_alone_and_an_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "e.csv"
    empty.write_text("")
    assert read_table(empty) == ([], [])


def test_a_damaged_parquet_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(AttnscanError, match=r"p\.parquet is not a readable parquet file \(.+\): fix or re-export"):
        read_file_rows(path)


def test_plain_text_has_no_field() -> None:
    with pytest.raises(AttnscanError, match=r"x\.txt is plain text: it has no field 'prompt'; drop --field"):
        read_file_rows(Path("x.txt"), field="prompt")


# ------------------------------------------------------------------------------------------------- hf:


def test_hf_with_a_config_and_missing_values(tmp_path: Path) -> None:
    folder = tmp_path / "local_ds"
    folder.mkdir()
    pd.DataFrame({"prompt": ["alpha", None, "gamma"]}).to_parquet(folder / "train.parquet")
    assert read_hf(f"hf:{folder}:train:prompt") == (["alpha", "gamma"], str(folder))
    assert read_hf(f"hf:{folder}:default:train:prompt") == (["alpha", "gamma"], str(folder))
    with pytest.raises(AttnscanError, match=f"^cannot load dataset '{folder}' split 'nope': "):
        read_hf(f"hf:{folder}:nope:prompt")
    with pytest.raises(AttnscanError, match=r"write hf:DATASET\[:CONFIG\]:SPLIT:COLUMN, e\.g\. hf:org/set:train"):
        read_hf("hf:a:b:c:d:e")


# ------------------------------------------------------------------------------------------------- every reader


@pytest.mark.parametrize("name", ["p.txt", "p.json", "p.jsonl", "p.csv"])
def test_invalid_utf8_names_the_file_and_the_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b'"fine"\n"caf\xe9"\n')
    with pytest.raises(AttnscanError, match=f"^{path} line 2 is not valid UTF-8: re-save the file as UTF-8$"):
        read_file_rows(path)


def test_windows_line_ends_between_multiline_prompts(tmp_path: Path) -> None:
    path = tmp_path / "m.txt"
    path.write_bytes(b"line one\r\nstill one\r\n\r\nsecond\r\n")
    assert read_file(path, multiline=True) == ["line one\nstill one", "second"]
    assert read_file(path) == ["line one", "still one", "second"]


def test_read_file_passes_the_field_on(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["a", "b"], "other": ["x", "y"]}).to_parquet(path)
    assert read_file(path, field="other") == ["x", "y"]
    assert read_file_rows(path, field="other")[0] == ["x", "y"]


def test_an_empty_jsonl_file_with_a_field_or_groups_holds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n")
    assert read_jsonl(path, field="prompt") == ([], [])
    assert read_jsonl(path, groups={"family": "attack"}) == ([], [])


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (ValueError("first line\nsecond line"), "first line"),
        (ValueError("   "), "ValueError"),
        (OSError(""), "OSError"),
    ],
)
def test_a_parquet_failure_shows_the_first_line_of_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, shown: str
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(pd, "read_parquet", fail)
    path = tmp_path / "p.parquet"
    with pytest.raises(
        AttnscanError, match=f"^{path} is not a readable parquet file \\({shown}\\): fix or re-export the file$"
    ):
        read_file_rows(path)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: object, **kwargs: object) -> None:
        raise ImportError("no pyarrow")

    monkeypatch.setattr(pd, "read_parquet", missing)
    with pytest.raises(AttnscanError, match=r"^reading \.parquet needs pyarrow: pip install pyarrow$"):
        read_file_rows(tmp_path / "p.parquet")


def test_csv_line_ends_as_the_csv_module_reads_them(tmp_path: Path) -> None:
    """Old Mac line ends (CR alone) separate rows; a quoted prompt keeps its own line ends as written."""
    cr = tmp_path / "cr.csv"
    cr.write_bytes(b"prompt\rone\rtwo\r")
    assert read_table(cr)[0] == ["one", "two"]
    quoted = tmp_path / "q.csv"
    quoted.write_bytes(b'prompt\r\n"line one\r\nline two"\r\nnext\r\n')
    assert read_table(quoted)[0] == ["line one\r\nline two", "next"]


def test_objects_without_keys_have_no_columns(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("[{}, {}]")
    with pytest.raises(AttnscanError, match=r"holds the prompts: pass --field NAME \(available columns: none\)$"):
        read_json(path)
    with pytest.raises(AttnscanError, match=f"^{path} has no column 'prompt': available columns are none$"):
        read_json(path, field="prompt")


def test_numbers_are_prompts_and_labels_not_missing_values(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": 1.5, "attack": 2.0}\n{"prompt": "text", "attack": NaN}\n')
    assert read_jsonl(path, groups={"family": "attack"}) == (["1.5", "text"], [{"family": 2.0}, {}])


@pytest.mark.parametrize("name", ["p.csv", "p.json", "p.jsonl", "p.parquet"])
def test_a_missing_group_column_names_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name.endswith(".parquet"):
        pd.DataFrame({"prompt": ["hello"]}).to_parquet(path)
    else:
        path.write_text(
            {".csv": "prompt\nhello\n", ".json": '[{"prompt": "hello"}]'}.get(path.suffix, '{"prompt": "hi"}')
        )
    with pytest.raises(AttnscanError, match=f"^{path} has no column 'attack' for the group label family"):
        read_file_rows(path, groups={"family": "attack"})
    with pytest.raises(AttnscanError, match=f"^{path} has no column 'nope': available columns are prompt$"):
        read_file_rows(path, field="nope")


def test_read_file_rows_defaults_and_fields_of_every_format(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("one\ntwo\n\nthree\n")
    assert read_file_rows(txt) == (["one", "two", "three"], [{}, {}, {}])  # one prompt per line by default
    assert read_txt(txt) == ["one", "two", "three"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "a", "other": "x"}]))
    assert read_file_rows(js, field="other")[0] == ["x"]
    with pytest.raises(
        AttnscanError, match=r"unsupported extension '\.md'; use \.txt, \.json, \.jsonl, \.csv, \.tsv or \."
    ):
        read_file_rows(tmp_path / "p.md")


def test_hf_without_the_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(AttnscanError, match=r"^hf: sources need the 'datasets' package: pip install datasets$"):
        read_hf("hf:org/set:train:prompt")


@pytest.mark.parametrize(
    ("error", "shown"), [(ValueError("no such split\ndetails"), "no such split"), (KeyError(), "KeyError")]
)
def test_a_dataset_that_cannot_be_loaded_shows_the_first_line_of_the_reason(
    monkeypatch: pytest.MonkeyPatch, error: Exception, shown: str
) -> None:
    import datasets

    calls: list[tuple[object, ...]] = []

    def fail(*args: object, **kwargs: object) -> None:
        calls.append((*args, kwargs))
        raise error

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(AttnscanError, match=f"^cannot load dataset 'org/set' split 'test': {shown}$"):
        read_hf("hf:org/set:cfg:test:prompt")
    assert calls == [("org/set", "cfg", {"split": "test"})]
