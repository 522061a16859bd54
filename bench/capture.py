"""Benchmark: what attention capture costs next to a plain SDPA forward of the same model.

For each model, each batch size B (``--batch-sizes``, default 1 and 4) and each grid length T (``--lengths``,
default 448, 1024 and 2048), a batch of B synthetic sequences of exactly T token ids runs through the decoder
without its LM head in four variants:

1. ``sdpa``        ``base_model(model)(input_ids, attention_mask, use_cache=False)`` under ``torch.inference_mode()``
2. ``capture-1``   one attnscan batch (``GridCollector`` + ``run_collect``) capturing one layer (``--layer``,
                   default the middle one)
3. ``capture-all`` the same, capturing every layer
4. ``eager``       HF eager attention with ``output_attentions=True`` (every layer's weights returned), switched on
                   with ``model.set_attn_implementation("eager")`` and switched back afterwards

Every ratio (``x sdpa``) is to the SDPA forward of the same model, B and T in the same run.

A capture call includes allocating its collector (the float64 sums and the per-batch buffer, ``[layers, T, T]``
each, plus small per-prompt summaries): they stay resident for a whole scan, so they belong to the scan's peak;
the ``accum MB`` column shows their share.

Each (model, B, T, variant) runs in a fresh Python process, so no variant inherits another's allocator state. There
the model is loaded, its weights are touched once (loading can leave them as file mappings that would otherwise be
paged in during the first call), and the first call is measured for memory; it doubles as the warm-up. Then come
up to ``--repeats`` timed calls without instrumentation; after the first, no new one starts once they have taken
``--budget-s`` seconds. The table gives their median. A variant that runs out of memory (``torch.OutOfMemoryError``
or an allocator "out of memory" / "can't allocate memory" error, while loading, on the first call or on a timed
one) is caught in its process and shown as ``OOM`` in the table, and the run goes on; so does a worker that fails
otherwise (``error``) or is killed by a signal (``killed``: on Linux usually the kernel's OOM killer), but then the
script exits with status 1. On the CPU, where running out of memory summons the kernel's OOM killer rather than an
exception (and may hit other processes), the eager variant is ``skipped`` when the weights it returns
(B x layers x heads x T x T x element size) would exceed half of ``MemAvailable``; ``--no-memory-guard`` runs it
anyway.

Throughput:

- ``prompts/s`` = B / median time.
- ``TFLOP/s`` = F / median time / 1e12, with the forward's FLOPs F counted analytically, the same F for every
  variant of a (B, T), so a capture variant's TFLOP/s is the useful forward work it gets done per second:

      F = 2 * N * B * T  +  2 * 2 * L * H * d * B * T^2

  N = the non-embedding parameters of the decoder that runs: every parameter of the base model except its
  embedding tables (the LM head is not run and not counted; norm weights are in N, under 0.01 % of it). The first
  term is the weight matmuls (one multiply-add per weight per token). The second is the attention score matmul
  Q K^T and the value matmul P V, each 2 * T * T * d FLOPs per query head (L layers, H query heads of dimension d;
  grouped key-value heads do not change it), counted over the FULL T x T square, not the causal half: causal-
  unaware dense SDPA, the MFU convention of the PaLM paper. A causal-aware kernel (flash attention) does about half
  of that square, so the attention term overstates its work by up to 2x; at T = 448 the attention term is 1.7 %
  (Llama 3.1 8B, Mistral 7B) or 1.8 % (GPT-J 6B) of F, so counting the causal half instead would lower F by under
  1 %. Sliding windows are ignored (the presets' 4096-token window does not bite at T <= 2048).
- ``%peak`` = achieved TFLOP/s / the GPU's dense bf16 tensor-core peak, looked up by ``torch.cuda.get_device_name()``
  in ``BF16_PEAK_TFLOPS`` below (datasheet figures), "unknown" for a name not in it; ``--peak-tflops`` overrides the
  lookup (and gives the CPU a peak to compare with). Target: at least 40 % for the 8B architecture
  (``llama-3.1-8b``), checked on its SDPA forward and both capture variants.

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

Models:

- default: the embedded model (``smollm2-135m-instruct``; offline, its GGUF is converted once to attnscan's cache).
  ``--model`` takes any spec ``attnscan.load_model`` reads, or ``preset:NAME`` for a random-weight model of an
  architecture preset.
- ``--presets all`` (or a comma list of ``gpt-j-6b``, ``llama-3.1-8b``, ``mistral-7b-v0.1``) runs the reference
  architectures of ``attnscan.testing.presets`` one after the other, with random weights (seed 0), at full size; with
  ``--presets`` the defaults become T = 448 and bfloat16. Full size needs about 12-16 GB per process in bf16, so
  on the CPU the script refuses a full-size preset unless ``--no-memory-guard`` is given; ``--scale-layers``,
  ``--scale-hidden``, ``--scale-heads`` and ``--scale-vocab`` build ``attnscan.testing.presets.scaled_config`` instead
  (same attention structure, smaller; unset ones take ``scaled_config``'s defaults) to smoke-test the code path.

Commands:

    HF_HUB_OFFLINE=1 python bench/capture.py                          # embedded model, B in {1,4}, T in {448,1024,2048}
    HF_HUB_OFFLINE=1 python bench/capture.py --presets all            # GPU: the three presets, bf16, T=448, B in {1,4}
    HF_HUB_OFFLINE=1 python bench/capture.py --presets all --batch-sizes 1,4,16 --lengths 448,2048 --json out.json
    HF_HUB_OFFLINE=1 python bench/capture.py --presets llama-3.1-8b --scale-layers 2 --scale-hidden 256 \\
        --batch-sizes 1 --repeats 2                                   # CPU smoke run of the preset path
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

VARIANTS = ("sdpa", "capture-1", "capture-all", "eager")
TARGETS = {"capture-1": 1.10, "capture-all": 1.25}
PEAK_TARGET = 0.40  # share of the bf16 peak ...
PEAK_TARGET_PRESET = "llama-3.1-8b"  # ... for the 8B architecture
PEAK_VARIANTS = ("sdpa", "capture-1", "capture-all")  # the variants the share is checked on (eager is a baseline)
DEFAULT_MODEL = "smollm2-135m-instruct"
MB = 1e6
GB = 1e9

# Dense (no 2:4 sparsity) BF16 tensor-core peak in TFLOP/s, by a pattern searched (case-insensitively, first match
# wins) in torch.cuda.get_device_name(). NVIDIA's datasheets print the BF16 figure "with sparsity" (footnote *);
# the dense peak is half of it:
# - H100 SXM5 1,979* -> 989 (its device name is "NVIDIA H100 80GB HBM3"); H100 PCIe 1,513* -> 756; H100 NVL
#   1,671* -> 835: NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/h100/
# - H200 SXM 1,979* -> 989; H200 NVL 1,671* -> 835: NVIDIA H200 datasheet, https://www.nvidia.com/en-us/data-center/h200/
# - GH200 (the Hopper GPU of the Grace Hopper superchip) 1,979* -> 989:
#   https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/
# - A100 SXM4 and PCIe, 40 and 80 GB, 624* -> 312: NVIDIA A100 datasheet,
#   https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
# - L40S 733* -> 362 and L40 362.1* -> 181: https://www.nvidia.com/en-us/data-center/l40s/ and .../l40/
# - L4 242* -> 121: https://www.nvidia.com/en-us/data-center/l4/
# - A10 250* -> 125: https://www.nvidia.com/en-us/data-center/products/a10-gpu/ (not the A10G, which is not listed)
# More specific patterns come first ("GH200" before "H200", "H100 PCIe" before "H100", "L40S" before "L40").
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989.0),
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100", 989.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``device_name`` from ``BF16_PEAK_TFLOPS``, or ``None`` if unknown."""
    for pattern, peak in BF16_PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peak
    return None


def forward_flops(
    non_embedding_params: int, n_layers: int, n_heads: int, head_dim: int, batch: int, length: int
) -> dict[str, int]:
    """FLOPs of one forward of ``batch`` sequences of ``length`` tokens (see the module docstring).

    ``matmul`` = 2 * N * B * T (the weight matmuls); ``attention`` = 2 * 2 * L * H * d * B * T^2 (Q K^T and P V over
    the full T x T square, not the causal half); ``total`` = their sum.
    """
    matmul = 2 * non_embedding_params * batch * length
    attention = 2 * 2 * n_layers * n_heads * head_dim * batch * length * length
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


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


def _load(spec: str, dtype: str, device: str, scale: dict[str, int] | None) -> Any:
    import torch

    import attnscan
    from attnscan.models.loading import from_model, resolve_device, resolve_dtype

    torch.set_grad_enabled(False)
    if spec.startswith("preset:"):
        from attnscan.testing.presets import build_random_model, preset_config, scaled_config

        name = spec.split(":", 1)[1]
        config = scaled_config(name, **scale) if scale else preset_config(name)
        dev = resolve_device(device)
        model = build_random_model(config, resolve_dtype(dtype, dev), dev, seed=0)
        return from_model(model, None, spec=spec)
    return attnscan.load_model(spec, dtype=dtype, device=device)


def _is_oom(exc: BaseException) -> bool:
    """An accelerator out-of-memory error, or a failed CPU allocation that PyTorch turned into an exception."""
    from attnscan.engine.batching import is_out_of_memory

    return is_out_of_memory(exc) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc).lower())


def _non_embedding_params(base: Any) -> int:
    """Parameters of the decoder ``base`` minus its embedding tables (tied or shared parameters counted once)."""
    import torch

    embedding = {id(p) for m in base.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in base.parameters() if id(p) not in embedding)


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return str(device.type)


def _calls(loaded: Any, variant: str, layer: int, ids: Any, mask: Any) -> Callable[[], dict[str, int]]:
    """A no-argument function running one call of ``variant``; it returns facts about what it held."""
    import torch

    from attnscan.engine.accumulate import GridCollector
    from attnscan.engine.batching import run_collect
    from attnscan.models.anatomy import base_model

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


def _measure(job: dict[str, Any], row: dict[str, Any]) -> None:
    """Load, warm up and time one (model, B, T, variant), filling ``row`` as it goes (``stage`` says how far)."""
    import torch

    from attnscan.models.anatomy import base_model
    from attnscan.models.loading import parse_layers

    loaded = _load(job["model"], job["dtype"], job["device"], job.get("scale"))
    model, arch, device = loaded.model, loaded.arch, loaded.device
    batch, length = job["batch_size"], job["length"]
    non_embedding = _non_embedding_params(base_model(model))
    row.update(
        arch=arch.as_dict(),
        attention=str(model.config._attn_implementation),
        device=str(device),
        device_name=_device_name(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        non_embedding_params=non_embedding,
        flops=forward_flops(non_embedding, arch.n_layers, arch.n_heads, arch.head_dim, batch, length),
    )
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(job["seed"])
    ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    mask = torch.ones_like(ids)
    layer = arch.n_layers // 2 if job["layer"] is None else parse_layers(str(job["layer"]), arch.n_layers)[0]
    row["layer"] = layer if job["variant"] == "capture-1" else None
    resident = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    resident += 2 * ids.numel() * ids.element_size()
    meter: CpuMeter | CudaMeter = CudaMeter(device) if device.type == "cuda" else CpuMeter()
    row.update(resident_bytes=resident, memory_method=meter.method)

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
        row["stage"] = "first call"
        with meter.measure() as mem:  # the first call is measured for memory and doubles as the warm-up
            t0 = time.perf_counter()
            facts = call()
            sync()
            first = time.perf_counter() - t0
        row["stage"] = "timed calls"
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
    row.update(
        first_call_s=first,
        times_s=times,
        median_s=statistics.median(times),
        cpu_times_s=cpu_times,
        median_cpu_s=statistics.median(cpu_times),
        peak_bytes=mem.get("peak", resident + mem["growth"]),
        growth_bytes=mem["growth"],
        rss_growth_bytes=mem.get("rss_growth"),
        accumulator_bytes=facts.get("accumulator_bytes", 0),
    )
    del row["stage"]


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Run one (model, B, T, variant) in this process and return its measurements, or ``status: OOM``."""
    row: dict[str, Any] = {
        "model": job["model"],
        "scale": job.get("scale"),
        "variant": job["variant"],
        "batch_size": job["batch_size"],
        "length": job["length"],
        "status": "ok",
        "stage": "load",
    }
    try:
        _measure(job, row)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.update(status="OOM", error=f"{type(exc).__name__} during {row.pop('stage')}: {message[:300]}")
    return row


# ------------------------------------------------------------------------------------------------------------ driver


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a fresh interpreter (see the module docstring for why) and return its row.

    A worker that fails (traceback) or is killed by a signal gives a row with ``status`` ``error`` or ``killed``
    and its stderr's tail on this process's stderr, so the rest of the grid still runs.
    """
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
    if proc.returncode == 0 and lines:
        return dict(json.loads(lines[-1]))
    sys.stderr.write(proc.stderr[-4000:])
    tail = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode < 0:
        status, error = (
            "killed",
            f"killed by signal {-proc.returncode}" + (" (the kernel's OOM killer?)" if proc.returncode == -9 else ""),
        )
    else:
        status, error = "error", f"exit {proc.returncode}: {tail[-1][:300] if tail else 'no output'}"
    print(
        f"benchmark worker failed for {job['model']} {job['variant']} B={job['batch_size']} T={job['length']}: "
        + error,
        file=sys.stderr,
    )
    keys = ("model", "scale", "variant", "batch_size", "length")
    return {**{k: job.get(k) for k in keys}, "status": status, "error": error}


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


def _mem_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (Linux), or ``None``."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _eager_guard(job: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """Why the CPU eager job should not run (its returned weights would not fit in memory), or ``None``."""
    known = [r for r in rows if r["model"] == job["model"] and r.get("arch") and r.get("device") == "cpu"]
    available = _mem_available()
    if job["variant"] != "eager" or not known or available is None:
        return None
    arch, dtype = known[-1]["arch"], known[-1]["dtype"]
    itemsize = 2 if dtype in ("bfloat16", "float16") else 4 if dtype == "float32" else 8
    weights = job["batch_size"] * arch["n_layers"] * arch["n_heads"] * job["length"] ** 2 * itemsize
    if weights <= available / 2:
        return None
    return (
        f"its attention weights ({job['batch_size']}x{arch['n_layers']}x{arch['n_heads']}x{job['length']}^2x"
        f"{itemsize} B = {weights / GB:.1f} GB) exceed half of MemAvailable ({available / GB:.1f} GB); "
        "--no-memory-guard runs it"
    )


def _verdict(value: float, target: float | None) -> str:
    if target is None or value != value:  # no target, or NaN
        return ""
    return "ok" if value <= target else "NO"


def _num(x: float) -> str:
    """A positive number in at most 8 characters with 3-4 significant digits ("395.2", "1.234", "0.000623")."""
    if x >= 100:
        return f"{x:.1f}"
    if x >= 0.001:
        return f"{x:.4g}"
    return f"{x:.2e}"


def _preset_name(spec: str) -> str | None:
    return spec.split(":", 1)[1].strip().lower() if spec.startswith("preset:") else None


def derive(rows: list[dict[str, Any]], peak_tflops: float | None) -> None:
    """Add the ratios to the SDPA forward of the same (model, B, T), prompts/s, TFLOP/s and the share of the peak."""
    base = {
        (r["model"], r["batch_size"], r["length"]): r for r in rows if r["variant"] == "sdpa" and r["status"] == "ok"
    }
    for r in rows:
        if r["status"] != "ok":
            continue
        b = base.get((r["model"], r["batch_size"], r["length"]))
        r["time_ratio"] = r["median_s"] / b["median_s"] if b else None
        r["memory_ratio"] = r["peak_bytes"] / b["peak_bytes"] if b else None
        r["prompts_per_s"] = r["batch_size"] / r["median_s"]
        r["tflops"] = r["flops"]["total"] / r["median_s"] / 1e12
        r["peak_tflops"] = peak_tflops
        r["peak_fraction"] = r["tflops"] / peak_tflops if peak_tflops else None
        target = TARGETS.get(r["variant"])
        r["time_ok"] = None if target is None or r["time_ratio"] is None else r["time_ratio"] <= target
        r["memory_ok"] = None if target is None or r["memory_ratio"] is None else r["memory_ratio"] <= target
        checked = _preset_name(r["model"]) == PEAK_TARGET_PRESET and r["variant"] in PEAK_VARIANTS
        r["peak_ok"] = r["peak_fraction"] >= PEAK_TARGET if checked and r["peak_fraction"] is not None else None


def _model_title(spec: str, rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if r.get("arch")]
    scale = rows[0].get("scale")
    title = spec + (
        " scaled (" + ", ".join(f"{k}={v}" for k, v in scale.items()) + "; attnscan.testing.presets.scaled_config)"
        if scale
        else ""
    )
    if not done:
        return f"== {title}: no variant got as far as loading the model"
    arch, first = done[0]["arch"], done[0]
    return (
        f"== {title}: {arch['config_class']}, {arch['n_layers']} layers, {arch['n_heads']} heads, "
        f"{arch['n_kv_heads']} kv heads, head dim {arch['head_dim']}, "
        f"{first['non_embedding_params'] / 1e6:.1f} M non-embedding parameters; {first['device']} "
        f"({first['device_name']}), {first['dtype']}"
        + (
            f"; NOTE: this transformers gives {arch['config_class']} no SDPA, so the plain forward (the 'x sdpa' "
            f"baseline) uses {first['attention']} attention"
            if first.get("attention", "sdpa") != "sdpa"
            else ""
        )
    )


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The printed tables and the target lines, one section per model."""
    done = [r for r in rows if r["status"] == "ok"]
    first = done[0] if done else {}
    cpu = first.get("device", "cpu") == "cpu"
    peak = meta["peak_tflops"]
    out = [
        f"attnscan capture benchmark: torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['threads']} torch threads; batch sizes {meta['batch_sizes']}, lengths {meta['lengths']}",
        f"memory: {first.get('memory_method', '-')}, measured on each variant's first call in a fresh process; peak = "
        + (
            "model tensors and inputs + allocator peak during the call (growth MB); RSS MB = peak RSS growth of that "
            "call (VmHWM), which also counts malloc's kept memory"
            if cpu
            else "allocator peak during the call, weights included; growth MB = peak minus what was allocated before"
        ),
        f"time: median wall time of timed calls after that first call (at most {meta['repeats']}, none started "
        f"after {meta['budget_s']:g} s"
        + ("; cpu s = median process CPU time of the same calls, all threads)" if cpu else ")"),
        "throughput: prompts/s = B / time; TFLOP/s = (2 x non-embedding params x B x T + 4 x layers x heads x "
        "head dim x B x T^2, full T x T square) / time",
        f"bf16 peak: {meta['device_name']}: "
        + (f"{peak:g} TFLOP/s ({meta['peak_source']})" if peak else "unknown (give --peak-tflops)")
        + (
            f"; the run's dtype is {first['dtype']}, %peak is still against the bf16 peak"
            if peak and first and first.get("dtype") != "bfloat16"
            else ""
        ),
        f"targets: 1 layer <= {TARGETS['capture-1']:.2f}x, all layers <= {TARGETS['capture-all']:.2f}x of the SDPA "
        f"forward of the same B and T, checked for time (wall) and for memory (peak); >= {PEAK_TARGET:.0%} of the "
        f"bf16 peak for {PEAK_TARGET_PRESET} ({', '.join(PEAK_VARIANTS)})",
        f"load average (1 min) before: {meta['load_before']}, after: {meta['load_after']} "
        "(other work on the machine slows the timings)",
    ]
    header = (
        f"{'B':>3} {'T':>5}  {'variant':<28} {'time s':>8} {'n':>2} "
        + (f"{'cpu s':>7} " if cpu else "")
        + f"{'prompts/s':>9} {'TFLOP/s':>8} {'%peak':>6} {'ok':>3}  {'x sdpa':>7} {'ok':>3}  "
        f"{'peak MB':>9} {'x sdpa':>7} {'ok':>3}  {'target':>7}  {'growth MB':>9} "
        + (f"{'RSS MB':>8} " if cpu else "")
        + f"{'accum MB':>8}"
    )
    for spec in meta["models"]:
        mine = [r for r in rows if r["model"] == spec]
        if not mine:
            continue
        known = next((r for r in mine if r.get("arch")), None)
        n_layers = known["arch"]["n_layers"] if known else "?"
        names = {
            "sdpa": "SDPA forward (no capture)",
            "capture-1": "capture 1 layer (L{layer})",
            "capture-all": f"capture all {n_layers} layers",
            "eager": "HF eager output_attentions",
        }
        out += ["", _model_title(spec, mine), "", header, "-" * len(header)]
        target_lines: list[str] = []
        for batch in meta["batch_sizes"]:
            for length in meta["lengths"]:
                at = {r["variant"]: r for r in mine if r["length"] == length and r["batch_size"] == batch}
                if not at:
                    continue
                for variant in VARIANTS:
                    r = at.get(variant)
                    if r is None:
                        continue
                    label = names[variant].format(layer=r.get("layer"))
                    if r["status"] != "ok":
                        out.append(f"{batch:>3} {length:>5}  {label:<28} {r['status']}: {r.get('error', '')}")
                        continue
                    target = TARGETS.get(variant)
                    tr = r["time_ratio"] if r["time_ratio"] is not None else float("nan")
                    mr = r["memory_ratio"] if r["memory_ratio"] is not None else float("nan")
                    frac = r["peak_fraction"]
                    peak_ok = "" if r["peak_ok"] is None else "ok" if r["peak_ok"] else "NO"
                    rss = r.get("rss_growth_bytes")
                    out.append(
                        f"{batch:>3} {length:>5}  {label:<28} {r['median_s']:8.3f} {len(r['times_s']):>2} "
                        + (f"{r['median_cpu_s']:7.2f} " if cpu else "")
                        + f"{_num(r['prompts_per_s']):>9} {_num(r['tflops']):>8} "
                        + (f"{frac:6.1%}" if frac is not None else f"{'-':>6}")
                        + f" {peak_ok:>3}  {tr:6.2f}x {_verdict(tr, target):>3}  {r['peak_bytes'] / MB:9.1f} "
                        f"{mr:6.2f}x {_verdict(mr, target):>3}  {f'<={target:.2f}x' if target else '':>7}  "
                        f"{r['growth_bytes'] / MB:9.1f} "
                        + ((f"{rss / MB:8.1f} " if rss is not None else f"{'-':>8} ") if cpu else "")
                        + f"{r['accumulator_bytes'] / MB:8.1f}"
                    )
                target_lines += _target_lines(spec, batch, length, at, peak)
        out += ["", *target_lines]
    return out


def _target_lines(spec: str, batch: int, length: int, at: dict[str, dict[str, Any]], peak: float | None) -> list[str]:
    """The memory-target line and, for the 8B preset, the bf16-peak line of one (model, B, T)."""
    lines = []
    base, full = at.get("sdpa"), at.get("capture-all")
    if base and full and base["status"] == "ok" and full["status"] == "ok":
        arch = full["arch"]
        one_layer = batch * arch["n_heads"] * length * length * 4
        bound = base["peak_bytes"] + one_layer
        holds = full["peak_bytes"] <= bound
        accum = full["accumulator_bytes"]
        lines.append(
            f"memory target B={batch} T={length}: all-layer capture peak {full['peak_bytes'] / MB:.1f} MB <= SDPA "
            f"peak {base['peak_bytes'] / MB:.1f} MB + one layer's weights {batch}x{arch['n_heads']}x"
            f"{length}x{length}x4 B = {one_layer / MB:.1f} MB = {bound / MB:.1f} MB: "
            + ("holds" if holds else f"does NOT hold, over by {(full['peak_bytes'] - bound) / MB:.1f} MB")
            + f"; the collector's accumulators are {accum / MB:.1f} MB of it (without them: "
            f"{(full['peak_bytes'] - accum) / MB:.1f} MB, "
            f"{'within' if full['peak_bytes'] - accum <= bound else 'over'} the bound)"
        )
    if _preset_name(spec) == PEAK_TARGET_PRESET:
        head = f"bf16 peak target B={batch} T={length} ({PEAK_TARGET_PRESET}, >= {PEAK_TARGET:.0%} of "
        scaled = any(r.get("scale") for r in at.values())
        note = " [scaled model: exercises the code path, not the 8B figure]" if scaled else ""
        if not peak:
            lines.append(head + "the bf16 peak): not checked, the peak of this device is unknown" + note)
        else:
            parts = []
            for variant in PEAK_VARIANTS:
                r = at.get(variant)
                if r is None:
                    continue
                if r["status"] != "ok":
                    parts.append(f"{variant} {r['status']}")
                else:
                    parts.append(
                        f"{variant} {_num(r['tflops'])} TFLOP/s = {r['peak_fraction']:.1%} "
                        + ("ok" if r["peak_ok"] else "NO")
                    )
            lines.append(head + f"{peak:g} TFLOP/s): " + ", ".join(parts) + note)
    return lines


def _parse_ints(text: str, what: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{what}: give comma-separated whole numbers, not '{text}'")
    if not values or min(values) < 1:
        parser.error(f"{what}: give one or more positive numbers, not '{text}'")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default=None, help=f"model spec, or preset:NAME (default {DEFAULT_MODEL})")
    parser.add_argument(
        "--presets",
        default=None,
        help="'all' or a comma list of attnscan.testing.presets names: random-weight reference architectures, one "
        "after the other (defaults then T=448 and bfloat16)",
    )
    parser.add_argument(
        "--lengths", default=None, help="comma-separated grid lengths T (default 448,1024,2048; 448 with --presets)"
    )
    parser.add_argument(
        "--batch-sizes",
        "--batch-size",
        dest="batch_sizes",
        default="1,4",
        help="comma-separated batch sizes B (default 1,4)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant (after one warm-up)")
    parser.add_argument("--budget-s", type=float, default=20.0, help="no new timed call after this many seconds")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype", default=None, help="auto, float32, bfloat16 or float16 (default auto; bfloat16 with --presets)"
    )
    parser.add_argument("--layer", type=int, default=None, help="layer of the single-layer case (default: middle)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="bf16 peak to compare with, instead of the table lookup by GPU name",
    )
    scale = parser.add_argument_group("scaled presets (smoke runs of the preset path, e.g. on the CPU)")
    scale.add_argument("--scale-layers", type=int, default=None, help="layers of a scaled preset")
    scale.add_argument("--scale-hidden", type=int, default=None, help="hidden size (a multiple of the heads)")
    scale.add_argument(
        "--scale-heads", type=int, default=None, help="query heads (a multiple of the preset's query heads per kv head)"
    )
    scale.add_argument("--scale-vocab", type=int, default=None, help="vocabulary size")
    parser.add_argument(
        "--no-memory-guard",
        action="store_true",
        help="run CPU eager jobs and full-size CPU presets even where they look too big for memory",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch
    import transformers

    from attnscan.errors import AttnscanError
    from attnscan.models.loading import resolve_device, resolve_dtype
    from attnscan.testing.presets import PRESETS, get_preset, param_count, scaled_config

    if args.presets is not None and args.model is not None:
        parser.error("give --model or --presets, not both")
    if args.presets is not None:
        names = (
            list(PRESETS)
            if args.presets.strip().lower() == "all"
            else [n.strip() for n in args.presets.split(",") if n.strip()]
        )
        models = [f"preset:{n}" for n in names]
    else:
        models = [args.model or DEFAULT_MODEL]
    lengths = _parse_ints(args.lengths or ("448" if args.presets is not None else "448,1024,2048"), "--lengths", parser)
    batch_sizes = _parse_ints(args.batch_sizes, "--batch-sizes", parser)
    dtype = args.dtype or ("bfloat16" if args.presets is not None else "auto")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants or args.repeats < 1:
        parser.error(f"check --repeats and --variants (unknown: {unknown})")
    given = {
        "layers": args.scale_layers,
        "hidden_size": args.scale_hidden,
        "heads": args.scale_heads,
        "vocab_size": args.scale_vocab,
    }
    scale_args = {k: v for k, v in given.items() if v is not None}
    try:
        device = resolve_device(args.device)
        torch_dtype = resolve_dtype(dtype, device)
        for spec in models:
            name = _preset_name(spec)
            if name is None:
                if scale_args:
                    parser.error(f"--scale-* apply to preset models only, not '{spec}'")
                continue
            get_preset(name)
            if scale_args:
                scaled_config(name, **scale_args)  # fail here, not in every worker, on a bad combination
                continue
            if device.type == "cpu" and not args.no_memory_guard:
                need = param_count(name) * torch_dtype.itemsize
                available = _mem_available()
                parser.error(
                    f"{spec} at full size needs {need / GB:.1f} GB of weights in {torch_dtype} per worker process"
                    + (f" (MemAvailable: {available / GB:.1f} GB)" if available is not None else "")
                    + " and its forwards take minutes on a CPU: run it on a GPU, or smoke-test the preset path "
                    "scaled, e.g. --scale-layers 2 --scale-hidden 256 (--no-memory-guard runs it anyway)"
                )
    except AttnscanError as exc:
        parser.error(str(exc))

    started = time.perf_counter()
    load_before = _load_average()
    rows: list[dict[str, Any]] = []
    for spec in models:
        for batch in batch_sizes:
            for length in lengths:
                for variant in VARIANTS:
                    if variant not in variants:
                        continue
                    job = {
                        "model": spec,
                        "scale": scale_args if _preset_name(spec) and scale_args else None,
                        "dtype": dtype,
                        "device": args.device,
                        "variant": variant,
                        "length": length,
                        "batch_size": batch,
                        "repeats": args.repeats,
                        "budget_s": args.budget_s,
                        "layer": args.layer,
                        "seed": args.seed,
                    }
                    why = None if args.no_memory_guard else _eager_guard(job, rows)
                    t0 = time.perf_counter()
                    if why is not None:
                        keys = ("model", "scale", "variant", "batch_size", "length")
                        result = {**{k: job[k] for k in keys}, "status": "skipped", "error": why}
                    else:
                        result = run_job(job)
                    result["process_s"] = time.perf_counter() - t0
                    rows.append(result)
                    progress = (
                        f"median {result['median_s']:.3f} s over {len(result['times_s'])}, peak "
                        f"{result['peak_bytes'] / MB:.1f} MB"
                        if result["status"] == "ok"
                        else f"{result['status']}: {result.get('error', '')}"
                    )
                    print(
                        f"[{time.perf_counter() - started:6.1f} s] {spec} B={batch} T={length} {variant}: {progress}",
                        file=sys.stderr,
                        flush=True,
                    )
    device_name = next((r["device_name"] for r in rows if r.get("device_name")), str(device))
    on_cuda = any(r.get("device", "").startswith("cuda") for r in rows)
    if args.peak_tflops is not None:
        peak, source = args.peak_tflops, "given with --peak-tflops"
    else:
        peak = bf16_peak_tflops(device_name) if on_cuda else None
        source = "dense bf16 datasheet figure for this GPU name, BF16_PEAK_TFLOPS in bench/capture.py"
    derive(rows, peak)
    meta = {
        "models": models,
        "scale": scale_args or None,
        "lengths": lengths,
        "batch_sizes": batch_sizes,
        "dtype": dtype,
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device_name": device_name,
        "peak_tflops": peak,
        "peak_source": source if peak else None,
        "flops_formula": "2 * non_embedding_params * B * T + 2 * 2 * layers * heads * head_dim * B * T^2 "
        "(full T x T square, not the causal half)",
        "load_before": load_before,
        "load_after": _load_average(),
    }
    lines = report(rows, meta)
    elapsed = time.perf_counter() - started
    failed = [r for r in rows if r["status"] in ("error", "killed")]
    lines.append(f"total wall time: {elapsed:.1f} s" + (f"; {len(failed)} worker(s) failed" if failed else ""))
    print("\n".join(lines))
    if args.json is not None:
        targets = {**TARGETS, "peak_fraction": PEAK_TARGET, "peak_fraction_preset": PEAK_TARGET_PRESET}
        payload = {**meta, "targets": targets, "total_s": elapsed, "rows": rows, "table": lines}
        args.json.write_text(json.dumps(payload, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
