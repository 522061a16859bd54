"""Cross-validation folds: stratified and grouped splits, the group rule, and the plans of a detection table."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from attnscan.detect.folds import (
    check_cv,
    fold_plans,
    group_codes,
    group_ids,
    grouped_folds,
    stratified_folds,
)
from attnscan.errors import AttnscanError


def _families(n_families: int = 6, per: int = 5, n_benign: int = 30) -> tuple[np.ndarray, list[str | None]]:
    """Jailbreak prompts in ``n_families`` families of ``per``; benign prompts with no family (None)."""
    y = np.array([0] * n_benign + [1] * (n_families * per))
    groups: list[str | None] = [None] * n_benign + [f"fam{i}" for i in range(n_families) for _ in range(per)]
    return y, groups


def _check_partition(folds: object, n: int) -> None:
    tested = np.concatenate([test for _, test in folds])  # type: ignore[attr-defined]
    assert sorted(tested.tolist()) == list(range(n))  # every prompt tested exactly once
    for train, test in folds:  # type: ignore[attr-defined]
        assert not set(train.tolist()) & set(test.tolist())
        assert len(train) + len(test) == n


def test_grouped_folds_hold_out_whole_groups() -> None:
    y, groups = _families()
    folds = grouped_folds(y, groups, 5, seed=0)
    assert folds.kind == "grouped" and folds.k == 5
    _check_partition(folds, y.size)
    fold = folds.fold_of(y.size)
    jail = np.asarray(groups[30:])
    for family in set(jail.tolist()):  # a family is tested in one fold only: never in training and test at once
        assert len(set(fold[30:][jail == family].tolist())) == 1
    for train, _ in folds:  # every training part holds both classes
        assert set(y[train].tolist()) == {0, 1}
    # prompts without a family are groups of their own: 6 families + 30 benign prompts, spread over the folds
    assert folds.n_groups == 36
    assert all(np.sum((fold == i) & (y == 0)) == 6 for i in range(5))


def test_grouped_folds_are_deterministic() -> None:
    y, groups = _families(10, 3, 30)
    a, b, c = (grouped_folds(y, groups, 5, seed=s).fold_of(y.size) for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_fewer_groups_than_folds_warns_and_shrinks() -> None:
    y, groups = _families(n_families=3)
    with pytest.warns(UserWarning, match="3-fold instead of 5-fold grouped"):
        folds = grouped_folds(y, groups, 5, seed=0)
    assert folds.k == 3
    _check_partition(folds, y.size)
    with pytest.raises(AttnscanError, match="each class in at least 2 groups"):
        grouped_folds(y, [None] * 30 + ["one"] * 15, 5, seed=0)
    with pytest.raises(AttnscanError, match="at least 2 prompts of each class"):
        grouped_folds([0, 1, 1], ["a", "b", "c"], 2, seed=0)
    with pytest.raises(AttnscanError, match="k >= 2"):
        grouped_folds(y, groups, 1, seed=0)


def test_equal_ids_in_both_classes_are_one_group() -> None:
    """A template that wraps jailbreak and benign requests is held out from both sides at once."""
    templates = [f"t{i}" for i in range(6) for _ in range(4)]
    y = np.tile([0, 0, 1, 1], 6)
    folds = grouped_folds(y, templates, 3, seed=1)
    fold = folds.fold_of(y.size)
    for t in set(templates):
        assert len(set(fold[np.asarray(templates) == t].tolist())) == 1
    assert folds.n_groups == 6


def test_stratified_folds_as_before() -> None:
    from sklearn.model_selection import StratifiedKFold

    y = np.repeat([0, 1], 20)
    folds = stratified_folds(y, 5, seed=7)
    ref = StratifiedKFold(n_splits=5, shuffle=True, random_state=7).split(np.zeros(40), y)
    for (train, test), (rtrain, rtest) in zip(folds, ref, strict=True):
        np.testing.assert_array_equal(train, rtrain)
        np.testing.assert_array_equal(test, rtest)
    assert folds.kind == "stratified" and folds.n_groups is None


def test_group_codes_and_ids() -> None:
    codes = group_codes(["a", None, "b", "a", float("nan"), None])
    assert codes.tolist() == [0, 1, 2, 0, 3, 4]  # missing ids are groups of their own
    assert group_codes(np.array([3, 3, 1])).tolist() == [0, 0, 1]
    with pytest.raises(AttnscanError, match="one group id per prompt"):
        group_codes(["a", "b"], 3)
    records = [{"family": "f1", "template_id": "t1"}, {"template_id": "t2"}, {"request_id": "r1"}, {}]
    assert group_ids(records, ("family", "template_id")) == ["family=f1", "template_id=t2", None, None]
    assert group_ids(records, ("request_id",)) == [None, None, "request_id=r1", None]
    assert group_ids(records, ("category",)) is None


def test_fold_plans() -> None:
    y, groups = _families()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(fold_plans(y, 5, 0)) == [""]
        plans = fold_plans(y, 5, 0, groups, more_groups={"requests": list(range(y.size))})
    assert list(plans) == ["", "requests", "stratified"]
    assert [p.kind for p in plans.values()] == ["grouped", "grouped", "stratified"]
    with pytest.raises(AttnscanError, match="needs groups"):
        fold_plans(y, 5, 0, more_groups={"requests": groups})
    with pytest.raises(AttnscanError, match="cannot be named"):
        fold_plans(y, 5, 0, groups, more_groups={"stratified": groups})
    check_cv("grouped")
    with pytest.raises(AttnscanError, match="cv must be 'grouped' or 'stratified'"):
        check_cv("random")
