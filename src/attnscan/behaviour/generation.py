"""Greedy, deterministic, batched generation: what the model answers to each prompt.

:func:`generate` encodes prompts like :func:`attnscan.prompts.encoding.encode`, runs batches of similar length
left-padded through ``model.generate`` (the batches come from :class:`attnscan.engine.batching.Batches`;
transformers derives each row's position ids from the attention mask) and decodes only the new tokens.
:class:`GenerationOptions` holds the decoding options shared by :func:`attnscan.behaviour.behave.behave` and
:func:`attnscan.behaviour.defend.defend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .._types import ProgressFn
from ..engine.batching import Batches, pad_token_id
from ..errors import AttnscanError
from ..models.loading import LoadedModel
from ..prompts.encoding import encode
from ..prompts.sets import PromptSet

__all__ = ["DEFAULT_MAX_PROMPT_TOKENS", "GenerationOptions", "eos_ids", "generate", "generate_with"]

DEFAULT_MAX_PROMPT_TOKENS = 2048


def eos_ids(loaded: LoadedModel) -> list[int]:
    """End-of-sequence ids inside the vocabulary: the generation config's and the tokenizer's."""
    vocab = int(loaded.model.get_input_embeddings().weight.shape[0])
    found: list[int] = []
    for candidate in (
        getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None),
        getattr(loaded.tokenizer, "eos_token_id", None),
    ):
        items = candidate if isinstance(candidate, (list, tuple)) else [candidate]
        for item in items:
            if item is not None and 0 <= int(item) < vocab and int(item) not in found:
                found.append(int(item))
    return found


@dataclass(frozen=True)
class GenerationOptions:
    """Greedy decoding options of :func:`generate`, shared by :func:`attnscan.behaviour.behave.behave` and
    :func:`attnscan.behaviour.defend.defend`.

    Checked on creation, so a bad value fails before the first prompt runs.
    """

    max_new_tokens: int = 64
    batch_size: int = 8
    chat_template: bool = True
    system_prompt: str | None = None
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise AttnscanError(f"--max-new-tokens must be at least 1 (max_new_tokens={self.max_new_tokens})")
        if self.batch_size < 1:
            raise AttnscanError(f"--batch-size must be at least 1 (batch_size={self.batch_size})")

    def info(self) -> dict[str, Any]:
        """The options as recorded in a result's metadata (``"generation"``)."""
        return {"decoding": "greedy", **asdict(self)}


def generate(
    loaded: LoadedModel,
    texts: Sequence[str] | PromptSet,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    progress: ProgressFn | None = None,
    progress_label: str = "generate",
) -> list[str]:
    """Greedy responses of the model to each prompt, in the prompts' order (new tokens only, special tokens dropped).

    Prompts are encoded like :func:`attnscan.prompts.encoding.encode` (one user turn with the chat template unless
    turned off) and keep their last ``max_prompt_tokens`` tokens. Batches of similar length are left-padded; the
    attention mask goes to ``model.generate``, which derives position ids from it, so a prompt's response does not
    depend on its batch. Decoding is plain greedy search (no sampling, one beam, repetition penalty 1): the same
    model and prompts always give the same responses. Generation stops at the model's or the tokenizer's
    end-of-sequence token or after ``max_new_tokens``.
    """
    options = GenerationOptions(max_new_tokens, batch_size, chat_template, system_prompt, max_prompt_tokens)
    return generate_with(loaded, texts, options, progress, progress_label)


def generate_with(
    loaded: LoadedModel,
    texts: Sequence[str] | PromptSet,
    options: GenerationOptions,
    progress: ProgressFn | None = None,
    progress_label: str = "generate",
) -> list[str]:
    """:func:`generate` with its options in one object."""
    from transformers import GenerationConfig

    prompt_texts = list(texts.texts if isinstance(texts, PromptSet) else texts)
    if not prompt_texts:
        raise AttnscanError("no prompts to generate from: give at least one prompt")
    enc = encode(
        loaded.tokenizer,
        prompt_texts,
        options.max_prompt_tokens,
        chat_template=options.chat_template,
        system_prompt=options.system_prompt,
        truncate="tail",
    )
    model = loaded.model
    pad = pad_token_id(loaded.tokenizer, model)
    eos = eos_ids(loaded)
    config = GenerationConfig(
        max_new_tokens=options.max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        pad_token_id=pad,
        eos_token_id=eos or None,
    )
    out: list[str] = [""] * len(enc.ids)
    batches = Batches(enc.ids, pad_id=pad, device=loaded.device, batch_size=options.batch_size, padding_side="left")
    done = 0
    if progress is not None:
        progress(0, len(out), progress_label)
    with torch.inference_mode():
        for batch in batches:
            input_ids = batch.input_ids
            generated = model.generate(
                input_ids=input_ids, attention_mask=batch.attention_mask, generation_config=config
            )
            new = generated[:, input_ids.shape[1] :].tolist()
            for row, i in enumerate(batch.rows):
                tokens = new[row]
                stops = [j for j, t in enumerate(tokens) if t in eos]
                if stops:
                    tokens = tokens[: stops[0]]
                out[i] = str(loaded.tokenizer.decode(tokens, skip_special_tokens=True)).strip()
            done += len(batch.rows)
            if progress is not None:
                progress(done, len(out), progress_label)
    return out
