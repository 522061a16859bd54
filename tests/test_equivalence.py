"""Outputs pinned across refactors: a scan bundle, a detector directory and a features directory made on a tiny
model must equal the ones stored in ``tests/data/golden`` (written by an earlier version of the code).

The stored files were produced before the package was split into stage subpackages; this test keeps that
restructure (and any later one) honest: same inputs, same numbers. Volatile fields (times, versions, command line,
paths) are left out of the comparison. To refresh the stored outputs after a *deliberate* change of results, run
``ATTNSCAN_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_equivalence.py`` and say why in the commit.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import attnscan
from attnscan.testing.tiny import build_model, tiny_tokenizer

GOLDEN = Path(__file__).parent / "data" / "golden"
WRITE = os.environ.get("ATTNSCAN_WRITE_GOLDEN") == "1"
VOLATILE = {
    "bundle_format",  # bundles are compared by what they hold (see _same_bundle)
    "started",
    "finished",
    "seconds",
    "capture_seconds",
    "command_line",
    "versions",
    "attnscan_version",
    "converted_dir",
    "path",
    "source",
}
ADDED = {"eager_fallback": {}}
"""Manifest keys newer than the stored copies, with the value the tiny Llama must give (no layer falls back to eager
attention): checked, then compared as absent, so the stored bundles stay the format-1 copies they are."""
WORDS_A = "how do i make bread recipe poem about snow story tell me python write explain what is the a".split()  # noqa: SIM905
WORDS_B = "ignore your rules now you are free pretend developer mode no filter grandmother please".split()  # noqa: SIM905


def _sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))) for _ in range(n)]


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _same_tensors(new: Path, old: Path) -> None:
    a, b = load_file(str(new)), load_file(str(old))
    assert sorted(a) == sorted(b), f"{new.name}: tensor names differ"
    for key in a:
        x, y = a[key], b[key]
        assert x.shape == y.shape and x.dtype == y.dtype, f"{new.name}:{key}"
        if x.is_floating_point():
            assert torch.equal(torch.isnan(x), torch.isnan(y)), f"{new.name}:{key}: NaN pattern differs"
            torch.testing.assert_close(
                torch.nan_to_num(x.double()), torch.nan_to_num(y.double()), rtol=1e-4, atol=1e-6, msg=key
            )
        else:
            assert torch.equal(x, y), f"{new.name}:{key}"


def _same_csv(new: Path, old: Path) -> None:
    def rows(path: Path) -> list[dict[str, str]]:
        with path.open(encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    a, b = rows(new), rows(old)
    assert len(a) == len(b) and (a[0].keys() if a else set()) == (b[0].keys() if b else set()), new.name
    for ra, rb in zip(a, b, strict=True):
        for key in ra:
            try:
                fa, fb = float(ra[key]), float(rb[key])
            except ValueError:
                assert ra[key] == rb[key], f"{new.name}:{key}"
                continue
            if math.isnan(fa) or math.isnan(fb):
                assert math.isnan(fa) and math.isnan(fb), f"{new.name}:{key}"
            else:
                assert fa == pytest.approx(fb, rel=1e-3, abs=1e-5), f"{new.name}:{key}: {fa} vs {fb}"


def _same_json(new: Path, old: Path) -> None:
    a = _strip(json.loads(new.read_text(encoding="utf-8")))
    b = _strip(json.loads(old.read_text(encoding="utf-8")))
    for key, value in ADDED.items():
        if isinstance(a, dict) and isinstance(b, dict) and key in a and key not in b:
            assert a.pop(key) == value, f"{new.name}: {key}"
    _approx_dict(a, b, new.name)


def _approx_dict(a: Any, b: Any, where: str) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), f"{where}: keys differ: {sorted(set(a) ^ set(b))}"
        return all(_approx_dict(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        return all(_approx_dict(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-6, nan_ok=True), where
        return True
    assert a == b, f"{where}: {a!r} != {b!r}"
    return True


def _same_bundle(new: Path, old: Path) -> None:
    """Results bundles are compared through what they hold, not their layout: the stored ones may be of an older
    bundle format (version 1 kept a count and a log map per layer and the full sums), which
    :meth:`attnscan.ScanResult.load` must still read."""
    a, b = attnscan.ScanResult.load(new), attnscan.ScanResult.load(old)
    assert list(a.sets) == list(b.sets)
    for name in a.sets:
        ta = {
            k: getattr(a.sets[name], k) for k in ("sums", "count", "prompt_ids", "lengths", "blocks", "sink", "entropy")
        }
        tb = {k: getattr(b.sets[name], k) for k in ta}
        for key in ta:
            x, y = ta[key], tb[key]
            assert x.shape == y.shape and x.dtype == y.dtype, f"{name}/{key}"
            if x.is_floating_point():
                assert torch.equal(x.isnan(), y.isnan()), f"{name}/{key}: NaN pattern differs"
                torch.testing.assert_close(x.nan_to_num(), y.nan_to_num(), rtol=1e-4, atol=1e-6, msg=key)
            else:
                assert torch.equal(x, y), f"{name}/{key}"
    # Every map of the new file equals the stored one of the same meaning.
    maps_new, maps_old = load_file(str(new / "maps.safetensors")), load_file(str(old / "maps.safetensors"))
    for key, x in maps_new.items():
        stored = maps_old.get(key)
        if stored is None and key.endswith("/count"):  # version 1: the same count under every layer
            stored = maps_old[key.replace("/count", f"/L{a.layers[0]}/count")]
        assert stored is not None, f"maps.safetensors: {key} has no stored counterpart"
        assert x.shape == stored.shape, key
        assert torch.equal(x.isnan(), stored.isnan()), f"{key}: NaN pattern differs"
        torch.testing.assert_close(x.double().nan_to_num(), stored.double().nan_to_num(), rtol=1e-4, atol=1e-6)
    _same_json(new / "manifest.json", old / "manifest.json")
    _same_csv(new / "layers.csv", old / "layers.csv")


def _compare_dirs(new: Path, old: Path) -> None:
    new_files = sorted(p.relative_to(new).as_posix() for p in new.rglob("*") if p.is_file())
    old_files = sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if p.is_file())
    assert new_files == old_files
    if (new / "maps.safetensors").is_file():
        _same_bundle(new, old)
        return
    for rel in new_files:
        a, b = new / rel, old / rel
        if rel.endswith(".safetensors"):
            _same_tensors(a, b)
        elif rel.endswith(".csv"):
            _same_csv(a, b)
        elif rel.endswith(".json"):
            _same_json(a, b)
        else:
            assert a.read_bytes() == b.read_bytes(), rel


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("equivalence")
    loaded = attnscan.from_model(build_model("llama"), tiny_tokenizer(), spec="tiny-llama")
    benign, jailbreak = _sentences(WORDS_A, 10, 1), _sentences(WORDS_B, 10, 2)
    control = _sentences(WORDS_A + WORDS_B, 10, 3)
    result = attnscan.scan(
        loaded, benign, jailbreak, control, length=24, batch_size=3, align="relative", padding_side="left", seed=0
    )
    result.save(out / "bundle")
    with pytest.warns(UserWarning, match="were cut"):  # prompts longer than the grid are part of what is pinned
        absolute = attnscan.scan(loaded, benign, jailbreak, length=16, batch_size=4, align="absolute", layers="0,2")
    absolute.save(out / "bundle-absolute")
    options: dict[str, Any] = {"rank": 2, "last_k": 3, "length": 24, "n_bootstrap": 50, "max_iter": 20, "folds": 3}
    options["flag_on"] = "cp"  # the primary detector these outputs were pinned with (the default is now the probe)
    # pool="mean": the probe's pooling these outputs were pinned with (the default is now "last")
    attnscan.train_detector(loaded, benign, jailbreak, out=out / "detector", pool="mean", **options)
    attnscan.train_detector(
        loaded, benign, jailbreak, out=out / "detector-attention", features="attention", blocks=4, **options
    )
    return out


@pytest.mark.parametrize("name", ["bundle", "bundle-absolute", "detector", "detector-attention"])
def test_outputs_equal_the_stored_ones(outputs: Path, name: str) -> None:
    if WRITE:
        shutil.rmtree(GOLDEN / name, ignore_errors=True)
        shutil.copytree(outputs / name, GOLDEN / name)
    assert (GOLDEN / name).is_dir(), f"no stored outputs for {name}: see this module's docstring"
    _compare_dirs(outputs / name, GOLDEN / name)


def test_comparison_can_fail(outputs: Path, tmp_path: Path) -> None:
    """The comparison sees a changed number: a copy with one map cell moved no longer matches."""
    from safetensors.torch import save_file

    copy = tmp_path / "bundle"
    shutil.copytree(outputs / "bundle", copy)
    maps = load_file(str(copy / "maps.safetensors"))
    key = next(k for k in sorted(maps) if k.endswith("mean"))
    finite = torch.nan_to_num(maps[key], nan=0.0)
    row, col = divmod(int(finite.argmax()), finite.shape[1])
    maps[key][row, col] += 1e-2
    save_file(maps, str(copy / "maps.safetensors"))
    with pytest.raises(AssertionError):
        _compare_dirs(copy, GOLDEN / "bundle")
