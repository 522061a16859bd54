"""Perplexity on plain text, without ever building a ``[B, P, vocab]`` logits tensor.

:func:`perplexity` is ``exp`` of the mean next-token negative log-likelihood over all predicted tokens of all texts
(token-weighted, not a mean of per-text perplexities). The text is tokenised as plain text (no chat template),
batched through :class:`attnscan.engine.batching.Batches`, and the LM head runs on chunks of positions
(:func:`lm_head`, :func:`nll_sum`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..engine.batching import Batches, accepts_position_ids, pad_token_id
from ..errors import AttnscanError
from ..models.anatomy import base_model
from ..models.loading import LoadedModel
from ..prompts.encoding import encode
from ..prompts.sets import PromptSet

__all__ = ["DEFAULT_PPL_CHUNK", "DEFAULT_PPL_LENGTH", "lm_head", "nll_sum", "perplexity"]

DEFAULT_PPL_LENGTH = 512
DEFAULT_PPL_CHUNK = 1024


def lm_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Final hidden states ``[M, H]`` → float32 logits ``[M, V]``, with the model's final logit soft-capping."""
    head = model.get_output_embeddings()
    if head is None:
        raise AttnscanError(f"{type(model).__name__} has no LM head: perplexity needs a causal LM")
    cap = getattr(model.config, "final_logit_softcapping", None)

    def project(hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = head(hidden).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return project


def nll_sum(
    loaded: LoadedModel,
    texts: Sequence[str],
    *,
    length: int = DEFAULT_PPL_LENGTH,
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_PPL_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats, float64) and the number of predicted tokens.

    Each text is tokenised as plain text with the tokenizer's special tokens and cut to its first ``length``
    tokens; a text of n tokens contributes n − 1 predictions. ``progress(n)`` is called after each batch.
    """
    if chunk_tokens < 1:
        raise AttnscanError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    enc = encode(loaded.tokenizer, texts, length, chat_template=False, truncate="head")
    model = loaded.model
    base = base_model(model)
    project = lm_head(model)
    positions = accepts_position_ids(base)
    batches = Batches(
        enc.ids, pad_id=pad_token_id(loaded.tokenizer, model), device=loaded.device, batch_size=batch_size
    )
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            input_ids = batch.input_ids
            hidden = base(**batch.forward_kwargs(positions)).last_hidden_state  # [B, P, H], after the final norm
            lens = torch.tensor(batch.lengths, device=hidden.device)
            p = hidden.shape[1]
            predicts = torch.arange(p - 1, device=hidden.device)[None, :] < (lens[:, None] - 1)  # [B, P-1]
            states = hidden[:, :-1][predicts]  # [M, H]
            targets = input_ids[:, 1:][predicts]  # [M]
            for start in range(0, states.shape[0], chunk_tokens):
                logits = project(states[start : start + chunk_tokens])
                tgt = targets[start : start + chunk_tokens]
                nll = torch.logsumexp(logits, -1) - logits.gather(1, tgt[:, None]).squeeze(1)
                total += float(nll.double().sum())
            count += int(states.shape[0])
            if progress is not None:
                progress(len(batch.rows))
    return total, count


def perplexity(
    loaded: LoadedModel,
    texts: Sequence[str] | PromptSet,
    *,
    length: int = DEFAULT_PPL_LENGTH,
    batch_size: int = 8,
    chunk_tokens: int = DEFAULT_PPL_CHUNK,
) -> float:
    """Token-weighted perplexity ``exp(Σ nll / Σ predicted tokens)`` of the model on ``texts`` (see :func:`nll_sum`)."""
    items = list(texts.texts if isinstance(texts, PromptSet) else texts)
    if not items:
        raise AttnscanError("no texts for perplexity: give at least one")
    total, count = nll_sum(loaded, items, length=length, batch_size=batch_size, chunk_tokens=chunk_tokens)
    if count == 0:
        raise AttnscanError("perplexity needs texts of at least two tokens")
    return math.exp(total / count)
