"""Which column holds the prompts: the public layouts win over the generic column names, and group labels come
from every table format (mutation testing showed both could change unnoticed)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from attnscan import AttnscanError
from attnscan.prompts.loaders import read_file_rows

# Every table also has a generic 'prompt' column holding a decoy: a layout that is not recognised falls back to the
# generic names, which pick 'prompt' first, so the decoy shows up in the result.
LAYOUTS = [
    # JailbreakBench JBB-Behaviors (its own columns in its own case), plus extra columns
    ({"Index": 1, "Goal": "the goal", "Target": "Sure", "Behavior": "b", "Category": "c", "Source": "s"}, "the goal"),
    # AdvBench
    ({"goal": "the goal", "target": "Sure"}, "the goal"),
    # HarmBench without context
    ({"Behavior": "the behaviour", "FunctionalCategory": "standard", "SemanticCategory": "x"}, "the behaviour"),
]


@pytest.mark.parametrize(("row", "expected"), LAYOUTS)
def test_public_layouts_win_over_generic_names(tmp_path: Path, row: dict[str, object], expected: str) -> None:
    path = tmp_path / "t.csv"
    pd.DataFrame([{**row, "prompt": "decoy"}]).to_csv(path, index=False)
    assert read_file_rows(path)[0] == [expected]


def test_harmbench_context_is_attached_only_when_present(tmp_path: Path) -> None:
    base = {"Behavior": "the behaviour", "FunctionalCategory": "contextual", "SemanticCategory": "x"}
    with_context, without = tmp_path / "with.csv", tmp_path / "without.csv"
    pd.DataFrame([{**base, "ContextString": "CONTEXT-MARK"}]).to_csv(with_context, index=False)
    pd.DataFrame([base]).to_csv(without, index=False)
    (text,) = read_file_rows(with_context)[0]
    assert "CONTEXT-MARK" in text and "the behaviour" in text
    assert read_file_rows(without)[0] == ["the behaviour"]


def test_a_near_miss_of_a_layout_uses_the_generic_names(tmp_path: Path) -> None:
    """Goal and Behavior without Category is not JailbreakBench: the generic names decide ('prompt' first)."""
    path = tmp_path / "t.csv"
    pd.DataFrame([{"Goal": "the goal", "Behavior": "b", "prompt": "generic"}]).to_csv(path, index=False)
    assert read_file_rows(path)[0] == ["generic"]
    pd.DataFrame([{"Goal": "the goal", "Behavior": "b"}]).to_csv(path, index=False)
    assert read_file_rows(path)[0] == ["the goal"]  # matched case-insensitively, spelled as the file spells it


def test_field_overrides_and_a_missing_field_lists_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    pd.DataFrame([{"Goal": "g", "Behavior": "b", "Category": "c", "prompt": "p"}]).to_csv(path, index=False)
    assert read_file_rows(path, field="Behavior")[0] == ["b"]
    with pytest.raises(AttnscanError, match="has no column 'nope': available columns are Goal, Behavior, Category"):
        read_file_rows(path, field="nope")


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_group_labels_from_every_table_format(tmp_path: Path, suffix: str) -> None:
    rows = [{"prompt": "first", "attack": "dan"}, {"prompt": "second", "attack": "aim"}]
    path = tmp_path / f"p{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        frame.to_parquet(path)
    texts, groups = read_file_rows(path, groups={"family": "attack"})
    assert texts == ["first", "second"]
    assert [g["family"] for g in groups] == ["dan", "aim"]
