"""Layer-bypass defence: skip chosen decoder layers and measure what it buys and what it costs.

:func:`defend` compares the unmodified model ("baseline") with one whose chosen layers are bypassed
(:func:`attnscan.behaviour.bypass.bypass_layers`: "bypass") on

- **jailbreak refusal rate**: share of jailbreak prompts refused (:class:`attnscan.behaviour.judges.RefusalMatcher`),
  with its Wilson 95 % interval; ASR = 1 − refusal rate. With a judge
  (:class:`attnscan.behaviour.judges.ClassifierJudge`), the judge's refusal rate and benign retention are reported
  beside the phrase-based ones;
- **benign retention**: share of benign prompts *not* refused, with its Wilson interval. An empty or garbled
  answer is not a refusal and so counts as kept: read it with ``benign_empty`` / ``jailbreak_empty`` (responses
  that are empty) and the similarity below;
- **benign similarity**: how close the bypassed model's benign answers stay to the baseline's, as the mean over
  benign prompts of :func:`attnscan.behaviour.similarity.chrf` (character n-gram F-score, n = 1..6, β = 1, white
  space removed) and of :func:`attnscan.behaviour.similarity.token_f1` (bag-of-words F1 over lower-cased word
  tokens);
- **perplexity** on benign text (:func:`attnscan.behaviour.perplexity.perplexity`, token-weighted).

:func:`sweep` bypasses the first ``k`` layers of an ordering (e.g. layers sorted by detector AUROC or attention
shift, :func:`attnscan.behaviour.layers.layer_order`) for each ``k`` and tabulates the trade-off, which
:func:`attnscan.views.tradeoff.trade_off_figure` plots. :func:`defend` with ``sweep_ks`` runs one setting and a
sweep together, sharing the baseline, and :meth:`DefenceResult.save` then writes the sweep table and the
trade-off curve beside the setting's results. Where the layers come from: :mod:`attnscan.behaviour.layers`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .._io import atomic_dir, write_json
from .._types import ProgressFn
from ..errors import AttnscanError
from ..models.anatomy import decoder_layers
from ..models.loading import LoadedModel
from ..prompts.sets import PromptSet, as_prompt_set
from .arms import ArmOptions, DefenceArm, copy_arm, judge_arm, run_arm
from .bypass import resolve_bypass
from .generation import DEFAULT_MAX_PROMPT_TOKENS, GenerationOptions
from .judges import ClassifierJudge, RefusalMatcher
from .perplexity import DEFAULT_PPL_LENGTH
from .runs import RESPONSES_FILE, Tracker, save_jsonl

__all__ = ["DefenceArm", "DefenceResult", "defend", "sweep", "sweep_results", "sweep_table"]

META_FILE = "defence.json"
FORMAT = "attnscan.defence"
SUMMARY_FILE = "defence.csv"
SWEEP_FILE = "sweep.csv"
SWEEP_RESPONSES_FILE = "sweep_responses.jsonl"
FIGURE_FILE = "tradeoff.png"


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

        With a :attr:`sweep`, also ``sweep.csv`` (the table), ``tradeoff.png``
        (:func:`attnscan.views.tradeoff.trade_off_figure` at ``dpi``) and ``sweep_responses.jsonl``
        (:meth:`sweep_records`), inside the same directory, which appears complete or not at all.
        """
        final = Path(out)
        with atomic_dir(final, overwrite, marker=META_FILE, what="defence results") as tmp:
            save_jsonl(tmp / RESPONSES_FILE, self.records())
            self.table().to_csv(tmp / SUMMARY_FILE, index=False)
            if self.sweep is not None:
                # drawing is the views stage's job: imported here, so defend never loads it at import
                from ..views.saving import save_figure
                from ..views.tradeoff import trade_off_figure

                self.sweep.to_csv(tmp / SWEEP_FILE, index=False)
                save_jsonl(tmp / SWEEP_RESPONSES_FILE, self.sweep_records())
                save_figure(trade_off_figure(self.sweep), tmp / FIGURE_FILE, dpi=dpi)
            write_json(tmp / META_FILE, {"format": FORMAT, **self.info})
        return final


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
    :class:`attnscan.behaviour.judges.ClassifierJudge`) also labels every response, and each arm then reports the
    judge's refusal rate and retention beside the phrase-based ones (:meth:`DefenceArm.metrics`). ``baseline``
    reuses an unmodified run made with the same prompts and options (as :func:`sweep_results` does; a baseline
    without judge labels is labelled by ``judge``). Generation options are those of
    :func:`attnscan.behaviour.generation.generate`.

    ``sweep_ks`` also runs a sweep: for each ``k``, bypass the first ``k`` layers of ``sweep_order`` (default:
    ``layers`` in the order given), tabulated by :func:`sweep_table` into the result's :attr:`~DefenceResult.sweep`
    (its order and ks go to ``info["sweep"]``). The sweep shares the baseline, and a sweep setting that bypasses
    the same layers as ``layers`` reuses that run. Everything is checked before the first generation.
    """
    if not isinstance(layers, str):
        layers = [int(x) for x in layers]
    jb, bn = as_prompt_set(jailbreak, "jailbreak"), as_prompt_set(benign, "benign")
    opts = ArmOptions.make(
        bn,
        GenerationOptions(max_new_tokens, batch_size, chat_template, system_prompt, max_prompt_tokens),
        ppl_texts=ppl_texts,
        ppl_length=ppl_length,
        matcher=matcher,
        judge=judge,
    )
    chosen = resolve_bypass(decoder_layers(loaded.model), layers)
    if baseline is not None and (
        len(baseline.jailbreak_responses) != len(jb) or len(baseline.benign_responses) != len(bn)
    ):
        raise AttnscanError("the baseline was run on other prompts: run it on the same jailbreak and benign sets")
    info = opts.info(loaded, jb, bn)
    settings: list[tuple[int, ...]] = [chosen]
    if sweep_ks is not None:
        order_given = sweep_order if sweep_order is not None else (list(chosen) if isinstance(layers, str) else layers)
        info["sweep"], swept_settings = _plan_sweep(loaded, order_given, sweep_ks)
        settings += swept_settings
    elif sweep_order is not None:
        raise AttnscanError("sweep_order needs sweep_ks: give the k values to sweep, e.g. [0, 1, 2, 4]")
    to_run = list(dict.fromkeys(s for s in settings if s))
    tracker = Tracker(progress, opts.arm_items(jb, bn) * (len(to_run) + (1 if baseline is None else 0)))
    if baseline is None:
        baseline = run_arm(loaded, "baseline", (), jb, bn, opts, tracker)
    elif judge is not None and baseline.jailbreak_judge_labels is None:
        baseline = judge_arm(baseline, jb, bn, judge)
    arms = {s: run_arm(loaded, "bypass", s, jb, bn, opts, tracker) for s in to_run}
    arms[()] = copy_arm(baseline, "bypass")
    result = DefenceResult(baseline=baseline, bypass=arms[chosen], jailbreak=jb, benign=bn, info=info)
    if sweep_ks is not None:
        swept = [DefenceResult(baseline, arms[s], jb, bn, info) for s in settings[1:]]
        result.sweep = sweep_table(swept)
        result.sweep_arms = {k: arms[s] for k, s in zip(info["sweep"]["ks"], settings[1:], strict=True)}
    return result


def _plan_sweep(
    loaded: LoadedModel, order: Sequence[int], ks: Sequence[int]
) -> tuple[dict[str, list[int]], list[tuple[int, ...]]]:
    """The sweep's ``{"order", "ks"}`` (checked, as recorded in ``info["sweep"]``) and the layers bypassed per k."""
    ordered, k_values = _check_sweep(loaded, order, ks)
    return {"order": ordered, "ks": k_values}, [tuple(sorted(ordered[:k])) for k in k_values]


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
    opts = ArmOptions.make(
        bn,
        GenerationOptions(max_new_tokens, batch_size, chat_template, system_prompt, max_prompt_tokens),
        ppl_texts=ppl_texts,
        ppl_length=ppl_length,
        matcher=matcher,
        judge=judge,
    )
    runs = 1 + sum(1 for k in k_values if k > 0)
    tracker = Tracker(progress, opts.arm_items(jb, bn) * runs)
    baseline = run_arm(loaded, "baseline", (), jb, bn, opts, tracker)
    info = {**opts.info(loaded, jb, bn), "order": chosen, "ks": k_values}
    results = []
    for k in k_values:
        layers = tuple(sorted(chosen[:k]))
        arm = run_arm(loaded, "bypass", layers, jb, bn, opts, tracker) if k else copy_arm(baseline, "bypass")
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

    ``order`` is a ranking of layers, e.g. :func:`attnscan.behaviour.layers.layer_order` of a detection or layer
    table; ``k = 0`` is the unmodified model. The other options are those of :func:`defend`.
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
