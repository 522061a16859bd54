"""Fixtures shared by the detect tests: synthetic features, and the tiny Llama the input and job tests run."""

from __future__ import annotations

import numpy as np
import pytest
from planted import make_features

from attnscan.models.loading import LoadedModel, from_model
from attnscan.testing.tiny import build_model, tiny_tokenizer


@pytest.fixture(scope="module")
def features() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray]:
    return make_features()


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return from_model(build_model("llama"), tiny_tokenizer(), spec="tiny-llama")
