"""The report's digest: prompt examples, heatmaps decoded back to their block means, the zoomed view, the byte
budget, and several models with the default view."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
from report_data import BENIGN, BENIGN_LENGTHS, LAYERS, T

from attnscan.views.digest import build_digest
from attnscan.views.maps import block_mean


def test_examples_limit_and_long_prompts(inputs: dict[str, Any]) -> None:
    long = "x" * 5000
    data = build_digest(**{**inputs, "prompts": {"tiny": {"benign": [long, *BENIGN]}}}, examples=2)
    group = data["prompts"][0]
    assert len(group["examples"]) == 2 and group["total"] == 7
    assert len(group["examples"][0]["text"]) == 4000 and group["examples"][0]["chars"] == 5000


def _decode(b64: str) -> np.ndarray[Any, Any]:
    return np.frombuffer(base64.b64decode(b64), dtype=np.uint8)


def test_maps_decode_to_the_block_means(inputs: dict[str, Any]) -> None:
    result = inputs["results"]["tiny"]
    data = build_digest(**inputs, display_size=8)  # T = 32 -> 8 x 8 blocks of 4 x 4 positions
    maps = data["models"][0]["maps"]
    full = maps["full"]
    assert (full["factor"], full["size"], full["extent"]) == (4, 8, T)
    enc = maps["encoding"]
    for li, layer in enumerate(LAYERS):
        for kind in ("benign", "jailbreak", "diff"):
            codes = _decode(full["data"][kind][li]).reshape(8, 8)
            ref = result.diff(layer) if kind == "diff" else result.log(kind, layer)
            expected = block_mean(ref.numpy(), 4)
            assert np.array_equal(codes == 255, np.isnan(expected))
            ok = codes != 255
            if kind == "diff":
                e = enc["diff"]
                values = e["scale"] * np.sinh((codes[ok] - 127.0) / 127.0 * math.asinh(e["max"] / e["scale"]))
                tol = 0.01 + 0.035 * np.abs(expected[ok])
            else:
                e = enc["log"]
                values = e["lo"] + codes[ok] / 254.0 * (e["hi"] - e["lo"])
                tol = np.full(values.shape, 10.0 / 254 / 2 + 1e-9)
            assert np.all(np.abs(values - expected[ok]) <= tol)
    # Zoomed view: positions every set reaches (0..11), full resolution here.
    zoom = maps["zoom"]
    assert (zoom["extent"], zoom["factor"], zoom["size"]) == (max(BENIGN_LENGTHS), 2, 6)
    assert maps["reach"]["benign"][0] == len(BENIGN_LENGTHS) and maps["reach"]["benign"][12] == 0


def test_zoom_is_full_resolution_when_the_grid_allows(inputs: dict[str, Any]) -> None:
    maps = build_digest(**inputs)["models"][0]["maps"]
    assert maps["full"]["factor"] == 1 and maps["zoom"]["factor"] == 1 and maps["zoom"]["size"] == 12
    codes = _decode(maps["zoom"]["data"]["diff"][1]).reshape(12, 12)
    d = inputs["results"]["tiny"].diff(2).numpy()[:12, :12]
    assert np.array_equal(codes == 255, np.isnan(d))


def test_block_mean_ignores_nan_and_pads() -> None:
    x = np.array([[1.0, np.nan, 5.0], [3.0, np.nan, np.nan], [np.nan, np.nan, 7.0]])
    out = block_mean(x, 2)
    assert out.shape == (2, 2)
    assert out[0, 0] == 2.0 and out[0, 1] == 5.0 and np.isnan(out[1, 0]) and out[1, 1] == 7.0


def test_budget_coarsens_the_maps(inputs: dict[str, Any]) -> None:
    small = build_digest(**inputs, map_budget=2_000)
    assert small["models"][0]["maps"]["full"]["factor"] > 1
    total = sum(
        len(b64)
        for view in ("full", "zoom")
        if small["models"][0]["maps"][view]
        for maps in small["models"][0]["maps"][view]["data"].values()
        for b64 in maps
    )
    assert total <= 2_000


def test_several_models_and_default_view(inputs: dict[str, Any]) -> None:
    result = inputs["results"]["tiny"]
    two = {
        **inputs,
        "results": {"a": result, "b": result},
        "tables": {"a": inputs["tables"]["tiny"], "b": inputs["tables"]["tiny"]},
        "prompts": {"a": inputs["prompts"]["tiny"], "b": inputs["prompts"]["tiny"]},
        "tokens": None,
    }
    data = build_digest(**two)
    assert [m["label"] for m in data["models"]] == ["a", "b"]
    assert len(data["prompts"]) == 2 and data["prompts"][0]["models"] == ["a", "b"]  # shared texts shown once
    table = inputs["tables"]["tiny"]
    ranked = table.assign(q=np.fmin(table["q_signed"], table["q_abs"]), size=-table["effect"].abs())
    best = ranked.sort_values(["q", "size", "layer"]).iloc[0]
    assert data["models"][0]["layers"][data["view"]["layer"]]["layer"] == int(best["layer"])
    assert data["view"]["model"] == 0
