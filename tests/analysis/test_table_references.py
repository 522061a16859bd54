"""The layer table's map-level columns (cells, mean and absolute log difference, cell fractions, Jensen–Shannon
divergence) and its per-prompt columns against references computed cell by cell and with SciPy, on sets that reach
different parts of the grid; and the table's boundaries (q exactly at α, a fraction exactly at the consistency)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from planted_scans import UP, make_set
from scipy.spatial.distance import jensenshannon

from attnscan import ScanResult
from attnscan.analysis.inference import bootstrap_ci
from attnscan.analysis.statistics import (
    NO_SHIFT,
    VULNERABLE,
    VerdictThresholds,
    _ranked,
    effects_table,
    layer_table,
    split_effects,
)
from attnscan.engine.accumulate import SetAccumulator
from attnscan.errors import AttnscanError

T = 7
LAYERS = (1, 4)


def ragged_set(name: str, lengths: list[int], seed: int, tiny: bool = False) -> SetAccumulator:
    """Random causal mean maps (each prompt's rows sum to 1 over its keys) for prompts of ``lengths`` tokens; with
    ``tiny`` one reached cell of layer 4 has a mean below e^-10, so the floor applies."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    causal = np.tril(np.ones((T, T), dtype=bool))
    count = ((np.arange(T)[None, :, None] < np.asarray(lengths)[:, None, None]) & causal).sum(0)
    p = np.where(causal, rng.uniform(0.05, 1, (len(LAYERS), T, T)), 0.0)
    if tiny:
        p[1, 3, 1] = 1e-7
    p /= p.sum(-1, keepdims=True)
    blocks = rng.normal(-2, 1, (n, len(LAYERS), 2, 2)).astype(np.float32)
    sink = rng.uniform(0.1, 0.6, (n, len(LAYERS)))
    entropy = rng.uniform(0.5, 2.0, (n, len(LAYERS)))
    return SetAccumulator(
        name=name,
        layers=LAYERS,
        length=T,
        floor=-10.0,
        sums=torch.tensor(count[None] * p, dtype=torch.float64),
        count=torch.tensor(count, dtype=torch.int64),
        prompt_ids=torch.arange(n),
        lengths=torch.tensor(lengths, dtype=torch.int64),
        blocks=torch.tensor(blocks),
        sink=torch.tensor(sink, dtype=torch.float32),
        entropy=torch.tensor(entropy, dtype=torch.float32),
    )


@pytest.fixture(scope="module")
def ragged() -> ScanResult:
    # set a reaches rows 0-6, set b only rows 0-4: the rows 5-6 are left out of every map number
    return ScanResult(
        {"jailbreak": ragged_set("jailbreak", [7, 4, 3], 1, tiny=True), "benign": ragged_set("benign", [5, 5, 2], 2)}
    )


@pytest.mark.parametrize(("first", "second"), [("jailbreak", "benign"), ("benign", "jailbreak")])
def test_map_numbers_cell_by_cell(ragged: ScanResult, first: str, second: str) -> None:
    """Both ways round: the comparison covers only the cells both sets reach, whichever of the two reaches less
    (and the jailbreak set reaches rows 4-6 with one prompt only)."""
    table = layer_table(ragged, a=first, b=second, n_permutations=20, n_bootstrap=20).set_index("layer")
    a, b = ragged.sets[first], ragged.sets[second]
    tol = VerdictThresholds().tol
    for li, layer in enumerate(LAYERS):
        diffs, jsds = [], []
        for i in range(T):
            keys = [j for j in range(i + 1) if a.count[i, j] > 0 and b.count[i, j] > 0]
            pa = [float(a.sums[li, i, j] / a.count[i, j]) for j in keys]
            pb = [float(b.sums[li, i, j] / b.count[i, j]) for j in keys]
            floor = math.exp(-10)
            diffs += [math.log(max(x, floor)) - math.log(max(y, floor)) for x, y in zip(pa, pb, strict=True)]
            if len(keys) >= 2:  # a row with one key carries no distribution
                jsds.append(jensenshannon(pa, pb) ** 2)  # SciPy renormalises and returns the square root
        row = table.loc[layer]
        assert row["cells"] == len(diffs) == 15  # rows 0-4 of the causal triangle
        assert row["mean_diff"] == pytest.approx(np.mean(diffs), rel=1e-9)
        assert row["mean_abs_diff"] == pytest.approx(np.mean(np.abs(diffs)), rel=1e-9)
        assert row["frac_pos"] == pytest.approx(np.mean(np.array(diffs) > tol))
        assert row["frac_neg"] == pytest.approx(np.mean(np.array(diffs) < -tol))
        assert row["jsd"] == pytest.approx(np.mean(jsds), rel=1e-9)
    assert table.loc[4, "mean_diff"] != table.loc[1, "mean_diff"]


def test_per_prompt_columns(ragged: ScanResult) -> None:
    table = layer_table(ragged, n_permutations=20, n_bootstrap=30, seed=5)
    a, b = ragged.sets["jailbreak"], ragged.sets["benign"]
    for column, attr in (("sink_change", "sink"), ("entropy_change", "entropy")):
        expected = getattr(a, attr).double().mean(0) - getattr(b, attr).double().mean(0)
        np.testing.assert_allclose(table[column], expected.numpy(), rtol=1e-9)
    # the documented seeds: permutations with seed, the bootstrap with seed + 1
    low, high = bootstrap_ci(a.blocks.double().numpy(), b.blocks.double().numpy(), n_bootstrap=30, seed=6)
    np.testing.assert_array_equal(table["ci_low"], low)
    np.testing.assert_array_equal(table["ci_high"], high)
    assert table.attrs["n_permutations"] == 20 and table.attrs["n_bootstrap"] == 30 and table.attrs["seed"] == 5
    # 3 + 3 prompts: 20 labellings, so 20 permutations enumerate all of them; 19 draw at random
    assert table.attrs["exact"]
    assert not layer_table(ragged, n_permutations=19, n_bootstrap=5).attrs["exact"]
    defaults = layer_table(ragged).attrs  # the README's 1000 bootstrap resamples and seed 0; of the 1000
    # permutations asked for, the 20 labellings of 3 + 3 prompts are enumerated instead
    assert (defaults["n_permutations"], defaults["exact"]) == (20, True)
    assert (defaults["n_bootstrap"], defaults["seed"]) == (1000, 0)


def test_verdict_rules_on_hand_made_rows() -> None:
    """The verdict from q, the mean log difference and the cell fractions (alpha 0.05, consistency 0.7)."""
    from attnscan.analysis.statistics import MIXED, RESILIENT, _verdict

    th = VerdictThresholds()
    assert (th.alpha, th.consistency) == (0.05, 0.7)

    def verdict(mean: float, up: float, down: float, q_signed: float = 0.01, q_abs: float = 0.2) -> str:
        return _verdict({"q_signed": q_signed, "q_abs": q_abs, "mean_diff": mean, "frac_pos": up, "frac_neg": down}, th)

    assert verdict(0.2, 0.7, 0.3) == VULNERABLE
    assert verdict(0.2, 0.69, 0.31) == MIXED
    assert verdict(0.2, 0.25, 0.75) == MIXED  # up on average, but most cells down: not consistent either way
    assert verdict(-0.2, 0.3, 0.7) == RESILIENT  # a fraction equal to the consistency is enough
    assert verdict(-0.2, 0.31, 0.69) == MIXED
    assert verdict(-0.2, 0.8, 0.2) == MIXED  # down on average, most cells up
    assert verdict(0.2, 0.9, 0.1, q_signed=0.05, q_abs=0.05) == NO_SHIFT  # q must be below alpha
    assert verdict(0.2, 0.9, 0.1, q_signed=float("nan"), q_abs=0.01) == VULNERABLE  # either test may carry it
    assert verdict(0.2, 0.9, 0.1, q_signed=float("nan"), q_abs=float("nan")) == NO_SHIFT


def test_verdict_boundaries(planted: ScanResult, planted_table: pd.DataFrame) -> None:
    r = planted_table.set_index("layer").loc[5]
    q = min(r["q_signed"], r["q_abs"])
    at_q = layer_table(planted, alpha=float(q)).set_index("layer").loc[5]
    assert not at_q["significant"] and at_q["verdict"] == NO_SHIFT  # significant means q < α, strictly
    th = VerdictThresholds(consistency=float(r["frac_pos"]))
    at_fraction = layer_table(planted, thresholds=th).set_index("layer").loc[5]
    assert at_fraction["verdict"] == VULNERABLE  # a fraction equal to the consistency is enough


def test_effects_table_passes_its_settings_on() -> None:
    result = ScanResult(
        {
            "benign": make_set("benign", 20),
            "control": make_set("control", 21, blocks={2: 0.6}, maps={2: UP}),
            "jailbreak": make_set("jailbreak", 22, blocks={2: 0.6, 5: 0.6}, maps={2: UP, 5: UP}),
        }
    )
    th = VerdictThresholds(alpha=0.2, consistency=0.6, tol=0.05)
    kw = {"n_permutations": 60, "n_bootstrap": 40, "seed": 3, "thresholds": th}
    table = effects_table(result, **kw)
    assert table is not None
    for name, (a, b) in (("wrapper", ("control", "benign")), ("request", ("jailbreak", "control"))):
        alone = layer_table(result, a=a, b=b, **kw)
        assert table.attrs[name] == alone.attrs
        for column in ("p_signed", "ci_low", "frac_pos", "verdict"):
            assert table[f"{name}_{column}"].tolist() == alone[column].tolist(), (name, column)
    assert table.attrs["request"]["alpha"] == 0.2 and table.attrs["request"]["n_permutations"] == 60
    default = effects_table(result)
    assert default is not None
    assert default.attrs["wrapper"]["n_permutations"] == 1000 and default.attrs["wrapper"]["seed"] == 0
    assert default.attrs["wrapper"]["n_bootstrap"] == 1000


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("alpha", 0.0, r"alpha must lie in \(0, 1\), got 0.0"),
        ("alpha", 1.0, r"alpha must lie in \(0, 1\), got 1.0"),
        ("consistency", 0.0, r"consistency must lie in \(0, 1\], got 0.0"),
        ("consistency", 1.01, r"consistency must lie in \(0, 1\], got 1.01"),
        ("tol", -0.01, r"the cell tolerance must be >= 0 nats, got -0.01"),
    ],
)
def test_thresholds_refuse_values_outside_their_range(field: str, value: float, message: str) -> None:
    with pytest.raises(AttnscanError, match=message):
        VerdictThresholds(**{field: value})


def test_thresholds_accept_their_closed_ends() -> None:
    assert VerdictThresholds(consistency=1.0, tol=0.0).consistency == 1.0


def test_set_checks_name_the_problem(ragged: ScanResult) -> None:
    with pytest.raises(AttnscanError, match=r"needs prompt set 'control', but this result has only jailbreak, benign"):
        layer_table(ragged, a="control")
    small = ScanResult({"jailbreak": ragged_set("jailbreak", [3], 1), "benign": ragged_set("benign", [4, 5], 2)})
    with pytest.raises(AttnscanError, match=r"set 'jailbreak' has 1 prompt: the statistics"):
        layer_table(small)
    empty = ScanResult({"jailbreak": ragged_set("jailbreak", [], 1), "benign": ragged_set("benign", [4, 5], 2)})
    with pytest.raises(AttnscanError, match=r"set 'jailbreak' has 0 prompts: the statistics"):
        layer_table(empty)
    other = ragged_set("benign", [4, 5], 2)
    other.blocks = other.blocks[:, :, :1, :1]
    with pytest.raises(AttnscanError, match=r"different block counts \(2 vs 1\): scan both with the same"):
        layer_table(ScanResult({"jailbreak": ragged_set("jailbreak", [3, 4], 1), "benign": other}))


def test_alpha_overrides_only_the_level(planted: ScanResult) -> None:
    th = VerdictThresholds(alpha=0.01, consistency=0.95, tol=0.3)
    table = layer_table(planted, alpha=0.2, thresholds=th, n_permutations=50, n_bootstrap=20)
    assert table.attrs["thresholds"] == {"alpha": 0.2, "consistency": 0.95, "tol": 0.3}
    assert table.attrs["alpha"] == 0.2


def test_ranks_put_the_largest_effect_first_and_share_ties(planted_table: pd.DataFrame) -> None:
    table = planted_table.copy()
    table["significant"] = True
    table["effect"] = [0.5, -2.0, 1.0, 2.0]  # layers 0, 2, 5, 7
    ranked = _ranked(table)
    assert ranked["rank"].tolist() == [4.0, 1.0, 3.0, 1.0]
    assert list(ranked.columns[-2:]) == ["rank", "verdict"]


def test_counts_per_set(ragged: ScanResult) -> None:
    table = layer_table(ragged, n_permutations=20, n_bootstrap=20)
    assert (table["n_a"] == 3).all() and (table["n_b"] == 3).all()
    swapped = layer_table(
        ScanResult({"jailbreak": ragged_set("jailbreak", [7, 4], 1), "benign": ragged_set("benign", [5, 5, 2], 2)}),
        n_permutations=10,
        n_bootstrap=10,
    )
    assert (swapped["n_a"] == 2).all() and (swapped["n_b"] == 3).all()


def test_split_effects_gives_back_the_two_tables() -> None:
    result = ScanResult(
        {
            "benign": make_set("benign", 20),
            "control": make_set("control", 21, blocks={2: 0.6}),
            "jailbreak": make_set("jailbreak", 22, blocks={2: 0.6, 5: 0.6}),
        }
    )
    effects = effects_table(result, n_permutations=40, n_bootstrap=20)
    assert effects is not None
    parts = split_effects(effects)
    assert set(parts) == {"request", "wrapper"}
    request = layer_table(result, a="jailbreak", b="control", n_permutations=40, n_bootstrap=20)
    pd.testing.assert_frame_equal(parts["request"].reset_index(drop=True), request, check_like=True)
    assert parts["wrapper"].attrs["a"] == "control" and parts["wrapper"].attrs["b"] == "benign"
    # a saved effects.csv loses attrs: the comparison's set names are filled in
    reread = effects.copy()
    reread.attrs = {}
    again = split_effects(reread)
    assert (again["request"].attrs["a"], again["request"].attrs["b"]) == ("jailbreak", "control")
    assert again["request"]["verdict"].tolist() == request["verdict"].tolist()
    with pytest.raises(AttnscanError, match=r"needs 'layer' and 'request_\*' columns"):
        split_effects(effects.drop(columns=[c for c in effects.columns if c.startswith("request_")]))
    with pytest.raises(AttnscanError, match=r"needs 'layer' and 'request_\*' columns"):
        split_effects(effects.drop(columns=["layer"]))


def test_jsd_renormalises_rows_over_the_keys_both_sets_reach(ragged: ScanResult) -> None:
    """With relative alignment a row's reach depends on the prompt length: here set b misses two keys of row 4 and
    one of row 6, so those rows are renormalised over the remaining keys before the divergence is taken."""
    a = ragged.sets["jailbreak"]
    b = ragged_set("benign", [7, 7, 2], 2)
    for i, j in ((4, 1), (4, 2), (6, 0)):
        b.count[i, j] = 0
        b.sums[:, i, j] = 0.0
    table = layer_table(ScanResult({"jailbreak": a, "benign": b}), n_permutations=10, n_bootstrap=10)
    for li in range(len(LAYERS)):
        jsds = []
        for i in range(T):
            keys = [j for j in range(i + 1) if a.count[i, j] > 0 and b.count[i, j] > 0]
            if len(keys) >= 2:
                pa = [float(a.sums[li, i, j] / a.count[i, j]) for j in keys]
                pb = [float(b.sums[li, i, j] / b.count[i, j]) for j in keys]
                jsds.append(jensenshannon(pa, pb) ** 2)
        assert table["jsd"].iloc[li] == pytest.approx(np.mean(jsds), rel=1e-9)
        assert table["cells"].iloc[li] == sum(1 for i in range(T) for j in range(i + 1) if b.count[i, j] > 0)


def test_effects_table_alpha_and_saved_attrs() -> None:
    result = ScanResult(
        {
            "benign": make_set("benign", 20),
            "control": make_set("control", 21, blocks={2: 0.6}),
            "jailbreak": make_set("jailbreak", 22, blocks={2: 0.6, 5: 0.6}),
        }
    )
    effects = effects_table(result, n_permutations=30, n_bootstrap=10, alpha=0.3, seed=4)
    assert effects is not None
    assert effects.attrs["wrapper"]["alpha"] == 0.3 and effects.attrs["request"]["alpha"] == 0.3
    parts = split_effects(effects)
    assert parts["request"].attrs["alpha"] == 0.3 and parts["request"].attrs["seed"] == 4
    # the permutations follow the seed (20 + 30 prompts: drawn, not enumerated)
    other = layer_table(result, a="jailbreak", b="control", n_permutations=30, n_bootstrap=10, seed=5)
    assert not np.array_equal(parts["request"]["p_signed"].to_numpy(), other["p_signed"].to_numpy())
