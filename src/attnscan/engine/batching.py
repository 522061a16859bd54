"""Batches token sequences through a model under capture: padding, position ids, no LM head."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from ..models.arch import Route
from .accumulate import GridCollector
from .capture import base_model, capture_attention

PaddingSide = Literal["right", "left"]


def make_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: PaddingSide, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Pad sequences to one length.

    Returns ``input_ids [B, P]``, ``attention_mask [B, P]``, ``position_ids [B, P]`` (0.. for each prompt's real
    tokens, so left padding does not shift positions) and each row's start offset.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pos = torch.zeros((len(seqs), width), dtype=torch.long)
    starts = []
    for b, seq in enumerate(seqs):
        n = len(seq)
        s = width - n if side == "left" else 0
        ids[b, s : s + n] = torch.tensor(list(seq), dtype=torch.long)
        mask[b, s : s + n] = 1
        pos[b, s : s + n] = torch.arange(n)
        starts.append(s)
    return ids.to(device), mask.to(device), pos.to(device), starts


def batch_order(lengths: Sequence[int]) -> list[int]:
    """Prompt indices longest first, ties by index: batches of similar lengths waste little padding."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def accepts_position_ids(module: nn.Module) -> bool:
    try:
        return "position_ids" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def pad_token_id(tokenizer: object, model: nn.Module) -> int:
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(model.config, "pad_token_id", None),
        getattr(model.config, "eos_token_id", None),
    ):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


AUTO_BATCH_CAP = 128  # larger batches gain little throughput and waste more padding between unequal prompts


def estimate_batch_size(
    *,
    heads: int,
    hidden: int,
    intermediate: int,
    length: int,
    dtype_bytes: int,
    free_bytes: int,
    headroom: float = 0.7,
    cap: int = AUTO_BATCH_CAP,
) -> int:
    """A first batch size for ``--batch-size auto`` on an accelerator: how many prompts of ``length`` tokens fit
    ``headroom`` of ``free_bytes`` (the device's free memory with the model loaded), capped at ``cap``; at least 1.

    Per prompt, during a captured layer: the eager attention scores, the masked scores and the probabilities in
    the model's dtype plus the float32 softmax (``heads * T^2 * (3 * dtype_bytes + 4)``), the collector's float32
    ``T x T`` maps (about eight), and the layer's activations (``T * (4 * hidden + 3 * intermediate)`` values). It
    is an estimate: back-off on out-of-memory still has the last word.
    """
    t2 = length * length
    per_prompt = (
        heads * t2 * (3 * dtype_bytes + 4) + 8 * t2 * 4 + length * (4 * hidden + 3 * intermediate) * dtype_bytes
    )
    return max(1, min(cap, int(headroom * free_bytes) // per_prompt))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator out-of-memory error (CUDA, MPS or XPU)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_collect(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    collector: GridCollector,
    *,
    route: Route,
    pad_id: int,
    batch_size: int = 8,
    padding_side: PaddingSide = "right",
    prompt_ids: Sequence[int] | None = None,
    on_batch: Callable[[int], None] | None = None,
    backoff: bool = False,
    on_backoff: Callable[[int, int], None] | None = None,
) -> int:
    """Run ``seqs`` through ``model`` in batches, feeding the captured layers to ``collector``.

    ``prompt_ids`` names each sequence's index in its set (default ``0..N-1``); ``on_batch(n)`` is called after
    each batch with the number of prompts it held. With ``backoff``, a batch that runs out of accelerator memory is
    dropped from the collector, the batch size halved (``on_backoff(old, new)`` is told) and the batch retried.
    Returns the batch size in use at the end.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    ids_of = list(prompt_ids) if prompt_ids is not None else list(range(len(seqs)))
    param: torch.Tensor = next(model.parameters())
    device = param.device
    base = base_model(model)
    pass_positions = accepts_position_ids(base)
    order = batch_order([len(s) for s in seqs])
    size = batch_size
    with torch.inference_mode(), capture_attention(model, collector.layers, collector, route):
        lo = 0
        while lo < len(order):
            chunk = order[lo : lo + size]
            batch = [seqs[i] for i in chunk]
            input_ids, mask, pos, starts = make_batch(batch, pad_id, padding_side, device)
            kwargs = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
            if pass_positions:
                kwargs["position_ids"] = pos
            try:
                # begin() allocates the batch's [B, P, P] masks on the collector's device: it may run out too.
                collector.begin([ids_of[i] for i in chunk], starts, [len(s) for s in batch])
                base(**kwargs)
            except Exception as exc:
                clean = collector.abort()
                if not (backoff and clean and size > 1 and is_out_of_memory(exc)):
                    raise
                del input_ids, mask, pos, kwargs
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                new = max(1, size // 2)
                if on_backoff is not None:
                    on_backoff(size, new)
                size = new
                continue
            collector.end()
            lo += len(chunk)
            if on_batch is not None:
                on_batch(len(chunk))
    return size
