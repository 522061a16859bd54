"""Detection metrics, cross-validation and the per-layer detection table of the detectors in
:mod:`attnscan.detect.detectors`.

Metrics (:func:`metrics`)
-------------------------
- ``auroc``: area under the ROC curve, rank-based (Mann–Whitney with mid-ranks: a tied jailbreak/benign pair counts
  one half). Equals ``sklearn.metrics.roc_auc_score``.
- ``f1`` and ``accuracy``: at threshold 0.5 on the probability (``score >= 0.5`` predicts jailbreak).
- ``tpr1`` / ``tpr5``: true-positive rate at 1 % / 5 % false-positive rate, without interpolation: the largest TPR
  among the points of the empirical ROC curve (thresholds at the observed scores, ``score >= t`` predicts
  jailbreak) whose FPR is at most the target. With fewer than 100 benign prompts, "FPR ≤ 1 %" means *no* benign
  prompt above the threshold.

:func:`cross_validate` scores every prompt out of fold (stratified k-fold, shuffled with ``seed``, or, given
``groups``, folds that hold out whole groups: :mod:`attnscan.detect.folds`; the detector, CP decomposition included,
is fitted on the training folds only) and computes the metrics on the pooled out-of-fold scores. Pooling assumes
the folds' models give comparably scaled probabilities, as is usual. Its 95 % intervals are percentile bootstrap
intervals over prompts, resampled within each class (so each resample keeps the class counts) with ``seed``; they
hold the fitted models fixed and so reflect the test-set sampling only. With grouped folds the prompts of a group
are not independent, so these intervals are too narrow: read them as a lower bound on the uncertainty.

:func:`threshold_at_fpr` picks the operating point of a score at a target false-positive rate;
:func:`paired_auroc_difference` compares two scores of the same prompts (a detector and a baseline).

Layer table (:func:`layer_detection_table`)
-------------------------------------------
One row per layer with the CP and probe metrics (``cp_auroc``, ``cp_auroc_low``, ``cp_auroc_high``, ``cp_f1``,
``cp_accuracy``, ``cp_tpr1``, ``cp_tpr5``, ``cp_tpr5_low``, ``cp_tpr5_high``, and the same with ``probe_``) and
``flagged``: the layer's out-of-fold AUROC (of the CP detector, or of the probe with ``flag_on="probe"``) is at
least ``threshold``. All layers share the same folds and bootstrap resamples. A flag says the layer's
representations separate the two prompt sets; it is not a measurement of jailbreak success.

Given ``groups``, the main columns (and so ``flagged`` and :func:`best_layer`) are the grouped numbers, ``cv`` and
``n_groups`` say so, and the stratified numbers stand beside them as ``k_stratified`` and ``{kind}_{m}_stratified``
for ``m`` in :data:`SIDE_COLUMNS` (auroc, auroc_low, auroc_high, tpr5). A large gap between the two says the
detector recognises the groups (the wrappers) rather than what they share. :func:`layer_detection` does the same on
ready-made plans (:func:`attnscan.detect.folds.fold_plans`: more groupings beside the main one) and keeps the
out-of-fold scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from ..errors import AttnscanError
from .detectors import CPDetector, Detector, FloatArray, IntArray, ProbeDetector, as_labels, check_both_classes
from .folds import Folds, GroupIds, check_folds, fold_plans, grouped_folds, out_of_fold, stratified_folds, usable_folds

__all__ = [
    "METRIC_COLUMNS",
    "SIDE_COLUMNS",
    "LayerDetection",
    "auroc",
    "best_layer",
    "bootstrap_intervals",
    "check_flag_on",
    "check_folds",
    "check_fpr",
    "check_n_bootstrap",
    "check_threshold",
    "cross_validate",
    "flagged_layers",
    "layer_detection",
    "layer_detection_table",
    "metrics",
    "paired_auroc_difference",
    "threshold_at_fpr",
    "tpr_at_fpr",
    "usable_folds",
]


# --------------------------------------------------------------------------------------------------- metrics


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


def _auroc_rows(pos: FloatArray, neg: FloatArray) -> FloatArray:
    """AUROC of each row: positives ``[B, n1]`` against negatives ``[B, n0]`` (Mann–Whitney with mid-ranks)."""
    n1, n0 = pos.shape[-1], neg.shape[-1]
    ranks = _midranks(np.concatenate([pos, neg], axis=-1))
    return np.asarray((ranks[..., :n1].sum(axis=-1) - n1 * (n1 + 1) / 2.0) / (n1 * n0), dtype=np.float64)


def _tpr_rows(pos: FloatArray, neg: FloatArray, target: float) -> FloatArray:
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


def _split(y_true: npt.ArrayLike, score: npt.ArrayLike) -> tuple[IntArray, FloatArray]:
    y = as_labels(y_true)
    s = np.asarray(score, dtype=np.float64)
    if s.shape != y.shape:
        raise AttnscanError(f"{s.shape[0] if s.ndim else 0} scores for {y.shape[0]} labels: give one score per prompt")
    if not np.isfinite(s).all():
        raise AttnscanError("scores hold NaN or infinite values")
    check_both_classes(y, "computing detection metrics")
    return y, s


def auroc(y_true: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Area under the ROC curve of ``score [N]`` for labels ``y_true [N]`` (1 = jailbreak); ties count one half."""
    y, s = _split(y_true, score)
    return float(_auroc_rows(s[y == 1][None], s[y == 0][None])[0])


def tpr_at_fpr(y_true: npt.ArrayLike, score: npt.ArrayLike, target: float) -> float:
    """The largest TPR on the empirical ROC curve whose FPR is at most ``target`` (no interpolation)."""
    if not 0.0 <= target <= 1.0:
        raise AttnscanError(f"target false-positive rate must lie in [0, 1], got {target}")
    y, s = _split(y_true, score)
    return float(_tpr_rows(s[y == 1][None], s[y == 0][None], target)[0])


def metrics(y_true: npt.ArrayLike, score: npt.ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Detection metrics of probabilities ``score [N]`` against ``y_true [N]`` (1 = jailbreak).

    Returns ``auroc``, ``f1`` and ``accuracy`` (``score >= threshold`` predicts jailbreak), ``tpr1`` and ``tpr5``
    (TPR at 1 % and 5 % FPR, see :func:`tpr_at_fpr`), ``n`` and ``n_jailbreak``.
    """
    y, s = _split(y_true, score)
    pos, neg = s[y == 1][None], s[y == 0][None]
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return {
        "auroc": float(_auroc_rows(pos, neg)[0]),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "accuracy": float(np.mean(pred == (y == 1))),
        "tpr1": float(_tpr_rows(pos, neg, 0.01)[0]),
        "tpr5": float(_tpr_rows(pos, neg, 0.05)[0]),
        "n": float(y.size),
        "n_jailbreak": float(y.sum()),
    }


def check_n_bootstrap(n_bootstrap: int) -> None:
    """Refuse a negative number of bootstrap resamples (0 is allowed: no intervals, see
    :func:`bootstrap_intervals`)."""
    if n_bootstrap < 0:
        raise AttnscanError(f"n_bootstrap must be 0 or more, got {n_bootstrap}")


def check_threshold(threshold: float, of: str) -> None:
    """Refuse a threshold outside [0, 1]; ``of`` says what it thresholds (``"an AUROC"``, ``"a probability"``)."""
    if not 0.0 <= threshold <= 1.0:
        raise AttnscanError(f"threshold must be {of} in [0, 1], got {threshold}")


def check_flag_on(flag_on: str) -> None:
    """Refuse a ``flag_on`` other than the two detector kinds, ``"cp"`` and ``"probe"``."""
    if flag_on not in ("cp", "probe"):
        raise AttnscanError(f"flag_on must be 'cp' or 'probe', got {flag_on!r}")


def check_fpr(fpr: float) -> None:
    """Refuse a target false-positive rate for an operating point outside (0, 0.5]."""
    if not 0.0 < fpr <= 0.5:
        raise AttnscanError(f"--fpr must be in (0, 0.5], got {fpr}")


def threshold_at_fpr(y_true: npt.ArrayLike, score: npt.ArrayLike, fpr: float) -> tuple[float, float, float]:
    """The operating point of ``score [N]`` at a target false-positive rate: ``(threshold, tpr, fpr_achieved)``.

    ``threshold`` is the lowest score threshold (``score >= threshold`` flags) that lets at most
    ``floor(fpr · n_benign)`` benign prompts through: just above the (that + 1)-th highest benign score, so it is
    the point :func:`tpr_at_fpr` picks and ``tpr`` equals ``tpr_at_fpr(y_true, score, fpr)``. ``fpr_achieved`` is
    the benign share at or above it (at most ``fpr``).
    """
    check_fpr(fpr)
    y, s = _split(y_true, score)
    pos, neg = s[y == 1], s[y == 0]
    m = math.floor(fpr * neg.size + 1e-9)
    v = -np.sort(-neg)[m]
    threshold = float(np.nextafter(v, np.inf))
    return threshold, float(np.mean(pos >= threshold)), float(np.mean(neg >= threshold))


def cross_validate(
    make_detector: Callable[[], Detector],
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    k: int = 5,
    seed: int = 0,
    n_bootstrap: int = 1000,
    *,
    groups: GroupIds | None = None,
    folds: Folds | None = None,
) -> dict[str, Any]:
    """Out-of-fold detection metrics with bootstrap intervals.

    Args:
        make_detector: returns a fresh unfitted detector (e.g. ``lambda: CPDetector(rank=8)``).
        X: the detector's input for all prompts, ``[N, ...]`` (``[N, K, H]`` for CP, ``[N, H]`` for the probe).
        y: labels ``[N]`` (1 = jailbreak).
        k: folds of the stratified k-fold (shuffled with ``seed``); reduced, with a warning, to the smaller class's
            size when that is below ``k``.
        seed: seeds the fold assignment and the bootstrap.
        n_bootstrap: bootstrap resamples for the 95 % intervals (0 gives NaN intervals).
        groups: a group id per prompt: hold out whole groups instead (:func:`attnscan.detect.folds.grouped_folds`:
            ``k`` then shrinks to the number of groups a class lies in).
        folds: ready-made splits (:class:`attnscan.detect.folds.Folds`) instead of ``k`` and ``groups``.

    Returns:
        The :func:`metrics` of the pooled out-of-fold probabilities, plus ``auroc_low``/``auroc_high`` and
        ``tpr5_low``/``tpr5_high`` (2.5 and 97.5 percentiles over resamples of prompts within each class), ``k``
        (folds used), ``cv`` (``"stratified"`` or ``"grouped"``), ``n_groups`` (None for stratified folds),
        ``seed``, ``n_bootstrap``, ``oof_score`` (``float [N]``) and ``fold`` (``int [N]``).
    """
    x = np.asarray(X)
    labels = as_labels(y, x.shape[0] if x.ndim else 0)
    if folds is None:
        folds = stratified_folds(labels, k, seed) if groups is None else grouped_folds(labels, groups, k, seed)
    oof, fold = out_of_fold(make_detector, x, labels, folds)
    out: dict[str, Any] = dict(metrics(labels, oof))
    auc_ci, tpr_ci = bootstrap_intervals(labels, oof, n_bootstrap, seed)
    out.update(
        auroc_low=auc_ci[0],
        auroc_high=auc_ci[1],
        tpr5_low=tpr_ci[0],
        tpr5_high=tpr_ci[1],
        k=folds.k,
        cv=folds.kind,
        n_groups=folds.n_groups,
        seed=seed,
        n_bootstrap=n_bootstrap,
        oof_score=oof,
        fold=fold,
    )
    return out


def _resamples(y: IntArray, n_bootstrap: int, seed: int, chunk: int) -> Iterator[tuple[IntArray, IntArray]]:
    """Bootstrap resamples of the prompts of ``y`` within each class, ``chunk`` at a time: the indices of the
    jailbreak prompts drawn ``[b, n1]`` and of the benign ones ``[b, n0]``, from a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        yield pos[rng.integers(0, pos.size, size=(b, pos.size))], neg[rng.integers(0, neg.size, size=(b, neg.size))]


def bootstrap_intervals(
    y: IntArray, score: FloatArray, n_bootstrap: int, seed: int, chunk: int = 256
) -> tuple[tuple[float, float], tuple[float, float]]:
    """95 % percentile bootstrap intervals ``((auroc_low, auroc_high), (tpr5_low, tpr5_high))`` of the AUROC and
    of the TPR at 5 % FPR of the scores ``score`` (``float [N]``) against the labels ``y`` (``int [N]``, 1 =
    jailbreak).

    Each of the ``n_bootstrap`` resamples draws the jailbreak and the benign prompts with replacement within their
    class (so the class counts stay fixed), from a generator seeded with ``seed``; ``chunk`` resamples are scored at
    once, which bounds the memory and does not change the result. ``n_bootstrap <= 0`` gives NaN intervals. These
    are the intervals of :func:`cross_validate` and of the ``*_low``/``*_high`` columns of
    :func:`layer_detection_table`.
    """
    nan = (float("nan"), float("nan"))
    if n_bootstrap <= 0:
        return nan, nan
    aucs, tprs = [], []
    for p, q in _resamples(y, n_bootstrap, seed, chunk):
        aucs.append(_auroc_rows(score[p], score[q]))
        tprs.append(_tpr_rows(score[p], score[q], 0.05))
    auc_ci = np.percentile(np.concatenate(aucs), [2.5, 97.5])
    tpr_ci = np.percentile(np.concatenate(tprs), [2.5, 97.5])
    return (float(auc_ci[0]), float(auc_ci[1])), (float(tpr_ci[0]), float(tpr_ci[1]))


def paired_auroc_difference(
    y: npt.ArrayLike, a: npt.ArrayLike, b: npt.ArrayLike, n_bootstrap: int, seed: int, chunk: int = 256
) -> tuple[float, float, float]:
    """``AUROC(a) − AUROC(b)`` of two scores of the same prompts, with its 95 % percentile bootstrap interval:
    ``(difference, low, high)``. Each resample draws the same prompts (within each class, as in
    :func:`bootstrap_intervals`) for both scores, so the interval accounts for their correlation. NaN interval for
    ``n_bootstrap <= 0``."""
    labels, sa = _split(y, a)
    _, sb = _split(labels, b)
    diff = float(_auroc_rows(sa[labels == 1][None], sa[labels == 0][None])[0])
    diff -= float(_auroc_rows(sb[labels == 1][None], sb[labels == 0][None])[0])
    if n_bootstrap <= 0:
        return diff, float("nan"), float("nan")
    draws = _resamples(labels, n_bootstrap, seed, chunk)
    diffs = [_auroc_rows(sa[p], sa[q]) - _auroc_rows(sb[p], sb[q]) for p, q in draws]
    low, high = np.percentile(np.concatenate(diffs), [2.5, 97.5])
    return diff, float(low), float(high)


# --------------------------------------------------------------------------------------------------- layer table

#: The per-detector metric names of a detection table, in column order: ``cp_<name>`` and ``probe_<name>`` in
#: :func:`layer_detection_table`, the same in :func:`attnscan.detect.jobs.evaluate_detector`.
METRIC_COLUMNS = (
    "auroc",
    "auroc_low",
    "auroc_high",
    "f1",
    "accuracy",
    "tpr1",
    "tpr5",
    "tpr5_low",
    "tpr5_high",
)


#: The metric names reported for each extra cross-validation beside the main one (the stratified folds beside the
#: grouped ones, ...): ``{kind}_{name}_{cv}`` in :func:`layer_detection`, e.g. ``cp_auroc_low_stratified``.
SIDE_COLUMNS = ("auroc", "auroc_low", "auroc_high", "tpr5")


@dataclass
class LayerDetection:
    """What :func:`layer_detection` computed: the ``table`` (one row per layer) and the out-of-fold scores behind
    it, ``oof[(cv, kind, layer)]`` ``float [N]`` (``cv``: ``""`` for the main folds, else the name of the extra
    ones; ``kind``: ``"cp"`` or ``"probe"``)."""

    table: pd.DataFrame
    oof: dict[tuple[str, str, int], FloatArray]


def _sources(
    tensors: Mapping[int, npt.ArrayLike] | None, pooled: Mapping[int, npt.ArrayLike] | None, flag_on: str
) -> tuple[dict[str, Mapping[int, npt.ArrayLike]], list[int]]:
    """The detector inputs by kind (``cp``: tensors, ``probe``: pooled) and their layers (checked: the same)."""
    check_flag_on(flag_on)
    sources = {kind: x for kind, x in (("cp", tensors), ("probe", pooled)) if x is not None}
    if not sources:
        raise AttnscanError("give tensors (for the CP detector), pooled (for the probe), or both")
    if flag_on not in sources:
        raise AttnscanError(f"flag_on={flag_on!r} needs {'tensors' if flag_on == 'cp' else 'pooled'} features")
    layer_sets = [sorted(int(layer) for layer in features) for features in sources.values()]
    if len(layer_sets) == 2 and layer_sets[0] != layer_sets[1]:
        raise AttnscanError(
            f"tensors hold layers {layer_sets[0]} but pooled holds {layer_sets[1]}: give the same layers"
        )
    if not layer_sets[0]:
        raise AttnscanError("no layers given")
    return sources, layer_sets[0]


def layer_detection(
    tensors: Mapping[int, npt.ArrayLike] | None,
    pooled: Mapping[int, npt.ArrayLike] | None,
    y: npt.ArrayLike,
    plans: Mapping[str, Folds],
    *,
    rank: int = 8,
    seed: int = 0,
    threshold: float = 0.9,
    flag_on: Literal["cp", "probe"] = "cp",
    n_bootstrap: int = 1000,
    C: float = 1.0,
    max_iter: int = 100,
) -> LayerDetection:
    """:func:`layer_detection_table` on ready-made cross-validation ``plans``
    (:func:`~attnscan.detect.folds.fold_plans`), keeping the out-of-fold scores.

    The main plan (``plans[""]``) gives the main columns, ``flagged`` and ``k`` (and, when grouped, ``cv`` and
    ``n_groups``); each other plan ``s`` adds ``k_s`` (and ``n_groups_s`` when grouped) and ``{kind}_{m}_{s}`` for
    ``m`` in :data:`SIDE_COLUMNS`.
    """
    makers: dict[str, Callable[[], Detector]] = {
        "cp": lambda: CPDetector(rank=rank, seed=seed, C=C, max_iter=max_iter),
        "probe": lambda: ProbeDetector(C=C),
    }
    sources, layers = _sources(tensors, pooled, flag_on)
    if "" not in plans:
        raise AttnscanError("plans need a main cross-validation under the key ''")
    labels = as_labels(y)
    oof: dict[tuple[str, str, int], FloatArray] = {}
    rows: list[dict[str, Any]] = []
    for layer in layers:
        row: dict[str, Any] = {"layer": layer}
        side: dict[str, Any] = {}
        for name, folds in plans.items():
            for kind, features in sources.items():
                x = features[layer]
                res = cross_validate(makers[kind], x, labels, seed=seed, n_bootstrap=n_bootstrap, folds=folds)
                oof[(name, kind, layer)] = res["oof_score"]
                if name == "":
                    row.update(n=int(res["n"]), n_jailbreak=int(res["n_jailbreak"]), k=folds.k)
                    row.update({"cv": folds.kind, "n_groups": folds.n_groups} if folds.kind == "grouped" else {})
                    row.update({f"{kind}_{m}": res[m] for m in METRIC_COLUMNS})
                    continue
                side[f"k_{name}"] = folds.k
                side.update({f"n_groups_{name}": folds.n_groups} if folds.kind == "grouped" else {})
                side.update({f"{kind}_{m}_{name}": res[m] for m in SIDE_COLUMNS})
        row["flagged"] = bool(row[f"{flag_on}_auroc"] >= threshold)
        rows.append({**row, **side})
    table = pd.DataFrame(rows)
    table.attrs.update(rank=rank, seed=seed, threshold=threshold, flag_on=flag_on, n_bootstrap=n_bootstrap)
    table.attrs.update(C=C, max_iter=max_iter, cv=plans[""].kind)
    return LayerDetection(table, oof)


def layer_detection_table(
    tensors: Mapping[int, npt.ArrayLike] | None,
    pooled: Mapping[int, npt.ArrayLike] | None,
    y: npt.ArrayLike,
    *,
    rank: int = 8,
    k: int = 5,
    seed: int = 0,
    threshold: float = 0.9,
    flag_on: Literal["cp", "probe"] = "cp",
    n_bootstrap: int = 1000,
    C: float = 1.0,
    max_iter: int = 100,
    groups: GroupIds | None = None,
) -> pd.DataFrame:
    """Cross-validated CP and probe detection metrics for every layer.

    Args:
        tensors: ``{layer: float [N, K, H]}`` for the CP detector (None skips the ``cp_`` columns).
        pooled: ``{layer: float [N, H]}`` for the probe (None skips the ``probe_`` columns).
        y: labels ``[N]`` (1 = jailbreak).
        rank, max_iter: of the CP decomposition; ``C``: of both logistic regressions.
        k, seed, n_bootstrap: see :func:`cross_validate`; every layer uses the same folds and resamples.
        threshold, flag_on: ``flagged`` is ``{flag_on}_auroc >= threshold``.
        groups: a group id per prompt (see :mod:`attnscan.detect.folds`): the main columns then hold out whole
            groups, and the stratified numbers are reported beside them.

    Returns:
        One row per layer (ascending): ``layer``, ``n``, ``n_jailbreak``, ``k``, ``cp_<m>`` and ``probe_<m>`` for
        ``m`` in auroc, auroc_low, auroc_high, f1, accuracy, tpr1, tpr5, tpr5_low, tpr5_high, then ``flagged``.
        With ``groups`` these are the grouped numbers (``flagged`` and so :func:`best_layer` use them), ``cv``
        (``"grouped"``) and ``n_groups`` follow ``k``, and the stratified ones are added as ``k_stratified``,
        ``cp_auroc_stratified``, ``cp_auroc_low_stratified``, ``cp_auroc_high_stratified``,
        ``cp_tpr5_stratified`` and the same for ``probe_``. ``table.attrs`` records the settings.
    """
    check_flag_on(flag_on)
    labels = as_labels(y)
    plans = fold_plans(labels, int(k), seed, groups)  # warns once here rather than once per layer and detector
    detection = layer_detection(
        tensors,
        pooled,
        labels,
        plans,
        rank=rank,
        seed=seed,
        threshold=threshold,
        flag_on=flag_on,
        n_bootstrap=n_bootstrap,
        C=C,
        max_iter=max_iter,
    )
    detection.table.attrs.update(k=k)
    return detection.table


def best_layer(table: pd.DataFrame, by: str = "cp_auroc") -> int:
    """The layer with the highest ``by`` (ties: the lowest layer)."""
    if by not in table.columns:
        raise AttnscanError(f"table has no column {by!r}; columns are {list(table.columns)}")
    values = table[by].to_numpy(dtype=np.float64)
    if not np.isfinite(values).any():
        raise AttnscanError(f"column {by!r} holds no finite values")
    layers = table["layer"].to_numpy()
    best = np.nanmax(values)
    return int(np.min(layers[values == best]))


def flagged_layers(table: pd.DataFrame) -> list[int]:
    """The flagged layers, ascending."""
    return sorted(int(layer) for layer in table.loc[table["flagged"].astype(bool), "layer"])
