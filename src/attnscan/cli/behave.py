"""The ``attnscan behave`` and ``attnscan defend`` commands: thin wrappers over
:func:`attnscan.behaviour.behave.behave` and :func:`attnscan.behaviour.defend.defend` (registered on the app by
:mod:`attnscan.cli.main`), and the rich tables of their results.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import AttnscanError
from .options import (
    ChatOpt,
    DeviceOpt,
    DtypeOpt,
    FieldOpt,
    Flags,
    GenBatchOpt,
    JudgeLabelsOpt,
    JudgeOpt,
    LimitOpt,
    LimitSeedOpt,
    MaxNewOpt,
    ModelOpt,
    MultilineOpt,
    PhrasesOpt,
    PickleOpt,
    QuietOpt,
    RemoteOpt,
    RequestsOpt,
    ResultsOutOpt,
    RevisionOpt,
    SourceOpt,
    SystemOpt,
    TemplatesOpt,
    WindowOpt,
    load_options,
    options_from,
    quiet_libraries,
    read_prompt_sets,
    user_errors,
)

if TYPE_CHECKING:
    import pandas as pd
    from rich.table import Table

    from ..behaviour.defend import DefenceResult
    from ..behaviour.generation import GenerationOptions
    from ..behaviour.judges import ClassifierJudge, RefusalMatcher
    from ..models.loading import LoadOptions

DEFAULT_SCAN_TOP = 3

# --------------------------------------------------------------------------------------------------- behave

BehaveOverwriteOpt = Annotated[bool, typer.Option(help="Replace earlier behaviour results in --out.")]


def behave_cmd(
    out: ResultsOutOpt,
    benign: SourceOpt = None,
    jailbreak: SourceOpt = None,
    control: SourceOpt = None,
    jailbreak_templates: TemplatesOpt = None,
    requests: RequestsOpt = None,
    model: ModelOpt = "smollm2-135m-instruct",
    field: FieldOpt = None,
    multiline: MultilineOpt = False,
    limit: LimitOpt = None,
    seed: LimitSeedOpt = 0,
    max_new_tokens: MaxNewOpt = 64,
    batch_size: GenBatchOpt = 8,
    chat_template: ChatOpt = True,
    system_prompt: SystemOpt = None,
    refusal_phrases: PhrasesOpt = None,
    refusal_window: WindowOpt = 160,
    judge: JudgeOpt = None,
    judge_refusal_labels: JudgeLabelsOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    overwrite: BehaveOverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate a response to every prompt and measure how often the model refuses (and the jailbreaks' ASR).

    Writes responses.jsonl (every prompt and response, with the refusal call), behaviour.csv (one row per set)
    and behaviour.json (how it was made). Refusals are found by phrase matching: read a sample of the responses.
    """
    flags = dict(locals())  # the parsed flags by name, for the library's inputs (see attnscan.cli.options)
    from rich.console import Console

    from .._io import check_output_dir
    from ..behaviour.behave import META_FILE, behave
    from ..behaviour.generation import GenerationOptions
    from ..models.loading import load_model
    from .progress import prompt_progress

    with user_errors():
        generation = options_from(GenerationOptions, flags)  # checked before the model loads
        check_output_dir(out, overwrite, marker=META_FILE, what="behaviour results")
        sets = read_prompt_sets(flags)
        matcher = _matcher(refusal_phrases, refusal_window)
        labels = judge_labels(judge, judge_refusal_labels)
        quiet_libraries()
        load = load_options(flags)
        loaded = load_model(model, load)
        classifier = make_judge(judge, labels, load)
        with prompt_progress(quiet) as progress:
            result = behave(
                loaded,
                sets,
                **asdict(generation),
                matcher=matcher,
                judge=classifier,
                progress=progress,
            )
        result.save(out, overwrite=overwrite)
    Console().print(behaviour_summary(result.table(), model))
    typer.echo(f"wrote {out} (responses.jsonl, behaviour.csv, behaviour.json)")


def behaviour_summary(table: pd.DataFrame, model: str) -> Table:
    """A rich table of :func:`attnscan.behaviour.behave.behaviour_table`: refusal rate and ASR with Wilson 95 %
    intervals."""
    from rich.table import Table

    judged = "judge_refusal_rate" in table.columns
    out = Table(title=f"Refusals of {model} (phrase matcher; Wilson 95% CI in %)", title_justify="left")
    out.add_column("set")
    for col in ("n", "refusals", "refusal rate [CI]", "ASR [CI]", *(["judge refusal rate [CI]"] if judged else [])):
        out.add_column(col, justify="right")
    for _, row in table.iterrows():
        cells = [
            str(row["set"]),
            str(int(row["n"])),
            str(int(row["refusals"])),
            _rate(row["refusal_rate"], row["refusal_low"], row["refusal_high"]),
            _rate(row["asr"], row["asr_low"], row["asr_high"]) if bool(row["attack"]) else "-",
        ]
        if judged:
            cells.append(_rate(row["judge_refusal_rate"], row["judge_refusal_low"], row["judge_refusal_high"]))
        out.add_row(*cells)
    return out


# --------------------------------------------------------------------------------------------------- defend

BypassLayersOpt = Annotated[str | None, typer.Option(help="Layers to bypass, e.g. 3,7 or 4-8 (order = sweep order).")]
FromDetectorOpt = Annotated[
    Path | None, typer.Option(help="Bypass the flagged layers of a detector directory (attnscan detect train).")
]
FromScanOpt = Annotated[
    Path | None, typer.Option(help="Bypass the top --top layers of a scan bundle's layers.csv, ranked by --by.")
]
ByOpt = Annotated[
    str | None, typer.Option(help="Ranking column: scan default abs_shift; detector default cp_auroc (detection.csv).")
]
TopOpt = Annotated[
    int | None,
    typer.Option(help=f"Bypass the first K ranked layers (scan default {DEFAULT_SCAN_TOP}; detector: all)."),
]
SweepOpt = Annotated[
    str | None, typer.Option(help="Also bypass the first k layers of the ranking for each k, e.g. 0,1,2,4,8.")
]
PerplexityOpt = Annotated[bool, typer.Option(help="Measure perplexity on the benign prompts' text.")]
PplLengthOpt = Annotated[int, typer.Option(help="Perplexity reads the first N tokens of each text.")]
DpiOpt = Annotated[int, typer.Option(help="Resolution of tradeoff.png.")]
DefendOverwriteOpt = Annotated[bool, typer.Option(help="Replace earlier defence results in --out.")]


def defend_cmd(
    out: ResultsOutOpt,
    benign: SourceOpt = None,
    jailbreak: SourceOpt = None,
    jailbreak_templates: TemplatesOpt = None,
    requests: RequestsOpt = None,
    model: ModelOpt = "smollm2-135m-instruct",
    layers: BypassLayersOpt = None,
    from_detector: FromDetectorOpt = None,
    from_scan: FromScanOpt = None,
    by: ByOpt = None,
    top: TopOpt = None,
    sweep: SweepOpt = None,
    field: FieldOpt = None,
    multiline: MultilineOpt = False,
    limit: LimitOpt = None,
    seed: LimitSeedOpt = 0,
    max_new_tokens: MaxNewOpt = 64,
    batch_size: GenBatchOpt = 8,
    perplexity: PerplexityOpt = True,
    ppl_length: PplLengthOpt = 512,
    chat_template: ChatOpt = True,
    system_prompt: SystemOpt = None,
    refusal_phrases: PhrasesOpt = None,
    refusal_window: WindowOpt = 160,
    judge: JudgeOpt = None,
    judge_refusal_labels: JudgeLabelsOpt = None,
    dpi: DpiOpt = 150,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    revision: RevisionOpt = None,
    trust_remote_code: RemoteOpt = False,
    allow_pickle: PickleOpt = False,
    overwrite: DefendOverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Bypass chosen layers at inference and compare with the unmodified model: jailbreaks refused, benign kept.

    The layers come from exactly one of --layers, --from-detector or --from-scan. Writes defence.csv (baseline
    and bypass), responses.jsonl and defence.json; with --sweep also sweep.csv and the trade-off curve
    tradeoff.png (and every sweep setting's answers in sweep_responses.jsonl). Refusals are found by phrase
    matching, and an empty or garbled answer counts as kept: read a sample of the responses. With --judge, a
    classifier labels every response too, and the tables add its refusal rate and retention.
    """
    flags = dict(locals())  # the parsed flags by name, for the library's inputs (see attnscan.cli.options)
    from ..behaviour.defend import defend
    from ..models.loading import load_model
    from .progress import prompt_progress

    with user_errors():
        generation, ks = _check_defend_flags(flags)
        sets = read_prompt_sets(flags)
        matcher = _matcher(refusal_phrases, refusal_window)
        labels = judge_labels(judge, judge_refusal_labels)
        order, source = _file_order(from_detector, from_scan, by, model)
        quiet_libraries()
        load = load_options(flags)
        loaded = load_model(model, load)
        classifier = make_judge(judge, labels, load)
        chosen, order, source = _bypassed(layers, top, from_scan, order, source, loaded.arch.n_layers)
        with prompt_progress(quiet) as progress:
            result = defend(
                loaded,
                sets["jailbreak"],
                sets["benign"],
                chosen,
                **asdict(generation),
                ppl_texts=None if perplexity else False,
                ppl_length=ppl_length,
                matcher=matcher,
                judge=classifier,
                sweep_ks=ks,
                sweep_order=order if ks is not None else None,
                progress=progress,
            )
        result.info["layer_source"] = source
        result.save(out, overwrite=overwrite, dpi=dpi)
    _print_defence(result, model, out)


def _check_defend_flags(flags: Flags) -> tuple[GenerationOptions, list[int] | None]:
    """Fail on a bad flag of ``defend`` before anything is read or loaded; return the generation options and the
    sweep's ks (``None`` without ``--sweep``)."""
    from .._io import check_output_dir
    from ..behaviour.defend import META_FILE
    from ..behaviour.generation import GenerationOptions

    generation = options_from(GenerationOptions, flags)
    if flags["ppl_length"] < 2:
        raise AttnscanError(f"--ppl-length must be at least 2 tokens, got {flags['ppl_length']}")
    if flags["dpi"] <= 0:
        raise AttnscanError(f"--dpi must be positive, got {flags['dpi']}")
    _check_layer_source(flags["layers"], flags["from_detector"], flags["from_scan"], flags["by"], flags["top"])
    ks = _parse_ks(flags["sweep"]) if flags["sweep"] is not None else None
    check_output_dir(flags["out"], flags["overwrite"], marker=META_FILE, what="defence results")
    return generation, ks


def _bypassed(
    layers: str | None, top: int | None, from_scan: Path | None, order: list[int], source: dict[str, Any], n_layers: int
) -> tuple[list[int], list[int], dict[str, Any]]:
    """The layers to bypass, the ranking they come first in, and the record of where they came from: those of
    ``--layers`` in the order given, else the first ``--top`` of a file's ranking (default: the scan's top
    :data:`DEFAULT_SCAN_TOP`, all the layers a detector flagged)."""
    if layers is not None:
        order = ordered_layers(layers, n_layers)
        source = {"kind": "layers", "layers": layers}
    chosen = order[: top if top is not None else (DEFAULT_SCAN_TOP if from_scan is not None else len(order))]
    return chosen, order, {**source, "bypassed": chosen}


def _print_defence(result: DefenceResult, model: str, out: Path) -> None:
    """The summary of ``defend`` on stdout: baseline vs bypass (and the sweep), and what was written."""
    from rich.console import Console

    console = Console()
    console.print(defence_summary(result.table(), f"Layer bypass on {model}: baseline vs bypass"))
    if result.sweep is not None:
        console.print(defence_summary(result.sweep, "Sweep: bypass the first k ranked layers"))
    written = "defence.csv, responses.jsonl, defence.json"
    written += ", sweep.csv, sweep_responses.jsonl, tradeoff.png" if result.sweep is not None else ""
    typer.echo(f"wrote {out} ({written})")


def defence_summary(table: pd.DataFrame, title: str) -> Table:
    """A rich table of a defence or sweep table: refusal rate and retention with Wilson 95 % intervals, and the
    number of empty answers (an empty answer is no refusal, so it counts as "kept"), benign chrF against the
    unmodified model's answers and perplexity (token F1 is in the CSV). With a judge, each row is
    followed by a "(judge)" row holding the judge's rates in the same columns, which keeps the table within 80
    columns."""
    from rich.table import Table

    judged = "jailbreak_judge_refusal_rate" in table.columns
    out = Table(title=f"{title} (rates with Wilson 95% CI in %)", title_justify="left")
    first = "variant" if "variant" in table.columns else "k"
    out.add_column(first, no_wrap=True)
    out.add_column("layers", overflow="fold")
    for col in ("jailbreak\nrefused", "benign\nkept", "empty\njb/bn", "chrF", "ppl"):
        out.add_column(col, justify="right", no_wrap=True)
    for _, row in table.iterrows():
        ppl = row["perplexity"]
        out.add_row(
            str(row[first]),
            str(row["layers"]) if not _nan(row["layers"]) and str(row["layers"]) else "-",
            _rate(row["jailbreak_refusal_rate"], row["jailbreak_refusal_low"], row["jailbreak_refusal_high"]),
            _rate(row["benign_retention"], row["benign_retention_low"], row["benign_retention_high"]),
            f"{int(row['jailbreak_empty'])}/{int(row['benign_empty'])}",
            f"{row['benign_chrf']:.3f}",
            "-" if _nan(ppl) else f"{ppl:.0f}" if ppl >= 100 else f"{ppl:.1f}",
        )
        if judged:
            refused = ("jailbreak_judge_refusal_rate", "jailbreak_judge_refusal_low", "jailbreak_judge_refusal_high")
            kept = ("benign_judge_retention", "benign_judge_retention_low", "benign_judge_retention_high")
            out.add_row(
                "(judge)",
                "",
                _rate(*(row[c] for c in refused)),
                _rate(*(row[c] for c in kept)),
                "",
                "",
                "",
                style="dim",
            )
    return out


# --------------------------------------------------------------------------------------------------- helpers


def ordered_layers(text: str, n_layers: int) -> list[int]:
    """Layers of ``--layers`` in the order given (spans ascending, repeats dropped), checked against the model.

    Unlike :func:`attnscan.models.loading.parse_layers` the order is kept: it is the sweep's ranking.
    """
    from ..models.loading import parse_layers

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise AttnscanError("--layers is empty: give layers to bypass, e.g. --layers 3,7")
    out: list[int] = []
    for part in parts:
        for layer in parse_layers(part, n_layers):
            if layer not in out:
                out.append(layer)
    return out


def _matcher(phrases: Path | None, window: int) -> RefusalMatcher:
    from ..behaviour.judges import RefusalMatcher

    if window < 0:
        raise AttnscanError(f"--refusal-window must be 0 (anywhere) or a number of characters, got {window}")
    win = window or None
    return RefusalMatcher.from_file(phrases, window=win) if phrases is not None else RefusalMatcher(window=win)


def judge_labels(judge: str | None, refusal_labels: str | None) -> list[str] | None:
    """The labels of ``--judge-refusal-labels`` (``None`` when not given), checked before anything loads."""
    if refusal_labels is None:
        return None
    if judge is None:
        raise AttnscanError("--judge-refusal-labels needs --judge SPEC")
    return [x.strip() for x in refusal_labels.split(",") if x.strip()] or None


def make_judge(spec: str | None, refusal_labels: list[str] | None, load: LoadOptions) -> ClassifierJudge | None:
    """The ``--judge`` classifier (``None`` without one), on the model's device and with its code and pickle
    permissions."""
    from ..behaviour.judges import ClassifierJudge

    if spec is None:
        return None
    return ClassifierJudge(
        spec,
        refusal_labels=refusal_labels,
        device=load.device,
        trust_remote_code=load.trust_remote_code,
        allow_pickle=load.allow_pickle,
    )


def _check_layer_source(
    layers: str | None, from_detector: Path | None, from_scan: Path | None, by: str | None, top: int | None
) -> None:
    given = [
        name
        for name, v in (("--layers", layers), ("--from-detector", from_detector), ("--from-scan", from_scan))
        if v is not None
    ]
    if not given:
        raise AttnscanError("no layers to bypass: give --layers 3,7, --from-detector DIR or --from-scan DIR")
    if len(given) > 1:
        raise AttnscanError(f"give the layers one way, not {' and '.join(given)}: keep one of them")
    if layers is not None and (by is not None or top is not None):
        raise AttnscanError(
            "--by and --top rank the layers of --from-scan or --from-detector: leave them out with --layers"
        )
    if top is not None and top < 1:
        raise AttnscanError(f"--top must be at least 1, got {top}")


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AttnscanError(f"cannot read --sweep '{text}': give k values such as 0,1,2,4,8") from None
    if not ks:
        raise AttnscanError("--sweep is empty: give k values such as 0,1,2,4,8")
    if min(ks) < 0:
        raise AttnscanError(f"--sweep values must be 0 or more, got {min(ks)}")
    return ks


def _file_order(
    from_detector: Path | None, from_scan: Path | None, by: str | None, model: str
) -> tuple[list[int], dict[str, Any]]:
    """The ranking of a detector's or scan's layers (empty for --layers), and a record of where it came from."""
    from ..behaviour.layers import detector_layers, scan_layer_order

    if from_scan is not None:
        order, column = scan_layer_order(from_scan, by)
        _warn_other_model(_recorded_model(from_scan / "manifest.json", ("model",)), model, f"scan bundle {from_scan}")
        return order, {"kind": "scan", "path": str(from_scan), "by": column, "order": order}
    if from_detector is not None:
        order = detector_layers(from_detector, by)
        if not order:
            raise AttnscanError(
                f"the detector in {from_detector} flagged no layer: give --layers, or lower the detector's threshold"
            )
        recorded = _recorded_model(from_detector / "detector.json", ("meta", "model"))
        _warn_other_model(recorded, model, f"detector {from_detector}")
        return order, {"kind": "detector", "path": str(from_detector), "by": by, "order": order}
    return [], {}


def _recorded_model(path: Path, keys: tuple[str, ...]) -> str | None:
    """The model spec recorded in a JSON file under ``keys`` (a string, or a dict with a ``spec``), if any."""
    try:
        node: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node = node.get("spec")
    return node if isinstance(node, str) else None


def _warn_other_model(recorded: str | None, model: str, what: str) -> None:
    if (
        recorded is not None
        and recorded != model
        and Path(recorded).expanduser().resolve() != Path(model).expanduser().resolve()
    ):
        warnings.warn(
            f"the {what} was made with model {recorded}, not {model}: its layers may not carry over",
            UserWarning,
            stacklevel=2,
        )


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _rate(rate: float, low: float, high: float) -> str:
    """``33% [10-70]``: a rate and its interval, in percent; ``-`` for a NaN rate (e.g. a judge without refusal
    labels)."""
    if _nan(rate):
        return "-"
    return f"{rate:.0%} [{100 * low:.0f}-{100 * high:.0f}]"
