"""Figures: the attention-map grid, the layer profile, row picking and saving (synthetic maps, matplotlib Agg)."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.colorbar import Colorbar
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.legend import Legend
from matplotlib.transforms import Bbox

from attnscan import AttnscanError, ScanResult
from attnscan.engine.accumulate import SetAccumulator
from attnscan.views.figures import (
    COLUMN_TITLES,
    NAN_COLOR,
    VERDICT_COLORS,
    FigureRow,
    grid_figure,
    layer_profile_figure,
    model_label,
    pick_rows,
    rows_from_result,
    save_figure,
)

T = 448


def _maps(t: int, kind: str = "pos", seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plausible ``[t, t]`` log maps: causal, a sink on key 0, a decaying diagonal; NaN above the diagonal."""
    rng = np.random.default_rng(seed)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    causal = j <= i
    w = np.where(causal, np.exp(-(i - j) / 8.0) + 1e-3 * rng.random((t, t)), 0.0)
    w[:, 0] += 2.0
    benign = np.where(causal, np.log(np.maximum(w / w.sum(1, keepdims=True), math.exp(-10))), np.nan)
    shift = {"pos": 1.0, "neg": -1.0, "bi": 0.0}[kind] + (np.sin(6 * j / t) if kind == "bi" else 0.0)
    jail = np.clip(benign + shift, -10, 0)
    return benign, jail, jail - benign


def _rows(n: int = 3, t: int = T, verdicts: tuple[str | None, ...] = (None, None, None)) -> list[FigureRow]:
    kinds = ("pos", "bi", "neg")
    labels = ("GPT-J-6B", "Llama-3.1-8B", "Mistral-7B")
    out = []
    for k in range(n):
        b, j, d = _maps(t, kinds[k % 3], seed=k)
        out.append(FigureRow(labels[k % 3], 4 + 7 * k, b, j, d, verdicts[k % len(verdicts)]))
    return out


def _panels(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.get_axes() if ax.get_label().startswith("attnscan:panel:")]


def _image(ax: Axes) -> AxesImage:
    (im,) = ax.get_images()
    return im


def _draw(fig: Figure) -> Any:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas


@pytest.fixture(scope="module")
def grid() -> Figure:
    return grid_figure(_rows(3), title="Attention, benign vs jailbreak")


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
    _draw(grid)
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
    fig = grid_figure(_rows(1), dpi=60)
    canvas = _draw(fig)
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


@pytest.mark.parametrize("name", ["viridis", "RdBu_r", "bwr"])
def test_nan_grey_is_far_from_every_colormap_colour(name: str) -> None:
    colours = mpl.colormaps[name](np.linspace(0, 1, 256))[:, :3]
    grey = np.array(to_rgba(NAN_COLOR)[:3])
    assert np.all(grey == grey[0]) and 0.6 < grey[0] < 0.85, "a neutral light grey"
    assert np.linalg.norm(colours - grey, axis=1).min() > 0.18


def test_grid_options_change_ranges_colormaps_and_ticks() -> None:
    fig = grid_figure(
        _rows(2), log_range=(-8, -1), diff_range=(-2, 2), cmap="magma", diff_cmap="bwr", tick_step=112, dpi=50
    )
    for n, ax in enumerate(_panels(fig)):
        im = _image(ax)
        if n % 3 < 2:
            assert im.get_clim() == (-8.0, -1.0) and im.get_cmap().name == "magma"
        else:
            assert im.get_clim() == (-2.0, 2.0) and im.get_cmap().name == "bwr"
        assert list(ax.get_xticks()) == [0, 112, 224, 336, 448]


def test_colour_bars_show_clipping() -> None:
    within, clipped = _rows(2, t=32)
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
    fig = grid_figure(_rows(1, t=t), dpi=50)
    assert [int(v) for v in _panels(fig)[0].get_xticks()] == ticks


def test_verdict_tag_is_shown_with_the_row_title() -> None:
    fig = grid_figure(_rows(3, t=32, verdicts=("vulnerable", None, "no significant shift")), dpi=50)
    titles = [sub.get_suptitle() for sub in fig.subfigs]
    assert titles[0].startswith("GPT-J-6B - Layer 4") and "vulnerable" in titles[0]
    assert titles[1] == "Llama-3.1-8B - Layer 11"
    assert "no significant shift" in titles[2]


def _overlaps(a: Bbox, b: Bbox, tol: float = 0.5) -> bool:
    return a.x0 < b.x1 - tol and b.x0 < a.x1 - tol and a.y0 < b.y1 - tol and b.y0 < a.y1 - tol


@pytest.mark.parametrize("n", [1, 2, 6])
def test_no_labels_overlap_and_everything_fits(n: int) -> None:
    rows = _rows(n, t=96, verdicts=("vulnerable", "mixed", "resilient", None, "no significant shift", "mixed"))
    rows[-1].label = "Meta-Llama-3.1-8B-Instruct"
    fig = grid_figure(rows, dpi=40, title="A long figure title for the whole grid")
    canvas = _draw(fig)
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
        grid_figure(_rows(1, t=16), log_range=(0, -10))
    with pytest.raises(AttnscanError, match="diff_range"):
        grid_figure(_rows(1, t=16), diff_range=(4, 4))
    row = _rows(1, t=16)[0]
    row.diff = row.diff[:8, :8]
    with pytest.raises(AttnscanError, match="differ in shape"):
        grid_figure([row])
    row.diff = np.zeros((16, 8))
    with pytest.raises(AttnscanError, match="square"):
        grid_figure([row])
    with pytest.raises(AttnscanError, match="unknown colormap"):
        grid_figure(_rows(1, t=16), cmap="no-such-map")


# ---- saving ----------------------------------------------------------------------------------------------------


def _png_dpi(data: bytes) -> float:
    """Dots per inch from a PNG's pHYs chunk (pixels per metre)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"pHYs":
            ppm_x, _, unit = struct.unpack(">IIB", data[pos + 8 : pos + 17])
            assert unit == 1
            return float(ppm_x) * 0.0254
        pos += 12 + length
    raise AssertionError("no pHYs chunk")


def _png_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


@pytest.fixture(scope="module")
def small_grid() -> Figure:
    return grid_figure(_rows(1, t=64), dpi=50)


def test_save_png_at_200_dpi(small_grid: Figure, tmp_path: Path) -> None:
    out = save_figure(small_grid, tmp_path / "grid.png")
    assert out == tmp_path / "grid.png"
    data = out.read_bytes()
    assert _png_dpi(data) == pytest.approx(200, abs=0.5)
    w, h = small_grid.get_size_inches()
    assert _png_size(data) == (round(w * 200), round(h * 200))
    save_figure(small_grid, tmp_path / "hi.png", dpi=72)
    assert _png_dpi((tmp_path / "hi.png").read_bytes()) == pytest.approx(72, abs=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "hi.png"], "temporary files were left behind"


def test_save_pdf_and_svg(small_grid: Figure, tmp_path: Path) -> None:
    pdf = save_figure(small_grid, tmp_path / "grid.pdf")
    svg = save_figure(small_grid, str(tmp_path / "grid.SVG"))
    assert pdf.read_bytes().startswith(b"%PDF-")
    text = svg.read_bytes()
    assert text.startswith(b"<?xml") and b"<svg" in text[:2000]
    assert b"<image" in text, "the maps must be embedded as raster images"
    umask = os.umask(0)
    os.umask(umask)
    assert pdf.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_errors_are_one_line_and_say_what_to_do(small_grid: Figure, tmp_path: Path) -> None:
    with pytest.raises(AttnscanError, match=r"unsupported extension '\.jpg'.*\.png, \.pdf, \.svg") as exc:
        save_figure(small_grid, tmp_path / "grid.jpg")
    assert "\n" not in str(exc.value)
    with pytest.raises(AttnscanError, match="unsupported extension"):
        save_figure(small_grid, tmp_path / "grid")
    with pytest.raises(AttnscanError, match="does not exist; create it first"):
        save_figure(small_grid, tmp_path / "missing" / "grid.png")
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(small_grid: Figure, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "grid.png"
    target.write_bytes(b"old figure")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(small_grid, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_figure(small_grid, target)
    assert target.read_bytes() == b"old figure"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    monkeypatch.undo()
    save_figure(small_grid, target)
    assert target.read_bytes().startswith(b"\x89PNG")


# ---- from a ScanResult ---------------------------------------------------------------------------------------------


def _result(spec: str | None = "meta-llama/Llama-3.1-8B", t: int = 8, layers: tuple[int, ...] = (0, 2)) -> ScanResult:
    gen = torch.Generator().manual_seed(0)
    sets = {}
    for s, name in enumerate(("benign", "jailbreak")):
        n = 3
        tri = torch.tril(torch.ones(t, t, dtype=torch.float64))
        sums = torch.rand(len(layers), t, t, generator=gen, dtype=torch.float64) * tri * n * (0.5 + s)
        count = (tri * n).to(torch.int64)
        count[t - 2 :, :] = 0  # no prompt reaches the last two rows
        sets[name] = SetAccumulator(
            name=name,
            layers=layers,
            length=t,
            floor=-10.0,
            sums=sums,
            count=count,
            prompt_ids=torch.arange(n),
            lengths=torch.full((n,), t - 2),
            blocks=torch.zeros(n, len(layers), 2, 2),
            sink=torch.zeros(n, len(layers)),
            entropy=torch.zeros(n, len(layers)),
        )
    manifest: dict[str, Any] = {} if spec is None else {"model": {"spec": spec, "kind": "hub"}}
    return ScanResult(sets, manifest)


def test_rows_from_result_takes_the_maps_and_a_readable_label() -> None:
    result = _result()
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
    assert rows_from_result(_result(spec=None), [0])[0].label == "model"
    with pytest.raises(AttnscanError, match="layer 1 was not captured"):
        rows_from_result(result, [1])
    fig = grid_figure(rows, dpi=40)
    assert [s.get_suptitle() for s in fig.subfigs] == ["Llama-3.1-8B - Layer 2  ·  mixed", "Llama-3.1-8B - Layer 0"]


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


# ---- layer profile -------------------------------------------------------------------------------------------------


def _table(n: int, seed: int, verdicts: list[str] | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    effect = np.sin(np.linspace(0, 5, n)) + 0.1 * rng.standard_normal(n)
    verdict = verdicts or [
        "vulnerable" if e > 0.3 else "resilient" if e < -0.3 else ("mixed" if k % 2 else "no significant shift")
        for k, e in enumerate(effect)
    ]
    q_signed = np.where(np.abs(effect) > 0.3, 0.001, 0.6)
    q_abs = np.where(np.array(verdict) == "mixed", 0.01, q_signed)
    return pd.DataFrame(
        {
            "layer": np.arange(n),
            "effect": effect,
            "ci_low": effect - 0.2,
            "ci_high": effect + 0.2,
            "verdict": verdict,
            "q_signed": q_signed,
            "q_abs": q_abs,
        }
    )


def _scatters(ax: Axes) -> list[PathCollection]:
    return [c for c in ax.collections if isinstance(c, PathCollection)]


def _legends(fig: Figure) -> dict[str, Legend]:
    """The figure's legends by their ``attnscan:legend:*`` label."""
    found = [leg for leg in fig.findobj(Legend) if isinstance(leg, Legend)]
    return {leg.get_label(): leg for leg in found if leg.get_label().startswith("attnscan:legend:")}


def _texts(legend: Legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def test_layer_profile_puts_models_of_different_depth_on_one_axis() -> None:
    tables = {"GPT-J-6B": _table(28, 1), "Llama-3.1-8B": _table(32, 2)}
    fig = layer_profile_figure(tables)
    ax = fig.axes[0]
    points = _scatters(ax)
    assert len(points) == 2
    for pts, (name, table) in zip(points, tables.items(), strict=True):
        xy = pts.get_offsets()
        assert xy.shape == (len(table), 2)
        np.testing.assert_allclose(xy[:, 0], table["layer"] / (len(table) - 1))
        np.testing.assert_allclose(xy[:, 1], table["effect"])
        expected = [to_rgba(VERDICT_COLORS[v]) for v in table["verdict"]]
        np.testing.assert_allclose(pts.get_facecolors(), expected)
        assert xy[-1, 0] == pytest.approx(1.0), f"{name}: last layer must sit at relative depth 1"
    # A zero line, an interval band per model, legends for models (with depths) and verdicts.
    assert any(np.allclose(line.get_ydata(), 0) and len(line.get_ydata()) == 2 for line in ax.get_lines())
    assert sum(1 for c in ax.collections if not isinstance(c, PathCollection)) == 2
    legends = {label: _texts(leg) for label, leg in _legends(fig).items()}
    assert legends["attnscan:legend:models"] == ["GPT-J-6B (28 layers)", "Llama-3.1-8B (32 layers)"]
    assert legends["attnscan:legend:verdicts"] == [v for v in VERDICT_COLORS]
    assert "attnscan:legend:detection" not in legends, "no detection panel, no detection legend"
    assert "Relative layer depth" in ax.get_xlabel()
    assert ax.child_axes == [], "different depths: no absolute layer axis"
    _draw(fig)


def test_layer_profile_depth_from_n_layers_and_absolute_layer_axis() -> None:
    table = _table(10, 3)
    fig = layer_profile_figure({"m": table}, n_layers={"m": 21}, title="Profile")
    xy = _scatters(fig.axes[0])[0].get_offsets()
    np.testing.assert_allclose(xy[:, 0], np.arange(10) / 20)
    (top,) = fig.axes[0].child_axes
    assert top.get_xlabel() == "Layer"
    assert fig.get_suptitle() == "Profile"
    _draw(fig)
    with pytest.raises(AttnscanError, match=r"outside 0\.\.4"):
        layer_profile_figure({"m": table}, n_layers={"m": 5})
    with pytest.raises(AttnscanError, match="lacks column"):
        layer_profile_figure({"m": table.drop(columns="ci_low")})


def test_layer_table_from_stats_feeds_the_profile_and_pick_rows() -> None:
    from attnscan.analysis.statistics import VERDICTS, layer_table

    assert set(VERDICTS) == set(VERDICT_COLORS), "every verdict of the statistics needs its fixed colour"
    gen = torch.Generator().manual_seed(3)
    result = _result(t=8, layers=(0, 1, 2, 3))
    for s, acc in enumerate(result.sets.values()):
        acc.blocks = (
            torch.randn(acc.blocks.shape, generator=gen) + torch.tensor([0.0, 0.8, -0.8, 0.0])[None, :, None, None] * s
        )
    table = layer_table(result, n_permutations=40, n_bootstrap=40)
    fig = layer_profile_figure({"Llama-3.1-8B": table}, value="signed_shift", n_layers={"Llama-3.1-8B": 4})
    assert fig.axes[0].get_ylabel() == "Signed shift, nats (Jailbreak − Benign)"
    np.testing.assert_allclose(_scatters(fig.axes[0])[0].get_offsets()[:, 1], table["signed_shift"])
    rows = pick_rows({"Llama-3.1-8B": table})
    assert len(rows) == 3 and len({layer for _, layer in rows}) == 3
    q = np.fmin(table["q_signed"], table["q_abs"])
    best = table.assign(q=q, size=-table["effect"].abs()).sort_values(["q", "size", "layer"]).iloc[0]
    assert pick_rows({"a": table, "b": table}) == [("a", int(best["layer"])), ("b", int(best["layer"]))]


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


def test_layer_profile_with_detection_auroc_below() -> None:
    tables = {"GPT-J-6B": _table(28, 1), "Llama-3.1-8B": _table(32, 2)}
    detection = {}
    for name, t in tables.items():
        n = len(t)
        auroc = np.linspace(0.5, 0.98, n)
        detection[name] = pd.DataFrame(
            {
                "layer": np.arange(n),
                "cp_auroc": auroc,
                "cp_auroc_low": auroc - 0.05,
                "cp_auroc_high": np.minimum(auroc + 0.05, 1.0),
                "probe_auroc": auroc[::-1],
                "flagged": auroc >= 0.9,
            }
        )
    fig = layer_profile_figure(tables, detection=detection, threshold=0.9)
    shift_ax, det_ax = fig.axes[:2]
    assert det_ax.get_ylabel().startswith("Detection AUROC") and det_ax.get_ylim() == (0.0, 1.02)
    assert "Relative layer depth" in det_ax.get_xlabel() and shift_ax.get_xlabel() == ""
    for det in detection.values():  # the two models have different depths, so line lengths tell them apart
        (cp_line,) = [ln for ln in det_ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata()) == len(det)]
        np.testing.assert_allclose(cp_line.get_ydata(), det["cp_auroc"])
        np.testing.assert_allclose(cp_line.get_xdata(), det["layer"] / (len(det) - 1))
    # Filled markers exactly at the flagged layers, one chance line and one threshold line.
    for name, det in detection.items():
        (filled,) = [c for c in det_ax.collections if c.get_label() == f"_flagged:{name}"]
        np.testing.assert_allclose(filled.get_offsets()[:, 1], det.loc[det["flagged"], "cp_auroc"])
    flat = [ln.get_ydata()[0] for ln in det_ax.get_lines() if len(ln.get_ydata()) == 2]
    assert 0.5 in flat and 0.9 in flat
    _draw(fig)
    with pytest.raises(AttnscanError, match="has no layer table"):
        layer_profile_figure(tables, detection={"other": detection["GPT-J-6B"]})
    with pytest.raises(AttnscanError, match="needs a 'layer' column"):
        layer_profile_figure(
            tables, detection={"GPT-J-6B": detection["GPT-J-6B"].drop(columns=["cp_auroc", "probe_auroc"])}
        )


def _detection(tables: dict[str, pd.DataFrame], threshold: float | None = None) -> dict[str, pd.DataFrame]:
    out = {}
    for name, t in tables.items():
        auroc = np.linspace(0.5, 0.98, len(t))
        out[name] = pd.DataFrame({"layer": np.arange(len(t)), "cp_auroc": auroc, "probe_auroc": auroc[::-1]})
        if threshold is not None:
            out[name].attrs["threshold"] = threshold
    return out


def _flat_levels(ax: Axes) -> list[float]:
    return sorted(float(ln.get_ydata()[0]) for ln in ax.get_lines() if len(ln.get_ydata()) == 2)


def test_layer_profile_names_the_flag_threshold_in_the_detection_legend() -> None:
    tables = {"GPT-J-6B": _table(28, 1), "Llama-3.1-8B": _table(32, 2)}
    # Given explicitly: one grey line for both models, named with its value.
    fig = layer_profile_figure(tables, detection=_detection(tables), threshold=0.9)
    texts = _texts(_legends(fig)["attnscan:legend:detection"])
    assert "flag threshold (AUROC 0.90)" in texts and "chance (AUROC 0.50)" in texts
    assert _flat_levels(fig.axes[1]) == [0.5, 0.9]
    # From the tables' attrs; two models with different thresholds get a line each and one entry naming both.
    det = _detection(tables, threshold=0.9)
    det["Llama-3.1-8B"].attrs["threshold"] = 0.875
    fig = layer_profile_figure(tables, detection=det)
    assert "flag thresholds (AUROC 0.875, 0.90)" in _texts(_legends(fig)["attnscan:legend:detection"])
    assert _flat_levels(fig.axes[1]) == [0.5, 0.875, 0.9]
    # No threshold anywhere (e.g. a detection.csv read back without attrs): no line and no entry.
    fig = layer_profile_figure(tables, detection=_detection(tables))
    texts = _texts(_legends(fig)["attnscan:legend:detection"])
    assert not any("threshold" in t for t in texts) and "chance (AUROC 0.50)" in texts
    assert _flat_levels(fig.axes[1]) == [0.5]


@pytest.mark.parametrize("dpi", [72, 200])
def test_layer_profile_stacks_its_legends_beside_the_panels(dpi: int) -> None:
    tables = {"GPT-J-6B": _table(28, 1), "Llama-3.1-8B": _table(32, 2)}
    fig = layer_profile_figure(tables, detection=_detection(tables, 0.9), title="Profile", dpi=dpi)
    _draw(fig)
    shift_ax, det_ax = fig.axes[:2]
    legends = _legends(fig)
    boxes = {label.rsplit(":", 1)[1]: leg.get_window_extent() for label, leg in legends.items()}
    models, verdicts, detection = boxes["models"], boxes["verdicts"], boxes["detection"]
    shift_box, det_box = shift_ax.get_window_extent(), det_ax.get_window_extent()
    inch = fig.dpi
    # One column right of the panels: every legend starts just right of the axes, at the same x.
    for box in (models, verdicts, detection):
        assert shift_box.x1 < box.x0 < shift_box.x1 + 0.3 * inch
        assert box.x0 == pytest.approx(models.x0)
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1), "legend cut off"
    # Models level with the top panel's top, verdicts right below it (no overlap, no wide gap), detection level
    # with the detection panel's top.
    assert models.y1 == pytest.approx(shift_box.y1, abs=2)
    assert 0 < models.y0 - verdicts.y1 < 0.3 * inch
    assert verdicts.y0 > shift_box.y0
    assert detection.y1 == pytest.approx(det_box.y1, abs=2)
    # The column is no wider than its widest legend (plus the gap to the axes).
    assert fig.bbox.x1 - shift_box.x1 < max(b.width for b in (models, verdicts, detection)) + 0.5 * inch
