"""Who a detector flags at its operating point: the true-positive rate per attack family and the false-positive
rate on benign prompts that look risky, each with its Wilson interval.

A single TPR at a false-positive rate hides the cases that matter: one attack family may pass almost always while
the others are caught, and the false positives may all fall on benign requests that merely sound dangerous ("how do
I kill a Python process"). :func:`subset_rates` splits the flags of one threshold (``score >= threshold``) by the
prompts' group labels (:attr:`attnscan.prompts.sets.PromptSet.groups`):

- jailbreak prompts: ``all``, then, when they carry wrappers, one row per wrapper (``family=...``, else
  ``template_id=...``; the prompts without one under ``no wrapper``): the share flagged, the TPR;
- benign prompts: ``all``; when any benign prompt carries ``looks_risky``, ``looks_risky`` (those whose label is
  true) and ``other`` (the rest); and one row per wrapper when benign prompts carry wrappers (control prompts: the
  jailbreak wrappers around harmless requests): the share flagged, the FPR.

Each rate has its 95 % Wilson interval (:func:`attnscan.analysis.inference.wilson_interval`). The interval treats
the prompts of a row as independent draws, which is fair within one family (its prompts differ by their request)
and generous for ``all`` (whose prompts cluster by family): read ``all`` with the cluster-bootstrap intervals of the
detection table beside it.

:func:`~attnscan.detect.jobs.train_detector` computes this table on the out-of-fold scores of the chosen layer and
detector at the operating point (``fpr=``), writes it as ``families.csv`` and keeps its rows in
``meta["families"]``; :func:`~attnscan.detect.jobs.evaluate_detector` computes it on the evaluation prompts with
the saved threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from ..analysis.inference import wilson_interval
from .detectors import as_labels

__all__ = ["RATE_COLUMNS", "WRAPPER_LABELS", "rate_records", "subset_rates"]

#: The columns of :func:`subset_rates`, in order.
RATE_COLUMNS = ("role", "subset", "measure", "n", "flagged", "rate", "rate_low", "rate_high")
#: The group labels that name a prompt's wrapper, first found wins (as in :mod:`attnscan.detect.training`).
WRAPPER_LABELS = ("family", "template_id")


def _wrapper(record: Mapping[str, Any]) -> str:
    for key in WRAPPER_LABELS:
        value = record.get(key)
        if value is not None and value == value:  # NaN from a file cell is no label
            return f"{key}={value}"
    return "no wrapper"


def _row(role: str, subset: str, flags: npt.NDArray[np.bool_]) -> dict[str, Any]:
    n, k = int(flags.size), int(flags.sum())
    low, high = wilson_interval(k, n)
    measure = "TPR" if role == "jailbreak" else "FPR"
    return dict(zip(RATE_COLUMNS, (role, subset, measure, n, k, k / n if n else float("nan"), low, high), strict=True))


def subset_rates(
    y: npt.ArrayLike,
    score: npt.ArrayLike,
    threshold: float,
    records: Sequence[Mapping[str, Any]] | None,
) -> pd.DataFrame:
    """The flag rates of ``score >= threshold`` per subset (the rows of the module docstring), as a frame with
    :data:`RATE_COLUMNS`; ``y`` ``[N]`` (1 = jailbreak), ``score`` ``float [N]``, ``records`` one dict of group
    labels per prompt (or ``None``: the ``all`` rows only). ``frame.attrs["threshold"]`` is ``threshold``."""
    labels = as_labels(y)
    flags = np.asarray(score, dtype=np.float64) >= threshold
    recs: Sequence[Mapping[str, Any]] = records if records is not None else [{}] * labels.size
    wrappers = np.asarray([_wrapper(r) for r in recs], dtype=object)
    rows = []
    for role, cls in (("jailbreak", 1), ("benign", 0)):
        mine = labels == cls
        if not mine.any():
            continue
        rows.append(_row(role, "all", flags[mine]))
        if role == "benign" and any("looks_risky" in recs[int(i)] for i in np.flatnonzero(mine)):
            risky = np.asarray([bool(r.get("looks_risky", False)) for r in recs])
            rows.append(_row(role, "looks_risky", flags[mine & risky]))
            rows.append(_row(role, "other", flags[mine & ~risky]))
        names = sorted({str(w) for w in wrappers[mine]})
        if names != ["no wrapper"]:
            rows += [_row(role, name, flags[mine & (wrappers == name)]) for name in names]
    frame = pd.DataFrame(rows, columns=list(RATE_COLUMNS))
    frame.attrs["threshold"] = float(threshold)
    return frame


def rate_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of a :func:`subset_rates` frame as plain dicts (NaN as None), for a JSON meta."""
    out = []
    for row in frame.to_dict("records"):
        plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}
        out.append({k: None if isinstance(v, float) and v != v else v for k, v in plain.items()})
    return out
