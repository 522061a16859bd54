"""What :func:`~attnscan.detect.jobs.evaluate_detector` reports about a trained detector on new labelled prompts.

The headline (:func:`headline`) is the detector as it would be deployed: the layer and detector kind training chose
(``meta["best_layer"]``, ``meta["primary"]``), never a layer picked on the evaluation prompts, which would flatter
it. For that detector:

- ``auroc`` with its 95 % bootstrap interval (:mod:`attnscan.detect.bootstrap`: whole wrappers resampled when the
  evaluation prompts carry template families or templates, prompts otherwise), and the other kind's AUROC;
- at the saved threshold (the operating point of training, ``fpr=``; else ``threshold``, 0.5 by default): the TPR
  and the false-positive rate it achieves here, each with its Wilson interval, beside the target FPR of training;
- the baselines on the same prompts: the raw prompt length's AUROC (no fitting), and the TF-IDF text classifier
  fitted on the detector's training prompts (:func:`attnscan.detect.baselines.held_out_text_scores`; the detector
  directory keeps them in ``train_prompts.jsonl``) with its interval; ``text_margin`` = detector AUROC minus text
  AUROC, with a paired bootstrap interval, and ``beats_text`` = its interval lies above zero. A detector saved
  before training prompts were kept has no text baseline: ``text_baseline`` says so and the ``text_*`` values are
  None;
- the cross-validated AUROC of that layer in training, and training's rank stability (``meta["stability"]``);
- per attack family and risky-looking benign prompts, the flag rates at the saved threshold
  (:func:`attnscan.detect.rates.subset_rates`), when the evaluation prompts carry the labels.

The per-layer rows (:func:`layer_row`) hold every layer's numbers for reading; ``trained_layer`` marks the one the
headline is about.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..analysis.inference import wilson_interval
from .baselines import held_out_text_scores
from .bootstrap import bootstrap_intervals, paired_auroc_difference
from .detectors import FloatArray, IntArray, Kind
from .folds import group_codes, group_ids
from .inputs import DetectorInputs
from .metrics import METRIC_COLUMNS, auroc, check_threshold, metrics
from .rates import WRAPPER_LABELS, subset_rates
from .store import TrainedDetector

__all__ = ["TextBaseline", "eval_codes", "flag_threshold", "headline", "layer_row", "text_baseline"]


def eval_codes(records: Sequence[Mapping[str, Any]] | None) -> IntArray | None:
    """The group code of each evaluation prompt by its wrapper (family, else template; a prompt without one is a
    group of its own), for intervals that resample whole wrappers; None when no prompt carries a wrapper."""
    ids = group_ids(records, WRAPPER_LABELS) if records is not None else None
    return group_codes(ids) if ids is not None else None


def flag_threshold(trained: TrainedDetector, layer: int, kind: Kind, threshold: float | None) -> tuple[float, str]:
    """The probability threshold that flags a prompt, and where it comes from: ``threshold`` when given (checked),
    else the detector's operating point for ``layer`` and ``kind`` when it has one, else 0.5."""
    if threshold is not None:
        check_threshold(threshold, "a probability")
        return float(threshold), "given"
    point = trained.meta.get("operating_point")
    if isinstance(point, dict):
        value = point.get("thresholds", {}).get(kind, {}).get(str(layer))
        if value is not None:
            return float(value), f"operating point (fpr={point.get('fpr')})"
    return 0.5, "default"


@dataclass
class TextBaseline:
    """The text baseline's probabilities for the evaluation prompts (None when unavailable) and a note saying how
    it was made or why it is missing."""

    scores: FloatArray | None
    note: str


def text_baseline(trained: TrainedDetector, texts: Sequence[str]) -> TextBaseline:
    """The TF-IDF baseline fitted on the detector's training prompts, scored on ``texts``."""
    prompts = trained.training_prompts()
    if prompts is None:
        return TextBaseline(None, "unavailable: the detector directory keeps no training prompts (train it again)")
    train_texts, train_y = prompts
    scores = held_out_text_scores(train_texts, train_y, texts)
    return TextBaseline(scores, f"TF-IDF + logistic regression fitted on the {len(train_texts)} training prompts")


def _margin(
    y: IntArray, prob: FloatArray, text: TextBaseline, n_bootstrap: int, seed: int, codes: IntArray | None
) -> dict[str, Any]:
    """``text_margin`` (detector AUROC minus text AUROC) with its paired interval and ``beats_text``; Nones without
    a text baseline."""
    if text.scores is None:
        return dict.fromkeys(("text_margin", "text_margin_low", "text_margin_high", "beats_text"))
    diff, low, high = paired_auroc_difference(y, prob, text.scores, n_bootstrap, seed, groups=codes)
    return {"text_margin": diff, "text_margin_low": low, "text_margin_high": high, "beats_text": bool(low > 0)}


def layer_row(
    trained: TrainedDetector,
    layer: int,
    inputs: DetectorInputs,
    y: IntArray,
    *,
    threshold: float,
    n_bootstrap: int,
    seed: int,
    codes: IntArray | None,
    text: TextBaseline,
) -> dict[str, Any]:
    """One layer's row of the evaluation: both saved detectors' metrics with bootstrap intervals (resampling
    ``codes`` groups when given), the primary detector's margin over the text baseline, and the layer's
    cross-validated AUROCs and flag from training."""
    row: dict[str, Any] = {"layer": layer, "n": int(y.size), "n_jailbreak": int(y.sum())}
    row["trained_layer"] = layer == trained.best_layer
    probs: dict[str, FloatArray] = {}
    pairs: tuple[tuple[Kind, Any], ...] = (("cp", inputs.tensors[layer]), ("probe", inputs.pooled[layer]))
    for kind, x in pairs:
        probs[kind] = trained.detector(layer, kind).predict_proba(x)
        m = metrics(y, probs[kind], threshold=threshold)
        (auc_lo, auc_hi), (tpr_lo, tpr_hi) = bootstrap_intervals(y, probs[kind], n_bootstrap, seed, groups=codes)
        m.update(auroc_low=auc_lo, auroc_high=auc_hi, tpr5_low=tpr_lo, tpr5_high=tpr_hi)
        row.update({f"{kind}_{name}": m[name] for name in METRIC_COLUMNS})
    cv = trained.table.set_index("layer") if "layer" in trained.table.columns else pd.DataFrame()
    for col in ("cp_auroc", "probe_auroc", "flagged"):
        row[f"cv_{col}"] = cv.at[layer, col] if layer in cv.index and col in cv.columns else np.nan
    row.update(_margin(y, probs[trained.primary], text, n_bootstrap, seed, codes))
    return row


def _rate(k: int, n: int) -> tuple[float, float, float]:
    low, high = wilson_interval(k, n)
    return (k / n if n else float("nan"), low, high)


def headline(
    trained: TrainedDetector,
    inputs: DetectorInputs,
    y: IntArray,
    records: Sequence[Mapping[str, Any]] | None,
    *,
    threshold: float,
    n_bootstrap: int,
    seed: int,
    text: TextBaseline,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The headline of the module docstring (a JSON-able dict) and the flag rates per family at the saved
    threshold (:func:`~attnscan.detect.rates.subset_rates`)."""
    layer, kind = trained.best_layer, trained.primary
    other: Kind = "probe" if kind == "cp" else "cp"
    codes = eval_codes(records)
    x = {"cp": inputs.tensors[layer], "probe": inputs.pooled[layer]}
    prob = trained.detector(layer, kind).predict_proba(x[kind])
    (low, high), _ = bootstrap_intervals(y, prob, n_bootstrap, seed, groups=codes)
    cut, cut_from = flag_threshold(trained, layer, kind, None)
    if cut_from == "default":
        cut, cut_from = threshold, "the evaluation threshold (the detector has no operating point)"
    flags = prob >= cut
    tpr = _rate(int(flags[y == 1].sum()), int((y == 1).sum()))
    fpr = _rate(int(flags[y == 0].sum()), int((y == 0).sum()))
    cv = trained.table.set_index("layer") if "layer" in trained.table.columns else pd.DataFrame()
    out: dict[str, Any] = {"layer": layer, "kind": kind, "chosen_by": "training", "n": int(y.size)}
    out.update(n_jailbreak=int(y.sum()), auroc=auroc(y, prob), auroc_low=low, auroc_high=high)
    out.update(intervals="whole wrappers resampled" if codes is not None else "prompts resampled")
    out[f"{other}_auroc"] = auroc(y, trained.detector(layer, other).predict_proba(x[other]))
    cv_col = f"{kind}_auroc"
    out["cv_auroc"] = float(cv.at[layer, cv_col]) if layer in cv.index and cv_col in cv.columns else None
    out.update(threshold=cut, threshold_from=cut_from, fpr_target=trained.meta.get("operating_point", {}).get("fpr"))
    out.update(tpr=tpr[0], tpr_low=tpr[1], tpr_high=tpr[2], fpr=fpr[0], fpr_low=fpr[1], fpr_high=fpr[2])
    out.update(length_auroc=auroc(y, inputs.lengths.astype(np.float64)), text_baseline=text.note)
    if text.scores is not None:
        (t_low, t_high), _ = bootstrap_intervals(y, text.scores, n_bootstrap, seed, groups=codes)
        out.update(text_auroc=auroc(y, text.scores), text_auroc_low=t_low, text_auroc_high=t_high)
    else:
        out.update(dict.fromkeys(("text_auroc", "text_auroc_low", "text_auroc_high")))
    out.update(_margin(y, prob, text, n_bootstrap, seed, codes))
    out["stability"] = trained.meta.get("stability")
    return out, subset_rates(y, prob, cut, records)
