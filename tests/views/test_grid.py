"""The attention-map grid: rows, panels, colour scales, layout, rows from a scan result, and picking rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from figure_data import T, draw_canvas, fake_result, fake_rows
from matplotlib.axes import Axes
from matplotlib.colorbar import Colorbar
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.transforms import Bbox

from attnscan import AttnscanError
from attnscan.views.grid import COLUMN_TITLES, grid_figure, pick_rows, rows_from_result
from attnscan.views.palette import NAN_COLOR


def _panels(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.get_axes() if ax.get_label().startswith("attnscan:panel:")]


def _image(ax: Axes) -> AxesImage:
    (im,) = ax.get_images()
    return im


@pytest.fixture(scope="module")
def grid() -> Figure:
    return grid_figure(fake_rows(3), title="Attention, benign vs jailbreak")


def test_grid_has_one_row_per_map_and_three_titled_columns(grid: Figure) -> None:
    panels = _panels(grid)
    assert len(panels) == 9
    assert [ax.get_title() for ax in panels] == list(COLUMN_TITLES) * 3 == ["Benign", "Jailbreak", "Difference"] * 3
    assert [sub.get_suptitle() for sub in grid.subfigs] == [
        "GPT-J-6B - Layer 4",
        "Llama-3.1-8B - Layer 11",
        "Mistral-7B - Layer 18",
    ]
    assert grid.get_suptitle() == "Attention, benign vs jailbreak"
    # Each row's panels belong to that row's subfigure, left to right.
    for sub, start in zip(grid.subfigs, (0, 3, 6), strict=True):
        assert all(ax.get_figure(root=False) is sub for ax in panels[start : start + 3])


def test_grid_axes_labels_ticks_and_orientation(grid: Figure) -> None:
    expected = [0, 64, 128, 192, 256, 320, 384, 448]
    for n, ax in enumerate(_panels(grid)):
        assert ax.get_xlabel() == "Key Token"
        assert ax.get_ylabel() == ("Query Token" if n % 3 == 0 else "")
        assert list(ax.get_xticks()) == expected
        assert list(ax.get_yticks()) == expected
        assert ax.get_xlim() == (0, T)
        assert ax.get_ylim() == (T, 0), "query 0 must be at the top"
        assert list(_image(ax).get_extent()) == [0, T, T, 0]
        assert _image(ax).get_interpolation() == "nearest"
        assert _image(ax).get_rasterized()


def _bar(fig: Figure, ax: Axes) -> Colorbar | None:
    """The colour bar of a panel: its own, or for Benign the one it shares with Jailbreak (same norm)."""
    im = _image(ax)
    if im.colorbar is not None:
        return im.colorbar
    shared = [o for o in _panels(fig) if _image(o).norm is im.norm and _image(o).colorbar is not None]
    return shared[0].get_images()[0].colorbar if shared else None


def test_grid_colour_scales_and_colour_bars(grid: Figure) -> None:
    draw_canvas(grid)
    for n, ax in enumerate(_panels(grid)):
        im = _image(ax)
        if n % 3 < 2:
            assert im.get_clim() == (-10.0, 0.0)
            assert im.get_cmap().name == "viridis"
            label = "log attention"
        else:
            assert im.get_clim() == (-4.0, 4.0)
            assert im.get_cmap().name == "RdBu_r"
            label = "Δ log attention"
        cb = _bar(grid, ax)
        assert cb is not None, f"panel {ax.get_label()} has no colour bar"
        assert cb.ax.get_ylabel() == label
        assert cb.mappable.get_clim() == im.get_clim()
        # The bar sits right of its panel (and, for the shared log bar, right of both log panels).
        assert cb.ax.get_position().x0 > ax.get_position().x1
    rows = [_panels(grid)[k : k + 3] for k in (0, 3, 6)]
    for b, j, d in rows:
        assert _image(b).norm is _image(j).norm, "benign and jailbreak share one norm and its colour bar"
        assert _image(b).colorbar is None and _image(d).norm is not _image(j).norm
        log_bar, diff_bar = _image(j).colorbar, _image(d).colorbar
        assert log_bar is not None and diff_bar is not None
        assert log_bar.ax.get_position().x1 < d.get_position().x0
        assert diff_bar.ax.get_position().x0 > d.get_position().x1


def test_nan_cells_are_drawn_in_the_neutral_bad_colour() -> None:
    fig = grid_figure(fake_rows(1), dpi=60)
    canvas = draw_canvas(fig)
    buf = np.asarray(canvas.buffer_rgba())
    height = buf.shape[0]
    grey = np.array(to_rgba(NAN_COLOR)) * 255
    for ax in _panels(fig):
        im = _image(ax)
        assert np.allclose(im.get_cmap().get_bad(), to_rgba(NAN_COLOR))
        x, y = ax.transData.transform((0.8 * T, 0.2 * T))  # key 358, query 90: above the diagonal
        pixel = buf[int(height - y), int(x)].astype(float)
        assert np.abs(pixel - grey).max() <= 2, f"upper-triangle pixel {pixel} is not the NaN grey {grey}"
        x, y = ax.transData.transform((0.2 * T, 0.8 * T))  # below the diagonal: a colormap colour
        pixel = buf[int(height - y), int(x)].astype(float)
        assert np.abs(pixel - grey).max() > 20


def test_grid_options_change_ranges_colormaps_and_ticks() -> None:
    fig = grid_figure(
        fake_rows(2), log_range=(-8, -1), diff_range=(-2, 2), cmap="magma", diff_cmap="bwr", tick_step=112, dpi=50
    )
    for n, ax in enumerate(_panels(fig)):
        im = _image(ax)
        if n % 3 < 2:
            assert im.get_clim() == (-8.0, -1.0) and im.get_cmap().name == "magma"
        else:
            assert im.get_clim() == (-2.0, 2.0) and im.get_cmap().name == "bwr"
        assert list(ax.get_xticks()) == [0, 112, 224, 336, 448]


def test_colour_bars_show_clipping() -> None:
    within, clipped = fake_rows(2, t=32)
    clipped.diff = clipped.diff * 0 + np.linspace(-6, 6, 32)[None, :]
    clipped.jailbreak = clipped.jailbreak - 20
    fig = grid_figure([within, clipped], dpi=40)
    bars = [_bar(fig, ax) for ax in _panels(fig)]
    assert [b.extend if b is not None else None for b in bars] == [
        *("neither", "neither", "neither"),
        *("min", "min", "both"),
    ]


@pytest.mark.parametrize(
    ("t", "ticks"),
    [(300, [0, 64, 128, 192, 256, 300]), (1024, list(range(0, 1025, 128))), (512, list(range(0, 513, 64)))],
)
def test_ticks_stay_readable_for_other_lengths(t: int, ticks: list[int]) -> None:
    fig = grid_figure(fake_rows(1, t=t), dpi=50)
    assert [int(v) for v in _panels(fig)[0].get_xticks()] == ticks


def test_verdict_tag_is_shown_with_the_row_title() -> None:
    fig = grid_figure(fake_rows(3, t=32, verdicts=("vulnerable", None, "no significant shift")), dpi=50)
    titles = [sub.get_suptitle() for sub in fig.subfigs]
    assert titles[0].startswith("GPT-J-6B - Layer 4") and "vulnerable" in titles[0]
    assert titles[1] == "Llama-3.1-8B - Layer 11"
    assert "no significant shift" in titles[2]


def _overlaps(a: Bbox, b: Bbox, tol: float = 0.5) -> bool:
    return a.x0 < b.x1 - tol and b.x0 < a.x1 - tol and a.y0 < b.y1 - tol and b.y0 < a.y1 - tol


@pytest.mark.parametrize("n", [1, 2, 6])
def test_no_labels_overlap_and_everything_fits(n: int) -> None:
    rows = fake_rows(n, t=96, verdicts=("vulnerable", "mixed", "resilient", None, "no significant shift", "mixed"))
    rows[-1].label = "Meta-Llama-3.1-8B-Instruct"
    fig = grid_figure(rows, dpi=40, title="A long figure title for the whole grid")
    canvas = draw_canvas(fig)
    renderer = canvas.get_renderer()
    boxes: list[tuple[str, Bbox]] = []
    for ax in fig.get_axes():  # panels and colour bars, with their titles, labels and tick labels
        box = ax.get_tightbbox(renderer)
        assert box is not None
        boxes.append((ax.get_label() or "colorbar", box))
    # Row titles and the figure title (matplotlib keeps suptitle artists in the private ``_suptitle``).
    for sub in fig.subfigs:
        assert sub._suptitle is not None
        boxes.append((sub.get_suptitle(), sub._suptitle.get_window_extent(renderer)))
    assert fig._suptitle is not None
    boxes.append(("title", fig._suptitle.get_window_extent(renderer)))
    page = fig.bbox
    for name, box in boxes:
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, f"{name} sticks out of the figure sideways"
        assert page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, f"{name} sticks out of the figure vertically"
    for k, (name_a, a) in enumerate(boxes):
        for name_b, b in boxes[k + 1 :]:
            assert not _overlaps(a, b), f"{name_a} overlaps {name_b}"
    assert fig.get_size_inches()[0] == pytest.approx(13.5)
    assert 4.0 * n < fig.get_size_inches()[1] < 5.0 * n + 1


def test_grid_rejects_bad_input() -> None:
    with pytest.raises(AttnscanError, match="no rows"):
        grid_figure([])
    with pytest.raises(AttnscanError, match="log_range"):
        grid_figure(fake_rows(1, t=16), log_range=(0, -10))
    with pytest.raises(AttnscanError, match="diff_range"):
        grid_figure(fake_rows(1, t=16), diff_range=(4, 4))
    row = fake_rows(1, t=16)[0]
    row.diff = row.diff[:8, :8]
    with pytest.raises(AttnscanError, match="differ in shape"):
        grid_figure([row])
    row.diff = np.zeros((16, 8))
    with pytest.raises(AttnscanError, match="square"):
        grid_figure([row])
    with pytest.raises(AttnscanError, match="unknown colormap"):
        grid_figure(fake_rows(1, t=16), cmap="no-such-map")


# ---- from a ScanResult ---------------------------------------------------------------------------------------------


def test_rows_from_result_takes_the_maps_and_a_readable_label() -> None:
    result = fake_result()
    rows = rows_from_result(result, [2, 0], verdicts={2: "mixed"})
    assert [(r.label, r.layer, r.verdict) for r in rows] == [("Llama-3.1-8B", 2, "mixed"), ("Llama-3.1-8B", 0, None)]
    assert rows[0].title == "Llama-3.1-8B - Layer 2"
    for row in rows:
        for arr, ref in (
            (row.benign, result.log("benign", row.layer)),
            (row.jailbreak, result.log("jailbreak", row.layer)),
            (row.diff, result.diff(row.layer)),
        ):
            assert arr.shape == (8, 8) and arr.dtype == np.float64
            np.testing.assert_array_equal(arr, ref.numpy())
        assert np.isnan(row.benign[0, 1]) and np.isnan(row.diff[7, 0]) and not np.isnan(row.diff[5, 0])
    assert rows_from_result(result, [0], label="Custom")[0].label == "Custom"
    assert rows_from_result(fake_result(spec=None), [0])[0].label == "model"
    with pytest.raises(AttnscanError, match="layer 1 was not captured"):
        rows_from_result(result, [1])
    fig = grid_figure(rows, dpi=40)
    assert [s.get_suptitle() for s in fig.subfigs] == ["Llama-3.1-8B - Layer 2  ·  mixed", "Llama-3.1-8B - Layer 0"]


# ---- picking rows --------------------------------------------------------------------------------------------------


def _pick_table(rows: list[tuple[int, float, float, float, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["layer", "effect", "q_signed", "q_abs", "verdict"])


def test_pick_rows_several_models_takes_the_most_significant_layer_of_each() -> None:
    a = _pick_table(
        [
            (0, 0.2, 0.5, 0.4, "no significant shift"),
            (1, 0.5, 0.001, 0.002, "vulnerable"),
            (2, -0.9, 0.001, 0.001, "resilient"),  # ties on q with layer 3; larger |effect| wins
            (3, 0.4, 0.3, 0.001, "mixed"),
        ]
    )
    b = _pick_table([(0, 0.1, 0.9, 0.9, "no significant shift"), (5, 0.1, float("nan"), 0.04, "mixed")])
    assert pick_rows({"A": a, "B": b}) == [("A", 2), ("B", 5)]


def test_pick_rows_one_model_gives_positive_mixed_negative() -> None:
    t = _pick_table(
        [
            (0, 0.3, 0.01, 0.01, "vulnerable"),
            (1, 0.8, 0.001, 0.001, "vulnerable"),
            (2, 0.05, 0.7, 0.003, "mixed"),
            (3, -0.1, 0.6, 0.01, "mixed"),
            (4, -0.6, 0.002, 0.002, "resilient"),
            (5, -0.9, 0.002, 0.002, "resilient"),
        ]
    )
    assert pick_rows({"m": t}) == [("m", 1), ("m", 2), ("m", 5)]


def test_pick_rows_one_model_falls_back_to_the_next_strongest() -> None:
    only_positive = _pick_table(
        [
            (0, 0.2, 0.04, 0.04, "vulnerable"),
            (1, 0.9, 0.001, 0.001, "vulnerable"),
            (2, 0.1, 0.5, 0.5, "no significant shift"),
            (3, 0.6, 0.002, 0.002, "vulnerable"),
        ]
    )
    rows = pick_rows({"m": only_positive})
    assert rows == [("m", 1), ("m", 3), ("m", 0)]
    assert len({layer for _, layer in rows}) == 3
    two = _pick_table([(0, -0.2, 0.01, 0.01, "resilient"), (1, 0.1, 0.9, 0.9, "no significant shift")])
    assert pick_rows({"m": two}) == [("m", 1), ("m", 0)]
    with pytest.raises(AttnscanError, match="lacks column"):
        pick_rows({"m": two.drop(columns="q_abs")})
    with pytest.raises(AttnscanError, match="no layer tables"):
        pick_rows({})
