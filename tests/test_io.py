"""read_format_json: the one check of attnscan's tagged JSON files (detectors, features)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnscan._io import read_format_json
from attnscan.engine.features import FORMAT, FORMAT_VERSION, read_meta
from attnscan.errors import AttnscanError


def _write(path: Path, body: object) -> Path:
    path.write_text(body if isinstance(body, str) else json.dumps(body), encoding="utf-8")
    return path


def test_a_tagged_document_is_returned(tmp_path: Path) -> None:
    doc = {"format": "x.thing", "format_version": 2, "a": 1}
    assert read_format_json(_write(tmp_path / "t.json", doc), "x.thing", 2, "thing", "redo it") == doc


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("{oops", "is not valid JSON"),
        ([1, 2], "is not an attnscan thing file"),
        ({"format": "other", "format_version": 2}, "is not an attnscan thing file"),
        (
            {"format": "x.thing", "format_version": 1},
            "has thing format version 1; this attnscan reads version 2: redo it",
        ),
    ],
)
def test_damaged_or_other_documents_are_one_line_errors(tmp_path: Path, body: object, words: str) -> None:
    path = _write(tmp_path / "t.json", body)
    with pytest.raises(AttnscanError, match=words) as info:
        read_format_json(path, "x.thing", 2, "thing", "redo it")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_features_directories_use_it(tmp_path: Path) -> None:
    with pytest.raises(AttnscanError, match="is not a features directory"):
        read_meta(tmp_path)
    _write(tmp_path / "features.json", {"format": FORMAT, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(AttnscanError, match="extract the features again"):
        read_meta(tmp_path)
