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
intervals (:mod:`attnscan.detect.bootstrap`) with ``seed``: over prompts, resampled within each class, for
stratified folds; over whole groups (template families, requests: the unit the folds hold out) for grouped folds,
since the prompts of a group are not independent and resampling them one by one would make the interval too narrow.
They hold the fitted models fixed and so reflect the test-set sampling only.

:func:`threshold_at_fpr` picks the operating point of a score at a target false-positive rate;
:func:`paired_auroc_difference` (from :mod:`attnscan.detect.bootstrap`, like :func:`bootstrap_intervals`) compares
two scores of the same prompts (a detector and a baseline).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from ..errors import AttnscanError
from .bootstrap import auroc_rows, bootstrap_intervals, checked_scores, paired_auroc_difference, tpr_rows
from .detectors import CPDetector, Detector, FloatArray, ProbeDetector, as_labels
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


def auroc(y_true: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Area under the ROC curve of ``score [N]`` for labels ``y_true [N]`` (1 = jailbreak); ties count one half."""
    y, s = checked_scores(y_true, score)
    return float(auroc_rows(s[y == 1][None], s[y == 0][None])[0])


def tpr_at_fpr(y_true: npt.ArrayLike, score: npt.ArrayLike, target: float) -> float:
    """The largest TPR on the empirical ROC curve whose FPR is at most ``target`` (no interpolation)."""
    if not 0.0 <= target <= 1.0:
        raise AttnscanError(f"target false-positive rate must lie in [0, 1], got {target}")
    y, s = checked_scores(y_true, score)
    return float(tpr_rows(s[y == 1][None], s[y == 0][None], target)[0])


def metrics(y_true: npt.ArrayLike, score: npt.ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Detection metrics of probabilities ``score [N]`` against ``y_true [N]`` (1 = jailbreak).

    Returns ``auroc``, ``f1`` and ``accuracy`` (``score >= threshold`` predicts jailbreak), ``tpr1`` and ``tpr5``
    (TPR at 1 % and 5 % FPR, see :func:`tpr_at_fpr`), ``n`` and ``n_jailbreak``.
    """
    y, s = checked_scores(y_true, score)
    pos, neg = s[y == 1][None], s[y == 0][None]
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return {
        "auroc": float(auroc_rows(pos, neg)[0]),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "accuracy": float(np.mean(pred == (y == 1))),
        "tpr1": float(tpr_rows(pos, neg, 0.01)[0]),
        "tpr5": float(tpr_rows(pos, neg, 0.05)[0]),
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
    y, s = checked_scores(y_true, score)
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
        ``tpr5_low``/``tpr5_high`` (2.5 and 97.5 percentiles over resamples of prompts within each class, or of
        whole groups for grouped folds: :func:`~attnscan.detect.bootstrap.bootstrap_intervals`), ``k``
        (folds used), ``cv`` (``"stratified"`` or ``"grouped"``), ``n_groups`` (None for stratified folds),
        ``seed``, ``n_bootstrap``, ``oof_score`` (``float [N]``) and ``fold`` (``int [N]``).
    """
    x = np.asarray(X)
    labels = as_labels(y, x.shape[0] if x.ndim else 0)
    if folds is None:
        folds = stratified_folds(labels, k, seed) if groups is None else grouped_folds(labels, groups, k, seed)
    oof, fold = out_of_fold(make_detector, x, labels, folds)
    out: dict[str, Any] = dict(metrics(labels, oof))
    auc_ci, tpr_ci = bootstrap_intervals(labels, oof, n_bootstrap, seed, groups=folds.codes)
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
