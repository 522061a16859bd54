"""Reading run directories and results bundles back: the results, their stored tables, the ``--rows`` choice, and
the prompt texts and tokens the bundles do not hold.

A run directory (written by :func:`attnscan.pipeline.run`) holds a ``manifest.json`` of kind :data:`RUN_KIND` and one
results bundle per model, each with its ``layers.csv`` and, after ``--detect``, its detectors in
:data:`DETECTOR_DIR`. A results bundle alone (``attnscan scan``) is read as one model.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._io import reading
from .analysis.result import ScanResult
from .errors import AttnscanError
from .views.labels import model_label, unique_label

__all__ = [
    "DETECTOR_DIR",
    "RUN_KIND",
    "load_bundles",
    "parse_rows",
    "prefix_tokens",
    "prompts_from_manifest",
    "stored_detection",
    "stored_table",
]

#: ``kind`` of a run directory's ``manifest.json``.
RUN_KIND = "attnscan-run"
#: Where a run keeps a model's detectors, inside its bundle.
DETECTOR_DIR = "detector"
BUNDLE_FIX = "scan again (or restore the directory from a copy)"


def load_bundles(paths: Sequence[str | Path]) -> dict[str, ScanResult]:
    """Results from bundle directories or run directories (which hold one bundle per model), keyed by label."""
    found: dict[str, ScanResult] = {}
    for raw in paths:
        path = Path(raw)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise AttnscanError(f"{path} is neither a results bundle nor a run directory (no manifest.json)")
        with reading(manifest_path, "results manifest", BUNDLE_FIX):
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            run_dir = isinstance(manifest, dict) and manifest.get("kind") == RUN_KIND
            bundles = (
                {str(label): path / str(info["bundle"]) for label, info in manifest["models"].items()}
                if run_dir
                else {}
            )
        if not isinstance(manifest, dict):
            raise AttnscanError(
                f"{manifest_path} is not an attnscan manifest (a JSON {type(manifest).__name__}): {BUNDLE_FIX}"
            )
        for label, bundle in bundles.items():
            found[unique_label(label, found)] = _load_bundle(bundle)
        if not run_dir:
            result = _load_bundle(path)
            model = result.manifest.get("model")
            spec = str(model.get("spec", path.name) if isinstance(model, dict) else path.name)
            found[unique_label(model_label(spec), found)] = result
    if not found:
        raise AttnscanError("no results bundles given")
    return found


def _load_bundle(path: Path) -> ScanResult:
    """:meth:`ScanResult.load`, with any failure on damaged files as one error line naming the bundle."""
    with reading(path, "results bundle", BUNDLE_FIX):
        return ScanResult.load(path)


def stored_table(result: ScanResult, seed: int = 0) -> Any:
    """The layer table saved with a bundle when it holds the statistics, else computed now."""
    import pandas as pd

    if result.path is not None:
        csv_path = result.path / "layers.csv"
        if csv_path.is_file():
            with reading(csv_path, "layer table", BUNDLE_FIX):
                frame = pd.read_csv(csv_path)
            if "verdict" in frame.columns:
                return frame
    return result.layer_table(seed=seed)


def stored_detection(result: ScanResult) -> Any | None:
    """The detection table kept beside a bundle by ``attnscan run --detect`` (``detector/detection.csv``), if any."""
    import pandas as pd

    if result.path is None:
        return None
    path = result.path / DETECTOR_DIR / "detection.csv"
    if not path.is_file():
        return None
    with reading(path, "detection table", "train the detectors again (attnscan run --detect)"):
        return pd.read_csv(path)


def parse_rows(rows: str, labels: Sequence[str]) -> list[tuple[str, int]] | None:
    """``auto`` -> None; ``MODEL:LAYER,...`` -> pairs (a bare ``LAYER`` means the only model)."""
    text = rows.strip()
    if text.lower() == "auto":
        return None
    pairs: list[tuple[str, int]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        model, _, layer = part.rpartition(":")
        if not model:
            if len(labels) != 1:
                raise AttnscanError(f"row '{part}' names no model: write MODEL:LAYER (models: {', '.join(labels)})")
            model = labels[0]
        if model not in labels:
            raise AttnscanError(f"row '{part}': unknown model '{model}'; models here are {', '.join(labels)}")
        try:
            pairs.append((model, int(layer)))
        except ValueError:
            raise AttnscanError(f"row '{part}': layer must be a number, e.g. {model}:7") from None
    if not pairs:
        raise AttnscanError("--rows is empty: write auto or MODEL:LAYER,...")
    return pairs


# --------------------------------------------------------------------------------------------------------------------
# Inputs the bundle does not hold: prompt texts and tokens


def prompts_from_manifest(result: ScanResult) -> dict[str, list[str]]:
    """Reload the prompt texts of a result's sets from the sources its manifest records (built-in sets and local
    files; never the network), keeping only sets whose texts still match the recorded sha256.

    Returns {set name: texts}; sets that cannot be reloaded or no longer match are left out.
    """
    from .prompts.sets import load_prompts

    sets = result.manifest.get("prompt_sets")
    out: dict[str, list[str]] = {}
    if not isinstance(sets, Mapping):
        return out
    for name, info in sets.items():
        if not isinstance(info, Mapping):
            continue
        source = info.get("source")
        if not isinstance(source, str) or source.startswith("hf:") or not info.get("sha256"):
            continue
        limit = info.get("limit")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ps = load_prompts(
                    source, str(name), limit=int(limit) if limit is not None else None, seed=int(info.get("seed", 0))
                )
        except (AttnscanError, OSError, ValueError):
            continue
        if ps.sha256 == info["sha256"]:
            out[str(name)] = list(ps.texts)
    return out


def prefix_tokens(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    length: int = 4096,
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> list[str]:
    """The decoded tokens every prompt of ``texts`` starts with after encoding (with the same options as the scan):
    typically the chat template's prefix. Pass as ``tokens={label: prefix_tokens(...)}`` to
    :func:`attnscan.views.report.build_report`."""
    from .prompts.encoding import encode, shared_prefix

    if not texts:
        return []
    enc = encode(tokenizer, texts, length, chat_template=chat_template, system_prompt=system_prompt)
    return [str(tokenizer.decode([token_id])) for token_id in shared_prefix(enc.ids)]
