"""ScanResult, the results bundle on disk, merging shards, atomic writes."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnscan import AttnscanError, ScanResult
from attnscan.engine.accumulate import GridCollector, SetAccumulator
from attnscan.engine.batching import run_collect
from attnscan.testing.tiny import build_model, random_prompts

T = 10


def _acc(
    name: str, seqs: list[list[int]], ids: list[int] | None = None, layers: tuple[int, ...] = (0, 2)
) -> SetAccumulator:
    model = build_model("llama")
    n = len(ids) if ids is not None else len(seqs)
    total = max(ids) + 1 if ids is not None else n
    col = GridCollector(name, layers, total, T, n_blocks=5)
    run_collect(model, seqs, col, route="interface", pad_id=0, batch_size=2, prompt_ids=ids)
    return col.result()


@pytest.fixture(scope="module")
def result() -> ScanResult:
    benign = _acc("benign", random_prompts((4, 8, 10, 6), seed=1))
    jail = _acc("jailbreak", random_prompts((10, 9, 3), seed=2))
    return ScanResult({"benign": benign, "jailbreak": jail}, {"note": "test"})


def test_maps_follow_the_bundle_contract(result: ScanResult, tmp_path: Path) -> None:
    out = result.save(tmp_path / "bundle")
    maps = load_file(str(out / "maps.safetensors"))
    for s in ("benign", "jailbreak"):
        for layer in (0, 2):
            mean, count, log = (maps[f"{s}/L{layer}/{k}"] for k in ("mean", "count", "log"))
            assert mean.dtype == torch.float32 and count.dtype == torch.int32 and log.dtype == torch.float32
            assert mean.shape == (T, T)
            assert torch.equal(mean.isnan(), count == 0) and torch.equal(log.isnan(), count == 0)
            assert torch.all(torch.triu(count, 1) == 0)
            ok = count > 0
            expected = torch.log(mean[ok].double()).clamp_min(-10.0).float()
            assert torch.allclose(log[ok], expected, atol=1e-6)
            assert log[ok].min() >= -10.0 and log[ok].max() <= 0.0
        diff = maps["diff/L2"]
        both = ~maps["benign/L2/log"].isnan() & ~maps["jailbreak/L2/log"].isnan()
        assert torch.equal(~diff.isnan(), both)
        assert torch.allclose(diff[both], (maps["jailbreak/L2/log"] - maps["benign/L2/log"])[both], atol=1e-6)
    # Rows of the mean map sum to 1 wherever every contributing prompt reaches the whole row.
    m = maps["benign/L0/mean"]
    assert math.isclose(float(m[3, :4].sum()), 1.0, rel_tol=1e-5)


def test_bundle_files_and_manifest(result: ScanResult, tmp_path: Path) -> None:
    out = result.save(tmp_path / "b")
    assert {p.name for p in out.iterdir()} == {
        "manifest.json",
        "maps.safetensors",
        "accumulators.safetensors",
        "layers.csv",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"] == [0, 2] and manifest["length"] == T and manifest["floor"] == -10.0
    with (out / "layers.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["layer"]) for r in rows] == [0, 2]
    assert {"mean_diff", "mean_abs_diff", "frac_pos", "p_signed", "q_signed", "ci_low", "verdict"} <= set(rows[0])
    assert rows[0]["verdict"] in ("vulnerable", "mixed", "resilient", "no significant shift")
    assert not list(tmp_path.glob(".*")), "temporary directories were left behind"


def test_round_trip(result: ScanResult, tmp_path: Path) -> None:
    back = ScanResult.load(result.save(tmp_path / "rt"))
    for name, acc in result.sets.items():
        other = back.sets[name]
        for key in ("sums", "count", "prompt_ids", "lengths", "blocks", "sink", "entropy"):
            assert torch.equal(getattr(acc, key).nan_to_num(7.0), getattr(other, key).nan_to_num(7.0)), key
    assert back.manifest["note"] == "test"
    assert torch.equal(back.diff(2).nan_to_num(0), result.diff(2).nan_to_num(0))


def test_shards_merge_to_the_full_run() -> None:
    seqs = random_prompts((4, 8, 10, 6, 9, 2), seed=4)
    full = _acc("benign", seqs)
    a = _acc("benign", seqs[:2], ids=[0, 1])
    b = _acc("benign", seqs[2:], ids=[2, 3, 4, 5])
    merged = b.merge(a)
    assert torch.allclose(merged.sums, full.sums, atol=1e-12)
    assert torch.equal(merged.count, full.count) and torch.equal(merged.prompt_ids, full.prompt_ids)
    for key in ("lengths", "blocks", "sink", "entropy"):
        assert torch.allclose(getattr(merged, key), getattr(full, key), atol=1e-6, equal_nan=True), key
    with pytest.raises(AttnscanError, match="share prompts"):
        merged.merge(a)


def test_summaries_agree_with_the_maps() -> None:
    """A single prompt's block means are the block means of its own floored log map."""
    seqs = random_prompts((10,), seed=9)
    acc = _acc("benign", seqs, layers=(1,))
    mean = acc.mean(1)
    logmap = torch.log(mean.clamp_min(math.exp(-10.0)))
    block = logmap[2:4, 0:2]  # block (1, 0) with block size 2: rows 2-3, keys 0-1, all causal
    assert math.isclose(float(acc.blocks[0, 0, 1, 0]), float(block.mean()), rel_tol=1e-5)
    assert math.isnan(float(acc.blocks[0, 0, 0, 1]))  # entirely above the diagonal
    assert math.isclose(float(acc.sink[0, 0]), float(mean[:, 0].mean()), rel_tol=1e-5)
    p = mean.nan_to_num(0.0)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(1).mean()
    assert math.isclose(float(acc.entropy[0, 0]), float(ent), rel_tol=1e-5)


def test_existing_bundle_is_refused_without_overwrite(result: ScanResult, tmp_path: Path) -> None:
    out = result.save(tmp_path / "x")
    stamp = (out / "maps.safetensors").stat().st_mtime_ns
    with pytest.raises(AttnscanError, match="--overwrite"):
        result.save(out)
    assert (out / "maps.safetensors").stat().st_mtime_ns == stamp
    result.save(out, overwrite=True)
    assert ScanResult.load(out).layers == (0, 2)


def test_foreign_directory_is_never_replaced(result: ScanResult, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(AttnscanError, match="not empty"):
        result.save(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_failed_write_leaves_nothing(result: ScanResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import attnscan.analysis.result as result_mod

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(result_mod, "write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "deep" / "er" / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_non_bundles(tmp_path: Path) -> None:
    with pytest.raises(AttnscanError, match="not an attnscan results bundle"):
        ScanResult.load(tmp_path)
