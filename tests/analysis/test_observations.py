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


def _control_scan() -> ScanResult:
    """The wrapper shifts layer 2 (control and jailbreak both have it); the harmful request adds layer 5."""
    from planted_scans import UP

    return ScanResult(
        {
            "benign": make_set("benign", 20),
            "control": make_set("control", 21, blocks={2: 0.6}, maps={2: UP}),
            "jailbreak": make_set("jailbreak", 22, blocks={2: 0.6, 5: 0.6}, maps={2: UP, 5: UP}),
        }
    )


def test_with_a_control_set_the_request_effect_comes_first() -> None:
    from attnscan.analysis.statistics import effects_table

    result = _control_scan()
    table = layer_table(result, n_permutations=500, n_bootstrap=100)
    notes = observations(table, result, model_name="tiny-model")
    request, wrapper, combined = notes[0], notes[1], notes[2]
    assert request.startswith("In tiny-model, request effect (jailbreak vs control prompts")
    assert "1 of 4 layers shift significantly" in request and "is layer 5 (" in request
    assert "(by standardized effect size, the largest |effect| among the significant layers)" in request
    assert wrapper.startswith("Wrapper effect (control vs benign prompts")
    assert "1 of 4 layers shift significantly" in wrapper and "is layer 2 (" in wrapper
    assert combined.startswith("Combined effect (jailbreak vs benign prompts: wrapper, prompt length and request")
    assert "2 of 4 layers show a significant shift" in combined
    assert not any("Without a control set" in s for s in notes)
    # Given effects are used as they are (here with other seeds): the same sentences' structure, from them.
    effects = effects_table(result, n_permutations=300, n_bootstrap=50, seed=3)
    assert observations(table, result, effects=effects)[0].startswith("Request effect")
    # Without the scan, and without effects, there is no control set to lead with.
    assert observations(table)[0].startswith("2 of 4 layers show a significant shift between jailbreak and benign")


def test_without_a_control_set_the_mixture_is_said_plainly(planted: ScanResult, planted_table: pd.DataFrame) -> None:
    from dataclasses import replace

    notes = observations(planted_table, planted)
    mixes = [s for s in notes if s.startswith("Without a control set")]
    assert len(mixes) == 1 and "the jailbreak wrapper, the prompt length and the request" in mixes[0]
    assert "--control builtin:control" in mixes[0] and "--match-length" in mixes[0]
    record = {"pairs": 30, "max_pair_difference": 1, "mean_pair_difference": 0.4, "sets": {}}
    matched = replace(planted, manifest={**planted.manifest, "length_matching": record})
    notes = observations(planted_table, matched)
    mixes = [s for s in notes if s.startswith("Without a control set")]
    assert len(mixes) == 1 and "the prompt length and" not in mixes[0] and "lengths were matched" in mixes[0]
    assert any(s.startswith("Prompts were paired by token length (--match-length)") for s in notes)
    assert not any("Without a control set" in s for s in observations(planted_table))  # no scan: nothing known


def test_observations_say_which_measure_the_layer_profile_draws(
    planted: ScanResult, planted_table: pd.DataFrame
) -> None:
    """The top layer is chosen by standardized effect size; the layer profile draws the signed block shift. When the
    two measures pick different layers the observations name both; when they agree they say so."""
    notes = observations(planted_table, planted)
    assert "Layer 5 also has the largest |signed block shift|" in " ".join(notes)
    # Layer 7 gets the largest signed shift (but a small effect): the profile's peak is named beside layer 5.
    other = planted_table.copy()
    other.loc[other["layer"] == 7, "signed_shift"] = -2.5
    other.attrs.update(planted_table.attrs)
    notes = observations(other, planted)
    assert notes[1].startswith("Layer 5 shifts most (by standardized effect size")
    profile = [s for s in notes if s.startswith("The layer profile draws the signed block shift")]
    assert len(profile) == 1 and "largest magnitude is at layer 7 (-2.50 nats" in profile[0]
    assert "layer 5 leads by standardized effect size" in profile[0]
