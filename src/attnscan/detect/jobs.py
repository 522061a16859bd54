"""Train, apply and evaluate per-layer jailbreak detectors on a model's internals.

The library twin of ``attnscan detect train|score|eval``. :mod:`attnscan.detect` holds the detectors and metrics
on plain arrays; this module runs the model to get those arrays, and keeps the detectors with everything needed to
compute the same arrays again for new prompts.

Features (``features=``)
------------------------
- ``"hidden"`` (default; :func:`attnscan.features.extract_features`): for each layer, the residual stream at the
  prompt's last ``last_k`` tokens, ``float [N, K, H]`` (prompts x tokens x hidden features) for the CP detector, and
  its mean over all the prompt's tokens, ``float [N, H]``, for the probe.
- ``"attention"`` (:func:`attention_blocks`): for each layer, the per-prompt summary the attention capture keeps
  (:class:`attnscan.accumulate.GridCollector`, the engine behind :func:`attnscan.scan`): the mean of
  ``ln(max(p, e^floor))`` of the head-averaged attention over each of ``blocks x blocks`` coarse blocks of the
  ``length x length`` token grid, ``float [N, B, B]`` (prompts x query blocks x key blocks) for the CP detector,
  and its row-major flattening ``float [N, B·B]`` for the probe. The default ``align="relative"`` stretches every
  prompt over the whole grid, so a cell is empty only above the causal diagonal, where attention is exactly zero;
  empty cells (NaN in the capture) are filled with ``floor`` (default −10), i.e. read as "no attention". With
  ``align="absolute"`` the cells past a prompt's length are filled the same way, which makes the features encode
  prompt length: use it knowingly.

Detector directory (``train_detector(out=DIR)``; written atomically: complete or absent)
--------------------------------------------------------------------------------------------
- ``detector.safetensors`` + ``detector.json``: the per-layer :class:`~attnscan.detect.CPDetector` s, fitted on
  all training prompts, in :func:`attnscan.detect.save_detector`'s format (``load_detector(DIR)`` reads them). The
  JSON's ``meta`` records how the features were made (``model``, ``features``), the prompt sets (``sets``, with a
  short hash per training prompt in ``train_prompt_hashes``), the cross-validation settings (``training``),
  ``best_layer``, ``flagged_layers`` and ``primary`` (the detector kind that scores by default: ``flag_on``).
- ``probe/detector.safetensors`` + ``probe/detector.json``: the per-layer :class:`~attnscan.detect.ProbeDetector`
  baselines, same format and meta.
- ``detection.csv``: :func:`attnscan.detect.layer_detection_table` — cross-validated (out-of-fold) metrics per
  layer with bootstrap intervals and the ``flagged`` column.

Scoring and evaluation load the model recorded in ``meta["model"]`` unless one is given, in the dtype the training
features were computed in unless another is asked for (which warns), and compute the features with the recorded
settings (only the layers asked for). A model other than the training one is refused (see
:func:`check_model`) unless ``allow_other_model=True``, which warns instead: a detector reads one model's
internals and its scores mean nothing on another's.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from .._io import atomic_dir, atomic_file, check_output_dir, now_utc
from .._types import ProgressFn
from ..engine.accumulate import DEFAULT_FLOOR, Align, check_align, check_floor
from ..engine.hidden import DEFAULT_LAST_K, extract_features
from ..errors import AttnscanError
from ..models.loading import LoadedModel, load_model
from ..prompts.encoding import DEFAULT_LENGTH, Truncate, check_truncate, encode, warn_truncated
from ..prompts.sets import PromptSet, PromptSource, as_prompt_set
from .detectors import CPDetector, Detector, ProbeDetector
from .metrics import (
    METRIC_COLUMNS,
    best_layer,
    bootstrap_intervals,
    flagged_layers,
    layer_detection_table,
    metrics,
    usable_folds,
)
from .store import META_FILE, STATE_FILE, load_detector, save_detector

__all__ = [
    "DETECTION_CSV",
    "PROBE_DIR",
    "AttentionBlocks",
    "DetectorInputs",
    "TrainedDetector",
    "attention_blocks",
    "check_detector_dir",
    "check_model",
    "check_output_file",
    "detector_inputs",
    "evaluate_detector",
    "load_trained",
    "preview",
    "score_prompts",
    "train_detector",
    "write_table",
]

"""``progress(done, total, label)``: ``label`` is ``"features"``/``"attention"`` (prompts) or ``"fitting"`` (layers)."""
FeatureKind = Literal["hidden", "attention"]
Kind = Literal["cp", "probe"]

DEFAULT_BLOCKS = 16
DETECTION_CSV = "detection.csv"
PROBE_DIR = "probe"
JOB_FORMAT = "attnscan.detect-job"
JOB_VERSION = 1
PREVIEW_WIDTH = 60


# --------------------------------------------------------------------------------------------------- features


@dataclass
class AttentionBlocks:
    """Per-prompt attention block summaries: ``blocks[layer]`` ``float32 [N, B, B]`` (NaN where the prompt reaches
    no cell of the block), ``lengths`` ``int64 [N]`` tokens per prompt after truncation, ``chat_template`` whether
    the template was applied."""

    blocks: dict[int, npt.NDArray[np.float32]]
    lengths: npt.NDArray[np.int64]
    chat_template: bool


def attention_blocks(
    loaded: LoadedModel,
    texts: Sequence[str] | PromptSet,
    *,
    layers: str | Sequence[int] | None = None,
    length: int = DEFAULT_LENGTH,
    blocks: int = DEFAULT_BLOCKS,
    align: Align = "relative",
    floor: float = DEFAULT_FLOOR,
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
    truncate: Truncate = "tail",
    progress: ProgressFn | None = None,
) -> AttentionBlocks:
    """The per-prompt ``blocks`` summary of the attention capture for one list of prompts.

    Runs the same capture engine and collector as :func:`attnscan.scan` (one set, no statistics), so
    ``attention_blocks(m, texts, ...).blocks[L]`` equals ``scan(m, texts, ...).sets["benign"].blocks[:, i]`` for the
    same settings (``summary_blocks=blocks``). Returns ``blocks[L]`` ``float32 [N, B, B]``: per prompt, the mean of
    ``ln(max(p, e^floor))`` over the grid cells of each block it reaches, NaN where it reaches none.
    """
    from ..engine.accumulate import GridCollector
    from ..engine.batching import pad_token_id, run_collect

    prompt_texts = list(texts.texts if isinstance(texts, PromptSet) else texts)
    if not prompt_texts:
        raise AttnscanError("no prompts to capture attention from: give at least one prompt")
    if blocks < 1 or blocks > length:
        raise AttnscanError(f"blocks must lie in 1..length ({length}), got {blocks}")
    check_align(align)
    check_floor(floor)
    if batch_size < 1:
        raise AttnscanError(f"batch size must be at least 1, got {batch_size}")
    chosen = loaded.check_layers(layers if layers is None or isinstance(layers, str) else list(layers))
    enc = encode(
        loaded.tokenizer,
        prompt_texts,
        length,
        chat_template=chat_template,
        system_prompt=system_prompt,
        truncate=truncate,
    )
    warn_truncated(enc, length, truncate)
    n = len(enc.ids)
    collector = GridCollector(
        "prompts", chosen, n, length, floor=floor, n_blocks=blocks, device=loaded.device, align=align
    )
    done = 0

    def on_batch(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, n, "attention")

    if progress is not None:
        progress(0, n, "attention")
    run_collect(
        loaded.model,
        enc.ids,
        collector,
        route=loaded.arch.route,
        pad_id=pad_token_id(loaded.tokenizer, loaded.model),
        batch_size=batch_size,
        on_batch=on_batch,
    )
    acc = collector.result()
    out = {layer: acc.blocks[:, i].numpy().astype(np.float32) for i, layer in enumerate(chosen)}
    return AttentionBlocks(blocks=out, lengths=acc.lengths.numpy().astype(np.int64), chat_template=enc.chat_template)


@dataclass
class DetectorInputs:
    """What the detectors read, per layer: ``tensors[L]`` ``float [N, K, H]`` (hidden) or ``[N, B, B]``
    (attention) for the CP detector, ``pooled[L]`` ``float [N, H]`` or ``[N, B·B]`` for the probe; ``lengths``
    ``int64 [N]`` tokens per prompt; ``info`` how they were made."""

    tensors: dict[int, npt.NDArray[Any]]
    pooled: dict[int, npt.NDArray[Any]]
    lengths: npt.NDArray[np.int64]
    info: dict[str, Any] = field(default_factory=dict)


def _feature_settings(
    features: str,
    *,
    last_k: int,
    length: int,
    chat_template: bool,
    system_prompt: str | None,
    truncate: str,
    blocks: int,
    align: str,
    floor: float,
) -> dict[str, Any]:
    """The settings that define the features (checked); stored as ``meta["features"]``."""
    if features not in ("hidden", "attention"):
        raise AttnscanError(f"features must be 'hidden' or 'attention', got {features!r}")
    if length <= 0:
        raise AttnscanError(f"length must be a positive number of tokens, got {length}")
    check_truncate(truncate)
    common = {"kind": features, "length": length, "chat_template": chat_template}
    common.update(system_prompt=system_prompt, truncate=truncate)
    if features == "hidden":
        if last_k < 1:
            raise AttnscanError(f"last_k must be at least 1, got {last_k}")
        return {**common, "last_k": last_k}
    if blocks < 1 or blocks > length:
        raise AttnscanError(f"blocks must lie in 1..length ({length}), got {blocks}")
    check_align(align)
    check_floor(floor)
    return {**common, "blocks": blocks, "align": align, "floor": floor, "fill": floor}


def detector_inputs(
    loaded: LoadedModel,
    texts: Sequence[str] | PromptSet,
    settings: Mapping[str, Any],
    *,
    layers: str | Sequence[int] | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    store: str | os.PathLike[str] | None = None,
) -> DetectorInputs:
    """The detectors' inputs for ``texts`` under feature ``settings`` (a trained detector's ``meta["features"]``).

    ``store`` streams hidden features to a features directory (see :mod:`attnscan.features`); not for attention.
    """
    kind = settings.get("kind")
    if kind == "hidden":
        feats = extract_features(
            loaded,
            texts,
            layers=layers,
            last_k=int(settings["last_k"]),
            length=int(settings["length"]),
            batch_size=batch_size,
            chat_template=bool(settings["chat_template"]),
            system_prompt=settings.get("system_prompt"),
            truncate=settings["truncate"],
            progress=progress,
            store=store,
        )
        info = {"chat_template_applied": bool(feats.info.get("chat_template")), "dtype": feats.info.get("dtype")}
        return DetectorInputs(dict(feats.tensors), dict(feats.pooled), feats.lengths, info)
    if kind == "attention":
        if store is not None:
            raise AttnscanError("store= keeps hidden-state features only: leave it out with features='attention'")
        caught = attention_blocks(
            loaded,
            texts,
            layers=layers,
            length=int(settings["length"]),
            blocks=int(settings["blocks"]),
            align=settings["align"],
            floor=float(settings["floor"]),
            batch_size=batch_size,
            chat_template=bool(settings["chat_template"]),
            system_prompt=settings.get("system_prompt"),
            truncate=settings["truncate"],
            progress=progress,
        )
        fill = float(settings["fill"])
        tensors = {layer: np.where(np.isnan(b), np.float32(fill), b) for layer, b in caught.blocks.items()}
        pooled = {layer: t.reshape(t.shape[0], -1) for layer, t in tensors.items()}
        info = {"chat_template_applied": caught.chat_template, "dtype": str(loaded.dtype).removeprefix("torch.")}
        return DetectorInputs(tensors, pooled, caught.lengths, info)
    raise AttnscanError(f"unknown feature kind {kind!r} in the detector's settings: re-train the detector")


# --------------------------------------------------------------------------------------------------- models


def _model_record(loaded: LoadedModel) -> dict[str, Any]:
    """What ``meta["model"]`` says about the training model: spec, provenance, how to load it again, its shape."""
    record: dict[str, Any] = {"spec": loaded.spec, **loaded.source}
    kind = loaded.source.get("kind")
    if kind == "memory":
        record["load_spec"] = None
    elif kind == "local":
        record["load_spec"] = str(Path(loaded.spec).expanduser().resolve())
    else:
        record["load_spec"] = loaded.spec
    record.update(
        n_layers=loaded.arch.n_layers,
        hidden_size=loaded.arch.hidden_size,
        config_class=loaded.arch.config_class,
        dtype=str(loaded.dtype).removeprefix("torch."),
    )
    return record


def _identity(record: Mapping[str, Any]) -> tuple[str | None, str | None]:
    weights = record.get("gguf_sha256") or record.get("resolved_revision")
    return (record.get("load_spec") or record.get("spec")), (str(weights) if weights else None)


def check_model(trained: Mapping[str, Any], loaded: LoadedModel, *, allow_other_model: bool = False) -> None:
    """Refuse (or, with ``allow_other_model``, warn about) a model other than the one a detector was trained on.

    ``trained`` is the detector's ``meta["model"]``. The models are the same when their weight fingerprints (GGUF
    sha256 or resolved hub commit) agree, or, where either lacks one, when their specs do (local directories
    compared by absolute path). A different layer count or hidden size is always refused.
    """
    here = _model_record(loaded)
    for key, what in (("n_layers", "layers"), ("hidden_size", "hidden size")):
        if trained.get(key) is not None and trained.get(key) != here[key]:
            raise AttnscanError(
                f"the detector was trained on '{trained.get('spec')}' ({trained.get(key)} {what}) but '{loaded.spec}' "
                f"has {here[key]}: use the training model"
            )
    (spec_a, w_a), (spec_b, w_b) = _identity(trained), _identity(here)
    same = w_a == w_b if (w_a and w_b) else spec_a == spec_b
    if same:
        return
    message = (
        f"the detector was trained on '{trained.get('spec')}' but the model given is '{loaded.spec}'; "
        "its scores mean little on another model"
    )
    if not allow_other_model:
        raise AttnscanError(f"{message}: use the training model, or pass allow_other_model=True (--allow-other-model)")
    warnings.warn(message, UserWarning, stacklevel=3)


def _trained_dtype(meta: Mapping[str, Any]) -> str | None:
    """The torch dtype (``"float32"``, ``"bfloat16"``, ...) the detector's training features were computed in:
    ``meta["features"]["dtype"]``, else the training model's ``meta["model"]["dtype"]``; ``None`` if neither is
    recorded."""
    for part in ("features", "model"):
        record = meta.get(part)
        if isinstance(record, Mapping) and record.get("dtype"):
            return str(record["dtype"])
    return None


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
    trained = _trained_dtype(meta)
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


# --------------------------------------------------------------------------------------------------- output


def check_detector_dir(final: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Refuse an output path that cannot take a new detector (before any work is done).

    A missing or empty directory is fine; an existing detector only with ``overwrite``; anything else never.
    """
    check_output_dir(Path(final), overwrite, marker=META_FILE, what="a detector")


def check_output_file(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Refuse an output file path that is a directory, or an existing file without ``overwrite``."""
    final = Path(path)
    if final.is_dir():
        raise AttnscanError(f"{final} is a directory: give a file name such as scores.csv")
    if final.exists() and not overwrite:
        raise AttnscanError(f"{final} already exists: pass --overwrite (overwrite=True) or choose another --out")
    return final


def write_table(frame: pd.DataFrame, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``frame`` as CSV (UTF-8, no index) atomically: a temporary file beside ``path``, then one rename."""
    final = check_output_file(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(final) as tmp:
        frame.to_csv(tmp, index=False, encoding="utf-8")
    return final


def preview(text: str, width: int = PREVIEW_WIDTH) -> str:
    """A one-line preview of a prompt, safe in a CSV cell and a terminal.

    White space runs become one space; characters that are not printable become ``\\uXXXX``; the text is cut to
    ``width`` characters (ending in ``…``); a preview that would start with ``= + - @`` gets a leading ``'`` so
    spreadsheets do not read it as a formula.
    """
    flat = " ".join(text.split())
    flat = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in flat)
    if len(flat) > width:
        flat = flat[: max(width - 1, 0)] + "…"
    if flat[:1] in ("=", "+", "-", "@"):
        flat = "'" + flat
    return flat


def _prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- trained detector


@dataclass
class TrainedDetector:
    """Per-layer detectors from :func:`train_detector` and how they were made.

    ``table``: the cross-validated :func:`~attnscan.detect.layer_detection_table` (one row per layer);
    ``detectors``: ``{layer: CPDetector}`` and ``probes``: ``{layer: ProbeDetector}``, fitted on all training
    prompts; ``meta``: model, feature settings, prompt sets, CV settings, best and flagged layers (see the module
    docstring); ``path``: the detector directory.
    """

    table: pd.DataFrame
    detectors: dict[int, CPDetector]
    probes: dict[int, ProbeDetector]
    meta: dict[str, Any]
    path: Path | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.detectors))

    @property
    def best_layer(self) -> int:
        return int(self.meta["best_layer"])

    @property
    def flagged_layers(self) -> list[int]:
        return [int(x) for x in self.meta.get("flagged_layers", [])]

    @property
    def primary(self) -> Kind:
        return "probe" if self.meta.get("primary") == "probe" else "cp"

    def detector(self, layer: int, kind: Kind | None = None) -> Detector:
        """The ``kind`` detector (default: :attr:`primary`) of ``layer``."""
        kind = kind or self.primary
        if kind not in ("cp", "probe"):
            raise AttnscanError(f"detector kind must be 'cp' or 'probe', got {kind!r}")
        pool: Mapping[int, Detector] = self.detectors if kind == "cp" else self.probes
        if layer not in pool:
            raise AttnscanError(
                f"layer {layer} is not in this detector: it holds layers {_span(self.layers)}; pick one of them"
            )
        return pool[layer]

    def check_layers(self, layers: str | Sequence[int] | None) -> tuple[int, ...]:
        """Resolve ``None``/``"all"``/``"3,7"``/a list against the detector's layers (all must be in it)."""
        from ..models.loading import parse_layers

        if layers is None or (isinstance(layers, str) and layers.strip().lower() in ("", "all")):
            return self.layers
        n_layers = int(self.meta.get("model", {}).get("n_layers") or max(self.layers) + 1)
        chosen = parse_layers(layers if isinstance(layers, str) else list(layers), n_layers)
        missing = [layer for layer in chosen if layer not in self.detectors]
        if missing:
            raise AttnscanError(
                f"layer {missing[0]} is not in this detector: it holds layers {_span(self.layers)}; pick among them "
                "or train on more layers"
            )
        return chosen


def _span(layers: Sequence[int]) -> str:
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(str(x) for x in layers)


def load_trained(path: str | os.PathLike[str]) -> TrainedDetector:
    """Read a detector directory written by :func:`train_detector`."""
    root = Path(path)
    if not root.is_dir():
        raise AttnscanError(f"detector directory not found: {root}: train one with 'attnscan detect train'")
    if not (root / META_FILE).is_file() or not (root / STATE_FILE).is_file():
        raise AttnscanError(
            f"{root} is not a detector directory (no {META_FILE} and {STATE_FILE}): train one with "
            "'attnscan detect train'"
        )
    cp, meta = load_detector(root)
    job = meta.get("job", {})
    if not isinstance(job, dict) or job.get("format") != JOB_FORMAT:
        raise AttnscanError(
            f"{root} holds detectors without feature settings (not written by 'attnscan detect train'): train it "
            "again with 'attnscan detect train'"
        )
    if job.get("version") != JOB_VERSION:
        raise AttnscanError(
            f"{root} was written by detector job version {job.get('version')}; this attnscan reads {JOB_VERSION}: "
            "upgrade attnscan or train again"
        )
    if not (root / PROBE_DIR / META_FILE).is_file():
        raise AttnscanError(f"{root} lacks {PROBE_DIR}/{META_FILE}: the detector is incomplete; train it again")
    probes, _ = load_detector(root / PROBE_DIR)
    if not all(isinstance(d, CPDetector) for d in cp.values()) or not all(
        isinstance(d, ProbeDetector) for d in probes.values()
    ):
        raise AttnscanError(f"{root} mixes detector kinds: train it again with 'attnscan detect train'")
    csv_path = root / DETECTION_CSV
    table = pd.read_csv(csv_path) if csv_path.is_file() else pd.DataFrame()
    return TrainedDetector(
        table=table,
        detectors={k: v for k, v in cp.items() if isinstance(v, CPDetector)},
        probes={k: v for k, v in probes.items() if isinstance(v, ProbeDetector)},
        meta=meta,
        path=root,
    )


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
       folds with ``n_bootstrap`` resamples and ``seed`` (:func:`attnscan.detect.layer_detection_table`); a layer is
       ``flagged`` when its ``flag_on`` AUROC is at least ``threshold``. ``folds`` shrinks, with a warning, to the
       smaller set's size.
    3. Final CP and probe detectors per layer, fitted on all prompts.
    4. ``out`` written atomically (see the module docstring); an existing detector is replaced only with
       ``overwrite``.

    ``model`` is a spec (loaded with ``dtype``, ``device``, ``revision``, ``trust_remote_code``, ``allow_pickle``) or
    a :class:`~attnscan.models.LoadedModel`; ``benign``/``jailbreak`` are prompt sources or PromptSets (each needs
    at least 2 prompts). ``progress(done, total, label)`` is told about extraction (prompts) and fitting (layers).
    """
    started = now_utc()
    settings = _feature_settings(
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
    if flag_on not in ("cp", "probe"):
        raise AttnscanError(f"flag_on must be 'cp' or 'probe', got {flag_on!r}")
    if not 0.0 <= threshold <= 1.0:
        raise AttnscanError(f"threshold must be an AUROC in [0, 1], got {threshold}")
    if int(rank) != rank or rank < 1:
        raise AttnscanError(f"CP rank must be a positive integer, got {rank}")
    if max_iter < 1:
        raise AttnscanError(f"max_iter must be at least 1, got {max_iter}")
    if not C > 0:
        raise AttnscanError(f"C must be positive, got {C}")
    if folds < 2:
        raise AttnscanError(f"cross-validation needs at least 2 folds, got {folds}")
    if n_bootstrap < 0:
        raise AttnscanError(f"n_bootstrap must be 0 or more, got {n_bootstrap}")
    if batch_size < 1:
        raise AttnscanError(f"batch size must be at least 1, got {batch_size}")
    if store is not None and features != "hidden":
        raise AttnscanError("store= keeps hidden-state features only: leave it out with features='attention'")
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
        "model": _model_record(loaded),
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
    if not 0.0 <= threshold <= 1.0:
        raise AttnscanError(f"threshold must be a probability in [0, 1], got {threshold}")
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
    definitions of :func:`attnscan.detect.metrics` and :func:`attnscan.detect.cross_validate` (intervals resample
    prompts within each class, ``n_bootstrap`` times with ``seed``) — and, from training, ``cv_cp_auroc``,
    ``cv_probe_auroc`` and ``cv_flagged``. Warns when evaluation prompts were among the training prompts.

    The model is found and loaded as in :func:`score_prompts` (``dtype=None`` means the dtype of training).
    """
    trained = detector_dir if isinstance(detector_dir, TrainedDetector) else load_trained(detector_dir)
    chosen = trained.check_layers(layers)
    if n_bootstrap < 0:
        raise AttnscanError(f"n_bootstrap must be 0 or more, got {n_bootstrap}")
    if not 0.0 <= threshold <= 1.0:
        raise AttnscanError(f"threshold must be a probability in [0, 1], got {threshold}")
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
