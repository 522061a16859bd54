"""GridCollector's per-prompt summaries, sums and counts against a slow, obvious reference written from the
documented definitions (one prompt, one grid cell at a time, in float64).

Only the public API is used: ``GridCollector(...)``, ``begin(prompt_ids, starts, lengths)``,
``add(layer, weights[B, heads, P, P])``, ``end()``, ``result()``. The batches are laid out the way a tokenizer pads
them (right padding: every prompt starts at 0; left padding: prompts end at the batch's last position), padding
rows hold NaN (a fully masked query row) and padding keys get probability 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnscan.engine.accumulate import GridCollector
from attnscan.errors import AttnscanError

FLOOR = -10.0  # the documented default floor: ln(max(p, e^-10))
LAYERS = (3, 1)  # layer ids that differ from their positions
HEADS = 3


def causal_maps(n: int, rng: np.random.Generator, window: int | None = None) -> np.ndarray:
    """``[layers, heads, n, n]`` random causal attention rows; with ``window`` only the last ``window`` keys of each
    row get attention (a sliding-window model: exact zeros inside the causal triangle)."""
    logits = rng.normal(0, 2, (len(LAYERS), HEADS, n, n))
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = j <= i if window is None else (j <= i) & (j > i - window)
    p = np.where(allowed, np.exp(logits), 0.0)
    return p / p.sum(-1, keepdims=True)


def overlap(c: int, k: int, n: int, t: int) -> float:
    """Share of key token ``k`` (the interval [k, k + 1)) that grid column ``c`` (the interval [c n / t, (c + 1) n / t)
    of the key axis) covers."""
    return max(0.0, min((c + 1) * n / t, k + 1.0) - max(c * n / t, float(k)))


def reference_grid(p: np.ndarray, t: int, align: str) -> tuple[np.ndarray, np.ndarray]:
    """One prompt's head-mean map ``p [n, n]`` on the ``t x t`` grid: the values and which cells it reaches."""
    n = p.shape[0]
    grid = np.zeros((t, t))
    reach = np.zeros((t, t), dtype=bool)
    for g in range(t):
        for c in range(t):
            if align == "absolute":
                if g < n and c <= g:
                    grid[g, c], reach[g, c] = p[g, c], True
            else:
                q = g * n // t  # the query token row g shows
                if c * n / t < q + 1:  # the column starts before the end of the last key q may attend to
                    reach[g, c] = True
                    grid[g, c] = sum(p[q, k] * overlap(c, k, n, t) for k in range(n))
    return grid, reach


def reference_summaries(
    p: np.ndarray, t: int, n_blocks: int, align: str
) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """``(grid, reach, sink, entropy, blocks)`` of one prompt's head-mean map ``p [n, n]``."""
    n = p.shape[0]
    grid, reach = reference_grid(p, t, align)
    sink = float(np.mean([p[i, 0] for i in range(n)]))
    entropy = float(np.mean([-sum(x * math.log(x) for x in p[i] if x > 0) for i in range(n)]))
    bs = math.ceil(t / n_blocks)
    blocks = np.full((n_blocks, n_blocks), np.nan)
    for bi in range(n_blocks):
        for bj in range(n_blocks):
            logs = [
                math.log(max(grid[g, c], math.exp(FLOOR)))
                for g in range(bi * bs, min((bi + 1) * bs, t))
                for c in range(bj * bs, min((bj + 1) * bs, t))
                if reach[g, c]
            ]
            if logs:
                blocks[bi, bj] = np.mean(logs)
    return grid, reach, sink, entropy, blocks


def batch_weights(maps: list[np.ndarray], side: str) -> tuple[torch.Tensor, list[int]]:
    """One layer's ``[B, heads, P, P]`` padded batch of per-prompt ``[heads, n, n]`` maps, and the prompts' starts."""
    width = max(m.shape[-1] for m in maps)
    out = torch.zeros(len(maps), HEADS, width, width, dtype=torch.float32)
    starts = []
    for b, m in enumerate(maps):
        n = m.shape[-1]
        s = width - n if side == "left" else 0
        starts.append(s)
        pad_rows = [r for r in range(width) if not s <= r < s + n]
        out[b, :, pad_rows, :] = float("nan")  # a padding query attends to nothing: NaN, as SDPA gives
        out[b, :, s : s + n, s : s + n] = torch.from_numpy(m)
    return out, starts


def run_and_compare(
    lengths: list[list[int]],
    t: int,
    align: str,
    side: str,
    window: int | None = None,
    rows: int | None = None,
    buffered: bool = False,
) -> None:
    """Feed batches of prompts of the given lengths through a collector and compare everything with the
    reference (``lengths``: one list per batch). With ``rows``, each layer's head mean goes in by chunks of that
    many query rows through ``take_rows`` (the capture engine's way), where the collector offers it; ``buffered``
    puts each batch's sums in the float32 buffer accelerators use first."""
    rng = np.random.default_rng(sum(map(sum, lengths)) + t)
    n_blocks = 4
    n_prompts = sum(len(b) for b in lengths)
    col = GridCollector("s", LAYERS, n_prompts, t, n_blocks=n_blocks, align=align, buffered=buffered)  # type: ignore[arg-type]
    expected_sums = np.zeros((len(LAYERS), t, t))
    expected_count = np.zeros((t, t), dtype=np.int64)
    expected_blocks = np.zeros((n_prompts, len(LAYERS), n_blocks, n_blocks))
    expected_sink = np.zeros((n_prompts, len(LAYERS)))
    expected_entropy = np.zeros((n_prompts, len(LAYERS)))
    expected_lengths = np.zeros(n_prompts, dtype=np.int64)
    # Prompt ids out of order, so a mix-up of batch rows and prompt ids shows.
    ids = list(rng.permutation(n_prompts))
    for batch in lengths:
        batch_ids = [int(ids.pop()) for _ in batch]
        maps = [causal_maps(n, rng, window) for n in batch]
        expected_lengths[batch_ids] = batch
        starts: list[int] = []
        for li, layer in enumerate(LAYERS):
            weights, starts = batch_weights([m[li] for m in maps], side)
            if li == 0:
                col.begin(batch_ids, starts, batch)
            feed = col.take_rows(layer) if rows else None
            assert (feed is not None) == bool(rows and align == "absolute" and side == "right")
            if feed is None:
                col.add(layer, weights)
            else:
                head_mean = weights.mean(1)
                width = head_mean.shape[-1]
                for q0 in range(0, width, rows or width):
                    q1 = min(width, q0 + (rows or width))
                    feed(q0, q1, head_mean[:, q0:q1, :q1].clone())
            for pid, m in zip(batch_ids, maps, strict=True):
                grid, reach, sink, ent, blocks = reference_summaries(m[li].mean(0), t, n_blocks, align)
                expected_sums[li] += grid * reach
                if li == 0:
                    expected_count += reach
                expected_blocks[pid, li], expected_sink[pid, li], expected_entropy[pid, li] = blocks, sink, ent
        col.end()
    res = col.result()
    assert res.prompt_ids.tolist() == list(range(n_prompts))
    assert res.lengths.tolist() == expected_lengths.tolist()
    np.testing.assert_array_equal(res.count.numpy(), expected_count)
    np.testing.assert_allclose(res.sums.numpy(), expected_sums, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.blocks.numpy(), expected_blocks, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.sink.numpy(), expected_sink, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.entropy.numpy(), expected_entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("align", ["absolute", "relative"])
def test_prompts_shorter_than_the_grid(align: str, side: str) -> None:
    run_and_compare([[5, 9, 3], [12, 7]], 12, align, side)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("buffered", [False, True])
def test_rows_fed_by_chunks_match_the_reference(rows: int, window: int | None, buffered: bool) -> None:
    """The capture engine hands absolute, right-padded batches over by chunks of query rows (take_rows): chunks of
    one row, chunks that cut across the summary blocks (5 rows, blocks of 4 cells) and one chunk for everything;
    into the float64 sums directly (the CPU) or through the float32 batch buffer (accelerators)."""
    run_and_compare([[14, 9, 16], [16, 6]], 16, "absolute", "right", window=window, rows=rows, buffered=buffered)


@pytest.mark.parametrize("align", ["absolute", "relative"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_only_absolute_right_padded_batches_go_by_rows(align: str, side: str) -> None:
    """Relative alignment and left padding need the whole map (the grid row of a batch row differs by prompt)."""
    run_and_compare([[5, 9, 3], [12, 7]], 12, align, side, rows=4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_relative_alignment_with_prompts_longer_than_the_grid(side: str) -> None:
    run_and_compare([[5, 17, 10], [13, 4]], 10, "relative", side)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("align", ["absolute", "relative"])
def test_a_sliding_window_map_reaches_the_floor(align: str, side: str) -> None:
    """Keys out of the window get probability exactly 0: their cells enter the blocks at the floor -10, so the
    lowest block of a long prompt sits far below the others but never under -10."""
    run_and_compare([[14, 9, 16], [16, 6]], 16, align, side, window=3)
    col = GridCollector("s", LAYERS, 1, 16, n_blocks=4, align=align)  # type: ignore[arg-type]
    maps = causal_maps(16, np.random.default_rng(0), window=3)
    weights, starts = batch_weights([maps[0]], side)
    col.begin([0], starts, [16])
    col.add(LAYERS[0], weights)
    col.add(LAYERS[1], batch_weights([maps[1]], side)[0])
    col.end()
    corner = float(col.result().blocks[0, 0, 3, 0])  # rows 12-15, keys 0-3: all outside the window
    assert corner == pytest.approx(FLOOR)


def test_rows_that_do_not_fit_or_come_out_of_order_are_refused() -> None:
    """The function take_rows gives checks what it is handed: rows outside the batch or of the wrong shape, a gap
    or a repeat in the order, a batch ended before a layer's last row, a feed outside begin()/end()."""
    col = GridCollector("s", LAYERS, 2, 8, n_blocks=4)
    with pytest.raises(RuntimeError, match="outside begin"):
        col.take_rows(LAYERS[0])
    col.begin([0, 1], [0, 0], [5, 3])  # the batch is 5 wide
    feed = col.take_rows(LAYERS[0])
    assert feed is not None
    rows = torch.full((2, 2, 2), 0.5)
    with pytest.raises(ValueError, match=r"rows 0\.\.2 of shape \(2, 2, 3\) do not fit"):
        feed(0, 2, torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="do not fit"):
        feed(0, 6, torch.zeros(2, 6, 6))  # past the batch's width
    with pytest.raises(ValueError, match="do not fit"):
        feed(2, 2, torch.zeros(2, 0, 2))  # no rows
    with pytest.raises(RuntimeError, match="must come in order: expected row 0 next"):
        feed(2, 4, torch.zeros(2, 2, 4))  # rows 0 and 1 never came
    feed(0, 2, rows)
    with pytest.raises(RuntimeError, match="must come in order: expected row 2 next"):
        feed(3, 5, torch.zeros(2, 2, 5))  # row 2 skipped
    with pytest.raises(RuntimeError, match=rf"layer\(s\) {LAYERS[0]} did not reach the end"):
        col.end()
    assert col.abort() is False  # rows were added to the sums already
    with pytest.raises(RuntimeError, match="outside begin"):
        feed(2, 5, torch.zeros(2, 3, 5))


def test_a_layer_that_was_not_captured_is_named_with_the_captured_ones() -> None:
    col = GridCollector("s", LAYERS, 1, 8, n_blocks=4)
    col.begin([0], [0], [8])
    for layer in LAYERS:
        col.add(layer, torch.full((1, 2, 8, 8), 1 / 8).tril())
    col.end()
    with pytest.raises(AttnscanError, match=r"^layer 2 was not captured: captured layers are 3, 1$"):
        col.result().mean(2)
