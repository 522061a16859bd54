"""The paper's whole experiment on one model, in one directory: ``attnscan study``.

Kadali & Papalexakis (2026) scan attention under jailbreaks, detect jailbreaks from per-layer hidden states, and
bypass the flagged layers at inference (reported: 78 % of jailbreaks blocked, 94 % of benign behaviour kept, on an
abliterated Llama-3.1-8B). :func:`attnscan.study.experiment.study` runs every step on a model that refuses, with
the controls a reader needs to trust the numbers:

1. **Behaviour** (:mod:`attnscan.study.tables`): refusal on bare harmful requests, on the same requests inside
   jailbreak wrappers (attack success = 1 - refusal), on benign and on risky-looking benign requests
   (over-refusal), each with a Wilson interval and per attack family.
2. **Scan and detectors** (:func:`attnscan.pipeline.run` with ``detect=True``): the reference-style figure and the
   layer profile for this model beside the embedded one, and detectors trained with control negatives and grouped
   cross-validation.
3. **Defence**: the detector's top layers bypassed, a sweep over the ranking, and the same number of randomly
   chosen layers bypassed as a control, each against the unmodified model on the same prompts.
4. **Judge quality** (:mod:`attnscan.behaviour.judge_check`): the refusal judge's precision and recall on
   hand-labelled responses.

The plan (set sizes, sweep, draws) is :class:`attnscan.study.plan.StudyOptions`.
"""

from __future__ import annotations

from .experiment import StudyResult, study
from .plan import StudyOptions

__all__ = ["StudyOptions", "StudyResult", "study"]
