"""Fixtures of the view tests."""

from __future__ import annotations

from typing import Any

import pytest
from report_data import make_inputs


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    """Keyword arguments of build_report for one planted scan (see report_data.make_inputs)."""
    return make_inputs()
