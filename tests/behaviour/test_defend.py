"""Layer-bypass defence: bypass semantics against hand-written forwards, perplexity, similarity and the sweep."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from attnscan.behaviour.defend import (
    DefenceResult,
    bypass_layers,
    chrf,
    defend,
    layer_order,
    nll_sum,
    perplexity,
    sweep,
    sweep_results,
    token_f1,
    trade_off_figure,
)
from attnscan.errors import AttnscanError
from attnscan.models.anatomy import decoder_layers
from attnscan.models.loading import LoadedModel, from_model
from attnscan.prompts.sets import PromptSet
from attnscan.testing.tiny import VOCAB, build_model, random_prompts, tiny_tokenizer

TEXTS = [
    "how do i make bread",
    "tell me a story about the snow and a poem please step by step",
    "hi",
    "write python to kill a process now please",
]


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return from_model(build_model("llama"), tiny_tokenizer(), spec="tiny-llama")


@pytest.fixture(scope="module")
def gpt2() -> LoadedModel:
    return from_model(build_model("gpt2"), tiny_tokenizer(), spec="tiny-gpt2")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.tensor(random_prompts([11], seed=3))


def _causal(p: int) -> torch.Tensor:
    """Additive causal mask ``[1, 1, P, P]``: 0 on and below the diagonal, -inf-like above."""
    upper = torch.triu(torch.ones(p, p, dtype=torch.bool), diagonal=1)
    return torch.zeros(p, p).masked_fill(upper, torch.finfo(torch.float32).min)[None, None]


def llama_without(model: Any, ids: torch.Tensor, skip: set[int]) -> torch.Tensor:
    """Llama by hand: embed_tokens → rotary embeddings → kept decoder layers → final norm → lm_head."""
    core = model.model
    pos = torch.arange(ids.shape[1])[None]
    h = core.embed_tokens(ids)
    cos_sin = core.rotary_emb(h, position_ids=pos)
    mask = _causal(ids.shape[1])
    for i, layer in enumerate(core.layers):
        if i in skip:
            continue
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin, use_cache=False)
    logits: torch.Tensor = model.lm_head(core.norm(h))
    return logits


def gpt2_without(model: Any, ids: torch.Tensor, skip: set[int]) -> torch.Tensor:
    """GPT-2 by hand: token + position embeddings → kept blocks → ln_f → lm_head."""
    core = model.transformer
    h = core.wte(ids) + core.wpe(torch.arange(ids.shape[1])[None])
    mask = _causal(ids.shape[1])
    for i, block in enumerate(core.h):
        if i in skip:
            continue
        out = block(h, attention_mask=mask, use_cache=False)
        h = out[0] if isinstance(out, tuple) else out
    logits: torch.Tensor = model.lm_head(core.ln_f(h))
    return logits


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(ids, use_cache=False).logits
    return out


@pytest.mark.parametrize(("arch", "by_hand"), [("llama", llama_without), ("gpt2", gpt2_without)])
def test_bypass_matches_hand_written_forward(arch: str, by_hand: Any, ids: torch.Tensor) -> None:
    model = build_model(arch)
    plain = _logits(model, ids)
    with bypass_layers(model, []) as chosen:
        assert chosen == ()
        assert torch.equal(_logits(model, ids), plain)
    with torch.no_grad():
        torch.testing.assert_close(by_hand(model, ids, set()), plain, atol=1e-5, rtol=0)
        expected = by_hand(model, ids, {1})
    with bypass_layers(model, [1]) as chosen:
        assert chosen == (1,)
        skipped = _logits(model, ids)
    torch.testing.assert_close(skipped, expected, atol=1e-5, rtol=0)
    assert (skipped - plain).abs().max() > 1e-3, "bypassing a layer must change the output"
    assert torch.equal(_logits(model, ids), plain), "the model must be restored on exit"


def test_bypass_several_layers_and_negative_index(ids: torch.Tensor) -> None:
    model = build_model("llama")
    with torch.no_grad():
        expected = llama_without(model, ids, {0, 2})
    with bypass_layers(model, "0,-1") as chosen:
        assert chosen == (0, 2)
        torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)


def test_bypass_restores_after_exception(llama: LoadedModel, ids: torch.Tensor) -> None:
    stack = decoder_layers(llama.model)
    before = [dict(layer._forward_hooks) for layer in stack]
    with pytest.raises(RuntimeError, match="inside"), bypass_layers(llama, [0, 1]):
        raise RuntimeError("inside")
    assert [dict(layer._forward_hooks) for layer in stack] == before

    def fail(module: Any, args: Any, output: Any) -> None:
        raise ValueError("forward failed")

    handle = stack[2].register_forward_hook(fail)
    try:
        with pytest.raises(ValueError, match="forward failed"), bypass_layers(llama, [1]):
            _logits(llama.model, ids)
    finally:
        handle.remove()
    assert [dict(layer._forward_hooks) for layer in stack] == before


def test_bypass_tuple_outputs() -> None:
    class Layer(torch.nn.Module):
        def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, str]:
            return hidden_states * 2, "extra"

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"num_hidden_layers": 2})()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

    toy = Toy()
    x = torch.ones(1, 2, 3)
    with bypass_layers(toy, [0]):
        out = toy.layers[0](x)
        assert out[0] is x and out[1] == "extra"
        assert torch.equal(toy.layers[1](hidden_states=x)[0], 2 * x)
    assert torch.equal(toy.layers[0](x)[0], 2 * x)


def test_bypass_bad_layer(llama: LoadedModel) -> None:
    with pytest.raises(AttnscanError, match="layer 5 out of range: model has 3 layers"):
        with bypass_layers(llama, [5]):
            pass


# --------------------------------------------------------------------------------------------------- perplexity


def test_perplexity_of_uniform_model_is_vocab_size() -> None:
    model = build_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    loaded = from_model(model, tiny_tokenizer())
    assert perplexity(loaded, TEXTS, batch_size=3, chunk_tokens=5) == pytest.approx(VOCAB, rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_is_token_weighted_model_loss(arch: str) -> None:
    loaded = from_model(build_model(arch), tiny_tokenizer())
    tok = loaded.tokenizer
    total, count = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tok(text)["input_ids"]])
            if ids.shape[1] < 2:
                continue
            loss = loaded.model(ids, labels=ids, use_cache=False).loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    got_total, got_count = nll_sum(loaded, TEXTS, batch_size=3, chunk_tokens=4)
    assert got_count == count
    assert got_total == pytest.approx(total, rel=1e-5)
    assert perplexity(loaded, TEXTS, batch_size=2) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_applies_final_softcapping() -> None:
    model = build_model("gemma3", final_logit_softcapping=0.5)
    loaded = from_model(model, tiny_tokenizer())
    ids = torch.tensor([loaded.tokenizer(TEXTS[1])["input_ids"]])
    with torch.no_grad():
        loss = float(model(ids, labels=ids, use_cache=False).loss)
    assert perplexity(loaded, TEXTS[1:2]) == pytest.approx(math.exp(loss), rel=1e-5)


# --------------------------------------------------------------------------------------------------- similarity


def test_similarity_measures() -> None:
    assert chrf("the same answer", "the same answer") == 1.0
    assert chrf("abc", "xyz") == 0.0
    assert chrf("", "") == 1.0 and chrf("", "x") == 0.0
    assert 0.0 < chrf("bread with flour", "bread with water") < 1.0
    assert chrf("a b", "ab") == 1.0  # white space is ignored
    assert token_f1("The cat sat", "the cat ran") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0 and token_f1("a", "b") == 0.0


# --------------------------------------------------------------------------------------------------- defend / sweep


def test_defend_and_save(llama: LoadedModel, tmp_path: Path) -> None:
    jb = PromptSet("jailbreak", tuple(TEXTS[:2]), "<memory>")
    bn = PromptSet("benign", tuple(TEXTS[2:]), "<memory>")
    calls: list[tuple[int, int, str]] = []
    result = defend(llama, jb, bn, [1], max_new_tokens=3, batch_size=2, progress=lambda *a: calls.append(a))
    assert isinstance(result, DefenceResult) and result.layers == (1,)
    assert calls[-1][0] == calls[-1][1] == 2 * (2 + 2 + 2)  # two variants x (jailbreak + benign + ppl texts)
    table = result.table()
    assert list(table["variant"]) == ["baseline", "bypass"]
    base, byp = table.iloc[0], table.iloc[1]
    assert base["benign_chrf"] == 1.0 and base["k"] == 0 and byp["k"] == 1
    assert byp["perplexity"] != base["perplexity"]
    assert 0.0 <= byp["benign_retention_low"] <= byp["benign_retention"] <= byp["benign_retention_high"] <= 1.0
    with bypass_layers(llama, [1]):
        ppl = perplexity(llama, bn)
    assert byp["perplexity"] == pytest.approx(ppl)
    saved = result.save(tmp_path / "defence")
    assert {p.name for p in saved.iterdir()} == {"responses.jsonl", "defence.csv", "defence.json"}
    assert len(result.records()) == 2 * 4
    with pytest.raises(AttnscanError, match="already holds defence results"):
        result.save(tmp_path / "defence")
    no_ppl = defend(llama, jb, bn, [0], max_new_tokens=2, ppl_texts=False, baseline=result.baseline)
    assert math.isnan(no_ppl.row()["perplexity"]) and no_ppl.baseline is result.baseline


def test_sweep_one_row_per_k(llama: LoadedModel) -> None:
    jb, bn = TEXTS[:2], TEXTS[2:]
    table = sweep(llama, [2, 0, 1], [0, 1, 3], jailbreak=jb, benign=bn, max_new_tokens=2, ppl_texts=TEXTS, batch_size=4)
    assert list(table["k"]) == [0, 1, 3]
    assert list(table["layers"]) == ["", "2", "0,1,2"]
    assert table.loc[0, "benign_chrf"] == 1.0 and table.loc[0, "perplexity_ratio"] == 1.0
    assert table.attrs["baseline"]["k"] == 0
    fig = trade_off_figure(table)
    points: dict[tuple[float, float], list[str]] = {}
    for _, row in table.iterrows():
        points.setdefault((row["benign_retention"], row["jailbreak_refusal_rate"]), []).append(str(row["k"]))
    assert [t.get_text() for t in fig.axes[0].texts] == ["k=" + ",".join(ks) for ks in points.values()]
    results = sweep_results(llama, [1], [1], jailbreak=jb, benign=bn, max_new_tokens=2, ppl_texts=False)
    assert len(results) == 1 and results[0].layers == (1,)


def test_trade_off_labels_merge_coinciding_points_and_keep_apart() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    # k=2 and k=4 coincide; k=6, k=8 and k=10 sit within a label's height of them; k=12 coincides with k=0
    table = pd.DataFrame(
        {
            "k": [0, 1, 2, 4, 6, 8, 10, 12],
            "benign_retention": [1.0, 0.9, 0.5, 0.5, 0.51, 0.5, 0.49, 1.0],
            "jailbreak_refusal_rate": [0.2, 0.5, 0.8, 0.8, 0.81, 0.79, 0.8, 0.2],
        }
    )
    fig = trade_off_figure(table)
    texts = fig.axes[0].texts
    assert [t.get_text() for t in texts] == ["k=0,12", "k=1", "k=2,4", "k=6", "k=8", "k=10"]
    assert [t.xy for t in texts] == [(1.0, 0.2), (0.9, 0.5), (0.5, 0.8), (0.51, 0.81), (0.5, 0.79), (0.49, 0.8)]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # lay out and measure as when saving
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert len({tuple(b.extents.round(3)) for b in boxes}) == len(texts)
    for i, a in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            assert not a.overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())


def test_sweep_bad_input(llama: LoadedModel) -> None:
    opts: dict[str, Any] = {"jailbreak": TEXTS[:1], "benign": TEXTS[1:2], "max_new_tokens": 1}
    with pytest.raises(AttnscanError, match="out of range"):
        sweep(llama, [0, 9], [1], **opts)
    with pytest.raises(AttnscanError, match="k=3 out of range"):
        sweep(llama, [0, 1], [3], **opts)
    with pytest.raises(AttnscanError, match="twice"):
        sweep(llama, [0, 0], [1], **opts)
    with pytest.raises(AttnscanError, match="no k values"):
        sweep(llama, [0], [], **opts)


def test_layer_order() -> None:
    table = pd.DataFrame({"layer": [0, 1, 2, 3], "cp_auroc": [0.6, 0.9, float("nan"), 0.9]})
    assert layer_order(table, "cp_auroc") == [1, 3, 0, 2]
    assert layer_order(table, "cp_auroc", descending=False) == [0, 1, 3, 2]
    with pytest.raises(AttnscanError, match="no column 'nope'"):
        layer_order(table, "nope")
