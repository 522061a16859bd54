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

import hashlib
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from .._io import atomic_dir, now_utc
from .._types import ProgressFn
from ..engine.accumulate import DEFAULT_FLOOR, Align
from ..engine.hidden import DEFAULT_LAST_K
from ..errors import AttnscanError
from ..models.loading import LoadedModel, load_model
from ..prompts.encoding import DEFAULT_LENGTH, Truncate
from ..prompts.sets import PromptSource, as_prompt_set
from .detectors import CPDetector, Kind, ProbeDetector, check_cp_params
from .inputs import DEFAULT_BLOCKS, FeatureKind, check_batch_size, check_store, detector_inputs, feature_settings
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
    DETECTION_CSV,
    JOB_FORMAT,
    JOB_VERSION,
    META_FILE,
    PROBE_DIR,
    STATE_FILE,
    TrainedDetector,
    check_detector_dir,
    check_model,
    load_trained,
    model_record,
    preview,
    save_detector,
    trained_dtype,
)

__all__ = [
    "evaluate_detector",
    "score_prompts",
    "train_detector",
]


def _get_model(
    model: str | LoadedModel | None,
    meta: Mapping[str, Any],
    *,
    allow_other_model: bool,
    dtype: str | None,
    device: str,
    trust_remote_code: bool,
    allow_pickle: bool,
) -> LoadedModel:
    """The model to score with (``model``, else the recorded one), loaded in ``dtype`` (``None``: the training
    dtype, see :func:`_trained_dtype`), checked against the training model; warns when it runs in another dtype
    than training, since the features, and so the scores, shift with the precision."""
    from ..models.loading import DTYPES

    record = meta.get("model", {})
    trained = trained_dtype(meta)
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        if dtype is None:
            dtype = trained if trained is not None and trained in DTYPES else "auto"
        spec = model if model is not None else record.get("load_spec")
        if not spec:
            raise AttnscanError(
                f"the detector was trained on an in-memory model ('{record.get('spec')}') that cannot be loaded "
                "again: pass the model (model=... or --model)"
            )
        revision = None
        if model is None and record.get("kind") == "hub":
            revision = record.get("resolved_revision") or record.get("revision")
        loaded = load_model(
            str(spec),
            dtype=dtype,
            device=device,
            revision=revision,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
        )
    check_model(record, loaded, allow_other_model=allow_other_model)
    here = str(loaded.dtype).removeprefix("torch.")
    if trained is not None and here != trained:
        warnings.warn(
            f"the detector was trained on {trained} features but the model runs in {here}: scores may differ from "
            f"training; load it in {trained} (what leaving out dtype / --dtype does)",
            UserWarning,
            stacklevel=3,
        )
    return loaded


def _load(
    model: str | LoadedModel,
    *,
    dtype: str,
    device: str,
    revision: str | None,
    trust_remote_code: bool,
    allow_pickle: bool,
) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    return load_model(
        model,
        dtype=dtype,
        device=device,
        revision=revision,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )


def _prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


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
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> TrainedDetector:
    """Train per-layer jailbreak detectors on ``model``'s internals and write them to the directory ``out``.

    1. Features of the benign (label 0) then jailbreak (label 1) prompts at ``layers`` (``features``: see the module
       docstring; ``last_k``, ``length``, ``chat_template``, ``system_prompt``, ``truncate`` for both kinds,
       ``blocks``, ``align``, ``floor`` for attention; ``store`` streams hidden features to disk).
    2. Per layer, cross-validated CP (``rank``, ``max_iter``, ``C``) and probe metrics over ``folds`` stratified
       folds with ``n_bootstrap`` resamples and ``seed`` (:func:`attnscan.detect.metrics.layer_detection_table`); a
       layer is ``flagged`` when its ``flag_on`` AUROC is at least ``threshold``. ``folds`` shrinks, with a warning,
       to the smaller set's size.
    3. Final CP and probe detectors per layer, fitted on all prompts.
    4. ``out`` written atomically (see the module docstring); an existing detector is replaced only with
       ``overwrite``.

    ``model`` is a spec (loaded with ``dtype``, ``device``, ``revision``, ``trust_remote_code``, ``allow_pickle``) or
    a :class:`~attnscan.models.LoadedModel`; ``benign``/``jailbreak`` are prompt sources or PromptSets (each needs
    at least 2 prompts). ``progress(done, total, label)`` is told about extraction (prompts) and fitting (layers).
    """
    started = now_utc()
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
    check_flag_on(flag_on)
    check_threshold(threshold, "an AUROC")
    check_cp_params(rank, C, max_iter)
    check_folds(folds)
    check_n_bootstrap(n_bootstrap)
    check_batch_size(batch_size)
    check_store(features, store)
    sets = {"benign": as_prompt_set(benign, "benign"), "jailbreak": as_prompt_set(jailbreak, "jailbreak")}
    for name, ps in sets.items():
        if len(ps) < 2:
            raise AttnscanError(
                f"training needs at least 2 {name} prompts for cross-validation, got {len(ps)} from {ps.source}: "
                "add prompts (or raise --limit)"
            )
    final = Path(out)
    check_detector_dir(final, overwrite)

    loaded = _load(
        model,
        dtype=dtype,
        device=device,
        revision=revision,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    chosen = loaded.check_layers(layers if layers is None or isinstance(layers, str) else list(layers))
    texts = [*sets["benign"].texts, *sets["jailbreak"].texts]
    y = np.asarray([0] * len(sets["benign"]) + [1] * len(sets["jailbreak"]), dtype=np.int64)
    t0 = time.perf_counter()
    inputs = detector_inputs(
        loaded, texts, settings, layers=chosen, batch_size=batch_size, progress=progress, store=store
    )
    t_features = time.perf_counter() - t0

    t0 = time.perf_counter()
    k_used = usable_folds(y, folds)  # warns once when the smaller set is below ``folds``
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
                rank=rank,
                k=k_used,
                seed=seed,
                threshold=threshold,
                flag_on=flag_on,
                n_bootstrap=n_bootstrap,
                C=C,
                max_iter=max_iter,
            )
        )
        cps[layer] = CPDetector(rank=rank, seed=seed, C=C, max_iter=max_iter).fit(tensor, y)
        probes[layer] = ProbeDetector(C=C).fit(pooled, y)
        if progress is not None:
            progress(i + 1, len(chosen), "fitting")
    table = pd.concat(rows, ignore_index=True)
    table.attrs.update(rows[0].attrs, k=folds, k_used=k_used)
    t_fit = time.perf_counter() - t0

    best = best_layer(table, by=f"{flag_on}_auroc")
    meta: dict[str, Any] = {
        "job": {"format": JOB_FORMAT, "version": JOB_VERSION},
        "primary": flag_on,
        "model": model_record(loaded),
        "features": {**settings, "layers": list(chosen), **inputs.info},
        "sets": [
            {**sets["benign"].provenance(), "role": "benign", "label": 0},
            {**sets["jailbreak"].provenance(), "role": "jailbreak", "label": 1},
        ],
        "train_prompt_hashes": sorted({_prompt_hash(t) for t in texts}),
        "training": {
            "n": int(y.size),
            "n_jailbreak": int(y.sum()),
            "rank": rank,
            "C": C,
            "max_iter": max_iter,
            "folds": folds,
            "folds_used": k_used,
            "seed": seed,
            "n_bootstrap": n_bootstrap,
            "threshold": threshold,
            "flag_on": flag_on,
            "tokens_min": int(inputs.lengths.min()),
            "tokens_max": int(inputs.lengths.max()),
            "tokens_mean": float(inputs.lengths.mean()),
        },
        "best_layer": best,
        "best_by": f"{flag_on}_auroc",
        "flagged_layers": flagged_layers(table),
        "started": started,
        "finished": now_utc(),
        "seconds": {"features": round(t_features, 3), "fitting": round(t_fit, 3)},
    }
    with atomic_dir(final, overwrite, marker=META_FILE, what="a detector") as tmp:
        staged = save_detector(tmp / ".cp", cps, {**meta, "detector": "cp"})
        for name in (STATE_FILE, META_FILE):
            os.replace(staged / name, tmp / name)
        staged.rmdir()
        save_detector(tmp / PROBE_DIR, probes, {**meta, "detector": "probe"})
        table.to_csv(tmp / DETECTION_CSV, index=False, float_format="%.6g")
    return TrainedDetector(table=table, detectors=cps, probes=probes, meta={**meta, "detector": "cp"}, path=final)


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
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> pd.DataFrame:
    """Jailbreak probability of each prompt from a trained detector.

    The model recorded in the detector is loaded unless ``model`` (a spec or LoadedModel) is given (see
    :func:`check_model`), in ``dtype`` (default ``None``: the dtype of training, ``meta["features"]["dtype"]``; a
    model running in another dtype gets a warning, since its features and so its scores shift). The features are
    computed with the detector's recorded settings at one ``layer`` (default: the detector's best layer) and scored
    by its ``kind`` detector (default: the primary one, ``cp`` unless trained with ``flag_on="probe"``).

    Returns one row per prompt, in input order, with columns ``index`` (0-based position in ``prompts``),
    ``preview`` (:func:`preview` of the text), ``n_tokens`` (tokens the model read, chat template included, after
    truncation), ``layer``, ``detector`` (``cp`` or ``probe``), ``prob`` (probability of jailbreak, float in
    [0, 1]) and ``flagged`` (``prob >= threshold``). ``frame.attrs`` records the detector, the model and its
    ``dtype``, and the prompt set.
    """
    trained = detector_dir if isinstance(detector_dir, TrainedDetector) else load_trained(detector_dir)
    chosen_kind: Kind = kind or trained.primary
    chosen = trained.best_layer if layer is None else int(layer)
    det = trained.detector(chosen, chosen_kind)
    check_threshold(threshold, "a probability")
    ps = as_prompt_set(prompts, "prompts")
    loaded = _get_model(
        model,
        trained.meta,
        allow_other_model=allow_other_model,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
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
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
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
    trained = detector_dir if isinstance(detector_dir, TrainedDetector) else load_trained(detector_dir)
    chosen = trained.check_layers(layers)
    check_n_bootstrap(n_bootstrap)
    check_threshold(threshold, "a probability")
    sets = {"benign": as_prompt_set(benign, "benign"), "jailbreak": as_prompt_set(jailbreak, "jailbreak")}
    texts = [*sets["benign"].texts, *sets["jailbreak"].texts]
    seen = set(trained.meta.get("train_prompt_hashes", []))
    overlap = sum(1 for t in texts if _prompt_hash(t) in seen)
    if overlap:
        warnings.warn(
            f"{overlap} of the {len(texts)} evaluation prompts were used in training: the metrics are not a "
            "held-out test",
            UserWarning,
            stacklevel=2,
        )
    y = np.asarray([0] * len(sets["benign"]) + [1] * len(sets["jailbreak"]), dtype=np.int64)
    loaded = _get_model(
        model,
        trained.meta,
        allow_other_model=allow_other_model,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    inputs = detector_inputs(
        loaded, texts, trained.meta["features"], layers=chosen, batch_size=batch_size, progress=progress
    )
    cv = trained.table.set_index("layer") if "layer" in trained.table.columns else pd.DataFrame()
    rows: list[dict[str, Any]] = []
    for layer in chosen:
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
        rows.append(row)
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
