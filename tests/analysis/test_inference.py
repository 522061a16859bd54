"""Permutation test, Benjamini–Hochberg, bootstrap interval and standardized effect on arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from planted_scans import BS, B, T, row

from attnscan.analysis.inference import benjamini_hochberg, bootstrap_ci, permutation_test, standardized_effect


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


def test_effect_is_cohens_d_when_every_prompt_reaches_every_block() -> None:
    rng = np.random.default_rng(3)
    a = 0.4 + rng.normal(0, 1, (20, 2, 5))
    b = rng.normal(0, 1, (25, 2, 5))
    ma, mb = a.mean(-1), b.mean(-1)  # per-prompt mean block log attention, [N, L]
    pooled = np.sqrt(((20 - 1) * ma.var(0, ddof=1) + (25 - 1) * mb.var(0, ddof=1)) / (20 + 25 - 2))
    expected = (ma.mean(0) - mb.mean(0)) / pooled
    assert standardized_effect(a, b) == pytest.approx(expected, rel=1e-12)
