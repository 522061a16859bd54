"""What a study runs: its settings (:class:`StudyOptions`) and its prompt sets (:func:`study_sets`).

The behaviour and defence prompts come from the built-in sets (:mod:`attnscan.prompts.sets`), drawn with a seed:

- ``harmful``: ``requests`` bare harmful requests;
- ``jailbreak``: the same requests, each inside ``wraps`` different jailbreak templates. The templates are dealt
  out in a seeded rotation, so every template is used about equally often and each request meets different ones;
  every prompt keeps its ``family``, ``template_id`` and ``request_id`` labels;
- ``benign``: ``benign`` ordinary requests, half of them (as far as the set allows) ones that only *look* risky
  (``looks_risky``), so over-refusal can be read on both kinds.

The attention scan and the detectors use the run's own sets (``builtin:benign``, ``builtin:jailbreak``,
``builtin:control``, ``scan_limit`` prompts each, see :func:`attnscan.pipeline.run`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import AttnscanError
from ..prompts.encoding import DEFAULT_LENGTH
from ..prompts.sets import PromptSet, compose, load_prompts

__all__ = ["DEFAULT_COMPARE", "StudyOptions", "StudySets", "study_sets"]

DEFAULT_COMPARE = ("smollm2-135m-instruct",)


@dataclass(frozen=True)
class StudyOptions:
    """The settings of :func:`attnscan.study.experiment.study`, checked on creation.

    ``requests``, ``wraps``, ``benign``: the behaviour and defence sets (module docstring). ``scan_limit``:
    prompts per set for the scan and the detectors, ``length`` their token grid. ``compare``: other models scanned
    beside this one, drawn as further rows of the figure (behaviour and defence run on the study model only).
    ``bypass_top``: how many of the detector's top-ranked layers the defence bypasses. ``sweep``: the numbers of
    top-ranked layers bypassed in the sweep (0, the unmodified model, is always added). ``random_draws``: how many
    random sets of the same number of layers are bypassed as a control. ``max_new_tokens``, ``batch_size``:
    generation. ``seed`` draws every sample. The detectors are those of ``attnscan run`` (3 grouped folds,
    operating point at 1 % false positives).
    """

    requests: int = 12
    wraps: int = 2
    benign: int = 12
    scan_limit: int = 24
    length: int = DEFAULT_LENGTH
    compare: tuple[str, ...] = DEFAULT_COMPARE
    bypass_top: int = 2
    sweep: tuple[int, ...] = (1, 2, 4)
    random_draws: int = 3
    max_new_tokens: int = 32
    batch_size: int = 32
    seed: int = 0
    dpi: int = 200
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        at_least = {
            "requests": (self.requests, 2),
            "wraps": (self.wraps, 1),
            "benign": (self.benign, 2),
            "scan_limit": (self.scan_limit, 4),
            "length": (self.length, 8),
            "bypass_top": (self.bypass_top, 1),
            "random_draws": (self.random_draws, 0),
            "max_new_tokens": (self.max_new_tokens, 1),
            "batch_size": (self.batch_size, 1),
        }
        for name, (value, low) in at_least.items():
            if int(value) < low:
                flag = name.replace("_", "-")
                raise AttnscanError(f"--{flag} must be at least {low}, got {value}")
        if any(int(k) < 1 for k in self.sweep) or len(set(self.sweep)) != len(self.sweep):
            raise AttnscanError(f"--sweep takes distinct layer counts of at least 1, e.g. 1,2,4 (got {self.sweep})")


@dataclass(frozen=True)
class StudySets:
    """The behaviour and defence prompt sets of a study (module docstring)."""

    harmful: PromptSet
    jailbreak: PromptSet
    benign: PromptSet

    def provenance(self) -> dict[str, Any]:
        return {name: ps.provenance() for name, ps in self.items()}

    def items(self) -> Sequence[tuple[str, PromptSet]]:
        return (("harmful", self.harmful), ("jailbreak", self.jailbreak), ("benign", self.benign))


def _pick(ps: PromptSet, rows: Sequence[int], name: str, details: dict[str, Any]) -> PromptSet:
    groups = tuple(ps.groups[i] for i in rows) if ps.groups else ()
    return PromptSet(name, tuple(ps.texts[i] for i in rows), ps.source, {**ps.details, **details}, groups)


def _benign(pool: PromptSet, n: int, rng: random.Random) -> PromptSet:
    risky = [i for i, g in enumerate(pool.groups) if g.get("looks_risky")]
    plain = [i for i in range(len(pool)) if i not in set(risky)]
    n_risky = min(len(risky), n // 2)
    n_plain = min(len(plain), n - n_risky)
    if n_risky + n_plain < n:
        raise AttnscanError(f"--benign {n} is more than the {len(pool)} built-in benign requests")
    rows = sorted(rng.sample(risky, n_risky) + rng.sample(plain, n_plain))
    return _pick(pool, rows, "benign", {"risky": n_risky, "plain": n_plain})


def study_sets(options: StudyOptions) -> StudySets:
    """Draw the study's prompt sets with ``options.seed`` (module docstring)."""
    rng = random.Random(options.seed)
    requests = load_prompts("builtin:harmful", "harmful")
    templates = load_prompts("builtin:templates", "templates")
    if options.requests > len(requests):
        raise AttnscanError(f"--requests {options.requests} is more than the {len(requests)} built-in requests")
    if options.wraps > len(templates):
        raise AttnscanError(f"--wraps {options.wraps} is more than the {len(templates)} built-in templates")
    picked = sorted(rng.sample(range(len(requests)), options.requests))
    harmful = _pick(requests, picked, "harmful", {"drawn": options.requests, "seed": options.seed})
    order = list(range(len(templates)))
    rng.shuffle(order)
    # every template with every request, template-major: prompt (t, j) sits at t * n + j
    product = compose(templates, harmful, name="jailbreak", source="builtin:templates x builtin:harmful")
    n = len(harmful)
    rows = [order[(j * options.wraps + w) % len(order)] * n + j for j in range(n) for w in range(options.wraps)]
    jailbreak = _pick(product, rows, "jailbreak", {"wraps": options.wraps, "seed": options.seed})
    benign = _benign(load_prompts("builtin:benign", "benign"), options.benign, rng)
    return StudySets(harmful=harmful, jailbreak=jailbreak, benign=benign)
