"""Fixtures of the analysis tests: scan results with a planted shift and without one."""

from __future__ import annotations

import pandas as pd
import pytest
from planted_scans import UP, make_set

from attnscan import ScanResult
from attnscan.analysis.statistics import layer_table


@pytest.fixture(scope="module")
def planted() -> ScanResult:
    """Only layer 5 shifts: jailbreak blocks +0.5 and 85 % of its map cells raised by 0.5 nats."""
    return ScanResult(
        {
            "benign": make_set("benign", 1),
            "jailbreak": make_set("jailbreak", 2, blocks={5: 0.5}, maps={5: UP}, sink=0.25, entropy=1.7),
        }
    )


@pytest.fixture(scope="module")
def planted_table(planted: ScanResult) -> pd.DataFrame:
    return layer_table(planted)


@pytest.fixture(scope="module")
def null() -> ScanResult:
    return ScanResult({"benign": make_set("benign", 3), "jailbreak": make_set("jailbreak", 4)})
