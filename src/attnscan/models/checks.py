"""Checks of model files before transformers reads them, so a damaged download is one clear error, not a traceback.

Downloads break in ordinary ways: a file cut short, a header overwritten, a JSON file half written, a wrong file
under the right name. transformers and its readers then fail deep inside with errors that name neither the file nor
the fix. These checks read only headers (cheap even for large files) and raise :class:`AttnscanError` naming the
file and saying what to do:

- :func:`check_gguf`: the GGUF magic bytes, a version this reader knows, a readable header and tensor data that the
  file really holds (a truncated download is caught here);
- :func:`check_model_dir`: ``config.json`` (valid JSON, an object, a ``model_type``), every ``*.safetensors`` file
  (a header safetensors can read, covering the whole file: this catches truncated data and unknown dtypes), and the
  shards a ``model.safetensors.index.json`` names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import AttnscanError

__all__ = ["check_config", "check_gguf", "check_model_dir", "check_safetensors", "damaged"]

GGUF_MAGIC = b"GGUF"
REDOWNLOAD = "download or copy the model again"


def damaged(path: Path, why: str, fix: str = REDOWNLOAD) -> AttnscanError:
    """The one-line error for a damaged model file: what is wrong with which file, and what to do."""
    reason = " ".join(str(why).split()) or "unreadable"
    if len(reason) > 160:
        reason = reason[:157] + "..."
    return AttnscanError(f"{path} is damaged or not a model file ({reason}): {fix}")


def check_gguf(path: Path) -> None:
    """Refuse a ``.gguf`` file that is not a complete GGUF file of a version the ``gguf`` reader knows."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise AttnscanError(f"cannot read {path} ({exc.strerror or exc}): check the path and its permissions") from None
    if not head:
        raise damaged(path, "it is empty")
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise damaged(path, "it does not start with the GGUF magic bytes")
    if len(head) < 8:
        raise damaged(path, "the header is cut short")
    try:
        import gguf
    except ImportError:
        raise AttnscanError("reading .gguf files needs the 'gguf' package: pip install gguf") from None
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
        ends = [int(t.data_offset) + int(t.n_bytes) for t in reader.tensors]
    except Exception as exc:  # the gguf reader fails on damaged files with ValueError, IndexError, struct errors...
        version = int.from_bytes(head[4:8], "little")
        if version not in (2, 3):
            why = f"GGUF version {version}; attnscan reads versions 2 and 3"
            raise damaged(path, why, "use a v2 or v3 file") from None
        raise damaged(path, f"its header cannot be read, {type(exc).__name__}: it is cut short or garbled") from None
    if not ends:
        raise damaged(path, "it holds no tensors")
    if max(ends) > size:
        raise damaged(path, f"tensor data ends at byte {max(ends)} but the file has {size} bytes: it is truncated")


def _read_json(path: Path, fix: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise damaged(path, "not UTF-8 text", fix) from None
    except OSError as exc:
        raise AttnscanError(f"cannot read {path} ({exc.strerror or exc}): check its permissions") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise damaged(path, f"invalid JSON at line {exc.lineno}: {exc.msg}", fix) from None


def check_config(directory: Path, fix: str = REDOWNLOAD) -> None:
    """``config.json`` must be a JSON object naming its ``model_type`` (transformers picks the model class by it)."""
    path = Path(directory) / "config.json"
    config = _read_json(path, fix)
    if not isinstance(config, dict):
        raise damaged(path, f"a JSON {type(config).__name__}, not an object", fix)
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise damaged(path, "no model_type, which names the architecture", fix)


def check_safetensors(path: Path, fix: str = REDOWNLOAD) -> None:
    """A safetensors file whose header safetensors reads and whose tensors cover the file exactly."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise damaged(path, str(exc), fix) from None


def check_model_dir(directory: Path, fix: str = REDOWNLOAD) -> None:
    """Check a ``save_pretrained`` directory's config and safetensors weights before transformers loads them
    (``fix``: what the error tells the user to do about a damaged file)."""
    directory = Path(directory)
    check_config(directory, fix)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        doc = _read_json(index, fix)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict):
            raise damaged(index, "no weight_map", fix)
        for name in sorted({str(v) for v in weight_map.values()}):
            if not (directory / name).is_file():
                raise AttnscanError(f"{index} names the shard {name}, which is missing from {directory}: {fix}")
    for weights in sorted(directory.glob("*.safetensors")):
        check_safetensors(weights, fix)
