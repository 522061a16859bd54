"""The sentences on detection results shared by the terminal, the report and ``attnscan run``."""

from __future__ import annotations

from typing import Any

import pandas as pd

from attnscan.detect.store import TrainedDetector
from attnscan.detect.summary import (
    baseline_sentence,
    detection_note,
    families_sentence,
    margin_sentence,
    stability_sentence,
)


def test_margin_sentence_says_beats_only_when_the_interval_is_above_zero() -> None:
    beats = margin_sentence("cp", 0.08, 0.02, 0.15, where="at layer 4")
    assert beats == "The CP detector at layer 4 beats the text baseline by +0.080 AUROC (95% CI +0.020 to +0.150)."
    close = margin_sentence("probe", 0.05, -0.01, 0.12)
    assert close.startswith("The probe detector does not beat the text baseline: difference +0.050 AUROC")
    assert "no evidence" in close
    assert "no verdict" in margin_sentence("cp", 0.05, float("nan"), float("nan"))
    assert "has no text baseline" in margin_sentence("cp", None, None, None)


def test_baseline_and_stability_sentences() -> None:
    record = {"length_auroc": 0.91, "text_auroc": 0.87, "text_auroc_low": 0.8, "text_auroc_high": 0.93}
    assert baseline_sentence(record) == (
        "Baseline AUROCs on the same folds: prompt length alone 0.910, a TF-IDF text classifier 0.870 "
        "(95% CI 0.800 to 0.930)."
    )
    assert "text classifier" not in baseline_sentence({"length_auroc": 0.6, "text_auroc": None})
    stable = {"spearman_mean": 0.95, "spearman_min": 0.9, "resamples": 5, "resampled": "groups"}
    assert stability_sentence(stable) == (
        "Stability: 5 refits on resampled training groups rank held-out prompts alike (mean Spearman correlation "
        "0.95, lowest pair 0.90)."
    )
    assert "differently" in str(stability_sentence({**stable, "spearman_mean": 0.4}))
    assert stability_sentence(None) is None and stability_sentence({**stable, "spearman_mean": None}) is None


def _rows() -> list[dict[str, Any]]:
    def row(role: str, subset: str, n: int, k: int) -> dict[str, Any]:
        return {"role": role, "subset": subset, "n": n, "flagged": k, "rate": k / n, "rate_low": 0.0, "rate_high": 1.0}

    return [
        row("jailbreak", "all", 20, 10),
        row("jailbreak", "family=a", 10, 9),
        row("jailbreak", "family=b", 10, 1),
        row("benign", "all", 20, 3),
        row("benign", "looks_risky", 5, 3),
        row("benign", "other", 15, 0),
    ]


def test_families_sentence_names_the_spread_and_the_risky_benign_prompts() -> None:
    text = families_sentence(_rows(), 0.73)
    assert text is not None and text.startswith("At the operating point (threshold 0.73), the TPR ranges over 2")
    assert "0.10 [0.00-1.00] (1/10) for family=b to 0.90 [0.00-1.00] (9/10) for family=a" in text
    assert "look risky are flagged at FPR 0.60 [0.00-1.00] (3/5), the other benign prompts at 0.00" in text
    assert families_sentence(_rows()[:1] + _rows()[3:4]) is None


def test_detection_note_carries_the_margin_families_and_stability() -> None:
    table = pd.DataFrame(
        {
            "layer": [0, 1],
            "cp_auroc": [0.7, 0.9],
            "cp_auroc_low": [0.6, 0.8],
            "cp_auroc_high": [0.8, 0.95],
            "probe_auroc": [0.7, 0.85],
            "flagged": [False, True],
            "length_auroc": [0.9, 0.9],
            "text_auroc": [0.8, 0.8],
            "text_auroc_low": [0.7, 0.7],
            "text_auroc_high": [0.9, 0.9],
            "text_margin": [-0.1, 0.1],
            "text_margin_low": [-0.2, 0.03],
            "text_margin_high": [0.0, 0.17],
        }
    )
    meta = {
        "best_layer": 1,
        "flagged_layers": [1],
        "families": {"threshold": 0.6, "rows": _rows()},
        "stability": {"spearman_mean": 0.8, "spearman_min": 0.7, "resamples": 5, "resampled": "prompts"},
    }
    note = detection_note(TrainedDetector(table, {}, {}, meta), with_control=True)
    assert "best at layer 1 (cross-validated AUROC 0.900" in note
    assert "The CP detector at layer 1 beats the text baseline by +0.100 AUROC (95% CI +0.030 to +0.170)." in note
    assert "for family=b" in note and "look risky" in note and "fairly alike" in note
    assert "Without a control set" not in note


def test_detection_note_leads_with_the_primary_detector() -> None:
    table = pd.DataFrame(
        {
            "layer": [0, 1],
            "cp_auroc": [0.7, 0.6],
            "cp_auroc_low": [0.6, 0.5],
            "cp_auroc_high": [0.8, 0.7],
            "probe_auroc": [0.8, 0.95],
            "probe_auroc_low": [0.7, 0.9],
            "probe_auroc_high": [0.9, 0.99],
            "flagged": [False, True],
        }
    )
    meta = {"best_layer": 1, "flagged_layers": [1], "primary": "probe"}
    note = detection_note(TrainedDetector(table, {}, {}, meta), with_control=True)
    assert "the pooled-state probe (the primary detector) is best at layer 1 (cross-validated AUROC 0.950" in note
    assert "the CP detector 0.600 there" in note
