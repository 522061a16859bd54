"""Does the detector depend on which training prompts it happened to get? The rank stability of refits.

A detector worth deploying ranks new prompts about the same way whatever sample of training prompts it was fitted
on. :func:`rank_stability` measures that for one layer and detector kind, cheaply: for each fold of the main
cross-validation it refits the detector on ``resamples`` bootstrap resamples of the fold's training part
(whole groups drawn with replacement under grouped folds, as in :mod:`attnscan.detect.bootstrap`; prompts within
their class otherwise), scores the fold's held-out prompts with each refit, and takes the Spearman rank correlation
of every pair of refits' scores there. It reports the mean over pairs and folds (folds weighted by their held-out
prompts) and the lowest pair.

Near 1: the ranking of new prompts hardly depends on the training sample. Well below 1 (say under 0.8): which new
prompts get flagged first changes with the training sample, so a single trained detector is one draw among many.
The cost is ``resamples x folds`` fits of one detector at one layer.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from typing import Any

import numpy as np
import numpy.typing as npt

from .bootstrap import group_weights
from .detectors import Detector, FloatArray, IntArray, as_labels
from .folds import Folds

__all__ = ["DEFAULT_RESAMPLES", "rank_stability", "spearman"]

#: Refits per fold of :func:`rank_stability`.
DEFAULT_RESAMPLES = 5


def spearman(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Spearman rank correlation of two score vectors (mid-ranks for ties); NaN when either is constant."""
    ra, rb = (_ranks(np.asarray(v, dtype=np.float64)) for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _ranks(v: FloatArray) -> FloatArray:
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return np.asarray((upper - (counts - 1) / 2.0)[inverse], dtype=np.float64)


def rank_stability(
    make_detector: Callable[[], Detector],
    x: npt.NDArray[Any],
    y: npt.ArrayLike,
    folds: Folds,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """The rank stability of the module docstring for the detectors ``make_detector()`` on inputs ``x [N, ...]``
    with labels ``y [N]`` over ``folds`` (their ``codes`` say the groups, when grouped).

    Returns ``spearman_mean`` and ``spearman_min`` (None when no fold had 3 held-out prompts with varying scores),
    ``resamples``, ``folds`` and ``resampled`` (``"groups"`` or ``"prompts"``).
    """
    labels = as_labels(y, x.shape[0])
    codes: IntArray = folds.codes if folds.codes is not None else np.arange(labels.size, dtype=np.int64)
    means, weights, lows = [], [], []
    for i, (train, test) in enumerate(folds):
        if test.size < 3:
            continue
        scores = []
        for w in group_weights(labels[train], codes[train], resamples, seed + i, chunk=resamples):
            for row in w:
                drawn = np.repeat(train, row.astype(np.int64))
                scores.append(make_detector().fit(x[drawn], labels[drawn]).predict_proba(x[test]))
        pairs = [spearman(a, b) for a, b in combinations(scores, 2)]
        finite = [p for p in pairs if p == p]
        if finite:
            means.append(float(np.mean(finite)))
            lows.append(min(finite))
            weights.append(test.size)
    return {
        "spearman_mean": float(np.average(means, weights=weights)) if means else None,
        "spearman_min": float(min(lows)) if lows else None,
        "resamples": resamples,
        "folds": folds.k,
        "resampled": "groups" if folds.kind == "grouped" else "prompts",
    }
