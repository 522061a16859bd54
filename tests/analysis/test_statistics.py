"""Per-layer statistics on synthetic accumulators with planted, known shifts (no model needed)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from planted_scans import BIPOLAR_MAP, CAUSAL, DOWN, LAYERS, UP, T, bipolar_blocks, make_set, row

from attnscan import AttnscanError, ScanResult
from attnscan.analysis.statistics import NO_SHIFT, VerdictThresholds, effects_table, layer_table


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


def test_two_prompts_per_set_still_give_a_table() -> None:
    result = ScanResult(
        {"benign": make_set("benign", 8, n=2), "jailbreak": make_set("jailbreak", 9, n=2, blocks={5: 3.0})}
    )
    table = layer_table(result)
    assert table["p_signed"].between(1 / 3 - 1e-12, 1).all()  # 2 + 2 prompts: the smallest p is 2/6
    assert (table["verdict"] == NO_SHIFT).all()
    assert table["ci_low"].notna().all() and (table["ci_low"] <= table["ci_high"]).all()


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


def test_missing_or_too_small_sets_are_clear_errors() -> None:
    only_benign = ScanResult({"benign": make_set("benign", 1)})
    with pytest.raises(AttnscanError, match="needs prompt set 'jailbreak'"):
        layer_table(only_benign)
    one = ScanResult({"benign": make_set("benign", 1), "jailbreak": make_set("jailbreak", 2, n=1)})
    with pytest.raises(AttnscanError, match=r"set 'jailbreak' has 1 prompt: .* at least 2 prompts per set"):
        layer_table(one)
    with pytest.raises(AttnscanError, match="itself"):
        layer_table(one, a="benign", b="benign")
