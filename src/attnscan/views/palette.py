"""The look shared by the figures and the HTML report: colours, colour maps, value ranges and type sizes.

Every colour that tells something apart (a verdict, a model, a cell no prompt reaches) is defined here once, so the
PNG / PDF figures of :mod:`attnscan.views.grid` and :mod:`attnscan.views.profile` and the report page of
:mod:`attnscan.views.report` always agree. Nothing here imports matplotlib.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from matplotlib.typing import LineStyleType

__all__ = [
    "DIFF_CMAP",
    "DIFF_RANGE",
    "LOG_CMAP",
    "LOG_RANGE",
    "MODEL_STYLES",
    "NAN_COLOR",
    "OTHER_VERDICT_COLOR",
    "THRESHOLD_COLOR",
    "TITLE_COLORS",
    "VERDICT_COLORS",
    "ModelStyle",
    "model_style",
    "verdict_color",
]

#: Colour of cells no prompt reaches (NaN): a neutral light grey, far from every viridis / RdBu_r / bwr colour.
NAN_COLOR = "#b8b8b8"
#: Fixed verdict colours of the layer profile, the verdict tags of the grid and the report's chips and points.
VERDICT_COLORS: Mapping[str, str] = {
    "vulnerable": "#d62728",
    "mixed": "#8e44ad",
    "resilient": "#1f5fbf",
    "no significant shift": "#9a9a9a",
}
#: Colour of a verdict not in :data:`VERDICT_COLORS`.
OTHER_VERDICT_COLOR = "#3a3a3a"
#: Row titles in a verdict's colour, darker where the point colour is too light for text.
TITLE_COLORS: Mapping[str, str] = {**VERDICT_COLORS, "no significant shift": "#6b6b6b"}
#: Colour of the flag-threshold lines of the detection panel.
THRESHOLD_COLOR = "#888888"


class ModelStyle(NamedTuple):
    """How one model's line is drawn: colour (figures and report), marker and line style (figures)."""

    color: str
    marker: str
    linestyle: LineStyleType


#: Line colours and markers that tell models apart, in model order (cycled); none is red, blue, purple or grey, so
#: they never read as a verdict colour.
MODEL_STYLES: tuple[ModelStyle, ...] = (
    ModelStyle("#1a1a1a", "o", "-"),
    ModelStyle("#1b9e77", "s", "--"),
    ModelStyle("#a6761d", "^", "-."),
    ModelStyle("#66a61e", "D", ":"),
    ModelStyle("#e6ab02", "v", "-"),
    ModelStyle("#17becf", "P", "--"),
)

#: Colour map of the log attention maps, and their range (ln of a probability; the low end is the default floor).
LOG_CMAP = "viridis"
LOG_RANGE = (-10.0, 0.0)
#: Colour map of the difference maps (jailbreak - benign), and their range in nats.
DIFF_CMAP = "RdBu_r"
DIFF_RANGE = (-4.0, 4.0)

# Font sizes (points) of the figures, for a 4-inch panel printed at its natural size.
FS_SUPTITLE = 16
FS_ROW = 14
FS_TITLE = 13
FS_LABEL = 11
FS_TICK = 9.5


def model_style(index: int) -> ModelStyle:
    """The style of the ``index``-th model (0-based), cycling through :data:`MODEL_STYLES`."""
    return MODEL_STYLES[index % len(MODEL_STYLES)]


def verdict_color(verdict: str) -> str:
    """The colour of a verdict (:data:`VERDICT_COLORS`), :data:`OTHER_VERDICT_COLOR` for any other."""
    return VERDICT_COLORS.get(verdict, OTHER_VERDICT_COLOR)
