"""Saving figures: PNG at its resolution, PDF and SVG, one-line errors, atomic writes."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from figure_data import fake_rows
from matplotlib.figure import Figure

from attnscan import AttnscanError
from attnscan.views.grid import grid_figure
from attnscan.views.saving import save_figure


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
    return grid_figure(fake_rows(1, t=64), dpi=50)


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
