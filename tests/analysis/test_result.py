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
    expected_keys = {f"{s}/count" for s in ("benign", "jailbreak")}
    expected_keys |= {f"{s}/L{layer}/mean" for s in ("benign", "jailbreak") for layer in (0, 2)}
    assert set(maps) == expected_keys | {"diff/L0", "diff/L2"}
    logs = {}
    for s in ("benign", "jailbreak"):
        count = maps[f"{s}/count"]
        assert count.dtype == torch.int32 and count.shape == (T, T)
        assert torch.equal(count.long(), result.count(s))
        assert torch.all(torch.triu(count, 1) == 0)
        for layer in (0, 2):
            mean = maps[f"{s}/L{layer}/mean"]
            assert mean.dtype == torch.float32 and mean.shape == (T, T)
            assert torch.equal(mean.isnan(), count == 0)
            # The log map a notebook derives from the stored mean is the one the statistics use.
            log = torch.log(mean.double().clamp_min(math.exp(-10.0))).where(count > 0, float("nan"))
            assert torch.allclose(log, result.log(s, layer), atol=1e-6, equal_nan=True)
            logs[s, layer] = log
    for layer in (0, 2):
        diff = maps[f"diff/L{layer}"]
        expected = logs["jailbreak", layer] - logs["benign", layer]
        assert torch.equal(diff.isnan(), expected.isnan())
        assert torch.allclose(diff.double(), expected, atol=1e-5, equal_nan=True)
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
    assert manifest["bundle_format"] == 2
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


def _relative(name: str, seqs: list[list[int]], ids: list[int] | None = None) -> SetAccumulator:
    model = build_model("llama")
    total = max(ids) + 1 if ids is not None else len(seqs)
    col = GridCollector(name, (0, 1), total, T, n_blocks=5, align="relative")
    run_collect(model, seqs, col, route="interface", pad_id=0, batch_size=2, prompt_ids=ids, padding_side="left")
    return col.result()


def _same_accumulators(a: SetAccumulator, b: SetAccumulator) -> None:
    for key in ("sums", "count", "prompt_ids", "lengths", "blocks", "sink", "entropy"):
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype and torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)), key


def test_compact_accumulators_are_lossless_with_cells_right_of_the_diagonal(tmp_path: Path) -> None:
    """Relative alignment reaches cells just right of the diagonal (a short prompt's diagonal token spans several
    columns): the compact file keeps them, and a loaded shard merges bit for bit like the one in memory."""
    seqs = random_prompts((3, 4, 10, 6, 2, 9), seed=6)
    a, b = _relative("benign", seqs[:3], ids=[0, 1, 2]), _relative("benign", seqs[3:], ids=[3, 4, 5])
    assert torch.triu(a.count, 1).any(), "the case this test is about (cells right of the diagonal) is not present"
    back_a = ScanResult.load(ScanResult({"benign": a}).save(tmp_path / "a")).sets["benign"]
    back_b = ScanResult.load(ScanResult({"benign": b}).save(tmp_path / "b")).sets["benign"]
    _same_accumulators(back_a, a)
    _same_accumulators(back_a.merge(back_b), a.merge(b))
    stored = load_file(str(tmp_path / "a" / "accumulators.safetensors"))
    assert stored["benign/sums"].shape == (2, int((a.count > 0).sum()))


def test_hand_made_sums_outside_the_reached_cells_survive(tmp_path: Path) -> None:
    acc = _acc("benign", random_prompts((4, 6), seed=3))
    acc.sums[1, 0, T - 1] = 0.25  # above the diagonal, where no prompt reaches
    back = ScanResult.load(ScanResult({"benign": acc}).save(tmp_path / "x")).sets["benign"]
    _same_accumulators(back, acc)


def _write_version_1(result: ScanResult, out: Path) -> None:
    """The bundle layout of attnscan before the compact format: full sums and counts, a count and a log map per
    layer."""
    from safetensors.torch import save_file

    out.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    maps: dict[str, torch.Tensor] = {}
    for name, acc in result.sets.items():
        tensors.update({f"{name}/{k}": getattr(acc, k).contiguous() for k in ("sums", "count", "prompt_ids")})
        tensors.update({f"{name}/{k}": getattr(acc, k).contiguous() for k in ("lengths", "blocks", "sink", "entropy")})
        for layer in result.layers:
            maps[f"{name}/L{layer}/mean"] = result.mean(name, layer).float()
            maps[f"{name}/L{layer}/count"] = acc.count.to(torch.int32)
            maps[f"{name}/L{layer}/log"] = result.log(name, layer).float()
    maps.update({f"diff/L{layer}": result.diff(layer).float() for layer in result.layers})
    save_file(tensors, str(out / "accumulators.safetensors"))
    save_file(maps, str(out / "maps.safetensors"))
    manifest = {"bundle_format": 1, "length": T, "layers": list(result.layers), "floor": -10.0}
    manifest["sets_order"] = list(result.sets)
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_version_1_bundles_are_read_and_the_new_format_is_smaller(result: ScanResult, tmp_path: Path) -> None:
    _write_version_1(result, tmp_path / "v1")
    old = ScanResult.load(tmp_path / "v1")
    for name, acc in result.sets.items():
        _same_accumulators(old.sets[name], acc)
    new = result.save(tmp_path / "v2")
    old_maps, new_maps = (load_file(str(p / "maps.safetensors")) for p in (tmp_path / "v1", new))
    assert sum(t.nbytes for t in new_maps.values()) <= 0.6 * sum(t.nbytes for t in old_maps.values())
    old_acc, new_acc = (load_file(str(p / "accumulators.safetensors")) for p in (tmp_path / "v1", new))
    for name in result.sets:  # the sums keep the reached cells only: at most the lower triangle with its diagonal
        assert new_acc[f"{name}/sums"].numel() <= (T + 1) / (2 * T) * old_acc[f"{name}/sums"].numel()
    resaved = ScanResult.load(old.save(tmp_path / "again"))
    assert resaved.manifest["bundle_format"] == 2
    for name, acc in result.sets.items():
        _same_accumulators(resaved.sets[name], acc)


def test_bundles_of_a_newer_format_are_refused(result: ScanResult, tmp_path: Path) -> None:
    out = result.save(tmp_path / "b")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "bundle_format": 3}))
    with pytest.raises(AttnscanError, match=r"format 3.*upgrade attnscan"):
        ScanResult.load(out)
