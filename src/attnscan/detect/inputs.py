"""What the detectors read: per-layer features of a model for a list of prompts.

Features (``features=``)
------------------------
- ``"hidden"`` (default; :func:`attnscan.engine.hidden.extract_features`): for each layer, the residual stream at the
  prompt's last ``last_k`` tokens, ``float [N, K, H]`` (prompts x tokens x hidden features) for the CP detector, and
  one vector per prompt, ``float [N, H]``, for the probe: the residual stream pooled by ``pool``
  (:data:`~attnscan.engine.features.POOLS`): ``"mean"`` over all the prompt's tokens (chat template included),
  ``"request"`` over its request's tokens (the whole prompt text's where the request's span is unknown, see
  :mod:`attnscan.engine.spans`), or ``"last"`` over its last ``last_k`` tokens.
- ``"attention"`` (:func:`attention_blocks`): for each layer, the per-prompt summary the attention capture keeps
  (:class:`attnscan.engine.accumulate.GridCollector`, the engine behind :func:`attnscan.scan`): the mean of
  ``ln(max(p, e^floor))`` of the head-averaged attention over each of ``blocks x blocks`` coarse blocks of the
  ``length x length`` token grid, ``float [N, B, B]`` (prompts x query blocks x key blocks) for the CP detector,
  and its row-major flattening ``float [N, B·B]`` for the probe. The default ``align="relative"`` stretches every
  prompt over the whole grid, so a cell is empty only above the causal diagonal, where attention is exactly zero;
  empty cells (NaN in the capture) are filled with ``floor`` (default −10), i.e. read as "no attention". With
  ``align="absolute"`` the cells past a prompt's length are filled the same way, which makes the features encode
  prompt length: use it knowingly.

:func:`feature_settings` checks and records these settings (a trained detector's ``meta["features"]``; ``pool`` is
recorded only when it is not ``"mean"``, and a record without it means ``"mean"``, the only pooling before there
were others); :func:`detector_inputs` computes the features under them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .._types import DEFAULT_FLOOR, ProgressFn
from ..engine.accumulate import Align, check_align, check_floor
from ..engine.batching import check_batch_size
from ..engine.features import check_pool
from ..engine.hidden import CharSpans, extract_features
from ..errors import AttnscanError
from ..models.loading import LoadedModel
from ..prompts.encoding import DEFAULT_LENGTH, Truncate, check_truncate, encode, warn_truncated
from ..prompts.sets import PromptSet

__all__ = [
    "DEFAULT_BLOCKS",
    "DEFAULT_POOL",
    "AttentionBlocks",
    "DetectorInputs",
    "FeatureKind",
    "attention_blocks",
    "check_store",
    "detector_inputs",
    "feature_settings",
]

FeatureKind = Literal["hidden", "attention"]

#: The probe's pooling of hidden states unless told otherwise: picked by measurement (``bench/detect_features.py``;
#: the numbers are in ``bench/README.md``).
DEFAULT_POOL = "last"

DEFAULT_BLOCKS = 16


@dataclass
class AttentionBlocks:
    """Per-prompt attention block summaries: ``blocks[layer]`` ``float32 [N, B, B]`` (NaN where the prompt reaches
    no cell of the block), ``lengths`` ``int64 [N]`` tokens per prompt after truncation, ``chat_template`` whether
    the template was applied."""

    blocks: dict[int, npt.NDArray[np.float32]]
    lengths: npt.NDArray[np.int64]
    chat_template: bool


def check_store(features: str, store: str | os.PathLike[str] | None) -> None:
    """Refuse a features directory (``store``) for features other than hidden states."""
    if store is not None and features != "hidden":
        raise AttnscanError("store= keeps hidden-state features only: leave it out with features='attention'")


def _check_blocks(blocks: int, length: int) -> None:
    if blocks < 1 or blocks > length:
        raise AttnscanError(f"blocks must lie in 1..length ({length}), got {blocks}")


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
    _check_blocks(blocks, length)
    check_align(align)
    check_floor(floor)
    check_batch_size(batch_size)
    chosen = loaded.check_layers(layers)
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


def feature_settings(
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
    pool: str | None = None,
) -> dict[str, Any]:
    """The settings that define the features (checked); stored as ``meta["features"]``. ``pool`` (hidden features
    only) defaults to :data:`DEFAULT_POOL`."""
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
        pool = DEFAULT_POOL if pool is None else pool
        check_pool(pool)
        return {**common, "last_k": last_k, **({"pool": pool} if pool != "mean" else {})}
    if pool is not None:
        raise AttnscanError(f"pool={pool!r} pools hidden states: leave it out with attention features")
    _check_blocks(blocks, length)
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
    info: Mapping[str, Any] | None = None,
    spans: CharSpans | None = None,
) -> DetectorInputs:
    """The detectors' inputs for ``texts`` under feature ``settings`` (a trained detector's ``meta["features"]``).

    ``store`` streams hidden features to a features directory (see :mod:`attnscan.engine.hidden`), whose
    ``features.json`` also records ``info`` (e.g. the prompts' ``groups``); neither is for attention. ``spans``:
    each prompt's request as a character span (``None`` where unknown; default: a PromptSet's own), for
    ``pool="request"``, which warns when truncation cut requests out or their tokens could not be found.
    """
    kind = settings.get("kind")
    if kind == "hidden":
        pool = str(settings.get("pool", "mean"))
        check_pool(pool)
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
            info=info,
            spans=spans,
        )
        made = {"chat_template_applied": bool(feats.info.get("chat_template")), "dtype": feats.info.get("dtype")}
        if pool == "request":
            made["request_tokens"] = _request_counts(feats.info, settings.get("request_tokens"))
        return DetectorInputs(dict(feats.tensors), feats.pool(pool), feats.lengths, made)
    if kind == "attention":
        check_store(kind, store)
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
        made = {"chat_template_applied": caught.chat_template, "dtype": str(loaded.dtype).removeprefix("torch.")}
        return DetectorInputs(tensors, pooled, caught.lengths, made)
    raise AttnscanError(f"unknown feature kind {kind!r} in the detector's settings: re-train the detector")


def _request_counts(info: Mapping[str, Any], trained: Mapping[str, int] | None) -> dict[str, int]:
    """How many prompts each request-span source covered (:mod:`attnscan.engine.spans`); warns when truncation cut
    requests out or their tokens could not be found (those prompts are pooled over other tokens), and when a
    detector trained on request spans (``trained``: its training counts) scores prompts without any."""
    counts = {str(k): int(v) for k, v in info.get("request_pooling", {}).get("counts", {}).items()}
    parts = []
    if trained and trained.get("request", 0) and counts.get("prompt"):
        parts.append(
            f"{counts['prompt']} prompts carry no request span and are pooled over their whole text; the detector "
            "learned wrapped prompts from their requests' tokens alone, so its training numbers do not hold for "
            "wrapped prompts without a span (fine for bare requests)"
        )
    if counts.get("prompt-cut"):
        parts.append(
            f"{counts['prompt-cut']} prompts lost their request to truncation and are pooled over their kept text "
            "(raise --length)"
        )
    if counts.get("all"):
        parts.append(
            f"{counts['all']} prompts' tokens could not be matched to their text (the tokenizer gives no character "
            "offsets, or the chat template changes the text) and are pooled over all their tokens"
        )
    if parts:
        warnings.warn(f"request pooling: {'; '.join(parts)}", UserWarning, stacklevel=4)
    return counts
