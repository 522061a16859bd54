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

:func:`cross_validate` scores every prompt out of fold (stratified k-fold, shuffled with ``seed``; the detector,
CP decomposition included, is fitted on the training folds only) and computes the metrics on the pooled
out-of-fold scores. Pooling assumes the folds' models give comparably scaled probabilities, as is usual. Its 95 %
intervals are percentile bootstrap intervals over prompts, resampled within each class (so each resample keeps the
class counts) with ``seed``; they hold the fitted models fixed and so reflect the test-set sampling only.

Layer table (:func:`layer_detection_table`)
-------------------------------------------
One row per layer with the CP and probe metrics (``cp_auroc``, ``cp_auroc_low``, ``cp_auroc_high``, ``cp_f1``,
``cp_accuracy``, ``cp_tpr1``, ``cp_tpr5``, ``cp_tpr5_low``, ``cp_tpr5_high``, and the same with ``probe_``) and
``flagged``: the layer's out-of-fold AUROC (of the CP detector, or of the probe with ``flag_on="probe"``) is at
least ``threshold``. All layers share the same folds and bootstrap resamples. A flag says the layer's
representations separate the two prompt sets; it is not a measurement of jailbreak success.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from ..errors import AttnscanError
from .detectors import CPDetector, Detector, FloatArray, IntArray, ProbeDetector, as_labels, check_both_classes

__all__ = [
    "METRIC_COLUMNS",
    "auroc",
    "best_layer",
    "bootstrap_intervals",
    "check_flag_on",
    "check_folds",
    "check_n_bootstrap",
    "check_threshold",
    "cross_validate",
    "flagged_layers",
    "layer_detection_table",
    "metrics",
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


def check_folds(k: int) -> None:
    """Refuse fewer than 2 cross-validation folds (:func:`usable_folds` checks ``k`` with this)."""
    if k < 2:
        raise AttnscanError(f"cross-validation needs at least 2 folds (k >= 2), got {k}")


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


def usable_folds(y: IntArray, k: int) -> int:
    """The number of stratified cross-validation folds the labels allow: ``k``, reduced (with a warning) to the
    size of the smaller class when that is below ``k``.

    ``y`` is ``int [N]`` (1 = jailbreak, 0 = benign). Raises :class:`~attnscan.errors.AttnscanError` for ``k < 2``
    or fewer than two prompts in either class. The warning names the caller's caller (``stacklevel=3``), so a
    function that calls this for its user gets the user's line.
    """
    check_folds(k)
    smallest = int(min(y.sum(), y.size - y.sum()))
    if smallest < 2:
        raise AttnscanError(
            f"cross-validation needs at least 2 prompts of each class; got {y.size - int(y.sum())} benign and "
            f"{int(y.sum())} jailbreak"
        )
    if smallest < k:
        warnings.warn(
            f"only {smallest} prompts in the smaller class: using {smallest}-fold instead of {k}-fold cross-validation",
            UserWarning,
            stacklevel=3,
        )
        return smallest
    return k


def cross_validate(
    make_detector: Callable[[], Detector],
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    k: int = 5,
    seed: int = 0,
    n_bootstrap: int = 1000,
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

    Returns:
        The :func:`metrics` of the pooled out-of-fold probabilities, plus ``auroc_low``/``auroc_high`` and
        ``tpr5_low``/``tpr5_high`` (2.5 and 97.5 percentiles over resamples of prompts within each class), ``k``
        (folds used), ``seed``, ``n_bootstrap``, ``oof_score`` (``float [N]``) and ``fold`` (``int [N]``).
    """
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(X)
    labels = as_labels(y, x.shape[0] if x.ndim else 0)
    k_used = usable_folds(labels, int(k))
    oof = np.full(labels.shape, np.nan, dtype=np.float64)
    fold = np.full(labels.shape, -1, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k_used, shuffle=True, random_state=seed)
    for i, (train, test) in enumerate(splitter.split(np.zeros(labels.size), labels)):
        detector = make_detector().fit(x[train], labels[train])
        oof[test] = detector.predict_proba(x[test])
        fold[test] = i
    out: dict[str, Any] = dict(metrics(labels, oof))
    auc_ci, tpr_ci = bootstrap_intervals(labels, oof, n_bootstrap, seed)
    out.update(
        auroc_low=auc_ci[0],
        auroc_high=auc_ci[1],
        tpr5_low=tpr_ci[0],
        tpr5_high=tpr_ci[1],
        k=k_used,
        seed=seed,
        n_bootstrap=n_bootstrap,
        oof_score=oof,
        fold=fold,
    )
    return out


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
    rng = np.random.default_rng(seed)
    pos, neg = score[y == 1], score[y == 0]
    aucs, tprs = [], []
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        p = pos[rng.integers(0, pos.size, size=(b, pos.size))]
        q = neg[rng.integers(0, neg.size, size=(b, neg.size))]
        aucs.append(_auroc_rows(p, q))
        tprs.append(_tpr_rows(p, q, 0.05))
    auc_ci = np.percentile(np.concatenate(aucs), [2.5, 97.5])
    tpr_ci = np.percentile(np.concatenate(tprs), [2.5, 97.5])
    return (float(auc_ci[0]), float(auc_ci[1])), (float(tpr_ci[0]), float(tpr_ci[1]))


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
) -> pd.DataFrame:
    """Cross-validated CP and probe detection metrics for every layer.

    Args:
        tensors: ``{layer: float [N, K, H]}`` for the CP detector (None skips the ``cp_`` columns).
        pooled: ``{layer: float [N, H]}`` for the probe (None skips the ``probe_`` columns).
        y: labels ``[N]`` (1 = jailbreak).
        rank, max_iter: of the CP decomposition; ``C``: of both logistic regressions.
        k, seed, n_bootstrap: see :func:`cross_validate`; every layer uses the same folds and resamples.
        threshold, flag_on: ``flagged`` is ``{flag_on}_auroc >= threshold``.

    Returns:
        One row per layer (ascending): ``layer``, ``n``, ``n_jailbreak``, ``k``, ``cp_<m>`` and ``probe_<m>`` for
        ``m`` in auroc, auroc_low, auroc_high, f1, accuracy, tpr1, tpr5, tpr5_low, tpr5_high, then ``flagged``.
        ``table.attrs`` records the settings.
    """
    check_flag_on(flag_on)
    sources: dict[str, tuple[Mapping[int, npt.ArrayLike], Callable[[], Detector]]] = {}
    if tensors is not None:
        sources["cp"] = (tensors, lambda: CPDetector(rank=rank, seed=seed, C=C, max_iter=max_iter))
    if pooled is not None:
        sources["probe"] = (pooled, lambda: ProbeDetector(C=C))
    if not sources:
        raise AttnscanError("give tensors (for the CP detector), pooled (for the probe), or both")
    if flag_on not in sources:
        raise AttnscanError(f"flag_on={flag_on!r} needs {'tensors' if flag_on == 'cp' else 'pooled'} features")
    layer_sets = [sorted(int(layer) for layer in features) for features, _ in sources.values()]
    if len(layer_sets) == 2 and layer_sets[0] != layer_sets[1]:
        raise AttnscanError(
            f"tensors hold layers {layer_sets[0]} but pooled holds {layer_sets[1]}: give the same layers"
        )
    if not layer_sets[0]:
        raise AttnscanError("no layers given")
    labels = as_labels(y)
    k_used = usable_folds(labels, int(k))  # warns once here rather than once per layer and detector
    rows: list[dict[str, Any]] = []
    for layer in layer_sets[0]:
        row: dict[str, Any] = {"layer": layer}
        for name, (features, make) in sources.items():
            res = cross_validate(make, features[layer], labels, k=k_used, seed=seed, n_bootstrap=n_bootstrap)
            row.update(n=int(res["n"]), n_jailbreak=int(res["n_jailbreak"]), k=res["k"])
            row.update({f"{name}_{m}": res[m] for m in METRIC_COLUMNS})
        row["flagged"] = bool(row[f"{flag_on}_auroc"] >= threshold)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs.update(
        rank=rank, k=k, seed=seed, threshold=threshold, flag_on=flag_on, n_bootstrap=n_bootstrap, C=C, max_iter=max_iter
    )
    return table


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
