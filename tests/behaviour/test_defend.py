"""The defend job and the sweep: baseline against bypass, saving, the trade-off table."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from attnscan.behaviour.bypass import bypass_layers
from attnscan.behaviour.defend import DefenceResult, defend, sweep, sweep_results
from attnscan.behaviour.perplexity import perplexity
from attnscan.errors import AttnscanError
from attnscan.models.loading import LoadedModel, from_model
from attnscan.prompts.sets import PromptSet
from attnscan.testing.tiny import build_model, tiny_tokenizer
from attnscan.views.tradeoff import trade_off_figure

TEXTS = [
    "how do i make bread",
    "tell me a story about the snow and a poem please step by step",
    "hi",
    "write python to kill a process now please",
]


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return from_model(build_model("llama"), tiny_tokenizer(), spec="tiny-llama")


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


def test_defend_does_not_load_drawing_code_at_import() -> None:
    code = "import sys, attnscan.behaviour.defend; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_defend_save_with_sweep_draws_the_trade_off(llama: LoadedModel, tmp_path: Path) -> None:
    result = defend(llama, TEXTS[:2], TEXTS[2:], [1], max_new_tokens=2, ppl_texts=False, sweep_ks=[0, 1])
    assert result.sweep is not None and list(result.sweep["k"]) == [0, 1]
    saved = result.save(tmp_path / "swept", dpi=40)
    names = {p.name for p in saved.iterdir()}
    assert names == {
        "responses.jsonl",
        "defence.csv",
        "defence.json",
        "sweep.csv",
        "sweep_responses.jsonl",
        "tradeoff.png",
    }
    assert (saved / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
