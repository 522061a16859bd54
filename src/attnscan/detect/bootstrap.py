"""Rank metrics on many resamples at once, and the bootstrap intervals of the detection metrics.

What is resampled
-----------------
- **Prompts** (no ``groups``): the jailbreak and the benign prompts are drawn with replacement within their class,
  so every resample keeps the class counts. Right when the prompts are independent draws: plain lists of texts, and
  stratified folds.
- **Groups** (``groups``: a group code per prompt, e.g. :attr:`attnscan.detect.folds.Folds.codes` of grouped folds):
  a cluster bootstrap. Prompts made from one template family (or one request) are not independent: they rise and
  fall together, and resampling them one by one counts a family of twenty near-copies as twenty pieces of evidence,
  which makes the interval too narrow. So whole groups are drawn with replacement, and a drawn group brings all its
  prompts. Groups are drawn within strata by the classes they hold (benign only, jailbreak only, both: a family
  that wraps jailbreak and control requests), each stratum keeping its number of groups, so every resample holds
  both classes. A prompt without a group is a group of its own, so with every prompt alone this is the prompt
  resampling above.

A resample is a weight per prompt (how many times it was drawn); :func:`weighted_auroc_rows` and
:func:`weighted_tpr_rows` score all resamples of a chunk at once, and equal the unweighted metrics of the prompts
repeated by their weights. The interval is the 2.5 and 97.5 percentiles of the resampled metric. Held fixed: the
fitted models (the out-of-fold scores are resampled, not refitted), so the intervals reflect the test sampling.

One dependence the group resampling leaves: in a templates x requests cross the prompts of different families
share their requests too. Holding both factors at once is not possible (see :mod:`attnscan.detect.training`);
the intervals resample the unit the folds held out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from ..errors import AttnscanError
from .detectors import FloatArray, IntArray, as_labels, check_both_classes

__all__ = [
    "auroc_rows",
    "bootstrap_intervals",
    "checked_scores",
    "group_weights",
    "paired_auroc_difference",
    "tpr_rows",
    "weighted_auroc_rows",
    "weighted_tpr_rows",
]


def checked_scores(y_true: npt.ArrayLike, score: npt.ArrayLike) -> tuple[IntArray, FloatArray]:
    """Labels ``int [N]`` and scores ``float [N]``, checked: one finite score per label, both classes present."""
    y = as_labels(y_true)
    s = np.asarray(score, dtype=np.float64)
    if s.shape != y.shape:
        raise AttnscanError(f"{s.shape[0] if s.ndim else 0} scores for {y.shape[0]} labels: give one score per prompt")
    if not np.isfinite(s).all():
        raise AttnscanError("scores hold NaN or infinite values")
    check_both_classes(y, "computing detection metrics")
    return y, s


# --------------------------------------------------------------------------------------------------- row metrics


def _midranks(s: FloatArray) -> FloatArray:
    """Ranks (1-based, ties get their mean rank) along the last axis of ``s [..., n]``."""
    n = s.shape[-1]
    order = np.argsort(s, axis=-1, kind="stable")
    srt = np.take_along_axis(s, order, axis=-1)
    idx = np.broadcast_to(np.arange(n), s.shape)
    new = np.ones(s.shape, dtype=bool)
    new[..., 1:] = srt[..., 1:] != srt[..., :-1]
    last = np.ones(s.shape, dtype=bool)
    last[..., :-1] = new[..., 1:]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=-1)
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, idx, n - 1), axis=-1), axis=-1), axis=-1)
    ranks = np.empty(s.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=-1)
    return ranks


def auroc_rows(pos: FloatArray, neg: FloatArray) -> FloatArray:
    """AUROC of each row: positives ``[B, n1]`` against negatives ``[B, n0]`` (Mann–Whitney with mid-ranks)."""
    n1, n0 = pos.shape[-1], neg.shape[-1]
    ranks = _midranks(np.concatenate([pos, neg], axis=-1))
    return np.asarray((ranks[..., :n1].sum(axis=-1) - n1 * (n1 + 1) / 2.0) / (n1 * n0), dtype=np.float64)


def tpr_rows(pos: FloatArray, neg: FloatArray, target: float) -> FloatArray:
    """Largest empirical-ROC TPR with FPR <= ``target`` for each row of ``pos [B, n1]``, ``neg [B, n0]``.

    At most ``m = floor(target · n0)`` negatives may score at or above the threshold, so the best threshold lies
    just above the (m+1)-th highest negative score ``v``; the TPR there is the share of positives scoring above ``v``.
    """
    n0 = neg.shape[-1]
    m = math.floor(target * n0 + 1e-9)
    if m >= n0:
        return np.ones(pos.shape[:-1], dtype=np.float64)
    v = -np.sort(-neg, axis=-1)[..., m]
    return np.asarray((pos > v[..., None]).mean(axis=-1), dtype=np.float64)


def weighted_auroc_rows(y: IntArray, score: FloatArray, w: FloatArray) -> FloatArray:
    """AUROC of ``score [N]`` against ``y [N]`` under each row of prompt weights ``w [B, N]`` (whole numbers: how
    often each prompt was drawn): the AUROC of the prompts repeated by their weights, ties counting one half."""
    order = np.argsort(score, kind="stable")
    s, labels, ws = score[order], y[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first prompt of each run of tied scores
    pos = np.add.reduceat(ws * (labels == 1), starts, axis=1)  # [B, blocks] jailbreak weight per tied run
    neg = np.add.reduceat(ws * (labels == 0), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # benign weight strictly below each run
    total = pos.sum(axis=1) * neg.sum(axis=1)
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    return np.asarray(np.where(total > 0, wins / np.where(total > 0, total, 1.0), np.nan), dtype=np.float64)


def weighted_tpr_rows(y: IntArray, score: FloatArray, w: FloatArray, target: float) -> FloatArray:
    """:func:`tpr_rows` of the prompts repeated by each row of the weights ``w [B, N]``: the share of jailbreak
    weight scoring above the (m+1)-th highest benign score counted with multiplicity, ``m = floor(target · n0)``."""
    neg_idx, pos_idx = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    order = neg_idx[np.argsort(-score[neg_idx], kind="stable")]
    neg_sorted, cum = score[order], np.cumsum(w[:, order], axis=1)  # benign scores high to low, weight so far
    n0 = cum[:, -1]
    m = np.floor(target * n0 + 1e-9)
    idx = np.minimum((cum <= m[:, None]).sum(axis=1), neg_sorted.size - 1)  # first position whose count passes m
    v = neg_sorted[idx]
    wpos = w[:, pos_idx]
    above = (wpos * (score[pos_idx][None, :] > v[:, None])).sum(axis=1)
    tpr = above / np.maximum(wpos.sum(axis=1), 1e-300)
    return np.asarray(np.where(m >= n0, 1.0, tpr), dtype=np.float64)


# --------------------------------------------------------------------------------------------------- resamples


def _streams(seed: int, n: int) -> list[np.random.Generator]:
    """``n`` independent generators from ``seed``: one per class (or stratum), so that drawing the resamples in
    chunks of any size reads each stream in the same order."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _draw(rng: np.random.Generator, b: int, n: int) -> IntArray:
    """``[b, n]`` indices drawn uniformly from ``0..n-1``, from uniform doubles (one per index, so consecutive calls
    continue one stream: ``b = 4`` then ``b = 6`` gives the rows of one ``b = 10`` call)."""
    return np.minimum((rng.random((b, n)) * n).astype(np.int64), n - 1)


def _resamples(y: IntArray, n_bootstrap: int, seed: int, chunk: int) -> Iterator[tuple[IntArray, IntArray]]:
    """Bootstrap resamples of the prompts of ``y`` within each class, ``chunk`` at a time: the indices of the
    jailbreak prompts drawn ``[b, n1]`` and of the benign ones ``[b, n0]``, each class from its own stream spawned
    from ``seed`` (so the chunk size does not change the draws)."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng_pos, rng_neg = _streams(seed, 2)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        yield pos[_draw(rng_pos, b, pos.size)], neg[_draw(rng_neg, b, neg.size)]


def _group_codes(y: IntArray, groups: npt.ArrayLike) -> IntArray:
    """``groups`` as ``int [N]`` codes 0..G-1 (checked: one per prompt, none negative)."""
    codes = np.asarray(groups)
    if codes.shape != y.shape or not np.issubdtype(codes.dtype, np.integer) or (codes < 0).any():
        raise AttnscanError(f"groups must be one non-negative integer code per prompt ({y.size}), got {codes.shape}")
    _, dense = np.unique(codes, return_inverse=True)
    return np.asarray(dense, dtype=np.int64)


def group_weights(
    y: npt.ArrayLike, groups: npt.ArrayLike, n_bootstrap: int, seed: int, chunk: int = 256
) -> Iterator[FloatArray]:
    """Cluster-bootstrap resamples as prompt weights ``float [b, N]``, ``chunk`` at a time: whole groups drawn with
    replacement within the strata of the module docstring (each keeps its number of groups), each stratum from its
    own stream spawned from ``seed`` (so the chunk size does not change the draws); a prompt's weight is how many
    times its group was drawn."""
    labels = as_labels(y)
    codes = _group_codes(labels, groups)
    n_groups = int(codes.max()) + 1 if codes.size else 0
    has = np.zeros((n_groups, 2), dtype=bool)
    has[codes, labels] = True
    stratum = has[:, 1].astype(np.int64) * 2 + has[:, 0].astype(np.int64) - 1  # 0 benign, 1 jailbreak, 2 both
    members = [np.flatnonzero(stratum == k) for k in range(3)]
    streams = _streams(seed, 3)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        counts = np.zeros((b, n_groups), dtype=np.float64)
        rows = np.arange(b)[:, None]
        for idx, rng in zip(members, streams, strict=True):
            if idx.size:  # idx.size groups of the stratum drawn with replacement, counted
                np.add.at(counts, (rows, idx[_draw(rng, b, idx.size)]), 1.0)
        yield counts[:, codes]


def bootstrap_intervals(
    y: IntArray,
    score: FloatArray,
    n_bootstrap: int,
    seed: int,
    chunk: int = 256,
    *,
    groups: npt.ArrayLike | None = None,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """95 % percentile bootstrap intervals ``((auroc_low, auroc_high), (tpr5_low, tpr5_high))`` of the AUROC and
    of the TPR at 5 % FPR of the scores ``score`` (``float [N]``) against the labels ``y`` (``int [N]``, 1 =
    jailbreak).

    Each of the ``n_bootstrap`` resamples draws prompts within their class, or, given ``groups`` (an integer code
    per prompt), whole groups (see the module docstring), from a generator seeded with ``seed``; ``chunk``
    resamples are scored at once, which bounds the memory and does not change the result. ``n_bootstrap <= 0``
    gives NaN intervals.
    """
    nan = (float("nan"), float("nan"))
    if n_bootstrap <= 0:
        return nan, nan
    aucs, tprs = [], []
    if groups is None:
        for p, q in _resamples(y, n_bootstrap, seed, chunk):
            aucs.append(auroc_rows(score[p], score[q]))
            tprs.append(tpr_rows(score[p], score[q], 0.05))
    else:
        for w in group_weights(y, groups, n_bootstrap, seed, chunk):
            aucs.append(weighted_auroc_rows(y, score, w))
            tprs.append(weighted_tpr_rows(y, score, w, 0.05))
    auc_ci = np.nanpercentile(np.concatenate(aucs), [2.5, 97.5])
    tpr_ci = np.nanpercentile(np.concatenate(tprs), [2.5, 97.5])
    return (float(auc_ci[0]), float(auc_ci[1])), (float(tpr_ci[0]), float(tpr_ci[1]))


def paired_auroc_difference(
    y: npt.ArrayLike,
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    n_bootstrap: int,
    seed: int,
    chunk: int = 256,
    *,
    groups: npt.ArrayLike | None = None,
) -> tuple[float, float, float]:
    """``AUROC(a) − AUROC(b)`` of two scores of the same prompts, with its 95 % percentile bootstrap interval:
    ``(difference, low, high)``. Each resample draws the same prompts (within each class, or whole ``groups``, as
    in :func:`bootstrap_intervals`) for both scores, so the interval accounts for their correlation. NaN interval
    for ``n_bootstrap <= 0``."""
    labels, sa = checked_scores(y, a)
    _, sb = checked_scores(labels, b)
    diff = float(auroc_rows(sa[labels == 1][None], sa[labels == 0][None])[0])
    diff -= float(auroc_rows(sb[labels == 1][None], sb[labels == 0][None])[0])
    if n_bootstrap <= 0:
        return diff, float("nan"), float("nan")
    if groups is None:
        draws = _resamples(labels, n_bootstrap, seed, chunk)
        diffs = [auroc_rows(sa[p], sa[q]) - auroc_rows(sb[p], sb[q]) for p, q in draws]
    else:
        weights = group_weights(labels, groups, n_bootstrap, seed, chunk)
        diffs = [weighted_auroc_rows(labels, sa, w) - weighted_auroc_rows(labels, sb, w) for w in weights]
    low, high = np.nanpercentile(np.concatenate(diffs), [2.5, 97.5])
    return diff, float(low), float(high)
