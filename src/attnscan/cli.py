"""The ``attnscan`` command line: a thin typer app over the library."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import AttnscanError

app = typer.Typer(
    name="attnscan",
    help="Layer-by-layer attention shifts of language models under jailbreak prompts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
            raise typer.Exit(code=2) from None


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    typer.echo(f"warning: {message}", err=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


@app.callback()
def main() -> None:
    """attnscan: see how attention changes, layer by layer, when a request is wrapped in a jailbreak."""


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Hub id, local directory, .gguf file, or 'smollm2-135m-instruct'.")
]


@app.command("scan")
def scan_cmd(
    benign: Annotated[str, typer.Option(help="Benign prompts: a .txt file (one per line) or builtin:NAME.")],
    jailbreak: Annotated[str, typer.Option(help="Jailbreak prompts: a .txt file (one per line) or builtin:NAME.")],
    out: Annotated[Path, typer.Option(help="Directory for the results bundle (created atomically).")],
    model: ModelOpt = "smollm2-135m-instruct",
    control: Annotated[
        str | None, typer.Option(help="Optional control prompts (same wrappers, benign requests).")
    ] = None,
    layers: Annotated[str, typer.Option(help="'all', or layers such as 3,7,18 or 4-8.")] = "all",
    length: Annotated[int, typer.Option(help="Grid length T in tokens; longer prompts are truncated.")] = 448,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 8,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    chat_template: Annotated[bool, typer.Option(help="Wrap each prompt in the model's chat template.")] = True,
    system_prompt: Annotated[str | None, typer.Option(help="System turn for the chat template.")] = None,
    truncate: Annotated[str, typer.Option(help="Keep the 'head' or the 'tail' of long prompts.")] = "head",
    padding_side: Annotated[str, typer.Option(help="Pad batches on the 'right' or the 'left'.")] = "right",
    floor: Annotated[float, typer.Option(help="Floor of the log-attention maps.")] = -10.0,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code from the hub to run.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickle weight files (they can run code).")] = False,
    seed: Annotated[int, typer.Option(help="Random seed, recorded in the manifest.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle in --out.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Capture attention maps of benign and jailbreak prompts and write a results bundle."""
    from .io import check_output_dir
    from .progress import prompt_progress
    from .prompts import load_prompts
    from .scan import scan

    with user_errors():
        check_output_dir(out, overwrite)
        if length <= 0:
            raise AttnscanError(f"--length must be a positive number of tokens, got {length}")
        if batch_size < 1:
            raise AttnscanError(f"--batch-size must be at least 1, got {batch_size}")
        sources = {"benign": benign, "jailbreak": jailbreak, **({"control": control} if control else {})}
        sets = {name: load_prompts(src, name=name) for name, src in sources.items()}
        _quiet_libraries()
        with prompt_progress(quiet) as progress:
            result = scan(
                model,
                sets["benign"],
                sets["jailbreak"],
                sets.get("control"),
                layers=layers,
                length=length,
                batch_size=batch_size,
                dtype=dtype,
                device=device,
                chat_template=chat_template,
                system_prompt=system_prompt,
                truncate=truncate,  # type: ignore[arg-type]
                padding_side=padding_side,  # type: ignore[arg-type]
                floor=floor,
                revision=revision,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                seed=seed,
                progress=progress,
            )
        result.save(out, overwrite=overwrite)
    counts = ", ".join(f"{k} {v.n_prompts} prompts" for k, v in result.sets.items())
    typer.echo(f"wrote {out}: {len(result.layers)} layers x T={result.length}, {counts}")


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    run()
