"""The benchmark and accelerator-check scripts in bench/ run on the CPU too, so they cannot rot unnoticed between
the sessions that have a GPU. Their figures are not checked here (timings belong in benchmarks, not tests)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_passes_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check = _module("gpu_check")
    out = tmp_path / "check.json"
    argv = ["--device", "cpu", "--archs", "llama,gptj", "--stand-in", "--prompts", "3", "--length", "32"]
    status = check.main([*argv, "--json", str(out)])
    rows = json.loads(out.read_text())
    assert status == 0, capsys.readouterr().out
    assert [r["check"] for r in rows] == ["capture"] * 8 + ["end-to-end", "reduction"]
    assert all(r["ok"] for r in rows)
    assert {(r["arch"], r["dtype"], r["padding"]) for r in rows[:8]} == {
        (a, d, p) for a in ("llama", "gptj") for d in ("float32", "bfloat16") for p in ("right", "left")
    }
    assert rows[-2]["model"] == "scaled:llama-3.1-8b" and rows[-2]["layers"] == 8
    assert rows[-1]["backend"] == "gloo" and len(rows[-1]["unchanged"]) == 7
    assert capsys.readouterr().out.count("PASS ") == 10


def test_gpu_check_fails_when_capture_disagrees_with_the_reference() -> None:
    check = _module("gpu_check")
    check.TOLERANCE = {torch.float32: 0.0, torch.bfloat16: 0.0}
    rows = check.check_capture(torch.device("cpu"), ["llama"])
    assert rows and not any(r["ok"] for r in rows)
    assert all(r["max_error"] > 0 for r in rows)


def test_capture_benchmark_smoke_run_on_a_scaled_preset(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH / "capture.py"), "--presets", "llama-3.1-8b", "--scale-layers", "2"]
    cmd += ["--scale-hidden", "128", "--batch-sizes", "1", "--lengths", "64", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"sdpa", "capture-1", "capture-all", "eager"}
    assert all(r["status"] == "ok" and r["median_s"] > 0 and r["peak_bytes"] > 0 for r in rows), rows
    assert all(r["arch"]["n_layers"] == 2 and r["dtype"] == "bfloat16" for r in rows)
    # Ratios are to the SDPA forward of the same B and T.
    assert next(r for r in rows if r["variant"] == "sdpa")["time_ratio"] == 1.0
    assert "preset:llama-3.1-8b scaled" in proc.stdout


def test_collector_benchmark_compares_two_revisions(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _module("collector")
    argv = ["--base", "HEAD", "--batch-sizes", "1,3", "--lengths", "32", "--repeats", "1", "--spread", "5"]
    assert bench.main([*argv, "--align", "relative", "--padding", "left"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("1", "32"), ("3", "32")]
    assert all(float(r[5]) <= 1e-6 for r in rows)  # both versions give the same sums
    with pytest.raises(SystemExit, match=r"cannot read the collector.s module"):
        bench.main(["--base", "no-such-revision"])


def test_alternating_benchmark_gives_ratios_with_their_spread(tmp_path: Path) -> None:
    out = tmp_path / "alt.json"
    cmd = [sys.executable, str(BENCH / "alternate.py"), "--model", "preset:llama-3.1-8b", "--scale-layers", "2"]
    cmd += ["--scale-hidden", "128", "--batch-sizes", "1,2", "--lengths", "48", "--rounds", "3", "--json", str(out)]
    cmd += ["--variants", "sdpa,capture-all,capture-all-eager,eager"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch_size"], r["variant"]) for r in rows] == [
        (b, v) for b in (1, 2) for v in ("sdpa", "capture-all", "capture-all-eager", "eager")
    ]
    for r in rows:
        assert len(r["times_s"]) == 3 and r["growth_bytes"] > 0
        assert r["ratio_min"] <= r["ratio_q1"] <= r["ratio_median"] <= r["ratio_q3"] <= r["ratio_max"]
        if r["variant"] == "sdpa":
            assert r["ratios"] == [1.0, 1.0, 1.0]
    assert "capture-all-eager" in proc.stdout and "min-max" in proc.stdout
