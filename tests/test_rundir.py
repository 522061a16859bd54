"""Reading run directories and bundles back: labels of loaded bundles, stored tables, the --rows choice, and the
prompt texts and tokens reloaded for the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from attnscan import AttnscanError, ScanResult
from attnscan.engine.accumulate import SetAccumulator
from attnscan.rundir import (
    DETECTOR_DIR,
    load_bundles,
    parse_rows,
    prefix_tokens,
    prompts_from_manifest,
    stored_detection,
    stored_table,
)


def _result(manifest: dict[str, Any], t: int = 8, n: int = 6) -> ScanResult:
    """A scan result of random causal maps with ``n`` benign and ``n`` jailbreak prompts (the statistics need a
    few of each)."""
    gen = torch.Generator().manual_seed(0)
    tri = torch.tril(torch.ones(t, t, dtype=torch.float64))
    sets = {
        name: SetAccumulator(
            name=name,
            layers=(0, 1),
            length=t,
            floor=-10.0,
            sums=torch.rand(2, t, t, generator=gen, dtype=torch.float64) * tri * n,
            count=(tri * n).to(torch.int64),
            prompt_ids=torch.arange(n),
            lengths=torch.full((n,), t),
            blocks=torch.randn(n, 2, 2, 2, generator=gen) + s,
            sink=torch.zeros(n, 2),
            entropy=torch.zeros(n, 2),
        )
        for s, name in enumerate(("benign", "jailbreak"))
    }
    return ScanResult(sets, manifest)


def test_prompts_from_manifest_reloads_matching_builtin_sets() -> None:
    from attnscan.prompts.sets import load_prompts

    benign = load_prompts("builtin:benign", "benign", limit=4, seed=3)
    manifest = {
        "prompt_sets": {
            "benign": {**benign.provenance(), "limit": 4, "seed": 3},
            "jailbreak": {"source": "builtin:benign", "sha256": "0" * 64, "limit": 4, "seed": 3},
            "control": {"source": "hf:some/dataset:train:text", "sha256": "0" * 64},
        }
    }
    result = _result(manifest)
    assert prompts_from_manifest(result) == {"benign": list(benign.texts)}


def test_prefix_tokens_is_the_shared_chat_template_prefix(tokenizer: Any) -> None:
    tokens = prefix_tokens(tokenizer, ["how do i make bread", "how to kill a python process"], length=64)
    assert tokens == ["<|user|>", "how"]
    assert prefix_tokens(tokenizer, ["tell me a story"], length=64)[-1] == "<|assistant|>"
    assert prefix_tokens(tokenizer, []) == []


def test_parse_rows() -> None:
    assert parse_rows(" auto ", ["a"]) is None
    assert parse_rows("a:3, b:0", ["a", "b"]) == [("a", 3), ("b", 0)]
    assert parse_rows("7", ["only"]) == [("only", 7)]
    assert parse_rows("org/m:1", ["org/m"]) == [("org/m", 1)]
    with pytest.raises(AttnscanError, match="names no model"):
        parse_rows("7", ["a", "b"])
    with pytest.raises(AttnscanError, match="unknown model 'c'"):
        parse_rows("c:1", ["a", "b"])
    with pytest.raises(AttnscanError, match="layer must be a number"):
        parse_rows("a:x", ["a"])
    with pytest.raises(AttnscanError, match="--rows is empty"):
        parse_rows(" , ", ["a"])


def test_load_bundles_labels_each_bundle_and_reads_stored_tables(tmp_path: Path) -> None:
    result = _result({"model": {"spec": "org/Tiny-Model"}})
    result.save(tmp_path / "one")
    result.save(tmp_path / "two")
    loaded = load_bundles([tmp_path / "one", tmp_path / "two"])
    assert list(loaded) == ["Tiny-Model", "Tiny-Model-2"]
    table = stored_table(loaded["Tiny-Model"])
    assert list(table["layer"]) == [0, 1] and "verdict" in table.columns
    assert stored_detection(loaded["Tiny-Model"]) is None
    (tmp_path / "one" / DETECTOR_DIR).mkdir()
    (tmp_path / "one" / DETECTOR_DIR / "detection.csv").write_text("layer,cp_auroc\n0,0.5\n1,0.75\n")
    assert list(stored_detection(loaded["Tiny-Model"])["cp_auroc"]) == [0.5, 0.75]
    assert stored_detection(result) is None  # not saved: no path
    with pytest.raises(AttnscanError, match="neither a results bundle nor a run directory"):
        load_bundles([tmp_path])
    with pytest.raises(AttnscanError, match="no results bundles"):
        load_bundles([])
