"""Benchmark: what attention capture costs next to a plain SDPA forward of the same model.

For each grid length T (default 448 and 2048) and a batch of B synthetic sequences of exactly T token ids, four
variants run on the decoder without its LM head:

1. ``sdpa``        ``base_model(model)(input_ids, attention_mask, use_cache=False)`` under ``torch.inference_mode()``
2. ``capture-1``   one attnscan batch (``GridCollector`` + ``run_collect``) capturing one layer (``--layer``,
                   default the middle one)
3. ``capture-all`` the same, capturing every layer
4. ``eager``       HF eager attention with ``output_attentions=True`` (every layer's weights returned), switched on
                   with ``model.set_attn_implementation("eager")`` and switched back afterwards

A capture call includes allocating its collector (the float64 sums and the per-batch buffer, ``[layers, T, T]``
each, plus small per-prompt summaries): they stay resident for a whole scan, so they belong to the scan's peak;
the ``accum MB`` column shows their share.

Each (variant, T) runs in a fresh Python process, so no variant inherits another's allocator state. There the
model is loaded, its weights are touched once (loading can leave them as file mappings that would otherwise be
paged in during the first call), and the first call is measured for memory; it doubles as the warm-up. Then come
up to ``--repeats`` timed calls without instrumentation; after the first, no new one starts once they have taken
``--budget-s`` seconds. The table gives their median.

Memory, and how it is measured:

- CUDA: ``torch.cuda.max_memory_allocated()`` over the call after ``reset_peak_memory_stats()``: the caching
  allocator's peak, weights included.
- CPU: there is no allocator statistic, so the call runs under ``torch.profiler`` with ``profile_memory=True``,
  which records every allocation and free made through PyTorch's CPU allocator, from every thread. The largest
  running sum of those events is the call's allocator peak (``growth MB``); ``peak MB`` adds the bytes of the model's
  parameters and buffers and of the inputs, so it compares with the CUDA number. Memory that kernels obtain outside
  PyTorch's allocator is not in it. Beside it, ``RSS MB`` is the peak resident-set growth of the same call
  (``VmHWM`` after a reset through ``/proc/self/clear_refs``, minus the RSS before, after ``malloc_trim``): it also
  counts memory malloc keeps after a free, so it is usually larger; "-" where the kernel mark cannot be reset.

Memory target: peak of the all-layer capture <= peak of the SDPA forward + one layer's attention weights
(B x heads x T x T x 4 bytes). Ratio targets beside the ratios to the SDPA forward: one layer <= 1.10x, all layers
<= 1.25x; the time ratio and the memory ratio are both checked against them. The 1-minute load average before and
after is printed because other work on the machine slows the timings.

Run ``python bench/capture.py`` (offline: the embedded model's GGUF is converted once to attnscan's cache). On the
2-core CPU it was written on, the default run took about 5 minutes; T=2048 dominates it. ``--model`` takes any spec
``attnscan.load_model`` reads, or ``preset:NAME`` for a random-weight model of an architecture preset
(``gpt-j-6b``, ``llama-3.1-8b``, ``mistral-7b-v0.1``; full size, so mind the memory).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

VARIANTS = ("sdpa", "capture-1", "capture-all", "eager")
TARGETS = {"capture-1": 1.10, "capture-all": 1.25}
MB = 1e6


# ----------------------------------------------------------------------------------------------------- memory meters


def _status_bytes(key: str) -> int | None:
    """A size field of ``/proc/self/status`` in bytes (Linux), or ``None``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _malloc_trim() -> None:
    """Give freed heap pages back to the kernel (glibc), so RSS growth during the next call is its own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class CpuMeter:
    """Peak bytes held by PyTorch's CPU allocator over one call, and the peak RSS growth beside it.

    The allocator peak comes from the profiler's memory events (``profile_memory=True``): every allocation and free
    through c10's CPU allocator, in time order, from every thread; their running sum's maximum is the CPU analogue
    of ``torch.cuda.max_memory_allocated`` minus what was already allocated. The RSS growth is ``VmHWM`` after
    resetting it through ``/proc/self/clear_refs``, minus the RSS before the call; it also counts memory outside
    PyTorch's allocator and what malloc keeps after a free, so it is at least as large, give or take page
    granularity.
    """

    method = "PyTorch CPU allocator events (torch.profiler, profile_memory=True)"

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, int]]:
        from torch.profiler import ProfilerActivity, profile

        out: dict[str, int] = {}
        gc.collect()
        _malloc_trim()
        rss_before = _status_bytes("VmRSS")
        hwm = _reset_hwm()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield out
        rss_peak = _status_bytes("VmHWM") if hwm else None
        if rss_before is not None and rss_peak is not None:
            out["rss_growth"] = max(0, rss_peak - rss_before)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for event in events:
            if str(event.device_type()).endswith("CPU"):
                live += event.nbytes()
                peak = max(peak, live)
        out["growth"] = peak


class CudaMeter:
    """``torch.cuda.max_memory_allocated`` over one call (absolute: weights included)."""

    method = "torch.cuda.max_memory_allocated"

    def __init__(self, device: Any) -> None:
        self.device = device

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, int]]:
        import torch

        out: dict[str, int] = {}
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        yield out
        torch.cuda.synchronize(self.device)
        out["peak"] = torch.cuda.max_memory_allocated(self.device)
        out["growth"] = out["peak"] - before


# ------------------------------------------------------------------------------------------------------------ worker


def _load(spec: str, dtype: str, device: str) -> Any:
    import torch

    import attnscan
    from attnscan.models import from_model, resolve_device, resolve_dtype

    if spec.startswith("preset:"):
        from attnscan.presets import build_random_model

        dev = resolve_device(device)
        model = build_random_model(spec.split(":", 1)[1], resolve_dtype(dtype, dev), dev, seed=0)
        return from_model(model, None, spec=spec)
    loaded = attnscan.load_model(spec, dtype=dtype, device=device)
    torch.set_grad_enabled(False)
    return loaded


def _calls(loaded: Any, variant: str, layer: int, ids: Any, mask: Any) -> Callable[[], dict[str, int]]:
    """A no-argument function running one call of ``variant``; it returns facts about what it held."""
    import torch

    from attnscan.accumulate import GridCollector
    from attnscan.capture import base_model
    from attnscan.runner import run_collect

    model, arch = loaded.model, loaded.arch
    base = base_model(model)
    batch, length = ids.shape
    seqs = ids.tolist()

    if variant == "sdpa":

        def sdpa() -> dict[str, int]:
            with torch.inference_mode():
                out = base(input_ids=ids, attention_mask=mask, use_cache=False)
            del out
            return {}

        return sdpa

    if variant in ("capture-1", "capture-all"):
        layers = (layer,) if variant == "capture-1" else tuple(range(arch.n_layers))

        def capture() -> dict[str, int]:
            collector = GridCollector("bench", layers, batch, length, device=loaded.device)
            run_collect(model, seqs, collector, route=arch.route, pad_id=0, batch_size=batch)
            if not bool(collector.seen.all()) or bool(collector.sink.isnan().any()):
                raise RuntimeError("the collector did not receive every captured layer")
            on_device = sum(
                t.numel() * t.element_size()
                for t in vars(collector).values()
                if isinstance(t, torch.Tensor) and t.device == loaded.device
            )
            return {"accumulator_bytes": on_device}

        return capture

    if variant == "eager":

        def eager() -> dict[str, int]:
            with torch.inference_mode():
                out = base(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True)
            attentions = out.attentions
            if attentions is None or len(attentions) != arch.n_layers or any(a is None for a in attentions):
                raise RuntimeError("eager attention did not return the weights of every layer")
            del out, attentions
            return {}

        return eager

    raise ValueError(f"unknown variant {variant}")


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one (variant, T) in this process and return its measurements."""
    import torch

    from attnscan.models import parse_layers

    loaded = _load(job["model"], job["dtype"], job["device"])
    model, arch, device = loaded.model, loaded.arch, loaded.device
    batch, length = job["batch_size"], job["length"]
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(job["seed"])
    ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    mask = torch.ones_like(ids)
    layer = arch.n_layers // 2 if job["layer"] is None else parse_layers(str(job["layer"]), arch.n_layers)[0]
    resident = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    resident += 2 * ids.numel() * ids.element_size()
    meter: CpuMeter | CudaMeter = CudaMeter(device) if device.type == "cuda" else CpuMeter()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.sum()  # page in weights that loading left as file mappings, so they do not count as growth
    call = _calls(loaded, job["variant"], layer, ids, mask)
    previous = model.config._attn_implementation
    if job["variant"] == "eager":
        model.set_attn_implementation("eager")
    try:
        with meter.measure() as mem:  # the first call is measured for memory and doubles as the warm-up
            t0 = time.perf_counter()
            facts = call()
            sync()
            first = time.perf_counter() - t0
        times: list[float] = []
        cpu_times: list[float] = []
        for _ in range(job["repeats"]):
            if times and sum(times) >= job["budget_s"]:
                break
            c0, t0 = time.process_time(), time.perf_counter()
            call()
            sync()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
    return {
        "variant": job["variant"],
        "length": length,
        "batch_size": batch,
        "layer": layer if job["variant"] == "capture-1" else None,
        "first_call_s": first,
        "times_s": times,
        "median_s": statistics.median(times),
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "peak_bytes": mem.get("peak", resident + mem["growth"]),
        "growth_bytes": mem["growth"],
        "rss_growth_bytes": mem.get("rss_growth"),
        "resident_bytes": resident,
        "accumulator_bytes": facts.get("accumulator_bytes", 0),
        "memory_method": meter.method,
        "arch": arch.as_dict(),
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


# ------------------------------------------------------------------------------------------------------------ driver


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a fresh interpreter (see the module docstring for why) and return its result."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"benchmark worker failed for {job['variant']} at T={job['length']} (exit {proc.returncode})")
    return dict(json.loads(lines[-1]))


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def _verdict(value: float, target: float | None) -> str:
    if target is None:
        return ""
    return "ok" if value <= target else "NO"


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The printed table and the memory-target lines."""
    arch, first = rows[0]["arch"], rows[0]
    cpu = first["device"] == "cpu"
    out = [
        f"attnscan capture benchmark: {meta['model']} ({arch['config_class']}, {arch['n_layers']} layers, "
        f"{arch['n_heads']} heads, {arch['n_kv_heads']} kv heads, head dim {arch['head_dim']}), "
        f"{first['device']}, {first['dtype']}, batch {meta['batch_size']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, {meta['threads']} torch threads",
        f"memory: {first['memory_method']}, measured on each variant's first call in a fresh process; peak = "
        + (
            f"model tensors and inputs ({first['resident_bytes'] / MB:.1f} MB) + allocator peak during the call "
            "(growth MB); RSS MB = peak RSS growth of that call (VmHWM), which also counts malloc's kept memory"
            if cpu
            else "allocator peak during the call, weights included; growth MB = peak minus what was allocated before"
        ),
        f"time: median wall time of timed calls after that first call (at most {meta['repeats']}, none started "
        f"after {meta['budget_s']:g} s; cpu s = median process CPU time of the same calls, all threads)",
        f"targets: 1 layer <= {TARGETS['capture-1']:.2f}x, all layers <= {TARGETS['capture-all']:.2f}x of the SDPA "
        "forward, checked for time (wall) and for memory (peak)",
        f"load average (1 min) before: {meta['load_before']}, after: {meta['load_after']} "
        "(other work on the machine slows the timings)",
        "",
    ]
    header = (
        f"{'T':>5}  {'variant':<28} {'time s':>8} {'n':>2} {'cpu s':>7} {'x sdpa':>7} {'ok':>3}  "
        f"{'peak MB':>9} {'x sdpa':>7} {'ok':>3}  {'target':>7}  {'growth MB':>9} "
        + (f"{'RSS MB':>8} " if cpu else "")
        + f"{'accum MB':>8}"
    )
    out += [header, "-" * len(header)]
    names = {
        "sdpa": "SDPA forward (no capture)",
        "capture-1": "capture 1 layer (L{layer})",
        "capture-all": f"capture all {arch['n_layers']} layers",
        "eager": "HF eager output_attentions",
    }
    target_lines = []
    for length in meta["lengths"]:
        at = {r["variant"]: r for r in rows if r["length"] == length}
        base = at.get("sdpa")
        for variant in VARIANTS:
            r = at.get(variant)
            if r is None:
                continue
            target = TARGETS.get(variant)
            tr = r["median_s"] / base["median_s"] if base else float("nan")
            mr = r["peak_bytes"] / base["peak_bytes"] if base else float("nan")
            rss = r.get("rss_growth_bytes")
            out.append(
                f"{length:>5}  {names[variant].format(layer=r['layer']):<28} {r['median_s']:8.3f} "
                f"{len(r['times_s']):>2} {r['median_cpu_s']:7.2f} {tr:6.2f}x {_verdict(tr, target):>3}  "
                f"{r['peak_bytes'] / MB:9.1f} "
                f"{mr:6.2f}x {_verdict(mr, target):>3}  {f'<={target:.2f}x' if target else '':>7}  "
                f"{r['growth_bytes'] / MB:9.1f} "
                + ((f"{rss / MB:8.1f} " if rss is not None else f"{'-':>8} ") if cpu else "")
                + f"{r['accumulator_bytes'] / MB:8.1f}"
            )
        out.append("")
        full = at.get("capture-all")
        if base is None or full is None:
            continue
        one_layer = meta["batch_size"] * arch["n_heads"] * length * length * 4
        bound = base["peak_bytes"] + one_layer
        holds = full["peak_bytes"] <= bound
        line = (
            f"memory target T={length}: all-layer capture peak {full['peak_bytes'] / MB:.1f} MB <= SDPA peak "
            f"{base['peak_bytes'] / MB:.1f} MB + one layer's weights {meta['batch_size']}x{arch['n_heads']}x"
            f"{length}x{length}x4 B = {one_layer / MB:.1f} MB = {bound / MB:.1f} MB: "
            + ("holds" if holds else f"does NOT hold, over by {(full['peak_bytes'] - bound) / MB:.1f} MB")
        )
        accum = full["accumulator_bytes"]
        line += (
            f"; the collector's accumulators are {accum / MB:.1f} MB of it (without them: "
            f"{(full['peak_bytes'] - accum) / MB:.1f} MB, {'within' if full['peak_bytes'] - accum <= bound else 'over'}"
            " the bound)"
        )
        target_lines.append(line)
    return out + target_lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model spec, or preset:NAME")
    parser.add_argument("--lengths", default="448,2048", help="comma-separated grid lengths T")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (after one warm-up)")
    parser.add_argument("--budget-s", type=float, default=20.0, help="no new timed call after this many seconds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--layer", type=int, default=None, help="layer of the single-layer case (default: middle)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not lengths or min(lengths) < 1 or args.batch_size < 1 or args.repeats < 1:
        parser.error(f"check --lengths, --batch-size, --repeats and --variants (unknown: {unknown})")
    import torch
    import transformers

    started = time.perf_counter()
    load_before = _load_average()
    rows: list[dict[str, Any]] = []
    for length in lengths:
        for variant in VARIANTS:
            if variant not in variants:
                continue
            job = {
                "model": args.model,
                "dtype": args.dtype,
                "device": args.device,
                "variant": variant,
                "length": length,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "budget_s": args.budget_s,
                "layer": args.layer,
                "seed": args.seed,
            }
            t0 = time.perf_counter()
            result = run_job(job)
            result["process_s"] = time.perf_counter() - t0
            rows.append(result)
            print(
                f"[{time.perf_counter() - started:6.1f} s] T={length} {variant}: median {result['median_s']:.3f} s "
                f"over {len(result['times_s'])}, peak {result['peak_bytes'] / MB:.1f} MB",
                file=sys.stderr,
                flush=True,
            )
    meta = {
        "model": args.model,
        "lengths": lengths,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": _load_average(),
    }
    lines = report(rows, meta)
    elapsed = time.perf_counter() - started
    lines.append(f"total wall time: {elapsed:.1f} s")
    print("\n".join(lines))
    if args.json is not None:
        payload = {**meta, "targets": TARGETS, "total_s": elapsed, "rows": rows, "table": lines}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
