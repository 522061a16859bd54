"""The ``attnscan study`` command: a thin wrapper over :func:`attnscan.study.experiment.study` (registered on the
app by :mod:`attnscan.cli.main`), and the terminal table of its result.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import AttnscanError
from .behave import judge_labels, make_judge
from .options import (
    DeviceOpt,
    DtypeOpt,
    JudgeLabelsOpt,
    JudgeOpt,
    PickleOpt,
    QuietOpt,
    RemoteOpt,
    RevisionOpt,
    load_options,
    quiet_libraries,
    user_errors,
)

if TYPE_CHECKING:
    from ..study.experiment import StudyResult

StudyModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="The model to study: a spec such as qwen2.5-coder-0.5b-instruct, a hub id or a path."
    ),
]
StudyOutOpt = Annotated[Path, typer.Option(help="Directory for the study (appears complete or not at all).")]
CountOpt = Annotated[int, typer.Option(min=1)]


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise AttnscanError(f"{flag} takes comma-separated whole numbers, e.g. 1,2,4 (got '{text}')") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def study_cmd(
    model: StudyModelOpt = "qwen2.5-coder-0.5b-instruct",
    out: StudyOutOpt = Path("attnscan-study"),
    requests: Annotated[int, typer.Option(help="Bare harmful requests drawn from the built-in set.")] = 12,
    wraps: Annotated[int, typer.Option(help="Jailbreak templates each request is wrapped in.")] = 2,
    benign: Annotated[int, typer.Option(help="Benign requests (half of them risky-looking).")] = 12,
    scan_limit: Annotated[int, typer.Option(help="Prompts per set for the attention scan and the detectors.")] = 24,
    length: Annotated[int, typer.Option(help="Token grid of the scan and the detectors (prompts cut to it).")] = 448,
    compare: Annotated[
        str, typer.Option(help="Other models scanned beside this one, comma-separated ('' for none).")
    ] = "smollm2-135m-instruct",
    bypass_top: Annotated[int, typer.Option(help="Bypass the detector's K best layers.")] = 2,
    sweep: Annotated[str, typer.Option(help="Also bypass the first k ranked layers for each k.")] = "1,2,4",
    random_draws: Annotated[int, typer.Option(help="Random layer sets bypassed as a control.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy answer length in tokens.")] = 32,
    batch_size: Annotated[
        int, typer.Option(help="Prompts per generation batch (decoding on a CPU is memory-bound: larger is faster).")
    ] = 32,
    seed: Annotated[int, typer.Option(help="Seed for every sample the study draws.")] = 0,
    dpi: Annotated[int, typer.Option(help="Resolution of the figures.")] = 200,
    judge: JudgeOpt = None,
    judge_refusal_labels: JudgeLabelsOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier study in --out.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """The paper's experiment on one model: refusals, attack success, detectors, layer bypass vs random layers.

    It also checks the refusal judge against the hand labels.

    Writes one directory (study.md is the report section; see the README). The default model is the refusing
    Qwen2.5-Coder-0.5B-Instruct: fetch it first with attnscan fetch qwen2.5-coder-0.5b-instruct (make models).
    """
    flags = dict(locals())  # the parsed flags by name, for the loading options (see attnscan.cli.options)
    from .._io import check_output_dir
    from ..models.loading import load_model
    from ..study.experiment import MANIFEST, study
    from ..study.plan import StudyOptions
    from .progress import prompt_progress

    with user_errors():
        options = StudyOptions(
            requests=requests,
            wraps=wraps,
            benign=benign,
            scan_limit=scan_limit,
            length=length,
            compare=_names(compare),
            bypass_top=bypass_top,
            sweep=_ints(sweep, "--sweep"),
            random_draws=random_draws,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
            dpi=dpi,
        )
        check_output_dir(out, overwrite, marker=MANIFEST, what="study results")
        labels = judge_labels(judge, judge_refusal_labels)
        quiet_libraries()
        load = load_options(flags)
        loaded = load_model(model, load)
        classifier = make_judge(judge, labels, load)
        with prompt_progress(quiet) as progress:
            result = study(
                loaded,
                out=out,
                options=options,
                load=load,
                overwrite=overwrite,
                judge=classifier,
                progress=progress,
                on_stage=None if quiet else lambda name: typer.echo(f"study: {name}", err=True),
            )
    _print_study(result)


def _print_study(result: StudyResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="Layer-bypass defence: the paper's numbers beside ours")
    for column in result.paper.columns:
        table.add_column(str(column))
    for _, row in result.paper.iterrows():
        table.add_row(*[str(v) for v in row])
    console.print(table)
    layers = result.manifest["defence"]
    console.print(f"bypassed layers {layers['layers']}: {layers['why']}")
    console.print(f"wrote {result.out} (report section: {result.out / 'study.md'})")
