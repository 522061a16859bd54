"""Choosing layers from other outputs: ranking per-layer tables."""

from __future__ import annotations

import pandas as pd
import pytest

from attnscan.behaviour.layers import layer_order
from attnscan.errors import AttnscanError


def test_layer_order() -> None:
    table = pd.DataFrame({"layer": [0, 1, 2, 3], "cp_auroc": [0.6, 0.9, float("nan"), 0.9]})
    assert layer_order(table, "cp_auroc") == [1, 3, 0, 2]
    assert layer_order(table, "cp_auroc", descending=False) == [0, 1, 3, 2]
    with pytest.raises(AttnscanError, match="no column 'nope'"):
        layer_order(table, "nope")
