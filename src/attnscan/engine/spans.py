"""Where each prompt's request lies among the tokens the model reads, after the chat template and truncation.

A composed prompt knows the character span of its request (:meth:`attnscan.prompts.sets.PromptSet.request_span`).
The model reads more than the prompt: the chat template wraps it in turns (a system turn, the user turn, the
generation prompt), and truncation to the grid length may cut its start or end. :func:`request_token_spans` maps
each prompt's character span to the token positions ``[start, end)`` of the encoded, truncated sequence
(:func:`attnscan.prompts.encoding.encode`):

1. the prompt is rendered as text exactly as ``encode`` renders it (the chat template with ``tokenize=False``, or
   the bare text), and the prompt's offset inside that text is found (the template's text before a placeholder
   prompt; else the prompt's only occurrence);
2. the rendered text is tokenised with character offsets (a *fast* tokenizer's offset mapping), and the token ids
   are checked against ``encode``'s; the request's tokens are those whose characters overlap the request's span;
3. the positions are shifted by what truncation dropped from the start and clipped to what it kept.

What each prompt's span covers (:data:`SPAN_SOURCES`, ``TokenSpans.used``):

- ``"request"``: the request's own tokens, all kept;
- ``"request-partial"``: the request's tokens that truncation kept (it cut some);
- ``"prompt"``: the span is unknown (a plain prompt, or a bare request that no wrapper surrounds: then the whole
  prompt *is* the request), so the tokens of the prompt's own text, without the chat template's;
- ``"prompt-cut"``: the span is known but truncation cut the whole request out, so the prompt's kept tokens;
- ``"all"``: the tokens could not be located (a tokenizer without offsets, a template that changes the prompt's
  text, or token ids that differ from ``encode``'s), so every real token, as the plain mean.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..prompts.encoding import Encoded, Truncate

__all__ = ["SPAN_SOURCES", "TokenSpans", "request_token_spans"]

SPAN_SOURCES = ("request", "request-partial", "prompt", "prompt-cut", "all")

_PLACEHOLDER = "\x00attnscan-prompt\x00"


@dataclass(frozen=True)
class TokenSpans:
    """Per prompt, the token positions ``[start, end)`` of its request in the encoded sequence (``spans``) and what
    they cover (``used``: one of :data:`SPAN_SOURCES`)."""

    spans: tuple[tuple[int, int], ...]
    used: tuple[str, ...]

    def counts(self) -> dict[str, int]:
        """How many prompts each source covers (every source listed, zeros included)."""
        seen = Counter(self.used)
        return {source: int(seen.get(source, 0)) for source in SPAN_SOURCES}


def _render(tokenizer: Any, text: str, system_prompt: str | None) -> str:
    """The chat-templated text of one user turn, as :func:`~attnscan.prompts.encoding.encode` renders it."""
    messages = [{"role": "user", "content": text}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return str(rendered)


def _offsets(tokenizer: Any, text: str, special: bool) -> tuple[list[int], list[tuple[int, int]]] | None:
    """Token ids and character offsets of ``text``; ``None`` when the tokenizer gives no offsets."""
    try:
        out = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    if "offset_mapping" not in out:
        return None
    return [int(i) for i in out["input_ids"]], [(int(a), int(b)) for a, b in out["offset_mapping"]]


def _covering(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """The first and one past the last token whose characters overlap ``[start, end)``; ``None`` if none does."""
    hits = [t for t, (a, b) in enumerate(offsets) if a < end and b > start]
    return (hits[0], hits[-1] + 1) if hits else None


def _kept(span: tuple[int, int], dropped: int, n_kept: int) -> tuple[int, int]:
    """``span`` in the positions of the kept tokens (``dropped`` cut from the start), clipped; may be empty."""
    return max(span[0] - dropped, 0), min(span[1] - dropped, n_kept)


def request_token_spans(
    tokenizer: Any,
    texts: Sequence[str],
    char_spans: Sequence[tuple[int, int] | None],
    enc: Encoded,
    *,
    system_prompt: str | None = None,
    truncate: Truncate = "tail",
) -> TokenSpans:
    """The token span of each prompt's request in ``enc`` (what :func:`~attnscan.prompts.encoding.encode` made of
    ``texts`` with the same ``system_prompt`` and ``truncate``); ``char_spans[i]`` is prompt ``i``'s request as
    characters of ``texts[i]``, ``None`` where unknown. See the module docstring for the steps and fallbacks."""
    frame: tuple[str, str] | None = None
    if enc.chat_template:
        placeholder = _render(tokenizer, _PLACEHOLDER, system_prompt)
        if placeholder.count(_PLACEHOLDER) == 1:
            head, tail = placeholder.split(_PLACEHOLDER)
            frame = (head, tail)
    spans: list[tuple[int, int]] = []
    used: list[str] = []
    for i, text in enumerate(texts):
        n_kept = len(enc.ids[i])
        span, source = _one_span(tokenizer, text, char_spans[i], enc, i, frame, system_prompt, truncate)
        if source == "all":
            span = (0, n_kept)
        spans.append(span)
        used.append(source)
    return TokenSpans(tuple(spans), tuple(used))


def _one_span(
    tokenizer: Any,
    text: str,
    char_span: tuple[int, int] | None,
    enc: Encoded,
    i: int,
    frame: tuple[str, str] | None,
    system_prompt: str | None,
    truncate: Truncate,
) -> tuple[tuple[int, int], str]:
    """Prompt ``i``'s token span and its source (see :data:`SPAN_SOURCES`); ``((0, 0), "all")`` when not found."""
    if enc.chat_template:
        rendered = _render(tokenizer, text, system_prompt)
        if frame is not None and rendered == frame[0] + text + frame[1]:
            offset = len(frame[0])
        elif text and rendered.count(text) == 1:
            offset = rendered.index(text)
        else:
            return (0, 0), "all"
    else:
        rendered, offset = text, 0
    tokens = _offsets(tokenizer, rendered, special=not enc.chat_template)
    kept = enc.ids[i]
    if tokens is None or len(tokens[0]) != enc.full_lengths[i]:
        return (0, 0), "all"
    ids, offsets = tokens
    dropped = len(ids) - len(kept) if truncate == "tail" else 0
    if tuple(ids[dropped : dropped + len(kept)]) != kept:
        return (0, 0), "all"
    whole = _covering(offsets, offset, offset + len(text))
    whole_kept = _kept(whole, dropped, len(kept)) if whole is not None else (0, 0)
    if char_span is None:
        return (whole_kept, "prompt") if whole_kept[1] > whole_kept[0] else ((0, 0), "all")
    request = _covering(offsets, offset + char_span[0], offset + char_span[1])
    if request is not None:
        got = _kept(request, dropped, len(kept))
        if got[1] > got[0]:
            return got, "request" if got == (request[0] - dropped, request[1] - dropped) else "request-partial"
    return (whole_kept, "prompt-cut") if whole_kept[1] > whole_kept[0] else ((0, 0), "all")
