"""The synthetic features shared by the detector, metric and store tests."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_features import make_features


@pytest.fixture(scope="module")
def features() -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray]:
    return make_features()
