"""Per-layer statistics on synthetic accumulators with planted, known shifts (no model needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
import torch

from attnscan import AttnscanError, ScanResult
from attnscan.analysis.statistics import (
    NO_SHIFT,
    VerdictThresholds,
    benjamini_hochberg,
    bootstrap_ci,
    effects_table,
    layer_table,
    observations,
    permutation_test,
    standardized_effect,
)
from attnscan.engine.accumulate import SetAccumulator

T = 16
B = 4
BS = T // B
# Layer ids differ from their positions on purpose: a mix-up of the two would show.
LAYERS = (0, 2, 5, 7)
N = 30
CAUSAL = np.tril(np.ones((T, T), dtype=bool))
LOWER_BLOCKS = [(r, c) for r in range(B) for c in range(r + 1)]  # the 10 blocks with causal cells
BASE_LOG = np.where(CAUSAL, -np.log(np.arange(1, T + 1))[:, None], 0.0)  # uniform causal attention rows

Plant = Mapping[int, "float | npt.NDArray[np.float64]"]


def make_set(
    name: str,
    seed: int,
    *,
    n: int = N,
    blocks: Plant | None = None,
    maps: Plant | None = None,
    sink: float = 0.3,
    entropy: float = 1.5,
) -> SetAccumulator:
    """A set accumulator with known contents.

    Per-prompt block log attention = a position baseline + the planted shift of that layer + a prompt-level random
    effect N(0, 0.3²) shared by the prompt's blocks (centred within the set) + block noise N(0, 0.5²); NaN where
    the prompt (length 9..16, one prompt of full length) reaches no cell of the block. The mean map of layer L is
    exp(BASE_LOG + maps[L]), so ``ScanResult.log`` returns exactly BASE_LOG + maps[L] on the causal cells.
    ``sink`` and ``entropy`` are constant per prompt, so their set means are known.
    """
    rng = np.random.default_rng(seed)
    nl = len(LAYERS)
    lengths = rng.integers(9, T + 1, size=n)
    lengths[0] = T
    shift = np.zeros((nl, B, B))
    for layer, value in (blocks or {}).items():
        shift[LAYERS.index(layer)] = value
    base = -np.log((np.arange(B)[:, None] + 1.0) * BS) * np.ones((B, B))
    prompt_effect = rng.normal(0, 0.3, (n, 1, 1, 1))
    prompt_effect -= prompt_effect.mean()  # centred, so no chance offset is shared by all layers of a set
    values = base + shift + prompt_effect + rng.normal(0, 0.5, (n, nl, B, B))
    row_reached = np.arange(B)[None, :] * BS < lengths[:, None]  # [n, B]
    reached = row_reached[:, :, None] & np.tril(np.ones((B, B), dtype=bool))[None]
    values = np.where(reached[:, None], values, np.nan)
    rows = np.arange(T)[None, :, None] < lengths[:, None, None]
    count = (rows & CAUSAL[None]).sum(0)
    log_maps = np.stack([BASE_LOG + (maps or {}).get(layer, 0.0) for layer in LAYERS])
    sums = count[None] * np.where(CAUSAL, np.exp(log_maps), 0.0)
    return SetAccumulator(
        name=name,
        layers=LAYERS,
        length=T,
        floor=-10.0,
        sums=torch.tensor(sums, dtype=torch.float64),
        count=torch.tensor(count, dtype=torch.int64),
        prompt_ids=torch.arange(n),
        lengths=torch.tensor(lengths, dtype=torch.int64),
        blocks=torch.tensor(values, dtype=torch.float32),
        sink=torch.full((n, nl), sink, dtype=torch.float32),
        entropy=torch.full((n, nl), entropy, dtype=torch.float32),
    )


def cell_plant(seed: int, frac_up: float, up: float, down: float) -> npt.NDArray[np.float64]:
    """A [T, T] map difference: ``up`` on a random ``frac_up`` of the causal cells, ``down`` on the rest."""
    rng = np.random.default_rng(seed)
    raised = rng.random((T, T)) < frac_up
    return np.where(CAUSAL, np.where(raised, up, down), 0.0)


def bipolar_blocks(value: float) -> npt.NDArray[np.float64]:
    """+value on half of the lower blocks, -value on the other half (signed mean exactly 0)."""
    out = np.zeros((B, B))
    for i, (r, c) in enumerate(LOWER_BLOCKS):
        out[r, c] = value if i % 2 == 0 else -value
    return out


UP = cell_plant(11, 0.85, 0.5, -0.2)
DOWN = -cell_plant(12, 0.85, 0.5, -0.2)
BIPOLAR_MAP = cell_plant(13, 0.5, 0.5, -0.5)


def row(table: pd.DataFrame, layer: int) -> dict[str, Any]:
    rows = table[table["layer"] == layer].to_dict("records")
    assert len(rows) == 1
    return dict(rows[0])


@pytest.fixture(scope="module")
def planted() -> ScanResult:
    """Only layer 5 shifts: jailbreak blocks +0.5 and 85 % of its map cells raised by 0.5 nats."""
    return ScanResult(
        {
            "benign": make_set("benign", 1),
            "jailbreak": make_set("jailbreak", 2, blocks={5: 0.5}, maps={5: UP}, sink=0.25, entropy=1.7),
        }
    )


@pytest.fixture(scope="module")
def planted_table(planted: ScanResult) -> pd.DataFrame:
    return layer_table(planted)


@pytest.fixture(scope="module")
def null() -> ScanResult:
    return ScanResult({"benign": make_set("benign", 3), "jailbreak": make_set("jailbreak", 4)})


def test_table_shape_and_columns(planted_table: pd.DataFrame) -> None:
    assert list(planted_table["layer"]) == list(LAYERS)
    need = {
        "cells",
        "mean_diff",
        "mean_abs_diff",
        "frac_pos",
        "frac_neg",
        "jsd",
        "entropy_change",
        "sink_change",
        "signed_shift",
        "abs_shift",
        "effect",
        "ci_low",
        "ci_high",
        "p_signed",
        "p_abs",
        "q_signed",
        "q_abs",
        "rank",
        "verdict",
    }
    assert need <= set(planted_table.columns)
    assert planted_table.attrs["a"] == "jailbreak" and planted_table.attrs["b"] == "benign"


def test_planted_positive_shift_is_vulnerable_and_ranked_first(planted_table: pd.DataFrame) -> None:
    r = row(planted_table, 5)
    assert r["verdict"] == "vulnerable"
    assert r["rank"] == 1
    assert float(r["q_signed"]) < 0.01
    assert float(r["p_signed"]) < 0.005
    assert 0.3 < float(r["signed_shift"]) < 0.7
    assert float(r["effect"]) > 0.5
    for layer in (0, 2, 7):
        other = row(planted_table, layer)
        assert other["verdict"] == NO_SHIFT
        assert math.isnan(float(other["rank"]))
        assert other["mean_diff"] == pytest.approx(0.0, abs=1e-12)
        assert other["jsd"] == pytest.approx(0.0, abs=1e-12)


def test_map_numbers_match_the_plant(planted: ScanResult, planted_table: pd.DataFrame) -> None:
    r = row(planted_table, 5)
    cells = UP[CAUSAL]
    assert r["cells"] == CAUSAL.sum()
    assert r["mean_diff"] == pytest.approx(cells.mean(), abs=1e-9)
    assert r["mean_abs_diff"] == pytest.approx(np.abs(cells).mean(), abs=1e-9)
    assert r["frac_pos"] == pytest.approx((cells > 0.05).mean())
    assert r["frac_neg"] == pytest.approx((cells < -0.05).mean())
    assert r["sink_change"] == pytest.approx(-0.05, abs=1e-6)
    assert r["entropy_change"] == pytest.approx(0.2, abs=1e-6)
    # JSD by an independent per-row loop, in nats.
    pa, pb = planted.mean("jailbreak", 5).numpy(), planted.mean("benign", 5).numpy()
    per_row = []
    for i in range(1, T):
        p, q = pa[i, : i + 1] / pa[i, : i + 1].sum(), pb[i, : i + 1] / pb[i, : i + 1].sum()
        m = (p + q) / 2
        per_row.append(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)))
    assert r["jsd"] == pytest.approx(np.mean(per_row), rel=1e-9)
    assert 0 < float(r["jsd"]) < math.log(2)


def test_null_sets_show_no_significant_shift(null: ScanResult) -> None:
    table = layer_table(null)
    assert (table["verdict"] == NO_SHIFT).all()
    assert table["rank"].isna().all()
    assert (table["ci_low"] < 0).all() and (table["ci_high"] > 0).all()


def test_each_verdict_from_its_plant() -> None:
    result = ScanResult(
        {
            "benign": make_set("benign", 5),
            "jailbreak": make_set(
                "jailbreak",
                6,
                blocks={2: bipolar_blocks(0.6), 5: 0.5, 7: -0.5},
                maps={2: BIPOLAR_MAP, 5: UP, 7: DOWN},
            ),
        }
    )
    table = layer_table(result, n_permutations=500, n_bootstrap=200)
    assert list(table["verdict"]) == [NO_SHIFT, "mixed", "vulnerable", "resilient"]
    mixed = row(table, 2)
    assert float(mixed["q_abs"]) < 0.01
    assert abs(float(mixed["signed_shift"])) < 0.2 < float(mixed["abs_shift"])
    assert float(row(table, 7)["signed_shift"]) < 0
    # The two one-signed layers outrank the bipolar one, whose signed effect is near 0.
    assert set(table.loc[table["rank"] <= 2, "layer"]) == {5, 7}


def test_thresholds_change_the_verdict(planted: ScanResult) -> None:
    strict = VerdictThresholds(consistency=0.9)
    table = layer_table(planted, n_permutations=200, n_bootstrap=50, thresholds=strict)
    assert row(table, 5)["verdict"] == "mixed"  # 85 % of cells raised is not enough at 0.9
    with pytest.raises(AttnscanError, match="consistency"):
        VerdictThresholds(consistency=1.5)


def test_permutation_statistic_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(7)
    a = rng.normal(0.3, 1, (9, 2, 3))
    b = rng.normal(0, 1, (11, 2, 3))
    a[0, 0, 1] = b[:, 1, 2] = np.nan  # one block reached by only one group in layer 1: left out there
    res = permutation_test(a, b, n_permutations=300, seed=1)
    for layer in range(2):
        diffs = []
        for k in range(3):
            xa, xb = a[:, layer, k], b[:, layer, k]
            xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
            if xa.size and xb.size:
                diffs.append(xa.mean() - xb.mean())
        assert res.signed[layer] == pytest.approx(np.mean(diffs), rel=1e-12)
        assert res.absolute[layer] == pytest.approx(np.mean(np.abs(diffs)), rel=1e-12)
    assert not res.exact and res.n_permutations == 300
    assert np.all(res.p_signed >= 1 / 301) and np.all(res.p_signed <= 1)
    again = permutation_test(a, b, n_permutations=300, seed=1)
    assert np.array_equal(res.p_signed, again.p_signed)  # seeded


def test_tiny_sets_enumerate_every_labelling() -> None:
    a = np.array([[[10.0]], [[11.0]]])  # [2 prompts, 1 layer, 1 block]
    b = np.array([[[0.0]], [[1.0]]])
    res = permutation_test(a, b, n_permutations=1000)
    assert res.exact and res.n_permutations == math.comb(4, 2)
    # Of the 6 labellings only the observed one and its mirror reach |T| = 10.
    assert res.p_signed[0] == pytest.approx(2 / 6)
    assert res.p_abs[0] == pytest.approx(2 / 6)


def test_two_prompts_per_set_still_give_a_table() -> None:
    result = ScanResult(
        {"benign": make_set("benign", 8, n=2), "jailbreak": make_set("jailbreak", 9, n=2, blocks={5: 3.0})}
    )
    table = layer_table(result)
    assert table["p_signed"].between(1 / 3 - 1e-12, 1).all()  # 2 + 2 prompts: the smallest p is 2/6
    assert (table["verdict"] == NO_SHIFT).all()
    assert table["ci_low"].notna().all() and (table["ci_low"] <= table["ci_high"]).all()


def test_permutation_test_is_calibrated_under_the_null() -> None:
    """Over 200 null datasets (ragged lengths, prompt-level random effects) about 5 % reach p < 0.05."""
    hits_signed = hits_abs = 0
    runs = 200
    for seed in range(runs):
        rng = np.random.default_rng(1000 + seed)
        data = []
        for n in (12, 15):
            x = rng.normal(0, 0.5, (n, 1, 1, 1)) + rng.normal(0, 0.5, (n, 1, B, B))
            lengths = rng.integers(5, T + 1, size=n)
            reached = (np.arange(B)[None, :] * BS < lengths[:, None])[:, :, None] & np.tril(np.ones((B, B), bool))
            data.append(np.where(reached[:, None], x, np.nan))
        res = permutation_test(data[0], data[1], n_permutations=200, seed=seed)
        hits_signed += int(res.p_signed[0] < 0.05)
        hits_abs += int(res.p_abs[0] < 0.05)
    assert 0.02 <= hits_signed / runs <= 0.09
    assert 0.02 <= hits_abs / runs <= 0.09


def test_benjamini_hochberg_against_hand_values() -> None:
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "BH") = 0.02 0.04 0.04 0.02
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # Monotone step-up: 0.2*3/1 = 0.6, 0.5*3/2 = 0.75, 0.9*3/3 = 0.9.
    assert benjamini_hochberg([0.5, 0.9, 0.2]) == pytest.approx([0.75, 0.9, 0.6])
    # The minimum from above pulls 0.04*3/2 = 0.06 down to 0.045*3/3 = 0.045; a capped value stays at 1.
    assert benjamini_hochberg([0.04, 0.045, 0.01]) == pytest.approx([0.045, 0.045, 0.03])
    assert benjamini_hochberg([0.9, 0.8]) == pytest.approx([0.9, 0.9])
    assert benjamini_hochberg([1.0, 0.7]) == pytest.approx([1.0, 1.0])
    q = benjamini_hochberg([0.01, np.nan, 0.04])
    assert q[0] == pytest.approx(0.02) and np.isnan(q[1]) and q[2] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="p-values"):
        benjamini_hochberg([0.5, 1.5])


def test_bootstrap_ci_covers_the_planted_shift(planted_table: pd.DataFrame) -> None:
    r = row(planted_table, 5)
    assert 0 < float(r["ci_low"]) < 0.5 < float(r["ci_high"])
    covered = 0
    widths = []
    runs = 40
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        a = 0.5 + rng.normal(0, 0.5, (30, 1, 1)) + rng.normal(0, 0.5, (30, 1, 6))
        b = rng.normal(0, 0.5, (30, 1, 1)) + rng.normal(0, 0.5, (30, 1, 6))
        low, high = bootstrap_ci(a, b, n_bootstrap=400, seed=seed)
        covered += int(low[0] <= 0.5 <= high[0])
        widths.append(high[0] - low[0])
    assert 0.85 <= covered / runs <= 1.0
    # Normal theory: 2 * 1.96 * sqrt((0.5² + 0.5²/6) * (1/30 + 1/30)) = 0.547 (the percentile bootstrap runs a bit
    # narrower); resampling only one of the sets would give about 0.39.
    assert 0.47 <= np.mean(widths) <= 0.60


def test_effects_table_separates_wrapper_and_request() -> None:
    # control = wrapper around benign requests (shifts layer 2); jailbreak = wrapper + harmful request (adds layer 5).
    wrapper = {2: 0.6}
    wrapper_map = {2: UP}
    result = ScanResult(
        {
            "benign": make_set("benign", 20),
            "control": make_set("control", 21, blocks=wrapper, maps=wrapper_map),
            "jailbreak": make_set("jailbreak", 22, blocks={**wrapper, 5: 0.6}, maps={**wrapper_map, 5: UP}),
        }
    )
    table = effects_table(result, n_permutations=500, n_bootstrap=100)
    assert table is not None
    assert list(table["layer"]) == list(LAYERS)
    assert row(table, 2)["wrapper_verdict"] == "vulnerable"
    assert row(table, 2)["request_verdict"] == NO_SHIFT
    assert row(table, 5)["wrapper_verdict"] == NO_SHIFT
    assert row(table, 5)["request_verdict"] == "vulnerable"
    assert (table.loc[table["layer"].isin([0, 7]), ["wrapper_verdict", "request_verdict"]] == NO_SHIFT).all().all()
    two_sets = ScanResult({"benign": make_set("benign", 1), "jailbreak": make_set("jailbreak", 2)})
    assert effects_table(two_sets) is None


def test_observations_name_the_top_layer(planted: ScanResult, planted_table: pd.DataFrame) -> None:
    notes = observations(planted_table, planted, model_name="tiny-model")
    assert notes[0].startswith("In tiny-model, 1 of 4 layers show a significant shift")
    assert "1 vulnerable" in notes[0]
    assert notes[1].startswith("Layer 5 shifts most and is vulnerable")
    assert "proxy for, not a measurement of, jailbreak success" in notes[-1]


def test_observations_locate_the_key_range() -> None:
    late = np.where(CAUSAL & (np.arange(T)[None, :] >= 11), 0.8, 0.0)
    late[:, 0] = np.where(CAUSAL[:, 0], -0.3, 0.0)  # and less attention on the first token
    result = ScanResult(
        {
            "benign": make_set("benign", 30),
            "jailbreak": make_set("jailbreak", 31, blocks={7: 0.6}, maps={7: late}),
        }
    )
    table = layer_table(result, n_permutations=300, n_bootstrap=100)
    notes = observations(table, result)
    where = [s for s in notes if "by key position" in s]
    assert len(where) == 1 and where[0].startswith("At layer 7")
    assert "the increase is largest on late keys (positions 11–15)" in where[0]
    assert "the decrease on the first token (sink)" in where[0]


def test_observations_claim_nothing_when_nothing_is_significant(null: ScanResult) -> None:
    table = layer_table(null, n_permutations=300, n_bootstrap=100)
    notes = observations(table, null)
    assert notes[0].startswith("No layer shows a significant shift")
    text = " ".join(notes).lower()
    for word in ("vulnerable", "resilient", "mixed"):
        assert word not in text
    assert "is not significant" in notes[1]
    assert "proxy" in notes[-1]


def test_missing_or_too_small_sets_are_clear_errors() -> None:
    only_benign = ScanResult({"benign": make_set("benign", 1)})
    with pytest.raises(AttnscanError, match="needs prompt set 'jailbreak'"):
        layer_table(only_benign)
    one = ScanResult({"benign": make_set("benign", 1), "jailbreak": make_set("jailbreak", 2, n=1)})
    with pytest.raises(AttnscanError, match=r"set 'jailbreak' has 1 prompt: .* at least 2 prompts per set"):
        layer_table(one)
    with pytest.raises(AttnscanError, match="itself"):
        layer_table(one, a="benign", b="benign")
    with pytest.raises(AttnscanError, match="layer_table"):
        observations(pd.DataFrame({"x": [1]}))


def test_effect_is_cohens_d_when_every_prompt_reaches_every_block() -> None:
    rng = np.random.default_rng(3)
    a = 0.4 + rng.normal(0, 1, (20, 2, 5))
    b = rng.normal(0, 1, (25, 2, 5))
    ma, mb = a.mean(-1), b.mean(-1)  # per-prompt mean block log attention, [N, L]
    pooled = np.sqrt(((20 - 1) * ma.var(0, ddof=1) + (25 - 1) * mb.var(0, ddof=1)) / (20 + 25 - 2))
    expected = (ma.mean(0) - mb.mean(0)) / pooled
    assert standardized_effect(a, b) == pytest.approx(expected, rel=1e-12)


def test_alignment_note_says_what_positions_mean(planted: ScanResult) -> None:
    from dataclasses import replace

    from attnscan.analysis.statistics import alignment_note

    def with_sets(alignment: str, benign_max: int, jail_max: int) -> ScanResult:
        sets = {
            "benign": {"tokens_mean": benign_max * 0.8, "tokens_max": benign_max},
            "jailbreak": {"tokens_mean": jail_max * 0.8, "tokens_max": jail_max},
        }
        return replace(planted, manifest={**planted.manifest, "alignment": alignment, "prompt_sets": sets})

    t = planted.length
    short = alignment_note(with_sets("absolute", t // 8, t))
    assert short is not None and f"covers only the first {t // 8} positions" in short and "--align relative" in short
    assert alignment_note(with_sets("absolute", t, t)) is None  # both sets fill the grid: nothing to say
    rel = alignment_note(with_sets("relative", t // 8, t))
    assert rel is not None and rel.startswith("Relative alignment") and f"{t}-position grid" in rel
    assert alignment_note(replace(planted, manifest={})) is None
    # The observations carry the note when the result is given.
    table = layer_table(with_sets("absolute", t // 8, t), n_permutations=200, n_bootstrap=200)
    assert short in observations(table, with_sets("absolute", t // 8, t))
