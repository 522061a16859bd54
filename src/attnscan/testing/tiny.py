"""Tiny random-weight models built from transformers configs, a small offline tokenizer with a chat template, and the
independent reference the capture is checked against (HF eager attention with ``output_attentions=True``, one prompt
at a time). Used by the test suite and the benchmarks; nothing here downloads anything."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

VOCAB = 96
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _llama(**kw: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        **kw,
    )
    return LlamaForCausalLM(cfg)


def _mistral(**kw: Any) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    params: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "sliding_window": 6,
    }
    return MistralForCausalLM(MistralConfig(**{**params, **kw}))  # kw may override these (layers, window)


def _gemma3(**kw: Any) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
        **kw,
    )
    return Gemma3ForCausalLM(cfg)


def _gemma2(**kw: Any) -> Any:
    """Gemma 2 soft-caps its attention logits (SDPA and the chunked capture cannot, so its layers run eager attention).
    The logits of random initial weights stay far below any cap (a capture that ignored the capping would then pass
    every exactness test), so the cap is small, the logits are scaled by 1/sqrt(head_dim) instead of Gemma's 1/16 and
    the query and key weights are scaled up: capping then moves single attention weights by 0.15-0.33 (without the
    scalar and the keys, a query scale of 30 alone moved them by 1e-4)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    params: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "attn_logit_softcapping": 2.0,
        "sliding_window": 6,
        "max_position_embeddings": 64,
        "query_pre_attn_scalar": 8,
    }
    model = Gemma2ForCausalLM(Gemma2Config(**{**params, **kw}))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
            layer.self_attn.k_proj.weight.mul_(10.0)
    return model


def _gptj(**kw: Any) -> Any:
    from transformers import GPTJConfig, GPTJForCausalLM

    cfg = GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, n_positions=512, **kw)
    return GPTJForCausalLM(cfg)


def _gpt2(**kw: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=512, **kw)
    return GPT2LMHeadModel(cfg)


def _gpt_neo(**kw: Any) -> Any:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=6,
        max_position_embeddings=512,
        **kw,
    )
    return GPTNeoForCausalLM(cfg)


BUILDERS: dict[str, Callable[..., Any]] = {
    "llama": _llama,
    "mistral": _mistral,
    "gemma3": _gemma3,
    "gemma2": _gemma2,
    "gptj": _gptj,
    "gpt2": _gpt2,
    "gpt_neo": _gpt_neo,
}


def build_model(arch: str, seed: int = 0, attn: str | None = None, **kw: Any) -> Any:
    """A tiny random-weight model of ``arch`` in eval mode (SDPA where transformers allows it, else eager)."""
    torch.manual_seed(seed)
    model = BUILDERS[arch](**kw)
    if attn is None:
        attn = "sdpa" if getattr(type(model), "_supports_attention_backend", False) else "eager"
        if attn == "sdpa" and getattr(model.config, "attn_logit_softcapping", None) is not None:
            attn = "eager"  # transformers refuses SDPA for soft-capped attention (Gemma 2)
    model.set_attn_implementation(attn)
    return model.eval()


def random_prompts(lengths: Sequence[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def eager_reference(
    model: Any, seqs: Sequence[Sequence[int]], layers: Sequence[int], length: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Independent reference: each prompt alone through HF eager attention with ``output_attentions=True``.

    Returns per-layer mean attention ``float64 [T, T]`` (NaN where no prompt reaches) and the count ``[T, T]``.
    """
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    sums = {layer: torch.zeros(length, length, dtype=torch.float64) for layer in layers}
    count = torch.zeros(length, length, dtype=torch.int64)
    try:
        with torch.no_grad():
            for seq in seqs:
                seq = list(seq)[:length]
                n = len(seq)
                out = model(torch.tensor([seq]), output_attentions=True, use_cache=False)
                for layer in layers:
                    sums[layer][:n, :n] += out.attentions[layer][0].double().mean(0)
                count[:n, :n] += torch.tril(torch.ones(n, n, dtype=torch.int64))
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)
    means = {
        layer: torch.where(count > 0, s / count.clamp_min(1), torch.full_like(s, float("nan")))
        for layer, s in sums.items()
    }
    return means, count


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over a small vocabulary, with a chat template; built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "the",
        "a",
        "how",
        "do",
        "i",
        "to",
        "you",
        "what",
        "is",
        "make",
        "write",
        "explain",
        "tell",
        "me",
        "story",
        "python",
        "process",
        "kill",
        "recipe",
        "bread",
        "ignore",
        "rules",
        "now",
        "are",
        "free",
        "pretend",
        "your",
        "grandmother",
        "poem",
        "about",
        "snow",
        "and",
        "of",
        "in",
        "for",
        "with",
        "that",
        "this",
        "it",
        "can",
        "please",
        "step",
        "by",
        "no",
        "filter",
        "developer",
        "mode",
    ]
    special = ["<unk>", "<pad>", "<s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(special + words)}
    for i in range(len(vocab), VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="<|end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast
