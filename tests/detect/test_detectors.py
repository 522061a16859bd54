"""Detectors, metrics and the layer detection table on synthetic features (no model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from attnscan.detect.detectors import (
    CPDetector,
    ProbeDetector,
    auroc,
    best_layer,
    cross_validate,
    fit_detectors,
    flagged_layers,
    layer_detection_table,
    load_detector,
    metrics,
    save_detector,
    tpr_at_fpr,
)
from attnscan.errors import AttnscanError

N, K, H, LAYERS, PLANTED = 80, 6, 16, 4, 2


def make_features(
    n: int = N, k: int = K, h: int = H, layers: int = LAYERS, planted: int = PLANTED, amp: float = 5.0, seed: int = 0
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray]:
    """Gaussian noise in every layer; in ``planted`` the jailbreak prompts also get ``amp · w_i · u vᵀ``.

    ``u [K]`` and ``v [H]`` are fixed unit vectors (a rank-1 token × feature pattern), ``w_i ~ U(0.5, 1.5)`` a
    positive per-prompt weight. ``pooled`` is the mean over tokens.
    """
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    u = rng.uniform(0.5, 1.5, k)
    u /= np.linalg.norm(u)
    v = rng.standard_normal(h)
    v /= np.linalg.norm(v)
    tensors, pooled = {}, {}
    for layer in range(layers):
        x = rng.standard_normal((n, k, h))
        if layer == planted:
            w = rng.uniform(0.5, 1.5, n) * y
            x += amp * w[:, None, None] * np.outer(u, v)[None]
        tensors[layer] = x.astype(np.float32)
        pooled[layer] = x.mean(axis=1).astype(np.float32)
    return tensors, pooled, y


@pytest.fixture(scope="module")
def features() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray]:
    return make_features()


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


# ------------------------------------------------------------------------------------------- CP projection


def test_cp_projection_reproduces_exact_training_factors() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 3))
    a -= a.mean(axis=0)  # zero-mean prompt factors: the per-feature centring leaves the tensor exactly rank 3
    b, c = rng.standard_normal((6, 3)), rng.standard_normal((16, 3))
    x = np.einsum("nr,kr,hr->nkh", a, b, c)
    y = np.repeat([0, 1], 20)
    det = CPDetector(rank=3, seed=0, max_iter=2000, tol=1e-12).fit(x, y)
    assert det.rec_error_ is not None and det.rec_error_ < 1e-6
    fitted = det.train_factors_
    assert fitted is not None
    projected = det.transform(x)
    assert np.linalg.norm(projected - fitted) / np.linalg.norm(fitted) < 1e-3

    # The vec order matters: flattening each slab column-major instead of row-major does not reproduce them.
    assert det.mean_ is not None and det.scale_ is not None
    assert det.token_factors_ is not None and det.feature_factors_ is not None
    xs = (x - det.mean_) / det.scale_
    kr = (det.token_factors_[:, None, :] * det.feature_factors_[None, :, :]).reshape(-1, 3)
    wrong = xs.transpose(0, 2, 1).reshape(40, -1) @ np.linalg.pinv(kr).T
    assert np.linalg.norm(wrong - fitted) / np.linalg.norm(fitted) > 0.1

    # and the factors reconstruct the standardised tensor in tensorly's convention
    import tensorly as tl

    assert det.weights_ is not None
    recon = tl.cp_to_tensor((det.weights_, [fitted / det.weights_, det.token_factors_, det.feature_factors_]))
    np.testing.assert_allclose(recon, xs, atol=1e-5)


@pytest.mark.parametrize("layer", [0, PLANTED])
def test_cp_projection_matches_noisy_training_factors(features: Any, layer: int) -> None:
    tensors, _, y = features
    det = CPDetector(rank=4, seed=0).fit(tensors[layer], y)
    projected, fitted = det.transform(tensors[layer]), det.train_factors_
    assert fitted is not None and projected.shape == fitted.shape == (N, 4)
    for r in range(4):
        assert np.corrcoef(projected[:, r], fitted[:, r])[0, 1] > 0.9


def test_cp_detector_is_seeded(features: Any) -> None:
    tensors, _, y = features
    p1 = CPDetector(rank=4, seed=3).fit(tensors[PLANTED], y).predict_proba(tensors[PLANTED])
    p2 = CPDetector(rank=4, seed=3).fit(tensors[PLANTED], y).predict_proba(tensors[PLANTED])
    np.testing.assert_array_equal(p1, p2)
    assert p1.shape == (N,) and ((p1 >= 0) & (p1 <= 1)).all()


def test_detector_input_errors(features: Any) -> None:
    tensors, pooled, y = features
    with pytest.raises(AttnscanError, match="not fitted"):
        CPDetector().predict_proba(tensors[0])
    with pytest.raises(AttnscanError, match="not fitted"):
        ProbeDetector().predict_proba(pooled[0])
    with pytest.raises(AttnscanError, match="both benign"):
        CPDetector(rank=2).fit(tensors[0], np.zeros(N, dtype=int))
    with pytest.raises(AttnscanError, match="0 \\(benign\\) or 1"):
        ProbeDetector().fit(pooled[0], np.full(N, 2))
    with pytest.raises(AttnscanError, match="one label per prompt"):
        ProbeDetector().fit(pooled[0], y[:-1])
    with pytest.raises(AttnscanError, match="3 dimensions"):
        CPDetector().fit(pooled[0], y)
    bad = tensors[0].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(AttnscanError, match="NaN"):
        CPDetector().fit(bad, y)
    det = CPDetector(rank=2).fit(tensors[0], y)
    with pytest.raises(AttnscanError, match="fitted on"):
        det.predict_proba(tensors[0][:, :, :8])
    with pytest.raises(AttnscanError, match="rank"):
        CPDetector(rank=0)


# ------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_without_pickle(features: Any, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    tensors, pooled, y = features
    dets: dict[int, Any] = dict(fit_detectors(tensors, y, lambda: CPDetector(rank=4)))
    dets[10] = ProbeDetector().fit(pooled[PLANTED], y)
    target = tmp_path / "det"
    save_detector(target, dets, {"model": "synthetic", "layers": [0, 1, 2, 3]})

    assert sorted(p.name for p in target.iterdir()) == ["detector.json", "detector.safetensors"]
    assert all(p.suffix in (".json", ".safetensors") for p in target.rglob("*"))
    assert [p.name for p in tmp_path.iterdir()] == ["det"]  # no temporary directory left behind
    stored = load_file(str(target / "detector.safetensors"))
    assert "L2/token_factors" in stored and stored["L2/token_factors"].shape == (K, 4)
    assert json.loads((target / "detector.json").read_text())["format"] == "attnscan.detector"

    loaded, meta = load_detector(target)
    assert meta == {"model": "synthetic", "layers": [0, 1, 2, 3]}
    assert sorted(loaded) == [0, 1, 2, 3, 10]
    for layer in range(LAYERS):
        assert isinstance(loaded[layer], CPDetector)
        np.testing.assert_array_equal(
            loaded[layer].predict_proba(tensors[layer]), dets[layer].predict_proba(tensors[layer])
        )
    assert isinstance(loaded[10], ProbeDetector)
    np.testing.assert_array_equal(loaded[10].predict_proba(pooled[PLANTED]), dets[10].predict_proba(pooled[PLANTED]))


def test_save_refuses_existing_target_unless_overwrite(features: Any, tmp_path: Path) -> None:
    _, pooled, y = features
    det = ProbeDetector().fit(pooled[0], y)
    target = tmp_path / "det"
    save_detector(target, {0: det})
    with pytest.raises(AttnscanError, match="overwrite"):
        save_detector(target, {0: det})
    other = ProbeDetector(C=0.01).fit(pooled[0], y)
    save_detector(target, {0: other}, overwrite=True)
    loaded, _ = load_detector(target)
    np.testing.assert_array_equal(loaded[0].predict_proba(pooled[0]), other.predict_proba(pooled[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(AttnscanError, match="holds no attnscan detector"):
        save_detector(foreign, {0: det}, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(AttnscanError, match="not fitted"):
        save_detector(tmp_path / "unfitted", {0: ProbeDetector()})
    assert not (tmp_path / "unfitted").exists()
    with pytest.raises(AttnscanError, match="not a detector directory"):
        load_detector(foreign)


def test_from_state_checks_its_input(features: Any) -> None:
    tensors, _, y = features
    arrays, meta = CPDetector(rank=2).fit(tensors[0], y).to_state()
    assert meta["kind"] == "cp" and meta["rank"] == 2
    with pytest.raises(AttnscanError, match="kind"):
        ProbeDetector.from_state(arrays, meta)
    with pytest.raises(AttnscanError, match="lacks array 'coef'"):
        CPDetector.from_state({k: v for k, v in arrays.items() if k != "coef"}, meta)
    with pytest.raises(AttnscanError, match="shape"):
        CPDetector.from_state({**arrays, "mean": arrays["mean"][:3]}, meta)


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


def test_load_rejects_damaged_files(features: Any, tmp_path: Path) -> None:
    _, pooled, y = features
    target = tmp_path / "det"
    save_detector(target, {0: ProbeDetector().fit(pooled[0], y)})
    (target / "detector.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AttnscanError, match="cannot be read as safetensors"):
        load_detector(target)
    doc = {"format": "attnscan.detector", "format_version": 99, "layers": [], "meta": {}}
    (target / "detector.json").write_text(json.dumps(doc))
    with pytest.raises(AttnscanError, match="format version 99"):
        load_detector(target)
