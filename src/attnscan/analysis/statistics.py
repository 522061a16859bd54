"""Per-layer statistics of a scan: where and how much one prompt set's attention differs from another's.

Everything here is a pure function of a scan (a :class:`~attnscan.analysis.result.ScanResult`, read through
:class:`ScanData`); nothing imports plotting or model code and nothing prints. The inference on per-prompt block
summaries lives in :mod:`attnscan.analysis.inference`, the sentences written from a table in
:mod:`attnscan.analysis.observations`.

Conventions (``a`` defaults to ``"jailbreak"``, ``b`` to ``"benign"``):

- **Sign.** Differences are ``a - b`` of log attention (nats). A positive difference means set ``a`` attends *more*
  to those cells than set ``b``.
- **Map-level numbers** use the aggregated maps (:meth:`ScanResult.log`, :meth:`ScanResult.mean`) over the causal
  cells both sets reach (count > 0 in both). They describe the shift; they carry no p-value of their own.
- **Inference** uses the per-prompt coarse block summaries ``blocks [N, layers, B, B]`` (mean log attention of each
  prompt over each block's causal cells, NaN where the prompt reaches none): per layer a *signed* and an *absolute*
  block shift, each with a permutation test over the set labels (see :mod:`attnscan.analysis.inference` for the
  statistics, the p-values and the assumption that prompts are exchangeable between the sets under the null).
- **Multiple layers** are corrected with Benjamini–Hochberg across the captured layers, separately for the signed
  and the absolute test.
- **Verdicts** follow the reference figure's vocabulary (see :class:`VerdictThresholds`).

An attention shift is a proxy for, not a measurement of, jailbreak success.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]
import torch

from ..engine.accumulate import SetAccumulator
from ..errors import AttnscanError
from .inference import (
    FloatArray,
    PermutationResult,
    benjamini_hochberg,
    bootstrap_ci,
    nanmean,
    permutation_test,
    standardized_effect,
)

VULNERABLE = "vulnerable"
RESILIENT = "resilient"
MIXED = "mixed"
NO_SHIFT = "no significant shift"
VERDICTS = (VULNERABLE, MIXED, RESILIENT, NO_SHIFT)


class ScanData(Protocol):
    """What the statistics and the observations read from a scan; :class:`~attnscan.analysis.result.ScanResult`
    is one. (A protocol, so that the result bundle can use the statistics without the statistics importing it.)"""

    @property
    def sets(self) -> Mapping[str, SetAccumulator]: ...

    @property
    def manifest(self) -> Mapping[str, Any]: ...

    @property
    def layers(self) -> tuple[int, ...]: ...

    @property
    def length(self) -> int: ...

    @property
    def floor(self) -> float: ...

    def count(self, set_name: str) -> torch.Tensor: ...

    def diff(self, layer: int, a: str = "jailbreak", b: str = "benign") -> torch.Tensor: ...


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


# --------------------------------------------------------------------------------------------------------------------
# Map-level descriptive numbers


def _mean_map(result: ScanData, name: str, i: int) -> FloatArray:
    """``float64 [T, T]`` mean attention of a set at the ``i``-th captured layer (0 where no prompt reaches; the
    same numbers as :meth:`ScanResult.mean`)."""
    acc = result.sets[name]
    mean: FloatArray = np.asarray(acc.sums[i].numpy(), dtype=np.float64) / np.maximum(acc.count.numpy(), 1)
    return mean


def _map_numbers(result: ScanData, a: str, b: str, tol: float) -> list[dict[str, float]]:
    """Descriptive numbers of every layer's aggregated maps over the causal cells both sets reach, one dict per
    layer: ``cells, mean_diff, mean_abs_diff, frac_pos, frac_neg, jsd``. One layer at a time: the temporaries are
    ``[T, T]`` maps, not ``[layers, T, T]`` stacks (several GB at T = 2048 with 30 layers)."""
    t = result.length
    reach = (result.count(a) > 0).numpy() & (result.count(b) > 0).numpy() & np.tril(np.ones((t, t), dtype=bool))
    floor = math.exp(result.floor)
    cells = int(reach.sum())
    out: list[dict[str, float]] = []
    for i in range(len(result.layers)):
        pa, pb = _mean_map(result, a, i), _mean_map(result, b, i)
        row: dict[str, float] = {"cells": cells}
        if cells:
            di = np.log(np.maximum(pa[reach], floor)) - np.log(np.maximum(pb[reach], floor))
            row.update(
                mean_diff=float(di.mean()),
                mean_abs_diff=float(np.abs(di).mean()),
                frac_pos=float((di > tol).mean()),
                frac_neg=float((di < -tol).mean()),
            )
        else:
            row.update(mean_diff=np.nan, mean_abs_diff=np.nan, frac_pos=np.nan, frac_neg=np.nan)
        row["jsd"] = float(_mean_row_jsd(pa[None], pb[None], reach)[0])
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
    return nanmean(per_row, axis=1)


# --------------------------------------------------------------------------------------------------------------------
# Tables


def _check_sets(result: ScanData, a: str, b: str) -> None:
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


def _thresholds(alpha: float | None, thresholds: VerdictThresholds | None) -> VerdictThresholds:
    """The thresholds in force: ``thresholds`` (default :class:`VerdictThresholds`) with ``alpha`` overriding its
    level when given."""
    th = thresholds if thresholds is not None else VerdictThresholds()
    if alpha is not None:
        th = VerdictThresholds(alpha=alpha, consistency=th.consistency, tol=th.tol)
    return th


def _inference_columns(
    result: ScanData, a: str, b: str, *, n_permutations: int, n_bootstrap: int, seed: int
) -> tuple[PermutationResult, dict[str, FloatArray]]:
    """The table's per-prompt columns (``[L]`` each, in table order) and the permutation test behind them."""
    xa = result.sets[a].blocks.double().numpy()
    xb = result.sets[b].blocks.double().numpy()
    perm = permutation_test(xa, xb, n_permutations=n_permutations, seed=seed)
    low, high = bootstrap_ci(xa, xb, n_bootstrap=n_bootstrap, seed=seed + 1)
    effect = standardized_effect(xa, xb)
    sink_a, sink_b = (result.sets[s].sink.double().numpy() for s in (a, b))
    ent_a, ent_b = (result.sets[s].entropy.double().numpy() for s in (a, b))
    columns = {
        "entropy_change": nanmean(ent_a) - nanmean(ent_b),
        "sink_change": nanmean(sink_a) - nanmean(sink_b),
        "signed_shift": perm.signed,
        "abs_shift": perm.absolute,
        "effect": effect,
        "ci_low": low,
        "ci_high": high,
        "p_signed": perm.p_signed,
        "p_abs": perm.p_abs,
        "q_signed": benjamini_hochberg(perm.p_signed),
        "q_abs": benjamini_hochberg(perm.p_abs),
    }
    return perm, columns


def _ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Add ``rank`` (1 = largest ``|effect|`` among significant layers, NaN for the others) and move ``rank`` and
    ``verdict`` to the end."""
    magnitude = table["effect"].abs().where(table["significant"])
    table["rank"] = magnitude.rank(ascending=False, method="min")
    order = [c for c in table.columns if c not in ("rank", "verdict")] + ["rank", "verdict"]
    return table[order]


def layer_table(
    result: ScanData,
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
    th = _thresholds(alpha, thresholds)
    _check_sets(result, a, b)
    perm, inferred = _inference_columns(result, a, b, n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed)
    maps = _map_numbers(result, a, b, th.tol)
    rows: list[dict[str, Any]] = []
    for i, layer in enumerate(result.layers):
        row: dict[str, Any] = {"layer": layer, "n_a": result.sets[a].n_prompts, "n_b": result.sets[b].n_prompts}
        row.update(maps[i])
        row.update({name: float(column[i]) for name, column in inferred.items()})
        row["significant"] = bool(np.fmin(row["q_signed"], row["q_abs"]) < th.alpha)
        row["verdict"] = _verdict(row, th)
        rows.append(row)
    table = _ranked(pd.DataFrame(rows))
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
    result: ScanData,
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


#: The comparisons of a scan with a control set (the jailbreak wrappers around harmless requests), in the order the
#: observations and the run summary give them, as ``name: (a, b)`` of :func:`layer_table`.
COMPARISONS: dict[str, tuple[str, str]] = {
    "request": ("jailbreak", "control"),
    "wrapper": ("control", "benign"),
    "combined": ("jailbreak", "benign"),
}


def split_effects(effects: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The two layer tables inside an :func:`effects_table` (or its saved ``effects.csv``), as ``{"request": ...,
    "wrapper": ...}`` with their own column names and ``attrs`` (``a`` and ``b`` filled in when a saved file lost
    them)."""
    out: dict[str, pd.DataFrame] = {}
    for name in ("request", "wrapper"):
        prefix = f"{name}_"
        columns = [c for c in effects.columns if str(c).startswith(prefix)]
        if "layer" not in effects.columns or not columns:
            raise AttnscanError(f"an effects table needs 'layer' and '{prefix}*' columns: give one from effects_table")
        table = effects[["layer", *columns]].rename(columns={c: str(c).removeprefix(prefix) for c in columns})
        a, b = COMPARISONS[name]
        table.attrs.update({"a": a, "b": b, **dict(effects.attrs.get(name, {}))})
        out[name] = table
    return out


__all__ = [
    "COMPARISONS",
    "MIXED",
    "NO_SHIFT",
    "RESILIENT",
    "VERDICTS",
    "VULNERABLE",
    "ScanData",
    "VerdictThresholds",
    "effects_table",
    "layer_table",
    "split_effects",
]
