"""The layer profile: models of different depth on one axis, verdict colours, the detection panel and its legends."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from figure_data import draw_canvas, fake_result
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.legend import Legend

from attnscan import AttnscanError
from attnscan.views.grid import pick_rows
from attnscan.views.palette import VERDICT_COLORS
from attnscan.views.profile import layer_profile_figure


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
    draw_canvas(fig)


def test_layer_profile_depth_from_n_layers_and_absolute_layer_axis() -> None:
    table = _table(10, 3)
    fig = layer_profile_figure({"m": table}, n_layers={"m": 21}, title="Profile")
    xy = _scatters(fig.axes[0])[0].get_offsets()
    np.testing.assert_allclose(xy[:, 0], np.arange(10) / 20)
    (top,) = fig.axes[0].child_axes
    assert top.get_xlabel() == "Layer"
    assert fig.get_suptitle() == "Profile"
    draw_canvas(fig)
    with pytest.raises(AttnscanError, match=r"outside 0\.\.4"):
        layer_profile_figure({"m": table}, n_layers={"m": 5})
    with pytest.raises(AttnscanError, match="lacks column"):
        layer_profile_figure({"m": table.drop(columns="ci_low")})


def test_layer_table_from_stats_feeds_the_profile_and_pick_rows() -> None:
    from attnscan.analysis.statistics import VERDICTS, layer_table

    assert set(VERDICTS) == set(VERDICT_COLORS), "every verdict of the statistics needs its fixed colour"
    gen = torch.Generator().manual_seed(3)
    result = fake_result(t=8, layers=(0, 1, 2, 3))
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
    draw_canvas(fig)
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
    draw_canvas(fig)
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


def test_layer_profile_draws_the_text_baseline_when_the_table_has_one() -> None:
    tables = {"GPT-J-6B": _table(28, 1), "Llama-3.1-8B": _table(32, 2)}
    det = _detection(tables, threshold=0.9)
    det["GPT-J-6B"]["text_auroc"] = 0.866  # one value per training, repeated on every layer row
    fig = layer_profile_figure(tables, detection=det)
    (line,) = [ln for ln in fig.axes[1].get_lines() if ln.get_label() == "_text_baseline"]
    assert list(line.get_ydata()) == [0.866, 0.866] and line.get_linestyle() == "-."
    assert "text baseline (TF-IDF, same folds)" in _texts(_legends(fig)["attnscan:legend:detection"])
    assert _flat_levels(fig.axes[1]) == [0.5, 0.866, 0.9]
    # without the column: no line, no legend entry
    fig = layer_profile_figure(tables, detection=_detection(tables, threshold=0.9))
    assert not any("text baseline" in t for t in _texts(_legends(fig)["attnscan:legend:detection"]))
