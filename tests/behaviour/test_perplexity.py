"""Perplexity: token-weighted model loss, LM head on chunks, final logit soft-capping."""

from __future__ import annotations

import math

import pytest
import torch

from attnscan.behaviour.perplexity import nll_sum, perplexity
from attnscan.models.loading import from_model
from attnscan.testing.tiny import VOCAB, build_model, tiny_tokenizer

TEXTS = [
    "how do i make bread",
    "tell me a story about the snow and a poem please step by step",
    "hi",
    "write python to kill a process now please",
]


# --------------------------------------------------------------------------------------------------- perplexity


def test_perplexity_of_uniform_model_is_vocab_size() -> None:
    model = build_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    loaded = from_model(model, tiny_tokenizer())
    assert perplexity(loaded, TEXTS, batch_size=3, chunk_tokens=5) == pytest.approx(VOCAB, rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_is_token_weighted_model_loss(arch: str) -> None:
    loaded = from_model(build_model(arch), tiny_tokenizer())
    tok = loaded.tokenizer
    total, count = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tok(text)["input_ids"]])
            if ids.shape[1] < 2:
                continue
            loss = loaded.model(ids, labels=ids, use_cache=False).loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    got_total, got_count = nll_sum(loaded, TEXTS, batch_size=3, chunk_tokens=4)
    assert got_count == count
    assert got_total == pytest.approx(total, rel=1e-5)
    assert perplexity(loaded, TEXTS, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_applies_final_softcapping() -> None:
    model = build_model("gemma3", final_logit_softcapping=0.5)
    loaded = from_model(model, tiny_tokenizer())
    ids = torch.tensor([loaded.tokenizer(TEXTS[1])["input_ids"]])
    with torch.no_grad():
        loss = float(model(ids, labels=ids, use_cache=False).loss)
    assert perplexity(loaded, TEXTS[1:2]) == pytest.approx(math.exp(loss), rel=1e-5)
