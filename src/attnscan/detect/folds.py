"""Cross-validation folds: stratified, or grouped so that whole groups of prompts are held out together.

Why group. A jailbreak prompt is a long wrapper (a template) around a short request. When the two prompt sets differ
in their wrappers, a detector scored with stratified folds sees every wrapper in training and is tested on other
prompts made with the same wrappers: it can score an AUROC near 1 by recognising the wrapper (or the length), which
says nothing about a wrapper or a request it has not seen. Grouped folds hold out whole wrappers (or whole
requests), so the out-of-fold scores measure the detector on unseen ones.

Stratified folds (:func:`stratified_folds`): scikit-learn's ``StratifiedKFold`` shuffled with ``seed``; ``k``
shrinks, with a warning, to the smaller class's size (:func:`usable_folds`).

Grouped folds (:func:`grouped_folds`)
-------------------------------------
``groups`` gives one group id per prompt. The rule:

- Prompts with equal ids form one group, whatever their class: a template that wraps both jailbreak and control
  (benign) requests is held out from both sides at once, which is exactly the test that the wrapper alone cannot
  decide.
- A prompt without an id (``None`` or NaN) is a group of its own. So when only one class carries the key (the
  jailbreak prompts have a template family, the plain benign requests have none), the other class's prompts are
  held out one by one, as in stratified folds, while the first class's are held out group by group. Note what this
  does not remove: when every jailbreak prompt has a wrapper and no benign one does, "has a wrapper" still tells the
  classes apart on unseen wrappers. Wrapped benign prompts (``builtin:control``) take the wrapper out of the
  comparison; the text baseline (:mod:`attnscan.detect.baselines`) shows how much the surface gives away.
- Ids are compared as given: :func:`~attnscan.prompts.sets.compose` numbers the templates of a plain list ``t1,
  t2, ...``, so two sets composed from different plain lists share ids that name different templates, and those
  are held out together (more than needed, never less).
- The folds are scikit-learn's ``StratifiedGroupKFold`` shuffled with ``seed`` (deterministic): no group is split
  between training and test, and each fold's class balance is kept as close to the whole's as the group sizes
  allow.
- Every training part must hold both classes, so each class must lie in at least 2 groups (else
  :class:`~attnscan.errors.AttnscanError`), and ``k`` shrinks, with a warning, to the smallest number of groups a
  class lies in when that is below ``k``. A test fold may hold one class only: the scores are pooled out of fold.

:func:`group_ids` turns a prompt set's per-prompt labels (:attr:`attnscan.prompts.sets.PromptSet.groups`) into such
ids for a chain of keys (``("family", "template_id")``: the family, else the template). :func:`out_of_fold` scores
every prompt with a model fitted on the other folds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ..errors import AttnscanError
from .detectors import Detector, FloatArray, IntArray, as_labels

__all__ = [
    "CV_KINDS",
    "CvKind",
    "Folds",
    "GroupIds",
    "check_cv",
    "check_folds",
    "fold_plans",
    "group_codes",
    "group_ids",
    "grouped_folds",
    "out_of_fold",
    "stratified_folds",
    "usable_folds",
]

CvKind = Literal["grouped", "stratified"]
GroupIds = npt.ArrayLike | Sequence[Any]
"""One group id per prompt (any value; ``None`` or NaN for a prompt in a group of its own)."""
CV_KINDS: tuple[str, ...] = ("grouped", "stratified")


@dataclass(frozen=True)
class Folds:
    """A cross-validation plan: ``splits`` (``(train, test)`` index arrays, every prompt in exactly one test part),
    its ``kind`` (``"stratified"`` or ``"grouped"``), and for grouped folds the number of groups, ``n_groups``, and
    the group code of each prompt, ``codes`` (``int [N]``, :func:`group_codes`)."""

    kind: CvKind
    splits: tuple[tuple[IntArray, IntArray], ...]
    n_groups: int | None = None
    codes: IntArray | None = None

    @property
    def k(self) -> int:
        """The number of folds."""
        return len(self.splits)

    def __iter__(self) -> Iterator[tuple[IntArray, IntArray]]:
        return iter(self.splits)

    def fold_of(self, n: int) -> IntArray:
        """``int [n]``: the fold that tests each prompt."""
        fold = np.full(n, -1, dtype=np.int64)
        for i, (_, test) in enumerate(self.splits):
            fold[test] = i
        return fold


def check_cv(cv: str) -> None:
    """Refuse a cross-validation kind other than ``"grouped"`` and ``"stratified"``."""
    if cv not in CV_KINDS:
        raise AttnscanError(f"cv must be 'grouped' or 'stratified', got {cv!r}")


def check_folds(k: int) -> None:
    """Refuse fewer than 2 cross-validation folds (:func:`usable_folds` checks ``k`` with this)."""
    if k < 2:
        raise AttnscanError(f"cross-validation needs at least 2 folds (k >= 2), got {k}")


def _check_two_each(y: IntArray) -> None:
    if min(int(y.sum()), y.size - int(y.sum())) < 2:
        raise AttnscanError(
            f"cross-validation needs at least 2 prompts of each class; got {y.size - int(y.sum())} benign and "
            f"{int(y.sum())} jailbreak"
        )


def usable_folds(y: IntArray, k: int, *, stacklevel: int = 3) -> int:
    """The number of stratified cross-validation folds the labels allow: ``k``, reduced (with a warning) to the
    size of the smaller class when that is below ``k``.

    ``y`` is ``int [N]`` (1 = jailbreak, 0 = benign). Raises :class:`~attnscan.errors.AttnscanError` for ``k < 2``
    or fewer than two prompts in either class. The warning names the caller's caller (``stacklevel=3``), so a
    function that calls this for its user gets the user's line.
    """
    check_folds(k)
    _check_two_each(y)
    smallest = int(min(y.sum(), y.size - y.sum()))
    if smallest < k:
        warnings.warn(
            f"only {smallest} prompts in the smaller class: using {smallest}-fold instead of {k}-fold cross-validation",
            UserWarning,
            stacklevel=stacklevel,
        )
        return smallest
    return k


def stratified_folds(y: npt.ArrayLike, k: int, seed: int, *, stacklevel: int = 3) -> Folds:
    """Stratified ``k``-fold splits of the labels ``y`` (``[N]``, 1 = jailbreak), shuffled with ``seed``; ``k``
    shrinks as :func:`usable_folds` says (its warning goes ``stacklevel`` frames up from here)."""
    from sklearn.model_selection import StratifiedKFold

    labels = as_labels(y)
    k_used = usable_folds(labels, int(k), stacklevel=stacklevel + 1)
    splitter = StratifiedKFold(n_splits=k_used, shuffle=True, random_state=seed)
    splits = tuple(
        (np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64))
        for tr, te in splitter.split(np.zeros(labels.size), labels)
    )
    return Folds("stratified", splits)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def group_codes(groups: GroupIds, n: int | None = None) -> IntArray:
    """``int [N]``: one integer per prompt, equal for equal group ids, unique for each prompt without one (``None`` or
    NaN); codes follow the first appearance of each id."""
    values = np.asarray(groups, dtype=object)
    if values.ndim != 1:
        raise AttnscanError(f"group ids must be one per prompt (a 1-D array), got shape {values.shape}")
    if n is not None and len(values) != n:
        raise AttnscanError(f"{len(values)} group ids for {n} prompts: give one group id per prompt")
    seen: dict[Any, int] = {}
    codes = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        key = ("missing", i) if _missing(value) else ("id", str(value))
        codes[i] = seen.setdefault(key, len(seen))
    return codes


def grouped_folds(y: npt.ArrayLike, groups: GroupIds, k: int, seed: int, *, stacklevel: int = 3) -> Folds:
    """Stratified group ``k``-fold splits that hold out whole groups (the rule in the module docstring).

    ``y``: labels ``[N]`` (1 = jailbreak); ``groups``: a group id per prompt (``None``/NaN: a group of its own).
    ``k`` shrinks, with a warning ``stacklevel`` frames up from here, to the smallest number of groups a class lies
    in; fewer than 2 raises :class:`~attnscan.errors.AttnscanError`.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    check_folds(int(k))
    labels = as_labels(y)
    _check_two_each(labels)
    codes = group_codes(groups, labels.size)
    per_class = {name: len(set(codes[labels == c].tolist())) for name, c in (("benign", 0), ("jailbreak", 1))}
    smallest = min(per_class.values())
    if smallest < 2:
        raise AttnscanError(
            f"grouped cross-validation needs each class in at least 2 groups; the benign prompts lie in "
            f"{per_class['benign']} and the jailbreak prompts in {per_class['jailbreak']}: add prompts of other "
            "groups (templates, requests), or use stratified folds (cv='stratified')"
        )
    k_used = min(int(k), smallest)
    if k_used < k:
        warnings.warn(
            f"the benign prompts lie in {per_class['benign']} groups and the jailbreak prompts in "
            f"{per_class['jailbreak']}: using {k_used}-fold instead of {k}-fold grouped cross-validation",
            UserWarning,
            stacklevel=stacklevel,
        )
    splitter = StratifiedGroupKFold(n_splits=k_used, shuffle=True, random_state=seed)
    splits = []
    for train, test in splitter.split(np.zeros(labels.size), labels, codes):
        if len(test) == 0:
            continue
        if len(set(labels[train].tolist())) < 2:
            raise AttnscanError(
                "a grouped fold left one class out of training entirely: the groups are too unequal for "
                f"{k_used} folds; use fewer folds or stratified folds (cv='stratified')"
            )
        splits.append((np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)))
    return Folds("grouped", tuple(splits), n_groups=int(codes.max()) + 1, codes=codes)


def fold_plans(
    y: npt.ArrayLike,
    k: int,
    seed: int,
    groups: GroupIds | None = None,
    *,
    more_groups: Mapping[str, GroupIds] | None = None,
    stacklevel: int = 3,
) -> dict[str, Folds]:
    """The cross-validations of a detection table, main one first under the key ``""``.

    Without ``groups``: stratified folds only (the table of before grouped folds). With ``groups``: folds holding
    out those groups, then one grouped plan per entry of ``more_groups`` (``{name: group ids}``), then stratified
    folds under ``"stratified"`` for comparison. Each plan warns (``stacklevel`` frames up from here) when it has
    to use fewer than ``k`` folds.
    """
    labels = as_labels(y)
    if groups is None:
        if more_groups:
            raise AttnscanError("more_groups needs groups: give the main grouping too")
        return {"": stratified_folds(labels, k, seed, stacklevel=stacklevel + 1)}
    plans = {"": grouped_folds(labels, groups, k, seed, stacklevel=stacklevel + 1)}
    for name, ids in (more_groups or {}).items():
        if name in ("", "stratified"):
            raise AttnscanError(f"more_groups cannot be named {name!r}")
        plans[name] = grouped_folds(labels, ids, k, seed, stacklevel=stacklevel + 1)
    plans["stratified"] = stratified_folds(labels, k, seed, stacklevel=stacklevel + 1)
    return plans


def out_of_fold(
    make_detector: Callable[[], Detector], x: npt.NDArray[Any], labels: IntArray, folds: Folds
) -> tuple[FloatArray, IntArray]:
    """Out-of-fold probabilities ``float [N]`` and the fold of each prompt ``int [N]``: for each ``(train, test)``
    split a fresh ``make_detector()`` is fitted on ``train`` and scores ``test``."""
    oof = np.full(labels.shape, np.nan, dtype=np.float64)
    fold = np.full(labels.shape, -1, dtype=np.int64)
    for i, (train, test) in enumerate(folds):
        detector = make_detector().fit(x[train], labels[train])
        oof[test] = detector.predict_proba(x[test])
        fold[test] = i
    if (fold < 0).any():
        raise AttnscanError(f"the folds leave {int((fold < 0).sum())} prompts unscored: every prompt needs a test fold")
    return oof, fold


def group_ids(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str | None] | None:
    """Group ids for prompts described by ``records`` (one dict of group labels per prompt, as in
    :attr:`attnscan.prompts.sets.PromptSet.groups`): each prompt's first key of ``keys`` that it has, as
    ``"key=value"`` (so a family and a template id never clash), or ``None`` (a group of its own) when it has none.
    ``None`` when no prompt has any of ``keys``."""
    out: list[str | None] = []
    for record in records:
        key = next((k for k in keys if k in record and not _missing(record[k])), None)
        out.append(None if key is None else f"{key}={record[key]}")
    return out if any(v is not None for v in out) else None
