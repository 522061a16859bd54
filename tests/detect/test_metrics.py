"""Detection metrics, cross-validation and the layer detection table on synthetic features (no model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from planted import LAYERS, PLANTED, N

from attnscan.detect.detectors import CPDetector, ProbeDetector
from attnscan.detect.metrics import (
    auroc,
    best_layer,
    check_flag_on,
    check_folds,
    check_n_bootstrap,
    check_threshold,
    cross_validate,
    flagged_layers,
    layer_detection_table,
    metrics,
    tpr_at_fpr,
)
from attnscan.errors import AttnscanError


@pytest.fixture(scope="module")
def table(features: Any) -> pd.DataFrame:
    tensors, pooled, y = features
    return layer_detection_table(tensors, pooled, y, k=5, seed=0, threshold=0.9, n_bootstrap=300)


# ------------------------------------------------------------------------------------------- layer table


def test_table_finds_the_planted_layer(table: pd.DataFrame) -> None:
    assert table["layer"].tolist() == list(range(LAYERS))
    noise = table[table["layer"] != PLANTED]
    planted = table[table["layer"] == PLANTED].iloc[0]
    for prefix in ("cp", "probe"):
        assert planted[f"{prefix}_auroc"] >= 0.95
        assert noise[f"{prefix}_auroc"].between(0.3, 0.7).all(), noise[f"{prefix}_auroc"].tolist()
        assert best_layer(table, by=f"{prefix}_auroc") == PLANTED
    assert best_layer(table) == PLANTED
    assert flagged_layers(table) == [PLANTED]
    assert table["flagged"].tolist() == [layer == PLANTED for layer in range(LAYERS)]


def test_table_columns_and_intervals(table: pd.DataFrame) -> None:
    for prefix in ("cp", "probe"):
        for m in ("auroc", "auroc_low", "auroc_high", "f1", "accuracy", "tpr1", "tpr5", "tpr5_low", "tpr5_high"):
            assert f"{prefix}_{m}" in table.columns
        assert (table[f"{prefix}_auroc_low"] <= table[f"{prefix}_auroc"]).all()
        assert (table[f"{prefix}_auroc"] <= table[f"{prefix}_auroc_high"]).all()
        assert (table[f"{prefix}_tpr5_low"] <= table[f"{prefix}_tpr5_high"]).all()
    assert (table["n"] == N).all() and (table["n_jailbreak"] == N // 2).all() and (table["k"] == 5).all()
    assert table.attrs["threshold"] == 0.9 and table.attrs["flag_on"] == "cp"
    # the planted layer's interval excludes chance, the noise layers' intervals are wide
    assert table.loc[table["layer"] == PLANTED, "cp_auroc_low"].iloc[0] > 0.8


def test_table_probe_only_and_flag_on_probe(features: Any) -> None:
    _, pooled, y = features
    table = layer_detection_table(None, pooled, y, flag_on="probe", n_bootstrap=0)
    assert not any(c.startswith("cp_") for c in table.columns)
    assert flagged_layers(table) == [PLANTED]
    assert table["probe_auroc_low"].isna().all()  # no bootstrap asked for
    with pytest.raises(AttnscanError, match="needs tensors"):
        layer_detection_table(None, pooled, y, flag_on="cp")
    with pytest.raises(AttnscanError, match="same layers"):
        layer_detection_table({0: features[0][0]}, pooled, y)


def test_best_layer_ties_and_errors() -> None:
    table = pd.DataFrame({"layer": [3, 1, 2], "cp_auroc": [0.9, 0.9, np.nan], "flagged": [True, True, False]})
    assert best_layer(table) == 1
    assert flagged_layers(table) == [1, 3]
    with pytest.raises(AttnscanError, match="no column"):
        best_layer(table, by="probe_auroc")


# ------------------------------------------------------------------------------------------- metrics


def test_metrics_perfect_and_reversed() -> None:
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    m = metrics(y, s)
    assert (m["auroc"], m["tpr1"], m["tpr5"], m["f1"], m["accuracy"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    r = metrics(y, s[::-1])
    assert (r["auroc"], r["tpr1"], r["tpr5"], r["f1"], r["accuracy"]) == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_metrics_hand_computed_with_ties() -> None:
    # pairs (pos, neg): (.5,.1)=1 (.5,.5)=1/2 (.9,.1)=1 (.9,.5)=1 -> 3.5/4
    y, s = [0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]
    m = metrics(y, s)
    assert m["auroc"] == pytest.approx(0.875)
    # ROC points: t=.9 (FPR 0, TPR .5), t=.5 (FPR .5, TPR 1): at FPR <= 1 % the best TPR is .5
    assert m["tpr1"] == 0.5 and m["tpr5"] == 0.5
    # predicted jailbreak at >= .5: [0, 1, 1, 1] -> TP 2, FP 1, FN 0
    assert m["f1"] == pytest.approx(0.8) and m["accuracy"] == 0.75


def test_tpr_at_fpr_hand_computed() -> None:
    neg = [i / 100 for i in range(20)]  # 0.00 … 0.19: at 5 % FPR one benign prompt may score above the threshold
    pos = [0.185, 0.5, 0.1, 0.18]  # 0.18 ties a benign score: a threshold of 0.18 lets 2 benign through (10 %)
    y, s = [0] * 20 + [1] * 4, neg + pos
    assert tpr_at_fpr(y, s, 0.05) == 0.5  # threshold 0.185: FPR 1/20, TPR 2/4
    assert tpr_at_fpr(y, s, 0.01) == 0.25  # threshold 0.5: FPR 0, TPR 1/4
    assert tpr_at_fpr(y, s, 0.10) == 0.75  # threshold 0.18: FPR 2/20, TPR 3/4
    assert tpr_at_fpr(y, s, 1.0) == 1.0
    assert auroc(y, s) == pytest.approx(metrics(y, s)["auroc"])


@pytest.mark.parametrize("seed", range(5))
def test_metrics_agree_with_sklearn(seed: int) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    s = rng.integers(0, 12, 150) / 11 + 0.2 * y  # many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    for target in (0.01, 0.05, 0.2):
        assert tpr_at_fpr(y, s, target) == pytest.approx(tpr[fpr <= target + 1e-12].max())


def test_metrics_errors() -> None:
    with pytest.raises(AttnscanError, match="both benign"):
        metrics([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(AttnscanError, match="one score per prompt"):
        metrics([0, 1, 1], [0.2, 0.5])
    with pytest.raises(AttnscanError, match="NaN"):
        auroc([0, 1], [0.2, float("nan")])


# ------------------------------------------------------------------------------------------- cross-validation


def test_cross_validate_is_reproducible(features: Any) -> None:
    tensors, pooled, y = features
    a = cross_validate(lambda: ProbeDetector(), pooled[PLANTED], y, k=5, seed=7, n_bootstrap=200)
    b = cross_validate(lambda: ProbeDetector(), pooled[PLANTED], y, k=5, seed=7, n_bootstrap=200)
    c = cross_validate(lambda: ProbeDetector(), pooled[PLANTED], y, k=5, seed=8, n_bootstrap=200)
    np.testing.assert_array_equal(a["oof_score"], b["oof_score"])
    np.testing.assert_array_equal(a["fold"], b["fold"])
    assert (a["auroc_low"], a["auroc_high"], a["tpr5_low"]) == (b["auroc_low"], b["auroc_high"], b["tpr5_low"])
    assert not np.array_equal(a["fold"], c["fold"])
    assert sorted(np.bincount(a["fold"]).tolist()) == [16] * 5
    for fold in range(5):  # stratified: each fold holds 8 of each class
        assert y[a["fold"] == fold].sum() == 8
    assert a["auroc"] == pytest.approx(auroc(y, a["oof_score"]))
    for fold in range(5):  # out of fold: each prompt is scored by a detector fitted on the other folds only
        test = a["fold"] == fold
        ref = ProbeDetector().fit(pooled[PLANTED][~test], y[~test]).predict_proba(pooled[PLANTED][test])
        np.testing.assert_array_equal(a["oof_score"][test], ref)

    cp1 = cross_validate(lambda: CPDetector(rank=4), tensors[PLANTED], y, k=3, seed=1, n_bootstrap=50)
    cp2 = cross_validate(lambda: CPDetector(rank=4), tensors[PLANTED], y, k=3, seed=1, n_bootstrap=50)
    np.testing.assert_array_equal(cp1["oof_score"], cp2["oof_score"])
    assert cp1["k"] == 3


def test_cross_validate_small_classes(features: Any) -> None:
    _, pooled, _ = features
    x = pooled[PLANTED][:13]
    y = np.array([1] * 3 + [0] * 10)
    with pytest.warns(UserWarning, match="3-fold instead of 5-fold"):
        res = cross_validate(lambda: ProbeDetector(), x, y, k=5, n_bootstrap=20)
    assert res["k"] == 3 and set(res["fold"].tolist()) == {0, 1, 2}
    with pytest.raises(AttnscanError, match="at least 2 prompts of each class"):
        cross_validate(lambda: ProbeDetector(), x, np.array([1] + [0] * 12))
    with pytest.raises(AttnscanError, match="at least 2 prompts of each class"):
        cross_validate(lambda: ProbeDetector(), x, np.zeros(13, dtype=int))
    with pytest.raises(AttnscanError, match="k >= 2"):
        cross_validate(lambda: ProbeDetector(), x, y, k=1)


def test_setting_checks() -> None:
    for k in (1, 0):
        with pytest.raises(AttnscanError, match="at least 2 folds"):
            check_folds(k)
        with pytest.raises(AttnscanError, match="k >= 2"):
            check_folds(k)
    check_folds(2)
    with pytest.raises(AttnscanError, match="n_bootstrap must be 0 or more"):
        check_n_bootstrap(-1)
    check_n_bootstrap(0)
    with pytest.raises(AttnscanError, match="threshold must be an AUROC in"):
        check_threshold(1.5, "an AUROC")
    with pytest.raises(AttnscanError, match="threshold must be a probability in"):
        check_threshold(-0.1, "a probability")
    check_threshold(0.0, "a probability")
    check_threshold(1.0, "a probability")
    with pytest.raises(AttnscanError, match="flag_on must be 'cp' or 'probe'"):
        check_flag_on("svm")
    with pytest.raises(AttnscanError, match="flag_on must be 'cp' or 'probe'"):
        layer_detection_table(None, {0: np.zeros((4, 2))}, [0, 0, 1, 1], flag_on="svm")  # type: ignore[arg-type]
