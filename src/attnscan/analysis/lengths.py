"""Length matching (``--match-length``): keep prompts so that the compared sets have the same token lengths.

A jailbreak prompt is usually a long wrapper around a short request, so a benign-vs-jailbreak difference of the
attention maps is partly a difference of prompt length. :func:`match_lengths` pairs every kept jailbreak prompt with
a benign prompt (and, when the scan has a control set, a control prompt) of about the same token count; the prompts
without a partner are left out of the scan. Pairs are one-to-one, so the kept sets have equally many prompts and
their length distributions agree to within the caliper (sorted, the kept lengths of two sets differ by at most it).

**Method.** A partner of a jailbreak prompt of ``n`` tokens must have a length ``m`` within the caliper
``|m - n| <= max(min_tokens, tolerance * n)``. Among the one-to-one pairings that respect the caliper, the one with
the most pairs is taken, and among those the one with the smallest total length difference (a dynamic programme
over both sets sorted by length: both ends of the caliper window grow with ``n``, so some best pairing never
crosses and the programme finds it exactly). With a control set the jailbreak prompts are first paired with benign
prompts, then the paired ones with control prompts the same way; a jailbreak prompt without a control partner is
left out with its benign partner (two exact steps, not one exact three-way pairing). The programme keeps one
int64 per pair of prompts it weighs (8 MB for 1000 jailbreak and 1000 benign prompts).

**Lengths** are grid lengths: token counts after the chat template and truncation to the grid length T, which are
what the model saw. Prompts cut to T all have length T; they can only pair with prompts of about T tokens.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import AttnscanError

METHOD = "one-to-one pairs by grid token length within a caliper: most pairs, then least total length difference"
ANCHOR = "jailbreak"
MIN_TOKENS = 2
"""The caliper never drops below this many tokens (so that short prompts can pair at all)."""
LOW_YIELD = 0.5
"""Below this share of a set's prompts kept, :meth:`LengthMatch.warning` speaks up."""


def caliper(n: int, tolerance: float, min_tokens: int = MIN_TOKENS) -> float:
    """How far, in tokens, a partner's length may be from a jailbreak prompt of ``n`` tokens."""
    return max(float(min_tokens), tolerance * n)


def check_tolerance(tolerance: float) -> None:
    """Refuse a tolerance outside [0, 1)."""
    if not 0.0 <= tolerance < 1.0:
        raise AttnscanError(
            f"--match-tolerance must lie in [0, 1) (a share of the jailbreak prompt's token count), got {tolerance}"
        )


def describe(lengths: Sequence[int]) -> dict[str, float | int]:
    """Count, min, quartiles, max and mean of token lengths (the manifest's length distribution)."""
    if not lengths:
        return {"count": 0}
    values = sorted(int(n) for n in lengths)
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "count": len(values),
        "min": values[0],
        "q25": float(q1),
        "median": float(q2),
        "q75": float(q3),
        "max": values[-1],
        "mean": float(statistics.fmean(values)),
    }


@dataclass(frozen=True)
class LengthMatch:
    """The outcome of :func:`match_lengths`.

    ``order`` names the sets of each pair (the jailbreak set first); ``pairs`` holds one tuple of prompt indices per
    kept jailbreak prompt, in that order; ``lengths`` are the grid lengths the matching read, per set.
    """

    order: tuple[str, ...]
    pairs: tuple[tuple[int, ...], ...]
    lengths: Mapping[str, tuple[int, ...]]
    tolerance: float
    truncated: Mapping[str, int]
    grid: int

    @property
    def kept(self) -> dict[str, tuple[int, ...]]:
        """The kept prompt indices of each set, ascending."""
        return {name: tuple(sorted(p[k] for p in self.pairs)) for k, name in enumerate(self.order)}

    def pair_differences(self) -> list[int]:
        """Per pair, the largest length difference between its jailbreak prompt and a partner (tokens)."""
        out = []
        for pair in self.pairs:
            n = self.lengths[self.order[0]][pair[0]]
            out.append(max(abs(self.lengths[s][i] - n) for s, i in zip(self.order[1:], pair[1:], strict=True)))
        return out

    def record(self) -> dict[str, Any]:
        """The bundle manifest's ``length_matching`` section: method, caliper, the pairs (``pair_indices``, prompt
        indices in ``pair_order``), and per set the prompts kept of all, how many of all were cut to the grid, and
        the length distributions before and after."""
        kept = self.kept
        diffs = self.pair_differences()
        return {
            "method": METHOD,
            "lengths": "grid tokens (after the chat template and truncation to the grid length)",
            "tolerance": self.tolerance,
            "min_tokens": MIN_TOKENS,
            "pairs": len(self.pairs),
            "max_pair_difference": max(diffs, default=0),
            "mean_pair_difference": float(statistics.fmean(diffs)) if diffs else 0.0,
            "sets": {
                name: {
                    "kept": len(kept[name]),
                    "of": len(self.lengths[name]),
                    "truncated": self.truncated.get(name, 0),
                    "before": describe(self.lengths[name]),
                    "after": describe([self.lengths[name][i] for i in kept[name]]),
                }
                for name in self.order
            },
            "pair_order": list(self.order),
            "pair_indices": [list(p) for p in self.pairs],
        }

    def warning(self) -> str | None:
        """A sentence when matching kept less than :data:`LOW_YIELD` of some set, with the overlap it achieved."""
        kept = self.kept
        low = [n for n in self.order if len(kept[n]) < LOW_YIELD * len(self.lengths[n])]
        if not low:
            return None
        shares = ", ".join(f"{len(kept[n])} of {len(self.lengths[n])} {n}" for n in self.order)
        return f"--match-length kept {shares} prompts; {_ranges_text(self)}" + _truncation_hint(self)


def _ranges_text(match: LengthMatch) -> str:
    def span(values: Sequence[int]) -> str:
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}–{max(values)}"

    return "token lengths " + ", ".join(f"{n} {span(match.lengths[n])}" for n in match.order if match.lengths[n])


def _truncation_hint(match: LengthMatch) -> str:
    cut = match.truncated.get(ANCHOR, 0)
    if not cut:
        return ""
    return f"; {cut} {ANCHOR} prompts were cut to the grid length {match.grid}, a longer --length keeps them whole"


def _pair(anchor: Sequence[tuple[int, int]], other: Sequence[tuple[int, int]], tolerance: float) -> dict[int, int]:
    """The best caliper pairing of two sets, each given as ``(length, index)`` sorted ascending: the most pairs, then
    the least total length difference. Returns anchor index -> partner index.

    ``best[i, j]`` scores the first ``i`` anchors against the first ``j`` partners as ``pairs * big - difference``
    (``big`` exceeds any total difference, so more pairs always win); a row is the previous row with the diagonal
    step where the caliper allows it, then a running maximum along the partners."""
    n, m = len(anchor), len(other)
    if not n or not m:
        return {}
    a = np.array([x for x, _ in anchor], dtype=np.int64)
    b = np.array([x for x, _ in other], dtype=np.int64)
    big = int(a.max() + b.max()) * min(n, m) + 1
    best = np.zeros((n + 1, m + 1), dtype=np.int64)
    for i in range(1, n + 1):
        diff = np.abs(b - a[i - 1])
        step = np.where(
            diff <= caliper(int(a[i - 1]), tolerance), best[i - 1, :-1] + big - diff, np.iinfo(np.int64).min
        )
        row = best[i - 1].copy()
        row[1:] = np.maximum(row[1:], step)
        best[i] = np.maximum.accumulate(row)
    pairs: dict[int, int] = {}
    i, j = n, m
    while i > 0 and j > 0:
        if best[i, j] == best[i, j - 1]:
            j -= 1
        elif best[i, j] == best[i - 1, j]:
            i -= 1
        else:  # the diagonal step made this value: anchor i-1 pairs with partner j-1
            pairs[anchor[i - 1][1]] = other[j - 1][1]
            i, j = i - 1, j - 1
    return pairs


def match_lengths(
    lengths: Mapping[str, Sequence[int]],
    tolerance: float = 0.1,
    *,
    truncated: Mapping[str, int] | None = None,
    grid: int = 0,
) -> LengthMatch:
    """Pair prompts of the sets in ``lengths`` (set name -> grid token length per prompt) by length (module
    docstring). ``lengths`` must hold ``jailbreak`` and ``benign``; every other set (``control``) is paired too.
    ``truncated`` (prompts cut per set) and ``grid`` (T) only word the messages.

    Raises:
        AttnscanError: fewer than 2 pairs can be formed (the statistics need 2 prompts per set); the message gives
            the length ranges and what to do.
    """
    check_tolerance(tolerance)
    for name in (ANCHOR, "benign"):
        if name not in lengths:
            raise AttnscanError(f"--match-length needs a '{name}' set to pair prompts with")
    order = (ANCHOR, *(n for n in lengths if n != ANCHOR))
    ranked = {n: sorted((int(x), i) for i, x in enumerate(lengths[n])) for n in order}
    partners: dict[int, list[int]] = {i: [] for _, i in ranked[ANCHOR]}
    for name in order[1:]:  # each further set is paired with the jailbreak prompts still paired
        anchor = [(x, i) for x, i in ranked[ANCHOR] if len(partners[i]) == order.index(name) - 1]
        for i, k in _pair(anchor, ranked[name], tolerance).items():
            partners[i].append(k)
    pairs = [(i, *ks) for i, ks in partners.items() if len(ks) == len(order) - 1]
    match = LengthMatch(
        order=order,
        pairs=tuple(sorted(pairs)),
        lengths={n: tuple(int(x) for x in lengths[n]) for n in order},
        tolerance=tolerance,
        truncated=dict(truncated or {}),
        grid=grid,
    )
    if len(pairs) < 2:
        raise AttnscanError(
            f"--match-length found {len(pairs)} pair{'' if len(pairs) == 1 else 's'} of prompts within "
            f"{tolerance:.0%} of each other's token length ({_ranges_text(match)}{_truncation_hint(match)}): the "
            "statistics need at least 2; use benign prompts of similar lengths or raise --match-tolerance, or drop "
            "--match-length and read the request effect (jailbreak vs a control set of the same wrappers)"
        )
    return match


__all__ = ["METHOD", "LengthMatch", "caliper", "check_tolerance", "describe", "match_lengths"]
