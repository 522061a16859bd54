"""The observations written from a layer table: counts, the top layer and its measure, key ranges, alignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from planted_scans import CAUSAL, T, make_set

from attnscan import AttnscanError, ScanResult
from attnscan.analysis.observations import alignment_note, observations
from attnscan.analysis.statistics import NO_SHIFT, layer_table


def test_observations_name_the_top_layer(planted: ScanResult, planted_table: pd.DataFrame) -> None:
    notes = observations(planted_table, planted, model_name="tiny-model")
    assert notes[0].startswith("In tiny-model, 1 of 4 layers show a significant shift")
    assert "1 vulnerable" in notes[0]
    assert notes[1].startswith("Layer 5 shifts most (by standardized effect size, the largest |effect| among the ")
    assert "and is vulnerable: jailbreak prompts attend more than benign" in notes[1]
    assert "proxy for, not a measurement of, jailbreak success" in notes[-1]


def test_observations_locate_the_key_range() -> None:
    late = np.where(CAUSAL & (np.arange(T)[None, :] >= 11), 0.8, 0.0)
    late[:, 0] = np.where(CAUSAL[:, 0], -0.3, 0.0)  # and less attention on the first token
    result = ScanResult(
        {
            "benign": make_set("benign", 30),
            "jailbreak": make_set("jailbreak", 31, blocks={7: 0.6}, maps={7: late}),
        }
    )
    table = layer_table(result, n_permutations=300, n_bootstrap=100)
    notes = observations(table, result)
    where = [s for s in notes if "by key position" in s]
    assert len(where) == 1 and where[0].startswith("At layer 7")
    assert "the increase is largest on late keys (positions 11–15)" in where[0]
    assert "the decrease on the first token (sink)" in where[0]


def test_observations_claim_nothing_when_nothing_is_significant(null: ScanResult) -> None:
    table = layer_table(null, n_permutations=300, n_bootstrap=100)
    notes = observations(table, null)
    assert notes[0].startswith("No layer shows a significant shift")
    text = " ".join(notes).lower()
    for word in ("vulnerable", "resilient", "mixed"):
        assert word not in text
    assert "is not significant" in notes[1]
    assert "(by standardized effect size, the largest |effect|)" in notes[1]
    assert "proxy" in notes[-1]


def test_alignment_note_says_what_positions_mean(planted: ScanResult) -> None:
    from dataclasses import replace

    def with_sets(alignment: str, benign_max: int, jail_max: int) -> ScanResult:
        sets = {
            "benign": {"tokens_mean": benign_max * 0.8, "tokens_max": benign_max},
            "jailbreak": {"tokens_mean": jail_max * 0.8, "tokens_max": jail_max},
        }
        return replace(planted, manifest={**planted.manifest, "alignment": alignment, "prompt_sets": sets})

    t = planted.length
    short = alignment_note(with_sets("absolute", t // 8, t))
    assert short is not None and f"covers only the first {t // 8} positions" in short and "--align relative" in short
    assert alignment_note(with_sets("absolute", t, t)) is None  # both sets fill the grid: nothing to say
    rel = alignment_note(with_sets("relative", t // 8, t))
    assert rel is not None and rel.startswith("Relative alignment") and f"{t}-position grid" in rel
    assert alignment_note(replace(planted, manifest={})) is None
    # The observations carry the note when the result is given.
    table = layer_table(with_sets("absolute", t // 8, t), n_permutations=200, n_bootstrap=200)
    assert short in observations(table, with_sets("absolute", t // 8, t))


def test_observations_name_the_measure_the_top_layer_was_chosen_by(
    planted: ScanResult, planted_table: pd.DataFrame, null: ScanResult
) -> None:
    """The top layer is the largest |effect| (among significant layers when there are any); without an effect it is
    the largest mean absolute log difference. Each sentence says which, and the choice itself is unchanged."""
    ranked = observations(planted_table, planted)[1]
    assert ranked.startswith("Layer 5 shifts most (by standardized effect size, the largest |effect| among the")
    table = layer_table(null, n_permutations=300, n_bootstrap=100)
    by_effect = int(table.loc[table["effect"].abs().idxmax(), "layer"])
    assert f"at layer {by_effect} (by standardized effect size, the largest |effect|)" in observations(table)[1]
    # No layer has an effect (e.g. no spread within the sets): the mean absolute log difference decides.
    flat = planted_table.assign(effect=np.nan, verdict=NO_SHIFT, rank=np.nan)
    flat.attrs.update(planted_table.attrs)
    by_map = int(flat.loc[flat["mean_abs_diff"].idxmax(), "layer"])
    assert by_map == 5
    sentence = observations(flat)[1]
    assert sentence.startswith(f"The largest difference, at layer {by_map} (by mean absolute log difference; ")


def test_observations_refuse_a_table_that_is_not_from_layer_table() -> None:
    with pytest.raises(AttnscanError, match="layer_table"):
        observations(pd.DataFrame({"x": [1]}))
