"""The collector alone: time ``GridCollector`` reducing one batch's layers, this tree's code against another revision's.

    python bench/collector.py --base b92625b~1                      # CPU; B=4, T=448, full-length prompts
    python bench/collector.py --base b92625b~1 --device cuda --batch-sizes 1,16,64 --lengths 448,2048

The two versions of ``attnscan/accumulate.py`` (the working tree's and ``git show BASE:...``) run in the same process
on the same random softmax weights ``[B, heads, T, T]``, alternating, ``--repeats`` times each; the table gives the
median milliseconds per layer (begin + layers + end, divided by the layers) and the ratio new / base. ``--spread``
gives the prompts lengths ``T, T - spread, T - 2 spread, ...`` (padding inside the batch); ``--align`` and
``--padding`` pick the alignment and the padding side. A batch's results from the two versions are compared too (sums
within 1e-6), so a faster but wrong collector does not pass unnoticed.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _base_collector(rev: str) -> Any:
    source = None
    for where in ("src/attnscan/engine/accumulate.py", "src/attnscan/accumulate.py"):  # after / before the restructure
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{where}"], capture_output=True, text=True)
        if source.returncode == 0:
            break
    assert source is not None
    if source.returncode != 0:
        raise SystemExit(f"cannot read the collector's module at {rev}: {source.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "accumulate_base.py"
    # The module is loaded on its own, outside its package: its relative imports become absolute ones.
    package = "attnscan.engine" if "/engine/" in where else "attnscan"
    text = re.sub(r"^from \.\.(\w+) import", r"from attnscan.\1 import", source.stdout, flags=re.M)
    path.write_text(re.sub(r"^from \.(\w+) import", rf"from {package}.\1 import", text, flags=re.M))
    spec = importlib.util.spec_from_file_location("accumulate_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.GridCollector


def _time(cls: Any, weights: torch.Tensor, starts: list[int], lengths: list[int], args: Any, length: int) -> Any:
    layers = tuple(range(args.layers))
    col = cls("s", layers, len(lengths), length, device=weights.device, align=args.align)
    if weights.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    col.begin(list(range(len(lengths))), starts, lengths)
    for layer in layers:
        col.add(layer, weights)
    col.end()
    if weights.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / len(layers), col.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="git revision whose collector is the baseline")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="4")
    parser.add_argument("--lengths", default="448")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--spread", type=int, default=0, help="length step between the batch's prompts")
    parser.add_argument("--align", choices=("absolute", "relative"), default="absolute")
    parser.add_argument("--padding", choices=("right", "left"), default="right")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from attnscan.engine.accumulate import GridCollector

    base_cls = _base_collector(args.base)
    device = torch.device(args.device)
    print(f"collector: this tree vs {args.base}, {device}, {args.align} alignment, {args.padding} padding")
    print(f"{'B':>4} {'T':>5}  {'base ms/layer':>13}  {'new ms/layer':>12}  {'new/base':>8}  {'max |sums diff|':>15}")
    for batch in (int(x) for x in args.batch_sizes.split(",")):
        for length in (int(x) for x in args.lengths.split(",")):
            lengths = [max(1, length - i * args.spread) for i in range(batch)]
            width = max(lengths)
            starts = [0] * batch if args.padding == "right" else [width - n for n in lengths]
            gen = torch.Generator().manual_seed(0)
            weights = torch.softmax(torch.randn(batch, args.heads, width, width, generator=gen), -1).to(device)
            times: dict[str, list[float]] = {"base": [], "new": []}
            results = {}
            for _ in range(args.repeats):
                for name, cls in (("base", base_cls), ("new", GridCollector)):
                    ms, results[name] = _time(cls, weights, starts, lengths, args, length)
                    times[name].append(ms)
            diff = float((results["base"].sums - results["new"].sums).abs().max())
            base, new = statistics.median(times["base"]), statistics.median(times["new"])
            print(f"{batch:>4} {length:>5}  {base:>13.2f}  {new:>12.2f}  {new / base:>7.2f}x  {diff:>15.2e}")
            if diff > 1e-6:
                print("  the two collectors disagree: the comparison is void", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
