"""Absolute and relative alignment give the documented grids; chat template on the embedded model's tokenizer."""

from __future__ import annotations

import pytest
import torch

from attnscan.engine.accumulate import GridCollector
from attnscan.engine.batching import run_collect
from attnscan.testing.tiny import build_model, eager_reference, random_prompts

T = 8


def _run(seqs: list[list[int]], align: str, batch_size: int = 2) -> torch.Tensor:
    model = build_model("llama")
    col = GridCollector("s", (1,), len(seqs), T, n_blocks=4, align=align)  # type: ignore[arg-type]
    run_collect(model, seqs, col, route="interface", pad_id=0, batch_size=batch_size)
    acc = col.result()
    return acc.mean(1), acc.count


def _stretched(own: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented relative grid of one prompt's ``n x n`` map, cell by cell with exact fractions: row g shows
    query floor(g n / T); column c takes from key k the share of k's interval [k, k+1) that [c n/T, (c+1) n/T)
    covers; a cell is reached when its column covers part of a key <= the row's query."""
    from fractions import Fraction

    grid = torch.zeros(T, T, dtype=torch.float64)
    reached = torch.zeros(T, T, dtype=torch.bool)
    for g in range(T):
        q = (g * n) // T
        for c in range(T):
            lo, hi = Fraction(c * n, T), Fraction((c + 1) * n, T)
            for k in range(q + 1):
                share = max(Fraction(0), min(hi, Fraction(k + 1)) - max(lo, Fraction(k)))
                if share > 0:
                    reached[g, c] = True
                    grid[g, c] += float(own[q, k]) * float(share)
    return grid, reached


@pytest.mark.parametrize("lengths", [(4, 3), (4, 11)])  # 11 > T: columns then gather several keys
def test_relative_alignment_stretches_each_prompt_over_the_grid(lengths: tuple[int, int]) -> None:
    seqs = random_prompts(lengths, seed=11)
    mean, count = _run(seqs, "relative")
    model = build_model("llama")
    expected = torch.zeros(T, T, dtype=torch.float64)
    expected_count = torch.zeros(T, T, dtype=torch.int64)
    for seq in seqs:
        ref, _ = eager_reference(model, [seq], [1], len(seq))
        grid, reached = _stretched(ref[1].nan_to_num(0.0), len(seq))
        # Every stretched row is still a probability distribution over the grid's columns.
        assert torch.allclose(grid.sum(1), torch.ones(T, dtype=torch.float64), atol=1e-6)
        expected += grid
        expected_count += reached
    assert torch.equal(count, expected_count)
    if lengths == (4, 3):
        # The 4-token prompt covers each token twice; the 3-token one shows queries 0,0,0,1,1,1,2,2 and spreads
        # each key over 8/3 columns, so its row 0 reaches columns 0-2 (the last one partly).
        assert count[1, 1] == 2 and count[0, 1] == 2 and count[0, 2] == 1 and count[0, 3] == 0
    assert torch.all(count[torch.tril(torch.ones(T, T)) > 0] > 0)
    want = torch.where(expected_count > 0, expected / expected_count.clamp_min(1), torch.nan)
    assert (mean - want).nan_to_num(0.0).abs().max() < 1e-5
    assert torch.equal(mean.isnan(), want.isnan())


def test_relative_alignment_does_not_inflate_short_prompts() -> None:
    """Uniform attention looks the same on the grid whatever the prompt's length: a stretched 3-token prompt whose
    query attends uniformly puts 1/(row's reach) in each reached column, like an 8-token prompt does."""
    own = torch.tril(torch.ones(3, 3, dtype=torch.float64))
    own = own / own.sum(1, keepdim=True)
    grid, reached = _stretched(own, 3)
    row_sums = grid.sum(1)
    assert torch.allclose(row_sums, torch.ones(T, dtype=torch.float64))
    # Last row: query token 2 attends 1/3 to each key; keys spread over 8/3 columns -> each column ~ 1/8.
    assert torch.allclose(grid[T - 1], torch.full((T,), 1 / T, dtype=torch.float64))
    col = GridCollector("s", (0,), 1, T, n_blocks=4, align="relative")
    col.begin([0], [0], [3])
    col.add(0, own.to(torch.float32)[None, None])
    col.end()
    got = col.result().mean(0)
    assert torch.allclose(got.nan_to_num(0.0), grid, atol=1e-6)
    assert torch.equal(~got.isnan(), reached)


def test_alignments_agree_when_prompts_fill_the_grid() -> None:
    seqs = random_prompts((T, T, T), seed=12)
    rel, rel_count = _run(seqs, "relative")
    ab, ab_count = _run(seqs, "absolute")
    assert torch.equal(rel_count, ab_count)
    assert torch.allclose(rel, ab, equal_nan=True)


def test_absolute_alignment_reaches_only_each_prompts_own_cells() -> None:
    _, count = _run(random_prompts((2, 5), seed=13), "absolute")
    assert count[1, 0] == 2 and count[4, 3] == 1 and count[5, 0] == 0 and count[0, 1] == 0


@pytest.mark.slow
def test_chat_template_on_the_embedded_tokenizer() -> None:
    from transformers import AutoTokenizer

    from attnscan import encode
    from attnscan.models.gguf_cache import embedded_gguf_path, gguf_to_safetensors

    tok = AutoTokenizer.from_pretrained(str(gguf_to_safetensors(embedded_gguf_path())))
    text = "How do I kill a Python process that hangs?"
    templ = encode(tok, [text], 448)
    plain = encode(tok, [text], 448, chat_template=False)
    sys_prompt = encode(tok, [text], 448, system_prompt="Answer briefly.")
    decoded = tok.decode(list(templ.ids[0]))
    assert templ.chat_template and "<|im_start|>user" in decoded and decoded.rstrip().endswith("assistant")
    assert "<|im_start|>system" in decoded  # SmolLM2's template adds its own default system turn
    assert "Answer briefly." in tok.decode(list(sys_prompt.ids[0]))
    assert not plain.chat_template and "<|im_start|>" not in tok.decode(list(plain.ids[0]))
    assert templ.lengths[0] > plain.lengths[0] + 10


def _per_prompt_reference(
    col: GridCollector, weights: torch.Tensor, starts: list[int], lengths: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompt at a time, from its own n x n map: sink (mean attention on its first token), entropy (mean row
    entropy over its own keys) and the grid it puts into the sums (documented alignment, cell by cell)."""
    head_mean = weights.double().mean(1)
    sink, entropy, grids = [], [], []
    for b, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        own = head_mean[b, s : s + n, s : s + n]
        sink.append(own[:, 0].mean())
        entropy.append(-(own * torch.log(own.clamp_min(1e-30))).sum(-1).mean())
        if col.align == "absolute":
            grid = torch.zeros(T, T, dtype=torch.float64)
            grid[:n, :n] = own
        else:
            grid, _ = _stretched(own, n)
        grids.append(grid)
    return torch.stack(sink), torch.stack(entropy), torch.stack(grids).sum(0)


@pytest.mark.parametrize("align", ["absolute", "relative"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_reduction_equals_a_prompt_by_prompt_one(align: str, side: str) -> None:
    """The collector reduces a whole batch at once; each prompt's summaries and its share of the sums must equal
    those of its own map taken alone. Padding rows hold NaN and padding columns hold junk, so that any leak from
    them shows."""
    lengths = [8, 5, 3, 7] if align == "absolute" else [8, 5, 3, 11]  # 11 > T: the dense relative branch
    width = max(lengths)
    starts = [0] * len(lengths) if side == "right" else [width - n for n in lengths]
    torch.manual_seed(3)
    weights = torch.full((len(lengths), 3, width, width), 0.3)  # junk on padding keys (a real map has 0 there)
    for b, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        weights[b, :, s : s + n, s : s + n] = torch.softmax(torch.randn(3, n, n).masked_fill(~causal, -torch.inf), -1)
        weights[b, :, :s] = float("nan")  # rows of padding tokens
        weights[b, :, s + n :] = float("nan")
    col = GridCollector("s", (0,), len(lengths), T, n_blocks=4, align=align)  # type: ignore[arg-type]
    col.begin(list(range(len(lengths))), starts, lengths)
    col.add(0, weights)
    col.end()
    acc = col.result()
    sink, entropy, sums = _per_prompt_reference(col, weights, starts, lengths)
    assert torch.allclose(acc.sink[:, 0].double(), sink, atol=1e-6)
    assert torch.allclose(acc.entropy[:, 0].double(), entropy, atol=1e-5)
    assert not acc.blocks.isnan().all(-1).all(-1).any()  # every prompt reaches some block
    assert torch.allclose(acc.sums[0], sums, atol=1e-5)
