"""Per-layer statistics of a scan: where and how much one prompt set's attention differs from another's.

Everything here is a pure function of a :class:`~attnscan.result.ScanResult` (or of plain arrays); nothing
imports plotting or model code and nothing prints.

Conventions (``a`` defaults to ``"jailbreak"``, ``b`` to ``"benign"``):

- **Sign.** Differences are ``a - b`` of log attention (nats). A positive difference means set ``a`` attends *more*
  to those cells than set ``b``.
- **Map-level numbers** use the aggregated maps (:meth:`ScanResult.log`, :meth:`ScanResult.mean`) over the causal
  cells both sets reach (count > 0 in both). They describe the shift; they carry no p-value of their own.
- **Inference** uses the per-prompt coarse block summaries ``blocks [N, layers, B, B]`` (mean log attention of each
  prompt over each block's causal cells, NaN where the prompt reaches none). For each layer

  - the *signed shift* is the mean, over the blocks both groups reach, of ``nanmean_a(block) - nanmean_b(block)``;
  - the *absolute shift* is the mean over the same blocks of ``|nanmean_a(block) - nanmean_b(block)|`` (it catches
    bipolar shifts whose signed mean cancels).

  A permutation test shuffles the set labels among the pooled prompts of the two sets (the same permutation for
  every layer), two-sided for the signed shift and one-sided (larger is more extreme) for the absolute shift, with
  ``p = (1 + #{perm >= observed}) / (1 + n_permutations)``. When the number of distinct labellings
  ``C(n_a + n_b, n_a)`` is at most ``n_permutations`` every labelling is enumerated instead (an exact test,
  ``p = #{labelling >= observed} / C(n_a + n_b, n_a)``). The test assumes prompts are exchangeable between the sets
  under the null; if the two sets differ systematically in length or template, the test detects that difference
  too — that is a property of the data, not a flaw of the test.
- **Multiple layers** are corrected with Benjamini–Hochberg across the captured layers, separately for the signed
  and the absolute test.
- **Verdicts** follow the reference figure's vocabulary (see :class:`VerdictThresholds`).

An attention shift is a proxy for, not a measurement of, jailbreak success.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]

from ..errors import AttnscanError
from .result import ScanResult

FloatArray = npt.NDArray[np.float64]

VULNERABLE = "vulnerable"
RESILIENT = "resilient"
MIXED = "mixed"
NO_SHIFT = "no significant shift"
VERDICTS = (VULNERABLE, MIXED, RESILIENT, NO_SHIFT)

# Elements of the [permutations, 2 * features] working array per chunk (about 32 MB in float64).
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class VerdictThresholds:
    """When a layer's shift counts as significant, and when as consistently one-signed.

    Attributes:
        alpha: Benjamini–Hochberg level. A layer is *significant* when ``min(q_signed, q_abs) < alpha``.
        consistency: Fraction of reached cells that must move in the shift's direction. ``vulnerable`` needs
            ``mean_diff > 0`` and ``frac_pos >= consistency``; ``resilient`` needs ``mean_diff < 0`` and
            ``frac_neg >= consistency``; a significant layer that is neither is ``mixed``.
        tol: Cell tolerance in nats. A cell counts as raised when its log difference is ``> +tol`` and as lowered
            when ``< -tol`` (0.05 nats is a 5 % change in attention probability); cells in between count as neither.
    """

    alpha: float = 0.05
    consistency: float = 0.70
    tol: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise AttnscanError(f"alpha must lie in (0, 1), got {self.alpha}")
        if not 0.0 < self.consistency <= 1.0:
            raise AttnscanError(f"consistency must lie in (0, 1], got {self.consistency}")
        if not self.tol >= 0.0:
            raise AttnscanError(f"the cell tolerance must be >= 0 nats, got {self.tol}")


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
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
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


def _nanmean(x: FloatArray, axis: int = 0) -> FloatArray:
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
    va, ma, vb, mb = _pair(a, b)
    na, nb = va.shape[0], vb.shape[0]
    n = na + nb
    n_layers, k = va.shape[1], va.shape[2]
    f = n_layers * k
    joint = np.concatenate(
        [np.concatenate([va, vb]).reshape(n, f), np.concatenate([ma, mb]).reshape(n, f)], axis=1
    )  # [N, 2F]: values then reach counts
    total = joint.sum(axis=0)

    def stats(labels: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Shift statistics ``[P, L]`` for ``labels [P, N]`` (1 = group a)."""
        s = labels @ joint
        sa, ca = s[:, :f], s[:, f:]
        shape = (labels.shape[0], n_layers, k)
        return _shift(
            sa.reshape(shape), ca.reshape(shape), (total[:f] - sa).reshape(shape), (total[f:] - ca).reshape(shape)
        )

    observed = np.zeros((1, n))
    observed[0, :na] = 1.0
    obs_signed, obs_abs = stats(observed)
    obs_signed, obs_abs = obs_signed[0], obs_abs[0]
    # A relative tolerance so that a labelling equal to the observed one counts as a hit despite rounding.
    thr_signed = np.abs(obs_signed) * (1 - 1e-9) - 1e-12
    thr_abs = obs_abs * (1 - 1e-9) - 1e-12

    hits_signed = np.zeros(n_layers)
    hits_abs = np.zeros(n_layers)
    n_labellings = math.comb(n, na)
    exact = n_labellings <= n_permutations

    def count(labels: FloatArray) -> None:
        ps, pa = stats(labels)
        hits_signed[:] += (np.abs(ps) >= thr_signed).sum(axis=0)
        hits_abs[:] += (pa >= thr_abs).sum(axis=0)

    if exact:
        labels = np.zeros((n_labellings, n))
        for row, members in enumerate(combinations(range(n), na)):
            labels[row, list(members)] = 1.0
        start = 0
        for step in _chunks(n_labellings, 2 * f):
            count(labels[start : start + step])
            start += step
        denom = float(n_labellings)
        p_signed, p_abs = hits_signed / denom, hits_abs / denom
        drawn = n_labellings
    else:
        rng = np.random.default_rng(seed)
        base = np.zeros(n)
        base[:na] = 1.0
        for step in _chunks(n_permutations, 2 * f):
            labels = rng.permuted(np.tile(base, (step, 1)), axis=1)
            count(labels)
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
    boots: list[FloatArray] = []
    for step in _chunks(n_bootstrap, 2 * f):
        wa = rng.multinomial(na, np.full(na, 1.0 / na), size=step).astype(np.float64)
        wb = rng.multinomial(nb, np.full(nb, 1.0 / nb), size=step).astype(np.float64)
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
        centred = np.where(ok, s - _nanmean(s), 0.0)
        ss += (centred**2).sum(axis=0)
        dof += ok.sum(axis=0) - 1
    var = np.where(dof > 0, ss / np.maximum(dof, 1), np.nan)
    sd = np.sqrt(var)
    return np.where(sd > 0, signed / np.where(sd > 0, sd, 1.0), np.nan)


# --------------------------------------------------------------------------------------------------------------------
# Map-level descriptive numbers


def _mean_maps(result: ScanResult, name: str) -> FloatArray:
    """``float64 [L, T, T]`` mean attention of a set for every captured layer (0 where no prompt reaches; the
    same numbers as :meth:`ScanResult.mean`, computed for all layers at once)."""
    acc = result.sets[name]
    mean: FloatArray = np.asarray(acc.sums.numpy(), dtype=np.float64) / np.maximum(acc.count.numpy(), 1)
    return mean


def _map_numbers(result: ScanResult, a: str, b: str, tol: float) -> list[dict[str, float]]:
    """Descriptive numbers of every layer's aggregated maps over the causal cells both sets reach, one dict per
    layer: ``cells, mean_diff, mean_abs_diff, frac_pos, frac_neg, jsd``."""
    t = result.length
    reach = (result.count(a) > 0).numpy() & (result.count(b) > 0).numpy() & np.tril(np.ones((t, t), dtype=bool))
    pa, pb = _mean_maps(result, a), _mean_maps(result, b)  # [L, T, T]
    floor = math.exp(result.floor)
    d = np.log(np.maximum(pa[:, reach], floor)) - np.log(np.maximum(pb[:, reach], floor))  # [L, cells]
    cells = int(reach.sum())
    jsd = _mean_row_jsd(pa, pb, reach)
    out: list[dict[str, float]] = []
    for i in range(len(result.layers)):
        row: dict[str, float] = {"cells": cells}
        if cells:
            di = d[i]
            row.update(
                mean_diff=float(di.mean()),
                mean_abs_diff=float(np.abs(di).mean()),
                frac_pos=float((di > tol).mean()),
                frac_neg=float((di < -tol).mean()),
            )
        else:
            row.update(mean_diff=np.nan, mean_abs_diff=np.nan, frac_pos=np.nan, frac_neg=np.nan)
        row["jsd"] = float(jsd[i])
        out.append(row)
    return out


def _mean_row_jsd(pa: FloatArray, pb: FloatArray, reach: npt.NDArray[np.bool_]) -> FloatArray:
    """Mean over query rows of the Jensen–Shannon divergence (nats, in [0, ln 2]) between the two sets' mean
    attention rows ``pa, pb [L, T, T]``, each row renormalised over the keys both sets reach (``reach [T, T]``).
    Rows with fewer than two such keys (the first row always) carry no distribution and are left out.
    Returns ``float64 [L]`` (NaN for a layer without such rows)."""
    p = np.where(reach, np.nan_to_num(pa), 0.0)
    q = np.where(reach, np.nan_to_num(pb), 0.0)
    sp, sq = p.sum(axis=-1), q.sum(axis=-1)  # [L, T]
    rows = (reach.sum(axis=-1) >= 2)[None, :] & (sp > 0) & (sq > 0)
    p = p / np.where(sp > 0, sp, 1.0)[..., None]
    q = q / np.where(sq > 0, sq, 1.0)[..., None]
    m = (p + q) / 2
    safe_m = np.where(m > 0, m, 1.0)

    def kl(x: FloatArray) -> FloatArray:
        return np.asarray((x * np.log(np.where(x > 0, x / safe_m, 1.0))).sum(axis=-1), dtype=np.float64)

    per_row = np.where(rows, 0.5 * kl(p) + 0.5 * kl(q), np.nan)  # [L, T]
    return _nanmean(per_row, axis=1)


# --------------------------------------------------------------------------------------------------------------------
# Tables


def _check_sets(result: ScanResult, a: str, b: str) -> None:
    if a == b:
        raise AttnscanError(f"cannot compare set '{a}' with itself: pass two different sets as a= and b=")
    for name in (a, b):
        if name not in result.sets:
            raise AttnscanError(
                f"the comparison needs prompt set '{name}', but this result has only {', '.join(result.sets)}: "
                f"scan that set too or compare sets the result has"
            )
        n = result.sets[name].n_prompts
        if n < 2:
            raise AttnscanError(
                f"set '{name}' has {n} prompt{'s' if n != 1 else ''}: the statistics need at least 2 prompts per set"
            )
    if result.sets[a].n_blocks != result.sets[b].n_blocks:
        raise AttnscanError(
            f"sets '{a}' and '{b}' were summarised with different block counts "
            f"({result.sets[a].n_blocks} vs {result.sets[b].n_blocks}): scan both with the same block count"
        )


def _verdict(row: dict[str, Any], th: VerdictThresholds) -> str:
    q = np.fmin(row["q_signed"], row["q_abs"])
    if not q < th.alpha:
        return NO_SHIFT
    if row["mean_diff"] > 0 and row["frac_pos"] >= th.consistency:
        return VULNERABLE
    if row["mean_diff"] < 0 and row["frac_neg"] >= th.consistency:
        return RESILIENT
    return MIXED


def layer_table(
    result: ScanResult,
    *,
    a: str = "jailbreak",
    b: str = "benign",
    n_permutations: int = 1000,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float | None = None,
    thresholds: VerdictThresholds | None = None,
) -> pd.DataFrame:
    """One row per captured layer: how set ``a``'s attention differs from set ``b``'s (a - b, log attention).

    Columns:
        ``layer``; ``n_a``, ``n_b`` prompts per set;
        map level (causal cells both sets reach): ``cells``, ``mean_diff``, ``mean_abs_diff`` (nats), ``frac_pos`` /
        ``frac_neg`` (fraction of those cells with difference ``> +tol`` / ``< -tol``), ``jsd`` (mean over query rows
        of the Jensen–Shannon divergence between the sets' mean attention rows, renormalised over the keys both
        reach, in **nats**, at most ln 2), ``entropy_change`` (mean per-prompt row entropy, a - b, nats),
        ``sink_change`` (mean per-prompt attention on the first token, a - b);
        per-prompt inference on ``blocks``: ``signed_shift``, ``abs_shift``, ``effect`` (see
        :func:`standardized_effect`), ``ci_low`` / ``ci_high`` (percentile bootstrap of ``signed_shift`` at 95 %),
        ``p_signed`` (two-sided), ``p_abs`` (one-sided), ``q_signed`` / ``q_abs`` (Benjamini–Hochberg across
        layers), ``significant`` (``min(q_signed, q_abs) < alpha``), ``rank`` (1 = largest ``|effect|`` among
        significant layers; NaN otherwise) and ``verdict`` (see :class:`VerdictThresholds`).

    The frame's ``attrs`` record ``a``, ``b``, ``alpha``, the thresholds, seeds and permutation counts.

    Args:
        result: the scan; needs sets ``a`` and ``b`` with at least 2 prompts each.
        n_permutations: label shuffles of the permutation test (exact enumeration for small sets).
        n_bootstrap: resamples of the confidence interval.
        seed: seed of the permutations; the bootstrap uses ``seed + 1``.
        alpha: shorthand that overrides ``thresholds.alpha``.
        thresholds: verdict thresholds (default :class:`VerdictThresholds`).

    Raises:
        AttnscanError: a set is missing, has fewer than 2 prompts, or ``a == b``.
    """
    th = thresholds if thresholds is not None else VerdictThresholds()
    if alpha is not None:
        th = VerdictThresholds(alpha=alpha, consistency=th.consistency, tol=th.tol)
    _check_sets(result, a, b)
    xa = result.sets[a].blocks.double().numpy()
    xb = result.sets[b].blocks.double().numpy()
    perm = permutation_test(xa, xb, n_permutations=n_permutations, seed=seed)
    low, high = bootstrap_ci(xa, xb, n_bootstrap=n_bootstrap, seed=seed + 1)
    effect = standardized_effect(xa, xb)
    q_signed = benjamini_hochberg(perm.p_signed)
    q_abs = benjamini_hochberg(perm.p_abs)
    sink_a, sink_b = (result.sets[s].sink.double().numpy() for s in (a, b))
    ent_a, ent_b = (result.sets[s].entropy.double().numpy() for s in (a, b))
    sink_change = _nanmean(sink_a) - _nanmean(sink_b)
    entropy_change = _nanmean(ent_a) - _nanmean(ent_b)

    maps = _map_numbers(result, a, b, th.tol)
    rows: list[dict[str, Any]] = []
    for i, layer in enumerate(result.layers):
        row: dict[str, Any] = {"layer": layer, "n_a": result.sets[a].n_prompts, "n_b": result.sets[b].n_prompts}
        row.update(maps[i])
        row.update(
            entropy_change=float(entropy_change[i]),
            sink_change=float(sink_change[i]),
            signed_shift=float(perm.signed[i]),
            abs_shift=float(perm.absolute[i]),
            effect=float(effect[i]),
            ci_low=float(low[i]),
            ci_high=float(high[i]),
            p_signed=float(perm.p_signed[i]),
            p_abs=float(perm.p_abs[i]),
            q_signed=float(q_signed[i]),
            q_abs=float(q_abs[i]),
        )
        row["significant"] = bool(np.fmin(row["q_signed"], row["q_abs"]) < th.alpha)
        row["verdict"] = _verdict(row, th)
        rows.append(row)
    table = pd.DataFrame(rows)
    magnitude = table["effect"].abs().where(table["significant"])
    table["rank"] = magnitude.rank(ascending=False, method="min")
    order = [c for c in table.columns if c not in ("rank", "verdict")] + ["rank", "verdict"]
    table = table[order]
    table.attrs.update(
        a=a,
        b=b,
        alpha=th.alpha,
        thresholds=asdict(th),
        seed=seed,
        n_permutations=perm.n_permutations,
        exact=perm.exact,
        n_bootstrap=n_bootstrap,
    )
    return table


def effects_table(
    result: ScanResult,
    *,
    n_permutations: int = 1000,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float | None = None,
    thresholds: VerdictThresholds | None = None,
) -> pd.DataFrame | None:
    """Split the jailbreak shift into a wrapper effect and a request effect, per layer, using a ``control`` set.

    The ``control`` set is taken to hold the jailbreak wrappers around benign requests. Then
    ``wrapper_*`` columns are :func:`layer_table` of control vs benign (what the wrapper alone changes) and
    ``request_*`` columns are :func:`layer_table` of jailbreak vs control (what the harmful request changes inside
    the wrapper). Each family is Benjamini–Hochberg corrected across layers on its own.

    Returns:
        One row per layer (``layer`` plus prefixed columns of both tables), or ``None`` when the result has no
        ``control`` set.
    """
    if "control" not in result.sets:
        return None
    kw: dict[str, Any] = dict(
        n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed, alpha=alpha, thresholds=thresholds
    )
    wrapper = layer_table(result, a="control", b="benign", **kw)
    request = layer_table(result, a="jailbreak", b="control", **kw)
    merged = pd.concat(
        [
            wrapper.set_index("layer").add_prefix("wrapper_"),
            request.set_index("layer").add_prefix("request_"),
        ],
        axis=1,
    ).reset_index()
    merged.attrs.update(wrapper=dict(wrapper.attrs), request=dict(request.attrs))
    return merged


# --------------------------------------------------------------------------------------------------------------------
# Observations


def _key_ranges(reach_keys: npt.NDArray[np.int64], relative: bool = False) -> list[tuple[str, npt.NDArray[np.int64]]]:
    """The first token and the thirds of the remaining reached key positions, as ``(label, keys)``. In relative
    alignment the first grid column holds the first token only for prompts of T tokens, so it is not singled out."""
    ranges: list[tuple[str, npt.NDArray[np.int64]]] = []
    rest = reach_keys
    if not relative and 0 in reach_keys:
        ranges.append(("the first token (sink)", np.array([0])))
        rest = reach_keys[reach_keys > 0]
    names = ("early", "middle", "late")
    for name, part in zip(names, np.array_split(rest, 3), strict=True):
        if part.size:
            span = f"{part[0]}" if part.size == 1 else f"{part[0]}–{part[-1]}"
            where = f"grid positions {span}" if relative else f"positions {span}"
            ranges.append((f"{name} keys ({where})", part))
    return ranges


def alignment_note(result: ScanResult, a: str = "jailbreak", b: str = "benign") -> str | None:
    """One sentence on what grid positions mean for this scan, and on how far each set reaches."""
    sets = result.manifest.get("prompt_sets", {})
    if not isinstance(sets, dict) or a not in sets or b not in sets:
        return None
    try:
        mean_a, mean_b = float(sets[a]["tokens_mean"]), float(sets[b]["tokens_mean"])
        max_a, max_b = int(sets[a]["tokens_max"]), int(sets[b]["tokens_max"])
    except (KeyError, TypeError, ValueError):
        return None
    t = result.length
    if result.manifest.get("alignment") == "relative":
        return (
            f"Relative alignment: every prompt is stretched over the {t}-position grid, so a grid position is the "
            f"same fraction of every prompt ({a} prompts average {mean_a:.0f} tokens, {b} prompts {mean_b:.0f}); "
            "a shared start such as a chat template's system turn fills a larger share of a short prompt's grid."
        )
    common = min(max_a, max_b)
    if common >= 0.9 * max(max_a, max_b):
        return None
    return (
        f"Absolute alignment: {b} prompts reach positions 0–{max_b - 1} and {a} prompts 0–{max_a - 1} (means "
        f"{mean_b:.0f} and {mean_a:.0f} tokens), so the difference covers only the first {common} positions, where "
        "both sets have tokens; --align relative compares whole prompts by relative position instead."
    )


def _where_sentence(result: ScanResult, layer: int, a: str, b: str, tol: float) -> str | None:
    d = result.diff(layer, a, b).numpy()
    reach = np.isfinite(d)
    if not reach.any():
        return None
    keys = np.flatnonzero(reach.any(axis=0)).astype(np.int64)
    parts: list[str] = []
    means: list[tuple[str, float]] = []
    for label, cols in _key_ranges(keys, relative=result.manifest.get("alignment") == "relative"):
        vals = d[:, cols][reach[:, cols]]
        mean = float(vals.mean())
        means.append((label, mean))
        parts.append(f"{label} {mean:+.2f}")
    text = f"At layer {layer}, the mean log difference by key position is " + ", ".join(parts) + " nats"
    top = max(means, key=lambda m: m[1])
    bottom = min(means, key=lambda m: m[1])
    tails = []
    if top[1] > tol:
        tails.append(f"the increase is largest on {top[0]}")
    if bottom[1] < -tol:
        tails.append(f"the decrease on {bottom[0]}" if tails else f"the decrease is largest on {bottom[0]}")
    if tails:
        text += "; " + " and ".join(tails)
    return text + "."


def _lead(model_name: str | None, sentence: str) -> str:
    if not model_name:
        return sentence
    return f"In {model_name}, {sentence[0].lower()}{sentence[1:]}"


def observations(table: pd.DataFrame, result: ScanResult | None = None, model_name: str | None = None) -> list[str]:
    """Short factual sentences from a :func:`layer_table` (a figure's "Key Observations").

    They say how many layers shift significantly and how, which layer shifts most and in which direction, where on
    the key axis its difference is largest (when ``result`` is given: first token, then thirds of the reached key
    positions), and end with the caveat that an attention shift is a proxy for jailbreak success. Nothing is called
    vulnerable, resilient or mixed unless its q-value is below alpha.

    Args:
        table: the output of :func:`layer_table` (its ``attrs`` name the sets and alpha).
        result: the scan the table came from, for the key-position sentence.
        model_name: named in the first sentence when given.
    """
    if "verdict" not in table.columns or "layer" not in table.columns:
        raise AttnscanError("observations needs a table from layer_table (columns 'layer' and 'verdict')")
    a = str(table.attrs.get("a", "jailbreak"))
    b = str(table.attrs.get("b", "benign"))
    alpha = float(table.attrs.get("alpha", VerdictThresholds().alpha))
    tol = float(table.attrs.get("thresholds", {}).get("tol", VerdictThresholds().tol))
    n = len(table)
    if n == 0:
        return [_lead(model_name, "No layers were captured, so there is nothing to compare.")]
    sig = table[table["verdict"] != NO_SHIFT]
    out: list[str] = []
    if sig.empty:
        out.append(
            _lead(
                model_name,
                f"No layer shows a significant shift between {a} and {b} prompts "
                f"({n} layer{'s' if n != 1 else ''} tested; no Benjamini–Hochberg q below {alpha:g}).",
            )
        )
    else:
        counts = {v: int((table["verdict"] == v).sum()) for v in VERDICTS}
        out.append(
            _lead(
                model_name,
                f"{len(sig)} of {n} layers show a significant shift between {a} and {b} prompts (q < {alpha:g}): "
                f"{counts[VULNERABLE]} vulnerable, {counts[MIXED]} mixed, {counts[RESILIENT]} resilient; "
                f"{counts[NO_SHIFT]} {'shows' if counts[NO_SHIFT] == 1 else 'show'} no significant shift.",
            )
        )

    if not sig.empty:
        top = sig.loc[sig["rank"].fillna(np.inf).idxmin()]
    else:
        score = table["effect"].abs()
        if not score.notna().any():
            score = table["mean_abs_diff"]
        top = table.loc[score.fillna(-np.inf).idxmax()]
    layer = int(top["layer"])
    q = float(np.fmin(top["q_signed"], top["q_abs"]))
    stats_text = (
        f"mean log difference {top['mean_diff']:+.2f} nats, {top['frac_pos']:.0%} of cells higher and "
        f"{top['frac_neg']:.0%} lower; block shift {top['signed_shift']:+.2f}, "
        f"95% CI {top['ci_low']:+.2f} to {top['ci_high']:+.2f}, effect {top['effect']:+.2f}, q = {q:.2g}"
    )
    verdict = str(top["verdict"])
    if verdict == VULNERABLE:
        out.append(f"Layer {layer} shifts most and is vulnerable: {a} prompts attend more than {b} ({stats_text}).")
    elif verdict == RESILIENT:
        out.append(f"Layer {layer} shifts most and is resilient: {a} prompts attend less than {b} ({stats_text}).")
    elif verdict == MIXED:
        out.append(
            f"Layer {layer} shifts most and is mixed: the shift is significant but not consistently in one "
            f"direction ({stats_text})."
        )
    else:
        md = float(top["mean_diff"])
        direction = (
            f"{a} prompts attend more than {b} on average"
            if md > tol
            else f"{a} prompts attend less than {b} on average"
            if md < -tol
            else f"{a} prompts attend about as much as {b} on average"
        )
        out.append(f"The largest difference, at layer {layer}, is not significant: {direction} ({stats_text}).")

    if not sig.empty:
        groups = []
        for v in (VULNERABLE, MIXED, RESILIENT):
            layers = [str(int(x)) for x in table.loc[table["verdict"] == v, "layer"]]
            if layers:
                groups.append(f"{v}: layer{'s' if len(layers) > 1 else ''} {', '.join(layers)}")
        out.append("Significant layers by verdict — " + "; ".join(groups) + ".")

    out.append(
        f"At layer {layer}, attention on the first token changes by {top['sink_change']:+.3f} and the mean row "
        f"entropy by {top['entropy_change']:+.3f} nats ({a} minus {b})."
    )
    if result is not None:
        where = _where_sentence(result, layer, a, b, tol)
        if where:
            out.append(where)
        note = alignment_note(result, a, b)
        if note:
            out.append(note)
    out.append(
        "An attention shift is a proxy for, not a measurement of, jailbreak success: these numbers show where "
        f"attention differs between {a} and {b} prompts, not whether the model complied."
    )
    return out


__all__ = [
    "MIXED",
    "NO_SHIFT",
    "RESILIENT",
    "VERDICTS",
    "VULNERABLE",
    "PermutationResult",
    "VerdictThresholds",
    "benjamini_hochberg",
    "bootstrap_ci",
    "effects_table",
    "layer_table",
    "observations",
    "permutation_test",
    "standardized_effect",
]
