"""Encoding prompts onto the token grid: chat template, truncation to the grid length, and what prompts share."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import AttnscanError

Truncate = Literal["head", "tail"]

DEFAULT_LENGTH = 448
"""The grid length T: the reference figure's heatmaps run over query and key tokens 0 to 448."""


def check_truncate(truncate: str) -> None:
    """Refuse a truncation side other than ``head`` or ``tail``."""
    if truncate not in ("head", "tail"):
        raise AttnscanError(f"--truncate must be head or tail, got {truncate}")


@dataclass(frozen=True)
class Encoded:
    """Token ids of one prompt set after the chat template and truncation to the grid length."""

    ids: tuple[tuple[int, ...], ...]
    full_lengths: tuple[int, ...]  # token counts before truncation
    chat_template: bool

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(x) for x in self.ids)

    @property
    def truncated(self) -> int:
        return sum(1 for ids, full in zip(self.ids, self.full_lengths, strict=True) if len(ids) < full)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def warn_truncated(enc: Encoded, length: int, truncate: Truncate, what: str = "prompts", stacklevel: int = 3) -> None:
    """Warn with counts when ``encode`` cut prompts to the grid length (``what`` names them, e.g. "benign prompts")."""
    if enc.truncated:
        warnings.warn(
            f"{enc.truncated} of {len(enc.ids)} {what} are longer than {length} tokens and were cut to their "
            f"{'first' if truncate == 'head' else 'last'} {length}",
            stacklevel=stacklevel,
        )


def shared_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The token ids every sequence of ``seqs`` starts with (e.g. a chat template's system turn); [] if none."""
    if not seqs:
        return []
    first = list(seqs[0])
    n = len(first)
    for ids in seqs[1:]:
        n = min(n, len(ids))
        for i in range(n):
            if ids[i] != first[i]:
                n = i
                break
    return first[:n]


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    length: int,
    *,
    chat_template: bool = True,
    system_prompt: str | None = None,
    truncate: Truncate = "head",
) -> Encoded:
    """Tokenise prompts for the grid of ``length`` tokens.

    With ``chat_template`` (and a tokenizer that has one) each prompt becomes one user turn followed by the
    generation prompt, after an optional system turn. Otherwise the text is tokenised as is, with the tokenizer's
    usual special tokens. Prompts longer than ``length`` keep their first tokens (``truncate="head"``) or their
    last (``"tail"``).
    """
    if length <= 0:
        raise AttnscanError(f"length must be a positive number of tokens, got {length}")
    use_template = chat_template and has_chat_template(tokenizer)
    out: list[tuple[int, ...]] = []
    full: list[int] = []
    for text in texts:
        if use_template:
            messages = [{"role": "user", "content": text}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        ids = [int(i) for i in ids]
        if not ids:
            raise AttnscanError(f"a prompt encodes to no tokens: {text[:40]!r}; remove empty prompts")
        full.append(len(ids))
        kept = ids[:length] if truncate == "head" else ids[-length:]
        out.append(tuple(kept))
    return Encoded(ids=tuple(out), full_lengths=tuple(full), chat_template=use_template)
