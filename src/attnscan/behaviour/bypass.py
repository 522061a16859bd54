"""Layer bypass: chosen decoder layers hand their input hidden states on unchanged.

:func:`bypass_layers` hooks each chosen decoder layer so that the residual stream skips it. The layer still runs,
and its output is discarded: this keeps the KV cache of every layer filled, so generation with a cache behaves
exactly like a model without those layers. The hooks are removed when the block ends, also when it raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import AttnscanError
from ..models.anatomy import decoder_layers
from ..models.loading import LoadedModel, parse_layers

__all__ = ["bypass_layers", "resolve_bypass"]


def resolve_bypass(stack: nn.ModuleList, layers: Iterable[int] | str | None) -> tuple[int, ...]:
    """The layers to bypass in ``stack``, checked (negative indices from the end, ``"3,7"`` strings accepted);
    ``()`` for ``None``, an empty list or a blank string."""
    if layers is None:
        return ()
    if isinstance(layers, str):
        return () if not layers.strip() else parse_layers(layers, len(stack))
    items = [int(x) for x in layers]
    return parse_layers(items, len(stack)) if items else ()


def _passthrough(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook: replace a decoder layer's hidden-state output by its hidden-state input."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise AttnscanError(
            f"cannot bypass {type(module).__name__}: its hidden states are neither its first argument nor "
            "'hidden_states'"
        )
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (hidden, *output[1:])
    raise AttnscanError(f"cannot bypass {type(module).__name__}: it returns {type(output).__name__}")


@contextlib.contextmanager
def bypass_layers(model: Any, layers: Iterable[int] | str | None) -> Iterator[tuple[int, ...]]:
    """Within the block, each chosen decoder layer of ``model`` passes its input hidden states through unchanged.

    ``model`` is a transformers causal LM (or a :class:`LoadedModel`); ``layers`` are layer indices (negative
    count from the end, ``"3,7"`` strings accepted); empty or ``None`` bypasses nothing. Yields the resolved
    layers. The hooks are removed on exit, also when the block raises.
    """
    if isinstance(model, LoadedModel):
        model = model.model
    stack = decoder_layers(model)
    chosen = resolve_bypass(stack, layers)
    handles = []
    try:
        for layer in chosen:
            handles.append(stack[layer].register_forward_hook(_passthrough, with_kwargs=True))
        yield chosen
    finally:
        for handle in handles:
            handle.remove()
