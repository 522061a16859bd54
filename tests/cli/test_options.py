"""The one place the commands' parsed flags become the library's inputs, and the one place commands are registered."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from attnscan.analysis.scan import ScanOptions
from attnscan.cli.main import app
from attnscan.cli.options import load_keywords, load_options, option_keywords, options_from, read_prompt_sets
from attnscan.errors import AttnscanError
from attnscan.models.loading import LoadOptions


def test_load_options_take_the_loading_flags_a_command_has() -> None:
    flags = {"dtype": "bfloat16", "device": "cpu", "max_memory": "0=20GiB,cpu=60GiB", "layers": "3", "quiet": True}
    assert load_options(flags) == LoadOptions(dtype="bfloat16", device="cpu", max_memory={0: "20GiB", "cpu": "60GiB"})
    assert load_options({"trust_remote_code": True, "allow_pickle": True}) == LoadOptions(
        trust_remote_code=True, allow_pickle=True
    )
    with pytest.raises(AttnscanError, match="cannot read --max-memory part"):
        load_options({"max_memory": "lots"})


def test_load_keywords_pass_the_flags_as_given() -> None:
    # detect score/eval: dtype None means "the dtype the detector was trained with", so it travels as it is
    flags = {"dtype": None, "device": "auto", "allow_pickle": False, "max_memory": "0=1GiB", "seed": 3}
    assert load_keywords(flags) == {"dtype": None, "device": "auto", "allow_pickle": False, "max_memory": "0=1GiB"}


def test_options_from_fields_of_the_same_name_and_parsed_values_win() -> None:
    flags = {"layers": "0,2", "length": 16, "batch_size": "auto", "align": "relative", "dtype": "auto", "out": "x"}
    options = options_from(ScanOptions, flags, batch_size=None)
    assert options == ScanOptions(layers="0,2", length=16, batch_size=None, align="relative")
    assert option_keywords(ScanOptions, flags) == {
        "layers": "0,2",
        "length": 16,
        "batch_size": "auto",
        "align": "relative",
    }
    with pytest.raises(AttnscanError, match="--length must be a positive number of tokens"):
        options_from(ScanOptions, {"length": 0})


def test_read_prompt_sets_uses_only_the_prompt_flags_given(tmp_path: Path) -> None:
    benign = tmp_path / "b.txt"
    benign.write_text("one\ntwo\nthree\n")
    jail = tmp_path / "j.txt"
    jail.write_text("ignore rules and one\nignore rules and two\n")
    flags = {"benign": str(benign), "jailbreak": str(jail), "limit": 2, "seed": 1, "model": "m", "out": tmp_path}
    sets = read_prompt_sets(flags)
    assert sorted(sets) == ["benign", "jailbreak"] and len(sets["benign"]) == 2 and len(sets["jailbreak"]) == 2
    with pytest.raises(AttnscanError, match="no benign prompts"):
        read_prompt_sets({"jailbreak": str(jail)})


def test_every_command_registered_once_in_help_order() -> None:
    group = typer.main.get_command(app)
    assert list(group.commands) == ["scan", "run", "figure", "report", "behave", "defend", "fetch", "study", "detect"]  # type: ignore[attr-defined]
    assert list(group.commands["detect"].commands) == ["train", "score", "eval"]  # type: ignore[attr-defined]
