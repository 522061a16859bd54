"""Measurement: which hidden-state features let a detector find the harmful request inside a jailbreak wrapper.

The prompts (built-in sets, subsampled with ``--limit`` and ``--seed``): the benign side is plain benign requests
(``builtin:benign``) plus template-matched controls (``builtin:control``: the jailbreak wrappers around harmless
requests); the jailbreak side is ``builtin:jailbreak`` (the same wrappers around harmful requests). Only the
request tells a control from a jailbreak prompt.

One forward pass over all prompts (:func:`attnscan.engine.hidden.labelled_features`) keeps, per chosen layer, the
last-K slab, the mean over all tokens and the mean over the request's tokens. Then, on the folds that
``detect train`` uses (:func:`attnscan.detect.training.plan_cv`: template families held out, and beside them
requests held out), per layer:

- the probe (standardised L2 logistic regression) on each pooling of :data:`attnscan.engine.features.POOLS`:
  ``mean`` (all tokens), ``request`` (the request's tokens), ``last`` (the last K tokens);
- the band probe (:mod:`attnscan.detect.bands`, ``--band`` layers on each side) on each pooling;
- the CP detector on the last-K slab (``detect train``'s primary detector), unless ``--no-cp``;

and the TF-IDF text baseline (:mod:`attnscan.detect.baselines`) and the length baseline on the same folds.

Printed, per feature: the best layer by grouped (template-family) AUROC, that AUROC with its 95 % bootstrap
interval, the AUROC when requests are held out at that layer, the TPR at 5 % FPR, the median AUROC over layers,
and the paired difference to the text baseline with its interval. The best layer is picked on the same
out-of-fold scores it is reported on, so its AUROC is optimistic; the median over layers is not picked.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python bench/detect_features.py --limit 40 --layers 0,3,6,9,12,15,18,21,24,27

``--features DIR`` keeps the extracted features in DIR and reuses them on the next run with the same DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--limit", type=int, default=40, help="prompts drawn from each of benign, control, jailbreak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", default="0,3,6,9,12,15,18,21,24,27")
    p.add_argument("--length", type=int, default=448)
    p.add_argument("--last-k", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--bootstrap", type=int, default=500)
    p.add_argument("--band", type=int, default=1, help="band probe: layers on each side (0: none)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--no-cp", action="store_true", help="skip the CP detector (the slowest part)")
    p.add_argument("--no-unspanned", action="store_true", help="skip the prompts-without-spans rows")
    p.add_argument("--features", type=Path, default=None, help="keep/reuse the extracted features here")
    p.add_argument("--json", type=Path, default=None, help="also write the summary rows here")
    return p.parse_args()


def _prompts(limit: int, seed: int) -> tuple[Any, Any]:
    from attnscan.prompts.sets import join_sets, load_prompts

    benign = load_prompts("builtin:benign", "benign", limit=limit, seed=seed)
    control = load_prompts("builtin:control", "control", limit=limit, seed=seed)
    jailbreak = load_prompts("builtin:jailbreak", "jailbreak", limit=limit, seed=seed)
    return join_sets(benign, control, "benign+control"), jailbreak


def _features(args: argparse.Namespace, negatives: Any, jailbreak: Any, store: Path | None) -> Any:
    from attnscan.engine.hidden import Features, labelled_features
    from attnscan.models.loading import LoadOptions, resolve_model

    if store is not None and (store / "features.json").is_file():
        print(f"reusing the features in {store}", file=sys.stderr)
        return Features.load(store, mmap=False)
    loaded = resolve_model(args.model, LoadOptions())
    t0 = time.perf_counter()
    feats = labelled_features(
        loaded,
        negatives,
        jailbreak,
        layers=args.layers,
        last_k=args.last_k,
        length=args.length,
        batch_size=args.batch_size,
        store=store,
    )
    print(
        f"features: {feats.n_prompts} prompts, {len(feats.layers)} layers, {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    return feats


def _summary(
    name: str,
    table: pd.DataFrame,
    prefix: str,
    y: np.ndarray,
    oof: dict[Any, Any],
    text: np.ndarray,
    n_bootstrap: int,
    seed: int,
    key: str,
) -> dict[str, Any]:
    """One printed row: the best layer by main-fold AUROC and what it scores."""
    from attnscan.detect.metrics import paired_auroc_difference

    best = table.loc[table[f"{prefix}_auroc"].idxmax()]
    layer = int(best["layer"])
    diff, low, high = paired_auroc_difference(y, oof[layer], text, n_bootstrap, seed)
    side = f"{prefix}_auroc_requests"
    return {
        "feature": name,
        "best_layer": layer,
        "auroc": float(best[f"{prefix}_auroc"]),
        "auroc_low": float(best[f"{prefix}_auroc_low"]),
        "auroc_high": float(best[f"{prefix}_auroc_high"]),
        "auroc_requests": float(best[side]) if side in best else float("nan"),
        "tpr5": float(best[f"{prefix}_tpr5"]),
        "median_auroc": float(table[f"{prefix}_auroc"].median()),
        "minus_text": diff,
        "minus_text_low": low,
        "minus_text_high": high,
        "key": key,
    }


def main() -> int:
    args = _parse()
    from attnscan.detect.bands import band_detection
    from attnscan.detect.baselines import text_scores
    from attnscan.detect.metrics import auroc, bootstrap_intervals, layer_detection
    from attnscan.detect.training import Training, plan_cv, train_records
    from attnscan.engine.features import POOLS

    t_start = time.perf_counter()
    negatives, jailbreak = _prompts(args.limit, args.seed)
    feats = _features(args, negatives, jailbreak, args.features)
    sets = {"benign": negatives, "jailbreak": jailbreak}
    texts = [*negatives.texts, *jailbreak.texts]
    y = np.asarray([0] * len(negatives) + [1] * len(jailbreak), dtype=np.int64)
    training = Training(args.rank, 1.0, 100, args.folds, args.seed, args.bootstrap, 0.9, "probe")
    plan = plan_cv(y, train_records(sets), training, stacklevel=2)
    print(f"folds: {plan.record}", file=sys.stderr)
    common = {"seed": args.seed, "n_bootstrap": args.bootstrap}

    rows: list[dict[str, Any]] = []
    text = {name: text_scores(texts, y, folds) for name, folds in plan.plans.items()}
    (t_lo, t_hi), _ = bootstrap_intervals(y, text[""], args.bootstrap, args.seed)
    print(f"request spans: {feats.info['request_pooling']['counts']}", file=sys.stderr)
    for pool in POOLS:
        pooled = feats.pool(pool)
        det = layer_detection(None, pooled, y, plan.plans, flag_on="probe", **common)
        oof = {layer: det.oof[("", "probe", layer)] for layer in feats.layers}
        rows.append(_summary(f"probe, {pool}", det.table, "probe", y, oof, text[""], **common, key=f"probe-{pool}"))
        if args.band:
            banded, both = band_detection(pooled, y, feats.layers, args.band, plan.plans, C=1.0, **common)
            band_oof = {layer: both[("", "band", layer)] for layer in feats.layers}
            rows.append(
                _summary(
                    f"band {args.band}, {pool}", banded, "band", y, band_oof, text[""], **common, key=f"band-{pool}"
                )
            )
        print(f"  {pool}: done at {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    if not args.no_unspanned:
        rows += _unspanned_rows(args, negatives, jailbreak, feats, y, plan.plans, text[""], common)
        print(f"  without spans: done at {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    if not args.no_cp:
        det = layer_detection(feats.tensors, None, y, plan.plans, rank=args.rank, max_iter=100, **common)
        oof = {layer: det.oof[("", "cp", layer)] for layer in feats.layers}
        rows.append(_summary(f"CP, last {feats.last_k}", det.table, "cp", y, oof, text[""], **common, key="cp"))
    baseline = {
        "feature": "text (TF-IDF)",
        "auroc": auroc(y, text[""]),
        "auroc_low": t_lo,
        "auroc_high": t_hi,
        "auroc_requests": auroc(y, text["requests"]) if "requests" in text else float("nan"),
        "key": "text",
    }
    rows.append(baseline)
    rows.append({"feature": "length (tokens)", "auroc": auroc(y, feats.lengths.astype(float)), "key": "length"})
    _print(rows, feats, y, plan, time.perf_counter() - t_start)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2, default=float) + "\n", encoding="utf-8")
    return 0


def _unspanned_rows(
    args: argparse.Namespace,
    negatives: Any,
    jailbreak: Any,
    feats: Any,
    y: np.ndarray,
    plans: Any,
    text: np.ndarray,
    common: dict[str, Any],
) -> list[dict[str, Any]]:
    """What ``detect score`` sees on prompts that carry no request span: the same prompts with their spans dropped,
    so "request" pooling falls back to the prompt's whole text. Two rows: a probe trained and tested on that
    pooling, and a probe trained on the request spans but tested on the whole-text pooling (a detector trained on
    composed prompts, scoring prompts from elsewhere)."""
    from attnscan.detect.metrics import layer_detection
    from attnscan.prompts.sets import PromptSet

    def bare(ps: Any) -> Any:
        return PromptSet(ps.name, ps.texts, ps.source)

    store = None if args.features is None else args.features / "unspanned"
    plain = _features(args, bare(negatives), bare(jailbreak), store)
    text_pool = plain.pool("request")
    det = layer_detection(None, text_pool, y, plans, flag_on="probe", **common)
    oof = {layer: det.oof[("", "probe", layer)] for layer in feats.layers}
    rows = [_summary("probe, prompt text (no spans)", det.table, "probe", y, oof, text, **common, key="probe-text")]
    table, cross = _cross_table(feats.pool("request"), text_pool, y, plans, common)
    rows.append(
        _summary(
            "probe, request -> scored on prompt text",
            table,
            "cross",
            y,
            cross,
            text,
            **common,
            key="probe-request-on-text",
        )
    )
    return rows


def _cross_table(
    fit_x: dict[int, Any], test_x: dict[int, Any], y: np.ndarray, plans: Any, common: dict[str, Any]
) -> tuple[pd.DataFrame, dict[int, np.ndarray]]:
    """Per layer, a probe fitted on ``fit_x`` of the training folds and scored on ``test_x`` of the held-out fold:
    the ``cross_*`` columns (main folds, and ``cross_auroc_requests``) and the main out-of-fold scores."""
    from attnscan.detect.detectors import ProbeDetector
    from attnscan.detect.metrics import auroc, bootstrap_intervals, tpr_at_fpr

    rows, main_oof = [], {}
    for layer in sorted(fit_x):
        row: dict[str, Any] = {"layer": layer}
        for name, folds in plans.items():
            oof = np.zeros(y.size)
            for train, test in folds.splits:
                oof[test] = ProbeDetector().fit(fit_x[layer][train], y[train]).predict_proba(test_x[layer][test])
            if name == "":
                main_oof[layer] = oof
                (lo, hi), _ = bootstrap_intervals(y, oof, common["n_bootstrap"], common["seed"])
                row.update(cross_auroc=auroc(y, oof), cross_auroc_low=lo, cross_auroc_high=hi)
                row["cross_tpr5"] = tpr_at_fpr(y, oof, 0.05)
            else:
                row[f"cross_auroc_{name}"] = auroc(y, oof)
        rows.append(row)
    return pd.DataFrame(rows), main_oof


def _fmt(row: dict[str, Any], key: str, digits: int = 3) -> str:
    value = row.get(key)
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _print(rows: list[dict[str, Any]], feats: Any, y: np.ndarray, plan: Any, seconds: float) -> None:
    print(
        f"\n{int(y.size)} prompts ({int(y.sum())} jailbreak), layers {list(feats.layers)}, "
        f"main folds {plan.plans[''].kind} ({plan.plans[''].k}), {seconds:.0f} s\n"
    )
    print(
        "| feature | best layer | grouped AUROC [95% CI] | requests held out | TPR@5% | median over layers "
        "| minus text [95% CI] |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ci = (
            f"{_fmt(r, 'auroc')} [{_fmt(r, 'auroc_low')}-{_fmt(r, 'auroc_high')}]"
            if "auroc_low" in r
            else _fmt(r, "auroc")
        )
        margin = (
            f"{r['minus_text']:+.3f} [{r['minus_text_low']:+.3f}, {r['minus_text_high']:+.3f}]"
            if "minus_text" in r
            else "-"
        )
        layer = str(r.get("best_layer", "-"))
        print(
            f"| {r['feature']} | {layer} | {ci} | {_fmt(r, 'auroc_requests')} | {_fmt(r, 'tpr5', 2)} "
            f"| {_fmt(r, 'median_auroc')} | {margin} |"
        )


if __name__ == "__main__":
    sys.exit(main())
