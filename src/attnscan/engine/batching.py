"""Batching token sequences: the one batch iterator (padding, position ids, longest first, back-off on out of
memory) and the captured forward over it (no LM head)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import AttnscanError
from ..models.anatomy import base_model
from ..models.arch import Route
from .accumulate import GridCollector
from .capture import CaptureInfo, capture_attention

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
    layers: int = 1,
    whole_maps: bool = False,
    headroom: float = 0.7,
    cap: int = AUTO_BATCH_CAP,
) -> int:
    """A first batch size for ``--batch-size auto`` on an accelerator: how many prompts of ``length`` tokens fit
    ``headroom`` of ``free_bytes`` (the device's free memory with the model loaded), capped at ``cap``; at least 1.

    It follows the chunked capture (:mod:`attnscan.engine.capture`): the layer outputs come from SDPA, which holds
    no ``T x T`` square, and a captured layer's probabilities are computed by chunks of rows whose scores are
    bounded for the whole batch (:data:`~attnscan.engine.capture.CUDA_CHUNK_BYTES`). So the batch shares a fixed
    part: three chunk-sized tensors (the scores in the model's dtype, their float32 softmax, a mask temporary) and
    the collector's float32 buffer of ``layers`` packed lower triangles (``layers * T (T + 1) / 2 * 4`` bytes; the
    square, ``layers * T^2 * 4``, when ``whole_maps``). Per prompt: the collector's two boolean ``T x T`` masks; with
    ``whole_maps`` (relative alignment or left padding, where the collector takes each layer's whole head mean)
    four float32 ``T x T`` maps (the head mean and the collector's gathers and aligned copy); the 16-row chunk floor
    (``16 * heads * T * (dtype_bytes + 8)``); and the layer's activations (``T * (4 * hidden + 3 * intermediate)``
    values). It is an estimate: back-off on out-of-memory still has the last word.
    """
    from .capture import CUDA_CHUNK_BYTES

    t2 = length * length
    fixed = 3 * CUDA_CHUNK_BYTES + layers * (t2 if whole_maps else length * (length + 1) // 2) * 4
    per_prompt = (
        2 * t2
        + (4 * t2 * 4 if whole_maps else 0)
        + 16 * heads * length * (dtype_bytes + 8)
        + length * (4 * hidden + 3 * intermediate) * dtype_bytes
    )
    return max(1, min(cap, (int(headroom * free_bytes) - fixed) // per_prompt))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an accelerator out-of-memory error (CUDA, MPS or XPU)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class Batch:
    """One padded batch: ``rows`` are the indices of its prompts in the sequences given to :class:`Batches`.

    ``input_ids``, ``attention_mask`` and ``position_ids`` are ``long [B, P]`` on the batch's device (positions count
    each prompt's real tokens from 0, so left padding does not shift them); ``starts[b]`` is row ``b``'s first real
    column and ``lengths[b]`` its number of real tokens.
    """

    rows: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    starts: list[int]
    lengths: list[int]

    def forward_kwargs(self, positions: bool) -> dict[str, Any]:
        """Keyword arguments of a base model's forward for this batch (no cache; position ids where accepted)."""
        kwargs: dict[str, Any] = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "use_cache": False,
        }
        if positions:
            kwargs["position_ids"] = self.position_ids
        return kwargs


def check_batch_size(batch_size: int) -> None:
    """Refuse fewer than one prompt per forward pass (the one check of every batch size)."""
    if batch_size < 1:
        raise AttnscanError(f"batch size must be at least 1, got {batch_size}")


class Batches:
    """The one batch iterator of attnscan: scan, features, generation and perplexity all batch through it.

    Prompts go longest first (:func:`batch_order`), ``batch_size`` at a time, padded on ``padding_side`` with
    ``pad_id``. :meth:`retry_smaller` drops the batch just handed out and halves the size: iteration then resumes at
    the same prompt, which is how an out-of-memory error backs off.
    """

    def __init__(
        self,
        seqs: Sequence[Sequence[int]],
        *,
        pad_id: int,
        device: torch.device,
        batch_size: int,
        padding_side: PaddingSide = "right",
    ) -> None:
        check_batch_size(batch_size)
        if padding_side not in ("right", "left"):
            raise AttnscanError(f"--padding-side must be right or left, got {padding_side}")
        self.seqs = seqs
        self.pad_id = pad_id
        self.device = device
        self.size = batch_size
        self.padding_side: PaddingSide = padding_side
        self.order = batch_order([len(s) for s in seqs])
        self._retry = False

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self) -> Iterator[Batch]:
        lo = 0
        while lo < len(self.order):
            chunk = self.order[lo : lo + self.size]
            batch = [self.seqs[i] for i in chunk]
            ids, mask, pos, starts = make_batch(batch, self.pad_id, self.padding_side, self.device)
            self._retry = False
            yield Batch(chunk, ids, mask, pos, starts, [len(s) for s in batch])
            if not self._retry:
                lo += len(chunk)

    def retry_smaller(self) -> int:
        """Hand the current batch out again, split: the batch size halves (at least 1); returns the new size."""
        self.size = max(1, self.size // 2)
        self._retry = True
        return self.size


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
    capture_info: CaptureInfo | None = None,
) -> int:
    """Run ``seqs`` through ``model`` in batches, feeding the captured layers to ``collector``.

    ``prompt_ids`` names each sequence's index in its set (default ``0..N-1``); ``on_batch(n)`` is called after
    each batch with the number of prompts it held. With ``backoff``, a batch that runs out of accelerator memory is
    dropped from the collector, the batch size halved (``on_backoff(old, new)`` is told) and the batch retried.
    ``capture_info`` records the captured layers that fell back to eager attention (see
    :class:`attnscan.engine.capture.CaptureInfo`). Returns the batch size in use at the end.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    ids_of = list(prompt_ids) if prompt_ids is not None else list(range(len(seqs)))
    param: torch.Tensor = next(model.parameters())
    base = base_model(model)
    positions = accepts_position_ids(base)
    batches = Batches(seqs, pad_id=pad_id, device=param.device, batch_size=batch_size, padding_side=padding_side)
    with torch.inference_mode(), capture_attention(model, collector.layers, collector, route, info=capture_info):
        for batch in batches:
            try:
                # begin() allocates the batch's [B, P, P] masks on the collector's device: it may run out too.
                collector.begin([ids_of[i] for i in batch.rows], batch.starts, batch.lengths)
                base(**batch.forward_kwargs(positions))
            except Exception as exc:
                clean = collector.abort()
                if not (backoff and clean and batches.size > 1 and is_out_of_memory(exc)):
                    raise
                old = batches.size
                del batch
                if param.device.type == "cuda":
                    torch.cuda.empty_cache()
                new = batches.retry_smaller()
                if on_backoff is not None:
                    on_backoff(old, new)
                continue
            collector.end()
            if on_batch is not None:
                on_batch(len(batch.rows))
    return batches.size
