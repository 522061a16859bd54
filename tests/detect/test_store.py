"""Detector files: save and load per-layer detectors (no model); the output table writer and prompt previews."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from planted import LAYERS, PLANTED, K

from attnscan.detect.detectors import CPDetector, ProbeDetector, fit_detectors
from attnscan.detect.store import load_detector, preview, save_detector, write_table
from attnscan.errors import AttnscanError

# ------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_without_pickle(features: Any, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    tensors, pooled, y = features
    dets: dict[int, Any] = dict(fit_detectors(tensors, y, lambda: CPDetector(rank=4)))
    dets[10] = ProbeDetector().fit(pooled[PLANTED], y)
    target = tmp_path / "det"
    save_detector(target, dets, {"model": "synthetic", "layers": [0, 1, 2, 3]})

    assert sorted(p.name for p in target.iterdir()) == ["detector.json", "detector.safetensors"]
    assert all(p.suffix in (".json", ".safetensors") for p in target.rglob("*"))
    assert [p.name for p in tmp_path.iterdir()] == ["det"]  # no temporary directory left behind
    stored = load_file(str(target / "detector.safetensors"))
    assert "L2/token_factors" in stored and stored["L2/token_factors"].shape == (K, 4)
    assert json.loads((target / "detector.json").read_text())["format"] == "attnscan.detector"

    loaded, meta = load_detector(target)
    assert meta == {"model": "synthetic", "layers": [0, 1, 2, 3]}
    assert sorted(loaded) == [0, 1, 2, 3, 10]
    for layer in range(LAYERS):
        assert isinstance(loaded[layer], CPDetector)
        np.testing.assert_array_equal(
            loaded[layer].predict_proba(tensors[layer]), dets[layer].predict_proba(tensors[layer])
        )
    assert isinstance(loaded[10], ProbeDetector)
    np.testing.assert_array_equal(loaded[10].predict_proba(pooled[PLANTED]), dets[10].predict_proba(pooled[PLANTED]))


def test_save_refuses_existing_target_unless_overwrite(features: Any, tmp_path: Path) -> None:
    _, pooled, y = features
    det = ProbeDetector().fit(pooled[0], y)
    target = tmp_path / "det"
    save_detector(target, {0: det})
    with pytest.raises(AttnscanError, match="overwrite"):
        save_detector(target, {0: det})
    other = ProbeDetector(C=0.01).fit(pooled[0], y)
    save_detector(target, {0: other}, overwrite=True)
    loaded, _ = load_detector(target)
    np.testing.assert_array_equal(loaded[0].predict_proba(pooled[0]), other.predict_proba(pooled[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(AttnscanError, match="holds no attnscan detector"):
        save_detector(foreign, {0: det}, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(AttnscanError, match="not fitted"):
        save_detector(tmp_path / "unfitted", {0: ProbeDetector()})
    assert not (tmp_path / "unfitted").exists()
    with pytest.raises(AttnscanError, match="not a detector directory"):
        load_detector(foreign)


def test_load_rejects_damaged_files(features: Any, tmp_path: Path) -> None:
    _, pooled, y = features
    target = tmp_path / "det"
    save_detector(target, {0: ProbeDetector().fit(pooled[0], y)})
    (target / "detector.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AttnscanError, match="cannot be read as safetensors"):
        load_detector(target)
    doc = {"format": "attnscan.detector", "format_version": 99, "layers": [], "meta": {}}
    (target / "detector.json").write_text(json.dumps(doc))
    with pytest.raises(AttnscanError, match="format version 99"):
        load_detector(target)


def test_preview_is_one_safe_line() -> None:
    assert preview("  how\tdo\n\ni  ") == "how do i"
    assert preview("bell\x07 and \u202e") == "bell\\u0007 and \\u202e"
    assert preview("=HYPERLINK(x)") == "'=HYPERLINK(x)"
    long = preview("a" * 100, width=10)
    assert long == "a" * 9 + "…"


def test_write_table_is_atomic_and_refuses_existing(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1, 2]})
    path = write_table(frame, tmp_path / "sub" / "t.csv")
    assert path.read_text().splitlines() == ["a", "1", "2"]
    with pytest.raises(AttnscanError, match="already exists: pass --overwrite"):
        write_table(pd.DataFrame({"b": [3]}), path)
    write_table(pd.DataFrame({"b": [3]}), path, overwrite=True)
    assert path.read_text().splitlines() == ["b", "3"]
    with pytest.raises(AttnscanError, match="is a directory"):
        write_table(frame, tmp_path)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir() if p.name.startswith(".")) == []
