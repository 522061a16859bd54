"""Length matching (--match-length): the pairing itself, its record, and a scan where length is the only difference."""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

import attnscan
from attnscan import AttnscanError
from attnscan.analysis.lengths import caliper, match_lengths
from attnscan.analysis.statistics import layer_table
from attnscan.testing.tiny import build_model, tiny_tokenizer


def _best(anchor: Sequence[int], other: Sequence[int], tolerance: float) -> tuple[int, int]:
    """Brute force: the most caliper pairs between two small sets, then the least total length difference, as
    ``(pairs, total difference)``."""
    best = (0, 0)
    for k in range(1, min(len(anchor), len(other)) + 1):
        for chosen in itertools.combinations(range(len(anchor)), k):
            for partners in itertools.permutations(range(len(other)), k):
                diffs = [abs(other[j] - anchor[i]) for i, j in zip(chosen, partners, strict=True)]
                if all(d <= caliper(anchor[i], tolerance) for i, d in zip(chosen, diffs, strict=True)):
                    best = max(best, (k, -sum(diffs)))
    return best[0], -best[1]


@pytest.mark.parametrize("seed", range(20))
def test_two_sets_get_the_most_pairs_then_the_least_difference(seed: int) -> None:
    """Against brute force over every one-to-one pairing of small sets (lengths drawn so that most draws pair some
    prompts and a few pair fewer than two)."""
    rng = random.Random(seed)
    jail = [rng.randint(8, 30) for _ in range(rng.randint(2, 6))]
    benign = [rng.randint(2, 26) for _ in range(rng.randint(2, 6))]
    n_best, diff_best = _best(jail, benign, 0.2)
    if n_best < 2:
        with pytest.raises(AttnscanError, match="--match-length found"):
            match_lengths({"benign": benign, "jailbreak": jail}, 0.2)
        return
    match = match_lengths({"benign": benign, "jailbreak": jail}, 0.2)
    assert match.order == ("jailbreak", "benign")
    assert len(match.pairs) == n_best
    assert sum(match.pair_differences()) == diff_best
    assert len({p[0] for p in match.pairs}) == len({p[1] for p in match.pairs}) == n_best  # one to one


def test_matched_sets_have_matching_length_distributions() -> None:
    """Sets of very different lengths: after matching, every pair is within its caliper, the kept sets are equally
    large, and their sorted lengths (so every quantile) differ by at most the largest caliper."""
    rng = np.random.default_rng(0)
    benign = rng.integers(10, 120, size=200).tolist()
    jail = rng.integers(60, 400, size=150).tolist()
    control = (np.array(jail) + rng.integers(-15, 16, size=150)).tolist()
    tolerance = 0.1
    match = match_lengths({"benign": benign, "jailbreak": jail, "control": control}, tolerance)
    kept = match.kept
    assert match.order == ("jailbreak", "benign", "control")
    assert len(kept["benign"]) == len(kept["jailbreak"]) == len(kept["control"]) == len(match.pairs) >= 20
    for j, b, c in match.pairs:
        assert abs(benign[b] - jail[j]) <= caliper(jail[j], tolerance)
        assert abs(control[c] - jail[j]) <= caliper(jail[j], tolerance)
    widest = max(caliper(jail[j], tolerance) for j, _, _ in match.pairs)
    sorted_jail = np.sort([jail[i] for i in kept["jailbreak"]])
    for name, lengths in (("benign", benign), ("control", control)):
        gap = np.abs(np.sort([lengths[i] for i in kept[name]]) - sorted_jail)
        assert gap.max() <= widest
    before_gap = abs(np.mean(jail) - np.mean(benign))
    after_gap = abs(np.mean([jail[i] for i in kept["jailbreak"]]) - np.mean([benign[i] for i in kept["benign"]]))
    assert before_gap > 100 and after_gap < 0.05 * np.mean(sorted_jail)
    record = match.record()
    assert record["pairs"] == len(match.pairs) and record["tolerance"] == tolerance
    assert record["sets"]["benign"]["of"] == 200 and record["sets"]["benign"]["kept"] == len(match.pairs)
    assert record["sets"]["jailbreak"]["before"]["max"] == max(jail)
    assert record["sets"]["jailbreak"]["after"]["max"] == max(jail[i] for i in kept["jailbreak"])
    assert record["max_pair_difference"] == max(match.pair_differences()) <= widest
    assert record["pair_order"] == ["jailbreak", "benign", "control"]


def test_matching_that_keeps_too_little_warns_and_none_is_an_error() -> None:
    # Every jailbreak prompt was cut to T = 448 and every benign prompt is far shorter: nothing can pair.
    with pytest.raises(
        AttnscanError,
        match=r"found 0 pairs .*jailbreak 448, benign 20–90; 5 jailbreak prompts were cut to the grid length 448",
    ):
        match_lengths({"benign": [20, 40, 90], "jailbreak": [448] * 5}, 0.1, truncated={"jailbreak": 5}, grid=448)
    match = match_lengths({"benign": [20, 40, 90, 300, 310], "jailbreak": [300, 310, 448, 448, 448, 448]}, 0.1)
    assert len(match.pairs) == 2
    note = match.warning()
    assert note is not None and "kept 2 of 6 jailbreak, 2 of 5 benign prompts" in note
    assert match_lengths({"benign": [10, 20, 30], "jailbreak": [11, 19, 31]}, 0.1).warning() is None
    with pytest.raises(AttnscanError, match="--match-tolerance must lie in"):
        match_lengths({"benign": [10, 20], "jailbreak": [10, 20]}, 1.5)
    with pytest.raises(AttnscanError, match="needs a 'benign' set"):
        match_lengths({"jailbreak": [10, 20], "control": [10, 20]}, 0.1)


WORDS = "how do i make bread recipe poem about snow story tell me python write explain what is the a".split()  # noqa: SIM905


def test_a_shift_made_by_length_alone_vanishes_with_matching() -> None:
    """The two sets share eight prompts (lengths 4 words apart); benign adds eight short ones, jailbreak eight long
    ones, all from the same words, so length is the only difference. Unmatched, the scan finds a significant shift;
    matched (caliper under 4 tokens) only the shared prompts pair, each with itself, and the shift is exactly 0."""
    rng = random.Random(5)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    middle = [text(12 + 4 * i) for i in range(8)]
    short = [text(1 + i % 6) for i in range(8)]
    long = [text(46 + i) for i in range(8)]
    benign, jailbreak = short[:4] + middle + short[4:], long[:4] + middle + long[4:]
    loaded = attnscan.from_model(build_model("llama"), tiny_tokenizer(), spec="tiny")
    tables = {}
    results = {}
    for matched in (False, True):
        with warnings.catch_warnings():  # small sets and short prompts are the point here
            warnings.simplefilter("ignore")
            results[matched] = attnscan.scan(
                loaded, benign, jailbreak, length=64, align="relative", match_length=matched, match_tolerance=0.05
            )
        tables[matched] = layer_table(results[matched], n_permutations=500, n_bootstrap=100)
    assert (tables[False][["q_signed", "q_abs"]].min(axis=1) < 0.05).all()
    assert (tables[False]["abs_shift"] > 0.05).all()
    shared = list(range(4, 12))
    for name in ("benign", "jailbreak"):
        assert results[True].sets[name].prompt_ids.tolist() == shared
    assert tables[True]["signed_shift"].abs().max() < 1e-9 and tables[True]["abs_shift"].abs().max() < 1e-9
    assert tables[True]["mean_abs_diff"].max() < 1e-9
    record = results[True].manifest["length_matching"]
    assert record["pairs"] == 8 and record["max_pair_difference"] == 0
    assert record["sets"]["benign"]["of"] == 16 and record["sets"]["benign"]["kept"] == 8
    assert "length_matching" not in results[False].manifest
    # The manifest's prompt sets describe the whole sets, their token lengths the prompts scanned.
    sets = results[True].manifest["prompt_sets"]
    assert sets["benign"]["count"] == 16 and sets["benign"]["tokens_max"] == sets["jailbreak"]["tokens_max"]


def test_a_resume_keeps_the_matched_prompts(tmp_path: Path) -> None:
    """The checkpoint of a length-matched scan records which prompts it keeps: resuming without matching (other
    prompts) is refused, resuming with it continues to the same result."""
    loaded = attnscan.from_model(build_model("llama"), tiny_tokenizer(), spec="tiny")
    benign = [" ".join(WORDS[: 2 + i]) for i in range(8)]
    jailbreak = [" ".join(WORDS[: 6 + i]) for i in range(8)]
    options = {"length": 24, "layers": "0", "match_length": True, "match_tolerance": 0.2, "checkpoint": tmp_path}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = attnscan.scan(loaded, benign, jailbreak, **options)
        again = attnscan.scan(loaded, benign, jailbreak, **options, resume=True)
        with pytest.raises(AttnscanError, match=r"different settings \(length_matching\)"):
            attnscan.scan(loaded, benign, jailbreak, **{**options, "match_length": False}, resume=True)
    assert 2 <= first.sets["benign"].n_prompts < len(benign)
    for name in ("benign", "jailbreak"):
        assert torch.equal(first.sets[name].prompt_ids, again.sets[name].prompt_ids)
        assert torch.equal(first.sets[name].sums, again.sets[name].sums)
