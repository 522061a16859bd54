"""Readable model labels from model specs."""

from __future__ import annotations

import pytest

from attnscan.views.labels import model_label, unique_label


@pytest.mark.parametrize(
    ("spec", "label"),
    [
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
        ("meta-llama/Llama-3.1-8B", "Llama-3.1-8B"),
        ("/models/mistral-7b/", "mistral-7b"),
        ("/data/gguf/tiny-model.Q8_0.gguf", "tiny-model.Q8_0"),
        ("C:\\models\\gpt-j", "gpt-j"),
        ("", "model"),
    ],
)
def test_model_label(spec: str, label: str) -> None:
    assert model_label(spec) == label


def test_unique_label_numbers_repeats() -> None:
    assert unique_label("meta-llama/Llama-3.1-8B", set()) == "Llama-3.1-8B"
    assert unique_label("other/Llama-3.1-8B", {"Llama-3.1-8B"}) == "Llama-3.1-8B-2"
    assert unique_label("x/Llama-3.1-8B", {"Llama-3.1-8B": 0, "Llama-3.1-8B-2": 1}) == "Llama-3.1-8B-3"
    assert unique_label("", []) == "model"
