"""What the ``attnscan`` commands share: option types, the one-line error handling, and quiet libraries.

Kept apart from :mod:`attnscan.cli` (the app) so that the command modules (:mod:`attnscan.cli_detect`,
:mod:`attnscan.cli_behave`) can import it at module level; typer reads the option types from each command's
module when it builds the command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from ..errors import AttnscanError


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


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    typer.echo(f"warning: {message}", err=True)


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Hub id, local directory, .gguf file, or 'smollm2-135m-instruct'.")
]
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
AssistantOpt = Annotated[str, typer.Option(help="Fills {generator.name} placeholders of DAN-style templates.")]
LimitOpt = Annotated[int | None, typer.Option(help="Use at most N prompts per set (deterministic by --seed).")]
LayersOpt = Annotated[str, typer.Option(help="'all', or layers such as 3,7,18 or 4-8.")]
LengthOpt = Annotated[int, typer.Option(help="Grid length T in tokens; longer prompts are truncated.")]
BatchOpt = Annotated[str, typer.Option(help="Prompts per forward pass, or 'auto' (backs off on out-of-memory).")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
ChatOpt = Annotated[bool, typer.Option(help="Wrap each prompt in the model's chat template.")]
SystemOpt = Annotated[str | None, typer.Option(help="System turn for the chat template.")]
TruncateOpt = Annotated[str, typer.Option(help="Keep the 'head' or the 'tail' of long prompts.")]
AlignOpt = Annotated[str, typer.Option(help="'absolute' (token i on row i) or 'relative' (stretched to T).")]
PaddingOpt = Annotated[str, typer.Option(help="Pad batches on the 'right' or the 'left'.")]
FloorOpt = Annotated[float, typer.Option(help="Floor of the log-attention maps.")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")]
RemoteOpt = Annotated[bool, typer.Option(help="Allow model code from the hub to run.")]
PickleOpt = Annotated[bool, typer.Option(help="Allow pickle weight files (they can run code).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for subsampling and statistics, recorded in the manifest.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing bundle in --out.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def batch_size_option(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise AttnscanError(f"--batch-size must be a number or 'auto', got '{text}'") from None


def check_numbers(length: int, batch_size: int) -> None:
    """Fail before any model loads on a grid length or batch size that cannot work (``--limit`` is checked where
    prompts are subsampled, :func:`attnscan.prompts.subsample`)."""
    if length <= 0:
        raise AttnscanError(f"--length must be a positive number of tokens, got {length}")
    if batch_size < 1:
        raise AttnscanError(f"--batch-size must be at least 1, got {batch_size}")
