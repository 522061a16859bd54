"""The look shared by figures and report: one colour table for models and verdicts, one NaN grey, one pair of
value ranges (the figures and the page must agree)."""

from __future__ import annotations

from typing import Any

import matplotlib as mpl
import numpy as np
import pytest
from figure_data import fake_rows
from matplotlib.colors import to_hex, to_rgba

from attnscan.views.digest import build_digest
from attnscan.views.grid import grid_figure
from attnscan.views.page import render_html
from attnscan.views.palette import (
    DIFF_RANGE,
    LOG_RANGE,
    MODEL_STYLES,
    NAN_COLOR,
    OTHER_VERDICT_COLOR,
    VERDICT_COLORS,
    model_style,
    verdict_color,
)
from attnscan.views.profile import layer_profile_figure


@pytest.mark.parametrize("name", ["viridis", "RdBu_r", "bwr"])
def test_nan_grey_is_far_from_every_colormap_colour(name: str) -> None:
    colours = mpl.colormaps[name](np.linspace(0, 1, 256))[:, :3]
    grey = np.array(to_rgba(NAN_COLOR)[:3])
    assert np.all(grey == grey[0]) and 0.6 < grey[0] < 0.85, "a neutral light grey"
    assert np.linalg.norm(colours - grey, axis=1).min() > 0.18


def test_model_and_verdict_colours_come_from_one_table(inputs: dict[str, Any]) -> None:
    result, table = inputs["results"]["tiny"], inputs["tables"]["tiny"]
    labels = [f"m{k}" for k in range(len(MODEL_STYLES) + 1)]  # one more model than styles: the colours cycle
    many = {**inputs, "results": dict.fromkeys(labels, result), "tables": dict.fromkeys(labels, table)}
    digest = build_digest(**{**many, "prompts": None, "tokens": None}, display_size=8)
    # The report's model colours, its CSS classes and the profile figure's line colours are the same table.
    assert [m["color"] for m in digest["models"]] == [model_style(k).color for k in range(len(labels))]
    assert model_style(len(MODEL_STYLES)) == MODEL_STYLES[0]
    page = render_html(digest)
    for k, style in enumerate(MODEL_STYLES):
        assert f".m{k}{{background:{style.color}}}" in page
    profile = table[["layer", "signed_shift", "ci_low", "ci_high", "verdict"]].rename(
        columns={"signed_shift": "effect"}
    )
    fig = layer_profile_figure(dict.fromkeys(labels[:3], profile))
    lines = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == len(profile)]
    assert [to_hex(ln.get_color()) for ln in lines] == [style.color for style in MODEL_STYLES[:3]]
    assert [ln.get_linestyle() for ln in lines] == [style.linestyle for style in MODEL_STYLES[:3]]
    # Verdicts: the same colours in the digest and the page's CSS; unknown verdicts get the one other colour.
    assert digest["colors"]["verdicts"] == dict(VERDICT_COLORS) and digest["colors"]["nan"] == NAN_COLOR
    for k, colour in enumerate(VERDICT_COLORS.values()):
        assert f".v{k}{{background:{colour};fill:{colour}}}" in page
    assert f".vx{{background:{OTHER_VERDICT_COLOR};fill:{OTHER_VERDICT_COLOR}}}" in page
    assert verdict_color("something else") == OTHER_VERDICT_COLOR
    assert verdict_color("mixed") == VERDICT_COLORS["mixed"]


def test_value_ranges_are_shared_by_the_grid_and_the_report(inputs: dict[str, Any]) -> None:
    digest = build_digest(**inputs, display_size=8)
    assert digest["ranges"] == {"log": list(LOG_RANGE), "diff": list(DIFF_RANGE)}
    fig = grid_figure(fake_rows(1, t=16), dpi=40)
    clims = [ax.get_images()[0].get_clim() for ax in fig.get_axes() if ax.get_label().startswith("attnscan:panel:")]
    assert clims == [LOG_RANGE, LOG_RANGE, DIFF_RANGE]


def test_palette_does_not_load_matplotlib() -> None:
    import subprocess
    import sys

    code = "import sys, attnscan.views.palette; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
