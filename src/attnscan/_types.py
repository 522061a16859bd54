"""Types and defaults shared by several stages, defined once (this module imports nothing heavy)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_FLOOR = -10.0
"""Floor of the log statistics: a ln(mean probability) below it is shown as the floor (the reference figure's
scale runs from -10 to 0)."""

ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, label)``: units done so far (prompts, layers ...), their total, and what is running."""

NoticeFn = Callable[[str], None]
"""``on_notice(sentence)``: something the user should hear about while a job runs (back-off, resume ...)."""


def take_options(cls: type[T], base: T | None, keywords: dict[str, Any]) -> T:
    """``base`` (else ``cls()``) with those of ``keywords`` that are fields of the dataclass ``cls`` replaced.

    The keywords used are removed from ``keywords``, so a function that accepts several option objects and loose
    keywords (kept for callers of the older signatures) can take each object's share and refuse what is left.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    mine = {k: keywords.pop(k) for k in list(keywords) if k in names}
    start = base if base is not None else cls()
    return dataclasses.replace(start, **mine) if mine else start  # type: ignore[type-var]


def refuse_leftovers(function: str, keywords: dict[str, Any]) -> None:
    """A TypeError naming the keywords no option object took, as Python does for an unknown keyword."""
    if keywords:
        raise TypeError(f"{function}() got unexpected keyword arguments: {', '.join(sorted(keywords))}")


def int_ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0–2, 5, 7–8"``."""
    nums = sorted(int(v) for v in values)
    parts: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}–{nums[j]}")
        i = j + 1
    return ", ".join(parts)
