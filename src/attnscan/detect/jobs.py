"""Train, apply and evaluate per-layer jailbreak detectors on a model's internals.

The library twin of ``attnscan detect train|score|eval``. :mod:`attnscan.detect.detectors` and
:mod:`attnscan.detect.metrics` hold the detectors and metrics on plain arrays; this module runs the model to get
those arrays (:mod:`attnscan.detect.inputs`), and keeps the detectors with everything needed to compute the same
arrays again for new prompts (the detector directory of :mod:`attnscan.detect.store`).

Scoring and evaluation load the model recorded in ``meta["model"]`` unless one is given, in the dtype the training
features were computed in unless another is asked for (which warns), and compute the features with the recorded
settings (only the layers asked for). A model other than the training one is refused (see
:func:`~attnscan.detect.store.check_model`) unless ``allow_other_model=True``, which warns instead: a detector reads
one model's internals and its scores mean nothing on another's.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from .._io import now_utc
from .._types import ProgressFn, refuse_leftovers, take_options
from ..engine.accumulate import DEFAULT_FLOOR, Align
from ..engine.batching import check_batch_size
from ..engine.hidden import DEFAULT_LAST_K
from ..errors import AttnscanError
from ..models.loading import LoadedModel, LoadOptions, resolve_model
from ..prompts.encoding import DEFAULT_LENGTH, Truncate
from ..prompts.sets import PromptSet, PromptSource, as_prompt_set
from .detectors import CPDetector, Kind, ProbeDetector, check_cp_params
from .inputs import DEFAULT_BLOCKS, DetectorInputs, FeatureKind, check_store, detector_inputs, feature_settings
from .metrics import (
    METRIC_COLUMNS,
    best_layer,
    bootstrap_intervals,
    check_flag_on,
    check_folds,
    check_n_bootstrap,
    check_threshold,
    flagged_layers,
    layer_detection_table,
    metrics,
    usable_folds,
)
from .store import (
    JOB_FORMAT,
    JOB_VERSION,
    TrainedDetector,
    check_detector_dir,
    load_trained,
    model_record,
    preview,
    prompt_hash,
    save_trained,
    scoring_model,
)

__all__ = [
    "evaluate_detector",
    "score_prompts",
    "train_detector",
]


# --------------------------------------------------------------------------------------------------- train


def train_detector(
    model: str | LoadedModel,
    benign: PromptSource,
    jailbreak: PromptSource,
    *,
    out: str | os.PathLike[str],
    layers: str | Sequence[int] | None = "all",
    features: FeatureKind = "hidden",
    rank: int = 8,
    last_k: int = DEFAULT_LAST_K,
    folds: int = 5,
    threshold: float = 0.9,
    flag_on: Kind = "cp",
    seed: int = 0,
    n_bootstrap: int = 1000,
    C: float = 1.0,
    max_iter: int = 100,
    length: int = DEFAULT_LENGTH,
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
    truncate: Truncate = "tail",
    blocks: int = DEFAULT_BLOCKS,
    align: Align = "relative",
    floor: float = DEFAULT_FLOOR,
    store: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    load: LoadOptions | None = None,
    **keywords: Any,
) -> TrainedDetector:
    """Train per-layer jailbreak detectors on ``model``'s internals and write them to the directory ``out``.

    1. Features of the benign (label 0) then jailbreak (label 1) prompts at ``layers`` (``features``: see
       :mod:`attnscan.detect.inputs`; ``last_k``, ``length``, ``chat_template``, ``system_prompt``, ``truncate`` for
       both kinds, ``blocks``, ``align``, ``floor`` for attention; ``store`` streams hidden features to disk).
    2. Per layer, cross-validated CP (``rank``, ``max_iter``, ``C``) and probe metrics over ``folds`` stratified
       folds with ``n_bootstrap`` resamples and ``seed`` (:func:`attnscan.detect.metrics.layer_detection_table`); a
       layer is ``flagged`` when its ``flag_on`` AUROC is at least ``threshold``. ``folds`` shrinks, with a warning,
       to the smaller set's size.
    3. Final CP and probe detectors per layer, fitted on all prompts.
    4. ``out`` written atomically (see :mod:`attnscan.detect.store`); an existing detector is replaced only with
       ``overwrite``.

    ``model`` is a spec, loaded with ``load`` (:class:`~attnscan.models.loading.LoadOptions`; its fields ``dtype``,
    ``device``, ``revision`` ... may also be given as keywords), or a :class:`~attnscan.models.loading.LoadedModel`;
    ``benign``/``jailbreak`` are prompt sources or PromptSets (each needs at least 2 prompts). The settings are
    checked before the model loads (``layers``, which needs the model, just after). ``progress(done, total, label)``
    hears about extraction (prompts; ``"features"`` or ``"attention"``) and fitting (layers, ``"fitting"``).
    """
    started = now_utc()
    load = take_options(LoadOptions, load, keywords)
    refuse_leftovers("train_detector", keywords)
    settings = feature_settings(
        features,
        last_k=last_k,
        length=length,
        chat_template=chat_template,
        system_prompt=system_prompt,
        truncate=truncate,
        blocks=blocks,
        align=align,
        floor=floor,
    )
    training = _Training(rank, C, max_iter, folds, seed, n_bootstrap, threshold, flag_on)
    check_batch_size(batch_size)
    check_store(features, store)
    sets, texts, y = _labelled(benign, jailbreak, for_training=True)
    final = Path(out)
    check_detector_dir(final, overwrite)

    loaded = resolve_model(model, load)
    chosen, inputs, t_features = _extract(loaded, texts, settings, layers, batch_size, progress, store)
    t0 = time.perf_counter()
    k_used = usable_folds(y, folds)  # warns the caller once when the smaller set is below ``folds``
    table, cps, probes = _fit_layers(inputs, y, chosen, training, k_used, progress)
    seconds = {"features": round(t_features, 3), "fitting": round(time.perf_counter() - t0, 3)}
    meta = _training_meta(loaded, settings, chosen, inputs, sets, texts, y, training, k_used, table, started, seconds)
    save_trained(final, overwrite, cps, probes, table, meta)
    return TrainedDetector(table=table, detectors=cps, probes=probes, meta={**meta, "detector": "cp"}, path=final)


@dataclass(frozen=True)
class _Training:
    """The detector and cross-validation settings of a training run, checked when made."""

    rank: int
    C: float
    max_iter: int
    folds: int
    seed: int
    n_bootstrap: int
    threshold: float
    flag_on: Kind

    def __post_init__(self) -> None:
        check_flag_on(self.flag_on)
        check_threshold(self.threshold, "an AUROC")
        check_cp_params(self.rank, self.C, self.max_iter)
        check_folds(self.folds)
        check_n_bootstrap(self.n_bootstrap)


def _labelled(
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


def _extract(
    loaded: LoadedModel,
    texts: list[str],
    settings: Mapping[str, Any],
    layers: str | Sequence[int] | None,
    batch_size: int,
    progress: ProgressFn | None,
    store: str | os.PathLike[str] | None,
) -> tuple[tuple[int, ...], DetectorInputs, float]:
    """The chosen layers, the detectors' inputs at them, and the seconds their extraction took."""
    chosen = loaded.check_layers(layers if layers is None or isinstance(layers, str) else list(layers))
    t0 = time.perf_counter()
    inputs = detector_inputs(
        loaded, texts, settings, layers=chosen, batch_size=batch_size, progress=progress, store=store
    )
    return chosen, inputs, time.perf_counter() - t0


def _fit_layers(
    inputs: DetectorInputs,
    y: npt.NDArray[np.int64],
    chosen: Sequence[int],
    training: _Training,
    k_used: int,
    progress: ProgressFn | None,
) -> tuple[pd.DataFrame, dict[int, CPDetector], dict[int, ProbeDetector]]:
    """Per layer, the cross-validated detection table row (over ``k_used`` folds) and the CP and probe detectors
    fitted on all prompts."""
    t = training
    rows: list[pd.DataFrame] = []
    cps: dict[int, CPDetector] = {}
    probes: dict[int, ProbeDetector] = {}
    if progress is not None:
        progress(0, len(chosen), "fitting")
    for i, layer in enumerate(chosen):
        tensor, pooled = inputs.tensors[layer], inputs.pooled[layer]
        rows.append(
            layer_detection_table(
                {layer: tensor},
                {layer: pooled},
                y,
                rank=t.rank,
                k=k_used,
                seed=t.seed,
                threshold=t.threshold,
                flag_on=t.flag_on,
                n_bootstrap=t.n_bootstrap,
                C=t.C,
                max_iter=t.max_iter,
            )
        )
        cps[layer] = CPDetector(rank=t.rank, seed=t.seed, C=t.C, max_iter=t.max_iter).fit(tensor, y)
        probes[layer] = ProbeDetector(C=t.C).fit(pooled, y)
        if progress is not None:
            progress(i + 1, len(chosen), "fitting")
    table = pd.concat(rows, ignore_index=True)
    table.attrs.update(rows[0].attrs, k=t.folds, k_used=k_used)
    return table, cps, probes


def _training_meta(
    loaded: LoadedModel,
    settings: Mapping[str, Any],
    chosen: Sequence[int],
    inputs: DetectorInputs,
    sets: Mapping[str, PromptSet],
    texts: Sequence[str],
    y: npt.NDArray[np.int64],
    training: _Training,
    k_used: int,
    table: pd.DataFrame,
    started: str,
    seconds: Mapping[str, float],
) -> dict[str, Any]:
    """The ``meta`` of a trained detector (see :mod:`attnscan.detect.store`): model, features, prompt sets,
    training settings, best and flagged layers, timing."""
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
            "folds_used": k_used,
            "seed": t.seed,
            "n_bootstrap": t.n_bootstrap,
            "threshold": t.threshold,
            "flag_on": t.flag_on,
            "tokens_min": int(inputs.lengths.min()),
            "tokens_max": int(inputs.lengths.max()),
            "tokens_mean": float(inputs.lengths.mean()),
        },
        "best_layer": best_layer(table, by=f"{t.flag_on}_auroc"),
        "best_by": f"{t.flag_on}_auroc",
        "flagged_layers": flagged_layers(table),
        "started": started,
        "finished": now_utc(),
        "seconds": dict(seconds),
    }


# --------------------------------------------------------------------------------------------------- score / eval


def score_prompts(
    detector_dir: str | os.PathLike[str] | TrainedDetector,
    prompts: PromptSource,
    *,
    model: str | LoadedModel | None = None,
    layer: int | None = None,
    kind: Kind | None = None,
    threshold: float = 0.5,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    allow_other_model: bool = False,
    dtype: str | None = None,
    load: LoadOptions | None = None,
    **keywords: Any,
) -> pd.DataFrame:
    """Jailbreak probability of each prompt from a trained detector.

    The model recorded in the detector is loaded unless ``model`` (a spec or LoadedModel) is given (see
    :func:`~attnscan.detect.store.check_model`), in ``dtype`` (default ``None``: the dtype of training,
    ``meta["features"]["dtype"]``, unless ``load`` asks for another; a model running in another dtype gets a
    warning, since its features and so its scores shift). ``load`` (:class:`~attnscan.models.loading.LoadOptions`;
    its fields may also be given as keywords: ``device``, ``trust_remote_code``, ``allow_pickle`` ...) says how a
    spec is loaded. The features are computed with the detector's recorded settings at one ``layer`` (default: the
    detector's best layer) and scored by its ``kind`` detector (default: the primary one, ``cp`` unless trained
    with ``flag_on="probe"``).

    Returns one row per prompt, in input order, with columns ``index`` (0-based position in ``prompts``),
    ``preview`` (:func:`~attnscan.detect.store.preview` of the text), ``n_tokens`` (tokens the model read, chat
    template included, after truncation), ``layer``, ``detector`` (``cp`` or ``probe``), ``prob`` (probability of
    jailbreak, float in [0, 1]) and ``flagged`` (``prob >= threshold``). ``frame.attrs`` records the detector, the
    model and its ``dtype``, and the prompt set.
    """
    load = take_options(LoadOptions, load, keywords)
    refuse_leftovers("score_prompts", keywords)
    trained = detector_dir if isinstance(detector_dir, TrainedDetector) else load_trained(detector_dir)
    chosen_kind: Kind = kind or trained.primary
    chosen = trained.best_layer if layer is None else int(layer)
    det = trained.detector(chosen, chosen_kind)
    check_threshold(threshold, "a probability")
    ps = as_prompt_set(prompts, "prompts")
    loaded = scoring_model(model, trained.meta, load, dtype=dtype, allow_other_model=allow_other_model)
    inputs = detector_inputs(
        loaded, ps, trained.meta["features"], layers=[chosen], batch_size=batch_size, progress=progress
    )
    x = inputs.tensors[chosen] if chosen_kind == "cp" else inputs.pooled[chosen]
    prob = det.predict_proba(x)
    frame = pd.DataFrame(
        {
            "index": np.arange(len(ps), dtype=np.int64),
            "preview": [preview(t) for t in ps.texts],
            "n_tokens": inputs.lengths,
            "layer": chosen,
            "detector": chosen_kind,
            "prob": prob,
            "flagged": prob >= threshold,
        }
    )
    frame.attrs.update(
        detector=str(trained.path) if trained.path else None,
        layer=chosen,
        kind=chosen_kind,
        threshold=threshold,
        model=loaded.spec,
        dtype=str(loaded.dtype).removeprefix("torch."),
        prompts=ps.provenance(),
    )
    return frame


def evaluate_detector(
    detector_dir: str | os.PathLike[str] | TrainedDetector,
    benign: PromptSource,
    jailbreak: PromptSource,
    *,
    model: str | LoadedModel | None = None,
    layers: str | Sequence[int] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    allow_other_model: bool = False,
    dtype: str | None = None,
    load: LoadOptions | None = None,
    **keywords: Any,
) -> pd.DataFrame:
    """Score a new labelled dataset with the saved detectors (no refitting): the generalisation test.

    For every chosen layer (default: all the detector holds) both saved detectors score the benign (0) and
    jailbreak (1) prompts, whose features are computed with the detector's recorded settings. Returns one row per
    layer with ``layer``, ``n``, ``n_jailbreak``, then for ``p`` in ``cp``/``probe``: ``p_auroc`` with its 95 %
    bootstrap interval ``p_auroc_low``/``p_auroc_high``, ``p_f1`` and ``p_accuracy`` (``prob >= threshold``
    predicts jailbreak), ``p_tpr1``/``p_tpr5`` (TPR at 1 %/5 % FPR) with ``p_tpr5_low``/``p_tpr5_high`` — the
    definitions of :func:`attnscan.detect.metrics.metrics` and :func:`attnscan.detect.metrics.cross_validate`
    (intervals resample prompts within each class, ``n_bootstrap`` times with ``seed``) — and, from training,
    ``cv_cp_auroc``, ``cv_probe_auroc`` and ``cv_flagged``. Warns when evaluation prompts were among the training
    prompts.

    The model is found and loaded as in :func:`score_prompts` (``dtype=None`` means the dtype of training).
    """
    load = take_options(LoadOptions, load, keywords)
    refuse_leftovers("evaluate_detector", keywords)
    trained = detector_dir if isinstance(detector_dir, TrainedDetector) else load_trained(detector_dir)
    chosen = trained.check_layers(layers)
    check_n_bootstrap(n_bootstrap)
    check_threshold(threshold, "a probability")
    sets, texts, y = _labelled(benign, jailbreak)
    overlap = _warn_overlap(trained, texts)
    loaded = scoring_model(model, trained.meta, load, dtype=dtype, allow_other_model=allow_other_model)
    inputs = detector_inputs(
        loaded, texts, trained.meta["features"], layers=chosen, batch_size=batch_size, progress=progress
    )
    cv = trained.table.set_index("layer") if "layer" in trained.table.columns else pd.DataFrame()
    rows = [_evaluation_row(trained, layer, inputs, y, cv, threshold, n_bootstrap, seed) for layer in chosen]
    frame = pd.DataFrame(rows)
    frame.attrs.update(
        detector=str(trained.path) if trained.path else None,
        model=loaded.spec,
        dtype=str(loaded.dtype).removeprefix("torch."),
        sets=[{**ps.provenance(), "role": name} for name, ps in sets.items()],
        n_bootstrap=n_bootstrap,
        seed=seed,
        threshold=threshold,
        train_overlap=overlap,
    )
    return frame


def _warn_overlap(trained: TrainedDetector, texts: Sequence[str]) -> int:
    """How many of ``texts`` were training prompts (by hash); warns the caller's caller when any were."""
    seen = set(trained.meta.get("train_prompt_hashes", []))
    overlap = sum(1 for t in texts if prompt_hash(t) in seen)
    if overlap:
        warnings.warn(
            f"{overlap} of the {len(texts)} evaluation prompts were used in training: the metrics are not a "
            "held-out test",
            UserWarning,
            stacklevel=3,
        )
    return overlap


def _evaluation_row(
    trained: TrainedDetector,
    layer: int,
    inputs: DetectorInputs,
    y: npt.NDArray[np.int64],
    cv: pd.DataFrame,
    threshold: float,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """One layer's row of :func:`evaluate_detector`: both saved detectors' metrics with bootstrap intervals, and
    the layer's cross-validated AUROCs and flag from training (``cv``: the training table indexed by layer)."""
    row: dict[str, Any] = {"layer": layer, "n": int(y.size), "n_jailbreak": int(y.sum())}
    pairs: tuple[tuple[Kind, npt.NDArray[Any]], ...] = (
        ("cp", inputs.tensors[layer]),
        ("probe", inputs.pooled[layer]),
    )
    for kind_name, x in pairs:
        prob = trained.detector(layer, kind_name).predict_proba(x)
        m = metrics(y, prob, threshold=threshold)
        (auc_lo, auc_hi), (tpr_lo, tpr_hi) = bootstrap_intervals(y, prob, n_bootstrap, seed)
        m.update(auroc_low=auc_lo, auroc_high=auc_hi, tpr5_low=tpr_lo, tpr5_high=tpr_hi)
        row.update({f"{kind_name}_{name}": m[name] for name in METRIC_COLUMNS})
    for col in ("cp_auroc", "probe_auroc", "flagged"):
        row[f"cv_{col}"] = cv.at[layer, col] if layer in cv.index and col in cv.columns else np.nan
    return row
