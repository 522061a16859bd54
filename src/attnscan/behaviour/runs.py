"""What the behave and defend jobs share: response-record files, the run description and one progress stream.

- :func:`save_jsonl` / :func:`load_jsonl`: response records, one JSON object per line (:data:`RESPONSES_FILE`);
- :func:`run_info`: how a run was made (model, prompt sets, generation options, refusal matcher, judge), as
  written to its metadata file;
- :class:`Tracker`: turns the counts of several stages (one :func:`attnscan.behaviour.generation.generate` call per
  prompt set, perplexity batches) into one ``progress(done, total, label)`` stream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_file
from .._types import ProgressFn
from ..errors import AttnscanError
from ..models.loading import LoadedModel
from ..prompts.sets import PromptSet
from .generation import GenerationOptions
from .judges import ClassifierJudge, RefusalMatcher

__all__ = ["RESPONSES_FILE", "Tracker", "load_jsonl", "run_info", "save_jsonl"]

RESPONSES_FILE = "responses.jsonl"


def save_jsonl(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line (UTF-8), atomically: a temporary file beside ``path`` then ``os.replace``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(final) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(dict(rec), ensure_ascii=False) + "\n")
    return final


def load_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read what :func:`save_jsonl` wrote (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise AttnscanError(f"JSONL file not found: {p}")
    out = []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AttnscanError(f"{p}:{number} is not valid JSON ({exc.msg})") from None
    return out


def run_info(
    loaded: LoadedModel,
    prompt_sets: Mapping[str, PromptSet],
    generation: GenerationOptions,
    matcher: RefusalMatcher,
    judge: ClassifierJudge | None,
    *,
    settings: Mapping[str, Any] | None = None,
    measures: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The description of a run: ``model``, ``prompt_sets`` (provenance), then ``settings``, ``generation``, then
    ``measures``, ``refusal_matcher`` and ``judge``, in this order."""
    return {
        "model": {"spec": loaded.spec, **loaded.source},
        "prompt_sets": {name: ps.provenance() for name, ps in prompt_sets.items()},
        **(settings or {}),
        "generation": generation.info(),
        **(measures or {}),
        "refusal_matcher": {"window": matcher.window, "phrases": len(matcher.phrases)},
        "judge": judge.info() if judge is not None else None,
    }


class Tracker:
    """Turns per-stage counts into one ``progress(done, total, label)`` stream over ``total`` items."""

    def __init__(self, progress: ProgressFn | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def stage(self, label: str) -> ProgressFn:
        """A ``progress(done, total, label)`` for one stage that reports ``done`` on top of the earlier stages."""
        start = self.done

        def update(done: int, _total: int, _label: str) -> None:
            self.done = start + done
            if self.progress is not None:
                self.progress(self.done, self.total, label)

        return update

    def add(self, label: str) -> Callable[[int], None]:
        """A ``progress(n)`` that adds ``n`` items done."""

        def update(n: int) -> None:
            self.done += n
            if self.progress is not None:
                self.progress(self.done, self.total, label)

        return update
