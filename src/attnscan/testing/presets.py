"""Architecture presets: the published configs of the models in the reference figure, as plain data.

A preset holds the architecture values of a model's published ``config.json`` in the spelling the installed
transformers (5.x) expects, so a model of exactly that architecture can be built with random weights, for
benchmarks and tests, without hub access. Users who have the real weights load them from the hub with
:func:`attnscan.load_model`; both paths end in the same transformers classes and the same capture code.

Presets (short name -> hub id, source of the values):

- ``gpt-j-6b`` -> ``EleutherAI/gpt-j-6b``: https://huggingface.co/EleutherAI/gpt-j-6b/blob/main/config.json and the
  hyperparameter table of the model card https://huggingface.co/EleutherAI/gpt-j-6b (6,053,381,344 parameters,
  28 layers, d_model 4096, d_ff 16384, 16 heads of 256, RoPE on 64 dimensions, n_ctx 2048, vocab 50257/50400).
- ``llama-3.1-8b`` -> ``meta-llama/Llama-3.1-8B``: https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
  (grouped-query attention 32/8, llama3 RoPE scaling: factor 8, low/high frequency factors 1/4, original context
  8192, theta 500000; 8,030,261,248 parameters in the safetensors metadata).
- ``mistral-7b-v0.1`` -> ``mistralai/Mistral-7B-v0.1``:
  https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json (grouped-query attention 32/8, a 4096-token
  sliding window on every layer; 7,241,732,096 parameters in the safetensors metadata).

transformers 5 keeps RoPE settings in one ``rope_parameters`` dict (``rope_type``, ``rope_theta``, ``factor``, ...)
where ``config.json`` files written for transformers 4 have ``rope_scaling`` plus a top-level ``rope_theta``; the
presets use the new spelling. GPT-J has no RoPE settings in its config: its base 10000 is fixed in the modeling code.

:func:`scaled_config` shrinks a preset (layers, width, heads, vocabulary) while keeping what matters to attention
capture: the query/key-value head ratio, the RoPE type and parameters, the sliding window, the share of each head
that is rotated (GPT-J), the MLP width ratio and the weight tying.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from ..errors import AttnscanError


@dataclass(frozen=True)
class Preset:
    """One model architecture as published.

    ``values`` are keyword arguments for ``transformers.<config_class>`` (read-only; nested dicts are copied before
    use). ``published_params`` is the parameter count the source states, for checking :func:`param_count`.
    """

    name: str
    hub_id: str
    source: str
    config_class: str
    values: Mapping[str, Any]
    published_params: int | None = None

    def config(self, **overrides: Any) -> Any:
        """The transformers config of this preset with ``overrides`` applied (see :func:`preset_config`)."""
        return _build_config(self, overrides)


def _frozen(values: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(values)


PRESETS: dict[str, Preset] = {
    "gpt-j-6b": Preset(
        name="gpt-j-6b",
        hub_id="EleutherAI/gpt-j-6b",
        source=(
            "https://huggingface.co/EleutherAI/gpt-j-6b/blob/main/config.json; "
            "https://huggingface.co/EleutherAI/gpt-j-6b (model card hyperparameter table)"
        ),
        config_class="GPTJConfig",
        values=_frozen(
            {
                "vocab_size": 50400,
                "n_positions": 2048,
                "n_embd": 4096,
                "n_layer": 28,
                "n_head": 16,
                "rotary_dim": 64,
                "n_inner": None,  # 4 * n_embd = 16384
                "activation_function": "gelu_new",
                "layer_norm_epsilon": 1e-5,
                "initializer_range": 0.02,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                "bos_token_id": 50256,
                "eos_token_id": 50256,
                "tie_word_embeddings": False,
            }
        ),
        published_params=6_053_381_344,
    ),
    "llama-3.1-8b": Preset(
        name="llama-3.1-8b",
        hub_id="meta-llama/Llama-3.1-8B",
        source="https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json",
        config_class="LlamaConfig",
        values=_frozen(
            {
                "vocab_size": 128256,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "hidden_act": "silu",
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5,
                "initializer_range": 0.02,
                "attention_bias": False,
                "attention_dropout": 0.0,
                "mlp_bias": False,
                "pretraining_tp": 1,
                "bos_token_id": 128000,
                "eos_token_id": 128001,
                "tie_word_embeddings": False,
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
            }
        ),
        published_params=8_030_261_248,
    ),
    "mistral-7b-v0.1": Preset(
        name="mistral-7b-v0.1",
        hub_id="mistralai/Mistral-7B-v0.1",
        source="https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json",
        config_class="MistralConfig",
        values=_frozen(
            {
                "vocab_size": 32000,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "hidden_act": "silu",
                "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-5,
                "initializer_range": 0.02,
                "sliding_window": 4096,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "tie_word_embeddings": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            }
        ),
        published_params=7_241_732_096,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive), or a usage error listing the choices."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise AttnscanError(f"unknown preset '{name}': choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[key]


def _config_type(preset: Preset) -> Any:
    import transformers

    return getattr(transformers, preset.config_class)


def _allowed_keys(config_type: Any) -> set[str]:
    keys = {f.name for f in dataclasses.fields(config_type)} if dataclasses.is_dataclass(config_type) else set()
    keys.update(getattr(config_type, "attribute_map", {}) or {})
    return keys


def _build_config(preset: Preset, overrides: Mapping[str, Any]) -> Any:
    config_type = _config_type(preset)
    allowed = _allowed_keys(config_type)
    legacy = {"rope_theta", "rope_scaling"} & set(overrides)
    if legacy and "rope_parameters" in allowed:
        raise AttnscanError(
            f"{', '.join(sorted(legacy))} is the transformers 4 spelling: pass rope_parameters={{'rope_type': ..., "
            "'rope_theta': ..., ...} instead"
        )
    unknown = sorted(k for k in overrides if allowed and k not in allowed)
    if unknown:
        raise AttnscanError(
            f"{preset.config_class} has no field {', '.join(unknown)}: check the spelling against the preset's "
            f"values ({', '.join(sorted(preset.values))})"
        )
    aliases: Mapping[str, str] = getattr(config_type, "attribute_map", {}) or {}
    kwargs = copy.deepcopy(dict(preset.values))
    kwargs.update({aliases.get(k, k): copy.deepcopy(v) for k, v in overrides.items()})
    return config_type(**kwargs)


def preset_config(name: str, **overrides: Any) -> Any:
    """The transformers config of preset ``name``, with ``overrides`` replacing single values.

    Overrides use the config class's own field names (``n_layer`` for GPT-J, ``num_hidden_layers`` for Llama and
    Mistral; aliases in the class's ``attribute_map`` such as GPT-J's ``num_hidden_layers`` also work) and replace a
    value whole, so ``rope_parameters`` must be given complete. Unknown names raise :class:`AttnscanError`.
    """
    return _build_config(get_preset(name), overrides)


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))


def scaled_config(
    name: str,
    *,
    layers: int = 2,
    hidden_size: int = 64,
    heads: int = 8,
    vocab_size: int = 256,
    **overrides: Any,
) -> Any:
    """A small config of preset ``name`` with the same attention structure, for fast tests and smoke runs.

    Kept from the preset: the ratio of query heads to key-value heads (``heads`` must be a multiple of it), the RoPE
    type and parameters, the maximum positions, the sliding window, the share of each head that RoPE rotates (GPT-J),
    the MLP width as a multiple of the hidden size, the norm epsilon and weight tying. ``hidden_size`` must be a
    multiple of ``heads``; head dim is ``hidden_size // heads``. Further ``overrides`` are applied last, as in
    :func:`preset_config` (e.g. ``sliding_window=8`` to make the window bite on short inputs).
    """
    preset = get_preset(name)
    full = preset.config()
    n_heads = int(full.num_attention_heads)
    n_kv = int(getattr(full, "num_key_value_heads", None) or n_heads)
    group = n_heads // n_kv
    if layers < 1 or hidden_size < 1 or heads < 1 or vocab_size < 1:
        raise AttnscanError("scaled_config needs positive layers, hidden_size, heads and vocab_size")
    if heads % group:
        raise AttnscanError(
            f"{preset.name} has {group} query heads per key-value head: give heads as a multiple of {group}"
        )
    if hidden_size % heads:
        raise AttnscanError(f"hidden_size {hidden_size} is not a multiple of heads {heads}")
    head_dim = hidden_size // heads
    full_head_dim = int(getattr(full, "head_dim", None) or int(full.hidden_size) // n_heads)
    values: dict[str, Any]
    if preset.config_class == "GPTJConfig":
        rotary = _even(head_dim * int(full.rotary_dim) / full_head_dim)
        values = {"n_layer": layers, "n_embd": hidden_size, "n_head": heads, "rotary_dim": min(rotary, head_dim)}
        if full.n_inner is not None:
            values["n_inner"] = round(int(full.n_inner) * hidden_size / int(full.hidden_size))
    else:
        ratio = int(full.intermediate_size) / int(full.hidden_size)
        values = {
            "num_hidden_layers": layers,
            "hidden_size": hidden_size,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // group,
            "head_dim": head_dim,
            "intermediate_size": max(1, round(ratio * hidden_size)),
        }
    values["vocab_size"] = vocab_size
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = preset.values.get(key)
        if isinstance(token, int) and token >= vocab_size:
            values[key] = vocab_size - 1
    values.update(overrides)
    return _build_config(preset, values)


def param_count(preset: str | Any, **overrides: Any) -> int:
    """Number of parameters of a model of preset ``preset`` (or of a config object), computed from the config.

    Counts what the transformers model class allocates: embeddings, attention and MLP projections (with their biases
    where the architecture has them), norms and the LM head (not counted twice when tied). Supported configs:
    GPT-J, Llama and Mistral.
    """
    config = preset_config(preset, **overrides) if isinstance(preset, str) else preset
    kind = type(config).__name__
    vocab = int(config.vocab_size)
    hidden = int(config.hidden_size)
    n_layers = int(config.num_hidden_layers)
    n_heads = int(config.num_attention_heads)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if kind == "GPTJConfig":
        inner = int(config.n_inner or 4 * hidden)
        attention = 4 * hidden * hidden  # q, k, v, out without bias
        mlp = hidden * inner + inner + inner * hidden + hidden
        per_layer = attention + mlp + 2 * hidden  # one LayerNorm (weight and bias) per block
        head = 0 if tied else vocab * hidden
        return vocab * hidden + n_layers * per_layer + 2 * hidden + head + vocab  # LM head has a bias
    if kind in ("LlamaConfig", "MistralConfig"):
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // n_heads)
        inter = int(config.intermediate_size)
        q, kv = n_heads * head_dim, n_kv * head_dim
        attention = hidden * q + 2 * hidden * kv + q * hidden
        if getattr(config, "attention_bias", False):
            attention += q + 2 * kv + hidden
        mlp = 3 * hidden * inter + ((2 * inter + hidden) if getattr(config, "mlp_bias", False) else 0)
        per_layer = attention + mlp + 2 * hidden  # two RMSNorm weights
        head = 0 if tied else vocab * hidden
        return vocab * hidden + n_layers * per_layer + hidden + head
    raise AttnscanError(f"param_count knows GPT-J, Llama and Mistral configs, not {kind}")


def build_random_model(
    preset: str | Any,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    attn_implementation: str | None = None,
    seed: int | None = None,
    **overrides: Any,
) -> Any:
    """A causal LM of preset ``preset`` (or of a config object) with random weights, in eval mode on ``device``.

    ``attn_implementation`` defaults to ``"sdpa"`` where the installed transformers gives the model class SDPA
    attention and to ``"eager"`` where it does not (GPT-J before transformers moved it onto the attention
    interface), as :func:`attnscan.load_model` does.

    The model is allocated and initialised directly on ``device`` in ``dtype`` (no meta tensors, nothing
    downloaded). A full-size preset needs its whole size in memory (e.g. about 16 GB in bfloat16 for
    ``llama-3.1-8b``): use :func:`scaled_config` for tests. ``seed`` makes the weights reproducible without touching
    the global random state.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(preset, str):
        config = preset_config(preset, **overrides)
    elif overrides:
        raise AttnscanError("overrides apply to a preset name; set them on the config object instead")
    else:
        config = preset
    if attn_implementation is None:
        model_cls = AutoModelForCausalLM._model_mapping[type(config)]
        attn_implementation = "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"
    dev = torch.device(device)
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with dev:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()
