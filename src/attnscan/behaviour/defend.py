"""Layer-bypass defence: skip chosen decoder layers and measure what it buys and what it costs.

:func:`bypass_layers` makes each chosen decoder layer hand its input hidden states on unchanged (the residual
stream skips the layer). The layer still runs, and its output is discarded: this keeps the KV cache of every layer
filled, so generation with a cache behaves exactly like a model without those layers.

:func:`defend` compares the unmodified model ("baseline") with the bypassed one ("bypass") on

- **jailbreak refusal rate**: share of jailbreak prompts refused (:class:`attnscan.behave.RefusalMatcher`), with
  its Wilson 95 % interval; ASR = 1 − refusal rate. With a judge (:class:`attnscan.behave.ClassifierJudge`), the
  judge's refusal rate and benign retention are reported beside the phrase-based ones;
- **benign retention**: share of benign prompts *not* refused, with its Wilson interval. An empty or garbled
  answer is not a refusal and so counts as kept: read it with ``benign_empty`` / ``jailbreak_empty`` (responses
  that are empty) and the similarity below;
- **benign similarity**: how close the bypassed model's benign answers stay to the baseline's, as the mean over
  benign prompts of :func:`chrf` (character n-gram F-score, n = 1..6, β = 1, white space removed) and of
  :func:`token_f1` (bag-of-words F1 over lower-cased word tokens). Both are 1 for identical answers and 0 for
  answers with nothing in common;
- **perplexity** on benign text (:func:`perplexity`): ``exp`` of the mean next-token negative log-likelihood over
  all predicted tokens of all texts (token-weighted, not a mean of per-text perplexities). The text is tokenised
  as plain text (no chat template). The LM head runs on chunks of positions, so no ``[B, P, vocab]`` logits tensor
  is ever built.

:func:`sweep` bypasses the first ``k`` layers of an ordering (e.g. layers sorted by detector AUROC or attention
shift, :func:`layer_order`) for each ``k`` and tabulates the trade-off; :func:`trade_off_figure` plots it.
:func:`defend` with ``sweep_ks`` runs one setting and a sweep together, sharing the baseline, and
:meth:`DefenceResult.save` then writes the sweep table and the trade-off curve beside the setting's results.

Where the layers come from: :func:`scan_layer_order` ranks the layers of a scan bundle's ``layers.csv``;
:func:`detector_layers` reads the flagged layers of a detector directory.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn

from .._io import atomic_dir, write_json
from .._types import ProgressFn
from ..engine.batching import Batches, accepts_position_ids, pad_token_id
from ..engine.capture import base_model, decoder_layers
from ..errors import AttnscanError
from ..models.loading import LoadedModel
from ..prompts.encoding import encode
from ..prompts.sets import PromptSet, as_prompt_set
from ..views.tradeoff import trade_off_figure
from .behave import (
    DEFAULT_MAX_PROMPT_TOKENS,
    ClassifierJudge,
    GenerationOptions,
    RefusalMatcher,
    generate_with,
    judge_responses,
    judged_rate,
    save_jsonl,
    wilson_interval,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "DefenceArm",
    "DefenceResult",
    "bypass_layers",
    "chrf",
    "defend",
    "detector_layers",
    "layer_order",
    "perplexity",
    "scan_layer_order",
    "sweep",
    "sweep_results",
    "sweep_table",
    "token_f1",
    "trade_off_figure",
]

"""``progress(done, total, label)``: work items done so far, their total, and what is running."""

DEFAULT_PPL_LENGTH = 512
DEFAULT_PPL_CHUNK = 1024
META_FILE = "defence.json"
FORMAT = "attnscan.defence"
SWEEP_FILE = "sweep.csv"
SWEEP_RESPONSES_FILE = "sweep_responses.jsonl"
FIGURE_FILE = "tradeoff.png"
DETECTION_FILE = "detection.csv"


# --------------------------------------------------------------------------------------------------- bypass


def _resolve_bypass(stack: nn.ModuleList, layers: Iterable[int] | str | None) -> tuple[int, ...]:
    from ..models.loading import parse_layers

    if layers is None:
        return ()
    if isinstance(layers, str):
        return () if not layers.strip() else parse_layers(layers, len(stack))
    items = [int(x) for x in layers]
    return parse_layers(items, len(stack)) if items else ()


def _passthrough(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook: replace a decoder layer's hidden-state output by its hidden-state input."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise AttnscanError(
            f"cannot bypass {type(module).__name__}: its hidden states are neither its first argument nor "
            "'hidden_states'"
        )
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (hidden, *output[1:])
    raise AttnscanError(f"cannot bypass {type(module).__name__}: it returns {type(output).__name__}")


@contextlib.contextmanager
def bypass_layers(model: Any, layers: Iterable[int] | str | None) -> Iterator[tuple[int, ...]]:
    """Within the block, each chosen decoder layer of ``model`` passes its input hidden states through unchanged.

    ``model`` is a transformers causal LM (or a :class:`LoadedModel`); ``layers`` are layer indices (negative
    count from the end, ``"3,7"`` strings accepted); empty or ``None`` bypasses nothing. Yields the resolved
    layers. The hooks are removed on exit, also when the block raises.
    """
    if isinstance(model, LoadedModel):
        model = model.model
    stack = decoder_layers(model)
    chosen = _resolve_bypass(stack, layers)
    handles = []
    try:
        for layer in chosen:
            handles.append(stack[layer].register_forward_hook(_passthrough, with_kwargs=True))
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------- perplexity


def _lm_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
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
    project = _lm_head(model)
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


# --------------------------------------------------------------------------------------------------- similarity


def _char_ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str, n: int = 6, beta: float = 1.0) -> float:
    """Character n-gram F-score in [0, 1] (chrF with orders 1..``n``, white space removed).

    Precision and recall are averaged over the orders at which either string has n-grams, then combined as
    ``(1 + β²) P R / (β² P + R)``. Two empty strings score 1, one empty string 0.
    """
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    if not hyp and not ref:
        return 1.0
    if not hyp or not ref:
        return 0.0
    precisions, recalls = [], []
    for order in range(1, n + 1):
        h, r = _char_ngrams(hyp, order), _char_ngrams(ref, order)
        if not h and not r:
            continue
        overlap = sum((h & r).values())
        precisions.append(overlap / sum(h.values()) if h else 0.0)
        recalls.append(overlap / sum(r.values()) if r else 0.0)
    p, r_ = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p == 0 and r_ == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * p * r_ / (b2 * p + r_)


_WORD = re.compile(r"\w+")


def token_f1(hypothesis: str, reference: str) -> float:
    """Bag-of-words F1 in [0, 1] over lower-cased ``\\w+`` tokens. Two empty strings score 1, one empty 0."""
    h, r = Counter(_WORD.findall(hypothesis.lower())), Counter(_WORD.findall(reference.lower()))
    if not h and not r:
        return 1.0
    overlap = sum((h & r).values())
    if overlap == 0:
        return 0.0
    p, rec = overlap / sum(h.values()), overlap / sum(r.values())
    return 2 * p * rec / (p + rec)


# --------------------------------------------------------------------------------------------------- results


@dataclass
class DefenceArm:
    """One model variant's behaviour: responses, refusal flags (aligned with the prompts) and perplexity.

    With a judge (:class:`attnscan.behave.ClassifierJudge`), ``*_judge_labels`` hold its label for each response
    and ``*_judge_refusals`` whether that label counts as a refusal (``None`` when the judge has no refusal
    labels); without one they are ``None``.
    """

    name: str
    layers: tuple[int, ...]
    jailbreak_responses: list[str]
    jailbreak_refusals: list[bool]
    benign_responses: list[str]
    benign_refusals: list[bool]
    perplexity: float | None = None
    jailbreak_judge_labels: list[str] | None = None
    jailbreak_judge_refusals: list[bool | None] | None = None
    benign_judge_labels: list[str] | None = None
    benign_judge_refusals: list[bool | None] | None = None

    def metrics(self, reference: DefenceArm | None = None) -> dict[str, Any]:
        """Rates with Wilson intervals; similarity of benign answers to ``reference``'s (NaN without one).

        A judged arm also has ``jailbreak_judge_refusals``, ``jailbreak_judge_refusal_rate`` (``_low``, ``_high``),
        ``benign_judge_refusals`` and ``benign_judge_retention`` (``_low``, ``_high``): the phrase-based columns'
        twins with the judge's refusal calls in place of the matcher's (NaN when the judge has no refusal labels).
        """
        nj, kj = len(self.jailbreak_refusals), sum(self.jailbreak_refusals)
        nb, kb = len(self.benign_refusals), sum(self.benign_refusals)
        jlow, jhigh = wilson_interval(kj, nj)
        blow, bhigh = wilson_interval(nb - kb, nb)
        if reference is not None:
            pairs = list(zip(self.benign_responses, reference.benign_responses, strict=True))
            sim_chrf = sum(chrf(a, b) for a, b in pairs) / len(pairs)
            sim_f1 = sum(token_f1(a, b) for a, b in pairs) / len(pairs)
        else:
            sim_chrf = sim_f1 = math.nan
        row: dict[str, Any] = {
            "variant": self.name,
            "k": len(self.layers),
            "layers": ",".join(str(x) for x in self.layers),
            "jailbreak_n": nj,
            "jailbreak_refusals": kj,
            "jailbreak_refusal_rate": kj / nj,
            "jailbreak_refusal_low": jlow,
            "jailbreak_refusal_high": jhigh,
            "asr": 1 - kj / nj,
            "benign_n": nb,
            "benign_refusals": kb,
            "benign_retention": (nb - kb) / nb,
            "benign_retention_low": blow,
            "benign_retention_high": bhigh,
            "jailbreak_empty": sum(not r.strip() for r in self.jailbreak_responses),
            "benign_empty": sum(not r.strip() for r in self.benign_responses),
            "benign_chrf": sim_chrf,
            "benign_token_f1": sim_f1,
            "perplexity": math.nan if self.perplexity is None else self.perplexity,
        }
        if self.jailbreak_judge_refusals is not None and self.benign_judge_refusals is not None:
            refused, j_rate, j_low, j_high = judged_rate(self.jailbreak_judge_refusals)
            benign_kept = [None if f is None else not f for f in self.benign_judge_refusals]
            kept, b_rate, b_low, b_high = judged_rate(benign_kept)
            row.update(
                jailbreak_judge_refusals=refused,
                jailbreak_judge_refusal_rate=j_rate,
                jailbreak_judge_refusal_low=j_low,
                jailbreak_judge_refusal_high=j_high,
                benign_judge_refusals=nb - kept,
                benign_judge_retention=b_rate,
                benign_judge_retention_low=b_low,
                benign_judge_retention_high=b_high,
            )
        return row


@dataclass
class DefenceResult:
    """The baseline and the bypassed model on the same prompts (see :func:`defend`).

    ``sweep``: the :func:`sweep_table` of a sweep run alongside (``defend(..., sweep_ks=...)``), else ``None``;
    ``sweep_arms``: that sweep's bypassed variants by ``k`` (``k = 0`` is the baseline).
    """

    baseline: DefenceArm
    bypass: DefenceArm
    jailbreak: PromptSet
    benign: PromptSet
    info: dict[str, Any] = field(default_factory=dict)
    sweep: pd.DataFrame | None = field(default=None, compare=False, repr=False)
    sweep_arms: dict[int, DefenceArm] = field(default_factory=dict, compare=False, repr=False)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.bypass.layers

    def row(self) -> dict[str, Any]:
        """The bypassed variant's metrics, with its benign answers compared to the baseline's."""
        return self.bypass.metrics(self.baseline)

    def table(self) -> pd.DataFrame:
        """Two rows, ``baseline`` and ``bypass``, with the columns of :meth:`DefenceArm.metrics`."""
        return pd.DataFrame([self.baseline.metrics(self.baseline), self.row()])

    def records(self) -> list[dict[str, Any]]:
        """One record per variant, set and prompt: ``{variant, layers, set, index, prompt, response, refusal}``,
        plus ``judge_label`` and ``judge_refusal`` for a judged arm."""
        return self._arm_records(self.baseline) + self._arm_records(self.bypass)

    def sweep_records(self) -> list[dict[str, Any]]:
        """The records of the sweep's bypassed variants, ``k`` first (``k = 0``, the baseline, is in records())."""
        return [rec for k, arm in sorted(self.sweep_arms.items()) if k for rec in self._arm_records(arm, k=k)]

    def _arm_records(self, arm: DefenceArm, **extra: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for set_name, ps, responses, refusals, labels, flags in (
            (
                "jailbreak",
                self.jailbreak,
                arm.jailbreak_responses,
                arm.jailbreak_refusals,
                arm.jailbreak_judge_labels,
                arm.jailbreak_judge_refusals,
            ),
            (
                "benign",
                self.benign,
                arm.benign_responses,
                arm.benign_refusals,
                arm.benign_judge_labels,
                arm.benign_judge_refusals,
            ),
        ):
            for i, (prompt, response, refused) in enumerate(zip(ps.texts, responses, refusals, strict=True)):
                rec = {
                    **extra,
                    "variant": arm.name,
                    "layers": list(arm.layers),
                    "set": set_name,
                    "index": i,
                    "prompt": prompt,
                    "response": response,
                    "refusal": refused,
                }
                if labels is not None and flags is not None:
                    rec.update(judge_label=labels[i], judge_refusal=flags[i])
                out.append(rec)
        return out

    def save(self, out: str | os.PathLike[str], *, overwrite: bool = False, dpi: int = 150) -> Path:
        """Write ``responses.jsonl``, ``defence.csv`` and ``defence.json`` to ``out`` atomically.

        With a :attr:`sweep`, also ``sweep.csv`` (the table), ``tradeoff.png`` (:func:`trade_off_figure` at
        ``dpi``) and ``sweep_responses.jsonl`` (:meth:`sweep_records`), inside the same directory, which appears
        complete or not at all.
        """
        final = Path(out)
        with atomic_dir(final, overwrite, marker=META_FILE, what="defence results") as tmp:
            save_jsonl(tmp / "responses.jsonl", self.records())
            self.table().to_csv(tmp / "defence.csv", index=False)
            if self.sweep is not None:
                from ..views.saving import save_figure

                self.sweep.to_csv(tmp / SWEEP_FILE, index=False)
                save_jsonl(tmp / SWEEP_RESPONSES_FILE, self.sweep_records())
                save_figure(trade_off_figure(self.sweep), tmp / FIGURE_FILE, dpi=dpi)
            write_json(tmp / META_FILE, {"format": FORMAT, **self.info})
        return final


# --------------------------------------------------------------------------------------------------- running


class _Tracker:
    """Turns per-stage counts into one ``progress(done, total, label)`` stream."""

    def __init__(self, progress: ProgressFn | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def stage(self, label: str) -> Callable[[int, int, str], None]:
        start = self.done

        def update(done: int, _total: int, _label: str) -> None:
            self.done = start + done
            if self.progress is not None:
                self.progress(self.done, self.total, label)

        return update

    def add(self, label: str) -> Callable[[int], None]:
        def update(n: int) -> None:
            self.done += n
            if self.progress is not None:
                self.progress(self.done, self.total, label)

        return update


@dataclass(frozen=True)
class _Options:
    generation: GenerationOptions
    ppl_texts: tuple[str, ...] | None
    ppl_length: int
    matcher: RefusalMatcher
    judge: ClassifierJudge | None

    def arm_items(self, jailbreak: PromptSet, benign: PromptSet) -> int:
        return len(jailbreak) + len(benign) + (len(self.ppl_texts) if self.ppl_texts else 0)


def _run_arm(
    loaded: LoadedModel,
    name: str,
    layers: tuple[int, ...],
    jailbreak: PromptSet,
    benign: PromptSet,
    opts: _Options,
    tracker: _Tracker,
) -> DefenceArm:
    gen = opts.generation
    with bypass_layers(loaded.model, layers):
        jb = generate_with(loaded, jailbreak.texts, gen, tracker.stage(f"{name} jailbreak"))
        bn = generate_with(loaded, benign.texts, gen, tracker.stage(f"{name} benign"))
        ppl = None
        if opts.ppl_texts:
            total, count = nll_sum(
                loaded,
                opts.ppl_texts,
                length=opts.ppl_length,
                batch_size=gen.batch_size,
                progress=tracker.add(f"{name} perplexity"),
            )
            ppl = math.exp(total / count) if count else math.nan
    arm = DefenceArm(
        name=name,
        layers=layers,
        jailbreak_responses=jb,
        jailbreak_refusals=[opts.matcher.is_refusal(r) for r in jb],
        benign_responses=bn,
        benign_refusals=[opts.matcher.is_refusal(r) for r in bn],
        perplexity=ppl,
    )
    return _judge_arm(arm, jailbreak, benign, opts.judge) if opts.judge is not None else arm


def _judge_arm(arm: DefenceArm, jailbreak: PromptSet, benign: PromptSet, judge: ClassifierJudge) -> DefenceArm:
    """A copy of ``arm`` with the judge's labels and refusal calls on its responses."""
    jb_labels, jb_flags = judge_responses(judge, arm.jailbreak_responses, jailbreak.texts)
    bn_labels, bn_flags = judge_responses(judge, arm.benign_responses, benign.texts)
    return dataclasses.replace(
        arm,
        jailbreak_judge_labels=jb_labels,
        jailbreak_judge_refusals=jb_flags,
        benign_judge_labels=bn_labels,
        benign_judge_refusals=bn_flags,
    )


def _options(
    benign: PromptSet,
    generation: GenerationOptions,
    *,
    ppl_texts: Sequence[str] | PromptSet | bool | None,
    ppl_length: int,
    matcher: RefusalMatcher | None,
    judge: ClassifierJudge | None,
) -> _Options:
    if ppl_texts is None or ppl_texts is True:
        texts: tuple[str, ...] | None = benign.texts
    elif ppl_texts is False:
        texts = None
    else:
        texts = tuple(ppl_texts.texts if isinstance(ppl_texts, PromptSet) else ppl_texts)
        if not texts:
            raise AttnscanError("ppl_texts is empty: give texts, None (the benign prompts) or False (no perplexity)")
    return _Options(
        generation=generation,
        ppl_texts=texts,
        ppl_length=ppl_length,
        matcher=matcher or RefusalMatcher(),
        judge=judge,
    )


def _info(loaded: LoadedModel, jailbreak: PromptSet, benign: PromptSet, opts: _Options) -> dict[str, Any]:
    return {
        "model": {"spec": loaded.spec, **loaded.source},
        "prompt_sets": {"jailbreak": jailbreak.provenance(), "benign": benign.provenance()},
        "generation": opts.generation.info(),
        "perplexity": {
            "texts": len(opts.ppl_texts) if opts.ppl_texts else 0,
            "length": opts.ppl_length,
            "weighting": "token-weighted: exp(sum of next-token NLL / predicted tokens)",
        },
        "similarity": "benign_chrf: chrF (n=1..6, beta=1); benign_token_f1: bag-of-words F1; bypass vs baseline",
        "refusal_matcher": {"window": opts.matcher.window, "phrases": len(opts.matcher.phrases)},
        "judge": opts.judge.info() if opts.judge is not None else None,
    }


def defend(
    loaded: LoadedModel,
    jailbreak: PromptSet | Sequence[str],
    benign: PromptSet | Sequence[str],
    layers: Iterable[int] | str,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    ppl_texts: Sequence[str] | PromptSet | bool | None = None,
    ppl_length: int = DEFAULT_PPL_LENGTH,
    matcher: RefusalMatcher | None = None,
    judge: ClassifierJudge | None = None,
    baseline: DefenceArm | None = None,
    sweep_ks: Sequence[int] | None = None,
    sweep_order: Sequence[int] | None = None,
    progress: ProgressFn | None = None,
) -> DefenceResult:
    """Bypass ``layers`` and compare with the unmodified model: the library twin of ``attnscan defend``.

    Measures (module docstring) the jailbreak refusal rate, benign retention and similarity, and perplexity on
    ``ppl_texts`` (default the benign prompts' texts; ``False`` skips it). ``judge`` (a
    :class:`attnscan.behave.ClassifierJudge`) also labels every response, and each arm then reports the judge's
    refusal rate and retention beside the phrase-based ones (:meth:`DefenceArm.metrics`). ``baseline`` reuses an
    unmodified run made with the same prompts and options (as :func:`sweep_results` does; a baseline without judge
    labels is labelled by ``judge``). Generation options are those of :func:`attnscan.behave.generate`.

    ``sweep_ks`` also runs a sweep: for each ``k``, bypass the first ``k`` layers of ``sweep_order`` (default:
    ``layers`` in the order given), tabulated by :func:`sweep_table` into the result's :attr:`~DefenceResult.sweep`
    (its order and ks go to ``info["sweep"]``). The sweep shares the baseline, and a sweep setting that bypasses
    the same layers as ``layers`` reuses that run. Everything is checked before the first generation.
    """
    if not isinstance(layers, str):
        layers = [int(x) for x in layers]
    jb, bn = as_prompt_set(jailbreak, "jailbreak"), as_prompt_set(benign, "benign")
    opts = _options(
        bn,
        GenerationOptions(max_new_tokens, batch_size, chat_template, system_prompt, max_prompt_tokens),
        ppl_texts=ppl_texts,
        ppl_length=ppl_length,
        matcher=matcher,
        judge=judge,
    )
    chosen = _resolve_bypass(decoder_layers(loaded.model), layers)
    if baseline is not None and (
        len(baseline.jailbreak_responses) != len(jb) or len(baseline.benign_responses) != len(bn)
    ):
        raise AttnscanError("the baseline was run on other prompts: run it on the same jailbreak and benign sets")
    info = _info(loaded, jb, bn, opts)
    settings: list[tuple[int, ...]] = [chosen]
    if sweep_ks is not None:
        order_given = sweep_order if sweep_order is not None else (list(chosen) if isinstance(layers, str) else layers)
        ordered, k_values = _check_sweep(loaded, order_given, sweep_ks)
        info["sweep"] = {"order": ordered, "ks": k_values}
        settings += [tuple(sorted(ordered[:k])) for k in k_values]
    elif sweep_order is not None:
        raise AttnscanError("sweep_order needs sweep_ks: give the k values to sweep, e.g. [0, 1, 2, 4]")
    to_run = list(dict.fromkeys(s for s in settings if s))
    tracker = _Tracker(progress, opts.arm_items(jb, bn) * (len(to_run) + (1 if baseline is None else 0)))
    if baseline is None:
        baseline = _run_arm(loaded, "baseline", (), jb, bn, opts, tracker)
    elif judge is not None and baseline.jailbreak_judge_labels is None:
        baseline = _judge_arm(baseline, jb, bn, judge)
    arms = {s: _run_arm(loaded, "bypass", s, jb, bn, opts, tracker) for s in to_run}
    arms[()] = _copy_arm(baseline, "bypass")
    result = DefenceResult(baseline=baseline, bypass=arms[chosen], jailbreak=jb, benign=bn, info=info)
    if sweep_ks is not None:
        swept = [DefenceResult(baseline, arms[s], jb, bn, info) for s in settings[1:]]
        result.sweep = sweep_table(swept)
        result.sweep_arms = {k: arms[s] for k, s in zip(info["sweep"]["ks"], settings[1:], strict=True)}
    return result


def _copy_arm(arm: DefenceArm, name: str) -> DefenceArm:
    return dataclasses.replace(copy.deepcopy(arm), name=name, layers=())


def _check_sweep(loaded: LoadedModel, order: Sequence[int], ks: Sequence[int]) -> tuple[list[int], list[int]]:
    n = loaded.arch.n_layers
    resolved = []
    for layer in order:
        real = int(layer) + n if int(layer) < 0 else int(layer)
        if not 0 <= real < n:
            raise AttnscanError(f"layer {layer} out of range: model has {n} layers (0-{n - 1})")
        resolved.append(real)
    if len(set(resolved)) != len(resolved):
        raise AttnscanError("the layer order names a layer twice: give each layer at most once")
    if not ks:
        raise AttnscanError("no k values for the sweep: give e.g. 0,1,2,4")
    for k in ks:
        if not 0 <= int(k) <= len(resolved):
            raise AttnscanError(f"k={k} out of range: the layer order has {len(resolved)} layers (k from 0)")
    if len(set(ks)) != len(ks):
        raise AttnscanError("the sweep names a k value twice: give each k once")
    return resolved, [int(k) for k in ks]


def sweep_results(
    loaded: LoadedModel,
    order: Sequence[int],
    ks: Sequence[int],
    *,
    jailbreak: PromptSet | Sequence[str],
    benign: PromptSet | Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    ppl_texts: Sequence[str] | PromptSet | bool | None = None,
    ppl_length: int = DEFAULT_PPL_LENGTH,
    matcher: RefusalMatcher | None = None,
    judge: ClassifierJudge | None = None,
    progress: ProgressFn | None = None,
) -> list[DefenceResult]:
    """One :class:`DefenceResult` per ``k`` in ``ks``: bypass ``order[:k]``. The baseline runs once and is shared.

    The other options are those of :func:`defend`.
    """
    chosen, k_values = _check_sweep(loaded, order, ks)
    jb, bn = as_prompt_set(jailbreak, "jailbreak"), as_prompt_set(benign, "benign")
    opts = _options(
        bn,
        GenerationOptions(max_new_tokens, batch_size, chat_template, system_prompt, max_prompt_tokens),
        ppl_texts=ppl_texts,
        ppl_length=ppl_length,
        matcher=matcher,
        judge=judge,
    )
    runs = 1 + sum(1 for k in k_values if k > 0)
    tracker = _Tracker(progress, opts.arm_items(jb, bn) * runs)
    baseline = _run_arm(loaded, "baseline", (), jb, bn, opts, tracker)
    info = {**_info(loaded, jb, bn, opts), "order": chosen, "ks": k_values}
    results = []
    for k in k_values:
        layers = tuple(sorted(chosen[:k]))
        arm = _run_arm(loaded, "bypass", layers, jb, bn, opts, tracker) if k else _copy_arm(baseline, "bypass")
        results.append(DefenceResult(baseline=baseline, bypass=arm, jailbreak=jb, benign=bn, info=info))
    return results


def sweep_table(results: Sequence[DefenceResult]) -> pd.DataFrame:
    """One row per result (columns of :meth:`DefenceArm.metrics`, ``k`` first), with ``perplexity_ratio`` to the
    baseline; ``df.attrs["baseline"]`` holds the baseline's metrics."""
    if not results:
        raise AttnscanError("no sweep results to tabulate")
    rows = [r.row() for r in results]
    table = pd.DataFrame(rows)
    base = results[0].baseline.metrics(results[0].baseline)
    table["perplexity_ratio"] = table["perplexity"] / base["perplexity"]
    table = table.drop(columns=["variant"])
    table.attrs["baseline"] = base
    return table


def sweep(
    loaded: LoadedModel,
    order: Sequence[int],
    ks: Sequence[int],
    *,
    jailbreak: PromptSet | Sequence[str],
    benign: PromptSet | Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    ppl_texts: Sequence[str] | PromptSet | bool | None = None,
    ppl_length: int = DEFAULT_PPL_LENGTH,
    matcher: RefusalMatcher | None = None,
    judge: ClassifierJudge | None = None,
    progress: ProgressFn | None = None,
) -> pd.DataFrame:
    """Bypass the first ``k`` layers of ``order`` for each ``k`` in ``ks``: one row per ``k`` (:func:`sweep_table`).

    ``order`` is a ranking of layers, e.g. :func:`layer_order` of a detection or layer table; ``k = 0`` is the
    unmodified model. The other options are those of :func:`defend`.
    """
    return sweep_table(
        sweep_results(
            loaded,
            order,
            ks,
            jailbreak=jailbreak,
            benign=benign,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            chat_template=chat_template,
            system_prompt=system_prompt,
            max_prompt_tokens=max_prompt_tokens,
            ppl_texts=ppl_texts,
            ppl_length=ppl_length,
            matcher=matcher,
            judge=judge,
            progress=progress,
        )
    )


def layer_order(table: pd.DataFrame, by: str, *, descending: bool = True) -> list[int]:
    """Layers of a per-layer table (a ``layer`` column) ranked by column ``by``, largest first by default.

    Rows with NaN in ``by`` go last; ties keep the lower layer first.
    """
    if "layer" not in table.columns:
        raise AttnscanError("the table has no 'layer' column: give a per-layer table (layers.csv, detection table)")
    if by not in table.columns:
        raise AttnscanError(f"the table has no column '{by}': choose one of {', '.join(map(str, table.columns))}")
    ranked = table.sort_values(["layer"]).sort_values(by, ascending=not descending, kind="stable", na_position="last")
    return [int(x) for x in ranked["layer"]]


def _read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise AttnscanError(f"cannot read {path} ({exc}): write it again") from None


def scan_layer_order(bundle: str | os.PathLike[str], by: str | None = None) -> tuple[list[int], str]:
    """The layers of a scan bundle's ``layers.csv`` ranked by column ``by``, largest first (:func:`layer_order`).

    ``by`` defaults to ``abs_shift`` (the mean absolute attention shift, jailbreak vs benign) and, in a bundle whose
    sets were too small for the statistics, to ``mean_abs_diff``. Returns the ranking and the column used.
    """
    root = Path(bundle)
    if not root.is_dir():
        raise AttnscanError(f"scan bundle not found: {root} (write one with attnscan scan --out DIR)")
    path = root / "layers.csv"
    if not path.is_file():
        raise AttnscanError(f"{root} holds no layers.csv: give the directory of an attnscan scan bundle")
    table = _read_table(path)
    if by is None:
        by = "abs_shift" if "abs_shift" in table.columns or "mean_abs_diff" not in table.columns else "mean_abs_diff"
    return layer_order(table, by), by


def _detector_meta(root: Path) -> dict[str, Any]:
    """The ``meta`` of ``root/detector.json`` when it can be read, else ``{}`` (no checks: see load_detector)."""
    try:
        doc = json.loads((root / "detector.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    meta = doc.get("meta") if isinstance(doc, dict) else None
    return meta if isinstance(meta, dict) else {}


def detector_layers(detector: str | os.PathLike[str], by: str | None = None) -> list[int]:
    """The flagged layers of a detector directory, ranked for a sweep.

    With a ``detection.csv`` in the directory (the per-layer table of :func:`attnscan.detect.layer_detection_table`,
    a ``flagged`` column): its flagged layers ranked by ``by``, largest first (default: the AUROC the layers were
    flagged on, ``{primary}_auroc`` with ``primary`` from ``detector.json``'s metadata, else ``cp_auroc``, else
    ascending layer). Without it: the ``flagged_layers`` (or ``flagged``) list of the detector's metadata
    (:func:`attnscan.detect.load_detector`), in the order stored; ``by`` then cannot be used. An empty list means
    the detector flagged no layer.
    """
    root = Path(detector)
    if not root.is_dir():
        raise AttnscanError(f"detector directory not found: {root} (train one with attnscan detect train)")
    path = root / DETECTION_FILE
    if path.is_file():
        table = _read_table(path)
        if "flagged" not in table.columns or "layer" not in table.columns:
            raise AttnscanError(f"{path} has no 'layer' and 'flagged' columns: write it with attnscan detect train")
        flags = table["flagged"].map(lambda x: str(x).strip().lower() in ("true", "1", "1.0", "yes"))
        flagged = table[flags.to_numpy(dtype=bool)]
        if by is None:
            primary = f"{_detector_meta(root).get('primary', 'cp')}_auroc"
            by = next((c for c in (primary, "cp_auroc") if c in table.columns), "layer")
        return layer_order(flagged, by, descending=by != "layer")
    from ..detect.detectors import load_detector

    _, meta = load_detector(root)
    listed = meta.get("flagged_layers", meta.get("flagged"))
    if listed is None:
        raise AttnscanError(
            f"{root} records no flagged layers (no {DETECTION_FILE}, no 'flagged_layers' in its metadata): "
            "give the layers with --layers, or retrain the detector with attnscan detect train"
        )
    if by is not None:
        raise AttnscanError(f"{root} has no {DETECTION_FILE} to rank its flagged layers by '{by}': leave out --by")
    try:
        return [int(x) for x in listed]
    except (TypeError, ValueError):
        raise AttnscanError(f"{root}: the flagged layers {listed!r} are not a list of layer numbers") from None
