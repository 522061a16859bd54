"""Mergeable accumulators: what a scan keeps of the attention weights it sees.

For one prompt set and the captured layers, a :class:`SetAccumulator` holds

- ``sums``  ``float64 [layers, T, T]``: the sum over prompts of the head-averaged attention probability that query
  token ``i`` gives key token ``j``;
- ``count`` ``int64 [T, T]``: how many prompts reach each cell (the same for every layer).

Two alignments put prompts of different lengths on the grid:

- ``absolute`` (default): a prompt's token ``i`` lands on grid row/column ``i``; a prompt of ``n`` tokens reaches
  the causal cells ``j <= i < n``, and nothing beyond its length;
- ``relative``: every prompt is stretched over the whole grid, so that its start and its end meet the grid's.
  Grid row ``g`` shows the query token ``floor(g * n / T)`` (nearest neighbour). Keys are resampled so that each
  row stays a probability distribution: grid column ``c`` stands for the stretch ``[c n / T, (c + 1) n / T)`` of
  the prompt's key axis and receives each key token's probability in proportion to how much of that token's unit
  interval it covers (a 40-token prompt on a 448 grid puts ``p * 40 / 448`` in each of the ~11 columns that show a
  key). A stretched row therefore sums to 1 like a row of a prompt of T tokens, and a short prompt's map is not
  inflated by its length (with plain nearest-neighbour copying, a prompt of ``n`` tokens would show rows summing
  to about ``T / n``, and the difference of two sets would mostly measure their lengths). A cell is reached when
  its column covers part of a key token the row's query may attend to (so a cell just right of the diagonal can be
  reached when the diagonal token is stretched over several columns).

Per-prompt summaries (indexed by the prompt's position in its set):
``blocks``  ``float32 [N, layers, B, B]`` mean of ln(max(p, e^floor)) over the grid cells of each coarse block
that the prompt reaches (NaN where it reaches none); and, from the prompt's own map whatever the alignment,
``sink`` ``float32 [N, layers]`` mean attention on its first token and ``entropy`` ``float32 [N, layers]`` mean
row entropy (nats); ``lengths`` ``int64 [N]`` its token count.

Sums and counts add exactly, so accumulators from batches, processes or resumed runs merge by addition
(:meth:`SetAccumulator.merge`); the per-prompt summaries are concatenated.

:class:`GridCollector` fills one while the capture engine feeds it one layer's weights at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from .._types import DEFAULT_FLOOR
from ..errors import AttnscanError

Align = Literal["absolute", "relative"]


ENTROPY_ROWS = 256
"""Rows of a head-mean map turned into entropy terms at once (bounds that temporary to ``B x 256 x P`` floats)."""


def check_align(align: str) -> None:
    """Refuse an alignment other than ``absolute`` or ``relative``."""
    if align not in ("absolute", "relative"):
        raise AttnscanError(f"--align must be absolute or relative, got {align}")


def check_floor(floor: float) -> None:
    """Refuse a floor that is not a negative log probability."""
    if not floor < 0:
        raise AttnscanError(f"--floor must be negative (a log probability), got {floor}")


def block_size(length: int, n_blocks: int) -> int:
    return math.ceil(length / n_blocks)


@dataclass
class SetAccumulator:
    """Sums, counts and per-prompt summaries for one prompt set (see the module docstring for shapes)."""

    name: str
    layers: tuple[int, ...]
    length: int
    floor: float
    sums: torch.Tensor  # float64 [nL, T, T]
    count: torch.Tensor  # int64 [T, T]
    prompt_ids: torch.Tensor  # int64 [N]
    lengths: torch.Tensor  # int64 [N]
    blocks: torch.Tensor  # float32 [N, nL, B, B]
    sink: torch.Tensor  # float32 [N, nL]
    entropy: torch.Tensor  # float32 [N, nL]

    @property
    def n_prompts(self) -> int:
        return int(self.prompt_ids.numel())

    @property
    def n_blocks(self) -> int:
        return int(self.blocks.shape[-1])

    def layer_pos(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise AttnscanError(
                f"layer {layer} was not captured: captured layers are {', '.join(map(str, self.layers))}"
            ) from None

    def mean(self, layer: int) -> torch.Tensor:
        """``float64 [T, T]`` mean attention probability over heads and prompts; NaN where no prompt contributes."""
        s = self.sums[self.layer_pos(layer)]
        c = self.count.to(torch.float64)
        return torch.where(self.count > 0, s / c.clamp_min(1), torch.full_like(s, float("nan")))

    def merge(self, other: SetAccumulator) -> SetAccumulator:
        """Add another shard of the same set (same layers, length, floor, blocks; disjoint prompts)."""
        for attr in ("name", "layers", "length", "floor"):
            if getattr(self, attr) != getattr(other, attr):
                raise AttnscanError(
                    f"cannot merge accumulators with different {attr}: {getattr(self, attr)} vs {getattr(other, attr)}"
                )
        if self.n_blocks != other.n_blocks:
            raise AttnscanError("cannot merge accumulators with different summary block counts")
        ids = torch.cat([self.prompt_ids, other.prompt_ids])
        if torch.unique(ids).numel() != ids.numel():
            raise AttnscanError(f"cannot merge: the two shards of set '{self.name}' share prompts")
        order = torch.argsort(ids)
        return replace(
            self,
            sums=self.sums + other.sums,
            count=self.count + other.count,
            prompt_ids=ids[order],
            lengths=torch.cat([self.lengths, other.lengths])[order],
            blocks=torch.cat([self.blocks, other.blocks])[order],
            sink=torch.cat([self.sink, other.sink])[order],
            entropy=torch.cat([self.entropy, other.entropy])[order],
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping for safetensors (prefix ``{name}/``), compact: the sums and counts of the
        cells in :meth:`support` only (``cells`` holds their flat indices ``i * T + j``, ascending). Lossless:
        every other cell has a zero sum and a zero count. See :meth:`from_tensors`."""
        p, t = self.name, self.length
        cells = torch.nonzero(self.support().flatten()).flatten()
        cells = cells.to(torch.int32 if t * t < 2**31 else torch.int64)
        out = {f"{p}/cells": cells, f"{p}/sums": self.sums.reshape(len(self.layers), t * t)[:, cells.long()]}
        out.update({f"{p}/count": self.count.flatten()[cells.long()], f"{p}/prompt_ids": self.prompt_ids})
        out.update({f"{p}/lengths": self.lengths, f"{p}/blocks": self.blocks})
        out.update({f"{p}/sink": self.sink, f"{p}/entropy": self.entropy})
        return {k: v.contiguous() for k, v in out.items()}

    def support(self) -> torch.Tensor:
        """``bool [T, T]``: the cells some prompt reaches (count > 0), and any other cell whose sum is not zero (a
        collector never makes one; an accumulator built by hand may)."""
        return (self.count > 0) | (self.sums != 0).any(0)

    @classmethod
    def from_tensors(
        cls, name: str, tensors: dict[str, torch.Tensor], layers: tuple[int, ...], length: int, floor: float
    ) -> SetAccumulator:
        """Rebuild from :meth:`tensors`: the compact form (with ``{name}/cells``) or the full ``[layers, T, T]``
        sums and ``[T, T]`` count of version-1 bundles."""

        def get(key: str) -> torch.Tensor:
            return tensors[f"{name}/{key}"]

        sums, count = get("sums"), get("count")
        if f"{name}/cells" in tensors:
            cells, t, nl = get("cells").long(), length, len(layers)
            if sums.shape != (nl, cells.numel()) or count.shape != cells.shape or cells.numel() > t * t:
                raise AttnscanError(f"accumulators of set '{name}' do not fit T = {t} and {nl} layers: damaged bundle")
            full = torch.zeros(nl, t * t, dtype=sums.dtype)
            full[:, cells] = sums
            sums = full.view(nl, t, t)
            flat = torch.zeros(t * t, dtype=count.dtype)
            flat[cells] = count
            count = flat.view(t, t)
        return cls(
            name=name,
            layers=layers,
            length=length,
            floor=floor,
            sums=sums,
            count=count,
            prompt_ids=get("prompt_ids"),
            lengths=get("lengths"),
            blocks=get("blocks"),
            sink=get("sink"),
            entropy=get("entropy"),
        )


def _key_spread(n: int, length: int, padded: int, device: torch.device) -> torch.Tensor:
    """``float32 [padded, n]``: the share of key token ``k``'s unit interval that grid column ``c`` covers when
    ``n`` tokens are stretched over ``length`` columns (columns past ``length`` get nothing). Each key's shares add
    up to 1, so multiplying a row of attention probabilities by its transpose keeps the row's mass."""
    c = torch.arange(padded, device=device, dtype=torch.int64)[:, None]
    k = torch.arange(n, device=device, dtype=torch.int64)[None, :]
    # Overlap of [c n, (c + 1) n) and [k T, (k + 1) T), in units of 1 / T source tokens (exact integers).
    overlap = (torch.minimum((c + 1) * n, (k + 1) * length) - torch.maximum(c * n, k * length)).clamp_min(0)
    overlap[length:] = 0
    return overlap.to(torch.float32) / length


def _key_pairs(
    n: int, length: int, padded: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same shares as :func:`_key_spread` when ``n <= length``: column ``c`` then meets at most two key tokens,
    ``k0 = floor(c n / T)`` and ``k0 + 1``; returns ``(k0, share of k0, k1, share of k1)``, each ``[padded]``."""
    spread = _key_spread(n, length, padded, device)  # [padded, n], at most two non-zeros per row
    c = torch.arange(padded, device=device)
    k0 = ((c * n) // length).clamp_max(n - 1)
    k1 = (k0 + 1).clamp_max(n - 1)
    w0 = spread[c, k0]
    w1 = torch.where(k1 > k0, spread[c, k1], torch.zeros_like(w0))
    return k0, w0, k1, w1


class GridCollector:
    """Receives head-by-head attention weights of one batch, layer by layer, and reduces them at once.

    Call :meth:`begin` with the batch's prompt ids and where each prompt sits in the padded batch, then
    :meth:`add` once per captured layer, then :meth:`end`. Only the reduced ``[B, T, T]`` head mean of the current
    layer is alive at any time. With absolute alignment and right padding (the defaults), the capture engine need
    not build that map at all: :meth:`take_rows` gives it a function it hands each chunk of query rows to as the
    chunk is computed, and the collector reduces the chunk at once (so a captured layer needs memory for one chunk,
    not for a ``[B, P, P]`` map). A layer is reduced for the whole batch with a fixed number of tensor operations
    (gathers that move each prompt onto the grid, masks prepared in :meth:`begin`), not a loop over prompts, and the
    batch's per-prompt summaries stay on ``device`` until :meth:`end`: on a GPU, :meth:`add` queues work without
    waiting for it, so the forward pass of the next layer is not held up.

    With absolute alignment a prompt reaches only the cells ``j <= i``, so the collector keeps the sums of the lower
    triangle only, packed row by row (``[layers, T (T + 1) / 2]``, about half of the square; :meth:`result` unfolds
    them). Relative alignment keeps the whole square: a short prompt stretched over the grid reaches cells right of
    the diagonal (a one-token prompt reaches all of them).

    ``buffered`` (default: on accelerators only) keeps each batch's per-layer sums in a float32 ``[layers, T, T]``
    buffer on ``device`` and adds it to the float64 CPU sums at the end of the batch: one device-to-host copy per
    batch instead of one per layer, and a batch dropped after an out-of-memory error leaves no trace. Unbuffered
    (the CPU default), the layers add straight into the float64 sums with no second ``[layers, T, T]`` tensor, and a
    batch dropped after some of its layers were added leaves the collector unusable (:meth:`abort` says so).
    """

    def __init__(
        self,
        name: str,
        layers: tuple[int, ...],
        n_prompts: int,
        length: int,
        *,
        floor: float = DEFAULT_FLOOR,
        n_blocks: int = 16,
        device: torch.device | str = "cpu",
        align: Align = "absolute",
        buffered: bool | None = None,
    ) -> None:
        check_align(align)
        self.align = align
        self.name = name
        self.layers = tuple(layers)
        self._pos = {layer: i for i, layer in enumerate(self.layers)}
        self.length = length
        self.floor = floor
        self.n_blocks = n_blocks
        self.bs = block_size(length, n_blocks)
        self.padded = self.bs * n_blocks
        self.device = torch.device(device)
        nl = len(self.layers)
        if buffered is None:
            buffered = self.device.type != "cpu"
        # Absolute alignment reaches the lower triangle only: its sums are kept packed, row after row.
        self._tril = (
            torch.ones(length, length, dtype=torch.bool, device=self.device).tril_() if align == "absolute" else None
        )
        shape = (nl, length * (length + 1) // 2) if self._tril is not None else (nl, length, length)
        self._buf = torch.zeros(shape, dtype=torch.float32, device=self.device) if buffered else None
        self._added = False  # whether the batch in progress has added to the sums already
        self._broken = False
        self.sums = torch.zeros(shape, dtype=torch.float64)
        self.count = torch.zeros(length, length, dtype=torch.int64)
        self.lengths = torch.zeros(n_prompts, dtype=torch.int64)
        self.blocks = torch.full((n_prompts, nl, n_blocks, n_blocks), float("nan"), dtype=torch.float32)
        self.sink = torch.full((n_prompts, nl), float("nan"), dtype=torch.float32)
        self.entropy = torch.full((n_prompts, nl), float("nan"), dtype=torch.float32)
        self.seen = torch.zeros(n_prompts, dtype=torch.bool)
        self._batch: tuple[torch.Tensor, list[int], list[int]] | None = None
        self._source: torch.Tensor | None = None
        self._spread: list[torch.Tensor] = []
        # Layers whose rows are being streamed (take_rows): position -> (next row, sink, entropy, block sums so far).
        self._streams: dict[int, tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def begin(self, prompt_ids: list[int], starts: list[int], lengths: list[int]) -> None:
        """Start a batch: row ``b`` holds prompt ``prompt_ids[b]`` at positions ``starts[b] : starts[b]+lengths[b]``.

        Everything that depends only on where the prompts sit is prepared here once, so that :meth:`add` reduces a
        layer with a fixed number of tensor operations whatever the batch size (no loop over prompts)."""
        if any(n <= 0 for n in lengths) or (self.align == "absolute" and any(n > self.length for n in lengths)):
            raise ValueError("every prompt must have 1..length tokens after truncation")
        idx = torch.tensor(prompt_ids, dtype=torch.int64)
        dev, t = self.device, self.length
        ar = torch.arange(self.padded, device=dev)
        n = torch.tensor(lengths, device=dev)
        st = torch.tensor(starts, device=dev)
        width = max(s + k for s, k in zip(starts, lengths, strict=True))  # the padded batch length P
        pos = torch.arange(width, device=dev)
        # Where prompt b's i-th token sits in the batch (clamped past its end), which of its rows are its own, and
        # which batch columns hold its keys.
        self._rows = (st[:, None] + pos[None, :]).clamp_max(width - 1)  # [B, P]
        self._own_rows = pos[None, :] < n[:, None]  # [B, P] bool
        self._own_keys = ((pos[None, :] >= st[:, None]) & (pos[None, :] < (st + n)[:, None])).to(torch.float32)
        self._starts = st
        self._lengths = n
        self._prompt_index = torch.arange(len(lengths), device=dev)
        self._shifted = any(starts)
        self._gather: tuple[torch.Tensor, ...] | None = None
        if self.align == "absolute":
            self._valid = (ar[None, :, None] < n[:, None, None]) & (ar[None, None, :] <= ar[None, :, None])
            self._source = None
        else:
            # Relative: grid row g of a prompt with n tokens shows its query token floor(g * n / T); grid column c
            # covers [c n / T, (c + 1) n / T) of its key axis (see the module docstring).
            src = torch.stack([(ar * k) // t for k in lengths])  # [B, padded]
            inside = (ar < t)[None, :]
            # Column c reaches key k <= q when c n / T < q + 1, i.e. c n < (q + 1) T.
            starts_of_columns = ar[None, None, :] * n[:, None, None]
            self._valid = (starts_of_columns < (src[:, :, None] + 1) * t) & inside[:, :, None] & inside[:, None, :]
            self._source = src.clamp_max(n[:, None] - 1)
            if all(k <= t for k in lengths):  # at most two keys meet in a column: gather them
                pairs = [_key_pairs(k, t, self.padded, dev) for k in lengths]
                k0, w0, k1, w1 = (torch.stack(parts) for parts in zip(*pairs, strict=True))  # each [B, padded]
                self._gather = (st[:, None] + self._source, st[:, None] + k0, w0, st[:, None] + k1, w1)
            else:  # a prompt longer than the grid: its columns gather several keys (dense product per prompt)
                self._spread = [_key_spread(k, t, self.padded, dev) for k in lengths]
        self._invalid = ~self._valid  # [B, padded, padded] bool
        # The batch's per-prompt summaries stay on the device until end(): no device-to-host copy (and so no wait
        # for the device) per layer.
        nl, nb = len(self.layers), self.n_blocks
        self._batch_blocks = torch.full((len(lengths), nl, nb, nb), float("nan"), device=dev)
        self._batch_sink = torch.full((len(lengths), nl), float("nan"), device=dev)
        self._batch_entropy = torch.full((len(lengths), nl), float("nan"), device=dev)
        bs, nb = self.bs, self.n_blocks
        self._block_count = self._valid.view(-1, nb, bs, nb, bs).sum((2, 4)).to(torch.float32)
        self._streams = {}
        self._batch = (idx, list(starts), list(lengths))

    def add(self, layer: int, weights: torch.Tensor) -> None:
        """Reduce one layer's weights ``[B, heads, P, P]`` (P = padded batch length) into the accumulators; ``heads``
        may be 1 (the capture engine's chunked path hands over the head mean)."""
        self._reduce(layer, weights.mean(dim=1, dtype=torch.float32).to(self.device), tuple(weights.shape))

    def take_head_mean(self, layer: int, head_mean: torch.Tensor) -> None:
        """:meth:`add` for a head mean ``float32 [B, P, P]`` the caller no longer needs: it is reduced in place
        (overwritten), without the copy :meth:`add` makes of weights it must leave alone."""
        if head_mean.dtype != torch.float32 or head_mean.device != self.device:
            head_mean = head_mean.to(device=self.device, dtype=torch.float32)
        self._reduce(layer, head_mean, tuple(head_mean.shape))

    def _reduce(self, layer: int, head_mean: torch.Tensor, shape: tuple[int, ...]) -> None:
        """The reduction of :meth:`add` on a head mean ``float32 [B, P, P]`` of its own (it overwrites it). Each step
        is one pass over ``[B, P, P]`` at most, in place where the values are not needed again."""
        if self._batch is None:
            raise RuntimeError("GridCollector.add called outside begin()/end()")
        _, starts, lengths = self._batch
        li = self._pos[layer]
        batch, width = head_mean.shape[0], head_mean.shape[-1]
        if head_mean.dim() != 3 or batch != len(lengths) or width != self._rows.shape[1]:
            raise ValueError(f"weights of shape {shape} do not fit the batch begun")
        b = self._prompt_index
        # Per-prompt summaries from each prompt's own n x n map (its rows, its keys), whatever the alignment.
        # torch.where, not a product, drops the rows of padding tokens: they may hold NaN.
        own_rows, n = self._own_rows, self._lengths
        sink = torch.where(own_rows, head_mean[b[:, None], self._rows, self._starts[:, None]], 0.0).sum(1) / n
        # Row entropy over the prompt's own keys, -p ln p summed (0 where p = 0), by blocks of rows: no second
        # [B, P, P] map is alive beside the head mean.
        keys = self._own_keys[:, :, None]
        row_entropy = torch.cat(
            [torch.bmm(torch.special.entr(part), keys) for part in torch.split(head_mean, ENTROPY_ROWS, dim=1)], dim=1
        ).squeeze(-1)  # [B, P]
        entropy = torch.where(own_rows, row_entropy.gather(1, self._rows), 0.0).sum(1) / n
        aligned = self._align(head_mean, starts, lengths)
        del head_mean
        aligned.masked_fill_(self._invalid, 0.0)
        t = self.length
        if self._buf is None:
            if batch == 1:  # no float64 copy of the batch sum: add the one map in place
                self.sums[li].add_(self._pack(aligned[0, :t, :t]).cpu())
            else:  # .cpu(): no copy on the CPU
                self.sums[li] += self._pack(aligned[:, :t, :t].sum(0, dtype=torch.float64)).cpu()
            self._added = True
        else:
            self._buf[li] += self._pack(aligned[:, :t, :t].sum(0, dtype=torch.float32))
        logp = aligned.clamp_min_(math.exp(self.floor)).log_().masked_fill_(self._invalid, 0.0)
        nb, bs = self.n_blocks, self.bs
        blocks = logp.view(-1, nb, bs, nb, bs).sum((2, 4)) / self._block_count
        del logp, aligned
        self._batch_blocks[:, li] = blocks
        self._batch_sink[:, li] = sink
        self._batch_entropy[:, li] = entropy

    def _pack(self, square: torch.Tensor) -> torch.Tensor:
        """A ``[T, T]`` map in the form the sums keep: its lower triangle row by row (absolute), else itself."""
        return square if self._tril is None else square[self._tril]

    def take_rows(self, layer: int) -> Callable[[int, int, torch.Tensor], None] | None:
        """A function that takes ``layer``'s head-mean probabilities of the batch begun by chunks of query rows, as
        the capture engine computes them: ``feed(q0, q1, rows)`` with ``rows`` float32 ``[B, q1 - q0, q1]`` (query
        rows ``q0 .. q1 - 1`` against keys ``0 .. q1 - 1``; later keys are masked for them), the chunks in order from
        row 0 to the padded batch length ``P``. The collector may overwrite ``rows``. ``None`` when this batch
        needs whole maps (relative alignment, left padding): then the engine calls :meth:`add`."""
        if self._batch is None:
            raise RuntimeError("GridCollector.take_rows called outside begin()/end()")
        if self._source is not None or self._shifted:
            return None
        return functools.partial(self._add_rows, self._pos[layer])

    def _add_rows(self, li: int, q0: int, q1: int, rows: torch.Tensor) -> None:
        """Reduce one chunk of rows (see :meth:`take_rows`): the same numbers as :meth:`add` on the whole map, for
        absolute alignment and prompts that start at batch position 0 (so batch row ``i`` is grid row ``i``)."""
        if self._batch is None:
            raise RuntimeError("GridCollector.take_rows' function called outside begin()/end()")
        batch, width = self._rows.shape
        if rows.shape != (batch, q1 - q0, q1) or not 0 <= q0 < q1 <= width:
            raise ValueError(f"rows {q0}..{q1} of shape {tuple(rows.shape)} do not fit the batch begun")
        nb, bs = self.n_blocks, self.bs
        if q0 == 0:
            zeros = torch.zeros(batch, device=rows.device)
            self._streams[li] = (0, zeros, zeros.clone(), torch.zeros(batch, nb, nb, device=rows.device))
        expected = self._streams[li][0] if li in self._streams else 0
        if expected != q0:
            raise RuntimeError(f"rows of layer {self.layers[li]} must come in order: expected row {expected} next")
        _, sink, entropy, blocks = self._streams[li]
        own = self._own_rows[:, q0:q1]
        sink += torch.where(own, rows[:, :, 0], 0.0).sum(1)  # every prompt starts at key 0
        row_entropy = torch.bmm(torch.special.entr(rows), self._own_keys[:, :q1, None]).squeeze(-1)
        entropy += torch.where(own, row_entropy, 0.0).sum(1)
        invalid = self._invalid[:, q0:q1, :q1]
        rows.masked_fill_(invalid, 0.0)
        assert self._tril is not None  # absolute alignment
        lower = self._tril[q0:q1, :q1]
        start, stop = q0 * (q0 + 1) // 2, q1 * (q1 + 1) // 2  # the packed cells of rows q0 .. q1 - 1
        if self._buf is None:
            total = rows[0] if batch == 1 else rows.sum(0, dtype=torch.float64)
            self.sums[li, start:stop] += total[lower].cpu()
            self._added = True
        else:
            self._buf[li, start:stop] += rows.sum(0)[lower]
        logp = rows.clamp_min_(math.exp(self.floor)).log_().masked_fill_(invalid, 0.0)
        column_blocks = -(-q1 // bs)
        logp = F.pad(logp, (0, column_blocks * bs - q1)).view(batch, q1 - q0, column_blocks, bs).sum(-1)
        row_blocks = torch.arange(q0, q1, device=rows.device) // bs
        blocks[:, :, :column_blocks].index_add_(1, row_blocks, logp)
        del logp
        if q1 < width:
            self._streams[li] = (q1, sink, entropy, blocks)
            return
        del self._streams[li]
        self._batch_blocks[:, li] = blocks / self._block_count
        self._batch_sink[:, li] = sink / self._lengths
        self._batch_entropy[:, li] = entropy / self._lengths

    def _align(self, head_mean: torch.Tensor, starts: list[int], lengths: list[int]) -> torch.Tensor:
        """``[B, padded, padded]``: each prompt's map moved onto the grid (see the module docstring); may return
        ``head_mean`` itself, so the caller must not need it afterwards. Cells outside the prompts are not cleared
        here (the caller masks them)."""
        batch, width = head_mean.shape[0], head_mean.shape[-1]
        if self._source is None:  # absolute: the prompt's token i on grid row and column i
            if self._shifted:  # left padding: move each prompt to the top-left corner
                rows = self._rows[:, :, None].expand(batch, width, width)
                head_mean = head_mean.gather(1, rows).gather(2, rows.transpose(1, 2))
            if width == self.padded:
                return head_mean
            aligned = head_mean.new_zeros(batch, self.padded, self.padded)
            aligned[:, :width, :width] = head_mean
            return aligned
        if self._gather is not None:  # relative, each grid cell gathers at most two keys of the row's query
            rows, k0, w0, k1, w1 = self._gather
            shown = head_mean.gather(1, rows[:, :, None].expand(batch, self.padded, width))  # [B, padded, P]
            cols = (batch, self.padded, self.padded)
            aligned = shown.gather(2, k0[:, None, :].expand(cols)).mul_(w0[:, None, :])
            aligned.addcmul_(shown.gather(2, k1[:, None, :].expand(cols)), w1[:, None, :])
            return aligned
        # relative with a prompt longer than the grid
        assert self._source is not None
        aligned = head_mean.new_zeros(batch, self.padded, self.padded)
        for i, (s, k) in enumerate(zip(starts, lengths, strict=True)):
            own_map = head_mean[i, s : s + k, s : s + k]
            aligned[i] = own_map[self._source[i]] @ self._spread[i].T
        return aligned

    def end(self) -> None:
        """Finish a batch: counts and the float64 sums are updated."""
        if self._batch is None:
            raise RuntimeError("GridCollector.end called without begin()")
        if self._streams:
            unfinished = ", ".join(str(self.layers[li]) for li in self._streams)
            raise RuntimeError(f"GridCollector.end: the rows of layer(s) {unfinished} did not reach the end")
        idx, _, lengths = self._batch
        t = self.length
        self.count += self._valid[:, :t, :t].sum(0).to(device="cpu", dtype=torch.int64)
        if self._buf is not None:
            self.sums += self._buf.to(device="cpu", dtype=torch.float64)
            self._buf.zero_()
        self._added = False
        self.lengths[idx] = torch.tensor(lengths, dtype=torch.int64)
        self.blocks[idx] = self._batch_blocks.cpu()
        self.sink[idx] = self._batch_sink.cpu()
        self.entropy[idx] = self._batch_entropy.cpu()
        self.seen[idx] = True
        self._batch = None

    def abort(self) -> bool:
        """Drop the batch in progress (e.g. after an out-of-memory error). Returns whether nothing of it was kept;
        ``False`` (on the CPU, after some of its layers were added) leaves the collector unusable."""
        if self._buf is not None:
            self._buf.zero_()
        clean = not self._added
        self._broken = self._broken or not clean
        self._added = False
        self._batch = None
        self._streams = {}
        return clean

    def _check_whole(self) -> None:
        if self._broken:
            raise RuntimeError("a batch failed after adding to this collector's sums: its results are incomplete")

    STATE_KEYS = ("sums", "count", "lengths", "blocks", "sink", "entropy", "seen")

    def state(self) -> dict[str, torch.Tensor]:
        """Everything accumulated so far (between batches), for checkpoints and cross-process reduction."""
        if self._batch is not None:
            raise RuntimeError("GridCollector.state called inside a batch")
        self._check_whole()
        return {key: getattr(self, key) for key in self.STATE_KEYS}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from :meth:`state` of a collector with the same settings."""
        for key in self.STATE_KEYS:
            mine = getattr(self, key)
            if key == "sums" and self._tril is not None and state[key].shape == (len(self.layers), *self._tril.shape):
                state = {**state, key: state[key][:, self._tril.cpu()]}  # a checkpoint that kept the whole square
            if state[key].shape != mine.shape or state[key].dtype != mine.dtype:
                raise AttnscanError(f"checkpoint state '{key}' does not fit this scan: it was made with other settings")
            mine.copy_(state[key])

    def result(self) -> SetAccumulator:
        """The accumulator for the prompts seen so far (all of them after a full run)."""
        self._check_whole()
        ids = torch.nonzero(self.seen).flatten()
        if self._tril is None:
            sums = self.sums.clone()
        else:  # unfold the packed lower triangle
            t = self.length
            sums = torch.zeros(len(self.layers), t, t, dtype=torch.float64)
            sums[:, self._tril.cpu()] = self.sums
        return SetAccumulator(
            name=self.name,
            layers=self.layers,
            length=self.length,
            floor=self.floor,
            sums=sums,
            count=self.count.clone(),
            prompt_ids=ids,
            lengths=self.lengths[ids].clone(),
            blocks=self.blocks[ids].clone(),
            sink=self.sink[ids].clone(),
            entropy=self.entropy[ids].clone(),
        )
