"""Model anatomy: where a causal LM keeps its decoder, its decoder layers and each layer's attention module.

Architecture facts found by walking the module tree (no weights are read); the capture engine, the hidden-state
features and the behaviour interventions use them to find what to hook.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (``model.base_model``), so no vocabulary projection is computed."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def decoder_layers(model: Any) -> nn.ModuleList:
    """The model's list of decoder layers: the outermost ``ModuleList`` with ``num_hidden_layers`` entries."""
    n = int(model.config.num_hidden_layers)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def attention_module(layer: nn.Module) -> nn.Module:
    """The outermost submodule of a decoder layer whose class name ends in 'Attention'."""
    for _, module in layer.named_modules():
        if type(module).__name__.endswith("Attention"):
            return module  # type: ignore[no-any-return]
    raise ValueError(f"cannot find the attention module in {type(layer).__name__}")


__all__ = ["attention_module", "base_model", "decoder_layers"]
