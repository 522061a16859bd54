"""Training on prompt sets that carry group labels: grouped folds, baselines, operating point, and what is saved."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from planted import BENIGN_WORDS, JAILBREAK_WORDS, sentences

import attnscan.detect.jobs as job
from attnscan.detect.bootstrap import bootstrap_intervals
from attnscan.detect.evaluation import eval_codes
from attnscan.detect.store import META_FILE, TrainedDetector, load_trained
from attnscan.engine.hidden import Features
from attnscan.errors import AttnscanError
from attnscan.models.loading import LoadedModel
from attnscan.prompts.sets import PromptSet, compose

# flag_on="cp": these tests follow the CP detector's numbers (the default primary is the probe, tested in test_jobs)
OPTS: dict[str, Any] = {
    "rank": 2,
    "last_k": 3,
    "length": 40,
    "n_bootstrap": 100,
    "max_iter": 20,
    "layers": "0,2",
    "flag_on": "cp",
}


def _templates(n: int = 6, seed: int = 5) -> PromptSet:
    """``n`` wrappers of jailbreak words around a ``{request}`` slot, two per family."""
    heads = sentences(JAILBREAK_WORDS, n, seed, 3, 6)
    tails = sentences(JAILBREAK_WORDS, n, seed + 1, 2, 4)
    groups = tuple({"template_id": f"tpl-{i}", "family": f"fam-{i // 2}"} for i in range(n))
    return PromptSet(
        "templates", tuple(f"{h} {{request}} {t}" for h, t in zip(heads, tails, strict=True)), "t", {}, groups
    )


def _requests(name: str, n: int, seed: int) -> PromptSet:
    texts = tuple(sentences(BENIGN_WORDS, n, seed, 4, 7))
    return PromptSet(name, texts, name, {}, tuple({"request_id": f"{name}-{i}"} for i in range(n)))


@pytest.fixture(scope="module")
def labelled_sets() -> dict[str, PromptSet]:
    """Jailbreak: 6 templates (3 families) x 4 requests; benign: 16 plain requests with request ids."""
    return {"benign": _requests("benign", 16, 7), "jailbreak": compose(_templates(), _requests("harmful", 4, 8))}


@pytest.fixture(scope="module")
def grouped(
    loaded: LoadedModel, labelled_sets: dict[str, PromptSet], tmp_path_factory: pytest.TempPathFactory
) -> TrainedDetector:
    out = tmp_path_factory.mktemp("grouped") / "det"
    with pytest.warns(UserWarning, match="instead of 5-fold grouped"):  # 3 families, 4 harmful requests
        return job.train_detector(loaded, labelled_sets["benign"], labelled_sets["jailbreak"], out=out, fpr=0.1, **OPTS)


def test_grouped_training_holds_out_families_and_requests(grouped: TrainedDetector) -> None:
    training = grouped.meta["training"]
    assert training["cv"] == "grouped" and "cv_note" not in training and grouped.cv == "grouped"
    plans = {p["name"]: p for p in training["cv_plans"]}
    assert list(plans) == ["main", "requests", "stratified"]
    # 3 jailbreak families + 16 benign prompts without a wrapper (groups of their own)
    assert plans["main"]["by"] == ["family", "template_id"] and plans["main"]["n_groups"] == 19
    assert plans["main"]["folds"] == 3 == training["folds_used"]  # 3 families: 3 folds, with a warning
    assert plans["requests"]["by"] == ["request_id"] and plans["requests"]["n_groups"] == 20
    assert plans["requests"]["folds"] == 4 and plans["stratified"] == {
        "name": "stratified",
        "kind": "stratified",
        "folds": 5,
    }
    table = grouped.table
    assert (table["cv"] == "grouped").all() and (table["k"] == 3).all() and (table["n_groups"] == 19).all()
    for kind in ("cp", "probe"):
        for cv in ("stratified", "requests"):
            for m in ("auroc", "auroc_low", "auroc_high", "tpr5"):
                assert f"{kind}_{m}_{cv}" in table.columns
    assert (table["k_requests"] == 4).all() and (table["k_stratified"] == 5).all()
    # the layer choice and the flags follow the grouped (main) numbers
    assert grouped.best_layer == int(table.loc[table["cp_auroc"].idxmax(), "layer"])
    assert table["flagged"].tolist() == (table["cp_auroc"] >= 0.9).tolist()


def test_grouped_training_warns_about_fewer_folds(
    loaded: LoadedModel, labelled_sets: dict[str, PromptSet], tmp_path: Path
) -> None:
    with pytest.warns(UserWarning, match="instead of 5-fold grouped") as caught:
        job.train_detector(loaded, labelled_sets["benign"], labelled_sets["jailbreak"], out=tmp_path / "d", **OPTS)
    assert [str(w.message).split(": ")[1] for w in caught] == [
        "using 3-fold instead of 5-fold grouped cross-validation",  # 3 families
        "using 4-fold instead of 5-fold grouped cross-validation",  # 4 harmful requests
    ]
    assert all(Path(w.filename).name == Path(__file__).name for w in caught)  # the warnings name the caller's line


def test_groups_baselines_and_operating_point_are_saved(
    grouped: TrainedDetector, labelled_sets: dict[str, PromptSet]
) -> None:
    assert grouped.path is not None
    meta = json.loads((grouped.path / META_FILE).read_text())["meta"]
    records = meta["train_groups"]
    assert len(records) == 40 and records[0] == {"request_id": "benign-0"}
    assert records[16]["family"] == "fam-0" and records[16]["request_id"] == "harmful-0"
    assert records[16]["request_start"] < records[16]["request_end"]

    base = meta["baselines"]
    for key in ("length_auroc", "text_auroc", "text_auroc_low", "text_auroc_high", "text_auroc_requests"):
        assert 0.0 <= base[key] <= 1.0, key
    assert "text_auroc_stratified" in base and base["layer"] == grouped.best_layer and base["detector"] == "cp"
    assert base["beats_text"] == (base["text_margin_low"] > 0)
    assert base["text_margin"] == pytest.approx(base["detector_auroc"] - base["text_auroc"])
    assert base["length_auroc"] > 0.9  # the wrappers make the jailbreak prompts longer

    point = meta["operating_point"]
    assert point["fpr"] == 0.1 and point["layer"] == grouped.best_layer and point["kind"] == "cp"
    assert point["fpr_oof"] <= 0.1 and sorted(point["thresholds"]) == ["cp", "probe"]
    assert sorted(point["thresholds"]["cp"]) == ["0", "2"]

    csv = pd.read_csv(grouped.path / "detection.csv")
    for col in ("length_auroc", "text_auroc", "text_margin", "text_margin_low", "beats_text", "cp_op_threshold"):
        assert col in csv.columns, col
    assert (csv["cp_op_fpr"] <= 0.1).all() and (csv["probe_op_fpr"] <= 0.1).all()
    assert csv["text_auroc"].nunique() == 1 and csv["length_auroc"].iloc[0] == pytest.approx(base["length_auroc"])
    best = csv.set_index("layer").loc[grouped.best_layer]
    assert best["cp_op_threshold"] == pytest.approx(point["threshold"]) and best["cp_op_tpr"] == pytest.approx(
        point["tpr"]
    )
    assert load_trained(grouped.path).table.columns.tolist() == csv.columns.tolist()


def test_families_stability_and_training_prompts_are_saved(
    grouped: TrainedDetector, labelled_sets: dict[str, PromptSet]
) -> None:
    assert grouped.path is not None
    point, record = grouped.meta["operating_point"], grouped.meta["families"]
    assert (record["layer"], record["kind"], record["threshold"]) == (point["layer"], "cp", point["threshold"])
    saved = pd.read_csv(grouped.path / "families.csv")
    families = grouped.families
    assert families is not None and saved["subset"].tolist() == families["subset"].tolist()
    rows = {(r.role, r.subset): r for r in saved.itertuples()}
    # the same out-of-fold scores and threshold as the operating point: the overall rates are its TPR and FPR
    assert rows[("jailbreak", "all")].rate == pytest.approx(point["tpr"])
    assert rows[("benign", "all")].rate == pytest.approx(point["fpr_oof"])
    per_family = saved[(saved.role == "jailbreak") & saved.subset.str.startswith("family=")]
    assert per_family["subset"].tolist() == ["family=fam-0", "family=fam-1", "family=fam-2"]
    assert per_family["n"].sum() == 24 and per_family["flagged"].sum() == rows[("jailbreak", "all")].flagged
    assert (saved["rate_low"] <= saved["rate"]).all() and (saved["rate"] <= saved["rate_high"]).all()

    stability = grouped.meta["stability"]
    assert stability["layer"] == grouped.best_layer and stability["kind"] == "cp"
    assert stability["resampled"] == "groups" and stability["resamples"] == 5 and stability["folds"] == 3
    assert -1.0 <= stability["spearman_min"] <= stability["spearman_mean"] <= 1.0

    prompts = load_trained(grouped.path).training_prompts()
    assert prompts is not None
    texts, labels = prompts
    assert texts == [*labelled_sets["benign"].texts, *labelled_sets["jailbreak"].texts]
    assert labels.tolist() == [0] * 16 + [1] * 24


def test_evaluation_on_held_out_families(grouped: TrainedDetector, loaded: LoadedModel) -> None:
    """New wrappers around new requests: the saved threshold, per-family rates and wrapper-resampled intervals."""
    assert grouped.path is not None
    texts = tuple(sentences(BENIGN_WORDS + JAILBREAK_WORDS, 10, 30, 8, 14))  # some look like jailbreaks
    benign = PromptSet(
        "calm", texts, "calm", {}, tuple({"request_id": f"c{i}", "looks_risky": i < 4} for i in range(10))
    )
    jail = compose(_templates(4, seed=31), _requests("harmful", 3, 32))
    frame = job.evaluate_detector(grouped.path, benign, jail, model=loaded, n_bootstrap=200)
    top, point = frame.attrs["headline"], grouped.meta["operating_point"]
    assert top["layer"] == grouped.best_layer and top["intervals"] == "whole wrappers resampled"
    assert top["threshold"] == point["threshold"] and top["threshold_from"] == "operating point (fpr=0.1)"
    assert top["fpr_target"] == 0.1
    rates = pd.DataFrame(frame.attrs["families"]).set_index(["role", "subset"])
    assert rates.loc[("jailbreak", "all"), "rate"] == pytest.approx(top["tpr"])
    assert rates.loc[("benign", "all"), "rate"] == pytest.approx(top["fpr"])
    assert rates.loc[("benign", "looks_risky"), "n"] == 4 and rates.loc[("benign", "other"), "n"] == 6
    families = [s for r, s in rates.index if r == "jailbreak" and s != "all"]
    assert families == ["family=fam-0", "family=fam-1"] and rates.loc[("jailbreak", "family=fam-0"), "n"] == 6
    # the intervals resample the 2 families (the benign prompts one by one), not the 12 jailbreak prompts
    codes = eval_codes([*benign.groups, *jail.groups])
    assert codes is not None and len(set(codes[10:].tolist())) == 2 and len(set(codes[:10].tolist())) == 10
    prob = job.score_prompts(grouped.path, [*benign.texts, *jail.texts], model=loaded)["prob"].to_numpy()
    y = np.repeat([0, 1], [10, 12])
    grouped_ci, _ = bootstrap_intervals(y, prob, 200, 0, groups=codes)
    assert (top["auroc_low"], top["auroc_high"]) == pytest.approx(grouped_ci)
    assert (top["auroc_low"], top["auroc_high"]) != pytest.approx(bootstrap_intervals(y, prob, 200, 0)[0])


def test_store_keeps_the_groups(loaded: LoadedModel, labelled_sets: dict[str, PromptSet], tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = job.train_detector(
            loaded,
            labelled_sets["benign"],
            labelled_sets["jailbreak"],
            out=tmp_path / "d",
            store=tmp_path / "feats",
            baselines=False,
            **{**OPTS, "layers": "1"},
        )
    assert Features.load(tmp_path / "feats").info["groups"] == det.meta["train_groups"]
    assert "baselines" not in det.meta and "text_auroc" not in det.table.columns
    assert "operating_point" not in det.meta and "cp_op_threshold" not in det.table.columns
    assert "families" not in det.meta and det.families is None and "stability" in det.meta
    assert det.path is not None and not (det.path / "families.csv").exists()


def test_score_uses_the_operating_point(grouped: TrainedDetector, loaded: LoadedModel) -> None:
    assert grouped.path is not None
    prompts = sentences(BENIGN_WORDS, 4, 60) + sentences(JAILBREAK_WORDS, 4, 61)
    frame = job.score_prompts(grouped.path, prompts, model=loaded)
    threshold = grouped.meta["operating_point"]["thresholds"]["cp"][str(grouped.best_layer)]
    assert frame.attrs["threshold"] == threshold and frame.attrs["threshold_from"] == "operating point (fpr=0.1)"
    assert frame["flagged"].tolist() == (frame["prob"] >= threshold).tolist()
    probe = job.score_prompts(grouped.path, prompts, model=loaded, kind="probe", layer=0)
    assert probe.attrs["threshold"] == grouped.meta["operating_point"]["thresholds"]["probe"]["0"]
    given = job.score_prompts(grouped.path, prompts, model=loaded, threshold=0.5)
    assert given.attrs["threshold"] == 0.5 and given.attrs["threshold_from"] == "given"
    assert given["flagged"].tolist() == (given["prob"] >= 0.5).tolist()


def test_control_prompts_share_the_held_out_wrappers(loaded: LoadedModel, tmp_path: Path) -> None:
    """Benign control prompts in the same wrappers: a family is held out from both sides at once."""
    templates = _templates(4, seed=9)
    benign = compose(templates, _requests("benign", 3, 10), name="control")
    jail = compose(templates, _requests("harmful", 3, 11))
    det = job.train_detector(loaded, benign, jail, out=tmp_path / "c", folds=2, **OPTS)
    plans = {p["name"]: p for p in det.meta["training"]["cv_plans"]}
    assert plans["main"]["n_groups"] == 2 and plans["main"]["folds"] == 2  # 2 families, shared by both sides
    assert plans["requests"]["n_groups"] == 6


def test_cv_choices_and_fallbacks(loaded: LoadedModel, labelled_sets: dict[str, PromptSet], tmp_path: Path) -> None:
    benign, jail = labelled_sets["benign"], labelled_sets["jailbreak"]
    strat = job.train_detector(loaded, benign, jail, out=tmp_path / "s", cv="stratified", **OPTS)
    assert strat.meta["training"]["cv"] == "stratified" and "cv_plans" not in strat.meta["training"]
    assert "cv" not in strat.table.columns and not any(c.endswith("_stratified") for c in strat.table.columns)
    assert "text_auroc" in strat.table.columns and "train_groups" in strat.meta  # the prompts carry labels

    one_template = compose(_templates(1), _requests("harmful", 8, 12))
    with pytest.warns(UserWarning, match="wrappers cannot be held out"):
        req = job.train_detector(loaded, benign, one_template, out=tmp_path / "r", **OPTS)
    assert req.meta["training"]["cv_plans"][0]["by"] == ["request_id"] and "cv_note" in req.meta["training"]
    assert [p["name"] for p in req.meta["training"]["cv_plans"]] == ["main", "stratified"]

    unlabelled = PromptSet("b", benign.texts, "b")
    one_wrapper = PromptSet("j", one_template.texts, "j", {}, ({"template_id": "only"},) * len(one_template))
    with pytest.warns(UserWarning, match="grouped cross-validation impossible"):
        none = job.train_detector(loaded, unlabelled, one_wrapper, out=tmp_path / "n", **{**OPTS, "layers": "0"})
    assert none.meta["training"]["cv"] == "stratified" and "cv" not in none.table.columns

    plain = job.train_detector(loaded, list(benign.texts), list(jail.texts), out=tmp_path / "p", **OPTS)
    assert "cv" not in plain.meta["training"] and "train_groups" not in plain.meta and "baselines" not in plain.meta
    assert plain.cv == "stratified" and strat.cv == "stratified"
    with_base = job.train_detector(
        loaded, list(benign.texts), list(jail.texts), out=tmp_path / "b", baselines=True, **OPTS
    )
    assert "text_auroc" in with_base.table.columns and "text_auroc_stratified" not in with_base.table.columns


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"cv": "random"}, "cv must be 'grouped' or 'stratified'"),
        ({"fpr": 0.0}, r"--fpr must be in \(0, 0.5\]"),
        ({"fpr": 0.7}, r"--fpr must be in \(0, 0.5\]"),
    ],
)
def test_bad_grouped_options(
    labelled_sets: dict[str, PromptSet], tmp_path: Path, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(AttnscanError, match=match):  # before the model loads: the spec does not exist
        job.train_detector(
            "./no-such-model", labelled_sets["benign"], labelled_sets["jailbreak"], out=tmp_path / "x", **options
        )


def test_saved_operating_point_survives_loading(grouped: TrainedDetector) -> None:
    assert grouped.path is not None
    again = load_trained(grouped.path)
    assert again.meta["operating_point"] == grouped.meta["operating_point"]
    np.testing.assert_allclose(again.table["cp_op_threshold"], grouped.table["cp_op_threshold"], rtol=1e-5)
