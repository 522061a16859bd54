"""Architecture presets: published dimensions, parameter counts, and capture on scaled-down models of each."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from attnscan.engine.accumulate import GridCollector
from attnscan.engine.batching import run_collect
from attnscan.errors import AttnscanError
from attnscan.models.arch import arch_facts
from attnscan.models.loading import from_model
from attnscan.testing.presets import PRESETS, Preset, build_random_model, param_count, preset_config, scaled_config
from attnscan.testing.tiny import eager_reference, random_prompts

NAMES = ("gpt-j-6b", "llama-3.1-8b", "mistral-7b-v0.1")

# What the published config.json files say, read through the config object transformers builds.
EXPECTED: dict[str, dict[str, Any]] = {
    "gpt-j-6b": {
        "vocab_size": 50400,
        "hidden_size": 4096,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "max_position_embeddings": 2048,
        "rotary_dim": 64,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    },
    "llama-3.1-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "mistral-7b-v0.1": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}

EXPECTED_ROPE: dict[str, dict[str, Any] | None] = {
    "gpt-j-6b": None,  # GPT-J's RoPE base is fixed in the modeling code, not in the config
    "llama-3.1-8b": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "mistral-7b-v0.1": {"rope_type": "default", "rope_theta": 10000.0},
}

# (layers, heads, kv heads, head dim, hidden size, sliding window of every layer)
FACTS: dict[str, tuple[int, int, int, int, int, int | None]] = {
    "gpt-j-6b": (28, 16, 16, 256, 4096, None),
    "llama-3.1-8b": (32, 32, 8, 128, 4096, None),
    "mistral-7b-v0.1": (32, 32, 8, 128, 4096, 4096),
}

# Published totals: GPT-J model card table; safetensors metadata of the Llama and Mistral checkpoints.
PUBLISHED = {"gpt-j-6b": 6_053_381_344, "llama-3.1-8b": 8_030_261_248, "mistral-7b-v0.1": 7_241_732_096}

LENGTH = 16
SEQ_LENGTHS = (16, 9, 13, 4)
TOL = 1e-5


def test_registry_names_and_sources() -> None:
    assert set(PRESETS) == set(NAMES)
    for name, preset in PRESETS.items():
        assert isinstance(preset, Preset)
        assert preset.name == name
        assert preset.source.startswith("https://huggingface.co/")
        assert preset.hub_id in preset.source
        assert preset.published_params == PUBLISHED[name]


def test_presets_are_read_only() -> None:
    preset = PRESETS["llama-3.1-8b"]
    with pytest.raises(TypeError):
        preset.values["num_hidden_layers"] = 2  # type: ignore[index]
    with pytest.raises(AttributeError):
        preset.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("name", NAMES)
def test_config_carries_published_values(name: str) -> None:
    config = preset_config(name)
    assert type(config).__name__ == PRESETS[name].config_class
    for key, value in EXPECTED[name].items():
        assert getattr(config, key) == value, key
    rope = EXPECTED_ROPE[name]
    if rope is not None:
        assert config.rope_parameters == rope


def test_config_does_not_share_nested_values() -> None:
    first = preset_config("llama-3.1-8b")
    first.rope_parameters["factor"] = 2.0
    assert preset_config("llama-3.1-8b").rope_parameters["factor"] == 8.0
    assert PRESETS["llama-3.1-8b"].values["rope_parameters"]["factor"] == 8.0


@pytest.mark.parametrize("name", NAMES)
def test_arch_facts(name: str) -> None:
    layers, heads, kv, head_dim, hidden, window = FACTS[name]
    facts = arch_facts(preset_config(name))
    assert (facts.n_layers, facts.n_heads, facts.n_kv_heads, facts.head_dim, facts.hidden_size) == (
        layers,
        heads,
        kv,
        head_dim,
        hidden,
    )
    assert facts.layer_windows == (window,) * layers
    assert facts.sliding_window == window
    assert facts.known


@pytest.mark.parametrize("name", NAMES)
def test_param_count_near_published(name: str) -> None:
    count = param_count(name)
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.01


def test_param_count_exact_where_known() -> None:
    # The Llama and Mistral totals are the checkpoints' own; GPT-J's card total is 2,498,560 above the HF model's.
    assert param_count("llama-3.1-8b") == 8_030_261_248
    assert param_count("mistral-7b-v0.1") == 7_241_732_096
    assert param_count("gpt-j-6b") == 6_050_882_784


def test_overrides_and_their_errors() -> None:
    assert preset_config("gpt-j-6b", n_layer=3).num_hidden_layers == 3
    assert preset_config("gpt-j-6b", num_hidden_layers=3).n_layer == 3
    assert scaled_config("gpt-j-6b", num_hidden_layers=3).n_layer == 3
    assert preset_config("Mistral-7B-v0.1", sliding_window=None).sliding_window is None
    with pytest.raises(AttnscanError, match="no field num_layers"):
        preset_config("llama-3.1-8b", num_layers=2)
    with pytest.raises(AttnscanError, match="rope_parameters"):
        preset_config("llama-3.1-8b", rope_theta=10000.0)


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(AttnscanError, match=r"unknown preset 'llama-2-7b'.*gpt-j-6b, llama-3.1-8b, mistral-7b-v0.1"):
        preset_config("llama-2-7b")
    for call in (lambda: scaled_config("gpt2"), lambda: param_count("gpt2"), lambda: build_random_model("gpt2")):
        with pytest.raises(AttnscanError, match="unknown preset"):
            call()


@pytest.mark.parametrize("name", NAMES)
def test_scaled_config_keeps_structure(name: str) -> None:
    full, small = preset_config(name), scaled_config(name, layers=3, hidden_size=64, heads=8)
    facts = arch_facts(small)
    assert (facts.n_layers, facts.hidden_size, facts.n_heads, facts.head_dim) == (3, 64, 8, 8)
    full_facts = arch_facts(full)
    assert facts.n_heads // facts.n_kv_heads == full_facts.n_heads // full_facts.n_kv_heads
    assert facts.sliding_window == full_facts.sliding_window
    assert getattr(small, "rope_parameters", None) == getattr(full, "rope_parameters", None)
    assert small.tie_word_embeddings == full.tie_word_embeddings
    if name == "gpt-j-6b":
        assert small.rotary_dim / facts.head_dim == full.rotary_dim / full_facts.head_dim
    else:
        assert small.intermediate_size / small.hidden_size == full.intermediate_size / full.hidden_size
        assert small.rms_norm_eps == full.rms_norm_eps


def test_scaled_config_rejects_a_broken_head_ratio() -> None:
    with pytest.raises(AttnscanError, match="multiple of 4"):
        scaled_config("llama-3.1-8b", heads=6, hidden_size=48)
    with pytest.raises(AttnscanError, match="not a multiple of heads"):
        scaled_config("gpt-j-6b", heads=6, hidden_size=64)


def _capture_mean(model: Any, seqs: list[list[int]], layers: tuple[int, ...], batch_size: int) -> Any:
    route = from_model(model, None).arch.route
    collector = GridCollector("s", layers, len(seqs), LENGTH)
    run_collect(model, seqs, collector, route=route, pad_id=0, batch_size=batch_size)
    return collector.result()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_scaled_model_capture_matches_eager(name: str, batch_size: int) -> None:
    # A window of 6 makes Mistral's sliding window act on these short prompts; the other presets keep theirs (none).
    extra = {"sliding_window": 6} if name == "mistral-7b-v0.1" else {}
    config = scaled_config(name, layers=3, hidden_size=64, heads=8, **extra)
    model = build_random_model(config, seed=0)
    assert sum(p.numel() for p in model.parameters()) == param_count(config)
    seqs = random_prompts(SEQ_LENGTHS)
    with torch.inference_mode():
        logits = model(torch.tensor([seqs[0]])).logits
    assert logits.shape == (1, len(seqs[0]), config.vocab_size)
    assert torch.isfinite(logits).all()

    layer = 1
    result = _capture_mean(model, seqs, (layer,), batch_size)
    reference, count = eager_reference(model, seqs, (layer,), LENGTH)
    assert torch.equal(result.count, count)
    mean, ref = result.mean(layer), reference[layer]
    assert torch.equal(mean.isnan(), ref.isnan())
    assert (mean - ref).abs().nan_to_num(0.0).max().item() < TOL
    if name == "mistral-7b-v0.1":
        assert (ref[LENGTH - 1, : LENGTH - 6].nan_to_num(0.0) == 0).all()  # outside the window: no attention
    # SDPA, except for GPT-J under a transformers that gives it none (it got SDPA during the 5.x series).
    gptj_eager = name == "gpt-j-6b" and not getattr(type(model), "_supports_sdpa", False)
    assert model.config._attn_implementation == ("eager" if gptj_eager else "sdpa")


def test_build_random_model_seed_is_reproducible_and_local() -> None:
    config = scaled_config("llama-3.1-8b", layers=1, hidden_size=32, heads=4)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_random_model(config, seed=7)
    b = build_random_model(config, seed=7)
    c = build_random_model(config, seed=8, dtype=torch.bfloat16)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the global random state was not consumed
    assert not a.training
    assert next(c.parameters()).dtype == torch.bfloat16
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    wa, wc = a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(wa.to(torch.bfloat16), wc)
    with pytest.raises(AttnscanError, match="preset name"):
        build_random_model(config, n_layer=2)
