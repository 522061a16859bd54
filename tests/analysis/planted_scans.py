"""Synthetic scan results with planted, known shifts, shared by the analysis tests (no model needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch

from attnscan.engine.accumulate import SetAccumulator

T = 16
B = 4
BS = T // B
# Layer ids differ from their positions on purpose: a mix-up of the two would show.
LAYERS = (0, 2, 5, 7)
N = 30
CAUSAL = np.tril(np.ones((T, T), dtype=bool))
LOWER_BLOCKS = [(r, c) for r in range(B) for c in range(r + 1)]  # the 10 blocks with causal cells
BASE_LOG = np.where(CAUSAL, -np.log(np.arange(1, T + 1))[:, None], 0.0)  # uniform causal attention rows

Plant = Mapping[int, "float | npt.NDArray[np.float64]"]


def make_set(
    name: str,
    seed: int,
    *,
    n: int = N,
    blocks: Plant | None = None,
    maps: Plant | None = None,
    sink: float = 0.3,
    entropy: float = 1.5,
) -> SetAccumulator:
    """A set accumulator with known contents.

    Per-prompt block log attention = a position baseline + the planted shift of that layer + a prompt-level random
    effect N(0, 0.3²) shared by the prompt's blocks (centred within the set) + block noise N(0, 0.5²); NaN where
    the prompt (length 9..16, one prompt of full length) reaches no cell of the block. The mean map of layer L is
    exp(BASE_LOG + maps[L]), so ``ScanResult.log`` returns exactly BASE_LOG + maps[L] on the causal cells.
    ``sink`` and ``entropy`` are constant per prompt, so their set means are known.
    """
    rng = np.random.default_rng(seed)
    nl = len(LAYERS)
    lengths = rng.integers(9, T + 1, size=n)
    lengths[0] = T
    shift = np.zeros((nl, B, B))
    for layer, value in (blocks or {}).items():
        shift[LAYERS.index(layer)] = value
    base = -np.log((np.arange(B)[:, None] + 1.0) * BS) * np.ones((B, B))
    prompt_effect = rng.normal(0, 0.3, (n, 1, 1, 1))
    prompt_effect -= prompt_effect.mean()  # centred, so no chance offset is shared by all layers of a set
    values = base + shift + prompt_effect + rng.normal(0, 0.5, (n, nl, B, B))
    row_reached = np.arange(B)[None, :] * BS < lengths[:, None]  # [n, B]
    reached = row_reached[:, :, None] & np.tril(np.ones((B, B), dtype=bool))[None]
    values = np.where(reached[:, None], values, np.nan)
    rows = np.arange(T)[None, :, None] < lengths[:, None, None]
    count = (rows & CAUSAL[None]).sum(0)
    log_maps = np.stack([BASE_LOG + (maps or {}).get(layer, 0.0) for layer in LAYERS])
    sums = count[None] * np.where(CAUSAL, np.exp(log_maps), 0.0)
    return SetAccumulator(
        name=name,
        layers=LAYERS,
        length=T,
        floor=-10.0,
        sums=torch.tensor(sums, dtype=torch.float64),
        count=torch.tensor(count, dtype=torch.int64),
        prompt_ids=torch.arange(n),
        lengths=torch.tensor(lengths, dtype=torch.int64),
        blocks=torch.tensor(values, dtype=torch.float32),
        sink=torch.full((n, nl), sink, dtype=torch.float32),
        entropy=torch.full((n, nl), entropy, dtype=torch.float32),
    )


def cell_plant(seed: int, frac_up: float, up: float, down: float) -> npt.NDArray[np.float64]:
    """A [T, T] map difference: ``up`` on a random ``frac_up`` of the causal cells, ``down`` on the rest."""
    rng = np.random.default_rng(seed)
    raised = rng.random((T, T)) < frac_up
    return np.where(CAUSAL, np.where(raised, up, down), 0.0)


def bipolar_blocks(value: float) -> npt.NDArray[np.float64]:
    """+value on half of the lower blocks, -value on the other half (signed mean exactly 0)."""
    out = np.zeros((B, B))
    for i, (r, c) in enumerate(LOWER_BLOCKS):
        out[r, c] = value if i % 2 == 0 else -value
    return out


UP = cell_plant(11, 0.85, 0.5, -0.2)
DOWN = -cell_plant(12, 0.85, 0.5, -0.2)
BIPOLAR_MAP = cell_plant(13, 0.5, 0.5, -0.5)


def row(table: pd.DataFrame, layer: int) -> dict[str, Any]:
    rows = table[table["layer"] == layer].to_dict("records")
    assert len(rows) == 1
    return dict(rows[0])
