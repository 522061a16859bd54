"""Bootstrap intervals: weighted rank metrics, and resampling whole groups under grouped folds."""

from __future__ import annotations

import numpy as np
import pytest

from attnscan.detect.bootstrap import (
    auroc_rows,
    bootstrap_intervals,
    group_weights,
    paired_auroc_difference,
    tpr_rows,
    weighted_auroc_rows,
    weighted_tpr_rows,
)
from attnscan.detect.detectors import ProbeDetector
from attnscan.detect.folds import grouped_folds
from attnscan.detect.metrics import cross_validate
from attnscan.errors import AttnscanError


def test_weighted_metrics_equal_the_repeated_prompts() -> None:
    """A prompt of weight w counts as w copies of itself, ties included."""
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], [30, 20])
    score = np.round(rng.normal(size=50) + 0.8 * y, 1)  # rounding makes ties, within and across classes
    w = rng.integers(0, 4, size=(25, 50)).astype(np.float64)
    w[:, 0] = w[:, 30] = 1.0  # each row keeps both classes
    got_auc = weighted_auroc_rows(y, score, w)
    got_tpr = {t: weighted_tpr_rows(y, score, w, t) for t in (0.01, 0.05, 0.2)}
    for b in range(w.shape[0]):
        rep = np.repeat(np.arange(50), w[b].astype(int))
        pos, neg = score[rep][y[rep] == 1][None], score[rep][y[rep] == 0][None]
        assert got_auc[b] == pytest.approx(auroc_rows(pos, neg)[0], abs=1e-12)
        for t, tpr in got_tpr.items():
            assert tpr[b] == pytest.approx(tpr_rows(pos, neg, t)[0], abs=1e-12), (b, t)


def test_group_weights_keep_each_stratum_and_whole_groups() -> None:
    # groups 0-2: benign only, 3-4: jailbreak only, 5: both classes (a family wrapping jailbreak and control)
    codes = np.array([0, 0, 1, 2, 2, 2, 3, 3, 4, 5, 5])
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 1])
    for w in group_weights(y, codes, 200, seed=1, chunk=64):
        for g in range(6):  # a group is drawn whole: its prompts share one weight
            assert (w[:, codes == g] == w[:, codes == g][:, :1]).all()
        per_group = np.stack([w[:, codes == g][:, 0] for g in range(6)], axis=1)
        assert (per_group[:, :3].sum(axis=1) == 3).all() and (per_group[:, 3:5].sum(axis=1) == 2).all()
        assert (per_group[:, 5] == 1).all()  # the only mixed group is drawn once each time
    with pytest.raises(AttnscanError, match="one non-negative integer code per prompt"):
        next(group_weights(y, codes[:-1], 10, seed=0))


def _copies(n_groups: int = 8, copies: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_groups`` benign and ``n_groups`` jailbreak groups, each ``copies`` identical prompts: pooled features
    ``[N, 8]`` with a weak class signal, labels and group codes."""
    rng = np.random.default_rng(seed)
    y_groups = np.repeat([0, 1], n_groups)
    centres = rng.normal(size=(2 * n_groups, 8)) + 0.7 * y_groups[:, None] * np.ones(8)
    codes = np.repeat(np.arange(2 * n_groups), copies)
    return centres[codes], y_groups[codes], codes


def test_intervals_resample_groups_not_copies() -> None:
    """Ten identical copies of a prompt are one piece of evidence: resampling prompts would make the interval about
    sqrt(10) times too narrow. Cross-validation on grouped folds must resample the groups."""
    x, y, codes = _copies()
    res = cross_validate(lambda: ProbeDetector(C=1.0), x, y, seed=0, n_bootstrap=400, groups=codes)
    assert res["cv"] == "grouped"
    (p_low, p_high), _ = bootstrap_intervals(y, res["oof_score"], 400, 0)  # prompts, as for unlabelled prompts
    (g_low, g_high), _ = bootstrap_intervals(y, res["oof_score"], 400, 0, groups=codes)
    assert (res["auroc_low"], res["auroc_high"]) == (g_low, g_high)
    assert g_high - g_low > 2.0 * (p_high - p_low), ((g_low, g_high), (p_low, p_high))
    # one copy per group gives about the interval of the groups (the copies add nothing)
    first = np.r_[True, codes[1:] != codes[:-1]]
    (o_low, o_high), _ = bootstrap_intervals(y[first], res["oof_score"][first], 400, 0)
    assert g_high - g_low == pytest.approx(o_high - o_low, rel=0.35)


def test_paired_difference_resamples_groups() -> None:
    x, y, codes = _copies(seed=1)
    folds = grouped_folds(y, codes, 4, 0)
    a = cross_validate(lambda: ProbeDetector(C=1.0), x, y, n_bootstrap=0, folds=folds)["oof_score"]
    b = np.random.default_rng(2).normal(size=16)[codes]  # another score, constant within a group
    plain = paired_auroc_difference(y, a, b, 400, 0)
    grouped = paired_auroc_difference(y, a, b, 400, 0, groups=codes)
    assert plain[0] == grouped[0]
    assert grouped[2] - grouped[1] > 2.0 * (plain[2] - plain[1])
