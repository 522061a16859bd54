"""The detectors' bootstrap intervals against independent references: a simulation where the true AUROC is known,
and small data sets whose bootstrap distribution is a binomial with known percentiles."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from attnscan.detect.bootstrap import (
    bootstrap_intervals,
    checked_scores,
    group_weights,
    paired_auroc_difference,
    tpr_rows,
    weighted_auroc_rows,
    weighted_tpr_rows,
)
from attnscan.errors import AttnscanError


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
    (low, high), _ = bootstrap_intervals(y, score, 5_000, 0)
    assert (low, high) == (pytest.approx(0.40), pytest.approx(0.60))
    # Every prompt a group of its own: the cluster bootstrap is the prompt bootstrap.
    (g_low, g_high), _ = bootstrap_intervals(y, score, 5_000, 0, groups=np.arange(y.size))
    assert (g_low, g_high) == (pytest.approx(0.40), pytest.approx(0.60))


def test_the_tpr_interval_is_the_2_5th_and_97_5th_percentile() -> None:
    """TPR at 5 % FPR with 100 benign prompts all scored 0 (the threshold sits just above 0 in every resample) and
    100 jailbreak prompts, half at +1 and half at -1: a resample's TPR is Binomial(100, 1/2) / 100, whose 2.5th and
    97.5th percentiles are 0.40 and 0.60 (the 3.5th would be 0.41)."""
    y = np.repeat([0, 1], [100, 100])
    score = np.r_[np.zeros(100), np.ones(50), -np.ones(50)]
    for kw in ({}, {"groups": np.arange(200)}):
        _, (low, high) = bootstrap_intervals(y, score, 5_000, 0, **kw)
        assert (low, high) == (pytest.approx(0.40), pytest.approx(0.60)), kw
    (a_low, a_high), (t_low, t_high) = bootstrap_intervals(y, score, 1, 0)  # one resample: finite, degenerate
    assert a_low == a_high and t_low == t_high and np.isfinite([a_low, t_low]).all()
    nan = bootstrap_intervals(y, score, 0, 0)
    assert np.isnan(nan).all()


def test_row_metrics_along_the_last_axis_against_scipy_and_sklearn() -> None:
    """Mid-ranks, AUROC and TPR of many rows at once, with leading axes and ties, equal the one-row references."""
    from scipy.stats import rankdata

    from attnscan.detect.bootstrap import _midranks, auroc_rows

    rng = np.random.default_rng(9)
    s = rng.integers(0, 5, size=(2, 3, 11)).astype(np.float64)  # many ties
    np.testing.assert_array_equal(_midranks(s), rankdata(s, axis=-1))
    pos, neg = s[..., :4], s[..., 4:]
    aucs = auroc_rows(pos, neg)
    assert aucs.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            y = np.r_[np.ones(4), np.zeros(7)]
            assert aucs[i, j] == pytest.approx(roc_auc_score(y, s[i, j]), abs=1e-12)
    flat_pos, flat_neg = pos.reshape(6, 4), neg.reshape(6, 7)
    tprs = tpr_rows(flat_pos, flat_neg, 0.2)  # 7 benign prompts: one may score at or above the threshold
    for row, tpr in zip(range(6), tprs, strict=True):
        second = np.sort(flat_neg[row])[-2]
        assert tpr == pytest.approx((flat_pos[row] > second).mean()), row


def test_resampled_indices_cover_every_prompt_evenly() -> None:
    from attnscan.detect.bootstrap import _draw

    for n in (1, 2, 5):
        draws = _draw(np.random.default_rng(0), 4_000, n)
        assert draws.shape == (4_000, n) and draws.dtype == np.int64
        counts = np.bincount(draws.ravel(), minlength=n)
        assert counts.size == n  # nothing outside 0..n-1
        expected = draws.size / n
        assert (np.abs(counts - expected) < 5 * np.sqrt(expected)).all(), counts


def test_the_paired_difference_interval_is_the_2_5th_and_97_5th_percentile() -> None:
    """Against a constant score (AUROC 1/2 in every resample) the difference is Binomial(100, 1/2) / 100 - 1/2."""
    y, score = _one_positive()
    diff, low, high = paired_auroc_difference(y, score, np.zeros(y.size), 5_000, 0)
    assert diff == pytest.approx(0.0)
    assert (low, high) == (pytest.approx(-0.10), pytest.approx(0.10))


def test_paired_difference_estimate_against_sklearn() -> None:
    rng = np.random.default_rng(4)
    y = rng.permutation(np.repeat([0, 1], [23, 17]))  # classes interleaved, unequal sizes
    a, b = y + rng.normal(0, 1, 40), 0.3 * y + rng.normal(0, 1, 40)
    diff, low, high = paired_auroc_difference(y, a, b, 300, 0)
    assert diff == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert low < diff < high


@pytest.mark.parametrize("grouped", [False, True])
def test_paired_difference_is_antisymmetric_seeded_and_zero_against_itself(grouped: bool) -> None:
    """Both scores see the same resamples: swapping them negates the difference and mirrors the interval, a score
    against itself differs by exactly 0 in every resample; the seed fixes the resamples and the chunk size does not
    change them."""
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], [14, 10])
    a, b = y + rng.normal(0, 1, 24), 0.5 * y + rng.normal(0, 1, 24)
    kw = {"groups": np.arange(24) // 2} if grouped else {}  # pairs of prompts, each pair within one class
    diff, low, high = paired_auroc_difference(y, a, b, 300, 7, **kw)
    assert low < diff < high
    assert paired_auroc_difference(y, b, a, 300, 7, **kw) == pytest.approx((-diff, -high, -low), abs=1e-12)
    assert paired_auroc_difference(y, a, a, 300, 7, **kw) == (0.0, 0.0, 0.0)
    assert paired_auroc_difference(y, a, b, 300, 7, **kw) == (diff, low, high)
    assert paired_auroc_difference(y, a, b, 300, 8, **kw)[1:] != (low, high)
    assert paired_auroc_difference(y, a, b, 300, 7, 16, **kw) == pytest.approx((diff, low, high), abs=1e-12)
    none = paired_auroc_difference(y, a, b, 0, 7, **kw)
    assert none[0] == diff and np.isnan(none[1]) and np.isnan(none[2])
    one = paired_auroc_difference(y, a, b, 1, 7, **kw)  # one resample: a degenerate but finite interval
    assert np.isfinite(one[1]) and one[1] == one[2]


@pytest.mark.parametrize("grouped", [False, True])
def test_intervals_do_not_depend_on_the_chunk_size(grouped: bool) -> None:
    """``chunk`` bounds the memory only: each class (or stratum) has its own random stream, read in the same order
    whatever the chunk size (before, the draws of the two classes were interleaved chunk by chunk)."""
    rng = np.random.default_rng(6)
    y = np.repeat([0, 1], [15, 9])
    score = y + rng.normal(0, 1, 24)
    kw = {"groups": np.r_[np.arange(15) // 3, 5 + np.arange(9) // 3]} if grouped else {}
    whole = bootstrap_intervals(y, score, 300, 2, 300, **kw)
    for chunk in (1, 7, 256):
        assert bootstrap_intervals(y, score, 300, 2, chunk, **kw) == whole, chunk
    assert bootstrap_intervals(y, score, 300, 3, 300, **kw) != whole


def test_tpr_rows_at_the_ends() -> None:
    """At a false-positive target of 100 % every threshold is allowed: TPR 1; the weighted version agrees."""
    y = np.repeat([0, 1], [5, 4])
    score = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.05, 0.5, 0.6, 0.95])
    assert tpr_rows(score[y == 1][None], score[y == 0][None], 1.0)[0] == 1.0
    w = np.ones((2, 9))
    np.testing.assert_array_equal(weighted_tpr_rows(y, score, w, 1.0), [1.0, 1.0])
    # at 20 % one of five benign prompts (0.9) may pass: the threshold sits just above 0.8, so 0.95 alone counts
    np.testing.assert_array_equal(weighted_tpr_rows(y, score, w, 0.2), [0.25, 0.25])
    assert tpr_rows(score[y == 1][None], score[y == 0][None], 0.2)[0] == 0.25


def test_weighted_auroc_of_degenerate_resamples() -> None:
    """A resample with one jailbreak and one benign prompt has AUROC 0, 1/2 or 1; one without either class has
    none (NaN), not a number made up from a division by zero."""
    y = np.array([0, 1, 0, 1])
    score = np.array([0.2, 0.7, 0.9, 0.7])
    w = np.array(
        [
            [1, 1, 0, 0],  # 0.7 over 0.2: 1
            [0, 1, 1, 0],  # 0.7 under 0.9: 0
            [0, 0, 0, 2],  # no benign prompt: NaN
            [3, 0, 1, 0],  # no jailbreak prompt: NaN
            [0, 2, 0, 1],  # no benign prompt: NaN
        ],
        dtype=np.float64,
    )
    np.testing.assert_array_equal(weighted_auroc_rows(y, score, w), [1.0, 0.0, np.nan, np.nan, np.nan])
    tied = np.array([0.7, 0.7, 0.1, 0.1])
    np.testing.assert_array_equal(weighted_auroc_rows(y, tied, np.array([[1.0, 1.0, 0.0, 0.0]])), [0.5])


def test_weighted_tpr_when_all_but_one_benign_prompt_may_pass() -> None:
    """At 80 % of five benign prompts, four may score at or above the threshold: it sits just above the lowest
    benign score, and every jailbreak prompt above that counts."""
    y = np.repeat([0, 1], [5, 4])
    score = np.array([0.9, 0.8, 0.1, 0.2, 0.3, 0.05, 0.5, 0.15, 0.95])
    expected = tpr_rows(score[y == 1][None], score[y == 0][None], 0.8)[0]
    assert expected == 0.75  # 0.5, 0.15 and 0.95 are above 0.1; 0.05 is not
    np.testing.assert_array_equal(weighted_tpr_rows(y, score, np.ones((1, 9)), 0.8), [expected])


def test_group_weights_give_exactly_the_resamples_asked_for() -> None:
    y = np.repeat([0, 1], [6, 6])
    codes = np.arange(12) // 2
    for n, chunk in ((10, 4), (8, 4), (3, 256)):
        rows = [w for w in group_weights(y, codes, n, seed=0, chunk=chunk)]
        assert [len(w) for w in rows] == [min(chunk, n - k) for k in range(0, n, chunk)], (n, chunk)
        assert all((w.sum(axis=1) == 12).all() for w in rows)  # every resample keeps the prompt count per stratum


def test_score_and_group_checks_say_what_is_wrong() -> None:
    y = np.array([0, 1, 0, 1])
    with pytest.raises(AttnscanError, match="3 scores for 4 labels: give one score per prompt"):
        checked_scores(y, [0.1, 0.2, 0.3])
    with pytest.raises(AttnscanError, match=r"^0 scores for 4 labels: give one score per prompt$"):
        checked_scores(y, 0.5)  # one bare number
    with pytest.raises(AttnscanError, match=r"^scores hold NaN or infinite values$"):
        checked_scores(y, [0.1, np.nan, 0.3, 0.4])
    with pytest.raises(AttnscanError, match=r"computing detection metrics needs both benign \(0\) and jailbreak"):
        checked_scores([0, 0, 0], [0.1, 0.2, 0.3])
    labels, scores = checked_scores(y, [1, 2, 3, 4])
    assert scores.dtype == np.float64 and labels.tolist() == [0, 1, 0, 1]
    for bad in ([0, 1, -1, 2], [0.0, 1.0, 1.0, 2.0], [0, 1, 2]):
        with pytest.raises(AttnscanError, match="one non-negative integer code per prompt"):
            next(group_weights(y, np.asarray(bad), 5, seed=0))
    # sparse codes are renumbered: groups 10 and 30 each hold one benign and one jailbreak prompt
    for w in group_weights(y, np.array([10, 10, 30, 30]), 50, seed=0):
        assert w.shape == (50, 4) and (w.sum(axis=1) == 4).all()
        assert (w[:, 0] == w[:, 1]).all() and (w[:, 2] == w[:, 3]).all()
