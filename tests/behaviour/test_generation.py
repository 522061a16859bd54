"""Batched greedy generation: deterministic, batch-invariant, equal to unbatched model.generate."""

from __future__ import annotations

import pytest
import torch

from attnscan.behaviour.generation import generate
from attnscan.errors import AttnscanError
from attnscan.models.loading import LoadedModel, from_model
from attnscan.prompts.encoding import encode
from attnscan.testing.tiny import build_model, tiny_tokenizer

TEXTS = [
    "how do i make bread",
    "tell me a story about the snow and a poem please step by step",
    "hi",
    "write python to kill a process now please",
    "what is this",
]


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return from_model(build_model("llama"), tiny_tokenizer(), spec="tiny-llama")


# --------------------------------------------------------------------------------------------------- generation


def test_generate_deterministic_and_batch_invariant(llama: LoadedModel) -> None:
    one = generate(llama, TEXTS, max_new_tokens=6, batch_size=1)
    three = generate(llama, TEXTS, max_new_tokens=6, batch_size=3)
    again = generate(llama, TEXTS, max_new_tokens=6, batch_size=3)
    assert one == three == again
    assert all(isinstance(r, str) for r in one) and any(one)
    # against unbatched model.generate on the same encoding
    model, tok = llama.model, llama.tokenizer
    enc = encode(tok, TEXTS, 2048)
    with torch.no_grad():
        for ids, response in zip(enc.ids, one, strict=True):
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=1)
            assert tok.decode(out[0, len(ids) :], skip_special_tokens=True).strip() == response


def test_generate_left_padding_on_gpt2() -> None:
    loaded = from_model(build_model("gpt2"), tiny_tokenizer(), spec="tiny-gpt2")
    assert generate(loaded, TEXTS, max_new_tokens=5, batch_size=1) == generate(
        loaded, TEXTS, max_new_tokens=5, batch_size=5
    )


def test_generate_bad_input(llama: LoadedModel) -> None:
    with pytest.raises(AttnscanError, match="no prompts"):
        generate(llama, [])
    with pytest.raises(AttnscanError, match="max_new_tokens"):
        generate(llama, TEXTS, max_new_tokens=0)
