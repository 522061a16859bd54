"""Similarity of answers: chrF and bag-of-words F1."""

from __future__ import annotations

import pytest

from attnscan.behaviour.similarity import chrf, token_f1

# --------------------------------------------------------------------------------------------------- similarity


def test_similarity_measures() -> None:
    assert chrf("the same answer", "the same answer") == 1.0
    assert chrf("abc", "xyz") == 0.0
    assert chrf("", "") == 1.0 and chrf("", "x") == 0.0
    assert 0.0 < chrf("bread with flour", "bread with water") < 1.0
    assert chrf("a b", "ab") == 1.0  # white space is ignored
    assert token_f1("The cat sat", "the cat ran") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("a", "") == 0.0 and token_f1("a", "b") == 0.0
