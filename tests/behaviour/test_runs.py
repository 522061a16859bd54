"""What behave and defend share: JSONL response records, the run description, one progress stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnscan.behaviour.runs import load_jsonl, save_jsonl
from attnscan.errors import AttnscanError

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
