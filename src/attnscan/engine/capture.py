"""The capture engine: the only code in attnscan that touches attention internals.

:func:`capture_attention` is a context manager that, for the duration of a ``with`` block, makes a model hand each
chosen layer's attention probabilities to a collector the moment they exist, and drops them right after. Two routes:

``interface`` (models on transformers' ``AttentionInterface``)
    A uniquely named attention function is registered; layers that are not chosen go to PyTorch SDPA. A chosen
    layer takes one of two paths:

    - **chunked** (the default): :func:`chunked_attention` walks the query rows in chunks, computes each chunk's
      scores only against the keys it may attend to (the upper triangle is never computed), softmaxes them in
      float32 and averages the heads at once. A collector that offers ``take_rows`` (the grid collector, for
      absolute alignment and right padding) gets each chunk's head mean as it is computed and no ``P x P`` map is
      built at all; any other gets the whole head mean, float32 ``[B, P, P]`` (through ``take_head_mean``, which
      may overwrite it) or ``[B, 1, P, P]`` (through ``add``). No tensor holds every head's ``P x P`` square; the
      largest one holds one chunk of rows for all heads. The layer's output is, on the CPU, each chunk's
      probabilities times the values (eager attention's arithmetic, by chunks: measured cheaper than a second pass
      through SDPA there), elsewhere the fused SDPA kernel's, as for the other layers.
    - **eager** (fallback): the model's own eager attention over the whole square for every head, whose weights
      ``[B, heads, P, P]`` go to the collector. It is taken for a layer whose attention the chunked path cannot
      reproduce exactly (:func:`eager_reason`): attention sinks (``s_aux``/``sinks``, e.g. gpt-oss), logit
      soft-capping (Gemma 2; SDPA has no soft-capping), dropout in training mode, a position bias, a module that is
      not causal, a query shorter than its keys (a KV cache), or a mask that lets a query see a later key. The
      reasons met are recorded in :attr:`CaptureInfo.eager` (layer -> reason).

    A matching mask function is registered under the same name: without it transformers builds no mask at all for
    an unknown implementation. The SDPA mask function returns ``None`` when the mask is purely causal (SDPA then
    uses ``is_causal``); the chosen layer then applies the causal mask itself, so it never attends to the future.

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
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..models.anatomy import attention_module, decoder_layers
from ..models.arch import Route

CHUNK_BYTES = 1 << 23
"""Bound on the float32 scores of one chunk of query rows (all heads, all prompts of the batch) on the CPU: 8 MiB,
about a cache-sized working set (measured: 128 rows for 9 heads at P = 2048 beat 256 and 512 rows)."""
CUDA_CHUNK_BYTES = 1 << 28
"""The same bound on CUDA (256 MiB): fewer, larger kernels."""


class Collector(Protocol):
    """Anything that accepts one layer's attention weights ``[B, heads, P, P]``; on the chunked path the engine has
    averaged the heads already and hands over the float32 head mean as one head, ``[B, 1, P, P]``.

    A collector may also have ``take_rows(layer)``, returning ``None`` or a function ``feed(q0, q1, rows)`` that
    takes the float32 head mean by chunks of query rows as the chunked path computes them (``[B, q1 - q0, q1]``,
    in order; see :meth:`attnscan.engine.accumulate.GridCollector.take_rows`): the whole ``[B, P, P]`` map is then
    never built; and ``take_head_mean(layer, mean)``, taking the whole float32 head mean ``[B, P, P]`` to overwrite
    (no copy), where it takes no rows."""

    def add(self, layer: int, weights: torch.Tensor) -> None: ...


RowFeed = Callable[[int, int, torch.Tensor], None]


@dataclass
class CaptureInfo:
    """What :func:`capture_attention` did: the chosen layers that ran the eager fallback, with the reason."""

    eager: dict[int, str] = field(default_factory=dict)


_counter = itertools.count()
_lock = threading.Lock()


def _eager_function(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The model's own eager attention function (same module as the attention class), else Llama's."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        fn = eager_attention_forward
    return fn  # type: ignore[no-any-return]


def _causal(mask: torch.Tensor | None, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The boolean mask (``True`` = may attend) a chosen layer applies: the given one, or the causal square when
    the mask function returned ``None`` for a purely causal pattern."""
    if mask is not None:
        return mask
    q_len, k_len = query.shape[-2], key.shape[-2]
    qi = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
    kj = torch.arange(k_len, device=query.device)[None, :]
    return (kj <= qi)[None, None]


def _additive_mask(mask: torch.Tensor | None, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> Any:
    """Turn the mask the registered mask function produced into the additive float mask eager attention expects."""
    if mask is None and not getattr(module, "is_causal", True):
        return None
    mask = _causal(mask, module, query, key)
    if mask.dtype == torch.bool:
        dtype = query.dtype
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=mask.device))
    return mask


def eager_reason(module: nn.Module, query: torch.Tensor, key: torch.Tensor, mask: Any, kwargs: dict[str, Any]) -> str:
    """Why a chosen layer needs the eager fallback (see the module docstring); ``""`` when the chunked path is
    exact for it."""
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        return "attention sinks"
    if kwargs.get("softcap") is not None:
        return "logit soft-capping"
    if kwargs.get("position_bias") is not None:
        return "position bias"
    if kwargs.get("dropout") and module.training:
        return "dropout in training mode"
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        return "not a causal module"
    if query.shape[-2] != key.shape[-2]:
        return "query shorter than its keys"
    return _mask_reason(mask) if mask is not None else ""


def _mask_reason(mask: torch.Tensor) -> str:
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return "a mask that is not boolean [B, 1, Q, K]"
    if torch.triu(mask[:, 0], diagonal=1).any():
        return "a mask that lets a query see a later key"
    return ""


def _beyond_sdpa(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether a layer's attention has a part transformers' SDPA function drops (sinks) or refuses (soft-capping):
    such a layer runs its eager attention even when it is not captured."""
    sinks = kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None
    return sinks or kwargs.get("softcap") is not None


def _output_from_chunks(device: torch.device) -> bool:
    """Whether a captured layer's output is its chunks' probabilities times the values (the CPU, where that was
    measured cheaper than a second pass through SDPA) rather than the fused SDPA kernel's (elsewhere)."""
    return device.type == "cpu"


def chunk_rows(batch: int, heads: int, keys: int, device: torch.device) -> int:
    """Query rows per chunk so that one chunk's float32 scores ``[B, heads, rows, keys]`` stay within
    :data:`CHUNK_BYTES` (on CUDA :data:`CUDA_CHUNK_BYTES`); at least 16 rows, a multiple of 16 from there on."""
    budget = CUDA_CHUNK_BYTES if device.type == "cuda" else CHUNK_BYTES
    rows = budget // max(1, 4 * batch * heads * keys)
    return max(16, rows // 16 * 16)


def chunked_head_mean(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    rows: int | None = None,
) -> torch.Tensor:
    """``float32 [B, P, P]`` head mean of ``softmax(query key^T * scaling + mask)``, computed by chunks of query rows
    (see :func:`chunked_attention`, which also gives the attention output)."""
    mean = chunked_attention(query, key, None, mask, scaling, rows)[0]
    assert mean is not None
    return mean


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor | None,
    mask: torch.Tensor | None,
    scaling: float,
    rows: int | None = None,
    feed: RowFeed | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Eager attention by chunks of query rows: the head-mean probabilities ``float32 [B, P, P]`` and, given
    ``value``, the output ``[B, P, H, D]`` (the layout eager attention functions return). Given ``feed``, each
    chunk's head mean ``float32 [B, q1 - q0, q1]`` goes to ``feed(q0, q1, chunk)`` instead, in order, and no
    ``[B, P, P]`` map is built (the first item returned is then ``None``).

    ``query`` ``[B, H, P, D]``, ``key`` and ``value`` ``[B, KV, P, D]`` (H a multiple of KV: grouped-query attention
    without repeating the keys); ``mask`` boolean ``[B or 1, 1, P, P]`` (``True`` = may attend) that never lets a
    query see a later key, or ``None`` for the causal square. Rows ``[q0, q1)`` (``rows`` of them, default
    :func:`chunk_rows`) are scored against keys ``[0, q1)`` only, in the inputs' dtype (the query scaled first),
    and the masked scores get the dtype's most negative number added, as in eager attention; the softmax and the
    head mean run in float32, and the output is the probabilities (cast to the values' dtype) times the values.
    Cells above the diagonal are 0 (in the rows of padding tokens, which the mask lets see nothing, the values
    mean nothing, as in eager attention)."""
    b, h, p, d = query.shape
    kv = key.shape[1]
    group = h // kv
    rows = min(p, rows or chunk_rows(b, h, p, query.device))
    mean = None if feed is not None else torch.empty(b, p, p, dtype=torch.float32, device=query.device)
    out = None if value is None else torch.empty(b, p, h, value.shape[-1], dtype=value.dtype, device=value.device)
    neg = torch.finfo(query.dtype).min
    keys_t = key.transpose(2, 3)  # [B, KV, D, P]
    upper = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu_(1)
    for q0 in range(0, p, rows):
        q1 = min(p, q0 + rows)
        r = q1 - q0
        # [B, KV, G * r, D] @ [B, KV, D, q1]: each key head meets its group of query heads in one product.
        chunk = (query[:, :, q0:q1] * scaling).reshape(b, kv, group * r, d)
        scores = torch.matmul(chunk, keys_t[..., :q1]).view(b, h, r, q1)
        del chunk
        if mask is None:  # causal: only the chunk's own square has cells right of the diagonal
            scores[..., q0:q1].masked_fill_(upper[:r, :r], neg)
        else:
            scores.add_(torch.where(mask[:, :, q0:q1, :q1], 0.0, neg).to(scores.dtype))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        del scores
        if out is not None and value is not None:
            grouped = probs.to(value.dtype).view(b, kv, group * r, q1)
            out[:, q0:q1] = torch.matmul(grouped, value[:, :, :q1]).view(b, h, r, -1).transpose(1, 2)
            del grouped
        if mean is None:
            assert feed is not None
            head_mean = probs.mean(dim=1)
            del probs
            feed(q0, q1, head_mean)
            del head_mean
            continue
        mean[:, q0:q1, :q1] = probs.mean(dim=1)
        del probs
        mean[:, q0:q1, q1:] = 0.0
    return mean, out


@contextlib.contextmanager
def _interface_route(
    model: Any, layers: set[int], collector: Collector, info: CaptureInfo, chunked: bool
) -> Iterator[None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    layer_of: dict[int, int] = {}
    checked: list[Any] = [None, ""]  # the last mask checked (weak reference) and what the check found
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
            if _beyond_sdpa(module, kwargs):  # SDPA would drop the sinks or refuse the soft-capping
                out, _ = _eager_function(module)(
                    module, query, key, value, _additive_mask(attention_mask, module, query, key), **kwargs
                )
                return out, None
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            return out, None
        reason = eager_reason(module, query, key, None, kwargs) if chunked else "chunked path off"
        if not reason and attention_mask is not None:
            # Every layer of a forward gets the same mask object: check it once (on a GPU the check waits for it).
            if checked[0] is None or checked[0]() is not attention_mask:
                checked[:] = [weakref.ref(attention_mask), _mask_reason(attention_mask)]
            reason = str(checked[1])
        if reason:
            info.eager.setdefault(layer, reason)
            mask = _additive_mask(attention_mask, module, query, key)
            out, weights = _eager_function(module)(module, query, key, value, mask, **kwargs)
            collector.add(layer, weights)  # type: ignore[arg-type]
            del weights
            return out, None
        scaling = float(kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5)
        take_rows = getattr(collector, "take_rows", None)
        feed = take_rows(layer) if take_rows is not None else None  # None: the collector wants the whole map
        if _output_from_chunks(query.device):
            mean, chunked_out = chunked_attention(query, key, value, attention_mask, scaling, feed=feed)
            assert chunked_out is not None
            out = chunked_out
        else:  # the fused kernel for the output, the chunks for the probabilities only
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            mean, _ = chunked_attention(query, key, None, attention_mask, scaling, feed=feed)
        if mean is not None:
            take_head_mean = getattr(collector, "take_head_mean", None)
            if take_head_mean is not None:  # reduced in place: no copy of the map
                take_head_mean(layer, mean)
            else:
                collector.add(layer, mean.unsqueeze(1))  # type: ignore[arg-type]
            del mean
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
    model: Any,
    layers: set[int] | list[int] | tuple[int, ...],
    collector: Collector,
    route: Route,
    *,
    chunked: bool = True,
    info: CaptureInfo | None = None,
) -> Iterator[CaptureInfo]:
    """Within the block, every forward of ``model`` hands the chosen layers' attention weights to ``collector``.

    ``route`` is ``"interface"`` or ``"hooks"`` (see the module docstring and :mod:`attnscan.models.arch`).
    ``chunked=False`` makes every chosen layer of the interface route take the eager path (the reference the
    chunked path is measured against). Yields a :class:`CaptureInfo` that records the layers that fell back to
    eager attention (``info``, when given: that one, so several captures can add to one record). Registrations and
    hooks are undone on exit, also when the forward raises.
    """
    chosen = set(int(x) for x in layers)
    info = info if info is not None else CaptureInfo()
    if route == "interface":
        with _interface_route(model, chosen, collector, info, chunked):
            yield info
    else:
        with _hook_route(model, chosen, collector):
            yield info
