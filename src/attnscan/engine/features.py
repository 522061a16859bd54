"""Hidden-state features as arrays (:class:`Features`) and on disk: what :mod:`attnscan.engine.hidden` extracts.

The definitions of the arrays are in :mod:`attnscan.engine.hidden`. :meth:`Features.pool` gives the per-prompt
vectors a probe reads under each pooling of :data:`POOLS`: ``"mean"`` (``pooled``: all real tokens), ``"request"``
(``request``: the request's tokens) and ``"last"`` (the mean of the last-K slab's real rows, from ``tensors``).

On disk a features directory holds ``features.json`` (format tag, layers, K, lengths, optional labels, provenance)
and one ``L{layer}.safetensors`` per layer with float32 tensors by name: ``tokens`` ``[N, K, H]``, ``pooled``
``[N, H]`` and ``request`` ``[N, H]``. The files are written batch by batch through memory maps. Directories
written before request pooling lack ``request`` and still load (``Features.request`` is then ``None``, and only
the ``"request"`` pooling is refused). No pickle anywhere; any safetensors reader opens the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .._io import atomic_dir, read_format_json
from ..errors import AttnscanError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "POOLS",
    "Features",
    "Pool",
    "check_pool",
    "create_layer_file",
    "layer_shapes",
    "meta_fields",
    "read_meta",
    "read_safetensors",
    "write_meta",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

META_FILE = "features.json"
FORMAT = "attnscan.features"
FORMAT_VERSION = 1

_ST_DTYPES: dict[str, Any] = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def create_layer_file(
    directory: Path, layer: int, shapes: Mapping[str, Sequence[int]]
) -> dict[str, np.memmap[Any, Any]]:
    """Create ``L{layer}.safetensors`` holding zeroed float32 tensors of ``shapes`` (name -> shape), in order.

    The safetensors header is written first; the data region is then memory-mapped, so rows can be filled in any
    order, batch by batch, without ever holding the whole array in RAM. Returns the writable maps by name.
    """
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "layer": str(layer)}}
    offset = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
    start = 8 + len(raw)
    path = directory / f"L{int(layer)}.safetensors"
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        fh.truncate(start + offset)
    return {
        name: np.memmap(
            path, dtype=np.float32, mode="r+", offset=start + header[name]["data_offsets"][0], shape=tuple(shape)
        )
        for name, shape in shapes.items()
    }


def read_safetensors(path: Path, *, mmap: bool) -> dict[str, Any]:
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


def write_meta(directory: Path, fields: Mapping[str, Any]) -> None:
    """Write ``features.json`` to ``directory``: the format tag and version, then ``fields``."""
    from .._version import __version__

    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "attnscan_version": __version__, **fields}
    try:
        text = json.dumps(doc, indent=2, default=str)
    except (TypeError, ValueError) as exc:
        raise AttnscanError(f"features info is not JSON-serialisable ({exc})") from None
    (directory / META_FILE).write_text(text + "\n", encoding="utf-8")


def read_meta(root: Path) -> dict[str, Any]:
    """The checked ``features.json`` of the features directory ``root``."""
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise AttnscanError(f"{root} is not a features directory: expected {META_FILE}")
    return read_format_json(meta_path, FORMAT, FORMAT_VERSION, "features", "extract the features again")


Pool = Literal["mean", "request", "last"]
#: How a probe pools a prompt's hidden states into one vector: over all its real tokens, over its request's tokens,
#: or over its last K tokens.
POOLS: tuple[str, ...] = ("mean", "request", "last")

CharSpans = Sequence[tuple[int, int] | None]


def check_pool(pool: str) -> None:
    """Refuse a pooling other than those of :data:`POOLS`."""
    if pool not in POOLS:
        raise AttnscanError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")


# --------------------------------------------------------------------------------------------------- Features


@dataclass
class Features:
    """Per-layer features of N prompts (see the module docstring for the exact definitions).

    ``tensors[layer]``: ``float32 [N, K, H]``; ``pooled[layer]`` and ``request[layer]``: ``float32 [N, H]``
    (``request`` is ``None`` for features saved before request pooling); ``lengths``: ``int64 [N]`` real tokens
    per prompt after truncation; ``labels``: optional ``int64 [N]`` (1 = jailbreak, 0 = benign); ``info``: JSON-able
    provenance (model, encoding options, prompt sets, the request spans).
    """

    tensors: dict[int, FloatArray]
    pooled: dict[int, FloatArray]
    lengths: IntArray
    last_k: int
    labels: IntArray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    request: dict[int, FloatArray] | None = None

    def __post_init__(self) -> None:
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or self.lengths.size == 0:
            raise AttnscanError("features need at least one prompt")
        if set(self.tensors) != set(self.pooled) or not self.tensors:
            raise AttnscanError("features need the same non-empty set of layers in tensors and pooled")
        if self.request is not None and set(self.request) != set(self.tensors):
            raise AttnscanError("request features need the same layers as tensors and pooled")
        n = self.lengths.shape[0]
        for layer in self.tensors:
            t, p = self.tensors[layer], self.pooled[layer]
            r = p if self.request is None else self.request[layer]
            if t.ndim != 3 or t.shape[:2] != (n, self.last_k) or p.shape != (n, t.shape[2]) or r.shape != p.shape:
                raise AttnscanError(
                    f"layer {layer} features have shapes {tuple(t.shape)}, {tuple(p.shape)} and {tuple(r.shape)}: "
                    f"expected [{n}, {self.last_k}, H], [{n}, H] and [{n}, H]"
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

    def pool(self, pool: str) -> dict[int, FloatArray]:
        """``{layer: float32 [N, H]}``: each prompt's hidden states pooled by ``pool`` (one of :data:`POOLS`)."""
        check_pool(pool)
        if pool == "mean":
            return dict(self.pooled)
        if pool == "request":
            if self.request is None:
                raise AttnscanError(
                    "these features were saved before request pooling and hold no request means: extract them again"
                )
            return dict(self.request)
        mask = self.mask.astype(np.float32)[:, :, None]
        count = mask.sum(axis=1)
        return {layer: (np.asarray(t) * mask).sum(axis=1) / count for layer, t in self.tensors.items()}

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        n, k, h = self.n_prompts, self.last_k, self.hidden_size
        return layer_shapes(n, k, h, with_request=self.request is not None)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``features.json`` + ``L{layer}.safetensors`` to ``path`` atomically; see the module docstring."""
        final = Path(path)
        with atomic_dir(final, overwrite, marker=META_FILE, what="features") as tmp:
            for layer in self.layers:
                maps = create_layer_file(tmp, layer, self._shapes())
                maps["tokens"][:] = self.tensors[layer]
                maps["pooled"][:] = self.pooled[layer]
                if self.request is not None:
                    maps["request"][:] = self.request[layer]
                for arr in maps.values():
                    arr.flush()
                del maps
            write_meta(tmp, meta_fields(self))
        return final

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = True) -> Features:
        """Read a features directory; with ``mmap`` (default) the arrays are read-only memory maps of the files."""
        root = Path(path)
        doc = read_meta(root)
        tensors: dict[int, FloatArray] = {}
        pooled: dict[int, FloatArray] = {}
        request: dict[int, FloatArray] = {}
        for layer in doc["layers"]:
            arrays = read_safetensors(root / f"L{int(layer)}.safetensors", mmap=mmap)
            if "tokens" not in arrays or "pooled" not in arrays:
                raise AttnscanError(f"{root}/L{layer}.safetensors lacks the 'tokens' or 'pooled' tensor")
            tensors[int(layer)], pooled[int(layer)] = arrays["tokens"], arrays["pooled"]
            if "request" in arrays:
                request[int(layer)] = arrays["request"]
        labels = doc.get("labels")
        return cls(
            tensors=tensors,
            pooled=pooled,
            lengths=np.asarray(doc["lengths"], dtype=np.int64),
            last_k=int(doc["last_k"]),
            labels=None if labels is None else np.asarray(labels, dtype=np.int64),
            info=dict(doc.get("info", {})),
            request=request if len(request) == len(tensors) else None,
        )


def layer_shapes(n: int, k: int, h: int, *, with_request: bool = True) -> dict[str, tuple[int, ...]]:
    """The tensors of one layer's file and their shapes, in file order."""
    shapes: dict[str, tuple[int, ...]] = {"tokens": (n, k, h), "pooled": (n, h)}
    if with_request:
        shapes["request"] = (n, h)
    return shapes


def meta_fields(feats: Features) -> dict[str, Any]:
    """What ``features.json`` records beside its format tag."""
    return {
        "layers": list(feats.layers),
        "last_k": feats.last_k,
        "hidden_size": feats.hidden_size,
        "n_prompts": feats.n_prompts,
        "lengths": [int(x) for x in feats.lengths],
        "labels": None if feats.labels is None else [int(x) for x in feats.labels],
        "info": feats.info,
    }
