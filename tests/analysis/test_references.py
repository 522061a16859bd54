"""The layer table's multiple-testing correction against independent references: SciPy's Benjamini–Hochberg and a
hand-computed example where the raw p-values and the q-values give different verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

from attnscan import ScanResult
from attnscan.analysis.inference import benjamini_hochberg, bootstrap_ci
from attnscan.analysis.statistics import NO_SHIFT, VULNERABLE, layer_table


@pytest.mark.parametrize("m", [1, 2, 5, 30, 200])
def test_benjamini_hochberg_equals_scipy_on_random_p_values(m: int) -> None:
    rng = np.random.default_rng(m)
    for _ in range(20):
        p = rng.uniform(0, 1, m) ** 3  # many small values, so the step-up minimum matters
        p[rng.uniform(size=m) < 0.2] = p[0]  # ties
        expected = false_discovery_control(p, method="bh")
        np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-12, atol=0)


def test_nan_p_values_are_left_out_of_the_count() -> None:
    rng = np.random.default_rng(5)
    p = rng.uniform(0, 0.2, 12)
    p[[2, 7]] = np.nan
    q = benjamini_hochberg(p)
    finite = np.isfinite(p)
    assert np.isnan(q[~finite]).all()
    np.testing.assert_allclose(q[finite], false_discovery_control(p[finite]), rtol=1e-12)


def test_layer_table_q_values_are_the_corrected_p_values(planted_table: pd.DataFrame) -> None:
    for kind in ("signed", "abs"):
        p = planted_table[f"p_{kind}"].to_numpy()
        q = planted_table[f"q_{kind}"].to_numpy()
        np.testing.assert_allclose(q, false_discovery_control(p, method="bh"), rtol=1e-12)
        # Four layers and at least one p-value below 1: some q-value must exceed its p-value.
        assert (q > p).any()


def test_verdicts_follow_q_not_p(planted: ScanResult) -> None:
    """Layer 5 carries a strong plant: no random labelling beats it, so both its p-values are 1 / 1001 and, the
    smallest of 4 layers, both q-values are 4 / 1001 ≈ 0.004. At α = 0.003 the raw p-value would pass and the
    corrected one does not; at α = 0.005 both pass."""
    strict = layer_table(planted, alpha=0.003).set_index("layer")
    assert strict.loc[5, "p_signed"] == pytest.approx(1 / 1001)
    assert strict.loc[5, "p_abs"] == pytest.approx(1 / 1001)
    assert strict.loc[5, "q_signed"] == pytest.approx(4 / 1001)
    assert strict.loc[5, "q_abs"] == pytest.approx(4 / 1001)
    assert not strict.loc[5, "significant"]
    assert strict.loc[5, "verdict"] == NO_SHIFT
    assert strict["rank"].isna().all()
    loose = layer_table(planted, alpha=0.005).set_index("layer")
    assert loose.loc[5, "significant"] and loose.loc[5, "verdict"] == VULNERABLE
    assert loose.loc[5, "rank"] == 1


def test_bootstrap_interval_is_the_2_5th_and_97_5th_percentile() -> None:
    """One prompt in set a (0 everywhere) against 100 prompts in set b, half 0 and half 1, one block: a resample's
    shift is -Binomial(100, 1/2) / 100, whose 2.5th and 97.5th percentiles are -0.60 and -0.40 (P(X <= 39) = 1.8 %,
    P(X <= 40) = 2.8 %); a 90 % interval would end at -0.58 and -0.42."""
    a = np.zeros((1, 2, 1))
    b = np.repeat([[[0.0], [0.0]], [[1.0], [1.0]]], 50, axis=0)  # [100 prompts, 2 layers, 1 block]
    low, high = bootstrap_ci(a, b, n_bootstrap=5_000, seed=0)
    np.testing.assert_allclose(low, [-0.60, -0.60])
    np.testing.assert_allclose(high, [-0.40, -0.40])
    low90, high90 = bootstrap_ci(a, b, n_bootstrap=5_000, seed=0, level=0.90)
    np.testing.assert_allclose(low90, [-0.58, -0.58])
    np.testing.assert_allclose(high90, [-0.42, -0.42])
