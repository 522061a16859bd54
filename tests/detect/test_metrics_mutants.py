"""Detection metrics on the edges mutation testing found unguarded: the exact operating-point threshold, the
target FPR's closed interval, what the layer table passes on and records, and the messages of refused inputs.

References are independent of attnscan: ``sklearn.metrics.roc_curve`` for the empirical ROC curve, or counts worked
out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from planted import make_features
from sklearn.metrics import accuracy_score, f1_score, roc_curve

from attnscan.detect.detectors import CPDetector, ProbeDetector
from attnscan.detect.folds import fold_plans, grouped_folds
from attnscan.detect.metrics import (
    METRIC_COLUMNS,
    best_layer,
    bootstrap_intervals,
    cross_validate,
    layer_detection,
    layer_detection_table,
    metrics,
    threshold_at_fpr,
    tpr_at_fpr,
)
from attnscan.errors import AttnscanError


@pytest.fixture(scope="module")
def small() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray]:
    """Two layers of 24 prompts (signal planted in layer 1): big enough for 3 folds, small enough to be quick."""
    return make_features(n=24, k=3, h=4, layers=2, planted=1, amp=2.0, seed=3)


# --------------------------------------------------------------------------------------- rates at a target FPR


def test_a_target_fpr_of_zero_is_allowed_and_matches_sklearn() -> None:
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.4, 0.6, 0.3, 0.7, 0.9]
    fpr, tpr, _ = roc_curve(y, s)
    # no benign prompt may pass: threshold above 0.6 flags 0.7 and 0.9 -> TPR 2/3
    assert tpr_at_fpr(y, s, 0.0) == pytest.approx(tpr[fpr == 0].max()) == pytest.approx(2 / 3)


def test_f1_with_a_missed_jailbreak_or_a_false_alarm_hand_worked() -> None:
    # predicted at >= 0.5: [1, 0, 0] -> TP 1, FP 0, FN 1: F1 = 2 / (2 + 0 + 1)
    m = metrics([1, 1, 0], [0.9, 0.1, 0.2])
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(2 / 3)
    # predicted at >= 0.5: [1, 1, 0] -> TP 1, FP 1, FN 0: F1 = 2 / (2 + 1 + 0)
    m = metrics([1, 0, 0], [0.9, 0.6, 0.1])
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(4))
def test_f1_and_accuracy_agree_with_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.3, 60), 0, 1)
    s[:5] = 0.5  # on the threshold: predicted jailbreak
    pred = (s >= 0.5).astype(int)
    m = metrics(y, s)
    assert m["f1"] == pytest.approx(f1_score(y, pred)) and m["accuracy"] == pytest.approx(accuracy_score(y, pred))


@pytest.mark.parametrize("bad", [-0.01, 1.01, 1.5, 2.0])
def test_a_target_fpr_outside_zero_one_is_refused(bad: float) -> None:
    with pytest.raises(AttnscanError, match=r"target false-positive rate must lie in \[0, 1\], got"):
        tpr_at_fpr([0, 1], [0.2, 0.8], bad)


def test_threshold_at_fpr_counts_scores_equal_to_the_threshold() -> None:
    """The threshold is the float just above a benign score; scores exactly equal to it are flagged (``>=``)."""
    v = 0.5
    t = float(np.nextafter(v, np.inf))
    # benign: one at t (above v), then v, then low ones; at 20 % FPR (m = 1 of 5) the threshold is just above v
    neg = [t, v, 0.1, 0.2, 0.3]
    pos = [t, 0.9, 0.4]  # one jailbreak score lies exactly on the threshold
    y, s = [0] * 5 + [1] * 3, neg + pos
    threshold, tpr, fpr = threshold_at_fpr(y, s, 0.2)
    assert threshold == t
    assert tpr == pytest.approx(2 / 3)  # t and 0.9 flagged
    assert fpr == pytest.approx(1 / 5)  # the benign score t flagged
    assert tpr == tpr_at_fpr(y, s, 0.2)


# --------------------------------------------------------------------------------------------- layer table


SETTINGS = dict(rank=2, seed=5, threshold=0.6, n_bootstrap=40, C=0.5, max_iter=7)  # none of them a default


def test_the_table_passes_every_setting_on_and_records_it(small: tuple) -> None:
    tensors, pooled, y = small
    table = layer_detection_table(tensors, pooled, y, k=3, flag_on="probe", **SETTINGS)
    assert table.attrs == {**SETTINGS, "flag_on": "probe", "k": 3, "cv": "stratified"}
    # the same as layer_detection on the folds of that seed: the table draws its folds from ``seed``
    direct = layer_detection(tensors, pooled, y, fold_plans(y, 3, 5), flag_on="probe", **SETTINGS).table
    pd.testing.assert_frame_equal(table, direct)
    assert table["flagged"].tolist() == (table["probe_auroc"] >= 0.6).tolist()


def test_each_layer_row_is_cross_validate_with_those_settings(small: tuple) -> None:
    """Reference: cross_validate called by hand with detectors built from the settings."""
    tensors, pooled, y = small
    plans = fold_plans(y, 3, 5)
    detection = layer_detection(tensors, pooled, y, plans, **SETTINGS)
    rank, seed, C, max_iter, n_boot = (SETTINGS[key] for key in ("rank", "seed", "C", "max_iter", "n_bootstrap"))
    makers = {
        "cp": lambda: CPDetector(rank=rank, seed=seed, C=C, max_iter=max_iter),
        "probe": lambda: ProbeDetector(C=C),
    }
    for layer in (0, 1):
        row = detection.table.set_index("layer").loc[layer]
        assert (row["n"], row["n_jailbreak"], row["k"]) == (len(y), int(np.sum(y)), 3)
        for kind, features in (("cp", tensors), ("probe", pooled)):
            ref = cross_validate(makers[kind], features[layer], y, seed=seed, n_bootstrap=n_boot, folds=plans[""])
            np.testing.assert_array_equal(detection.oof[("", kind, layer)], ref["oof_score"])
            for m in METRIC_COLUMNS:
                assert row[f"{kind}_{m}"] == ref[m], (kind, layer, m)


def test_an_auroc_equal_to_the_threshold_is_flagged(small: tuple) -> None:
    _, pooled, y = small
    plans = fold_plans(y, 3, 0)
    first = layer_detection(None, pooled, y, plans, flag_on="probe", n_bootstrap=0).table
    auc = float(first.loc[first["layer"] == 1, "probe_auroc"].iloc[0])
    again = layer_detection(None, pooled, y, plans, flag_on="probe", n_bootstrap=0, threshold=auc).table
    assert again.loc[again["layer"] == 1, "flagged"].item() is True


def test_side_plans_add_group_counts_only_when_grouped(small: tuple) -> None:
    _, pooled, y = small
    families = np.arange(len(y)) % 6  # 6 groups, both classes in each
    requests = np.arange(len(y)) % 4
    plans = fold_plans(y, 3, 0, families, more_groups={"request": requests})
    table = layer_detection(None, {1: pooled[1]}, y, plans, flag_on="probe", n_bootstrap=0).table
    assert table["cv"].tolist() == ["grouped"] and table["n_groups"].tolist() == [6]
    assert table["n_groups_request"].tolist() == [4] and table["k_request"].tolist() == [plans["request"].k]
    assert "n_groups_stratified" not in table.columns and table["k_stratified"].tolist() == [3]


def test_plans_without_a_main_one_are_refused(small: tuple) -> None:
    _, pooled, y = small
    with pytest.raises(AttnscanError, match=r"^plans need a main cross-validation under the key ''$"):
        layer_detection(None, pooled, y, {"other": fold_plans(y, 3, 0)[""]}, flag_on="probe")


def test_the_documented_defaults(small: tuple) -> None:
    """rank 8, seed 0, threshold 0.9 on the CP AUROC, 1000 resamples, C 1, 100 iterations, 5 folds."""
    tensors, _, y = small
    one = {1: tensors[1]}
    table = layer_detection_table(one, None, y)
    assert table.attrs == dict(
        rank=8, seed=0, threshold=0.9, flag_on="cp", n_bootstrap=1000, C=1.0, max_iter=100, k=5, cv="stratified"
    )
    direct = layer_detection(one, None, y, fold_plans(y, 5, 0))
    assert direct.table.attrs == {k: v for k, v in table.attrs.items() if k != "k"}
    assert table["flagged"].tolist() == (table["cp_auroc"] >= 0.9).tolist()


def test_cross_validate_defaults(small: tuple) -> None:
    """5 stratified folds, seed 0, 1000 bootstrap resamples."""
    _, pooled, y = small
    res = cross_validate(ProbeDetector, pooled[1], y)
    assert (res["k"], res["cv"], res["seed"], res["n_bootstrap"]) == (5, "stratified", 0, 1000)
    same = cross_validate(ProbeDetector, pooled[1], y, k=5, seed=0, n_bootstrap=1000)
    assert (res["auroc_low"], res["tpr5_high"]) == (same["auroc_low"], same["tpr5_high"])


def test_cross_validate_intervals_are_the_bootstrap_of_its_scores(small: tuple) -> None:
    _, pooled, y = small
    res = cross_validate(ProbeDetector, pooled[1], y, k=3, seed=2, n_bootstrap=50)
    auc_ci, tpr_ci = bootstrap_intervals(y, res["oof_score"], 50, 2, groups=None)
    assert (res["auroc_low"], res["auroc_high"]) == tuple(auc_ci)
    assert (res["tpr5_low"], res["tpr5_high"]) == tuple(tpr_ci)
    assert res["tpr5_low"] <= res["tpr5"] <= res["tpr5_high"] and res["tpr5_low"] < res["tpr5_high"]


def test_cross_validate_checks_one_label_per_prompt(small: tuple) -> None:
    _, pooled, y = small
    with pytest.raises(AttnscanError, match=r"^24 labels for 20 prompts: give one label per prompt$"):
        cross_validate(ProbeDetector, pooled[1][:20], y)
    with pytest.raises(AttnscanError, match=r"^2 labels for 0 prompts: give one label per prompt$"):
        cross_validate(ProbeDetector, 3.0, [0, 1])


def test_grouped_cross_validation_draws_its_folds_from_the_seed(small: tuple) -> None:
    _, pooled, y = small
    groups = np.arange(len(y)) % 6
    res = cross_validate(ProbeDetector, pooled[1], y, k=3, seed=4, n_bootstrap=0, groups=groups)
    ref = cross_validate(ProbeDetector, pooled[1], y, seed=4, n_bootstrap=0, folds=grouped_folds(y, groups, 3, 4))
    np.testing.assert_array_equal(res["fold"], ref["fold"])
    np.testing.assert_array_equal(res["oof_score"], ref["oof_score"])


def test_refused_sources_say_what_is_wrong(small: tuple) -> None:
    tensors, pooled, y = small
    plans = fold_plans(y, 3, 0)
    with pytest.raises(AttnscanError, match=r"flag_on='probe' needs pooled features"):
        layer_detection(tensors, None, y, plans, flag_on="probe")
    with pytest.raises(AttnscanError, match=r"flag_on='cp' needs tensors features"):
        layer_detection(None, pooled, y, plans)
    with pytest.raises(AttnscanError, match=r"tensors hold layers \[0, 1\] but pooled holds \[1\]: give the same"):
        layer_detection(tensors, {1: pooled[1]}, y, plans)
    with pytest.raises(
        AttnscanError, match=r"^give tensors \(for the CP detector\), pooled \(for the probe\), or both$"
    ):
        layer_detection(None, None, y, plans)
    with pytest.raises(AttnscanError, match=r"^no layers given$"):
        layer_detection({}, None, y, plans)


# --------------------------------------------------------------------------------------------- best layer


def test_best_layer_reads_an_object_column_with_gaps() -> None:
    """A column of Python objects with None (as records with missing values give) is read as floats."""
    table = pd.DataFrame({"layer": [0, 1, 2], "cp_auroc": pd.Series([None, 0.9, 0.7], dtype=object)})
    assert best_layer(table) == 1


def test_best_layer_without_finite_values_names_the_column() -> None:
    table = pd.DataFrame({"layer": [0, 1], "x": [np.nan, np.nan]})
    with pytest.raises(AttnscanError, match="column 'x' holds no finite values"):
        best_layer(table, by="x")
