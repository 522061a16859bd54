"""Synthetic inputs of the figure tests: plausible log maps, grid rows, a small scan result, and drawing."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from attnscan import ScanResult
from attnscan.engine.accumulate import SetAccumulator
from attnscan.views.grid import FigureRow

T = 448


def fake_maps(t: int, kind: str = "pos", seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def fake_rows(n: int = 3, t: int = T, verdicts: tuple[str | None, ...] = (None, None, None)) -> list[FigureRow]:
    kinds = ("pos", "bi", "neg")
    labels = ("GPT-J-6B", "Llama-3.1-8B", "Mistral-7B")
    out = []
    for k in range(n):
        b, j, d = fake_maps(t, kinds[k % 3], seed=k)
        out.append(FigureRow(labels[k % 3], 4 + 7 * k, b, j, d, verdicts[k % len(verdicts)]))
    return out


def draw_canvas(fig: Figure) -> Any:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas


def fake_result(
    spec: str | None = "meta-llama/Llama-3.1-8B", t: int = 8, layers: tuple[int, ...] = (0, 2)
) -> ScanResult:
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
