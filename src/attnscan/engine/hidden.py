"""Per-prompt, per-layer hidden-state features for the detectors, extracted with bounded memory.

For every prompt and every chosen decoder layer ``L`` this module keeps three things from the layer's output (the
residual stream after the layer, before any final norm):

- ``tensors[L]``: ``float32 [N, K, H]`` — the hidden states at the prompt's last ``K`` real (non-pad) token
  positions, oldest first. A prompt shorter than ``K`` tokens is left-padded with zeros; :attr:`Features.mask`
  ``bool [N, K]`` says which rows are real.
- ``pooled[L]``: ``float32 [N, H]`` — the mean of the hidden states over all the prompt's real tokens.
- ``request[L]``: ``float32 [N, H]`` — the mean over the tokens of the prompt's *request*: where the prompt knows
  its request's character span (composed prompts, :meth:`attnscan.prompts.sets.PromptSet.request_span`), the
  tokens of that span after the chat template and truncation; where it does not, the tokens of the prompt's own
  text (a bare request is all request), without the chat template's. :mod:`attnscan.engine.spans` maps the spans
  and lists the fallbacks; ``info["request_pooling"]`` records, per prompt, the token span used and what it
  covers, and how many prompts each fallback took.

:meth:`Features.pool <attnscan.engine.features.Features.pool>` gives the per-prompt vectors a probe reads under
each pooling of :data:`~attnscan.engine.features.POOLS`: ``"mean"``, ``"request"`` and ``"last"`` (the mean of the
last-K slab's real rows).

Note the one difference from ``model(..., output_hidden_states=True).hidden_states[L + 1]``: transformers replaces
the *last* entry with the output of the final norm; here the last layer's features are the layer's own output,
like every other layer's.

Memory. A forward hook on each chosen decoder layer reduces the layer's output ``[B, P, H]`` to ``[B, K, H]`` and
two ``[B, H]`` the moment it exists, so no more than one layer's full hidden states are alive at a time. The base
model runs without the LM head, and the forward stops right after the deepest chosen layer. Prompts are batched
longest first with right padding and explicit position ids. With ``store=DIR`` each layer's arrays are written
batch by batch into memory-mapped files on disk instead of RAM.

On disk (:meth:`Features.save`, ``store=``): see :mod:`attnscan.engine.features`. When the prompts carry group
labels (:attr:`attnscan.prompts.sets.PromptSet.groups`), ``info["groups"]`` holds one dict of them per prompt
(``{}`` for the prompts of a set without any); prompts without labels leave it out.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from .._io import atomic_dir
from .._types import ProgressFn
from ..errors import AttnscanError
from ..models.anatomy import base_model, decoder_layers
from ..models.loading import LoadedModel
from ..prompts.encoding import DEFAULT_LENGTH, Encoded, Truncate, check_truncate, encode, warn_truncated
from ..prompts.sets import PromptSet
from .batching import Batches, accepts_position_ids, check_batch_size, pad_token_id
from .features import (
    META_FILE,
    POOLS,
    Features,
    Pool,
    check_pool,
    create_layer_file,
    layer_shapes,
    meta_fields,
    write_meta,
)
from .spans import TokenSpans, request_token_spans

__all__ = [
    "POOLS",
    "Features",
    "Pool",
    "ProgressFn",
    "check_pool",
    "extract_features",
    "labelled_features",
]

"""``progress(done, total, label)``: prompts done so far, their total, and what is running."""

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

DEFAULT_LAST_K = 8

CharSpans = Sequence[tuple[int, int] | None]

# --------------------------------------------------------------------------------------------------- extraction


class _StopForward(Exception):
    """Raised by the deepest chosen layer's hook: nothing after it is needed."""


def _layer_hidden(output: Any) -> torch.Tensor:
    """The hidden states ``[B, P, H]`` a decoder layer returned (a tensor, or the first item of a tuple)."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
        raise AttnscanError(
            f"a decoder layer returned {type(hidden).__name__}, not hidden states [batch, tokens, hidden]: "
            "this architecture is not supported by the feature extractor"
        )
    return hidden


def reduce_hidden(hidden: torch.Tensor, lengths: torch.Tensor, last_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce right-padded hidden states to the last-K slab and the mean over real tokens.

    ``hidden``: ``[B, P, H]`` (row b real at positions ``0 .. lengths[b]-1``); returns ``float32 [B, K, H]``
    (left-padded with zeros for prompts shorter than K) and ``float32 [B, H]``.
    """
    b, p, h = hidden.shape
    lens = lengths.to(hidden.device)
    idx = lens[:, None] - last_k + torch.arange(last_k, device=hidden.device)[None, :]  # [B, K]
    valid = idx >= 0
    gathered = torch.gather(hidden, 1, idx.clamp_min(0)[:, :, None].expand(b, last_k, h)).float()
    tokens = gathered * valid[:, :, None]
    real = (torch.arange(p, device=hidden.device)[None, :] < lens[:, None]).to(torch.float32)  # [B, P]
    pooled = torch.bmm(real[:, None, :], hidden.float()).squeeze(1) / lens[:, None].to(torch.float32)
    return tokens, pooled


def span_mean(hidden: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden [B, P, H]`` over each row's token positions ``spans[b, 0] <= p < spans[b, 1]``
    (``long [B, 2]``, non-empty): ``float32 [B, H]``."""
    span = spans.to(hidden.device)
    pos = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
    inside = ((pos >= span[:, :1]) & (pos < span[:, 1:])).to(torch.float32)  # [B, P]
    count = inside.sum(dim=1, keepdim=True)
    return torch.bmm(inside[:, None, :], hidden.float()).squeeze(1) / count


Sink = Callable[[int, dict[str, torch.Tensor]], None]


@contextlib.contextmanager
def _reduce_hooks(
    layers: nn.ModuleList,
    chosen: Sequence[int],
    state: dict[str, Any],
    sink: Sink,
    last_k: int,
    stop_after: int | None,
) -> Iterator[None]:
    """Forward hooks that hand each chosen layer's reduced output to ``sink``; always removed on exit."""
    handles = []

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = _layer_hidden(output)
            tokens, pooled = reduce_hidden(hidden, state["lengths"], last_k)
            sink(layer, {"tokens": tokens, "pooled": pooled, "request": span_mean(hidden, state["spans"])})
            if layer == stop_after:
                raise _StopForward

        return hook

    try:
        for layer in chosen:
            handles.append(layers[layer].register_forward_hook(make_hook(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# Long (about 90 lines) for its docstring and the two places the arrays live (memory or a store directory).
def extract_features(
    loaded: LoadedModel,
    texts: Sequence[str] | PromptSet,
    *,
    layers: str | Sequence[int] | None = None,
    last_k: int = DEFAULT_LAST_K,
    length: int = DEFAULT_LENGTH,
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
    truncate: Truncate = "tail",
    progress: ProgressFn | None = None,
    store: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    labels: Sequence[int] | npt.ArrayLike | None = None,
    info: Mapping[str, Any] | None = None,
    spans: CharSpans | None = None,
) -> Features:
    """Hidden-state features of each prompt at each chosen layer (``layers``: ``None``/``"all"``, ``"3,7"``, list).

    Prompts are encoded like :func:`attnscan.prompts.encoding.encode` (chat template unless turned off) and cut to
    ``length`` tokens; by default the *tail* is kept (``truncate="tail"``), so the last-K slab always ends at the
    assistant turn the model is about to write. Returns :class:`Features` with ``tensors[L]`` ``float32 [N, K, H]``,
    ``pooled[L]`` and ``request[L]`` ``float32 [N, H]``. ``spans`` gives each prompt's request as a character span
    of its text (``None`` where unknown); by default a PromptSet's own (:meth:`PromptSet.request_span
    <attnscan.prompts.sets.PromptSet.request_span>`), else none. With ``store`` the arrays are streamed to that
    directory (written atomically; ``overwrite`` to replace earlier features) and returned as read-only memory
    maps of it. ``labels`` (``[N]`` 0/1) and ``info`` are kept with the features.
    """
    prompt_texts = list(texts.texts if isinstance(texts, PromptSet) else texts)
    if not prompt_texts:
        raise AttnscanError("no prompts to extract features from: give at least one prompt")
    if last_k < 1:
        raise AttnscanError(f"last_k must be at least 1, got {last_k}")
    check_batch_size(batch_size)
    check_truncate(truncate)
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
    token_spans = request_token_spans(
        loaded.tokenizer,
        prompt_texts,
        _char_spans(texts, spans, n),
        enc,
        system_prompt=system_prompt,
        truncate=truncate,
    )
    shapes = layer_shapes(n, last_k, int(loaded.model.config.hidden_size))
    meta = _feature_meta(loaded, enc, length, truncate, system_prompt, info, token_spans)
    if isinstance(texts, PromptSet):
        meta.setdefault("sets", [{**texts.provenance(), "start": 0, "stop": n}])
        if texts.groups:
            meta.setdefault("groups", [dict(g) for g in texts.groups])
    label_arr = None if labels is None else np.asarray(labels, dtype=np.int64)

    with contextlib.ExitStack() as stack_ctx:
        tmp: Path | None = None
        if store is not None:
            tmp = stack_ctx.enter_context(atomic_dir(Path(store), overwrite, marker=META_FILE, what="features"))
        arrays: dict[str, dict[int, Any]] = {name: {} for name in shapes}
        for layer in chosen:
            maps: Mapping[str, Any] = (
                create_layer_file(tmp, layer, shapes)
                if tmp is not None
                else {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}
            )
            for name in shapes:
                arrays[name][layer] = maps[name]
        _run(loaded, enc.ids, token_spans, chosen, arrays, last_k, batch_size, progress)
        feats = Features(
            tensors=arrays["tokens"],
            pooled=arrays["pooled"],
            request=arrays["request"],
            lengths=np.asarray(enc.lengths, dtype=np.int64),
            last_k=last_k,
            labels=label_arr,
            info=meta,
        )
        if tmp is not None:
            for by_layer in arrays.values():
                for arr in by_layer.values():
                    arr.flush()
            write_meta(tmp, meta_fields(feats))
            del arrays, maps, feats
    if store is not None:
        return Features.load(store)
    return feats


def _char_spans(texts: Sequence[str] | PromptSet, spans: CharSpans | None, n: int) -> list[tuple[int, int] | None]:
    """Each prompt's request as characters: ``spans`` when given (checked), else a PromptSet's own, else none."""
    if spans is None:
        if isinstance(texts, PromptSet):
            return [texts.request_span(i) for i in range(n)]
        return [None] * n
    out = list(spans)
    if len(out) != n:
        raise AttnscanError(f"{len(out)} request spans for {n} prompts: give one span (or None) per prompt")
    return [None if s is None else (int(s[0]), int(s[1])) for s in out]


def _feature_meta(
    loaded: LoadedModel,
    enc: Encoded,
    length: int,
    truncate: Truncate,
    system_prompt: str | None,
    info: Mapping[str, Any] | None,
    spans: TokenSpans,
) -> dict[str, Any]:
    """How features were made: the ``features.json`` record (``info`` adds to it)."""
    return {
        "model": {"spec": loaded.spec, **loaded.source},
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "length": length,
        "truncate": truncate,
        "truncated": enc.truncated,
        "chat_template": enc.chat_template,
        "system_prompt": system_prompt,
        "pooling": "mean over the prompt's real tokens",
        "position": "residual stream output of each decoder layer (before the final norm)",
        "request_pooling": {
            "counts": spans.counts(),
            "spans": [list(s) for s in spans.spans],
            "used": list(spans.used),
        },
        **(dict(info) if info else {}),
    }


def _run(
    loaded: LoadedModel,
    seqs: Sequence[Sequence[int]],
    spans: TokenSpans,
    chosen: Sequence[int],
    arrays: Mapping[str, Mapping[int, Any]],
    last_k: int,
    batch_size: int,
    progress: ProgressFn | None,
) -> None:
    """Batches through the base model, writing each chosen layer's reduced outputs into the row-indexed
    ``arrays[name][layer]`` (names: ``tokens``, ``pooled``, ``request``)."""
    model = loaded.model
    base = base_model(model)
    positions = accepts_position_ids(base)
    batches = Batches(seqs, pad_id=pad_token_id(loaded.tokenizer, model), device=loaded.device, batch_size=batch_size)
    token_spans = torch.tensor(spans.spans, dtype=torch.long).reshape(-1, 2)
    state: dict[str, Any] = {}

    def sink(layer: int, reduced: dict[str, torch.Tensor]) -> None:
        rows = state["rows"]
        for name, value in reduced.items():
            arrays[name][layer][rows] = value.cpu().numpy()

    total, done = len(seqs), 0
    if progress is not None:
        progress(0, total, "features")
    stack = decoder_layers(model)
    with torch.inference_mode(), _reduce_hooks(stack, chosen, state, sink, last_k, stop_after=max(chosen)):
        for batch in batches:
            state["rows"] = np.asarray(batch.rows, dtype=np.int64)
            state["lengths"] = torch.tensor(batch.lengths, dtype=torch.long)
            state["spans"] = token_spans[torch.as_tensor(batch.rows, dtype=torch.long)]
            with contextlib.suppress(_StopForward):
                base(**batch.forward_kwargs(positions))
            done += len(batch.rows)
            if progress is not None:
                progress(done, total, "features")


def labelled_features(
    loaded: LoadedModel,
    benign: Sequence[str] | PromptSet,
    jailbreak: Sequence[str] | PromptSet,
    **options: Any,
) -> Features:
    """Features of the benign prompts followed by the jailbreak prompts, with ``labels`` 0 (benign) / 1 (jailbreak).

    ``options`` are those of :func:`extract_features` (``layers``, ``last_k``, ``store`` ...). ``info["sets"]``
    records each set's provenance and its row range; the sets' request spans are kept. This is the input of
    ``attnscan detect train|eval``.
    """
    sets = {
        "benign": benign if isinstance(benign, PromptSet) else PromptSet("benign", tuple(benign), "<memory>"),
        "jailbreak": jailbreak
        if isinstance(jailbreak, PromptSet)
        else PromptSet("jailbreak", tuple(jailbreak), "<memory>"),
    }
    texts = [*sets["benign"].texts, *sets["jailbreak"].texts]
    nb = len(sets["benign"])
    labels = np.asarray([0] * nb + [1] * len(sets["jailbreak"]), dtype=np.int64)
    provenance = [
        {**sets["benign"].provenance(), "role": "benign", "label": 0, "start": 0, "stop": nb},
        {**sets["jailbreak"].provenance(), "role": "jailbreak", "label": 1, "start": nb, "stop": len(texts)},
    ]
    info = {**dict(options.pop("info", None) or {}), "sets": provenance}
    if any(ps.groups for ps in sets.values()):
        info["groups"] = [dict(g) for ps in sets.values() for g in (ps.groups or ({},) * len(ps))]
    spans = [ps.request_span(i) for ps in sets.values() for i in range(len(ps))]
    return extract_features(loaded, texts, labels=labels, info=info, spans=spans, **options)
