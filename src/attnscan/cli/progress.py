"""A rich progress bar on stderr for long work (the library itself never prints)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .._types import ProgressFn

#: Stages whose items are not prompts (the label a library function reports -> the unit shown).
UNITS = {"fitting": "layers"}


class RateColumn(ProgressColumn):
    """Items per second, in the task's unit."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "")
        return Text(f"{speed:.2f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def prompt_progress(quiet: bool = False, unit: str = "prompts") -> Iterator[ProgressFn | None]:
    """Yield a ``progress(done, total, label)`` callback drawing a bar on stderr, or ``None`` when quiet.

    ``label`` names the stage (a prompt set, ``features``, ``fitting`` ...). A stage with another total or unit
    (:data:`UNITS`; ``unit`` otherwise) starts a new bar line, so each line's rate and time left are its own.
    """
    if quiet:
        yield None
        return
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        current: dict[str, Any] = {}

        def update(done: int, total: int, label: str) -> None:
            shown = UNITS.get(label, unit)
            if current.get("key") != (total, shown):
                if "task" in current:
                    bar.stop_task(current["task"])
                current["task"] = bar.add_task(label, total=total, unit=shown)
                current["key"] = (total, shown)
            bar.update(current["task"], completed=done, total=total, description=label)

        yield update


@contextlib.contextmanager
def lazy_progress(quiet: bool, unit: str = "prompts") -> Iterator[ProgressFn | None]:
    """:func:`prompt_progress`, drawn from the first update on: errors found before any work starts (bad options,
    layers, files) stay one clean line."""
    if quiet:
        yield None
        return
    with contextlib.ExitStack() as stack:
        bar: list[ProgressFn | None] = []

        def update(done: int, total: int, label: str) -> None:
            if not bar:
                bar.append(stack.enter_context(prompt_progress(False, unit)))
            if bar[0] is not None:
                bar[0](done, total, label)

        yield update
