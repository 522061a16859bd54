"""The inference helpers against slow references written from their docstrings, on ragged data (prompts that reach
different blocks, layers no prompt pair shares), and the edge cases the main tests do not reach."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import binomtest

import attnscan.analysis.inference as inference
from attnscan.analysis.inference import (
    benjamini_hochberg,
    bootstrap_ci,
    nanmean,
    permutation_test,
    standardized_effect,
    wilson_interval,
)
from attnscan.errors import AttnscanError


def ragged(seed: int, n: int, shift: float = 0.0) -> np.ndarray:
    """``[n, 3 layers, 4 blocks]`` values with a quarter of the cells NaN; layer 2 block 3 reached by nobody."""
    rng = np.random.default_rng(seed)
    x = shift + rng.normal(0, 1, (n, 3, 4)) + rng.normal(0, 0.5, (n, 1, 1))
    x[rng.uniform(size=x.shape) < 0.25] = np.nan
    x[:, 2, 3] = np.nan
    return x


def reference_shift(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed and absolute shift per layer: over the blocks both groups reach, the mean of the group-mean
    difference and of its magnitude (NaN for a layer without such blocks)."""
    signed, absolute = [], []
    for layer in range(a.shape[1]):
        diffs = []
        for k in range(a.shape[2]):
            xa, xb = a[:, layer, k], b[:, layer, k]
            xa, xb = xa[~np.isnan(xa)], xb[~np.isnan(xb)]
            if xa.size and xb.size:
                diffs.append(xa.mean() - xb.mean())
        signed.append(np.mean(diffs) if diffs else np.nan)
        absolute.append(np.mean(np.abs(diffs)) if diffs else np.nan)
    return np.array(signed), np.array(absolute)


def reference_effect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cohen's d per layer as the docstring of standardized_effect defines it, one prompt and block at a time."""
    out = []
    for layer in range(a.shape[1]):
        common = [
            k for k in range(a.shape[2]) if (~np.isnan(a[:, layer, k])).any() and (~np.isnan(b[:, layer, k])).any()
        ]
        signed = np.mean([np.nanmean(a[:, layer, k]) - np.nanmean(b[:, layer, k]) for k in common])
        ss, dof = 0.0, 0
        for x in (a, b):
            scores = []
            for prompt in x[:, layer]:
                own = [prompt[k] - np.nanmean(x[:, layer, k]) for k in common if not np.isnan(prompt[k])]
                if own:
                    scores.append(np.mean(own))
            ss += sum((s - np.mean(scores)) ** 2 for s in scores)
            dof += len(scores) - 1
        out.append(signed / math.sqrt(ss / dof))
    return np.array(out)


def test_shift_statistics_on_ragged_data() -> None:
    a, b = ragged(1, 9, shift=0.4), ragged(2, 12)
    b[:, 1, 2] = np.nan  # a block only set a reaches
    a[:, 0, 1] = np.nan  # and one only set b reaches
    res = permutation_test(a, b, n_permutations=50)
    signed, absolute = reference_shift(a, b)
    np.testing.assert_allclose(res.signed, signed, rtol=1e-12)
    np.testing.assert_allclose(res.absolute, absolute, rtol=1e-12)


def test_a_layer_with_one_shared_block_and_one_with_none() -> None:
    a = np.array([[[1.0, np.nan]], [[3.0, np.nan]], [[2.0, np.nan]]])  # [3 prompts, 1 layer, 2 blocks]
    b = np.array([[[0.0, 5.0]], [[1.0, 7.0]]])
    res = permutation_test(a, b, n_permutations=100)
    assert res.signed[0] == pytest.approx(2.0 - 0.5) and res.absolute[0] == pytest.approx(1.5)
    none = permutation_test(a[:, :, 1:], b[:, :, 1:], n_permutations=100)
    assert np.isnan(none.signed[0]) and np.isnan(none.p_signed[0]) and np.isnan(none.p_abs[0])
    low, high = bootstrap_ci(a[:, :, 1:], b[:, :, 1:], n_bootstrap=50)
    assert low.dtype == high.dtype == np.float64 and np.isnan(low[0]) and np.isnan(high[0])


def test_standardized_effect_on_ragged_data() -> None:
    a, b = ragged(3, 14, shift=0.5), ragged(4, 11)
    np.testing.assert_allclose(standardized_effect(a, b), reference_effect(a, b), rtol=1e-10)


def test_standardized_effect_on_sparse_data() -> None:
    """Blocks reached by one prompt, a prompt that reaches no block the other group reaches (no score), a group of
    one prompt (one degree of freedom in all), and a layer where every prompt scores alike (SD 0: NaN)."""
    nan = np.nan
    a = np.array(
        [
            [[0.5, 1.0, nan], [1.0, 1.0, 1.0]],
            [[0.2, nan, nan], [1.0, 1.0, 1.0]],
            [[nan, nan, 2.0], [1.0, 1.0, 1.0]],  # only block 2, which b never reaches
        ]
    )
    b = np.array([[[0.1, 0.3, nan], [0.0, 0.0, 0.0]]])
    effect = standardized_effect(a, b)
    assert effect[0] == pytest.approx(reference_effect(a[:, :1], b[:, :1])[0], rel=1e-12)
    # by hand: signed = mean(0.35 - 0.1, 1.0 - 0.3) = 0.475; a's scores: mean(0.15, 0) = 0.075 and -0.15 (block 0
    # only), spread 2 * 0.1125^2 over 1 degree of freedom; b's one score adds nothing
    assert effect[0] == pytest.approx(0.475 / math.sqrt(2 * 0.1125**2), rel=1e-12)
    assert np.isnan(effect[1])


def test_random_permutations_approach_the_exact_p_value() -> None:
    """C(16, 8) = 12870 labellings: enumerated exactly, and 10000 random ones land within 4 binomial SDs."""
    rng = np.random.default_rng(5)
    a = 0.6 + rng.normal(0, 1, (8, 2, 3))
    b = rng.normal(0, 1, (8, 2, 3))
    exact = permutation_test(a, b, n_permutations=12870)
    drawn = permutation_test(a, b, n_permutations=10000, seed=3)
    assert exact.exact and not drawn.exact and drawn.n_permutations == 10000
    for p_exact, p_drawn in [(exact.p_signed, drawn.p_signed), (exact.p_abs, drawn.p_abs)]:
        sd = np.sqrt(p_exact * (1 - p_exact) / 10000)
        assert (np.abs(p_drawn - p_exact) <= 4 * sd + 1e-4).all(), (p_exact, p_drawn)
    assert exact.p_signed.min() < 0.2  # a shift the test can see, so the comparison is not between two p-values of 1
    # exactly as many labellings as allowed permutations: still enumerated
    assert permutation_test(a[:2], b[:2], n_permutations=math.comb(4, 2)).exact


def test_identical_groups_give_p_one() -> None:
    x = np.zeros((4, 2, 3))
    res = permutation_test(x, x.copy(), n_permutations=100, seed=0)
    np.testing.assert_array_equal(res.p_signed, [1.0, 1.0])
    np.testing.assert_array_equal(res.p_abs, [1.0, 1.0])
    big = np.zeros((30, 1, 2))
    drawn = permutation_test(big, big.copy(), n_permutations=200, seed=0)
    assert not drawn.exact and drawn.p_signed[0] == 1.0 and drawn.p_abs[0] == 1.0


def test_chunking_does_not_change_any_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunk size follows the number of features (layers x blocks): a layer's p-values and interval must not
    depend on how many other layers were captured."""
    a, b = ragged(6, 5, shift=0.3), ragged(7, 4)
    whole = (permutation_test(a, b, n_permutations=300, seed=2), permutation_test(a, b, n_permutations=100, seed=2))
    ci = bootstrap_ci(a, b, n_bootstrap=200, seed=4)
    monkeypatch.setattr(inference, "_CHUNK_ELEMENTS", 50)  # a few labellings or resamples per chunk
    chunked = (permutation_test(a, b, n_permutations=300, seed=2), permutation_test(a, b, n_permutations=100, seed=2))
    assert whole[0].exact and not whole[1].exact
    for w, c in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(w.p_signed, c.p_signed)
        np.testing.assert_array_equal(w.p_abs, c.p_abs)
    np.testing.assert_allclose(bootstrap_ci(a, b, n_bootstrap=200, seed=4), ci, rtol=0, atol=0)


def test_seeds_defaults_and_checks() -> None:
    a, b = ragged(8, 10, shift=0.3), ragged(9, 10)
    assert permutation_test(a, b).n_permutations == 1000
    np.testing.assert_array_equal(bootstrap_ci(a, b, seed=1), bootstrap_ci(a, b, seed=1))
    assert not np.array_equal(bootstrap_ci(a, b, seed=1)[0], bootstrap_ci(a, b, seed=2)[0])
    for level in (0.0, 1.0):
        with pytest.raises(ValueError, match="level must lie in"):
            bootstrap_ci(a, b, level=level)
    with pytest.raises(ValueError, match="n_bootstrap must be >= 1"):
        bootstrap_ci(a, b, n_bootstrap=0)
    with pytest.raises(ValueError, match="n_permutations must be >= 1"):
        permutation_test(a, b, n_permutations=0)
    with pytest.raises(ValueError, match=r"differ in shape: \(3, 4\) vs \(2, 4\)"):
        permutation_test(a, b[:, :2])
    for x, y in ((a, b[:0]), (a[:0], b)):
        with pytest.raises(ValueError, match=r"^each group needs at least one prompt$"):
            permutation_test(x, y)
    with pytest.raises(ValueError, match=r"^p must be one-dimensional, got shape \(2, 2\)$"):
        benjamini_hochberg(np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match=r"^p-values must lie in \[0, 1\]$"):
        benjamini_hochberg([0.5, 1.5])
    with pytest.raises(ValueError, match=r"b must have shape \[prompts, layers, ...\]"):
        permutation_test(a, np.zeros(3))
    with pytest.raises(ValueError, match=r"^a must have shape \[prompts, layers, \.\.\.\], got \(3,\)$"):
        permutation_test(np.zeros(3), b)
    assert benjamini_hochberg([0.0, 0.5]) == pytest.approx([0.0, 0.5])  # p = 0 is a valid p-value


def test_the_smallest_valid_inputs_and_the_defaults() -> None:
    """One prompt in a group, one permutation, one resample and summaries without block axes ``[N, L]`` are all
    valid; the defaults are 1000 resamples with seed 0."""
    a, b = ragged(8, 10, shift=0.3), ragged(9, 10)
    lone = b[:1]  # a group of one prompt that reaches every block of layers 0 and 1
    lone[:, :2] = np.nan_to_num(lone[:, :2], nan=0.1)
    single = permutation_test(a, lone, n_permutations=1, seed=0)
    assert single.n_permutations == 1 and not single.exact
    assert np.isfinite(single.signed[:2]).all()
    low, high = bootstrap_ci(a, lone, n_bootstrap=1)
    assert np.isfinite(low[:2]).all() and (low == high)[:2].all()  # one resample: a point, not NaN
    flat = permutation_test(a[:, :, 0], b[:, :, 0], n_permutations=50)  # [N, L]: one summary per layer
    blocks = permutation_test(a[:, :, :1], b[:, :, :1], n_permutations=50)
    np.testing.assert_array_equal(flat.p_signed, blocks.p_signed)
    np.testing.assert_array_equal(flat.signed, blocks.signed)
    default = permutation_test(a, b)
    np.testing.assert_array_equal(default.p_signed, permutation_test(a, b, n_permutations=1000, seed=0).p_signed)
    np.testing.assert_array_equal(bootstrap_ci(a, b), bootstrap_ci(a, b, n_bootstrap=1000, seed=0))
    assert not np.array_equal(bootstrap_ci(a, b)[0], bootstrap_ci(a, b, n_bootstrap=999, seed=0)[0])


def test_nanmean_against_numpy() -> None:
    x = np.random.default_rng(10).normal(size=(6, 4))
    x[[0, 2, 3], 1] = np.nan
    x[:, 3] = np.nan
    for axis in (0, 1):
        got = nanmean(x, axis=axis)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy warns about the all-NaN column
            expected = np.nanmean(x, axis=axis)
        np.testing.assert_allclose(got, expected, rtol=1e-12, equal_nan=True)


@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (7, 23), (50, 100), (1, 400)])
def test_wilson_interval_against_scipy(k: int, n: int) -> None:
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-12) and high == pytest.approx(expected.high, abs=1e-12)
    z90 = 1.6448536269514722
    e90 = binomtest(k, n).proportion_ci(confidence_level=0.90, method="wilson")
    assert wilson_interval(k, n, z=z90) == (pytest.approx(e90.low, abs=1e-12), pytest.approx(e90.high, abs=1e-12))


def test_wilson_interval_edges() -> None:
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    for k, n in ((-1, 5), (6, 5), (1, -1), (1, 0)):
        with pytest.raises(AttnscanError, match=rf"Wilson interval needs 0 <= successes <= n, got {k} of {n}"):
            wilson_interval(k, n)
