"""Detector files and directories, and the model a trained detector reads.

:func:`save_detector` / :func:`load_detector` write and read per-layer detectors as ``detector.safetensors`` +
``detector.json`` (no pickle). :func:`~attnscan.detect.jobs.train_detector` writes a detector directory with
:func:`save_trained`; :func:`load_trained` reads it back as a :class:`TrainedDetector`.

Detector directory (``train_detector(out=DIR)``; written atomically: complete or absent)
--------------------------------------------------------------------------------------------
- ``detector.safetensors`` + ``detector.json``: the per-layer :class:`~attnscan.detect.detectors.CPDetector` s,
  fitted on all training prompts, in :func:`save_detector`'s format (``load_detector(DIR)`` reads them). The JSON's
  ``meta`` records how the features were made (``model``, ``features``), the prompt sets (``sets``, with a short
  hash per training prompt in ``train_prompt_hashes``), the cross-validation settings (``training``),
  ``best_layer``, ``flagged_layers`` and ``primary`` (the detector kind that scores by default: ``flag_on``).
- ``probe/detector.safetensors`` + ``probe/detector.json``: the per-layer
  :class:`~attnscan.detect.detectors.ProbeDetector` baselines, same format and meta.
- ``detection.csv``: :func:`attnscan.detect.metrics.layer_detection_table` — cross-validated (out-of-fold) metrics
  per layer with bootstrap intervals and the ``flagged`` column.
- ``train_prompts.jsonl``: the training prompts, one JSON object ``{"text": ..., "label": 0 or 1}`` a line (benign
  first), so that ``evaluate_detector`` can fit the text baseline on them (:meth:`TrainedDetector.training_prompts`;
  detectors written before it lack the file, and their evaluations say the text baseline is unavailable).
- ``meta["stability"]``: the rank stability of the chosen layer's detector under resampled training sets
  (:mod:`attnscan.detect.stability`).

When the training prompts carry group labels (see :mod:`attnscan.detect.training`), the meta also holds
``train_groups`` (each training prompt's labels, benign first), ``training["cv"]`` with ``training["cv_plans"]``
(the folds behind the main and the side numbers), and, unless turned off, ``baselines`` (prompt length and TF-IDF
text baselines, :mod:`attnscan.detect.baselines`); ``detection.csv`` then holds the grouped numbers in its main
columns, the side ones (``*_stratified``, ``*_requests``) and the baseline columns. A detector trained with ``fpr``
holds ``operating_point`` (the flagging threshold per layer and kind at that false-positive rate, used by
``score_prompts``) and the ``{kind}_op_threshold``/``_op_tpr``/``_op_fpr`` columns, and ``families.csv`` (also
``meta["families"]``): the TPR per attack family and the FPR on risky-looking benign prompts at that threshold,
with Wilson intervals (:mod:`attnscan.detect.rates`).

``meta["model"]`` (:func:`model_record`) says which model the detector reads: :func:`scoring_model` finds and loads
it again for scoring, and :func:`check_model` refuses another. Also here: the output files of scoring and
evaluation (:func:`check_output_file`, :func:`write_table`, :func:`preview`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._io import atomic_dir, atomic_file, check_output_dir, read_format_json, reading
from ..errors import AttnscanError
from ..models.loading import LoadedModel, LoadOptions, resolve_model
from .detectors import DETECTOR_KINDS, CPDetector, Detector, Kind, ProbeDetector

__all__ = [
    "DETECTION_CSV",
    "FAMILIES_CSV",
    "FORMAT",
    "FORMAT_VERSION",
    "JOB_FORMAT",
    "JOB_VERSION",
    "META_FILE",
    "PROBE_DIR",
    "STATE_FILE",
    "TRAIN_PROMPTS",
    "TrainedDetector",
    "check_detector_dir",
    "check_model",
    "check_output_file",
    "load_detector",
    "load_trained",
    "model_record",
    "preview",
    "prompt_hash",
    "save_detector",
    "save_trained",
    "scoring_model",
    "trained_dtype",
    "write_table",
]

STATE_FILE = "detector.safetensors"
META_FILE = "detector.json"
FORMAT = "attnscan.detector"
FORMAT_VERSION = 1
DETECTION_CSV = "detection.csv"
FAMILIES_CSV = "families.csv"
TRAIN_PROMPTS = "train_prompts.jsonl"
PROBE_DIR = "probe"
JOB_FORMAT = "attnscan.detect-job"
JOB_VERSION = 1
PREVIEW_WIDTH = 60


def save_detector(
    path_dir: str | os.PathLike[str],
    detectors: Mapping[int, Detector],
    meta: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write per-layer detectors to ``path_dir`` as ``detector.safetensors`` + ``detector.json`` (no pickle).

    Arrays are stored under ``L{layer}/{name}``; ``detector.json`` holds the format tag, each layer's kind and
    metadata, and ``meta`` (JSON-serialisable: e.g. the model and the layers' provenance). The directory appears
    complete or not at all; an existing detector directory is replaced only with ``overwrite=True``.
    """
    from safetensors.numpy import save_file

    from .._version import __version__

    if not detectors:
        raise AttnscanError("no detectors to save")
    final = Path(path_dir)
    tensors: dict[str, np.ndarray] = {}
    layers: list[dict[str, Any]] = []
    for layer, det in sorted(detectors.items()):
        arrays, state = det.to_state()
        for name, arr in arrays.items():
            tensors[f"L{int(layer)}/{name}"] = np.ascontiguousarray(arr)
        layers.append({"layer": int(layer), "kind": det.kind, "state": state})
    try:
        text = json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "attnscan_version": __version__,
                "layers": layers,
                "meta": dict(meta or {}),
            },
            indent=2,
        )
    except (TypeError, ValueError) as exc:
        raise AttnscanError(
            f"detector metadata is not JSON-serialisable ({exc}): pass plain str/int/float/list/dict"
        ) from None
    with atomic_dir(final, overwrite, marker=META_FILE, what="a detector") as tmp:
        save_file(tensors, str(tmp / STATE_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(text + "\n", encoding="utf-8")
    return final


def load_detector(path_dir: str | os.PathLike[str]) -> tuple[dict[int, Detector], dict[str, Any]]:
    """Read what :func:`save_detector` wrote: ``({layer: detector}, meta)`` (damaged files: one error line)."""
    with reading(Path(path_dir), "detector directory", "save or train the detector again"):
        return _load_detector(Path(path_dir))


def _load_detector(root: Path) -> tuple[dict[int, Detector], dict[str, Any]]:
    from safetensors.numpy import load_file

    meta_path, state_path = root / META_FILE, root / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise AttnscanError(f"{root} is not a detector directory: expected {META_FILE} and {STATE_FILE}")
    doc = read_format_json(meta_path, FORMAT, FORMAT_VERSION, "detector", "upgrade attnscan or re-fit the detector")
    try:
        tensors = load_file(str(state_path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise AttnscanError(f"{state_path} cannot be read as safetensors ({exc}): save the detector again") from None
    detectors: dict[int, Detector] = {}
    for entry in doc.get("layers", []):
        try:
            layer, kind = int(entry["layer"]), entry.get("kind")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise AttnscanError(f"{meta_path}: malformed layer entry {entry!r}") from None
        if kind not in DETECTOR_KINDS:
            raise AttnscanError(f"{meta_path}: layer {layer} has unknown detector kind {kind!r}")
        prefix = f"L{layer}/"
        arrays = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        detectors[layer] = DETECTOR_KINDS[kind].from_state(arrays, entry.get("state", {}))
    return detectors, dict(doc.get("meta", {}))


# --------------------------------------------------------------------------------------------------- models


def model_record(loaded: LoadedModel) -> dict[str, Any]:
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
    here = model_record(loaded)
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


def trained_dtype(meta: Mapping[str, Any]) -> str | None:
    """The torch dtype (``"float32"``, ``"bfloat16"``, ...) the detector's training features were computed in:
    ``meta["features"]["dtype"]``, else the training model's ``meta["model"]["dtype"]``; ``None`` if neither is
    recorded."""
    for part in ("features", "model"):
        record = meta.get(part)
        if isinstance(record, Mapping) and record.get("dtype"):
            return str(record["dtype"])
    return None


def scoring_model(
    model: str | LoadedModel | None,
    meta: Mapping[str, Any],
    load: LoadOptions,
    *,
    dtype: str | None,
    allow_other_model: bool,
) -> LoadedModel:
    """The model to score with (``model``, else the recorded one; a recorded hub model at its recorded commit
    unless ``load.revision`` says otherwise), loaded with ``load`` in the dtype :func:`_scoring_dtype` picks,
    checked against the training model; warns when it runs in another dtype than training, since the features, and
    so the scores, shift with the precision."""
    record = meta.get("model", {})
    trained = trained_dtype(meta)
    if not isinstance(model, LoadedModel):
        spec = model if model is not None else record.get("load_spec")
        if not spec:
            raise AttnscanError(
                f"the detector was trained on an in-memory model ('{record.get('spec')}') that cannot be loaded "
                "again: pass the model (model=... or --model)"
            )
        revision = load.revision
        if model is None and record.get("kind") == "hub" and revision is None:
            revision = record.get("resolved_revision") or record.get("revision")
        load = dataclasses.replace(load, dtype=_scoring_dtype(dtype, load, trained), revision=revision)
        model = str(spec)
    loaded = resolve_model(model, load)
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


def _scoring_dtype(dtype: str | None, load: LoadOptions, trained: str | None) -> Any:
    """The dtype to load a model in for scoring: ``dtype`` when given, else ``load.dtype`` when it is not
    ``"auto"``, else the training dtype (:func:`~attnscan.detect.store.trained_dtype`) when it is a known one, else
    ``"auto"``."""
    from ..models.loading import DTYPES

    if dtype is not None:
        return dtype
    if load.dtype != "auto":
        return load.dtype
    return trained if trained is not None and trained in DTYPES else "auto"


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


# --------------------------------------------------------------------------------------------------- trained detector


@dataclass
class TrainedDetector:
    """Per-layer detectors from :func:`train_detector` and how they were made.

    ``table``: the cross-validated :func:`~attnscan.detect.metrics.layer_detection_table` (one row per layer);
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
    def cv(self) -> str:
        """The folds behind the main numbers: ``"grouped"`` or ``"stratified"`` (detectors that record none were
        cross-validated with stratified folds)."""
        return str(self.meta.get("training", {}).get("cv", "stratified"))

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

    @property
    def families(self) -> pd.DataFrame | None:
        """The flag rates per family and risky benign prompts at the operating point (``families.csv``), if any."""
        record = self.meta.get("families")
        return pd.DataFrame(record["rows"]) if isinstance(record, dict) and record.get("rows") else None

    def training_prompts(self) -> tuple[list[str], np.ndarray] | None:
        """The training prompts and their labels (``train_prompts.jsonl``), or None for a detector saved without
        them (or not saved)."""
        path = self.path / TRAIN_PROMPTS if self.path is not None else None
        if path is None or not path.is_file():
            return None
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            texts, labels = [str(r["text"]) for r in rows], np.asarray([int(r["label"]) for r in rows])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise AttnscanError(f"{path} is damaged ({exc}): train the detector again") from None
        return texts, labels

    def check_layers(self, layers: str | Sequence[int] | None) -> tuple[int, ...]:
        """Resolve ``None``/``"all"``/``"3,7"``/a list against the detector's layers (all must be in it)."""
        from ..models.loading import parse_layers

        if layers is None or (isinstance(layers, str) and layers.strip().lower() in ("", "all")):
            return self.layers
        n_layers = int(self.meta.get("model", {}).get("n_layers") or max(self.layers) + 1)
        chosen = parse_layers(layers, n_layers)
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
    """Read a detector directory written by :func:`train_detector` (damaged files: one error line naming it)."""
    with reading(Path(path), "detector directory", "train it again with 'attnscan detect train'"):
        return _load_trained(Path(path))


def _load_trained(root: Path) -> TrainedDetector:
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
    with reading(csv_path, "detection table", "train the detector again with 'attnscan detect train'"):
        table = pd.read_csv(csv_path) if csv_path.is_file() else pd.DataFrame()
    return TrainedDetector(
        table=table,
        detectors={k: v for k, v in cp.items() if isinstance(v, CPDetector)},
        probes={k: v for k, v in probes.items() if isinstance(v, ProbeDetector)},
        meta=meta,
        path=root,
    )


def save_trained(
    final: Path,
    overwrite: bool,
    cps: Mapping[int, CPDetector],
    probes: Mapping[int, ProbeDetector],
    table: pd.DataFrame,
    meta: Mapping[str, Any],
    *,
    tables: Mapping[str, pd.DataFrame] | None = None,
    prompts: tuple[Sequence[str], Sequence[int] | np.ndarray] | None = None,
) -> None:
    """Write a detector directory (what :func:`load_trained` reads) to ``final`` atomically: the CP detectors
    ``cps`` at its top, the ``probes`` in ``probe/``, both with ``meta``, the detection ``table`` as
    ``detection.csv``, more ``tables`` by file name, and the training ``prompts`` (texts, labels) as
    ``train_prompts.jsonl``. An existing detector is replaced only with ``overwrite``."""
    with atomic_dir(final, overwrite, marker=META_FILE, what="a detector") as tmp:
        staged = save_detector(tmp / ".cp", cps, {**meta, "detector": "cp"})
        for name in (STATE_FILE, META_FILE):
            os.replace(staged / name, tmp / name)
        staged.rmdir()
        save_detector(tmp / PROBE_DIR, probes, {**meta, "detector": "probe"})
        table.to_csv(tmp / DETECTION_CSV, index=False, float_format="%.6g")
        for name, extra in (tables or {}).items():
            extra.to_csv(tmp / name, index=False, float_format="%.6g")
        if prompts is not None:
            lines = (json.dumps({"text": t, "label": int(v)}) for t, v in zip(*prompts, strict=True))
            (tmp / TRAIN_PROMPTS).write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def prompt_hash(text: str) -> str:
    """The short hash of a prompt that ``meta["train_prompt_hashes"]`` lists."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
