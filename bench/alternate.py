"""Benchmark: capture against a plain SDPA forward, the variants alternating in ONE process on the same weights.

``bench/capture.py`` runs each variant in a fresh process, which is right for memory but lets machine noise (other
work on a shared CPU) fall on one variant and not another. Here one process loads the model once and, for each
batch size B and grid length T, runs the variants in turn, round after round (A B C D, then B C D A, ...: the
order rotates so that no variant always follows the same one):

- ``sdpa``, ``capture-1``, ``capture-all``, ``eager``: the calls of ``bench/capture.py`` (same synthetic inputs);
- ``capture-all-eager``: ``capture-all`` with the chunked path switched off (every captured layer on eager
  attention, as the engine was before the chunked path);
- ``capture-all-maps``: ``capture-all`` with the collector declining chunks of rows (``take_rows`` returns
  ``None``), so every captured layer builds its whole ``[B, T, T]`` head mean first, as with relative alignment or
  left padding (and as the chunked path did before the collector took rows).

Each round gives every variant's time divided by the SDPA time of the same round; the table shows, over the
rounds, the median of that ratio and its spread (lowest and highest, and the interquartile range), so noise that
slows a whole round cancels out.

The first call of each variant is a warm-up and is measured for memory instead of time: on the CPU the allocator
peak from ``torch.profiler`` (``growth MB``: the most bytes the call held at once beyond what existed before it,
the capture variants' collector included; ``accum MB`` is the collector's own share), on CUDA
``max_memory_allocated`` minus what was allocated before. ``mem x`` is a variant's growth over the SDPA growth.

On the CPU the eager variant is skipped where the weights it returns (B x layers x heads x T^2 x element size) would
exceed half of ``MemAvailable``.

Commands (the lead's table; the quick ones took a few minutes on 2 shared cores):

    HF_HUB_OFFLINE=1 python bench/alternate.py --batch-sizes 1,8 --lengths 448,1024,2048 --rounds 5
    HF_HUB_OFFLINE=1 python bench/alternate.py --batch-sizes 1 --lengths 448,2048 --rounds 3    # quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

MB = 1e6


def _capture_bench() -> ModuleType:
    """``bench/capture.py`` as a module: its variants, loader and memory meters are reused, not copied."""
    spec = importlib.util.spec_from_file_location("bench_capture", Path(__file__).with_name("capture.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


EXTRA = ("capture-all-eager", "capture-all-maps")
"""Variants of this benchmark that ``bench/capture.py`` does not have (see the module docstring)."""


def _eager_fits(arch: Any, dtype: Any, batch: int, length: int, available: int | None) -> bool:
    itemsize = 2 if "16" in str(dtype) else 4 if "32" in str(dtype) else 8
    need = batch * arch.n_layers * arch.n_heads * length**2 * itemsize
    return available is None or need <= available / 2


def _call(cb: ModuleType, loaded: Any, variant: str, layer: int, ids: Any, mask: Any) -> Any:
    """``bench/capture.py``'s call of ``variant``; ``capture-all-eager`` and ``capture-all-maps`` are
    ``capture-all`` with the chunked path switched off, or with whole maps instead of chunks of rows (see above)."""
    if variant not in EXTRA:
        return cb._calls(loaded, variant, layer, ids, mask)
    import functools

    from attnscan.engine import accumulate, batching

    inner = cb._calls(loaded, "capture-all", layer, ids, mask)
    capture, take_rows = batching.capture_attention, accumulate.GridCollector.take_rows

    def call() -> dict[str, int]:
        if variant == "capture-all-eager":
            batching.capture_attention = functools.partial(capture, chunked=False)  # type: ignore[assignment]
        else:
            accumulate.GridCollector.take_rows = lambda self, layer: None  # type: ignore[method-assign,assignment]
        try:
            facts: dict[str, int] = inner()
        finally:
            batching.capture_attention = capture  # type: ignore[assignment]
            accumulate.GridCollector.take_rows = take_rows  # type: ignore[method-assign]
        return facts

    return call


def measure(cb: ModuleType, loaded: Any, batch: int, length: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Warm up and memory-measure every variant once, then time ``args.rounds`` alternating rounds."""
    import torch

    model, arch, device = loaded.model, loaded.arch, loaded.device
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, int(model.config.vocab_size), (batch, length), generator=gen).to(device)
    mask = torch.ones_like(ids)
    variants = list(args.variants)
    if "eager" in variants and device.type == "cpu" and not args.no_memory_guard:
        dtype = next(model.parameters()).dtype
        if not _eager_fits(arch, dtype, batch, length, cb._mem_available()):
            variants.remove("eager")
            print(f"B={batch} T={length}: eager skipped (its weights would exceed half of MemAvailable)")
    layer = arch.n_layers // 2 if args.layer is None else args.layer
    calls = {v: _call(cb, loaded, v, layer, ids, mask) for v in variants}
    previous = model.config._attn_implementation

    def run(variant: str) -> dict[str, int]:
        if variant == "eager":
            model.set_attn_implementation("eager")
        try:
            facts: dict[str, int] = calls[variant]()
        finally:
            if model.config._attn_implementation != previous:
                model.set_attn_implementation(previous)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return facts

    rows = {v: {"variant": v, "batch_size": batch, "length": length, "times_s": []} for v in variants}
    for v in variants:  # warm-up, measured for memory
        meter = cb.CudaMeter(device) if device.type == "cuda" else cb.CpuMeter()
        with meter.measure() as mem:
            facts = run(v)
        rows[v].update(growth_bytes=mem["growth"], accumulator_bytes=facts.get("accumulator_bytes", 0))
    for r in range(args.rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            t0 = time.perf_counter()
            run(v)
            rows[v]["times_s"].append(time.perf_counter() - t0)
    base = rows["sdpa"]["times_s"] if "sdpa" in rows else None
    for row in rows.values():
        times = row["times_s"]
        row["median_s"] = statistics.median(times)
        if base:
            ratios = [t / b for t, b in zip(times, base, strict=True)]
            row["ratios"] = ratios
            row["ratio_median"] = statistics.median(ratios)
            row["ratio_min"], row["ratio_max"] = min(ratios), max(ratios)
            row["ratio_q1"], row["ratio_q3"] = _quantile(ratios, 0.25), _quantile(ratios, 0.75)
            row["mem_ratio"] = row["growth_bytes"] / max(1, rows["sdpa"]["growth_bytes"])
    return list(rows.values())


def report(rows: list[dict[str, Any]]) -> list[str]:
    head = f"{'B':>3} {'T':>5} {'variant':<12} {'median s':>9} {'x sdpa':>7} {'min-max':>13} {'IQR':>13}"
    lines = [head + f" {'growth MB':>10} {'accum MB':>9} {'mem x':>6}"]
    for r in rows:
        if "ratio_median" in r:
            ratio = f"{r['ratio_median']:7.2f} {r['ratio_min']:6.2f}-{r['ratio_max']:<6.2f} "
            ratio += f"{r['ratio_q1']:6.2f}-{r['ratio_q3']:<6.2f}"
        else:
            ratio = f"{'-':>7} {'-':>13} {'-':>13}"
        lines.append(
            f"{r['batch_size']:>3} {r['length']:>5} {r['variant']:<12} {r['median_s']:9.3f} {ratio} "
            f"{r['growth_bytes'] / MB:10.1f} {r['accumulator_bytes'] / MB:9.1f} {r.get('mem_ratio', float('nan')):6.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model spec (default the embedded model)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--lengths", default="448,1024,2048", help="comma-separated grid lengths T")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per (B, T) (default 5)")
    parser.add_argument("--variants", default="sdpa,capture-all,capture-1,eager", help="comma list; sdpa first")
    parser.add_argument("--layer", type=int, default=None, help="layer of capture-1 (default the middle one)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale-layers", type=int, default=None, help="with --model preset:NAME: a scaled preset")
    parser.add_argument("--scale-hidden", type=int, default=None, help="hidden size of a scaled preset")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's own)")
    parser.add_argument("--no-memory-guard", action="store_true", help="run CPU eager even where it looks too big")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.rounds < 1 or not args.variants or args.variants[0] != "sdpa":
        parser.error("--rounds must be at least 1 and --variants must start with sdpa (the ratios' reference)")
    cb = _capture_bench()
    if any(v not in (*cb.VARIANTS, *EXTRA) for v in args.variants):
        parser.error(f"--variants: choose among {', '.join(cb.VARIANTS)}")
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    scale = {k: v for k, v in (("layers", args.scale_layers), ("hidden_size", args.scale_hidden)) if v is not None}
    loaded = cb._load(args.model, args.dtype, args.device, scale or None)

    with torch.inference_mode():
        for tensor in (*loaded.model.parameters(), *loaded.model.buffers()):
            tensor.sum()  # page in weights that loading left as file mappings
    where = f"{loaded.device} ({cb._device_name(loaded.device)}, {torch.get_num_threads()} threads)"
    print(f"{args.model} on {where}, load average {cb._load_average()}")
    rows: list[dict[str, Any]] = []
    for batch in (int(x) for x in args.batch_sizes.split(",")):
        for length in (int(x) for x in args.lengths.split(",")):
            new = measure(cb, loaded, batch, length, args)
            rows.extend(new)
            print("\n".join(report(new)[1 if len(rows) > len(new) else 0 :]), flush=True)
    print(f"load average after: {cb._load_average()}")
    if args.json is not None:
        args.json.write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
