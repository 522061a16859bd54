"""Flag rates per family and risky benign prompts, and the rank stability of refitted detectors (no model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy.stats import spearmanr

from attnscan.analysis.inference import wilson_interval
from attnscan.behaviour import judges
from attnscan.detect.folds import grouped_folds, stratified_folds
from attnscan.detect.rates import RATE_COLUMNS, rate_records, subset_rates
from attnscan.detect.stability import rank_stability, spearman


def test_wilson_interval_keeps_its_old_home() -> None:
    assert judges.wilson_interval is wilson_interval


def _records() -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """4 benign requests (2 look risky), 2 control prompts in family A, 6 jailbreak prompts: 4 in A, 2 in B."""
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    score = np.array([0.9, 0.1, 0.2, 0.8, 0.95, 0.3, 0.9, 0.9, 0.9, 0.2, 0.1, 0.1])
    records: list[dict[str, Any]] = [
        {"request_id": "b0", "looks_risky": True},
        {"request_id": "b1", "looks_risky": True},
        {"request_id": "b2", "looks_risky": False},
        {"request_id": "b3"},  # no label: counted with the rest
        {"family": "A", "template_id": "t1"},
        {"family": "A", "template_id": "t2"},
    ]
    records += [{"family": "A", "template_id": "t1"}] * 4 + [{"template_id": "t9"}] * 2
    return y, score, records


def test_subset_rates_split_families_and_risky_benign() -> None:
    y, score, records = _records()
    frame = subset_rates(y, score, 0.5, records)
    assert list(frame.columns) == list(RATE_COLUMNS) and frame.attrs["threshold"] == 0.5
    got = {(r.role, r.subset): (r.measure, r.n, r.flagged) for r in frame.itertuples()}
    assert got == {
        ("jailbreak", "all"): ("TPR", 6, 3),
        ("jailbreak", "family=A"): ("TPR", 4, 3),
        ("jailbreak", "template_id=t9"): ("TPR", 2, 0),  # no family: the template names the wrapper
        ("benign", "all"): ("FPR", 6, 3),
        ("benign", "looks_risky"): ("FPR", 2, 1),
        ("benign", "other"): ("FPR", 4, 2),  # b2, b3 and the two control prompts
        ("benign", "family=A"): ("FPR", 2, 1),
        ("benign", "no wrapper"): ("FPR", 4, 2),
    }
    row = frame[(frame.role == "benign") & (frame.subset == "looks_risky")].iloc[0]
    assert row.rate == 0.5 and (row.rate_low, row.rate_high) == pytest.approx(wilson_interval(1, 2))
    assert rate_records(frame)[0] == {
        "role": "jailbreak",
        "subset": "all",
        "measure": "TPR",
        "n": 6,
        "flagged": 3,
        "rate": 0.5,
        "rate_low": pytest.approx(wilson_interval(3, 6)[0]),
        "rate_high": pytest.approx(wilson_interval(3, 6)[1]),
    }
    # flags are score >= threshold: at the score itself a prompt is flagged
    assert subset_rates(y, score, 0.95, records).iloc[3].flagged == 1


def test_subset_rates_without_labels_give_the_all_rows() -> None:
    y, score, _ = _records()
    frame = subset_rates(y, score, 0.5, None)
    assert frame["subset"].tolist() == ["all", "all"] and frame["n"].tolist() == [6, 6]


# --------------------------------------------------------------------------------------------------- stability


def test_spearman_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    a, b = np.round(rng.normal(size=30), 1), np.round(rng.normal(size=30), 1)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert np.isnan(spearman(a, np.ones(30)))


class _Fixed:
    """Scores the first feature whatever it was fitted on: perfectly stable."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Fixed:
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x[:, 0], dtype=np.float64)


class _Drifting:
    """Scores a random direction chosen by the training sample: refits rank new prompts differently."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Drifting:
        self.w = np.random.default_rng(int(abs(x.sum()) * 1000) % 2**32).normal(size=x.shape[1])
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x @ self.w, dtype=np.float64)


class _WholeGroups:
    """Checks that every training sample holds whole groups: column 0 is the group, each group has 3 prompts."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> _WholeGroups:
        _, counts = np.unique(x[:, 0], return_counts=True)
        assert (counts % 3 == 0).all(), counts
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x[:, 1], dtype=np.float64)


def test_rank_stability_tells_stable_from_drifting_detectors() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 6)), np.repeat([0, 1], 30)
    folds = stratified_folds(y, 3, 0)
    stable = rank_stability(_Fixed, x, y, folds, resamples=4, seed=0)
    assert stable == {
        "spearman_mean": pytest.approx(1.0),
        "spearman_min": pytest.approx(1.0),
        "resamples": 4,
        "folds": 3,
        "resampled": "prompts",
    }
    drifting = rank_stability(_Drifting, x, y, folds, resamples=4, seed=0)
    assert drifting["spearman_mean"] < 0.6 and drifting["spearman_min"] < drifting["spearman_mean"]


def test_rank_stability_resamples_whole_groups_under_grouped_folds() -> None:
    codes = np.repeat(np.arange(20), 3)
    y = (codes >= 10).astype(np.int64)
    x = np.stack([codes.astype(np.float64), np.random.default_rng(2).normal(size=60)], axis=1)
    folds = grouped_folds(y, codes, 4, 0)
    out = rank_stability(_WholeGroups, x, y, folds, resamples=3, seed=0)
    assert out["resampled"] == "groups" and out["spearman_mean"] == pytest.approx(1.0)
    with pytest.raises(AssertionError):  # the same check fails when prompts are drawn one by one
        rank_stability(_WholeGroups, x, y, stratified_folds(y, 4, 0), resamples=3, seed=0)
