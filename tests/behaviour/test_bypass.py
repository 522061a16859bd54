"""Layer bypass against hand-written forwards; hooks removed on exit, also after an error."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attnscan.behaviour.bypass import bypass_layers
from attnscan.errors import AttnscanError
from attnscan.models.anatomy import decoder_layers
from attnscan.models.loading import LoadedModel, from_model
from attnscan.testing.tiny import build_model, random_prompts, tiny_tokenizer


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return from_model(build_model("llama"), tiny_tokenizer(), spec="tiny-llama")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.tensor(random_prompts([11], seed=3))


def _causal(p: int) -> torch.Tensor:
    """Additive causal mask ``[1, 1, P, P]``: 0 on and below the diagonal, -inf-like above."""
    upper = torch.triu(torch.ones(p, p, dtype=torch.bool), diagonal=1)
    return torch.zeros(p, p).masked_fill(upper, torch.finfo(torch.float32).min)[None, None]


def llama_without(model: Any, ids: torch.Tensor, skip: set[int]) -> torch.Tensor:
    """Llama by hand: embed_tokens → rotary embeddings → kept decoder layers → final norm → lm_head."""
    core = model.model
    pos = torch.arange(ids.shape[1])[None]
    h = core.embed_tokens(ids)
    cos_sin = core.rotary_emb(h, position_ids=pos)
    mask = _causal(ids.shape[1])
    for i, layer in enumerate(core.layers):
        if i in skip:
            continue
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin, use_cache=False)
    logits: torch.Tensor = model.lm_head(core.norm(h))
    return logits


def gpt2_without(model: Any, ids: torch.Tensor, skip: set[int]) -> torch.Tensor:
    """GPT-2 by hand: token + position embeddings → kept blocks → ln_f → lm_head."""
    core = model.transformer
    h = core.wte(ids) + core.wpe(torch.arange(ids.shape[1])[None])
    mask = _causal(ids.shape[1])
    for i, block in enumerate(core.h):
        if i in skip:
            continue
        out = block(h, attention_mask=mask, use_cache=False)
        h = out[0] if isinstance(out, tuple) else out
    logits: torch.Tensor = model.lm_head(core.ln_f(h))
    return logits


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(ids, use_cache=False).logits
    return out


@pytest.mark.parametrize(("arch", "by_hand"), [("llama", llama_without), ("gpt2", gpt2_without)])
def test_bypass_matches_hand_written_forward(arch: str, by_hand: Any, ids: torch.Tensor) -> None:
    model = build_model(arch)
    plain = _logits(model, ids)
    with bypass_layers(model, []) as chosen:
        assert chosen == ()
        assert torch.equal(_logits(model, ids), plain)
    with torch.no_grad():
        torch.testing.assert_close(by_hand(model, ids, set()), plain, atol=1e-5, rtol=0)
        expected = by_hand(model, ids, {1})
    with bypass_layers(model, [1]) as chosen:
        assert chosen == (1,)
        skipped = _logits(model, ids)
    torch.testing.assert_close(skipped, expected, atol=1e-5, rtol=0)
    assert (skipped - plain).abs().max() > 1e-3, "bypassing a layer must change the output"
    assert torch.equal(_logits(model, ids), plain), "the model must be restored on exit"


def test_bypass_several_layers_and_negative_index(ids: torch.Tensor) -> None:
    model = build_model("llama")
    with torch.no_grad():
        expected = llama_without(model, ids, {0, 2})
    with bypass_layers(model, "0,-1") as chosen:
        assert chosen == (0, 2)
        torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)


def test_bypass_restores_after_exception(llama: LoadedModel, ids: torch.Tensor) -> None:
    stack = decoder_layers(llama.model)
    before = [dict(layer._forward_hooks) for layer in stack]
    with pytest.raises(RuntimeError, match="inside"), bypass_layers(llama, [0, 1]):
        raise RuntimeError("inside")
    assert [dict(layer._forward_hooks) for layer in stack] == before

    def fail(module: Any, args: Any, output: Any) -> None:
        raise ValueError("forward failed")

    handle = stack[2].register_forward_hook(fail)
    try:
        with pytest.raises(ValueError, match="forward failed"), bypass_layers(llama, [1]):
            _logits(llama.model, ids)
    finally:
        handle.remove()
    assert [dict(layer._forward_hooks) for layer in stack] == before


def test_bypass_tuple_outputs() -> None:
    class Layer(torch.nn.Module):
        def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, str]:
            return hidden_states * 2, "extra"

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"num_hidden_layers": 2})()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

    toy = Toy()
    x = torch.ones(1, 2, 3)
    with bypass_layers(toy, [0]):
        out = toy.layers[0](x)
        assert out[0] is x and out[1] == "extra"
        assert torch.equal(toy.layers[1](hidden_states=x)[0], 2 * x)
    assert torch.equal(toy.layers[0](x)[0], 2 * x)


def test_bypass_bad_layer(llama: LoadedModel) -> None:
    with pytest.raises(AttnscanError, match="layer 5 out of range: model has 3 layers"):
        with bypass_layers(llama, [5]):
            pass
