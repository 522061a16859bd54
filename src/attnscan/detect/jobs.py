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
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from .._io import now_utc
from .._types import DEFAULT_FLOOR, ProgressFn, refuse_leftovers, take_options
from ..engine.accumulate import Align
from ..engine.batching import check_batch_size
from ..engine.features import Pool
from ..engine.hidden import DEFAULT_LAST_K
from ..models.loading import LoadedModel, LoadOptions, resolve_model
from ..prompts.encoding import DEFAULT_LENGTH, Truncate
from ..prompts.sets import PromptSource, as_prompt_set, join_sets, warn_unmatched_control
from .bands import add_band, band_detection
from .baselines import add_baselines
from .detectors import CPDetector, Kind, ProbeDetector
from .evaluation import eval_codes, flag_threshold, headline, layer_row, text_baseline
from .folds import CvKind
from .inputs import DEFAULT_BLOCKS, DetectorInputs, FeatureKind, check_store, detector_inputs, feature_settings
from .metrics import check_n_bootstrap, check_threshold
from .rates import rate_records, subset_rates
from .stability import rank_stability
from .store import (
    FAMILIES_CSV,
    TrainedDetector,
    check_detector_dir,
    load_trained,
    preview,
    prompt_hash,
    save_trained,
    scoring_model,
)
from .training import (
    CvPlan,
    Fitted,
    Training,
    add_operating_points,
    fit_layers,
    labelled,
    operating_points,
    operating_record,
    plan_cv,
    request_spans,
    train_records,
    training_meta,
)

__all__ = [
    "evaluate_detector",
    "score_prompts",
    "train_detector",
]


# --------------------------------------------------------------------------------------------------- train


# Long (about 110 lines) only in its signature and docstring: every setting is a keyword the command line mirrors;
# the work is in detect.training and detect.baselines.
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
    flag_on: Kind = "probe",
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
    cv: CvKind = "grouped",
    baselines: bool | None = None,
    fpr: float | None = None,
    control: PromptSource | None = None,
    pool: Pool | None = None,
    band: int | None = None,
    load: LoadOptions | None = None,
    **keywords: Any,
) -> TrainedDetector:
    """Train per-layer jailbreak detectors on ``model``'s internals and write them to the directory ``out``.

    1. Features of the benign (label 0) then jailbreak (label 1) prompts at ``layers`` (``features``: see
       :mod:`attnscan.detect.inputs`; ``last_k``, ``length``, ``chat_template``, ``system_prompt``, ``truncate`` for
       both kinds, ``pool`` (the probe's pooling: ``"last"``, the default, ``"request"`` or ``"mean"``) for hidden
       states, ``blocks``, ``align``, ``floor`` for attention; ``store`` streams hidden features to disk).
    2. Per layer, cross-validated CP (``rank``, ``max_iter``, ``C``) and probe metrics over ``folds`` folds with
       ``n_bootstrap`` resamples and ``seed`` (:func:`attnscan.detect.metrics.layer_detection`); a layer is
       ``flagged`` when its ``flag_on`` AUROC is at least ``threshold``. ``cv="grouped"`` (default) holds out
       whole template families and, beside them, whole requests when the prompt sets carry group labels, and falls
       back to stratified folds when they carry none; ``cv="stratified"`` always stratifies (see
       :mod:`attnscan.detect.training`). ``folds`` shrinks, with a warning, to what the classes or groups allow.
       With ``band`` (layers on each side), the band probe on each layer's neighbourhood, on the same folds
       (``band_*`` columns, reported only: :mod:`attnscan.detect.bands`).
    3. With ``baselines`` (default: when the prompts carry group labels), the prompt-length and TF-IDF text
       baselines on the same folds (:mod:`attnscan.detect.baselines`). With ``fpr``, the score threshold at that
       false-positive rate on the benign prompts' out-of-fold scores, per layer, and the TPR there (``*_op_*``
       columns, ``meta["operating_point"]``); :func:`score_prompts` then flags with it. At that threshold, the
       flag rates per attack family and on risky-looking benign prompts, from the best layer's out-of-fold scores
       (:mod:`attnscan.detect.rates`: ``families.csv``, ``meta["families"]``).
    4. Final CP and probe detectors per layer, fitted on all prompts; and the rank stability of the best layer's
       primary detector under resampled training sets (:mod:`attnscan.detect.stability`, ``meta["stability"]``).
    5. ``out`` written atomically (see :mod:`attnscan.detect.store`); an existing detector is replaced only with
       ``overwrite``. The prompts' group labels, when they carry any, go into ``meta["train_groups"]`` (and the
       features directory of ``store``); the prompts themselves into ``train_prompts.jsonl``, for the text
       baseline of :func:`evaluate_detector`.

    ``model`` is a spec, loaded with ``load`` (:class:`~attnscan.models.loading.LoadOptions`; its fields ``dtype``,
    ``device``, ``revision`` ... may also be given as keywords), or a :class:`~attnscan.models.loading.LoadedModel`;
    ``benign``/``jailbreak`` are prompt sources or PromptSets (each needs at least 2 prompts). ``control`` (the
    same jailbreak wrappers around harmless requests, e.g. ``builtin:control``) joins the benign side as
    template-matched negatives, so that only the request inside a wrapper can tell the classes apart; a control set
    that shares no template with the jailbreak set is warned about. The settings are
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
        pool=pool,
    )
    training = Training(rank, C, max_iter, folds, seed, n_bootstrap, threshold, flag_on, cv, fpr, baselines, band)
    check_batch_size(batch_size)
    check_store(features, store)
    if control is not None:
        jailbreak = as_prompt_set(jailbreak, "jailbreak")
        negatives = as_prompt_set(control, "control")
        warn_unmatched_control(jailbreak, negatives)
        benign = join_sets(as_prompt_set(benign, "benign"), negatives, "benign+control")
    sets, texts, y = labelled(benign, jailbreak, for_training=True)
    records = train_records(sets)
    final = Path(out)
    check_detector_dir(final, overwrite)
    plan = plan_cv(y, records, training)  # warns the caller once per cross-validation that needs fewer folds

    loaded = resolve_model(model, load)
    info = {"groups": records} if records is not None else None
    spans = request_spans(sets)
    chosen, inputs, t_features = _extract(loaded, texts, spans, settings, layers, batch_size, progress, store, info)
    t0 = time.perf_counter()
    fitted = fit_layers(inputs, y, chosen, training, plan, progress)
    if band is not None:  # the band probe: reported columns only (detect.bands)
        banded, _ = band_detection(inputs.pooled, y, chosen, band, plan.plans, seed=seed, n_bootstrap=n_bootstrap, C=C)
        fitted.table = add_band(fitted.table, banded)
    meta = training_meta(loaded, settings, chosen, inputs, sets, texts, y, training, plan, fitted.table)
    table, tables = _reported(fitted, training, plan, texts, inputs, y, records, meta)
    meta.update(
        started=started,
        finished=now_utc(),
        seconds={"features": round(t_features, 3), "fitting": round(time.perf_counter() - t0, 3)},
    )
    save_trained(final, overwrite, fitted.cps, fitted.probes, table, meta, tables=tables, prompts=(texts, y))
    return TrainedDetector(
        table=table, detectors=fitted.cps, probes=fitted.probes, meta={**meta, "detector": "cp"}, path=final
    )


def _reported(
    fitted: Fitted,
    training: Training,
    plan: CvPlan,
    texts: Sequence[str],
    inputs: DetectorInputs,
    y: npt.NDArray[np.int64],
    records: list[dict[str, Any]] | None,
    meta: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The detection table with the baseline and operating-point columns asked for, which ``meta`` also gets
    (``baselines``, ``operating_point``), with the prompts' group labels (``train_groups``) when they carry any;
    the rank stability of the chosen layer's detector (``meta["stability"]``); and, with an operating point, the
    flag rates per family and risky benign prompts (``meta["families"]``, and as ``families.csv`` in the tables
    returned beside the detection table)."""
    t, table, best = training, fitted.table, int(meta["best_layer"])
    tables: dict[str, pd.DataFrame] = {}
    if records is not None:
        meta["train_groups"] = records
    if t.baselines or (t.baselines is None and records is not None):
        table, meta["baselines"] = add_baselines(
            table,
            texts,
            inputs.lengths,
            y,
            plan.plans,
            fitted.oof,
            flag_on=t.flag_on,
            best=best,
            n_bootstrap=t.n_bootstrap,
            seed=t.seed,
        )
    if t.fpr is not None:
        points = operating_points(fitted, y, [int(x) for x in table["layer"]], t.fpr)
        table = add_operating_points(table, points)
        meta["operating_point"] = operating_record(points, t.fpr, best, t.flag_on, plan.plans[""].kind)
        oof = fitted.oof[("", t.flag_on, best)]
        tables[FAMILIES_CSV] = subset_rates(y, oof, points[t.flag_on][best][0], records)
        meta["families"] = {
            "layer": best,
            "kind": t.flag_on,
            "threshold": points[t.flag_on][best][0],
            "from": "out-of-fold scores of the training prompts (main folds)",
            "rows": rate_records(tables[FAMILIES_CSV]),
        }
    meta["stability"] = {"layer": best, "kind": t.flag_on, **_stability(inputs, y, best, training, plan)}
    return table, tables


def _stability(
    inputs: DetectorInputs, y: npt.NDArray[np.int64], layer: int, training: Training, plan: CvPlan
) -> dict[str, Any]:
    """:func:`~attnscan.detect.stability.rank_stability` of the primary detector at ``layer`` on the main folds."""
    t = training
    if t.flag_on == "cp":
        return rank_stability(
            lambda: CPDetector(rank=t.rank, seed=t.seed, C=t.C, max_iter=t.max_iter),
            inputs.tensors[layer],
            y,
            plan.plans[""],
            seed=t.seed,
        )
    return rank_stability(lambda: ProbeDetector(C=t.C), inputs.pooled[layer], y, plan.plans[""], seed=t.seed)


def _extract(
    loaded: LoadedModel,
    texts: list[str],
    spans: list[tuple[int, int] | None],
    settings: Mapping[str, Any],
    layers: str | Sequence[int] | None,
    batch_size: int,
    progress: ProgressFn | None,
    store: str | os.PathLike[str] | None,
    info: Mapping[str, Any] | None,
) -> tuple[tuple[int, ...], DetectorInputs, float]:
    """The chosen layers, the detectors' inputs at them, and the seconds their extraction took."""
    chosen = loaded.check_layers(layers)
    t0 = time.perf_counter()
    inputs = detector_inputs(
        loaded,
        texts,
        settings,
        layers=chosen,
        batch_size=batch_size,
        progress=progress,
        store=store,
        info=info,
        spans=spans,
    )
    return chosen, inputs, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------- score / eval


def score_prompts(
    detector_dir: str | os.PathLike[str] | TrainedDetector,
    prompts: PromptSource,
    *,
    model: str | LoadedModel | None = None,
    layer: int | None = None,
    kind: Kind | None = None,
    threshold: float | None = None,
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
    jailbreak, float in [0, 1]) and ``flagged`` (``prob >= threshold``). ``threshold`` defaults to the detector's
    operating point for that layer and kind when it was trained with ``fpr`` (``meta["operating_point"]``), else
    0.5. ``frame.attrs`` records the detector, the model and its ``dtype``, the prompt set, the ``threshold`` and
    where it came from (``threshold_from``: ``"given"``, ``"operating point (fpr=...)"`` or ``"default"``).
    """
    load = take_options(LoadOptions, load, keywords)
    refuse_leftovers("score_prompts", keywords)
    trained = detector_dir if isinstance(detector_dir, TrainedDetector) else load_trained(detector_dir)
    chosen_kind: Kind = kind or trained.primary
    chosen = trained.best_layer if layer is None else int(layer)
    det = trained.detector(chosen, chosen_kind)
    threshold, threshold_from = flag_threshold(trained, chosen, chosen_kind, threshold)
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
        threshold_from=threshold_from,
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

    The detector is judged at the layer and kind training chose (:mod:`attnscan.detect.evaluation`: the headline,
    ``frame.attrs["headline"]``), beside the prompt-length and text baselines on the same prompts (the text one
    fitted on the training prompts), with the flag rates per attack family and on risky-looking benign prompts at
    the saved threshold (``frame.attrs["families"]``: rows of :func:`attnscan.detect.rates.subset_rates`).

    Every chosen layer (default: all the detector holds) also gets a row, for reading, not for choosing a layer on
    these prompts: ``layer``, ``n``, ``n_jailbreak``, ``trained_layer`` (the headline's layer), then for ``p`` in
    ``cp``/``probe``: ``p_auroc`` with its 95 % bootstrap interval ``p_auroc_low``/``p_auroc_high``, ``p_f1`` and
    ``p_accuracy`` (``prob >= threshold`` predicts jailbreak), ``p_tpr1``/``p_tpr5`` (TPR at 1 %/5 % FPR) with
    ``p_tpr5_low``/``p_tpr5_high`` — the definitions of :func:`attnscan.detect.metrics.metrics`; intervals resample
    ``n_bootstrap`` times with ``seed``, whole wrappers when the prompts carry template families or templates —
    then, from training, ``cv_cp_auroc``, ``cv_probe_auroc`` and ``cv_flagged`` (the main, grouped numbers when the
    detector was trained with grouped folds: :attr:`~attnscan.detect.store.TrainedDetector.cv`), and the primary
    detector's ``text_margin`` over the text baseline with ``text_margin_low``/``text_margin_high`` and
    ``beats_text`` (None without a text baseline). Warns when evaluation prompts were among the training prompts.

    The model is found and loaded as in :func:`score_prompts` (``dtype=None`` means the dtype of training).
    """
    load = take_options(LoadOptions, load, keywords)
    refuse_leftovers("evaluate_detector", keywords)
    trained = detector_dir if isinstance(detector_dir, TrainedDetector) else load_trained(detector_dir)
    chosen = trained.check_layers(layers)
    check_n_bootstrap(n_bootstrap)
    check_threshold(threshold, "a probability")
    sets, texts, y = labelled(benign, jailbreak)
    records = train_records(sets)
    overlap = _warn_overlap(trained, texts)
    loaded = scoring_model(model, trained.meta, load, dtype=dtype, allow_other_model=allow_other_model)
    needed = sorted({*chosen, trained.best_layer})
    inputs = detector_inputs(
        loaded,
        texts,
        trained.meta["features"],
        layers=needed,
        batch_size=batch_size,
        progress=progress,
        spans=request_spans(sets),
    )
    text = text_baseline(trained, texts)
    codes = eval_codes(records)
    rows = [
        layer_row(
            trained, layer, inputs, y, threshold=threshold, n_bootstrap=n_bootstrap, seed=seed, codes=codes, text=text
        )
        for layer in chosen
    ]
    frame = pd.DataFrame(rows)
    top, families = headline(
        trained, inputs, y, records, threshold=threshold, n_bootstrap=n_bootstrap, seed=seed, text=text
    )
    frame.attrs.update(
        detector=str(trained.path) if trained.path else None,
        model=loaded.spec,
        dtype=str(loaded.dtype).removeprefix("torch."),
        sets=[{**ps.provenance(), "role": name} for name, ps in sets.items()],
        n_bootstrap=n_bootstrap,
        seed=seed,
        threshold=threshold,
        train_overlap=overlap,
        headline=top,
        families=rate_records(families),
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
