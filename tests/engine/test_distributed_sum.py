"""Two real processes reduce their collectors over gloo: the state every rank ends with equals one process that saw
every prompt (not a group of one, where any reduction leaves the state unchanged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnscan.engine.accumulate import GridCollector
from attnscan.engine.distributed import all_reduce_state, shard

LAYERS = (0, 2)
T = 8
LENGTHS = (3, 8, 5, 6, 2)  # prompt i has LENGTHS[i] tokens


def _weights(pid: int, layer: int) -> torch.Tensor:
    """A fixed random causal map ``[1, 2 heads, n, n]`` for prompt ``pid`` and ``layer``."""
    n = LENGTHS[pid]
    rng = np.random.default_rng(100 * pid + layer)
    p = np.where(np.tril(np.ones((n, n), dtype=bool)), rng.uniform(0.1, 1, (2, n, n)), 0.0)
    return torch.tensor(p / p.sum(-1, keepdims=True), dtype=torch.float32)[None]


def _collect(pids: list[int]) -> GridCollector:
    """A collector fed the prompts ``pids`` one at a time."""
    col = GridCollector("s", LAYERS, len(LENGTHS), T, n_blocks=2)
    for pid in pids:
        col.begin([pid], [0], [LENGTHS[pid]])
        for layer in LAYERS:
            col.add(layer, _weights(pid, layer))
        col.end()
    return col


def _rank(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/group", rank=rank, world_size=world)
    try:
        col = _collect(shard(len(LENGTHS), rank, world))
        all_reduce_state(col)
        torch.save(col.state(), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_sum_to_the_single_process_state(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    whole = _collect(list(range(len(LENGTHS)))).state()
    rank0 = _collect(shard(len(LENGTHS), 0, 2)).state()
    assert not torch.equal(rank0["count"], whole["count"])  # each rank alone holds only part of the counts
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in whole.items():
            assert got[key].dtype == value.dtype, key
            torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12, equal_nan=True, msg=key)
    assert bool(whole["seen"].all())
