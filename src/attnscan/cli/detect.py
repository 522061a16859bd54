"""``attnscan detect train|score|eval``: thin commands over :mod:`attnscan.detect.jobs` (registered on the app's
``detect`` group by :mod:`attnscan.cli.main`); what they print is drawn by :mod:`attnscan.cli.detect_tables`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import AttnscanError
from ..prompts.encoding import DEFAULT_LENGTH
from .detect_tables import evaluation_lines, families_table, layer_rich_table, training_lines
from .options import (
    AssistantOpt,
    BootstrapOpt,
    ChatOpt,
    DetectorArg,
    DetectorBatchOpt,
    DetectorLengthOpt,
    DetectorModelOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    GroupsOpt,
    LayersOpt,
    LimitOpt,
    ModelOpt,
    MultilineOpt,
    OtherModelOpt,
    OverwriteFileOpt,
    PickleOpt,
    QuietOpt,
    RemoteOpt,
    RequestsOpt,
    RevisionOpt,
    ScoreDtypeOpt,
    SeedOpt,
    SourceOpt,
    SystemOpt,
    TemplatesOpt,
    function_keywords,
    load_keywords,
    quiet_libraries,
    read_prompt_sets,
    user_errors,
)

if TYPE_CHECKING:
    from ..detect.store import TrainedDetector

__all__ = ["eval_cmd", "layer_rich_table", "score_cmd", "train_cmd"]

# --------------------------------------------------------------------------------------------------- train

TrainOutOpt = Annotated[Path, typer.Option(help="Directory for the detector (created atomically).")]
FeaturesOpt = Annotated[
    str, typer.Option(help="'hidden' (residual stream) or 'attention' (per-prompt log-attention blocks).")
]
RankOpt = Annotated[int, typer.Option(help="Components of the CP decomposition.")]
MaxIterOpt = Annotated[int, typer.Option(help="Most ALS iterations of the CP decomposition.")]
LastKOpt = Annotated[int, typer.Option(help="Hidden features: the prompt's last K token positions.")]
BlocksOpt = Annotated[int, typer.Option(help="Attention features: B x B blocks of the token grid.")]
PoolOpt = Annotated[
    str | None,
    typer.Option(
        help="Hidden features: the probe reads each prompt's hidden states averaged over its 'last' K tokens "
        "(default), its 'request' tokens (the request inside a composed prompt; a plain prompt's own text), or all "
        "its tokens ('mean')."
    ),
]
BandOpt = Annotated[
    int | None,
    typer.Option(
        help="Also report a probe on each layer's band: its pooled features joined with those of this many chosen "
        "layers on each side (band_* columns; not saved)."
    ),
]
FoldsOpt = Annotated[int, typer.Option(help="Cross-validation folds.")]
FlagThresholdOpt = Annotated[float, typer.Option(help="Flag a layer whose cross-validated AUROC reaches this.")]
FlagOnOpt = Annotated[str, typer.Option(help="Flag and score with the 'cp' detector or the 'probe'.")]
DetectorTruncateOpt = Annotated[str, typer.Option(help="Keep the 'head' or the 'tail' (default) of long prompts.")]
TrainTopOpt = Annotated[int, typer.Option(help="Layers shown in the summary table.")]
TrainOverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing detector in --out.")]
ControlOpt = Annotated[
    str | None,
    typer.Option(
        help="Template-matched negatives: the jailbreak wrappers around harmless requests (e.g. builtin:control), "
        "added to the benign side so that only the request can tell the classes apart."
    ),
]
CvOpt = Annotated[
    str,
    typer.Option(
        help="'grouped' (hold out whole template families, and beside them whole requests, when the prompts carry "
        "group labels) or 'stratified'."
    ),
]
FprOpt = Annotated[
    float | None,
    typer.Option(help="Calibrate the flagging threshold on the benign prompts for this false-positive rate."),
]
BaselinesOpt = Annotated[
    bool | None,
    typer.Option(
        "--baselines/--no-baselines",
        help="Prompt-length and TF-IDF text baselines on the same folds (default: when the prompts carry groups).",
    ),
]


def train_cmd(
    out: TrainOutOpt,
    benign: SourceOpt = None,
    jailbreak: SourceOpt = None,
    jailbreak_templates: TemplatesOpt = None,
    requests: RequestsOpt = None,
    control: ControlOpt = None,
    model: ModelOpt = "smollm2-135m-instruct",
    field: FieldOpt = None,
    multiline: MultilineOpt = False,
    groups: GroupsOpt = None,
    assistant_name: AssistantOpt = "ChatGPT",
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    layers: LayersOpt = "all",
    features: FeaturesOpt = "hidden",
    rank: RankOpt = 8,
    max_iter: MaxIterOpt = 100,
    last_k: LastKOpt = 8,
    pool: PoolOpt = None,
    band: BandOpt = None,
    blocks: BlocksOpt = 16,
    folds: FoldsOpt = 5,
    threshold: FlagThresholdOpt = 0.9,
    flag_on: FlagOnOpt = "probe",
    bootstrap: BootstrapOpt = 1000,
    cv: CvOpt = "grouped",
    fpr: FprOpt = 0.01,
    baselines: BaselinesOpt = None,
    length: DetectorLengthOpt = DEFAULT_LENGTH,
    batch_size: DetectorBatchOpt = 8,
    chat_template: ChatOpt = True,
    system_prompt: SystemOpt = None,
    truncate: DetectorTruncateOpt = "tail",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    top: TrainTopOpt = 8,
    overwrite: TrainOverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train per-layer CP and probe detectors on benign vs jailbreak prompts and write them to --out."""
    flags = dict(locals())  # the parsed flags by name, for the library's inputs (see attnscan.cli.options)
    from ..detect.jobs import train_detector
    from ..detect.store import check_detector_dir
    from .progress import lazy_progress

    with user_errors():
        check_detector_dir(out, overwrite)
        sets = read_prompt_sets(flags)
        quiet_libraries()
        with lazy_progress(quiet) as progress:
            trained = train_detector(
                model,
                sets["benign"],
                sets["jailbreak"],
                n_bootstrap=bootstrap,
                progress=progress,
                control=sets.get("control"),
                **function_keywords(train_detector, flags, skip=("control",)),
                **load_keywords(flags),
            )
    _print_trained(trained, features, threshold, top, out)


def _print_trained(trained: TrainedDetector, features: str, threshold: float, top: int, out: Path) -> None:
    """The summary of ``detect train`` on stdout: the top layers beside the text baseline, the best and flagged
    ones, the baselines, operating point, flag rates per family and stability, and what was written."""
    from rich.console import Console

    by = f"{trained.primary}_auroc"
    title = f"Top layers by cross-validated {trained.primary.upper()} AUROC ({features} features)"
    console = Console()
    console.print(layer_rich_table(trained.table, title, top, by=by, primary=trained.primary))
    for line in training_lines(trained, threshold):
        typer.echo(line)
    if features == "hidden":
        typer.echo(f"probe pooling: {trained.meta['features'].get('pool', 'mean')}")
    if "band_auroc" in trained.table:
        row = trained.table.loc[trained.table["band_auroc"].idxmax()]
        typer.echo(
            f"band probe: best AUROC {row['band_auroc']:.3f} at layer {int(row['layer'])} (layers {row['band_layers']})"
        )
    families = trained.meta.get("families")
    if isinstance(families, dict) and len(families.get("rows", [])) > 2:
        title = f"Flag rates at the operating point (layer {families['layer']}, out-of-fold scores)"
        console.print(families_table(families["rows"], title))
    written = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())) if out.is_dir() else ""
    typer.echo(f"wrote {out} ({written})")


# --------------------------------------------------------------------------------------------------- score

PromptsOpt = Annotated[str, typer.Option(help="Prompts to score: builtin:NAME, a file, or hf:DS:SPLIT:COL.")]
ScoreOutOpt = Annotated[Path, typer.Option(help="CSV file for the scores (written atomically).")]
ScoreLayerOpt = Annotated[int | None, typer.Option(help="Layer to score at (default: the best layer).")]
KindOpt = Annotated[
    str | None, typer.Option("--detector", help="'cp' or 'probe' (default: the detector's primary kind).")
]
ProbThresholdOpt = Annotated[
    float | None,
    typer.Option(
        help="A prompt is flagged when its probability reaches this (default: the threshold calibrated at training "
        "for its false-positive rate, else 0.5)."
    ),
]


def score_cmd(
    detector: DetectorArg,
    prompts: PromptsOpt,
    out: ScoreOutOpt,
    model: DetectorModelOpt = None,
    layer: ScoreLayerOpt = None,
    kind: KindOpt = None,
    threshold: ProbThresholdOpt = None,
    field: FieldOpt = None,
    multiline: MultilineOpt = False,
    assistant_name: AssistantOpt = "ChatGPT",
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    batch_size: DetectorBatchOpt = 8,
    dtype: ScoreDtypeOpt = None,
    device: DeviceOpt = "auto",
    allow_other_model: OtherModelOpt = False,
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    overwrite: OverwriteFileOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write each prompt's jailbreak probability (one layer, one detector) to a CSV file."""
    flags = dict(locals())  # the parsed flags by name, for the library's inputs (see attnscan.cli.options)
    from ..detect.jobs import score_prompts
    from ..detect.store import check_output_file, load_trained, write_table
    from ..prompts.sets import load_prompts
    from .progress import lazy_progress

    with user_errors():
        check_output_file(out, overwrite)
        if kind is not None and kind not in ("cp", "probe"):
            raise AttnscanError(f"--detector must be cp or probe, got {kind}")
        trained = load_trained(detector)
        ps = load_prompts(
            prompts, "prompts", field=field, multiline=multiline, assistant_name=assistant_name, limit=limit, seed=seed
        )
        quiet_libraries()
        with lazy_progress(quiet) as progress:
            frame = score_prompts(
                trained,
                ps,
                model=model,
                layer=layer,
                kind=kind,  # type: ignore[arg-type]
                threshold=threshold,
                batch_size=batch_size,
                progress=progress,
                allow_other_model=allow_other_model,
                **load_keywords(flags),
            )
        write_table(frame, out, overwrite=overwrite)
    n_flag = int(frame["flagged"].sum())
    typer.echo(
        f"scored {len(frame)} prompts with the {frame.attrs['kind']} detector at layer {frame.attrs['layer']}: "
        f"{n_flag} flagged (prob >= {frame.attrs['threshold']:.3g}, {frame.attrs['threshold_from']}), "
        f"mean prob {frame['prob'].mean():.3f}"
    )
    typer.echo(f"wrote {out}")


# ---------------------------------------------------------------------------------------------------- eval

EvalLayersOpt = Annotated[str, typer.Option(help="'all' (the detector's layers), or layers such as 3,7.")]
EvalOutOpt = Annotated[Path | None, typer.Option(help="Also write the per-layer metrics to this CSV file.")]
EvalJsonOpt = Annotated[
    Path | None,
    typer.Option(
        "--json",
        help="Also write the headline (trained layer beside the length and text baselines, margin, flag rates at the "
        "saved threshold) and the per-family rates to this JSON file.",
    ),
]
EvalTopOpt = Annotated[
    int, typer.Option(help="Layers shown in the per-layer table: those nearest the trained layer, in layer order.")
]


def eval_cmd(
    detector: DetectorArg,
    benign: SourceOpt = None,
    jailbreak: SourceOpt = None,
    jailbreak_templates: TemplatesOpt = None,
    requests: RequestsOpt = None,
    model: DetectorModelOpt = None,
    layers: EvalLayersOpt = "all",
    field: FieldOpt = None,
    multiline: MultilineOpt = False,
    groups: GroupsOpt = None,
    assistant_name: AssistantOpt = "ChatGPT",
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    bootstrap: BootstrapOpt = 1000,
    batch_size: DetectorBatchOpt = 8,
    dtype: ScoreDtypeOpt = None,
    device: DeviceOpt = "auto",
    allow_other_model: OtherModelOpt = False,
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    out: EvalOutOpt = None,
    json_out: EvalJsonOpt = None,
    top: EvalTopOpt = 10,
    overwrite: OverwriteFileOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate the saved detectors (no refitting) on a new labelled set, e.g. prompts from another source."""
    flags = dict(locals())  # the parsed flags by name, for the library's inputs (see attnscan.cli.options)
    from ..detect.jobs import evaluate_detector
    from ..detect.store import check_output_file, load_trained, write_table
    from .progress import lazy_progress

    with user_errors():
        for path in (out, json_out):
            if path is not None:
                check_output_file(path, overwrite)
        if out is not None and json_out is not None and out.resolve() == json_out.resolve():
            raise AttnscanError("--out and --json name the same file: give each its own")
        trained = load_trained(detector)
        sets = read_prompt_sets(flags)
        quiet_libraries()
        with lazy_progress(quiet) as progress:
            frame = evaluate_detector(
                trained,
                sets["benign"],
                sets["jailbreak"],
                model=model,
                layers=layers,
                n_bootstrap=bootstrap,
                seed=seed,
                batch_size=batch_size,
                progress=progress,
                allow_other_model=allow_other_model,
                **load_keywords(flags),
            )
        if out is not None:
            write_table(frame, out, overwrite=overwrite)
        if json_out is not None:
            _write_evaluation_json(frame, detector, json_out)
    _print_evaluation(frame, trained, len(sets["benign"]), len(sets["jailbreak"]), top, out)
    if json_out is not None:
        typer.echo(f"wrote {json_out}")


def _write_evaluation_json(frame: Any, detector: Path, path: Path) -> None:
    """The headline and per-family rates of ``detect eval`` as JSON, written atomically (NaN becomes null)."""
    import math

    from .._io import atomic_file, write_json

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalars
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    families = frame.attrs["families"]
    rows = families.to_dict("records") if hasattr(families, "to_dict") else list(families)
    doc = {"format": "attnscan.detect-eval", "detector": str(detector), "headline": frame.attrs["headline"]}
    doc["families"] = rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        write_json(tmp, plain(doc))


def _print_evaluation(frame: Any, trained: TrainedDetector, n_b: int, n_j: int, top: int, out: Path | None) -> None:
    """The summary of ``detect eval`` on stdout: the headline (the trained layer's detector beside the baselines),
    the flag rates per family, then every layer for reading."""
    from rich.console import Console

    console = Console()
    for line in evaluation_lines(frame.attrs["headline"], n_b, n_j):
        typer.echo(line)
    if len(frame.attrs["families"]) > 2:
        console.print(families_table(frame.attrs["families"], "Flag rates at the saved threshold"))
    title = (
        f"Every layer on these prompts, for reading only (the detector is layer {trained.best_layer}, chosen in "
        "training; picking a layer here would overrate it)"
    )
    console.print(layer_rich_table(frame, title, top, extra=True, primary=trained.primary))
    if out is not None:
        typer.echo(f"wrote {out}")
