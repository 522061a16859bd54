"""Accelerator checks that the CPU-only test suite cannot make: run once on a machine with a GPU.

    HF_HUB_OFFLINE=1 python bench/gpu_check.py --json gpu_check.json      # about 1-2 minutes on one H100

What it checks, on ``--device`` (default ``cuda``):

1. **Capture on the device against HF eager on the CPU.** For every tiny architecture of the test suite (Llama with
   llama3 rope scaling and GQA, Mistral and Gemma3 with sliding windows, GPT-J, GPT-2, GPT-Neo), random weights,
   prompts shorter and longer than the grid, right and left padding, batch 3: the collector on the device (which
   keeps each batch's sums in its float32 device buffer) against the float32 eager reference, one prompt at a
   time, on the CPU. float32 must agree within ``1e-4``, bfloat16 within ``2e-2``; counts must be equal.
2. **Out-of-memory back-off for real.** A tiny Llama at T = 2048 started at a batch size whose attention weights
   cannot fit the device must back off (``torch.OutOfMemoryError`` from the allocator, not a simulated one) and
   end with the same sums as a batch-by-one run.
3. **A scan end to end.** ``attnscan.scan`` in bfloat16 on the device with the automatic batch size, against the
   same scan in float32 on the CPU: equal counts, the mean absolute difference of the log maps (< 0.1 nats) and the
   correlation of the Difference maps (> 0.98), worst layer. The model is the embedded SmolLM2-135M-Instruct with
   the built-in sets when its package is installed; else (or with ``--stand-in``) a random-weight model with
   Llama-3.1-8B's attention structure scaled to 8 layers and random word prompts.
4. **A full-size 8B scan** (CUDA): Llama-3.1-8B with random weights in bfloat16, all 32 layers at T = 448, the
   automatic batch size: where the batch size settled, prompts/s, peak memory.
5. **nccl** (gloo on the CPU): a collector's state all-reduced in a group of one comes back unchanged (the
   tensors and dtypes that torchrun's data-parallel scans reduce; a group of two needs two GPUs).

Each check prints one line (PASS/FAIL and its numbers); the exit status is 1 if any failed. ``--json`` also writes
the numbers. With ``--device cpu`` the script runs checks 1, 3 and 5 on the CPU (checks 2 and 4 need CUDA); the test
suite runs it that way so that it cannot rot unnoticed. On a lent GPU machine (packages there, none installed from
the project) run it from the repository root as ``PYTHONPATH=src python3 bench/gpu_check.py``.

A data-parallel scan over nccl needs two GPUs (nccl refuses two ranks on one device): on a multi-GPU machine run
``torchrun --nproc-per-node 2 -m attnscan scan ...`` against a single-process scan by hand.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the GPU machine runs attnscan from the source tree, not installed

from attnscan.engine.accumulate import GridCollector  # noqa: E402
from attnscan.engine.batching import run_collect  # noqa: E402
from attnscan.errors import AttnscanError  # noqa: E402
from attnscan.models.loading import from_model  # noqa: E402
from attnscan.testing.tiny import BUILDERS, build_model, eager_reference, random_prompts, tiny_tokenizer  # noqa: E402

LENGTH = 12
LENGTHS = (3, 7, 12, 15, 9, 20, 5)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _max_error(mean: torch.Tensor, ref: torch.Tensor) -> float:
    return float((mean - ref).nan_to_num(0.0).abs().max())


def check_capture(device: torch.device, archs: list[str]) -> list[dict[str, Any]]:
    """Check 1: each tiny architecture, float32 and bfloat16, right and left padding."""
    rows = []
    for arch in archs:
        reference = build_model(arch, seed=4)
        layers = tuple(range(reference.config.num_hidden_layers))
        seqs = [s[:LENGTH] for s in random_prompts(LENGTHS, seed=9)]
        ref, count = eager_reference(reference, seqs, layers, LENGTH)
        for dtype in (torch.float32, torch.bfloat16):
            model = copy.deepcopy(reference).to(device=device, dtype=dtype)
            route = from_model(model, None).arch.route
            for side in ("right", "left"):
                col = GridCollector("s", layers, len(seqs), LENGTH, device=device)
                run_collect(model, seqs, col, route=route, pad_id=0, batch_size=3, padding_side=side)  # type: ignore[arg-type]
                result = col.result()
                err = max(_max_error(result.mean(layer), ref[layer]) for layer in layers)
                nan_same = all(torch.equal(result.mean(layer).isnan(), ref[layer].isnan()) for layer in layers)
                ok = torch.equal(result.count, count) and nan_same and err < TOLERANCE[dtype]
                rows.append(
                    {
                        "check": "capture",
                        "arch": arch,
                        "dtype": str(dtype).removeprefix("torch."),
                        "padding": side,
                        "buffered": col._buf is not None,
                        "max_error": err,
                        "tolerance": TOLERANCE[dtype],
                        "ok": ok,
                    }
                )
            del model
    return rows


def check_backoff(device: torch.device, limit_gib: float) -> list[dict[str, Any]]:
    """Check 2: a real out-of-memory error at T = 2048 is survived by halving the batch.

    The device's memory is capped at ``limit_gib`` for this check (``torch.cuda.set_per_process_memory_fraction``),
    so the first batch, sized at twice what the cap holds, fails in the allocator the way a too-large batch does.
    """
    length = 2048
    model = build_model("llama", seed=5, max_position_embeddings=length).to(device)
    heads = model.config.num_attention_heads
    per_prompt = heads * length * length * 4  # one prompt's float32 weights of one layer
    start = 1 << math.ceil(math.log2(2 * limit_gib * 2**30 / per_prompt))
    seqs = random_prompts([length] * start, seed=6)
    ref = GridCollector("s", (0, 2), start, length, device=device)
    run_collect(model, seqs, ref, route="interface", pad_id=0, batch_size=4)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(limit_gib * 2**30 / total, device)
    steps: list[tuple[int, int]] = []
    col = GridCollector("s", (0, 2), start, length, device=device)
    try:
        final = run_collect(
            model,
            seqs,
            col,
            route="interface",
            pad_id=0,
            batch_size=start,
            backoff=True,
            on_backoff=lambda a, b: steps.append((a, b)),
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    a, b = ref.result(), col.result()
    err = float((a.sums - b.sums).abs().max())
    ok = bool(steps) and torch.equal(a.count, b.count) and err < 1e-3 and b.n_prompts == start
    row = {"check": "backoff", "cap_gib": limit_gib, "start": start, "steps": steps, "final": final}
    return [row | {"max_sum_error": err, "ok": ok}]


WORDS = ("the", "a", "how", "do", "i", "to", "you", "what", "is", "make", "write", "explain", "tell", "me", "story")


def _word_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words))) for _ in range(n)]


def _stand_in(device: torch.device, dtype: torch.dtype) -> Any:
    """A random-weight model with Llama-3.1-8B's attention structure (GQA 32/8, llama3 RoPE) scaled to 8 layers of
    width 1024, and the test suite's word-level tokenizer (the embedded model's GGUF file is not installed)."""
    from attnscan.models.loading import from_model
    from attnscan.testing.presets import build_random_model, scaled_config

    config = scaled_config("llama-3.1-8b", layers=8, hidden_size=1024, heads=32, vocab_size=128)
    return from_model(build_random_model(config, dtype, device, seed=7), tiny_tokenizer(), spec="scaled:llama-3.1-8b")


def check_end_to_end(device: torch.device, n: int, length: int, stand_in: bool) -> list[dict[str, Any]]:
    """Check 3: ``attnscan.scan`` in bfloat16 on the device against float32 on the CPU, same model and prompts.

    The model is the embedded SmolLM2-135M-Instruct when its package is installed (as in the project's own set-up),
    else a scaled random-weight stand-in (see :func:`_stand_in`)."""
    from attnscan import load_prompts, scan
    from attnscan.models.gguf_cache import embedded_gguf_path
    from attnscan.models.loading import EMBEDDED_NAME

    try:
        if stand_in:
            raise AttnscanError("stand-in asked for")
        embedded_gguf_path()
        models = {dev: EMBEDDED_NAME for dev in ("device", "cpu")}
        benign = load_prompts("builtin:benign", name="benign", limit=n)
        jailbreak = load_prompts("builtin:jailbreak", name="jailbreak", limit=n)
    except AttnscanError:
        models = {"device": _stand_in(device, torch.bfloat16), "cpu": _stand_in(torch.device("cpu"), torch.float32)}
        benign = load_prompts(_word_prompts(n, length // 2, seed=1), name="benign")
        jailbreak = load_prompts(_word_prompts(n, length, seed=2), name="jailbreak")
    runs = {}
    seconds = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small sets, truncation: expected here
        for where, model in models.items():
            on_device = where == "device"
            t0 = time.perf_counter()
            runs[where] = scan(
                model,
                benign,
                jailbreak,
                length=length,
                batch_size=None if on_device else 4,  # None: the automatic batch size
                device=str(device) if on_device else "cpu",
                dtype="bfloat16" if on_device else "float32",
                align="relative",
            )
            seconds = seconds or time.perf_counter() - t0
    low, ref = runs["device"], runs["cpu"]
    counts_equal = all(torch.equal(low.count(s), ref.count(s)) for s in ("benign", "jailbreak"))
    mean_err = log_err = 0.0
    corr = 1.0
    for layer in ref.layers:
        for s in ("benign", "jailbreak"):
            mean_err = max(mean_err, float((low.mean(s, layer) - ref.mean(s, layer)).nan_to_num(0.0).abs().max()))
            diff = (low.log(s, layer) - ref.log(s, layer)).abs()
            log_err = max(log_err, float(diff[~diff.isnan()].mean()))
        a, b = low.diff(layer), ref.diff(layer)
        both = ~(a.isnan() | b.isnan())
        corr = min(corr, float(torch.corrcoef(torch.stack([a[both], b[both]]).double())[0, 1]))
    ok = counts_equal and log_err < 0.1 and corr > 0.98
    spec = low.manifest.get("model", {})
    row = {"check": "end-to-end", "model": spec.get("spec", spec) if isinstance(spec, dict) else spec}
    row |= {"prompts_per_set": n, "length": length, "layers": len(ref.layers), "device_seconds": round(seconds, 2)}
    row |= {"batch_size": low.manifest.get("batch_size"), "max_mean_error": mean_err}
    return [row | {"worst_mean_abs_log_error": log_err, "worst_diff_corr": corr, "ok": ok}]


def check_full_size(device: torch.device, n: int) -> list[dict[str, Any]]:
    """Check 4 (CUDA): a full-size Llama-3.1-8B of random weights in bfloat16, all 32 layers captured at T = 448 with
    the automatic batch size; reports where the batch size settled, prompts/s and the peak device memory."""
    from attnscan import load_prompts, scan
    from attnscan.models.loading import from_model
    from attnscan.testing.presets import build_random_model

    torch.cuda.empty_cache()
    loaded = from_model(build_random_model("llama-3.1-8b", torch.bfloat16, device, seed=8), tiny_tokenizer())
    benign = load_prompts(_word_prompts(n, 440, seed=3), name="benign")
    jailbreak = load_prompts(_word_prompts(n, 440, seed=4), name="jailbreak")
    notices: list[str] = []
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = scan(loaded, benign, jailbreak, length=448, batch_size=None, on_notice=notices.append)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    seen = all(result.sets[s].n_prompts == n for s in ("benign", "jailbreak"))
    row = {"check": "full-size", "model": "llama-3.1-8b (random weights, bfloat16)", "prompts": 2 * n}
    row |= {"layers": len(result.layers), "batch_size": result.manifest.get("batch_size"), "notices": notices}
    row |= {"seconds": round(seconds, 2), "prompts_per_s": round(2 * n / seconds, 2)}
    row |= {"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
    del loaded
    torch.cuda.empty_cache()
    return [row | {"ok": seen and len(result.layers) == 32}]


def check_reduction(device: torch.device, tmp: Path) -> list[dict[str, Any]]:
    """Check 5: the cross-rank reduction of a collector's state over nccl (gloo on the CPU), in a group of one (nccl
    refuses two ranks on one GPU): every tensor comes back unchanged, dtypes included."""
    import torch.distributed as dist

    from attnscan.engine.distributed import all_reduce_state

    model = build_model("llama", seed=9).to(device)
    seqs = random_prompts((5, 9, 12), seed=41)
    col = GridCollector("s", (0, 1), len(seqs), LENGTH, device=device)
    run_collect(model, seqs, col, route="interface", pad_id=0, batch_size=2)
    before = {key: value.clone() for key, value in col.state().items()}
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{tmp / 'group'}", rank=0, world_size=1)
    try:
        all_reduce_state(col)
    finally:
        dist.destroy_process_group()
    after = col.state()
    same = [
        key
        for key, value in before.items()
        if after[key].dtype == value.dtype and torch.equal(after[key].nan_to_num(), value.nan_to_num())
    ]
    row = {"check": "reduction", "backend": backend, "world_size": 1, "unchanged": same}
    return [row | {"ok": len(same) == len(before) and bool(after["seen"].all())}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--archs", default="all", help="tiny architectures of check 1, comma-separated (default all)")
    parser.add_argument("--stand-in", action="store_true", help="check 3 on the scaled stand-in model, not SmolLM2")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per set of the embedded-model check")
    parser.add_argument("--length", type=int, default=448, help="grid length of the embedded-model check")
    parser.add_argument("--full-size-prompts", type=int, default=64, help="prompts per set of the 8B check")
    parser.add_argument("--cap-gib", type=float, default=4.0, help="device memory cap of the back-off check")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    archs = sorted(BUILDERS) if args.archs == "all" else args.archs.split(",")
    unknown = sorted(set(archs) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown architecture {unknown[0]}: choose from {', '.join(sorted(BUILDERS))}")
    rows = check_capture(device, archs)
    if device.type == "cuda":
        rows += check_backoff(device, args.cap_gib)
    rows += check_end_to_end(device, args.prompts, args.length, args.stand_in)
    if device.type == "cuda":
        rows += check_full_size(device, args.full_size_prompts)
    with tempfile.TemporaryDirectory() as tmp:
        rows += check_reduction(device, Path(tmp))
    for row in rows:
        print(("PASS " if row["ok"] else "FAIL ") + json.dumps({k: v for k, v in row.items() if k != "ok"}))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
