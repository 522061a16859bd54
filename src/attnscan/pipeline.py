"""``run``: the main job. Scan one or more models, compute the layer statistics, draw the reference-style figure.

Output directory (default ``attnscan-out/``), written atomically as a whole:

- ``manifest.json``: what ran (models, prompt sets, options, versions, timestamps) and where each part is;
- ``<model>/``: one results bundle per model (see :mod:`attnscan.analysis.result`), its ``layers.csv`` with the
  statistics of jailbreak vs benign and, with a control set, ``effects.csv``: per layer the request effect
  (``request_*`` columns, jailbreak vs control) and the wrapper effect (``wrapper_*``, control vs benign);
- ``summary.csv``: every model's layer table, one row per (model, layer);
- ``figure.png``: Benign / Jailbreak / Difference rows for the chosen (model, layer) pairs;
- ``layers.png``: the signed shift with its 95 % interval against relative layer depth, one line per model;
- ``observations.md``: the observations generated from the numbers (with a control set they lead with the request
  effect, then the wrapper effect, then the combined jailbreak-vs-benign shift);
- ``report.html``: the self-contained interactive report (see :mod:`attnscan.views.report`).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_dir, check_output_dir, now_utc, write_json
from ._types import ProgressFn, refuse_leftovers, take_options
from ._version import __version__
from .analysis.observations import observations
from .analysis.result import ScanResult
from .analysis.scan import ScanOptions, scan
from .analysis.statistics import VerdictThresholds, effects_table, layer_table
from .engine.accumulate import Align
from .errors import AttnscanError
from .models.loading import LoadedModel, LoadOptions, resolve_model
from .prompts.sets import PromptSet, load_prompts
from .rundir import (
    DETECTOR_DIR,
    RUN_KIND,
    load_bundles,
    parse_rows,
    prompts_from_manifest,
    stored_detection,
    stored_table,
)
from .views.digest import DEFAULT_TITLE, EXAMPLES
from .views.labels import unique_label
from .views.report import build_report, write_report
from .views.run_figures import draw

DEFAULT_LIMIT = 40


@dataclass
class RunOutput:
    """What :func:`run` produced: per-model results and tables, the observations, and the files written."""

    out: Path
    results: dict[str, ScanResult]
    tables: dict[str, Any]  # model label -> pandas DataFrame from layer_table
    effects: dict[str, Any] = field(default_factory=dict)  # model label -> effects_table (control scans)
    rows: list[tuple[str, int]] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)


def compare_models(tables: Mapping[str, Any], results: Mapping[str, ScanResult]) -> list[str]:
    """One sentence on each model's largest |signed block shift| (jailbreak vs benign, the measure the layer profile
    draws), with the layer's relative depth, for side-by-side reading."""
    if len(tables) < 2:
        return []
    parts = []
    for label, table in tables.items():
        n_layers = (
            int(results[label].manifest.get("architecture", {}).get("n_layers", 0)) or int(table["layer"].max()) + 1
        )
        top = table.loc[table["signed_shift"].abs().idxmax()]
        depth = int(top["layer"]) / max(n_layers - 1, 1)
        parts.append(
            f"{label}: layer {int(top['layer'])} ({depth:.0%} depth), shift {top['signed_shift']:+.2f} nats, "
            f"verdict {top['verdict']}"
        )
    return [
        "Largest |signed block shift| per model, jailbreak vs benign (the layer profile's measure) — "
        + "; ".join(parts)
        + "."
    ]


def run(
    models: Sequence[str | LoadedModel],
    *,
    benign: str | PromptSet = "builtin:benign",
    jailbreak: str | PromptSet = "builtin:jailbreak",
    control: str | PromptSet | None = "builtin:control",
    out: str | Path = "attnscan-out",
    rows: str = "auto",
    overwrite: bool = False,
    limit: int | None = DEFAULT_LIMIT,
    seed: int = 0,
    n_permutations: int = 1000,
    dpi: int = 200,
    align: Align = "relative",
    detect: bool = False,
    thresholds: VerdictThresholds | None = None,
    progress: ProgressFn | None = None,
    on_model: Callable[[str], None] | None = None,
    options: ScanOptions | None = None,
    load: LoadOptions | None = None,
    **keywords: Any,
) -> RunOutput:
    """Scan every model on the prompt sets, compute the statistics and write the run directory (module docstring).

    ``options`` (:class:`~attnscan.analysis.scan.ScanOptions`) and ``load``
    (:class:`~attnscan.models.loading.LoadOptions`) go to :func:`attnscan.scan`; their fields may also be given as
    keywords (``layers``, ``length``, ``batch_size``, ``dtype``, ``device``, ``chat_template``, ...). ``seed`` and
    ``align`` here win over ``options``'. Prompt sources are subsampled to ``limit`` prompts each with ``seed``.

    ``align`` defaults to ``"relative"`` here (``scan`` defaults to ``"absolute"``): the built-in benign requests
    are a few dozen tokens long and the jailbreak prompts a few hundred, so in absolute alignment their maps share
    only the first few dozen positions; relative alignment compares whole prompts over the whole grid, as the
    reference figure does, and keeps every stretched row a probability distribution so that length alone does not
    shift the maps (see :mod:`attnscan.engine.accumulate`).

    ``match_length`` (a field of :class:`~attnscan.analysis.scan.ScanOptions`) scans only prompts paired by token
    length across the sets (:mod:`attnscan.analysis.lengths`); the detectors of ``detect`` still train on the whole
    sets.

    ``thresholds`` decide the verdicts (:class:`attnscan.analysis.statistics.VerdictThresholds`: q level, share of
    cells that must move one way, cell tolerance).

    With ``detect`` each model also gets per-layer jailbreak detectors trained on its hidden states (benign vs
    jailbreak, :func:`attnscan.detect.jobs.train_detector` with the scan's layers, length and chat template), saved
    as ``<model>/detector/``; their cross-validated AUROC is drawn under the layer profile and shown in the report.
    With a control set, the best layer's detector also scores the control prompts (benign requests inside the same
    jailbreak wrappers): the share it flags tells whether it reacts to the wrapper or to the request.
    """
    keywords_given = list(keywords)
    opts = dataclasses.replace(take_options(ScanOptions, options, keywords), seed=seed, align=align)
    load = take_options(LoadOptions, load, keywords)
    refuse_leftovers("run", keywords)
    if not models:
        raise AttnscanError("no model given: pass --model at least once")
    out = Path(out)
    check_output_dir(out, overwrite)
    started = now_utc()
    recorded = {
        "limit": limit,
        "seed": seed,
        "rows": rows,
        "n_permutations": n_permutations,
        "align": align,
        "detect": detect,
        "thresholds": dataclasses.asdict(thresholds or VerdictThresholds()),
        **_recorded(opts, load, keywords_given),
    }
    sets = _load_sets(benign, jailbreak, control, limit, seed)
    job = _Job(out, overwrite, sets, rows, seed, n_permutations, dpi, thresholds, started, recorded)
    staging = Path(tempfile.mkdtemp(prefix="attnscan-detect-")) if detect else None
    try:
        return _write_run(job, _scan_models(models, sets, opts, load, staging, progress, on_model), staging)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class _Job:
    """What :func:`run` writes and how: where, the prompt sets, the ``--rows`` choice, the statistics' settings, the
    start time and the options recorded in ``manifest.json``."""

    out: Path
    overwrite: bool
    sets: Mapping[str, PromptSet]
    rows: str
    seed: int
    n_permutations: int
    dpi: int
    thresholds: VerdictThresholds | None
    started: str
    options: Mapping[str, Any]


def _load_sets(
    benign: str | PromptSet,
    jailbreak: str | PromptSet,
    control: str | PromptSet | None,
    limit: int | None,
    seed: int,
) -> dict[str, PromptSet]:
    """The run's prompt sets by name (``benign``, ``jailbreak`` and, when given, ``control``), each subsampled to
    ``limit`` prompts with ``seed``."""
    sets = {
        "benign": load_prompts(benign, "benign", limit=limit, seed=seed),
        "jailbreak": load_prompts(jailbreak, "jailbreak", limit=limit, seed=seed),
    }
    if control is not None:
        sets["control"] = load_prompts(control, "control", limit=limit, seed=seed)
    return sets


@dataclass
class _Scanned:
    """The scans of a run by model label, with each model's detection table and sentence (``detect`` only)."""

    results: dict[str, ScanResult] = field(default_factory=dict)
    detection: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _scan_models(
    models: Sequence[str | LoadedModel],
    sets: Mapping[str, PromptSet],
    opts: ScanOptions,
    load: LoadOptions,
    staging: Path | None,
    progress: ProgressFn | None,
    on_model: Callable[[str], None] | None,
) -> _Scanned:
    """Scan every model on ``sets``; with ``staging`` (``detect``) also train each model's detectors into
    ``staging / label``, loading the model once for both."""
    scanned = _Scanned()
    for model in models:
        spec = model.spec if isinstance(model, LoadedModel) else str(model)
        label = unique_label(spec, scanned.results)
        if on_model is not None:
            on_model(label)
        target: str | LoadedModel = model
        if staging is not None:  # load once for the scan and the detectors
            target = resolve_model(model, load)
        scanned.results[label] = scan(
            target,
            sets["benign"],
            sets["jailbreak"],
            sets.get("control"),
            options=opts,
            load=load,
            progress=progress,
        )
        if staging is not None and isinstance(target, LoadedModel):
            table, note = _detect(target, sets, staging / label, opts, progress)
            scanned.detection[label] = table
            scanned.notes.append(note if len(models) == 1 else f"{label}: {note}")
    return scanned


def _recorded(opts: ScanOptions, load: LoadOptions, names: Sequence[str]) -> dict[str, Any]:
    """The scan and load options the caller set (by keyword or in the option objects), for ``manifest.json``."""
    values = {**dataclasses.asdict(load), **dataclasses.asdict(opts)}
    defaults = {**dataclasses.asdict(LoadOptions()), **dataclasses.asdict(ScanOptions())}
    chosen = {k: v for k, v in values.items() if k in names or (v != defaults[k] and k not in ("seed", "align"))}
    return {k: v for k, v in chosen.items() if isinstance(v, (str, int, float, bool, type(None)))}


def _detect(
    loaded: LoadedModel,
    sets: Mapping[str, PromptSet],
    where: Path,
    opts: ScanOptions,
    progress: ProgressFn | None,
) -> tuple[Any, str]:
    """Train the detectors of one model into ``where`` with the scan's layers, length and chat template; return
    their table and sentences on them.

    With a control set (the jailbreak wrappers around harmless requests) the control prompts join the benign side
    as template-matched negatives, so a detector has to find the harmful request inside a wrapper; the
    cross-validation holds out whole template families when the prompts carry group labels, and the detectors are
    compared with a prompt-length and a TF-IDF text baseline on the same folds."""
    from .detect.jobs import train_detector
    from .detect.summary import detection_note

    control = sets.get("control")
    trained = train_detector(
        loaded,
        sets["benign"],
        sets["jailbreak"],
        out=where,
        seed=opts.seed,
        batch_size=opts.batch_size or 8,
        progress=progress,
        layers=opts.layers,
        length=opts.length,
        chat_template=opts.chat_template,
        system_prompt=opts.system_prompt,
        control=control,
        fpr=0.01,
        baselines=True,  # a detector is reported beside what the prompt text alone gives, labelled prompts or not
        folds=3,  # three grouped, request and stratified cross-validations per layer: 3 folds keep the main job short
    )
    return trained.table, detection_note(trained, control is not None)


def _notes(
    tables: Mapping[str, Any],
    results: Mapping[str, ScanResult],
    extra: Sequence[str] = (),
    effects: Mapping[str, Any] | None = None,
) -> list[str]:
    """The observations of every model's table (leading with the request effect of ``effects[label]`` for a
    control scan), then the comparison of the models and ``extra`` sentences, before the last observation (the
    closing caveat)."""
    notes: list[str] = []
    for label, table in tables.items():
        name = label if len(tables) > 1 else None
        notes.extend(observations(table, results[label], model_name=name, effects=(effects or {}).get(label)))
    notes[-1:] = compare_models(tables, results) + list(extra) + notes[-1:]
    return notes


def _write_run(job: _Job, scanned: _Scanned, staging: Path | None) -> RunOutput:
    """Statistics, figures, report and tables of a run, written to ``job.out`` atomically."""
    results, detection = scanned.results, scanned.detection
    seed, n_permutations, thresholds = job.seed, job.n_permutations, job.thresholds
    tables = {
        k: layer_table(r, seed=seed, n_permutations=n_permutations, thresholds=thresholds) for k, r in results.items()
    }
    effects = {
        k: e
        for k, r in results.items()
        if (e := effects_table(r, seed=seed, n_permutations=n_permutations, thresholds=thresholds)) is not None
    }
    notes = _notes(tables, results, scanned.notes, effects)
    chosen = parse_rows(job.rows, list(results))
    with atomic_dir(job.out, overwrite=job.overwrite) as tmp:
        for label, result in results.items():
            result.save(tmp / label, table=tables[label])
            if label in effects:
                effects[label].to_csv(tmp / label / "effects.csv", index=False, float_format="%.6g")
            if staging is not None and (staging / label).is_dir():
                shutil.move(str(staging / label), str(tmp / label / DETECTOR_DIR))
        import pandas as pd

        summary = pd.concat([t.assign(model=k) for k, t in tables.items()], ignore_index=True)
        summary.to_csv(tmp / "summary.csv", index=False, float_format="%.6g")
        shown = draw(results, tables, chosen, tmp / "figure.png", tmp / "layers.png", dpi=job.dpi, detection=detection)
        prompts = {label: {k: list(v.texts) for k, v in job.sets.items()} for label in results}
        write_report(tmp / "report.html", build_report(results, tables, notes, prompts=prompts, detection=detection))
        (tmp / "observations.md").write_text(
            "# Observations\n\n" + "\n".join(f"- {line}" for line in notes) + "\n", encoding="utf-8"
        )
        write_json(tmp / "manifest.json", _run_manifest(job, results, shown))
    return RunOutput(out=job.out, results=results, tables=tables, effects=effects, rows=shown, observations=notes)


def _run_manifest(job: _Job, results: Mapping[str, ScanResult], shown: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """The run directory's ``manifest.json``: what ran, with which options, and where each part is."""
    return {
        "kind": RUN_KIND,
        "attnscan_version": __version__,
        "models": {k: {"spec": r.manifest.get("model", {}).get("spec"), "bundle": k} for k, r in results.items()},
        "prompt_sets": {k: v.provenance() for k, v in job.sets.items()},
        "options": dict(job.options),
        "figure": "figure.png",
        "profile": "layers.png",
        "report": "report.html",
        "rows": [list(r) for r in shown],
        "started": job.started,
        "finished": now_utc(),
    }


def make_report(
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    title: str | None = None,
    seed: int = 0,
    examples: int | None = None,
) -> Path:
    """Write one self-contained HTML report for saved bundles or run directories: the library twin of
    ``attnscan report``. Layer tables come from each bundle's ``layers.csv`` (computed when absent); prompt texts
    are reloaded from the sources the manifests record when they still match their sha256."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise AttnscanError(f"--out {out}: the report is an HTML file; give a name ending in .html")
    results = load_bundles(paths)
    tables = {label: stored_table(result, seed) for label, result in results.items()}
    effects = {label: e for label, result in results.items() if (e := _stored_effects(result)) is not None}
    notes = _notes(tables, results, effects=effects)
    prompts = {label: texts for label, result in results.items() if (texts := prompts_from_manifest(result))}
    detection = {label: t for label, result in results.items() if (t := stored_detection(result)) is not None}
    html_text = build_report(
        results,
        tables,
        notes,
        prompts=prompts,
        detection=detection,
        title=title or DEFAULT_TITLE,
        examples=EXAMPLES if examples is None else examples,
    )
    return write_report(out, html_text)


def _stored_effects(result: ScanResult) -> Any | None:
    """The effects table a run saved beside a bundle (``effects.csv``), if any; a control scan without one has its
    effects computed by the observations."""
    if result.path is None or not (result.path / "effects.csv").is_file():
        return None
    import pandas as pd

    return pd.read_csv(result.path / "effects.csv")
