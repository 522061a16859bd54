"""The detectors' bootstrap intervals against independent references: a simulation where the true AUROC is known,
and small data sets whose bootstrap distribution is a binomial with known percentiles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from attnscan.detect.bootstrap import bootstrap_intervals, paired_auroc_difference


def test_a_95_percent_interval_covers_the_true_auroc_about_95_percent_of_the_time() -> None:
    """Positives N(1, 1), negatives N(0, 1): the AUROC is Φ(1/√2) = 0.760. Over 400 seeded data sets of 60 + 60
    prompts the 95 % interval covers it 95.5 % of the time (binomial SD 1.1 points); a 90 % interval (5th/95th
    percentiles) covers it 88.5 % of the time and fails the lower bound."""
    true = norm.cdf(1.0 / np.sqrt(2.0))
    runs, n = 400, 60
    y = np.repeat([0, 1], n)
    covered = 0
    for seed in range(runs):
        score = np.random.default_rng(seed).normal(size=2 * n) + y
        (low, high), _ = bootstrap_intervals(y, score, 400, seed)
        covered += int(low <= true <= high)
    assert 0.92 <= covered / runs <= 0.98, covered / runs


def _one_positive(n0: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """One jailbreak prompt scored 0 and ``n0`` benign prompts, half at -1 and half at +1: a resample's AUROC is
    the share of drawn benign prompts below the jailbreak one, Binomial(n0, 1/2) / n0."""
    y = np.r_[1, np.zeros(n0, dtype=np.int64)]
    score = np.r_[0.0, -np.ones(n0 // 2), np.ones(n0 // 2)]
    return y, score


def test_the_interval_is_the_2_5th_and_97_5th_percentile() -> None:
    """For Binomial(100, 1/2): P(X <= 39) = 1.8 %, P(X <= 40) = 2.8 %, so the 2.5th percentile is 40 (and by symmetry
    the 97.5th is 60); the 5th percentile would be 42 (P(X <= 41) = 4.4 %, P(X <= 42) = 6.7 %)."""
    y, score = _one_positive()
    (low, high), _ = bootstrap_intervals(y, score, 20_000, 0)
    assert (low, high) == (pytest.approx(0.40), pytest.approx(0.60))
    # Every prompt a group of its own: the cluster bootstrap is the prompt bootstrap.
    (g_low, g_high), _ = bootstrap_intervals(y, score, 20_000, 0, groups=np.arange(y.size))
    assert (g_low, g_high) == (pytest.approx(0.40), pytest.approx(0.60))


def test_the_paired_difference_interval_is_the_2_5th_and_97_5th_percentile() -> None:
    """Against a constant score (AUROC 1/2 in every resample) the difference is Binomial(100, 1/2) / 100 - 1/2."""
    y, score = _one_positive()
    diff, low, high = paired_auroc_difference(y, score, np.zeros(y.size), 20_000, 0)
    assert diff == pytest.approx(0.0)
    assert (low, high) == (pytest.approx(-0.10), pytest.approx(0.10))
