"""``attnscan detect train|score|eval``: thin commands over :mod:`attnscan.detect_job` (see :func:`register`).

The shared option types live in :mod:`attnscan.cli`, which imports this module at its bottom; they are imported
inside :func:`register`, and the commands are defined there (without postponed annotations, so typer sees the
option types when the functions are made).
"""

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..prompts.encoding import DEFAULT_LENGTH

DetectorArg = Annotated[Path, typer.Argument(help="Detector directory written by 'attnscan detect train'.")]
ModelOrNoneOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Model spec (default: the model the detector was trained on).")
]
DetLengthOpt = Annotated[int, typer.Option(help="Most tokens per prompt; longer prompts keep their --truncate end.")]
DetBatchOpt = Annotated[int, typer.Option(help="Prompts per forward pass.")]
DetTruncateOpt = Annotated[str, typer.Option(help="Keep the 'head' or the 'tail' (default) of long prompts.")]
BootstrapOpt = Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% intervals.")]
ScoreDtypeOpt = Annotated[
    str | None,
    typer.Option(help="auto, float32, bfloat16 or float16 (default: the dtype the detector was trained with)."),
]
OtherModelOpt = Annotated[
    bool, typer.Option(help="Score with a model other than the training one (warns instead of refusing).")
]


@contextlib.contextmanager
def lazy_progress(quiet: bool, unit: str = "prompts") -> Iterator[Callable[[int, int, str], None] | None]:
    """:func:`attnscan.progress.prompt_progress`, drawn from the first update on: errors found before any work
    starts (bad options, layers, files) stay one clean line."""
    from .progress import prompt_progress

    if quiet:
        yield None
        return
    with contextlib.ExitStack() as stack:
        bar: list[Callable[[int, int, str], None] | None] = []

        def update(done: int, total: int, label: str) -> None:
            if not bar:
                bar.append(stack.enter_context(prompt_progress(False, unit)))
            if bar[0] is not None:
                bar[0](done, total, label)

        yield update


def _fmt_ci(value: float, low: float, high: float) -> str:
    if low != low or high != high:  # NaN: no bootstrap
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}-{high:.3f}]"


def layer_rich_table(frame: Any, title: str, top: int, by: str = "cp_auroc", extra: bool = False) -> Table:
    """The ``top`` layers of a detection or evaluation table by ``by`` (descending), as a rich table that fits an
    80-column terminal (two-line headers; the evaluation table, ``extra``, shows the cross-validated AUROC of
    training in place of F1)."""
    table = Table(title=title, title_justify="left")
    columns = ["layer", "CP AUROC\n[95% CI]", "CP\nTPR@5%"]
    columns += ["probe AUROC\n[95% CI]", "CV CP\nAUROC", "CV\nflag"] if extra else ["CP\nF1", "probe AUROC\n[95% CI]"]
    columns += [] if extra else ["flag"]
    for col in columns:
        table.add_column(col, justify="left" if "CI" in col or "flag" in col else "right", no_wrap=True)
    flag_col = "cv_flagged" if extra else "flagged"
    order = frame.assign(_by=frame[by].fillna(-1.0), _l=frame["layer"]).sort_values(
        ["_by", "_l"], ascending=[False, True]
    )
    for _, row in order.head(top).iterrows():
        probe = _fmt_ci(row["probe_auroc"], row["probe_auroc_low"], row["probe_auroc_high"])
        cells = [
            str(int(row["layer"])),
            _fmt_ci(row["cp_auroc"], row["cp_auroc_low"], row["cp_auroc_high"]),
            f"{row['cp_tpr5']:.2f}",
        ]
        if extra:
            cells += [probe, f"{row['cv_cp_auroc']:.3f}" if row["cv_cp_auroc"] == row["cv_cp_auroc"] else "-"]
        else:
            cells += [f"{row['cp_f1']:.2f}", probe]
        flagged = row.get(flag_col)
        cells.append("[red]yes" if flagged is True or flagged == 1 else "no")
        table.add_row(*cells)
    return table


def register(app: typer.Typer) -> None:
    """Add the ``detect`` sub-app (``train``, ``score``, ``eval``) to ``app``."""
    from rich.console import Console

    from ..errors import AttnscanError
    from .options import (
        AssistantOpt,
        ChatOpt,
        DeviceOpt,
        DtypeOpt,
        FieldOpt,
        LayersOpt,
        LimitOpt,
        ModelOpt,
        MultilineOpt,
        PickleOpt,
        QuietOpt,
        RemoteOpt,
        RequestsOpt,
        RevisionOpt,
        SeedOpt,
        SourceOpt,
        SystemOpt,
        TemplatesOpt,
        quiet_libraries,
        user_errors,
    )

    detect_app = typer.Typer(
        name="detect",
        help="Train per-layer jailbreak detectors on a model's internals, score prompts, evaluate on new sets.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @detect_app.command("train")
    def train_cmd(
        out: Annotated[Path, typer.Option(help="Directory for the detector (created atomically).")],
        benign: SourceOpt = None,
        jailbreak: SourceOpt = None,
        jailbreak_templates: TemplatesOpt = None,
        requests: RequestsOpt = None,
        model: ModelOpt = "smollm2-135m-instruct",
        field: FieldOpt = None,
        multiline: MultilineOpt = False,
        assistant_name: AssistantOpt = "ChatGPT",
        limit: LimitOpt = None,
        seed: SeedOpt = 0,
        layers: LayersOpt = "all",
        features: Annotated[
            str, typer.Option(help="'hidden' (residual stream) or 'attention' (per-prompt log-attention blocks).")
        ] = "hidden",
        rank: Annotated[int, typer.Option(help="Components of the CP decomposition.")] = 8,
        max_iter: Annotated[int, typer.Option(help="Most ALS iterations of the CP decomposition.")] = 100,
        last_k: Annotated[int, typer.Option(help="Hidden features: the prompt's last K token positions.")] = 8,
        blocks: Annotated[int, typer.Option(help="Attention features: B x B blocks of the token grid.")] = 16,
        folds: Annotated[int, typer.Option(help="Cross-validation folds.")] = 5,
        threshold: Annotated[float, typer.Option(help="Flag a layer whose cross-validated AUROC reaches this.")] = 0.9,
        flag_on: Annotated[str, typer.Option(help="Flag and score with the 'cp' detector or the 'probe'.")] = "cp",
        bootstrap: BootstrapOpt = 1000,
        length: DetLengthOpt = DEFAULT_LENGTH,
        batch_size: DetBatchOpt = 8,
        chat_template: ChatOpt = True,
        system_prompt: SystemOpt = None,
        truncate: DetTruncateOpt = "tail",
        dtype: DtypeOpt = "auto",
        device: DeviceOpt = "auto",
        revision: RevisionOpt = None,
        trust_remote_code: RemoteOpt = False,
        allow_pickle: PickleOpt = False,
        top: Annotated[int, typer.Option(help="Layers shown in the summary table.")] = 8,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing detector in --out.")] = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Train per-layer CP and probe detectors on benign vs jailbreak prompts and write them to --out."""
        from ..detect.jobs import train_detector
        from ..detect.store import check_detector_dir
        from ..prompts.sets import prompt_sets

        with user_errors():
            check_detector_dir(out, overwrite)
            sets = prompt_sets(
                benign,
                jailbreak,
                jailbreak_templates=jailbreak_templates,
                requests=requests,
                field=field,
                multiline=multiline,
                assistant_name=assistant_name,
                limit=limit,
                seed=seed,
            )
            quiet_libraries()
            with lazy_progress(quiet) as progress:
                trained = train_detector(
                    model,
                    sets["benign"],
                    sets["jailbreak"],
                    out=out,
                    layers=layers,
                    features=features,  # type: ignore[arg-type]
                    rank=rank,
                    max_iter=max_iter,
                    last_k=last_k,
                    blocks=blocks,
                    folds=folds,
                    threshold=threshold,
                    flag_on=flag_on,  # type: ignore[arg-type]
                    seed=seed,
                    n_bootstrap=bootstrap,
                    length=length,
                    batch_size=batch_size,
                    chat_template=chat_template,
                    system_prompt=system_prompt,
                    truncate=truncate,  # type: ignore[arg-type]
                    overwrite=overwrite,
                    progress=progress,
                    dtype=dtype,
                    device=device,
                    revision=revision,
                    trust_remote_code=trust_remote_code,
                    allow_pickle=allow_pickle,
                )
        by = f"{trained.primary}_auroc"
        title = f"Top layers by cross-validated {trained.primary.upper()} AUROC ({features} features)"
        Console().print(layer_rich_table(trained.table, title, top, by=by))
        flagged = ", ".join(map(str, trained.flagged_layers)) or "none"
        typer.echo(f"best layer {trained.best_layer}; flagged (AUROC >= {threshold}): {flagged}")
        typer.echo(f"wrote {out} (detector.safetensors, detector.json, probe/, detection.csv)")

    @detect_app.command("score")
    def score_cmd(
        detector: DetectorArg,
        prompts: Annotated[str, typer.Option(help="Prompts to score: builtin:NAME, a file, or hf:DS:SPLIT:COL.")],
        out: Annotated[Path, typer.Option(help="CSV file for the scores (written atomically).")],
        model: ModelOrNoneOpt = None,
        layer: Annotated[int | None, typer.Option(help="Layer to score at (default: the best layer).")] = None,
        kind: Annotated[
            str | None, typer.Option("--detector", help="'cp' or 'probe' (default: the detector's primary kind).")
        ] = None,
        threshold: Annotated[float, typer.Option(help="A prompt is flagged when its probability reaches this.")] = 0.5,
        field: FieldOpt = None,
        multiline: MultilineOpt = False,
        assistant_name: AssistantOpt = "ChatGPT",
        limit: LimitOpt = None,
        seed: SeedOpt = 0,
        batch_size: DetBatchOpt = 8,
        dtype: ScoreDtypeOpt = None,
        device: DeviceOpt = "auto",
        allow_other_model: OtherModelOpt = False,
        trust_remote_code: RemoteOpt = False,
        allow_pickle: PickleOpt = False,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Write each prompt's jailbreak probability (one layer, one detector) to a CSV file."""
        from ..detect.jobs import score_prompts
        from ..detect.store import check_output_file, load_trained, write_table
        from ..prompts.sets import load_prompts

        with user_errors():
            check_output_file(out, overwrite)
            if kind is not None and kind not in ("cp", "probe"):
                raise AttnscanError(f"--detector must be cp or probe, got {kind}")
            trained = load_trained(detector)
            ps = load_prompts(
                prompts,
                "prompts",
                field=field,
                multiline=multiline,
                assistant_name=assistant_name,
                limit=limit,
                seed=seed,
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
                    dtype=dtype,
                    device=device,
                    trust_remote_code=trust_remote_code,
                    allow_pickle=allow_pickle,
                )
            write_table(frame, out, overwrite=overwrite)
        n_flag = int(frame["flagged"].sum())
        typer.echo(
            f"scored {len(frame)} prompts with the {frame.attrs['kind']} detector at layer {frame.attrs['layer']}: "
            f"{n_flag} flagged (prob >= {threshold}), mean prob {frame['prob'].mean():.3f}"
        )
        typer.echo(f"wrote {out}")

    @detect_app.command("eval")
    def eval_cmd(
        detector: DetectorArg,
        benign: SourceOpt = None,
        jailbreak: SourceOpt = None,
        jailbreak_templates: TemplatesOpt = None,
        requests: RequestsOpt = None,
        model: ModelOrNoneOpt = None,
        layers: Annotated[str, typer.Option(help="'all' (the detector's layers), or layers such as 3,7.")] = "all",
        field: FieldOpt = None,
        multiline: MultilineOpt = False,
        assistant_name: AssistantOpt = "ChatGPT",
        limit: LimitOpt = None,
        seed: SeedOpt = 0,
        bootstrap: BootstrapOpt = 1000,
        batch_size: DetBatchOpt = 8,
        dtype: ScoreDtypeOpt = None,
        device: DeviceOpt = "auto",
        allow_other_model: OtherModelOpt = False,
        trust_remote_code: RemoteOpt = False,
        allow_pickle: PickleOpt = False,
        out: Annotated[Path | None, typer.Option(help="Also write the per-layer metrics to this CSV file.")] = None,
        top: Annotated[int, typer.Option(help="Layers shown in the table.")] = 10,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Evaluate the saved detectors (no refitting) on a new labelled set, e.g. prompts from another source."""
        from ..detect.jobs import evaluate_detector
        from ..detect.store import check_output_file, load_trained, write_table
        from ..prompts.sets import prompt_sets

        with user_errors():
            if out is not None:
                check_output_file(out, overwrite)
            trained = load_trained(detector)
            sets = prompt_sets(
                benign,
                jailbreak,
                jailbreak_templates=jailbreak_templates,
                requests=requests,
                field=field,
                multiline=multiline,
                assistant_name=assistant_name,
                limit=limit,
                seed=seed,
            )
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
                    dtype=dtype,
                    device=device,
                    trust_remote_code=trust_remote_code,
                    allow_pickle=allow_pickle,
                )
            if out is not None:
                write_table(frame, out, overwrite=overwrite)
        n_b, n_j = len(sets["benign"]), len(sets["jailbreak"])
        title = f"Saved detectors on {n_b} benign + {n_j} jailbreak prompts (top layers by CP AUROC)"
        Console().print(layer_rich_table(frame, title, top, extra=True))
        best = trained.best_layer
        if best in set(frame["layer"]):
            row = frame.set_index("layer").loc[best]
            typer.echo(
                f"training's best layer {best}: CP AUROC {row['cp_auroc']:.3f} here vs {row['cv_cp_auroc']:.3f} "
                "cross-validated in training"
            )
        if out is not None:
            typer.echo(f"wrote {out}")

    app.add_typer(detect_app, name="detect")
