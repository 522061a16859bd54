"""The ``attnscan`` command line: a thin typer app over the library."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.table import Table

from ..engine.accumulate import DEFAULT_FLOOR
from ..errors import AttnscanError
from ..prompts.encoding import DEFAULT_LENGTH
from .options import (
    AlignOpt,
    AssistantOpt,
    BatchOpt,
    ChatOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    FloorOpt,
    LayersOpt,
    LengthOpt,
    LimitOpt,
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
    check_numbers,
    quiet_libraries,
    user_errors,
)

app = typer.Typer(
    name="attnscan",
    help="Layer-by-layer attention shifts of language models under jailbreak prompts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """attnscan: see how attention changes, layer by layer, when a request is wrapped in a jailbreak."""


@app.command("scan")
def scan_cmd(
    out: Annotated[Path, typer.Option(help="Directory for the results bundle (created atomically).")],
    benign: SourceOpt = None,
    jailbreak: SourceOpt = None,
    control: SourceOpt = None,
    jailbreak_templates: TemplatesOpt = None,
    requests: RequestsOpt = None,
    model: ModelOpt = "smollm2-135m-instruct",
    field: FieldOpt = None,
    multiline: MultilineOpt = False,
    assistant_name: AssistantOpt = "ChatGPT",
    limit: LimitOpt = None,
    layers: LayersOpt = "all",
    length: LengthOpt = DEFAULT_LENGTH,
    batch_size: BatchOpt = "8",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: Annotated[
        str | None, typer.Option(help="'auto' spreads a model over several GPUs and the CPU (accelerate).")
    ] = None,
    max_memory: Annotated[str | None, typer.Option(help="With --device-map: e.g. 0=20GiB,1=20GiB,cpu=60GiB.")] = None,
    chat_template: ChatOpt = True,
    system_prompt: SystemOpt = None,
    truncate: TruncateOpt = "head",
    align: AlignOpt = "absolute",
    padding_side: PaddingOpt = "right",
    floor: FloorOpt = DEFAULT_FLOOR,
    revision: RevisionOpt = None,
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    seed: SeedOpt = 0,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint directory (default: OUT.ckpt beside the bundle).")
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Save a checkpoint every N batches (0: never).")] = 20,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted scan from its checkpoint.")] = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Capture attention maps of benign and jailbreak (and control) prompts and write a results bundle.

    Under torchrun (torchrun --nproc-per-node N -m attnscan scan ...) every process scans a shard of the prompts
    and rank 0 writes the bundle.
    """
    import shutil

    from .._io import check_output_dir
    from ..analysis.scan import scan
    from ..engine import distributed
    from ..models.loading import parse_max_memory
    from ..prompts.sets import prompt_sets
    from .progress import prompt_progress

    main_rank = int(os.environ.get("RANK", "0")) == 0
    ckpt_dir = checkpoint if checkpoint is not None else out.with_name(out.name + ".ckpt")
    with user_errors():
        check_output_dir(out, overwrite)
        size = batch_size_option(batch_size)
        check_numbers(length, size or 1)
        if checkpoint_every < 0:
            raise AttnscanError(f"--checkpoint-every must be 0 or more, got {checkpoint_every}")
        sets = prompt_sets(
            benign,
            jailbreak,
            control,
            jailbreak_templates=jailbreak_templates,
            requests=requests,
            field=field,
            multiline=multiline,
            assistant_name=assistant_name,
            limit=limit,
            seed=seed,
        )
        quiet_libraries()
        notice = Console(stderr=True, quiet=quiet or not main_rank).log
        if not resume and (ckpt_dir / "rank0.safetensors").is_file():
            notice(f"a checkpoint of an earlier scan is in {ckpt_dir}; starting over (pass --resume to continue it)")
        with prompt_progress(quiet or not main_rank) as progress:
            result = scan(
                model,
                sets["benign"],
                sets["jailbreak"],
                sets.get("control"),
                layers=layers,
                length=length,
                batch_size=size,
                dtype=dtype,
                device=device,
                device_map=device_map,
                max_memory=parse_max_memory(max_memory),
                checkpoint=ckpt_dir if checkpoint_every else None,
                checkpoint_every=max(checkpoint_every, 1),
                resume=resume,
                on_notice=notice,
                chat_template=chat_template,
                system_prompt=system_prompt,
                truncate=truncate,  # type: ignore[arg-type]
                align=align,  # type: ignore[arg-type]
                padding_side=padding_side,  # type: ignore[arg-type]
                floor=floor,
                revision=revision,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                seed=seed,
                progress=progress,
            )
        if main_rank:
            result.save(out, overwrite=overwrite)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        distributed.teardown()
    if main_rank:
        counts = ", ".join(f"{k} {v.n_prompts} prompts" for k, v in result.sets.items())
        typer.echo(f"wrote {out}: {len(result.layers)} layers x T={result.length}, {counts}")


@app.command("run")
def run_cmd(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model spec; repeat to put several models in one figure."),
    ] = None,
    benign: SourceOpt = "builtin:benign",
    jailbreak: SourceOpt = "builtin:jailbreak",
    control: SourceOpt = "builtin:control",
    no_control: Annotated[bool, typer.Option(help="Skip the control set (wrappers around benign requests).")] = False,
    out: Annotated[Path, typer.Option(help="Output directory for bundles, figures and tables.")] = Path("attnscan-out"),
    rows: Annotated[str, typer.Option(help="Figure rows: 'auto' or MODEL:LAYER,...")] = "auto",
    limit: Annotated[int | None, typer.Option(help="Prompts per set (deterministic by --seed).")] = 40,
    layers: LayersOpt = "all",
    length: LengthOpt = DEFAULT_LENGTH,
    batch_size: BatchOpt = "8",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    chat_template: ChatOpt = True,
    system_prompt: SystemOpt = None,
    align: AlignOpt = "relative",
    permutations: Annotated[int, typer.Option(help="Permutations per layer test.")] = 1000,
    detect: Annotated[
        bool, typer.Option(help="Also train per-layer jailbreak detectors on hidden states and plot their AUROC.")
    ] = True,
    alpha: Annotated[
        float, typer.Option(help="Verdicts: a layer is significant when its BH q-value is below this.")
    ] = 0.05,
    consistency: Annotated[
        float, typer.Option(help="Verdicts: share of cells that must move one way for vulnerable or resilient.")
    ] = 0.70,
    tol: Annotated[
        float, typer.Option(help="Verdicts: a cell moves when its log difference exceeds this (nats).")
    ] = 0.05,
    seed: SeedOpt = 0,
    allow_pickle: PickleOpt = False,
    trust_remote_code: RemoteOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The main job: scan, statistics, verdicts, the reference-style figure and a summary of the top layers."""
    from ..analysis.statistics import VerdictThresholds
    from ..pipeline import run
    from .progress import prompt_progress

    models = model or ["smollm2-135m-instruct"]
    console = Console(stderr=True, quiet=quiet)
    with user_errors():
        size = batch_size_option(batch_size)
        check_numbers(length, size or 1)
        if permutations < 100:
            raise AttnscanError(f"--permutations must be at least 100, got {permutations}")
        quiet_libraries()
        with prompt_progress(quiet) as progress:
            output = run(
                models,
                benign=benign or "builtin:benign",
                jailbreak=jailbreak or "builtin:jailbreak",
                control=None if no_control else control,
                out=out,
                rows=rows,
                overwrite=overwrite,
                limit=limit,
                seed=seed,
                n_permutations=permutations,
                detect=detect,
                thresholds=VerdictThresholds(alpha=alpha, consistency=consistency, tol=tol),
                progress=progress,
                on_model=lambda label: console.log(f"scanning {label}"),
                layers=layers,
                length=length,
                batch_size=size,
                dtype=dtype,
                device=device,
                chat_template=chat_template,
                system_prompt=system_prompt,
                align=align,  # type: ignore[arg-type]
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
            )
    Console().print(summary_table(output.tables))
    for line in output.observations:
        typer.echo(f"- {line}")
    typer.echo(
        f"wrote {out}/ (figure.png, layers.png, report.html, summary.csv, observations.md, one bundle per model)"
    )


_SHORT_VERDICTS = {"no significant shift": "n.s."}


def summary_table(tables: dict[str, Any], top: int = 5) -> Group:
    """Rich tables of each model's top layers (one table a model): significant ones by rank, else the largest shifts.

    Sized for an 80-column terminal: the shift is the block shift in nats with its bootstrap 95 % interval, and
    ``%+`` / ``%-`` are the shares of cells where jailbreak attention is higher / lower."""
    styles = {"vulnerable": "red", "resilient": "blue", "mixed": "magenta", "no significant shift": "dim"}
    out = []
    for label, frame in tables.items():
        table = Table(title=f"Top layers of {label} (jailbreak vs benign)", title_justify="left")
        for col in ("layer", "verdict", "shift [95% CI]", "effect", "q", "%+", "%-"):
            table.add_column(col, justify="left" if col == "verdict" else "right", no_wrap=True)
        order = frame.assign(_k=frame["rank"].fillna(1e9), _e=-frame["signed_shift"].abs()).sort_values(["_k", "_e"])
        for _, row in order.head(top).iterrows():
            q = min(row["q_signed"], row["q_abs"])
            table.add_row(
                str(int(row["layer"])),
                f"[{styles.get(row['verdict'], '')}]{_SHORT_VERDICTS.get(row['verdict'], row['verdict'])}",
                f"{row['signed_shift']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]",
                f"{row['effect']:+.2f}",
                f"{q:.2g}",
                f"{row['frac_pos']:.0%}",
                f"{row['frac_neg']:.0%}",
            )
        if (order.head(top)["verdict"] == "no significant shift").any():
            table.caption, table.caption_justify = "n.s.: no significant shift", "left"
        out.append(table)
    return Group(*out)


@app.command("figure")
def figure_cmd(
    dirs: Annotated[list[Path], typer.Argument(help="Results bundles or run directories.")],
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


@app.command("report")
def report_cmd(
    dirs: Annotated[list[Path], typer.Argument(help="Results bundles or run directories.")],
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


def _register_more_commands() -> None:
    from . import behave as cli_behave
    from . import detect as cli_detect

    cli_detect.register(app)
    cli_behave.register(app)


_register_more_commands()


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    run()
