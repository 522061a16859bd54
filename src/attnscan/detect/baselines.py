"""Baselines a detector must beat to say it reads more than the surface of the prompts.

A detector on a model's internals earns its keep only if it separates the prompts better than what anyone could
read off the text. :func:`train_detector <attnscan.detect.jobs.train_detector>` reports two baselines on the same
prompts and, for the text one, the same folds:

- ``length_auroc``: the AUROC of the raw prompt length in tokens (as the model read it: chat template included,
  after truncation to ``length``) used as the score, longer = more jailbreak-like. A monotone score needs no
  fitting, so no folds. Below 0.5 means the jailbreak prompts are the shorter; either way, its distance from 0.5 is
  how much length alone tells the sets apart (jailbreak wrappers are long).
- ``text_auroc`` (with ``text_auroc_low``/``text_auroc_high``): TF-IDF of word 1- and 2-grams plus a logistic
  regression (scikit-learn ``TfidfVectorizer`` and ``LogisticRegression``, ``C=1``), fitted out of fold on the
  main folds of the detectors (vocabulary included) and scored on the held-out prompts. Beside it,
  ``text_auroc_<cv>`` on each other cross-validation of the table (``text_auroc_stratified``, ``text_auroc_requests``).
- ``text_margin`` (with ``text_margin_low``/``text_margin_high``): the layer's detector AUROC (``flag_on``'s, main
  folds) minus ``text_auroc``, with a paired bootstrap interval (the same resampled prompts, or whole groups under
  grouped folds, for both scores: :func:`attnscan.detect.bootstrap.paired_auroc_difference`); ``beats_text`` is
  ``text_margin_low > 0``: the interval of the difference lies above zero (False without bootstrap resamples,
  ``n_bootstrap=0``: nothing shown).

These are columns of ``detection.csv`` (the baselines repeated on every layer row) and ``meta["baselines"]`` (the
baselines and the best layer's comparison).

On new prompts (:func:`~attnscan.detect.jobs.evaluate_detector`) the text baseline is the same model fitted on all
the detector's training prompts (:func:`held_out_text_scores`), so detector and baseline have seen the same data;
``length_auroc`` is again the raw length's AUROC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from .detectors import FloatArray
from .folds import Folds, out_of_fold
from .metrics import auroc, bootstrap_intervals, paired_auroc_difference

__all__ = [
    "TEXT_MODEL",
    "add_baselines",
    "held_out_text_scores",
    "text_scores",
]

TEXT_MODEL = "TF-IDF word 1-2-grams + logistic regression (C=1), fitted out of fold on the detectors' folds"


class _TextModel:
    """TF-IDF of word 1- and 2-grams (single-character words kept) and a logistic regression: the fit/predict_proba
    shape :func:`attnscan.detect.folds.out_of_fold` expects, on an array of texts."""

    def fit(self, texts: npt.NDArray[Any], y: npt.NDArray[np.int64]) -> _TextModel:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b")
        self.model = LogisticRegression(C=1.0, max_iter=1000).fit(self.vectorizer.fit_transform(list(texts)), y)
        return self

    def predict_proba(self, texts: npt.NDArray[Any]) -> FloatArray:
        scores = self.model.predict_proba(self.vectorizer.transform(list(texts)))[:, 1]
        return np.asarray(scores, dtype=np.float64)


def text_scores(texts: Sequence[str], y: npt.NDArray[np.int64], folds: Folds) -> FloatArray:
    """Out-of-fold TF-IDF + logistic-regression probabilities ``float [N]`` of ``texts`` on ``folds``."""
    oof, _ = out_of_fold(_TextModel, np.asarray(list(texts), dtype=object), y, folds)  # type: ignore[arg-type]
    return oof


def add_baselines(
    table: pd.DataFrame,
    texts: Sequence[str],
    lengths: npt.ArrayLike,
    y: npt.NDArray[np.int64],
    plans: Mapping[str, Folds],
    detector_oof: Mapping[tuple[str, str, int], FloatArray],
    *,
    flag_on: str,
    best: int,
    n_bootstrap: int,
    seed: int,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``table`` with the baseline columns of the module docstring, and ``meta["baselines"]``.

    ``plans`` are the table's cross-validations (main under ``""``), ``detector_oof[(cv, kind, layer)]`` the
    detectors' out-of-fold scores on them; ``best`` is the chosen layer, whose comparison the record keeps.
    """
    out = table.copy()
    text = {name: text_scores(texts, y, folds) for name, folds in plans.items()}
    length = auroc(y, np.asarray(lengths, dtype=np.float64))
    codes = plans[""].codes  # grouped folds: the intervals resample whole groups, as the detectors' do
    (low, high), _ = bootstrap_intervals(y, text[""], n_bootstrap, seed, groups=codes)
    record: dict[str, Any] = {"length_auroc": length, "text_auroc": auroc(y, text[""])}
    record.update(text_auroc_low=low, text_auroc_high=high)
    record.update({f"text_auroc_{name}": auroc(y, scores) for name, scores in text.items() if name})
    for name, value in record.items():
        out[name] = value
    margins = {
        int(layer): paired_auroc_difference(
            y, detector_oof[("", flag_on, int(layer))], text[""], n_bootstrap, seed, groups=codes
        )
        for layer in out["layer"]
    }
    for j, name in enumerate(("text_margin", "text_margin_low", "text_margin_high")):
        out[name] = [margins[int(layer)][j] for layer in out["layer"]]
    out["beats_text"] = out["text_margin_low"] > 0
    margin, margin_low, margin_high = margins[best]
    best_auroc = float(out.loc[out["layer"] == best, f"{flag_on}_auroc"].iloc[0])
    record.update(text_model=TEXT_MODEL, layer=best, detector=flag_on, detector_auroc=best_auroc)
    record.update(text_margin=margin, text_margin_low=margin_low, text_margin_high=margin_high)
    record["beats_text"] = bool(margin_low > 0)
    out.attrs.update(table.attrs)
    return out, record


def held_out_text_scores(
    train_texts: Sequence[str], train_y: npt.NDArray[np.int64], texts: Sequence[str]
) -> FloatArray:
    """The text baseline for new prompts: TF-IDF + logistic regression fitted on ``train_texts`` (labels
    ``train_y``, the detector's training prompts), its probabilities ``float [N]`` for ``texts``."""
    model = _TextModel().fit(np.asarray(list(train_texts), dtype=object), np.asarray(train_y, dtype=np.int64))
    return model.predict_proba(np.asarray(list(texts), dtype=object))
