"""What the ``attnscan`` commands share: option types, the library's option objects made from parsed flags, the
one-line error handling, and quiet libraries.

The command modules (:mod:`attnscan.cli.main`, :mod:`attnscan.cli.detect`, :mod:`attnscan.cli.behave`) import the
option types at module level: typer reads them from each command's module when it builds the command. Every type
used by more than one command is defined here, once; a command's own options sit beside it in its module.

A command hands its parsed flags, by name (``flags = dict(locals())`` as its first statement), to
:func:`load_options` / :func:`load_keywords`, :func:`options_from` and :func:`read_prompt_sets`: a flag goes to the
library field or keyword of the same name, so the CLI and the library keep one vocabulary. Nothing heavy (torch,
transformers, pandas) is imported here at module level, so ``attnscan --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from .._io import os_error
from ..errors import AttnscanError

if TYPE_CHECKING:
    from ..models.loading import LoadOptions
    from ..prompts.sets import PromptSet

T = TypeVar("T")

Flags = Mapping[str, Any]
"""A command's parsed flags by parameter name (its ``locals()`` before anything else is bound)."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show warnings as one 'warning:' line each; turn AttnscanError into one 'error:' line and exit code 2."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _show_warning
        try:
            yield
        except AttnscanError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=exc.exit_code) from None
        except Exception as exc:  # a full disk or a path without permission (OSError, or safetensors' own error)
            user = os_error(exc)
            if user is None:
                raise
            typer.echo(f"error: {user}", err=True)
            raise typer.Exit(code=user.exit_code) from None


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    typer.echo(f"warning: {message}", err=True)


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------------ option types

# model
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Hub id, local directory, .gguf file, or 'smollm2-135m-instruct'.")
]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DeviceMapOpt = Annotated[
    str | None, typer.Option(help="'auto' spreads a model over several GPUs and the CPU (accelerate).")
]
MaxMemoryOpt = Annotated[str | None, typer.Option(help="With --device-map: e.g. 0=20GiB,1=20GiB,cpu=60GiB.")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")]
RemoteOpt = Annotated[bool, typer.Option(help="Allow model code from the hub to run.")]
PickleOpt = Annotated[bool, typer.Option(help="Allow pickle weight files (they can run code).")]

# prompts
SourceOpt = Annotated[
    str | None,
    typer.Option(help="Prompt source: builtin:NAME, a .txt/.json/.jsonl/.csv/.tsv/.parquet file, or hf:DS:SPLIT:COL."),
]
TemplatesOpt = Annotated[
    str | None, typer.Option(help="Jailbreak templates with a {request} slot, composed with --requests.")
]
RequestsOpt = Annotated[str | None, typer.Option(help="Requests for --jailbreak-templates (default builtin:harmful).")]
FieldOpt = Annotated[str | None, typer.Option(help="Column or key holding the prompt (json, jsonl, csv, parquet).")]
MultilineOpt = Annotated[bool, typer.Option(help="In .txt files, prompts are separated by blank lines.")]
GroupsOpt = Annotated[
    str | None,
    typer.Option(
        help="Columns of the prompt files that hold group labels, as LABEL=COLUMN,... with labels template_id, "
        "family, request_id, category, looks_risky (e.g. family=attack,request_id=behavior_id)."
    ),
]
AssistantOpt = Annotated[str, typer.Option(help="Fills {generator.name} placeholders of DAN-style templates.")]
LimitOpt = Annotated[int | None, typer.Option(help="Use at most N prompts per set (deterministic by --seed).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for subsampling and statistics, recorded in the manifest.")]
LimitSeedOpt = Annotated[int, typer.Option(help="Seed for subsampling with --limit.")]

# encoding and capture
LayersOpt = Annotated[str, typer.Option(help="'all', or layers such as 3,7,18 or 4-8.")]
LengthOpt = Annotated[int, typer.Option(help="Grid length T in tokens; longer prompts are truncated.")]
BatchOpt = Annotated[str, typer.Option(help="Prompts per forward pass, or 'auto' (backs off on out-of-memory).")]
ChatOpt = Annotated[bool, typer.Option(help="Wrap each prompt in the model's chat template.")]
SystemOpt = Annotated[str | None, typer.Option(help="System turn for the chat template.")]
TruncateOpt = Annotated[str, typer.Option(help="Keep the 'head' or the 'tail' of long prompts.")]
AlignOpt = Annotated[str, typer.Option(help="'absolute' (token i on row i) or 'relative' (stretched to T).")]
PaddingOpt = Annotated[str, typer.Option(help="Pad batches on the 'right' or the 'left'.")]
FloorOpt = Annotated[float, typer.Option(help="Floor of the log-attention maps.")]
MatchLengthOpt = Annotated[
    bool,
    typer.Option(help="Scan only prompts paired by token length across the sets (the rest are left out)."),
]
MatchToleranceOpt = Annotated[
    float, typer.Option(help="With --match-length: largest length difference, as a share of the jailbreak prompt's.")
]

# detectors (attnscan detect): no grid, a fixed batch size, scoring follows the training run
DetectorArg = Annotated[Path, typer.Argument(help="Detector directory written by 'attnscan detect train'.")]
DetectorModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="Model spec (default: the model the detector was trained on).")
]
DetectorLengthOpt = Annotated[
    int, typer.Option(help="Most tokens per prompt; longer prompts keep their --truncate end.")
]
DetectorBatchOpt = Annotated[int, typer.Option(help="Prompts per forward pass.")]
BootstrapOpt = Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% intervals.")]
ScoreDtypeOpt = Annotated[
    str | None,
    typer.Option(help="auto, float32, bfloat16 or float16 (default: the dtype the detector was trained with)."),
]
OtherModelOpt = Annotated[
    bool, typer.Option(help="Score with a model other than the training one (warns instead of refusing).")
]

# generation and refusals (attnscan behave, attnscan defend)
ResultsOutOpt = Annotated[Path, typer.Option(help="Directory for the results (appears complete or not at all).")]
MaxNewOpt = Annotated[int, typer.Option(help="Generate at most N new tokens per prompt (greedy decoding).")]
GenBatchOpt = Annotated[int, typer.Option(help="Prompts per generation batch.")]
PhrasesOpt = Annotated[
    Path | None,
    typer.Option(help="Refusal phrases, one per line ('#' comments), instead of attnscan's documented list."),
]
WindowOpt = Annotated[
    int, typer.Option(help="A refusal phrase must start within the first N characters of a response (0: anywhere).")
]
JudgeOpt = Annotated[
    str | None, typer.Option(help="A sequence-classification model (local dir or hub id) labelling each response.")
]
JudgeLabelsOpt = Annotated[
    str | None, typer.Option(help="Comma-separated judge labels that count as a refusal (e.g. refusal).")
]

# output
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing bundle in --out.")]
OverwriteFileOpt = Annotated[bool, typer.Option(help="Replace an existing --out file.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


# --------------------------------------------------------------------------------- flags -> the library's inputs


def batch_size_option(text: str) -> int | None:
    """``--batch-size``: a number, or ``auto`` (``None``: the library chooses and backs off)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise AttnscanError(f"--batch-size must be a number or 'auto', got '{text}'") from None


def option_keywords(cls: type[Any], flags: Flags) -> dict[str, Any]:
    """The flags named as fields of the library's option dataclass ``cls``, as keywords."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in flags.items() if k in names}


def options_from(cls: type[T], flags: Flags, **values: Any) -> T:
    """An option object of the library (the dataclass ``cls``) whose fields take the flags of the same names;
    ``values`` (flags parsed first, such as ``batch_size``) win. Fields without a flag keep their defaults."""
    return cls(**{**option_keywords(cls, flags), **values})


def function_keywords(function: Callable[..., Any], flags: Flags, *, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The flags named as keyword-only parameters of the library function ``function`` (but ``skip``)."""
    named = inspect.signature(function).parameters.values()
    return {p.name: flags[p.name] for p in named if p.kind is p.KEYWORD_ONLY and p.name in flags and p.name not in skip}


def load_keywords(flags: Flags) -> dict[str, Any]:
    """The model-loading flags a command has (``--dtype``, ``--device``, ``--revision``, ``--trust-remote-code``,
    ``--allow-pickle``, ``--device-map``, ``--max-memory``: the fields of
    :class:`attnscan.models.loading.LoadOptions`), as keywords of a library function; ``--max-memory`` stays text."""
    from ..models.loading import LoadOptions

    return option_keywords(LoadOptions, flags)


def load_options(flags: Flags) -> LoadOptions:
    """:class:`attnscan.models.loading.LoadOptions` from a command's model-loading flags (``--max-memory`` read
    here); the loading flags a command lacks keep their defaults."""
    from ..models.loading import LoadOptions, parse_max_memory

    keywords = load_keywords(flags)
    if "max_memory" in keywords:
        keywords["max_memory"] = parse_max_memory(keywords["max_memory"])
    return LoadOptions(**keywords)


def read_prompt_sets(flags: Flags) -> dict[str, PromptSet]:
    """The named prompt sets of a command's prompt flags (``--benign``, ``--jailbreak``, ``--control`` and those of
    the keywords of :func:`attnscan.prompts.sets.prompt_sets` it has: ``--jailbreak-templates``, ``--requests``,
    ``--field``, ``--multiline``, ``--assistant-name``, ``--limit``, ``--seed``)."""
    from ..prompts.sets import prompt_sets

    named = inspect.signature(prompt_sets).parameters.values()
    keywords = {p.name: flags[p.name] for p in named if p.kind is p.KEYWORD_ONLY and p.name in flags}
    return prompt_sets(flags.get("benign"), flags.get("jailbreak"), flags.get("control"), **keywords)
