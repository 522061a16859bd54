"""Shared fixtures over :mod:`attnscan.testing.tiny` (tiny random-weight models, the offline tokenizer, the eager
reference)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from attnscan.testing.tiny import build_model, tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def attnscan_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted-GGUF cache for the whole session, away from the user's own cache."""
    path = tmp_path_factory.mktemp("attnscan-cache")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(attnscan_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNSCAN_CACHE", str(attnscan_cache))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_pretrained directory (safetensors) holding a tiny Llama and the tiny tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_model("llama")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_pretrained directory holding a tiny random sequence classifier (labels complied / refused) and the
    tiny tokenizer: a refusal judge for ``--judge``."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=2,
        id2label={0: "complied", 1: "refused"},
        label2id={"complied": 0, "refused": 1},
        pad_token_id=1,
    )
    path = tmp_path_factory.mktemp("judge")
    LlamaForSequenceClassification(cfg).eval().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
