"""One model variant in a defence run: its responses, refusal calls and perplexity, and how it is run.

A :class:`DefenceArm` is what :func:`attnscan.behaviour.defend.defend` measures for the unmodified model and for
each set of bypassed layers; :class:`ArmOptions` holds what every arm of a run shares (generation options,
perplexity texts, refusal matcher, judge) and :func:`run_arm` produces an arm.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AttnscanError
from ..models.loading import LoadedModel
from ..prompts.sets import PromptSet
from .bypass import bypass_layers
from .generation import GenerationOptions, generate_with
from .judges import DEFAULT_MATCHER, ClassifierJudge, RefusalMatcher, judge_responses, judged_rate, wilson_interval
from .perplexity import nll_sum
from .runs import Tracker, run_info
from .similarity import chrf, token_f1

__all__ = ["ArmOptions", "DefenceArm", "copy_arm", "judge_arm", "run_arm"]


@dataclass
class DefenceArm:
    """One model variant's behaviour: responses, refusal flags (aligned with the prompts) and perplexity.

    With a judge (:class:`attnscan.behaviour.judges.ClassifierJudge`), ``*_judge_labels`` hold its label for each
    response and ``*_judge_refusals`` whether that label counts as a refusal (``None`` when the judge has no
    refusal labels); without one they are ``None``.
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


@dataclass(frozen=True)
class ArmOptions:
    """What every arm of a defence run shares: generation options, perplexity texts (``None``: no perplexity) and
    length, the refusal matcher and the judge. Make one with :meth:`make`."""

    generation: GenerationOptions
    ppl_texts: tuple[str, ...] | None
    ppl_length: int
    matcher: RefusalMatcher
    judge: ClassifierJudge | None

    @classmethod
    def make(
        cls,
        benign: PromptSet,
        generation: GenerationOptions,
        *,
        ppl_texts: Sequence[str] | PromptSet | bool | None,
        ppl_length: int,
        matcher: RefusalMatcher | None,
        judge: ClassifierJudge | None,
    ) -> ArmOptions:
        """The options of a run: ``ppl_texts`` ``None`` or ``True`` means the benign prompts' texts, ``False`` none;
        ``matcher`` defaults to the default :class:`attnscan.behaviour.judges.RefusalMatcher`."""
        if ppl_texts is None or ppl_texts is True:
            texts: tuple[str, ...] | None = benign.texts
        elif ppl_texts is False:
            texts = None
        else:
            texts = tuple(ppl_texts.texts if isinstance(ppl_texts, PromptSet) else ppl_texts)
            if not texts:
                raise AttnscanError(
                    "ppl_texts is empty: give texts, None (the benign prompts) or False (no perplexity)"
                )
        return cls(generation, texts, ppl_length, matcher or DEFAULT_MATCHER, judge)

    def arm_items(self, jailbreak: PromptSet, benign: PromptSet) -> int:
        """Progress items of one arm: its prompts and its perplexity texts."""
        return len(jailbreak) + len(benign) + (len(self.ppl_texts) if self.ppl_texts else 0)

    def info(self, loaded: LoadedModel, jailbreak: PromptSet, benign: PromptSet) -> dict[str, Any]:
        """The run's description (:func:`attnscan.behaviour.runs.run_info`) with its perplexity and similarity."""
        measures = {
            "perplexity": {
                "texts": len(self.ppl_texts) if self.ppl_texts else 0,
                "length": self.ppl_length,
                "weighting": "token-weighted: exp(sum of next-token NLL / predicted tokens)",
            },
            "similarity": "benign_chrf: chrF (n=1..6, beta=1); benign_token_f1: bag-of-words F1; bypass vs baseline",
        }
        sets = {"jailbreak": jailbreak, "benign": benign}
        return run_info(loaded, sets, self.generation, self.matcher, self.judge, measures=measures)


def run_arm(
    loaded: LoadedModel,
    name: str,
    layers: tuple[int, ...],
    jailbreak: PromptSet,
    benign: PromptSet,
    opts: ArmOptions,
    tracker: Tracker,
) -> DefenceArm:
    """Generate with ``layers`` bypassed, call refusals, measure perplexity and (with a judge) label the responses."""
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
    return judge_arm(arm, jailbreak, benign, opts.judge) if opts.judge is not None else arm


def judge_arm(arm: DefenceArm, jailbreak: PromptSet, benign: PromptSet, judge: ClassifierJudge) -> DefenceArm:
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


def copy_arm(arm: DefenceArm, name: str) -> DefenceArm:
    """A deep copy of ``arm`` renamed ``name``, with no bypassed layers (the baseline standing in for ``k = 0``)."""
    return dataclasses.replace(copy.deepcopy(arm), name=name, layers=())
