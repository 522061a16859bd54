"""How :func:`attnscan.detect.jobs.train_detector` cross-validates, fits and records its detectors.

Which folds (``cv=``)
---------------------
Jailbreak prompts are long wrappers (templates) around short requests. Scored with stratified folds, a detector sees
every wrapper and every request in training and can reach an AUROC near 1 by recognising them; that predicts nothing
about a wrapper or a request it has not seen. So when the training prompts carry group labels
(:attr:`attnscan.prompts.sets.PromptSet.groups`: the built-in sets and composed sets do), ``cv="grouped"`` (the
default) holds out whole groups (:mod:`attnscan.detect.folds`), in two cross-validations reported side by side:

- **wrappers** (the main numbers: ``cp_auroc``, ``probe_auroc``, their intervals and TPRs, ``flagged`` and the best
  layer): each prompt's template ``family``, else its ``template_id``. A family is held out whole, from both sides
  when both use it (jailbreak and ``builtin:control`` prompts share the wrappers); a prompt with no wrapper (a plain
  benign request) is a group of its own.
- **requests** (``*_requests`` columns): each prompt's ``request_id``; every wrapped version of a request is held
  out together.

Why two and not one hold-out unit. In a full templates x requests cross every prompt shares its wrapper with the
prompts of the other requests and its request with the prompts of the other wrappers, so the union of both
relations joins all prompts into one group: nothing could be held out. Holding out the wrappers answers "does it
work on a jailbreak style it has not seen?", which is the question stratified folds hide and the one where
recognising the wrapper stops paying, so it gives the main numbers and picks the layer; it still sees the held-out
prompts' requests in other wrappers, and the request hold-out shows how much that helps. Neither holds out both at
once, so both are, if anything, optimistic: compare them, and compare both with the stratified numbers
(``*_stratified``) and the text baseline (:mod:`attnscan.detect.baselines`). When the wrappers cannot be held out
(only one template on a side) the requests give the main numbers, with a warning; when neither can, the folds are
stratified, with a warning.

Grouped folds fall back silently to stratified ones when the prompts carry no group labels (plain lists of texts).
``meta["training"]["cv"]`` says which were used whenever the prompts carry labels; it is absent (stratified) for
unlabelled prompts, so detectors trained on them are exactly those of before grouped folds.

Operating point (``fpr=``): per layer and detector, the threshold on the out-of-fold scores (of the main folds) of
the benign training prompts that lets through at most the fraction ``fpr`` of them
(:func:`attnscan.detect.metrics.threshold_at_fpr`), and the TPR of the out-of-fold jailbreak scores there. The saved
detectors are refitted on all prompts, so their scores on new benign prompts may sit a little differently from the
out-of-fold ones: the achieved false-positive rate on new prompts is an estimate, not a guarantee.

Intervals: under grouped folds the bootstrap intervals of the table (and of the baselines) resample whole groups,
the unit the folds hold out (:mod:`attnscan.detect.bootstrap`). Beside the table, training records the flag rates per
family at the operating point (:mod:`attnscan.detect.rates`) and the rank stability of refits on resampled training
groups (:mod:`attnscan.detect.stability`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from .._types import ProgressFn
from ..errors import AttnscanError
from ..models.loading import LoadedModel
from ..prompts.sets import PromptSet, PromptSource, as_prompt_set
from .bands import check_band
from .detectors import CPDetector, FloatArray, Kind, ProbeDetector, check_cp_params
from .folds import CvKind, Folds, GroupIds, check_cv, check_folds, fold_plans, group_codes, group_ids
from .inputs import DetectorInputs
from .metrics import (
    best_layer,
    check_flag_on,
    check_fpr,
    check_n_bootstrap,
    check_threshold,
    flagged_layers,
    layer_detection,
    threshold_at_fpr,
)
from .store import JOB_FORMAT, JOB_VERSION, model_record, prompt_hash

__all__ = [
    "REQUEST_KEYS",
    "WRAPPER_KEYS",
    "CvPlan",
    "Fitted",
    "Training",
    "add_operating_points",
    "fit_layers",
    "labelled",
    "operating_points",
    "operating_record",
    "plan_cv",
    "request_spans",
    "train_records",
    "training_meta",
]

#: The group labels that name a prompt's wrapper, first found wins: its template family, else its template.
WRAPPER_KEYS = ("family", "template_id")
#: The group label that names a prompt's request.
REQUEST_KEYS = ("request_id",)


@dataclass(frozen=True)
class Training:
    """The detector, cross-validation and operating-point settings of a training run, checked when made."""

    rank: int
    C: float
    max_iter: int
    folds: int
    seed: int
    n_bootstrap: int
    threshold: float
    flag_on: Kind
    cv: CvKind = "grouped"
    fpr: float | None = None
    baselines: bool | None = None
    band: int | None = None

    def __post_init__(self) -> None:
        check_flag_on(self.flag_on)
        check_threshold(self.threshold, "an AUROC")
        check_cp_params(self.rank, self.C, self.max_iter)
        check_folds(self.folds)
        check_n_bootstrap(self.n_bootstrap)
        check_cv(self.cv)
        if self.fpr is not None:
            check_fpr(self.fpr)
        check_band(self.band)


def labelled(
    benign: PromptSource, jailbreak: PromptSource, *, for_training: bool = False
) -> tuple[dict[str, PromptSet], list[str], npt.NDArray[np.int64]]:
    """The two prompt sets, their texts (benign first) and labels (0 benign, 1 jailbreak); for training, each set
    must hold the 2 prompts cross-validation needs."""
    sets = {"benign": as_prompt_set(benign, "benign"), "jailbreak": as_prompt_set(jailbreak, "jailbreak")}
    for name, ps in sets.items():
        if for_training and len(ps) < 2:
            raise AttnscanError(
                f"training needs at least 2 {name} prompts for cross-validation, got {len(ps)} from {ps.source}: "
                "add prompts (or raise --limit)"
            )
    texts = [*sets["benign"].texts, *sets["jailbreak"].texts]
    y = np.asarray([0] * len(sets["benign"]) + [1] * len(sets["jailbreak"]), dtype=np.int64)
    return sets, texts, y


def train_records(sets: Mapping[str, PromptSet]) -> list[dict[str, Any]] | None:
    """The group labels of every training prompt (benign first; ``{}`` for a prompt of a set without labels), or
    ``None`` when neither set carries any: what ``meta["train_groups"]`` and the features' ``groups`` hold."""
    if not any(ps.groups for ps in sets.values()):
        return None
    return [dict(g) for ps in sets.values() for g in (ps.groups or ({},) * len(ps))]


def request_spans(sets: Mapping[str, PromptSet]) -> list[tuple[int, int] | None]:
    """Each prompt's request as a character span (``None`` where unknown), in the order of :func:`labelled`."""
    return [ps.request_span(i) for ps in sets.values() for i in range(len(ps))]


# --------------------------------------------------------------------------------------------------- folds


@dataclass
class CvPlan:
    """The cross-validations of a training run (:func:`~attnscan.detect.folds.fold_plans`: main first, under ``""``)
    and what ``meta["training"]`` records about them (empty for unlabelled prompts)."""

    plans: dict[str, Folds]
    record: dict[str, Any] = field(default_factory=dict)


def _held_out_twice(y: npt.NDArray[np.int64], ids: Sequence[str | None] | None) -> bool:
    """Whether grouping by ``ids`` leaves each class in at least 2 groups (so both can be held out)."""
    if ids is None:
        return False
    codes = group_codes(list(ids), y.size)
    return all(len(set(codes[y == c].tolist())) >= 2 for c in (0, 1))


def plan_cv(
    y: npt.NDArray[np.int64], records: Sequence[Mapping[str, Any]] | None, training: Training, *, stacklevel: int = 3
) -> CvPlan:
    """The folds of a training run (the rule in the module docstring); warnings go ``stacklevel`` frames up (the
    default: the caller's caller)."""
    t = training
    below = stacklevel + 1  # for the warnings of fold_plans, one frame further down
    if records is None:  # unlabelled prompts: stratified folds, recorded as before grouped folds existed
        return CvPlan(fold_plans(y, t.folds, t.seed, stacklevel=below))
    wrappers, requests = group_ids(records, WRAPPER_KEYS), group_ids(records, REQUEST_KEYS)
    usable = {name: _held_out_twice(y, ids) for name, ids in (("wrappers", wrappers), ("requests", requests))}
    note = None
    if t.cv == "grouped" and not any(usable.values()):
        note = "no template family, template or request groups that put each class in 2 groups or more"
        warnings.warn(f"grouped cross-validation impossible ({note}): using stratified folds", stacklevel=stacklevel)
    elif t.cv == "grouped" and wrappers is not None and not usable["wrappers"]:
        note = "the wrappers cannot be held out (a class uses a single one): holding out requests only"
        warnings.warn(note, UserWarning, stacklevel=stacklevel)
    if t.cv == "stratified" or not any(usable.values()):
        plans = fold_plans(y, t.folds, t.seed, stacklevel=below)
        return CvPlan(plans, {"cv": "stratified", **({"cv_note": note} if note else {})})
    main, by = (wrappers, WRAPPER_KEYS) if usable["wrappers"] else (requests, REQUEST_KEYS)
    more: dict[str, GroupIds] = {"requests": requests} if requests and main is wrappers and usable["requests"] else {}
    plans = fold_plans(y, t.folds, t.seed, main, more_groups=more, stacklevel=below)
    described = []
    for name, folds in plans.items():
        entry: dict[str, Any] = {"name": name or "main", "kind": folds.kind, "folds": folds.k}
        if folds.kind == "grouped":
            entry.update(by=list(by if name == "" else REQUEST_KEYS), n_groups=folds.n_groups)
        described.append(entry)
    return CvPlan(plans, {"cv": "grouped", **({"cv_note": note} if note else {}), "cv_plans": described})


# --------------------------------------------------------------------------------------------------- fitting


@dataclass
class Fitted:
    """Per-layer results of :func:`fit_layers`: the detection ``table``, the detectors fitted on all prompts, and
    the out-of-fold scores ``oof[(cv, kind, layer)]`` behind the table."""

    table: pd.DataFrame
    cps: dict[int, CPDetector]
    probes: dict[int, ProbeDetector]
    oof: dict[tuple[str, str, int], FloatArray]


def fit_layers(
    inputs: DetectorInputs,
    y: npt.NDArray[np.int64],
    chosen: Sequence[int],
    training: Training,
    plan: CvPlan,
    progress: ProgressFn | None,
) -> Fitted:
    """Per layer, the cross-validated detection table row (:func:`~attnscan.detect.metrics.layer_detection` over
    ``plan``) and the CP and probe detectors fitted on all prompts."""
    t = training
    rows: list[pd.DataFrame] = []
    fitted = Fitted(pd.DataFrame(), {}, {}, {})
    if progress is not None:
        progress(0, len(chosen), "fitting")
    for i, layer in enumerate(chosen):
        tensor, pooled = inputs.tensors[layer], inputs.pooled[layer]
        detection = layer_detection(
            {layer: tensor},
            {layer: pooled},
            y,
            plan.plans,
            rank=t.rank,
            seed=t.seed,
            threshold=t.threshold,
            flag_on=t.flag_on,
            n_bootstrap=t.n_bootstrap,
            C=t.C,
            max_iter=t.max_iter,
        )
        rows.append(detection.table)
        fitted.oof.update(detection.oof)
        fitted.cps[layer] = CPDetector(rank=t.rank, seed=t.seed, C=t.C, max_iter=t.max_iter).fit(tensor, y)
        fitted.probes[layer] = ProbeDetector(C=t.C).fit(pooled, y)
        if progress is not None:
            progress(i + 1, len(chosen), "fitting")
    fitted.table = pd.concat(rows, ignore_index=True)
    fitted.table.attrs.update(rows[0].attrs, k=t.folds, k_used=plan.plans[""].k)
    return fitted


def operating_points(
    fitted: Fitted, y: npt.NDArray[np.int64], layers: Sequence[int], fpr: float
) -> dict[str, dict[int, tuple[float, float, float]]]:
    """``{kind: {layer: (threshold, tpr, fpr_achieved)}}`` at the target false-positive rate ``fpr``, on the
    out-of-fold scores of the main folds (see the module docstring)."""
    return {
        kind: {layer: threshold_at_fpr(y, fitted.oof[("", kind, layer)], fpr) for layer in layers}
        for kind in ("cp", "probe")
    }


def add_operating_points(
    table: pd.DataFrame, points: Mapping[str, Mapping[int, tuple[float, float, float]]]
) -> pd.DataFrame:
    """``table`` with ``{kind}_op_threshold``, ``{kind}_op_tpr`` and ``{kind}_op_fpr`` per layer row."""
    out = table.copy()
    for kind, by_layer in points.items():
        for j, name in enumerate(("threshold", "tpr", "fpr")):
            out[f"{kind}_op_{name}"] = [by_layer[int(layer)][j] for layer in out["layer"]]
    out.attrs.update(table.attrs)
    return out


def operating_record(
    points: Mapping[str, Mapping[int, tuple[float, float, float]]], fpr: float, layer: int, kind: Kind, cv: str
) -> dict[str, Any]:
    """``meta["operating_point"]``: the target, where the thresholds come from, every layer's threshold per
    detector kind, and the best layer's primary detector's threshold, TPR and achieved out-of-fold FPR."""
    threshold, tpr, achieved = points[kind][layer]
    return {
        "fpr": fpr,
        "from": f"out-of-fold scores of the benign training prompts ({cv} folds)",
        "thresholds": {k: {str(layer_): v[0] for layer_, v in by_layer.items()} for k, by_layer in points.items()},
        "layer": layer,
        "kind": kind,
        "threshold": threshold,
        "tpr": tpr,
        "fpr_oof": achieved,
    }


# --------------------------------------------------------------------------------------------------- meta


def training_meta(
    loaded: LoadedModel,
    settings: Mapping[str, Any],
    chosen: Sequence[int],
    inputs: DetectorInputs,
    sets: Mapping[str, PromptSet],
    texts: Sequence[str],
    y: npt.NDArray[np.int64],
    training: Training,
    plan: CvPlan,
    table: pd.DataFrame,
) -> dict[str, Any]:
    """The ``meta`` of a trained detector (see :mod:`attnscan.detect.store`): model, features, prompt sets,
    training settings, best and flagged layers; the caller adds baselines, operating point and timing."""
    t = training
    return {
        "job": {"format": JOB_FORMAT, "version": JOB_VERSION},
        "primary": t.flag_on,
        "model": model_record(loaded),
        "features": {**settings, "layers": list(chosen), **inputs.info},
        "sets": [
            {**sets["benign"].provenance(), "role": "benign", "label": 0},
            {**sets["jailbreak"].provenance(), "role": "jailbreak", "label": 1},
        ],
        "train_prompt_hashes": sorted({prompt_hash(text) for text in texts}),
        "training": {
            "n": int(y.size),
            "n_jailbreak": int(y.sum()),
            "rank": t.rank,
            "C": t.C,
            "max_iter": t.max_iter,
            "folds": t.folds,
            "folds_used": plan.plans[""].k,
            "seed": t.seed,
            "n_bootstrap": t.n_bootstrap,
            "threshold": t.threshold,
            "flag_on": t.flag_on,
            **({"band": t.band} if t.band is not None else {}),
            **plan.record,
            "tokens_min": int(inputs.lengths.min()),
            "tokens_max": int(inputs.lengths.max()),
            "tokens_mean": float(inputs.lengths.mean()),
        },
        "best_layer": best_layer(table, by=f"{t.flag_on}_auroc"),
        "best_by": f"{t.flag_on}_auroc",
        "flagged_layers": flagged_layers(table),
    }
