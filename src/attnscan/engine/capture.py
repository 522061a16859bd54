"""The capture engine: the only code in attnscan that touches attention internals.

:func:`capture_attention` is a context manager that, for the duration of a ``with`` block, makes a model hand each
chosen layer's attention probabilities ``[batch, heads, query, key]`` to a collector the moment they exist, and
drops them right after. Two routes:

``interface`` (models on transformers' ``AttentionInterface``)
    A uniquely named attention function is registered. For chosen layers it runs the model's own eager attention
    (so scaling, soft-capping, GQA and sinks match the reference exactly), passes the weights to the collector and
    returns ``None`` as weights; other layers go to PyTorch SDPA. A matching mask function is registered under the
    same name: without it transformers builds no mask at all for an unknown implementation. The SDPA mask function
    returns ``None`` when the mask is purely causal (SDPA then uses ``is_causal``); the chosen layer rebuilds the
    causal mask in that case, so it never silently attends to the future.

``hooks`` (models that compute eager attention themselves, e.g. GPT-Neo)
    A forward hook on each chosen layer's attention module reduces the weights the module returns and replaces
    them with ``None``, so nothing downstream keeps them.

Both routes undo every registration and hook on exit, also when the forward raises.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import nn

from ..models.anatomy import attention_module, decoder_layers
from ..models.arch import Route


class Collector(Protocol):
    """Anything that accepts one layer's attention weights ``[B, heads, P, P]``."""

    def add(self, layer: int, weights: torch.Tensor) -> None: ...


_counter = itertools.count()
_lock = threading.Lock()


def _eager_function(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The model's own eager attention function (same module as the attention class), else Llama's."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        fn = eager_attention_forward
    return fn  # type: ignore[no-any-return]


def _additive_mask(mask: torch.Tensor | None, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> Any:
    """Turn the mask the registered mask function produced into the additive float mask eager attention expects."""
    dtype = query.dtype
    neg = torch.finfo(dtype).min
    if mask is None:
        if not getattr(module, "is_causal", True):
            return None
        q_len, k_len = query.shape[-2], key.shape[-2]
        qi = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        kj = torch.arange(k_len, device=query.device)[None, :]
        mask = (kj <= qi)[None, None]
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.tensor(neg, dtype=dtype, device=mask.device))
    return mask


@contextlib.contextmanager
def _interface_route(model: Any, layers: set[int], collector: Collector) -> Iterator[None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    layer_of: dict[int, int] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for sub in layer.modules():
            layer_of[id(sub)] = i

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        layer = layer_of.get(id(module), getattr(module, "layer_idx", None))
        if layer not in layers:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            return out, None
        mask = _additive_mask(attention_mask, module, query, key)
        out, weights = _eager_function(module)(module, query, key, value, mask, **kwargs)
        collector.add(layer, weights)  # type: ignore[arg-type]
        del weights
        return out, None

    with _lock:
        name = f"attnscan_capture_{next(_counter)}"
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(name)
        yield
    finally:
        try:
            model.set_attn_implementation(previous)
        finally:
            with _lock:
                AttentionInterface._global_mapping.pop(name, None)
                AttentionMaskInterface._global_mapping.pop(name, None)
                ALL_ATTENTION_FUNCTIONS._local_mapping.pop(name, None)
                ALL_MASK_ATTENTION_FUNCTIONS._local_mapping.pop(name, None)


@contextlib.contextmanager
def _hook_route(model: Any, layers: set[int], collector: Collector) -> Iterator[None]:
    handles = []

    def make_hook(layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                raise RuntimeError(
                    f"layer {layer}'s {type(module).__name__} returned no attention weights: load the model with "
                    "attn_implementation='eager' for the hooks route"
                )
            collector.add(layer, output[1])
            return (output[0], None, *output[2:])

        return hook

    try:
        stack = decoder_layers(model)
        for layer in sorted(layers):
            handles.append(attention_module(stack[layer]).register_forward_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_attention(
    model: Any, layers: set[int] | list[int] | tuple[int, ...], collector: Collector, route: Route
) -> Iterator[None]:
    """Within the block, every forward of ``model`` hands the chosen layers' attention weights to ``collector``.

    ``route`` is ``"interface"`` or ``"hooks"`` (see the module docstring and :mod:`attnscan.models.arch`).
    Registrations and hooks are undone on exit, also when the forward raises.
    """
    chosen = set(int(x) for x in layers)
    manager = _interface_route if route == "interface" else _hook_route
    with manager(model, chosen, collector):
        yield
