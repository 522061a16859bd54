"""Inference on per-prompt block summaries: permutation test, Benjamini–Hochberg, bootstrap interval, standardized
effect. Pure functions of plain arrays; :mod:`attnscan.analysis.statistics` applies them to a scan. Also here, for
every later stage that reports a rate (refusal rates, a detector's true- and false-positive rates): the Wilson
interval of a binomial proportion, :func:`wilson_interval`.

Inputs are per-prompt coarse block summaries ``[N, layers, ...]`` (for a scan ``blocks [N, layers, B, B]``: the mean
log attention of each prompt over each block's causal cells, NaN where the prompt reaches none). Differences are
``a - b``. For each layer

- the *signed shift* is the mean, over the blocks both groups reach, of ``nanmean_a(block) - nanmean_b(block)``;
- the *absolute shift* is the mean over the same blocks of ``|nanmean_a(block) - nanmean_b(block)|`` (it catches
  bipolar shifts whose signed mean cancels).

A permutation test shuffles the set labels among the pooled prompts of the two sets (the same permutation for every
layer), two-sided for the signed shift and one-sided (larger is more extreme) for the absolute shift, with
``p = (1 + #{perm >= observed}) / (1 + n_permutations)``. When the number of distinct labellings
``C(n_a + n_b, n_a)`` is at most ``n_permutations`` every labelling is enumerated instead (an exact test,
``p = #{labelling >= observed} / C(n_a + n_b, n_a)``). The test assumes prompts are exchangeable between the sets
under the null; if the two sets differ systematically in length or template, the test detects that difference too —
that is a property of the data, not a flaw of the test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import numpy.typing as npt

from ..errors import AttnscanError

FloatArray = npt.NDArray[np.float64]

#: The two-sided 95 % quantile of the standard normal distribution.
Z95 = 1.959963984540054

# Elements of the [permutations, 2 * features] working array per chunk (about 32 MB in float64).
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class PermutationResult:
    """Observed shift statistics and permutation p-values, one entry per layer.

    Attributes:
        signed: ``float64 [L]`` observed signed shift (mean over blocks of the group-mean difference, a - b).
        absolute: ``float64 [L]`` observed absolute shift (mean over blocks of its magnitude).
        p_signed: ``float64 [L]`` two-sided p-value of the signed shift.
        p_abs: ``float64 [L]`` one-sided p-value of the absolute shift (larger is more extreme).
        n_permutations: labellings drawn (or enumerated when ``exact``).
        exact: whether every distinct labelling was enumerated.
    """

    signed: FloatArray
    absolute: FloatArray
    p_signed: FloatArray
    p_abs: FloatArray
    n_permutations: int
    exact: bool


# --------------------------------------------------------------------------------------------------------------------
# Array helpers


def _prepare(x: npt.ArrayLike, what: str) -> tuple[FloatArray, FloatArray]:
    """``[N, L, ...]`` per-prompt summaries -> values with NaN set to 0 and the reach mask, both float64 [N, L, K]."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim < 2:
        raise ValueError(f"{what} must have shape [prompts, layers, ...], got {arr.shape}")
    arr = arr.reshape(arr.shape[0], arr.shape[1], math.prod(arr.shape[2:]))  # not -1: a group may be empty
    mask = np.isfinite(arr)
    return np.where(mask, arr, 0.0), mask.astype(np.float64)


def _pair(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Prepare both groups and drop the features neither group reaches in any layer (e.g. blocks above the
    diagonal). Returns ``va, ma [Na, L, K'], vb, mb [Nb, L, K']``."""
    va, ma = _prepare(a, "a")
    vb, mb = _prepare(b, "b")
    if va.shape[1:] != vb.shape[1:]:
        raise ValueError(f"the two groups' summaries differ in shape: {va.shape[1:]} vs {vb.shape[1:]}")
    if va.shape[0] < 1 or vb.shape[0] < 1:
        raise ValueError("each group needs at least one prompt")
    keep = (ma.any(axis=(0, 1))) | (mb.any(axis=(0, 1)))
    return va[:, :, keep], ma[:, :, keep], vb[:, :, keep], mb[:, :, keep]


def _shift(sa: FloatArray, ca: FloatArray, sb: FloatArray, cb: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Signed and absolute shift ``[..., L]`` from group sums and counts ``[..., L, K]``.

    Only the features both groups reach (count > 0 in both) enter; a layer with none gets NaN.
    """
    valid = (ca > 0) & (cb > 0)
    d = np.where(valid, sa / np.where(ca > 0, ca, 1.0) - sb / np.where(cb > 0, cb, 1.0), 0.0)
    n = valid.sum(axis=-1)
    denom = np.maximum(n, 1)
    signed = np.where(n > 0, d.sum(axis=-1) / denom, np.nan)
    absolute = np.where(n > 0, np.abs(d).sum(axis=-1) / denom, np.nan)
    return signed, absolute


def _chunks(total: int, features: int) -> Iterator[int]:
    """Chunk sizes (summing to ``total``) that keep a ``[chunk, features]`` array near ``_CHUNK_ELEMENTS``."""
    size = max(1, min(total, _CHUNK_ELEMENTS // max(features, 1)))
    done = 0
    while done < total:
        step = min(size, total - done)
        yield step
        done += step


def nanmean(x: FloatArray, axis: int = 0) -> FloatArray:
    """``np.nanmean`` without the empty-slice warning (all-NaN slices give NaN)."""
    ok = np.isfinite(x)
    n = ok.sum(axis=axis)
    s = np.where(ok, x, 0.0).sum(axis=axis)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


# --------------------------------------------------------------------------------------------------------------------
# Public statistical helpers


def benjamini_hochberg(p: npt.ArrayLike) -> FloatArray:
    """Benjamini–Hochberg q-values (step-up FDR adjustment), monotone in ``p`` and capped at 1.

    Args:
        p: ``[M]`` p-values. NaN entries are ignored (they stay NaN and do not count towards ``M``).

    Returns:
        ``float64 [M]`` q-values in the input order: ``q_(i) = min_{j >= i} min(1, p_(j) * m / j)`` over the ``m``
        finite p-values sorted ascending.
    """
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"p must be one-dimensional, got shape {arr.shape}")
    q = np.full(arr.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(arr))
    m = finite.size
    if m == 0:
        return q
    if np.any((arr[finite] < 0) | (arr[finite] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    order = finite[np.argsort(arr[finite], kind="stable")]
    scaled = arr[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


@dataclass(frozen=True)
class _Pooled:
    """Both groups' prompts stacked for labelling: ``joint [N, 2F]`` holds the values then the reach counts of the
    ``F = layers * K`` features, ``total`` its column sums; the first ``na`` prompts are group a."""

    joint: FloatArray
    total: FloatArray
    na: int
    n_layers: int
    k: int

    @classmethod
    def of(cls, a: npt.ArrayLike, b: npt.ArrayLike) -> _Pooled:
        va, ma, vb, mb = _pair(a, b)
        n = va.shape[0] + vb.shape[0]
        n_layers, k = va.shape[1], va.shape[2]
        f = n_layers * k
        joint = np.concatenate(
            [np.concatenate([va, vb]).reshape(n, f), np.concatenate([ma, mb]).reshape(n, f)], axis=1
        )  # [N, 2F]: values then reach counts
        return cls(joint, joint.sum(axis=0), va.shape[0], n_layers, k)

    @property
    def n(self) -> int:
        return int(self.joint.shape[0])

    @property
    def features(self) -> int:
        """Columns of ``joint`` (``2F``)."""
        return int(self.joint.shape[1])

    def stats(self, labels: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Shift statistics ``[P, L]`` for ``labels [P, N]`` (1 = group a)."""
        f = self.n_layers * self.k
        s = labels @ self.joint
        sa, ca = s[:, :f], s[:, f:]
        shape = (labels.shape[0], self.n_layers, self.k)
        return _shift(
            sa.reshape(shape),
            ca.reshape(shape),
            (self.total[:f] - sa).reshape(shape),
            (self.total[f:] - ca).reshape(shape),
        )


def _every_labelling(pooled: _Pooled, n_labellings: int) -> Iterator[FloatArray]:
    """All ``C(N, na)`` labellings ``[P, N]``, in chunks."""
    labels = np.zeros((n_labellings, pooled.n))
    for row, members in enumerate(combinations(range(pooled.n), pooled.na)):
        labels[row, list(members)] = 1.0
    start = 0
    for step in _chunks(n_labellings, pooled.features):
        yield labels[start : start + step]
        start += step


def _random_labellings(pooled: _Pooled, n_permutations: int, seed: int) -> Iterator[FloatArray]:
    """``n_permutations`` random shuffles ``[P, N]`` of the observed labelling, in chunks."""
    rng = np.random.default_rng(seed)
    base = np.zeros(pooled.n)
    base[: pooled.na] = 1.0
    for step in _chunks(n_permutations, pooled.features):
        yield rng.permuted(np.tile(base, (step, 1)), axis=1)


def _count_hits(
    pooled: _Pooled, labellings: Iterator[FloatArray], obs_signed: FloatArray, obs_abs: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Per layer, how many labellings give a signed shift at least as large in magnitude as the observed one, and
    an absolute shift at least as large."""
    # A relative tolerance so that a labelling equal to the observed one counts as a hit despite rounding.
    thr_signed = np.abs(obs_signed) * (1 - 1e-9) - 1e-12
    thr_abs = obs_abs * (1 - 1e-9) - 1e-12
    hits_signed = np.zeros(pooled.n_layers)
    hits_abs = np.zeros(pooled.n_layers)
    for labels in labellings:
        ps, pa = pooled.stats(labels)
        hits_signed[:] += (np.abs(ps) >= thr_signed).sum(axis=0)
        hits_abs[:] += (pa >= thr_abs).sum(axis=0)
    return hits_signed, hits_abs


def permutation_test(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    *,
    n_permutations: int = 1000,
    seed: int = 0,
) -> PermutationResult:
    """Permutation test of the signed and absolute block shift between two groups of prompts, per layer.

    Args:
        a: ``[Na, L, ...]`` per-prompt summaries of group a (e.g. ``blocks [Na, L, B, B]``); NaN where a prompt
            reaches nothing.
        b: ``[Nb, L, ...]`` the same for group b.
        n_permutations: random labellings to draw (each shuffles the pooled prompts' labels, the same shuffle for
            every layer). If ``C(Na + Nb, Na) <= n_permutations`` all labellings are enumerated instead (exact test).
        seed: seed of the label shuffles.

    Returns:
        :class:`PermutationResult` with ``[L]`` arrays. ``p_signed`` is two-sided (``|T_perm| >= |T_obs|``),
        ``p_abs`` one-sided (``T_perm >= T_obs``); random: ``p = (1 + hits) / (1 + n_permutations)``; exact:
        ``p = hits / C(Na + Nb, Na)`` (the observed labelling is among those counted).
    """
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    pooled = _Pooled.of(a, b)
    observed = np.zeros((1, pooled.n))
    observed[0, : pooled.na] = 1.0
    obs_signed, obs_abs = pooled.stats(observed)
    obs_signed, obs_abs = obs_signed[0], obs_abs[0]
    n_labellings = math.comb(pooled.n, pooled.na)
    exact = n_labellings <= n_permutations
    if exact:
        hits_signed, hits_abs = _count_hits(pooled, _every_labelling(pooled, n_labellings), obs_signed, obs_abs)
        denom = float(n_labellings)
        p_signed, p_abs = hits_signed / denom, hits_abs / denom
        drawn = n_labellings
    else:
        labellings = _random_labellings(pooled, n_permutations, seed)
        hits_signed, hits_abs = _count_hits(pooled, labellings, obs_signed, obs_abs)
        denom = float(n_permutations + 1)
        p_signed, p_abs = (1 + hits_signed) / denom, (1 + hits_abs) / denom
        drawn = n_permutations
    nan = ~np.isfinite(obs_signed)
    p_signed[nan] = np.nan
    p_abs[nan] = np.nan
    return PermutationResult(obs_signed, obs_abs, p_signed, p_abs, drawn, exact)


def bootstrap_ci(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[FloatArray, FloatArray]:
    """Percentile bootstrap confidence interval of the signed block shift (a - b), per layer.

    Prompts are resampled with replacement within each group (the group sizes are kept); a resampled prompt counts as
    often as it was drawn in the block means.

    Args:
        a: ``[Na, L, ...]`` per-prompt summaries of group a, NaN where a prompt reaches nothing.
        b: ``[Nb, L, ...]`` the same for group b.
        n_bootstrap: resamples.
        seed: seed of the resampling.
        level: coverage of the interval.

    Returns:
        ``(low, high)``, each ``float64 [L]`` (NaN for a layer without blocks both groups reach).
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    va, ma, vb, mb = _pair(a, b)
    na, nb = va.shape[0], vb.shape[0]
    n_layers, k = va.shape[1], va.shape[2]
    f = n_layers * k
    joint_a = np.concatenate([va.reshape(na, f), ma.reshape(na, f)], axis=1)
    joint_b = np.concatenate([vb.reshape(nb, f), mb.reshape(nb, f)], axis=1)
    rng = np.random.default_rng(seed)
    # Every resample's weights are drawn first, so the chunks below (sized by the number of features) change only
    # the memory used, never the resamples: a layer's interval does not depend on how many other layers were captured.
    all_wa = rng.multinomial(na, np.full(na, 1.0 / na), size=n_bootstrap).astype(np.float64)
    all_wb = rng.multinomial(nb, np.full(nb, 1.0 / nb), size=n_bootstrap).astype(np.float64)
    boots: list[FloatArray] = []
    start = 0
    for step in _chunks(n_bootstrap, 2 * f):
        wa, wb = all_wa[start : start + step], all_wb[start : start + step]
        start += step
        sa, sb = wa @ joint_a, wb @ joint_b
        shape = (step, n_layers, k)
        signed, _ = _shift(
            sa[:, :f].reshape(shape), sa[:, f:].reshape(shape), sb[:, :f].reshape(shape), sb[:, f:].reshape(shape)
        )
        boots.append(signed)
    boot = np.concatenate(boots)  # [n_bootstrap, L]
    tail = (1.0 - level) / 2.0
    low = np.full(n_layers, np.nan)
    high = np.full(n_layers, np.nan)
    for layer in range(n_layers):
        vals = boot[:, layer][np.isfinite(boot[:, layer])]
        if vals.size:
            low[layer], high[layer] = np.quantile(vals, [tail, 1.0 - tail])
    return low, high


def standardized_effect(a: npt.ArrayLike, b: npt.ArrayLike) -> FloatArray:
    """Signed block shift divided by a pooled within-set SD of per-prompt scores, per layer (a Cohen's d).

    A prompt's score is the mean, over the blocks both groups reach that the prompt reaches, of its block log
    attention minus its own set's mean for that block. Removing the block means keeps position effects (later keys
    get less attention, longer prompts reach later blocks) out of the spread. The SD pools both sets with
    ``n_a + n_b - 2`` degrees of freedom. When every prompt reaches every block this is exactly Cohen's d of the
    per-prompt mean block log attention.

    Args:
        a: ``[Na, L, ...]`` per-prompt summaries of group a; b: ``[Nb, L, ...]`` of group b.

    Returns:
        ``float64 [L]``; NaN where the SD is 0 or undefined.
    """
    va, ma, vb, mb = _pair(a, b)
    ca, cb = ma.sum(axis=0), mb.sum(axis=0)  # [L, K]
    mean_a = va.sum(axis=0) / np.maximum(ca, 1)
    mean_b = vb.sum(axis=0) / np.maximum(cb, 1)
    common = ((ca > 0) & (cb > 0)).astype(np.float64)
    signed, _ = _shift(va.sum(axis=0), ca, vb.sum(axis=0), cb)

    def scores(v: FloatArray, m: FloatArray, mean: FloatArray) -> FloatArray:
        w = m * common  # [N, L, K]
        nw = w.sum(axis=-1)
        r = ((v - mean) * w).sum(axis=-1)
        return np.where(nw > 0, r / np.maximum(nw, 1), np.nan)  # [N, L]

    ss = np.zeros(va.shape[1])
    dof = np.zeros(va.shape[1])
    for s in (scores(va, ma, mean_a), scores(vb, mb, mean_b)):
        ok = np.isfinite(s)
        centred = np.where(ok, s - nanmean(s), 0.0)
        ss += (centred**2).sum(axis=0)
        dof += ok.sum(axis=0) - 1
    var = np.where(dof > 0, ss / np.maximum(dof, 1), np.nan)
    sd = np.sqrt(var)
    return np.where(sd > 0, signed / np.where(sd > 0, sd, 1.0), np.nan)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n`` (95 % with the default ``z``).

    ``(p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)``, clipped to [0, 1]; ``(nan, nan)`` when ``n`` is 0.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise AttnscanError(f"Wilson interval needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # at k = 0 (k = n) the lower (upper) bound is exactly 0 (1); say so instead of leaving rounding residue
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


__all__ = [
    "Z95",
    "FloatArray",
    "PermutationResult",
    "benjamini_hochberg",
    "bootstrap_ci",
    "nanmean",
    "permutation_test",
    "standardized_effect",
    "wilson_interval",
]
