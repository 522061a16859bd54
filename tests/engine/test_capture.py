"""The capture engine against an independent reference: HF eager attention, one prompt at a time."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch

from attnscan.engine.accumulate import GridCollector
from attnscan.engine.batching import run_collect
from attnscan.engine.capture import capture_attention
from attnscan.models.anatomy import attention_module, decoder_layers
from attnscan.models.loading import from_model
from attnscan.testing.tiny import BUILDERS, build_model, eager_reference, random_prompts

LENGTH = 12
# Shorter and longer than the grid (longer ones are cut to their first LENGTH tokens), and longer than the
# sliding windows (6) of the Mistral, Gemma3 and GPT-Neo models.
LENGTHS = (3, 7, 12, 15, 9, 20, 5)
TOL = 1e-5


def _capture(model: Any, seqs: list[list[int]], layers: tuple[int, ...], batch_size: int, side: str) -> Any:
    route = from_model(model, None).arch.route
    collector = GridCollector("s", layers, len(seqs), LENGTH)
    cut = [s[:LENGTH] for s in seqs]
    run_collect(model, cut, collector, route=route, pad_id=0, batch_size=batch_size, padding_side=side)  # type: ignore[arg-type]
    return collector.result()


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize(("batch_size", "side"), [(1, "right"), (3, "right"), (3, "left"), (4, "left")])
def test_mean_matches_eager_reference(arch: str, batch_size: int, side: str) -> None:
    model = build_model(arch)
    n_layers = model.config.num_hidden_layers
    layers = tuple(range(n_layers))
    seqs = random_prompts(LENGTHS)
    result = _capture(model, seqs, layers, batch_size, side)
    ref, count = eager_reference(model, seqs, layers, LENGTH)
    assert torch.equal(result.count, count)
    for layer in layers:
        mean = result.mean(layer)
        assert torch.equal(mean.isnan(), ref[layer].isnan()), f"{arch} layer {layer}: NaN pattern differs"
        err = (mean - ref[layer]).nan_to_num(0.0).abs().max().item()
        assert err < TOL, f"{arch} layer {layer}: max |capture - eager| = {err:.2e}"


@pytest.mark.parametrize("arch", ["llama", "gptj"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_bfloat16_capture_is_padding_aware(arch: str, side: str) -> None:
    """A batched capture of a bfloat16 model (the GPU set-up, run here on the CPU) matches the float32 eager
    reference of the same weights to bfloat16 precision, and its counts exactly: padding never leaks in."""
    reference = build_model(arch, seed=4)
    low = build_model(arch, seed=4).to(torch.bfloat16)
    layers = tuple(range(reference.config.num_hidden_layers))
    seqs = random_prompts(LENGTHS, seed=9)
    result = _capture(low, seqs, layers, 3, side)
    ref, count = eager_reference(reference, seqs, layers, LENGTH)
    assert torch.equal(result.count, count)
    for layer in layers:
        mean = result.mean(layer)
        assert torch.equal(mean.isnan(), ref[layer].isnan())
        err = (mean - ref[layer]).nan_to_num(0.0).abs().max().item()
        assert err < 2e-2, f"{arch} layer {layer}: bfloat16 capture off by {err:.2e}"
        # Rows still sum to one over the reached keys (no mass on pad positions).
        rows = mean.nan_to_num(0.0).sum(1)[count.sum(1) > 0]
        assert torch.allclose(rows, torch.ones_like(rows), atol=2e-2)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3", "gpt_neo"])
def test_single_chosen_layer_matches_reference(arch: str) -> None:
    """Capturing one layer (others through SDPA) gives that layer's reference map."""
    model = build_model(arch, seed=3)
    layer = model.config.num_hidden_layers - 1
    seqs = random_prompts((10, 4, 12, 8), seed=5)
    result = _capture(model, seqs, (layer,), 2, "right")
    ref, _ = eager_reference(model, seqs, [layer], LENGTH)
    assert (result.mean(layer) - ref[layer]).nan_to_num(0.0).abs().max().item() < TOL


def test_sliding_window_is_visible_in_the_map() -> None:
    """Mistral's window (6) leaves exactly-zero attention on keys more than 5 tokens behind the query."""
    model = build_model("mistral")
    seqs = random_prompts((12, 12))
    result = _capture(model, seqs, (0,), 2, "right")
    mean = result.mean(0)
    i, j = torch.tril_indices(LENGTH, LENGTH)
    far = (i - j) >= 6
    assert torch.all(mean[i[far], j[far]] == 0)
    assert torch.all(mean[i[~far], j[~far]] > 0)


class _Recorder:
    """Keeps the raw weights it is given (tests only)."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}

    def add(self, layer: int, weights: torch.Tensor) -> None:
        self.weights[layer] = weights.detach().clone()


@pytest.mark.parametrize(("chunked", "spied"), [(True, "chunked_attention"), (False, "_additive_mask")])
def test_chosen_layer_keeps_its_causal_mask(monkeypatch: pytest.MonkeyPatch, chunked: bool, spied: str) -> None:
    """Without padding transformers' SDPA mask function returns no mask at all (SDPA then relies on is_causal).

    The chosen layer must still be causal, on the chunked and on the eager path: the weights above the diagonal
    are exactly zero.
    """
    import attnscan.engine.capture as capture_mod

    seen: list[object] = []
    original = getattr(capture_mod, spied)

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[0] if spied == "_additive_mask" else args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(capture_mod, spied, spy)
    model = build_model("llama")
    rec = _Recorder()
    with torch.inference_mode(), capture_attention(model, [1], rec, "interface", chunked=chunked):
        model.base_model(input_ids=torch.tensor(random_prompts((9,))), use_cache=False)
    assert seen and seen[0] is None, "the trap this test guards against is no longer live"
    w = rec.weights[1][0]  # [heads, q, k] (one head: the head mean, on the chunked path)
    assert w.shape[0] == (1 if chunked else model.config.num_attention_heads)
    upper = torch.triu(torch.ones(9, 9, dtype=torch.bool), diagonal=1)
    assert torch.all(w[:, upper] == 0)
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6)


def test_counts_are_zero_above_diagonal_and_beyond_length() -> None:
    model = build_model("llama")
    result = _capture(model, random_prompts((4, 7)), (0,), 2, "left")
    count = result.count
    assert torch.all(torch.triu(count, diagonal=1) == 0)
    assert torch.all(count[7:] == 0)
    assert count[6, 0] == 1 and count[3, 3] == 2 and count[4, 4] == 1
    assert torch.isnan(result.mean(0)[8, 2])


class _WeakCollector:
    """Checks that no earlier layer's weight tensor is alive when the next one arrives."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[torch.Tensor]] = []
        self.max_alive = 0

    def add(self, layer: int, weights: torch.Tensor) -> None:
        gc.collect()
        alive = sum(1 for r in self.refs if r() is not None)
        self.max_alive = max(self.max_alive, alive)
        self.refs.append(weakref.ref(weights))


@pytest.mark.parametrize("arch", ["llama", "gpt_neo", "gemma3"])
def test_only_one_layer_of_weights_alive_at_a_time(arch: str) -> None:
    model = build_model(arch)
    col = _WeakCollector()
    layers = list(range(model.config.num_hidden_layers))
    route = from_model(model, None).arch.route
    with torch.inference_mode(), capture_attention(model, layers, col, route):
        model.base_model(input_ids=torch.tensor(random_prompts((10, 10))), use_cache=False)
    assert len(col.refs) == len(layers)
    assert col.max_alive == 0
    gc.collect()
    assert all(r() is None for r in col.refs)


def test_accumulator_size_does_not_grow_with_prompts() -> None:
    model = build_model("llama")
    small = _capture(model, random_prompts((5, 6)), (0, 1), 2, "right")
    large = _capture(model, random_prompts((5, 6, 7, 8, 9, 10, 11, 12) * 3), (0, 1), 2, "right")
    assert small.sums.shape == large.sums.shape and small.count.shape == large.count.shape
    assert small.sums.nbytes == large.sums.nbytes
    per_prompt = large.blocks[0].nbytes + large.sink[0].nbytes + large.entropy[0].nbytes + 8
    assert per_prompt < 2 * 16 * 16 * 4 + 64  # a few KB per prompt, never T x T


class _Boom(Exception):
    pass


class _FailingCollector:
    def add(self, layer: int, weights: torch.Tensor) -> None:
        if layer == 1:
            raise _Boom


@pytest.mark.parametrize("arch", ["llama", "gpt_neo"])
def test_registrations_and_hooks_are_undone_after_an_exception(arch: str) -> None:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    model = build_model(arch)
    ids = torch.tensor(random_prompts((8,)))
    with torch.no_grad():
        before = model(ids).logits
    impl = model.config._attn_implementation
    keys = set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)
    route = from_model(model, None).arch.route
    with pytest.raises(_Boom), torch.no_grad(), capture_attention(model, [0, 1], _FailingCollector(), route):
        model.base_model(input_ids=ids, use_cache=False)
    assert model.config._attn_implementation == impl
    assert (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)) == keys
    for layer in decoder_layers(model):
        assert not attention_module(layer)._forward_hooks
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)


def test_capture_leaves_model_outputs_unchanged() -> None:
    """Hidden states under capture equal a plain SDPA forward (the chosen layers' eager output feeds on)."""
    model = build_model("llama")
    ids = torch.tensor(random_prompts((11, 11)))
    with torch.no_grad():
        plain = model.base_model(input_ids=ids).last_hidden_state
        with capture_attention(model, [0, 1, 2], _Recorder(), "interface"):
            captured = model.base_model(input_ids=ids).last_hidden_state
    assert torch.allclose(plain, captured, atol=1e-5)
