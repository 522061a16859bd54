"""Detection metrics, cross-validation and the layer detection table on synthetic features (no model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
from planted import LAYERS, PLANTED, N, make_template_features

from attnscan.detect.detectors import CPDetector, ProbeDetector
from attnscan.detect.folds import fold_plans
from attnscan.detect.metrics import (
    auroc,
    best_layer,
    check_flag_on,
    check_folds,
    check_fpr,
    check_n_bootstrap,
    check_threshold,
    cross_validate,
    flagged_layers,
    layer_detection,
    layer_detection_table,
    metrics,
    paired_auroc_difference,
    threshold_at_fpr,
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


# ------------------------------------------------------------------------------------------- grouped cross-validation


def test_grouped_cv_does_not_reward_recognising_the_template() -> None:
    """Acceptance: features carry their template's identity and the jailbreak and benign prompts use different
    templates. Stratified folds see every template in training and score near 1; folds that hold out whole
    templates score near chance, so the layer is not flagged."""
    grouped = []
    for seed in range(4):
        x, y, template = make_template_features(seed=seed)
        table = layer_detection_table(None, {0: x.mean(axis=1)}, y, flag_on="probe", groups=template, n_bootstrap=100)
        row = table.iloc[0]
        assert row["probe_auroc_stratified"] >= 0.95, row
        assert row["probe_auroc"] < 0.75 and not row["flagged"], row
        assert row["cv"] == "grouped" and row["n_groups"] == 40 and row["k"] == 5 and row["k_stratified"] == 5
        grouped.append(row["probe_auroc"])
    assert 0.3 <= float(np.mean(grouped)) <= 0.7, grouped


def test_grouped_cv_still_finds_a_real_signal() -> None:
    """Every template holds both classes and the jailbreak prompts share a direction that does not depend on the
    template: holding out templates keeps the detectors' AUROC high."""
    x, y, template = make_template_features(n_templates=20, per=6, h=32, label_signal=8.0, shared=True, seed=1)
    table = layer_detection_table({0: x}, {0: x.mean(axis=1)}, y, groups=template, rank=2, max_iter=30, n_bootstrap=100)
    row = table.iloc[0]
    assert row["cp_auroc"] >= 0.9 and row["probe_auroc"] >= 0.9 and row["flagged"], row
    assert row["cp_auroc_stratified"] >= 0.85 and row["probe_auroc_stratified"] >= 0.9, row


def test_grouped_table_columns(features: Any) -> None:
    tensors, pooled, y = features
    groups = np.arange(y.size) // 4  # groups of 4 prompts of one class each
    table = layer_detection_table(tensors, pooled, y, groups=groups, n_bootstrap=50)
    side = [f"{p}_{m}_stratified" for p in ("cp", "probe") for m in ("auroc", "auroc_low", "auroc_high", "tpr5")]
    main = [f"{p}_{m}" for p in ("cp", "probe") for m in ("auroc", "auroc_low", "auroc_high", "f1", "accuracy")]
    assert set(side + main + ["cv", "n_groups", "k_stratified", "flagged"]) <= set(table.columns)
    assert list(table.columns).index("flagged") < list(table.columns).index("k_stratified")
    assert (table["n_groups"] == 20).all() and table.attrs["cv"] == "grouped"
    assert table["flagged"].tolist() == (table["cp_auroc"] >= 0.9).tolist()
    assert best_layer(table) == PLANTED
    plain = layer_detection_table(tensors, pooled, y, n_bootstrap=50)
    assert not any(c.endswith("_stratified") or c in ("cv", "n_groups") for c in plain.columns)


def test_cross_validate_with_groups(features: Any) -> None:
    _, pooled, y = features
    groups = np.arange(y.size) // 4
    res = cross_validate(lambda: ProbeDetector(), pooled[PLANTED], y, k=5, seed=0, n_bootstrap=50, groups=groups)
    assert res["cv"] == "grouped" and res["n_groups"] == 20 and res["k"] == 5
    for g in range(20):  # a group is scored by one fold's detector only
        assert len(set(res["fold"][groups == g].tolist())) == 1
    assert cross_validate(lambda: ProbeDetector(), pooled[PLANTED], y, n_bootstrap=0)["cv"] == "stratified"


def test_layer_detection_keeps_out_of_fold_scores(features: Any) -> None:
    _, pooled, y = features
    groups = np.arange(y.size) // 4
    plans = fold_plans(y, 5, 0, groups)
    det = layer_detection(None, pooled, y, plans, flag_on="probe", n_bootstrap=0)
    assert set(det.oof) == {(cv, "probe", layer) for cv in ("", "stratified") for layer in range(LAYERS)}
    for layer in range(LAYERS):
        row = det.table.set_index("layer").loc[layer]
        assert row["probe_auroc"] == pytest.approx(auroc(y, det.oof[("", "probe", layer)]))
        assert row["probe_auroc_stratified"] == pytest.approx(auroc(y, det.oof[("stratified", "probe", layer)]))
    with pytest.raises(AttnscanError, match="main cross-validation"):
        layer_detection(None, pooled, y, {"stratified": plans["stratified"]}, flag_on="probe")


# ------------------------------------------------------------------------------------------- operating point


def test_threshold_at_fpr() -> None:
    neg = [i / 100 for i in range(20)]  # 0.00 … 0.19
    pos = [0.185, 0.5, 0.1, 0.18]
    y, s = [0] * 20 + [1] * 4, neg + pos
    for target in (0.05, 0.1, 0.2, 0.5):
        t, tpr, fpr = threshold_at_fpr(y, s, target)
        flagged = np.asarray(s) >= t
        assert tpr == tpr_at_fpr(y, s, target) == flagged[20:].mean()
        assert fpr == flagged[:20].mean() <= target
    t, tpr, fpr = threshold_at_fpr(y, s, 0.05)  # one benign prompt (0.19) may pass: just above 0.18
    assert 0.18 < t <= 0.185 and tpr == 0.5 and fpr == 0.05
    t, _, fpr = threshold_at_fpr(y, s, 0.01)  # none may pass: just above the highest benign score
    assert 0.19 < t < 0.1900001 and fpr == 0.0
    for bad in (0.0, -0.1, 0.6, float("nan")):
        with pytest.raises(AttnscanError, match=r"--fpr must be in \(0, 0.5\]"):
            check_fpr(bad)


def test_paired_auroc_difference() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    strong = y + rng.normal(0, 0.5, y.size)
    weak = y + rng.normal(0, 2.0, y.size)
    diff, low, high = paired_auroc_difference(y, strong, weak, 400, seed=0)
    assert diff == pytest.approx(auroc(y, strong) - auroc(y, weak))
    assert 0 < low <= diff <= high
    same = paired_auroc_difference(y, strong, strong, 100, seed=0)
    assert same == (0.0, 0.0, 0.0)
    assert np.isnan(paired_auroc_difference(y, strong, weak, 0, seed=0)[1])
