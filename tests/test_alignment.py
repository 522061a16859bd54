"""Absolute and relative alignment give the documented grids; chat template on the embedded model's tokenizer."""

from __future__ import annotations

import pytest
import torch

from attnscan.accumulate import GridCollector
from attnscan.runner import run_collect
from conftest import build_model, eager_reference, random_prompts

T = 8


def _run(seqs: list[list[int]], align: str, batch_size: int = 2) -> torch.Tensor:
    model = build_model("llama")
    col = GridCollector("s", (1,), len(seqs), T, n_blocks=4, align=align)  # type: ignore[arg-type]
    run_collect(model, seqs, col, route="interface", pad_id=0, batch_size=batch_size)
    acc = col.result()
    return acc.mean(1), acc.count


def test_relative_alignment_stretches_each_prompt_over_the_grid() -> None:
    seqs = random_prompts((4, 3), seed=11)
    mean, count = _run(seqs, "relative")
    model = build_model("llama")
    expected = torch.zeros(T, T, dtype=torch.float64)
    expected_count = torch.zeros(T, T, dtype=torch.int64)
    for seq in seqs:
        ref, _ = eager_reference(model, [seq], [1], len(seq))
        own = ref[1].nan_to_num(0.0)
        src = (torch.arange(T) * len(seq)) // T  # grid index g shows token floor(g * n / T)
        reached = src[None, :] <= src[:, None]
        expected += own[src][:, src] * reached
        expected_count += reached
    assert torch.equal(count, expected_count)
    # The 4-token prompt covers each token twice; the 3-token one covers tokens 0,0,0,1,1,1,2,2.
    assert count[1, 1] == 2 and count[0, 1] == 2 and count[0, 2] == 1 and count[0, 3] == 0
    assert torch.all(count > 0) == torch.all(torch.tril(torch.ones(T, T)) > 0)
    want = torch.where(expected_count > 0, expected / expected_count.clamp_min(1), torch.nan)
    assert (mean - want).nan_to_num(0.0).abs().max() < 1e-5
    assert torch.equal(mean.isnan(), want.isnan())


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
    from attnscan.models import embedded_gguf_path, gguf_to_safetensors

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
