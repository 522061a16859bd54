"""The report's text helpers, one by one, against hand-worked strings and a brute-force axis-step reference
(the report tests reach them only through whole pages, where a changed digit or sign went unnoticed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnscan.views.formatting import VERDICT_ORDER, caption, esc, finite, format_value, nice_step, verdict_class


def test_esc_escapes_text_and_attribute_quotes() -> None:
    assert esc("<a href=\"x\" title='y'>&</a>") == "&lt;a href=&quot;x&quot; title=&#x27;y&#x27;&gt;&amp;&lt;/a&gt;"
    assert esc(3) == "3" and esc(None) == "None"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.5, 1.5), ("2.25", 2.25), (np.float32(0.5), 0.5), (7, 7.0), (True, 1.0), (-0.0, 0.0)],
)
def test_finite_numbers(value: object, expected: float) -> None:
    assert finite(value) == expected and isinstance(finite(value), float)


@pytest.mark.parametrize("value", [None, "abc", "", [1.0], float("nan"), float("inf"), -math.inf, np.nan])
def test_finite_refuses_non_numbers_and_non_finite(value: object) -> None:
    assert finite(value) is None


def _reference_step(span: float, target: int) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^e (any integer e) that is at least span / target, by enumeration."""
    raw = span / max(target, 1)
    candidates = [m * 10.0**e for e in range(-12, 13) for m in (1.0, 2.0, 2.5, 5.0)]
    return min(c for c in candidates if c >= raw * (1 - 1e-12))


@pytest.mark.parametrize(
    ("span", "target", "expected"),
    [
        (10, 5, 2.0),  # raw 2 exactly: 2, not the next step up
        (5, 1, 5.0),  # raw 5 exactly
        (1, 1, 1.0),  # raw 1 exactly
        (7, 5, 2.0),  # raw 1.4
        (11, 5, 2.5),  # raw 2.2
        (4, 1, 5.0),  # raw 4
        (8, 1, 10.0),  # raw 8: past 5, up to the next power of ten
        (0.3, 4, 0.1),  # raw 0.075
        (0.3, 12, 0.025),  # raw 0.025 exactly
        (1234, 10, 200.0),  # raw 123.4
        (10, 0, 10.0),  # a target below 1 counts as 1
        (10, -3, 10.0),
    ],
)
def test_nice_step_hand_worked(span: float, target: int, expected: float) -> None:
    assert nice_step(span, target) == pytest.approx(expected, rel=1e-12)


def test_nice_step_matches_an_enumerated_reference() -> None:
    rng = np.random.default_rng(0)
    for span, target in zip(10.0 ** rng.uniform(-6, 6, 300), rng.integers(1, 12, 300), strict=True):
        assert nice_step(float(span), int(target)) == pytest.approx(_reference_step(float(span), int(target)))


@pytest.mark.parametrize("span", [0.0, -5.0, float("nan"), float("inf")])
def test_nice_step_falls_back_to_one(span: float) -> None:
    assert nice_step(span, 5) == 1.0


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        ("vulnerable", "verdict", "vulnerable"),
        (None, "verdict", "None"),
        (3.7, "int", "3"),
        (-2.9, "int", "-2"),
        (0.1234, "signed", "+0.123"),
        (-0.1236, "signed", "\u22120.124"),  # a real minus sign
        (0.0, "signed", "+0.000"),
        (0.012345, "q", "0.012"),
        (3e-7, "q", "3e-07"),
        (0.256, "pct", "26%"),
        (1.0, "pct", "100%"),
        (0.5, "fixed4", "0.5000"),
        (2, "anything else", "2.0000"),
        ("0.25", "fixed4", "0.2500"),
    ],
)
def test_format_value(value: object, kind: str, expected: str) -> None:
    assert format_value(value, kind) == expected


@pytest.mark.parametrize("kind", ["int", "signed", "q", "pct", "fixed4"])
@pytest.mark.parametrize("value", [None, float("nan"), float("inf"), "n/a"])
def test_format_value_shows_a_dash_for_missing_numbers(value: object, kind: str) -> None:
    assert format_value(value, kind) == "—"


def test_caption_in_full() -> None:
    info = {"layer": 3, "verdict": "vulnerable", "shift": 0.25, "lo": 0.1, "hi": -0.4, "q": 0.00123}
    assert caption(info) == (
        "Layer 3 — vulnerable: signed shift +0.250 nats (95 % CI +0.100 to \u22120.400), q = 0.0012"
    )


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"layer": 0}, "Layer 0"),
        ({"layer": 1, "verdict": ""}, "Layer 1"),
        ({"layer": 1, "verdict": None, "shift": None, "q": None}, "Layer 1"),
        ({"layer": 2, "verdict": "mixed", "q": 0.5}, "Layer 2 — mixed, q = 0.5"),
        ({"layer": 2, "q": 0}, "Layer 2, q = 0"),
        ({"layer": 4, "shift": -1.0}, "Layer 4: signed shift \u22121.000 nats"),
        ({"layer": 4, "shift": 0.0, "lo": 0.0}, "Layer 4: signed shift +0.000 nats"),  # CI needs both ends
        ({"layer": 4, "shift": 0.0, "hi": 0.0}, "Layer 4: signed shift +0.000 nats"),
        (
            {"layer": 4, "shift": 0.0, "lo": 0.0, "hi": 0.0},
            "Layer 4: signed shift +0.000 nats (95 % CI +0.000 to +0.000)",
        ),
        ({"layer": 5, "lo": 0.1, "hi": 0.2}, "Layer 5"),  # a CI without a shift is not shown
    ],
)
def test_caption_parts(info: dict[str, object], expected: str) -> None:
    assert caption(info) == expected


def test_verdict_classes_follow_the_colour_order() -> None:
    assert VERDICT_ORDER == ("vulnerable", "mixed", "resilient", "no significant shift")
    assert [verdict_class(v) for v in VERDICT_ORDER] == ["v0", "v1", "v2", "v3"]
    assert verdict_class("something new") == "vx" and verdict_class(None) == "vx" and verdict_class("") == "vx"
