"""Per-prompt, per-layer hidden-state features for the detectors, extracted with bounded memory.

For every prompt and every chosen decoder layer ``L`` this module keeps two things from the layer's output (the
residual stream after the layer, before any final norm):

- ``tensors[L]``: ``float32 [N, K, H]`` — the hidden states at the prompt's last ``K`` real (non-pad) token
  positions, oldest first. A prompt shorter than ``K`` tokens is left-padded with zeros; :attr:`Features.mask`
  ``bool [N, K]`` says which rows are real.
- ``pooled[L]``: ``float32 [N, H]`` — the mean of the hidden states over all the prompt's real tokens.

Note the one difference from ``model(..., output_hidden_states=True).hidden_states[L + 1]``: transformers replaces
the *last* entry with the output of the final norm; here the last layer's features are the layer's own output,
like every other layer's.

Memory. A forward hook on each chosen decoder layer reduces the layer's output ``[B, P, H]`` to ``[B, K, H]`` and
``[B, H]`` the moment it exists, so no more than one layer's full hidden states are alive at a time. The base model
runs without the LM head, and the forward stops right after the deepest chosen layer. Prompts are batched longest
first with right padding and explicit position ids. With ``store=DIR`` each layer's arrays are written batch by
batch into memory-mapped files on disk instead of RAM.

On disk (:meth:`Features.save`, ``store=``) a features directory holds ``features.json`` (format tag, layers, K,
lengths, optional labels, provenance) and one ``L{layer}.safetensors`` per layer with the tensors ``tokens``
``[N, K, H]`` and ``pooled`` ``[N, H]`` (float32). No pickle anywhere; any safetensors reader opens the files.
When the prompts carry group labels (:attr:`attnscan.prompts.sets.PromptSet.groups`), ``info["groups"]`` holds
one dict of them per prompt (``{}`` for the prompts of a set without any); prompts without labels leave it out.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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

__all__ = [
    "Features",
    "ProgressFn",
    "extract_features",
    "labelled_features",
]

"""``progress(done, total, label)``: prompts done so far, their total, and what is running."""

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

META_FILE = "features.json"
FORMAT = "attnscan.features"
FORMAT_VERSION = 1
DEFAULT_LAST_K = 8

_ST_DTYPES: dict[str, Any] = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}


# --------------------------------------------------------------------------------------------------- Features


@dataclass
class Features:
    """Per-layer features of N prompts (see the module docstring for the exact definitions).

    ``tensors[layer]``: ``float32 [N, K, H]``; ``pooled[layer]``: ``float32 [N, H]``; ``lengths``: ``int64 [N]``
    real tokens per prompt after truncation; ``labels``: optional ``int64 [N]`` (1 = jailbreak, 0 = benign);
    ``info``: JSON-able provenance (model, encoding options, prompt sets).
    """

    tensors: dict[int, FloatArray]
    pooled: dict[int, FloatArray]
    lengths: IntArray
    last_k: int
    labels: IntArray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or self.lengths.size == 0:
            raise AttnscanError("features need at least one prompt")
        if set(self.tensors) != set(self.pooled) or not self.tensors:
            raise AttnscanError("features need the same non-empty set of layers in tensors and pooled")
        n = self.lengths.shape[0]
        for layer in self.tensors:
            t, p = self.tensors[layer], self.pooled[layer]
            if t.ndim != 3 or t.shape[:2] != (n, self.last_k) or p.shape != (n, t.shape[2]):
                raise AttnscanError(
                    f"layer {layer} features have shapes {tuple(t.shape)} and {tuple(p.shape)}: expected "
                    f"[{n}, {self.last_k}, H] and [{n}, H]"
                )
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (n,):
                raise AttnscanError(f"features hold {n} prompts but {self.labels.shape[0]} labels")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.tensors))

    @property
    def n_prompts(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.tensors[self.layers[0]].shape[2])

    @property
    def mask(self) -> npt.NDArray[np.bool_]:
        """``bool [N, K]``: True where ``tensors[L][i, j]`` is a real token (False for the zero left-padding)."""
        first_real = self.last_k - np.minimum(self.lengths, self.last_k)
        return np.arange(self.last_k)[None, :] >= first_real[:, None]

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``features.json`` + ``L{layer}.safetensors`` to ``path`` atomically; see the module docstring."""
        final = Path(path)
        with atomic_dir(final, overwrite, marker=META_FILE, what="features") as tmp:
            for layer in self.layers:
                tokens, pooled = _create_layer_file(tmp, layer, self.n_prompts, self.last_k, self.hidden_size)
                tokens[:] = self.tensors[layer]
                pooled[:] = self.pooled[layer]
                tokens.flush()
                pooled.flush()
                del tokens, pooled
            _write_meta(tmp, self)
        return final

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = True) -> Features:
        """Read a features directory; with ``mmap`` (default) the arrays are read-only memory maps of the files."""
        root = Path(path)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise AttnscanError(f"{root} is not a features directory: expected {META_FILE}")
        try:
            doc = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise AttnscanError(f"{meta_path} is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise AttnscanError(f"{meta_path} is not an attnscan features file")
        if doc.get("format_version") != FORMAT_VERSION:
            raise AttnscanError(
                f"{meta_path} has features format version {doc.get('format_version')}; this attnscan reads "
                f"version {FORMAT_VERSION}: extract the features again"
            )
        tensors: dict[int, FloatArray] = {}
        pooled: dict[int, FloatArray] = {}
        for layer in doc["layers"]:
            arrays = _read_safetensors(root / f"L{int(layer)}.safetensors", mmap=mmap)
            if "tokens" not in arrays or "pooled" not in arrays:
                raise AttnscanError(f"{root}/L{layer}.safetensors lacks the 'tokens' or 'pooled' tensor")
            tensors[int(layer)], pooled[int(layer)] = arrays["tokens"], arrays["pooled"]
        labels = doc.get("labels")
        return cls(
            tensors=tensors,
            pooled=pooled,
            lengths=np.asarray(doc["lengths"], dtype=np.int64),
            last_k=int(doc["last_k"]),
            labels=None if labels is None else np.asarray(labels, dtype=np.int64),
            info=dict(doc.get("info", {})),
        )


# --------------------------------------------------------------------------------------------------- on-disk format


def _create_layer_file(
    directory: Path, layer: int, n: int, k: int, h: int
) -> tuple[np.memmap[Any, Any], np.memmap[Any, Any]]:
    """Create ``L{layer}.safetensors`` holding zeroed ``tokens [n, k, h]`` and ``pooled [n, h]`` (float32).

    The safetensors header is written first; the data region is then memory-mapped, so rows can be filled in any
    order, batch by batch, without ever holding the whole array in RAM.
    """
    shapes = {"tokens": [n, k, h], "pooled": [n, h]}
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "layer": str(layer)}}
    offset = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
    start = 8 + len(raw)
    path = directory / f"L{int(layer)}.safetensors"
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        fh.truncate(start + offset)
    tokens = np.memmap(path, dtype=np.float32, mode="r+", offset=start, shape=(n, k, h))
    pooled = np.memmap(path, dtype=np.float32, mode="r+", offset=start + n * k * h * 4, shape=(n, h))
    return tokens, pooled


def _read_safetensors(path: Path, *, mmap: bool) -> dict[str, Any]:
    """The tensors of a safetensors file as numpy arrays (read-only memory maps with ``mmap``)."""
    if not path.is_file():
        raise AttnscanError(f"features file {path} is missing: extract the features again")
    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise AttnscanError(f"{path} cannot be read as safetensors ({exc}): extract the features again") from None
    start = 8 + n
    out: dict[str, Any] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(spec.get("dtype"))
        if dtype is None:
            raise AttnscanError(f"{path}: tensor {name} has unsupported dtype {spec.get('dtype')}")
        shape = tuple(int(s) for s in spec["shape"])
        lo, hi = (int(x) for x in spec["data_offsets"])
        if int(np.prod(shape)) * np.dtype(dtype).itemsize != hi - lo:
            raise AttnscanError(f"{path}: tensor {name} has inconsistent size; the file is damaged")
        if mmap:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + lo, shape=shape)
        else:
            out[name] = np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=start + lo).reshape(shape)
    return out


def _write_meta(directory: Path, feats: Features) -> None:
    from .._version import __version__

    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "attnscan_version": __version__,
        "layers": list(feats.layers),
        "last_k": feats.last_k,
        "hidden_size": feats.hidden_size,
        "n_prompts": feats.n_prompts,
        "lengths": [int(x) for x in feats.lengths],
        "labels": None if feats.labels is None else [int(x) for x in feats.labels],
        "info": feats.info,
    }
    try:
        text = json.dumps(doc, indent=2, default=str)
    except (TypeError, ValueError) as exc:
        raise AttnscanError(f"features info is not JSON-serialisable ({exc})") from None
    (directory / META_FILE).write_text(text + "\n", encoding="utf-8")


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


@contextlib.contextmanager
def _reduce_hooks(
    layers: nn.ModuleList,
    chosen: Sequence[int],
    state: dict[str, Any],
    sink: Callable[[int, torch.Tensor, torch.Tensor], None],
    last_k: int,
    stop_after: int | None,
) -> Iterator[None]:
    """Forward hooks that hand each chosen layer's reduced output to ``sink``; always removed on exit."""
    handles = []

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tokens, pooled = reduce_hidden(_layer_hidden(output), state["lengths"], last_k)
            sink(layer, tokens, pooled)
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
) -> Features:
    """Hidden-state features of each prompt at each chosen layer (``layers``: ``None``/``"all"``, ``"3,7"``, list).

    Prompts are encoded like :func:`attnscan.prompts.encoding.encode` (chat template unless turned off) and cut to
    ``length`` tokens; by default the *tail* is kept (``truncate="tail"``), so the last-K slab always ends at the
    assistant turn the model is about to write. Returns :class:`Features` with ``tensors[L]`` ``float32 [N, K, H]``
    and ``pooled[L]`` ``float32 [N, H]``. With ``store`` the arrays are streamed to that directory (written
    atomically; ``overwrite`` to replace earlier features) and returned as read-only memory maps of it.
    ``labels`` (``[N]`` 0/1) and ``info`` are kept with the features.
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
    model = loaded.model
    stack = decoder_layers(model)
    hidden_size = int(model.config.hidden_size)
    lengths = np.asarray(enc.lengths, dtype=np.int64)
    meta = _feature_meta(loaded, enc, length, truncate, system_prompt, info)
    if isinstance(texts, PromptSet):
        meta.setdefault("sets", [{**texts.provenance(), "start": 0, "stop": n}])
        if texts.groups:
            meta.setdefault("groups", [dict(g) for g in texts.groups])
    label_arr = None if labels is None else np.asarray(labels, dtype=np.int64)

    with contextlib.ExitStack() as stack_ctx:
        tmp: Path | None = None
        if store is not None:
            tmp = stack_ctx.enter_context(atomic_dir(Path(store), overwrite, marker=META_FILE, what="features"))
            files = {layer: _create_layer_file(tmp, layer, n, last_k, hidden_size) for layer in chosen}
            tensors: dict[int, Any] = {layer: f[0] for layer, f in files.items()}
            pooled: dict[int, Any] = {layer: f[1] for layer, f in files.items()}
        else:
            tensors = {layer: np.zeros((n, last_k, hidden_size), dtype=np.float32) for layer in chosen}
            pooled = {layer: np.zeros((n, hidden_size), dtype=np.float32) for layer in chosen}
        _run(loaded, enc.ids, chosen, stack, tensors, pooled, last_k, batch_size, progress)
        feats = Features(tensors=tensors, pooled=pooled, lengths=lengths, last_k=last_k, labels=label_arr, info=meta)
        if tmp is not None:
            for arr in (*tensors.values(), *pooled.values()):
                arr.flush()
            _write_meta(tmp, feats)
            del files, tensors, pooled, feats
    if store is not None:
        return Features.load(store)
    return feats


def _feature_meta(
    loaded: LoadedModel,
    enc: Encoded,
    length: int,
    truncate: Truncate,
    system_prompt: str | None,
    info: Mapping[str, Any] | None,
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
        **(dict(info) if info else {}),
    }


def _run(
    loaded: LoadedModel,
    seqs: Sequence[Sequence[int]],
    chosen: Sequence[int],
    stack: nn.ModuleList,
    tensors: Mapping[int, Any],
    pooled: Mapping[int, Any],
    last_k: int,
    batch_size: int,
    progress: ProgressFn | None,
) -> None:
    """Batches through the base model, writing each chosen layer's reduced output into the row-indexed arrays."""
    model = loaded.model
    base = base_model(model)
    positions = accepts_position_ids(base)
    batches = Batches(seqs, pad_id=pad_token_id(loaded.tokenizer, model), device=loaded.device, batch_size=batch_size)
    state: dict[str, Any] = {}

    def sink(layer: int, tok: torch.Tensor, pool: torch.Tensor) -> None:
        rows = state["rows"]
        tensors[layer][rows] = tok.cpu().numpy()
        pooled[layer][rows] = pool.cpu().numpy()

    total, done = len(seqs), 0
    if progress is not None:
        progress(0, total, "features")
    with torch.inference_mode(), _reduce_hooks(stack, chosen, state, sink, last_k, stop_after=max(chosen)):
        for batch in batches:
            state["rows"] = np.asarray(batch.rows, dtype=np.int64)
            state["lengths"] = torch.tensor(batch.lengths, dtype=torch.long)
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
    records each set's provenance and its row range. This is the input of ``attnscan detect train|eval``.
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
    return extract_features(loaded, texts, labels=labels, info=info, **options)
