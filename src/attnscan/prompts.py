"""Prompt sets and their encoding onto the token grid.

A :class:`PromptSet` is a name, the texts, and where they came from (source string, count, sha256 of the texts),
so every result can say exactly which prompts produced it.

Sources understood here: a ``.txt`` file with one prompt per line (blank lines skipped), and ``builtin:NAME`` for
the small sets shipped inside the package (``builtin:demo-benign``, ``builtin:demo-jailbreak``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from .errors import AttnscanError

Truncate = Literal["head", "tail"]


@dataclass(frozen=True)
class PromptSet:
    """An ordered, immutable set of prompt texts with provenance."""

    name: str
    texts: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        if not self.texts:
            raise AttnscanError(f"prompt set '{self.name}' from {self.source} is empty: give at least one prompt")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def sha256(self) -> str:
        """sha256 of the texts (JSON list, UTF-8): equal sets give equal hashes whatever file they came from."""
        return hashlib.sha256(json.dumps(list(self.texts), ensure_ascii=False).encode("utf-8")).hexdigest()

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "count": len(self.texts), "sha256": self.sha256}


def builtin_names() -> list[str]:
    root = resources.files("attnscan") / "data"
    return sorted(p.name[: -len(".txt")] for p in root.iterdir() if p.name.endswith(".txt"))


def _read_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prompts(src: str | Path | Sequence[str] | PromptSet, name: str | None = None) -> PromptSet:
    """Load a prompt set from a source string, a path, a list of texts, or pass a PromptSet through."""
    if isinstance(src, PromptSet):
        return src
    if not isinstance(src, (str, Path)):
        texts = [str(t) for t in src]
        return PromptSet(name or "prompts", tuple(texts), "<memory>")
    text_src = str(src)
    if text_src.startswith("builtin:"):
        key = text_src.split(":", 1)[1]
        available = builtin_names()
        if key not in available:
            raise AttnscanError(f"unknown built-in set '{key}': choose one of {', '.join(available)}")
        body = (resources.files("attnscan") / "data" / f"{key}.txt").read_text(encoding="utf-8")
        return PromptSet(name or key, tuple(_read_lines(body)), text_src)
    path = Path(text_src).expanduser()
    if not path.exists():
        raise AttnscanError(f"prompt file not found: {text_src}: check the path")
    if path.is_dir():
        raise AttnscanError(f"{text_src} is a directory: give a prompt file (.txt, one prompt per line)")
    if path.suffix.lower() not in (".txt", ""):
        raise AttnscanError(f"cannot read {text_src}: only .txt files (one prompt per line) are supported so far")
    raw = path.read_bytes()
    try:
        body = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise AttnscanError(f"{text_src} line {line} is not valid UTF-8: re-save the file as UTF-8") from None
    texts = _read_lines(body)
    if not texts:
        raise AttnscanError(f"prompt file {text_src} holds no prompts: put one prompt per line")
    return PromptSet(name or path.stem, tuple(texts), str(path))


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
