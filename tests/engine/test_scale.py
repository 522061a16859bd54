"""Scale features on the CPU: out-of-memory back-off, checkpoints and resume (also after SIGKILL), data-parallel
scans over torch.distributed (gloo, 2 processes), and capture on a model placed with an accelerate device map."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnscan import AttnscanError, from_model, scan
from attnscan.engine.accumulate import GridCollector
from attnscan.engine.batching import run_collect
from attnscan.engine.checkpoint import checkpoint_file
from attnscan.testing.tiny import build_model, random_prompts

WORDS = ["the", "a", "how", "do", "i", "to", "you", "what", "is", "make", "write", "explain", "tell", "me", "story"]


def _prompt_file(path: Path, n: int, seed: int, lo: int = 6, hi: int = 14) -> Path:
    import random

    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)) + "\n")
    return path


def _backoff_steps(model: torch.nn.Module, seqs: list[list[int]], col: GridCollector) -> list[tuple[int, int]]:
    """Run with back-off from batch size 8; return the (old, new) batch sizes it went through (the last new one
    is the size it ended with)."""
    seen: list[tuple[int, int]] = []
    final = run_collect(
        model,
        seqs,
        col,
        route="interface",
        pad_id=0,
        batch_size=8,
        backoff=True,
        on_backoff=lambda a, b: seen.append((a, b)),
    )
    assert final == (seen[-1][1] if seen else 8)
    return seen


def test_out_of_memory_backs_off_and_keeps_results_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("llama")
    seqs = random_prompts((5, 9, 12, 7, 3, 11, 8), seed=21)
    ref = GridCollector("s", (0, 2), len(seqs), 12)
    run_collect(model, seqs, ref, route="interface", pad_id=0, batch_size=1)
    base = model.base_model
    real_forward = base.forward

    def forward(*args: object, **kwargs: object) -> object:
        if kwargs["input_ids"].shape[0] > 2:  # type: ignore[union-attr]
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(base, "forward", forward)
    col = GridCollector("s", (0, 2), len(seqs), 12)
    assert _backoff_steps(model, seqs, col) == [(8, 4), (4, 2)]
    a, b = ref.result(), col.result()
    assert torch.equal(a.count, b.count)
    assert torch.allclose(a.sums, b.sums, atol=1e-6)
    assert torch.allclose(a.blocks, b.blocks, atol=1e-5, equal_nan=True)
    # Without back-off the error surfaces unchanged.
    with pytest.raises(torch.OutOfMemoryError):
        run_collect(model, seqs, GridCollector("s", (0,), len(seqs), 12), route="interface", pad_id=0, batch_size=8)


def test_a_batch_dropped_after_adding_on_the_cpu_is_not_retried() -> None:
    """On the CPU the layers add straight into the float64 sums (no second [layers, T, T] buffer). An error after a
    layer was added cannot be undone, so the collector refuses to give results and back-off does not retry."""
    col = GridCollector("s", (0, 1), 2, 8)
    assert col._buf is None  # the CPU keeps no per-batch copy of the sums
    col.begin([0], [0], [4])
    assert col.abort() is True  # nothing added yet: dropping the batch is clean
    col.begin([0], [0], [4])
    col.add(0, torch.full((1, 2, 4, 4), 0.25))
    assert col.abort() is False
    with pytest.raises(RuntimeError, match="results are incomplete"):
        col.result()
    with pytest.raises(RuntimeError, match="results are incomplete"):
        col.state()

    model = build_model("llama")
    seqs = random_prompts((5, 9, 12, 7), seed=22)

    class FailAfterFirstLayer(GridCollector):  # whole maps (take_head_mean)
        def take_rows(self, layer: int) -> None:
            return None

        def take_head_mean(self, layer: int, head_mean: torch.Tensor) -> None:
            super().take_head_mean(layer, head_mean)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated after a layer was added)")

    class FailAfterFirstRows(GridCollector):  # chunks of rows as the engine computes them (take_rows)
        def _add_rows(self, li: int, q0: int, q1: int, rows: torch.Tensor) -> None:
            super()._add_rows(li, q0, q1, rows)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated after some rows were added)")

    for failing in (FailAfterFirstLayer("s", (0, 2), len(seqs), 12), FailAfterFirstRows("s", (0, 2), len(seqs), 12)):
        with pytest.raises(torch.OutOfMemoryError):
            run_collect(model, seqs, failing, route="interface", pad_id=0, batch_size=4, backoff=True)
        with pytest.raises(RuntimeError, match="results are incomplete"):
            failing.result()


@pytest.mark.parametrize("align", ["absolute", "relative"])
def test_the_accelerator_float32_buffer_gives_the_same_sums(align: str) -> None:
    """The float32 per-batch buffer that accelerators use (here forced on the CPU, the only device the suite has)
    adds up to the unbuffered float64 sums within float32 rounding; counts and per-prompt summaries are equal."""
    model = build_model("mistral")
    seqs = random_prompts((5, 9, 12, 7, 3, 11, 8), seed=23)
    runs = {}
    for buffered in (False, True):
        col = GridCollector("s", (0, 1, 2), len(seqs), 12, align=align, buffered=buffered)  # type: ignore[arg-type]
        assert (col._buf is not None) is buffered
        run_collect(model, seqs, col, route="interface", pad_id=0, batch_size=3)
        runs[buffered] = col.result()
    plain, buffered_run = runs[False], runs[True]
    assert torch.equal(plain.count, buffered_run.count)
    assert plain.sums.abs().sum() > 0
    assert torch.allclose(plain.sums, buffered_run.sums, rtol=1e-6, atol=1e-6)
    for key in ("blocks", "sink", "entropy", "lengths", "prompt_ids"):
        torch.testing.assert_close(getattr(plain, key), getattr(buffered_run, key), rtol=0, atol=0, equal_nan=True)


def test_with_the_buffer_an_out_of_memory_error_after_a_layer_is_retried_cleanly() -> None:
    """What happens on a GPU: the batch's layers sit in the float32 buffer until the batch ends, so an
    out-of-memory error after some layers were added drops the batch without a trace and back-off retries it."""
    model = build_model("llama")
    seqs = random_prompts((5, 9, 12, 7, 3, 11, 8), seed=24)
    ref = GridCollector("s", (0, 2), len(seqs), 12, buffered=True)
    run_collect(model, seqs, ref, route="interface", pad_id=0, batch_size=1)

    class FailsOnBigBatches(GridCollector):
        def _add_rows(self, li: int, q0: int, q1: int, rows: torch.Tensor) -> None:
            super()._add_rows(li, q0, q1, rows)  # the rows are in the buffer before the error
            if rows.shape[0] > 2 and li == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated after a layer was added)")

    col = FailsOnBigBatches("s", (0, 2), len(seqs), 12, buffered=True)
    assert _backoff_steps(model, seqs, col) == [(8, 4), (4, 2)]
    a, b = ref.result(), col.result()
    assert torch.equal(a.count, b.count) and torch.equal(a.lengths, b.lengths)
    assert torch.allclose(a.sums, b.sums, atol=1e-6)
    assert torch.allclose(a.blocks, b.blocks, atol=1e-5, equal_nan=True)


def test_running_out_of_memory_while_a_batch_is_set_up_also_backs_off() -> None:
    """The collector's per-batch masks ([B, P, P]) are allocated before the forward; an out-of-memory error there
    is a batch too large as well."""
    model = build_model("gpt2")
    seqs = random_prompts((5, 9, 12, 7, 3), seed=25)

    class FailsToBegin(GridCollector):
        def begin(self, prompt_ids: list[int], starts: list[int], lengths: list[int]) -> None:
            if len(prompt_ids) > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated while allocating the batch masks)")
            super().begin(prompt_ids, starts, lengths)

    col = FailsToBegin("s", (1,), len(seqs), 12)
    assert run_collect(model, seqs, col, route="interface", pad_id=0, batch_size=4, backoff=True) == 1
    ref = GridCollector("s", (1,), len(seqs), 12)
    run_collect(model, seqs, ref, route="interface", pad_id=0, batch_size=1)
    assert torch.equal(col.result().count, ref.result().count)
    assert torch.allclose(col.result().sums, ref.result().sums, atol=1e-6)


def _scan_cmd(model_dir: Path, benign: Path, jail: Path, out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "attnscan", "scan", "--model", str(model_dir), "--benign", str(benign)]
    return [*args, "--jailbreak", str(jail), "--out", str(out), "--length", "16", "--quiet", *extra]


def _env() -> dict[str, str]:
    # One thread everywhere: torchrun gives each worker OMP_NUM_THREADS=1, and a single process with two threads sums
    # in another order, so the exact comparisons of per-prompt summaries would compare thread counts, not the code.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _same_bundle(a: Path, b: Path, exact: bool) -> None:
    ma, mb = load_file(str(a / "maps.safetensors")), load_file(str(b / "maps.safetensors"))
    assert set(ma) == set(mb)
    for key in ma:
        assert torch.allclose(ma[key].double(), mb[key].double(), atol=1e-6, equal_nan=True), key
    aa, ab = load_file(str(a / "accumulators.safetensors")), load_file(str(b / "accumulators.safetensors"))
    for key in aa:
        if exact and not key.endswith("/sums"):
            assert torch.equal(aa[key].nan_to_num(123.0), ab[key].nan_to_num(123.0)), key
        else:
            assert torch.allclose(aa[key].double(), ab[key].double(), atol=1e-6, equal_nan=True), key


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("prompts")
    return _prompt_file(d / "b.txt", 40, 1), _prompt_file(d / "j.txt", 40, 2, 8, 16)


def test_sigkill_then_resume_gives_the_uninterrupted_bundle(
    tiny_model_dir: Path, prompt_files: tuple[Path, Path], tmp_path: Path
) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    opts = ("--batch-size", "1", "--checkpoint-every", "1")
    subprocess.run(_scan_cmd(tiny_model_dir, *prompt_files, full, *opts), env=_env(), check=True)
    ckpt = checkpoint_file(tmp_path / "cut.ckpt")
    proc = subprocess.Popen(_scan_cmd(tiny_model_dir, *prompt_files, cut, *opts), env=_env())
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not cut.exists(), "the scan finished before it could be killed"
    res = subprocess.run(
        _scan_cmd(tiny_model_dir, *prompt_files, cut, *opts, "--resume"), env=_env(), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    _same_bundle(full, cut, exact=True)
    assert not (tmp_path / "cut.ckpt").exists()  # removed once the bundle is written


def test_sigterm_saves_a_checkpoint_and_exits_130(
    tiny_model_dir: Path, prompt_files: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "o"
    ckpt = checkpoint_file(tmp_path / "o.ckpt")
    cmd = _scan_cmd(tiny_model_dir, *prompt_files, out, "--batch-size", "1", "--checkpoint-every", "1")
    proc = subprocess.Popen(cmd, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # the first checkpoint means the scan is running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail("the scan finished before SIGTERM arrived")
    assert proc.returncode == 130, err
    assert "stopped by SIGTERM" in err and "rerun the same command with --resume" in err
    assert ckpt.exists() and not out.exists()
    res = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True)
    assert res.returncode == 0 and "resuming from" not in res.stdout, res.stderr
    assert json.loads((out / "manifest.json").read_text())["prompt_sets"]["benign"]["count"] == 40


def test_resume_refuses_other_settings(tiny_model_dir: Path, prompt_files: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ck"
    loaded_scan = dict(length=24, batch_size=2, checkpoint=ckpt_dir, device="cpu")
    scan(str(tiny_model_dir), str(prompt_files[0]), str(prompt_files[1]), layers="0,1", **loaded_scan)  # type: ignore[arg-type]
    with pytest.raises(AttnscanError, match=r"different settings \(layers\)"):
        scan(str(tiny_model_dir), str(prompt_files[0]), str(prompt_files[1]), layers="0", resume=True, **loaded_scan)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch", ["1", "3"])
def test_torchrun_two_processes_equal_one(
    tiny_model_dir: Path, prompt_files: tuple[Path, Path], tmp_path: Path, batch: str
) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(_scan_cmd(tiny_model_dir, *prompt_files, single, "--batch-size", batch), env=_env(), check=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = _scan_cmd(tiny_model_dir, *prompt_files, multi, "--batch-size", batch)
    launch = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(29500 + int(batch) + os.getpid() % 500)]
    res = subprocess.run([*launch, *cmd[1:]], env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote") == 1  # only rank 0 writes
    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    _same_bundle(single, multi, exact=batch == "1")


def test_capture_under_an_accelerate_device_map(tiny_model_dir: Path) -> None:
    """Layers 1 and 2 offloaded by accelerate (dispatch hooks move their weights in per forward): the maps equal a
    plain load's, so attnscan's capture and accelerate's hooks coexist."""
    from attnscan import load_model

    placement = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    seqs = random_prompts((6, 10, 4), seed=31)
    results = []
    for kwargs in ({"device": "cpu"}, {"device_map": placement}):
        loaded = load_model(str(tiny_model_dir), **kwargs)  # type: ignore[arg-type]
        if "device_map" in kwargs:
            assert loaded.model.hf_device_map["model.layers.1"] == "disk"
            assert hasattr(loaded.model.model.layers[1], "_hf_hook")
        col = GridCollector("s", (0, 1, 2), len(seqs), 12)
        run_collect(loaded.model, seqs, col, route=loaded.arch.route, pad_id=0, batch_size=2)
        results.append(col.result())
    assert results[0].sums.abs().sum() > 0
    assert torch.allclose(results[0].sums, results[1].sums, atol=1e-9)
    assert torch.equal(results[0].count, results[1].count)
    assert from_model(build_model("llama"), None).arch.route == "interface"


def test_automatic_batch_size_estimate() -> None:
    """The first batch size on CUDA: prompts whose estimated peak fits 70 % of the free memory, within 1..128.
    Llama-3.1-8B dimensions (32 layers, 32 heads, hidden 4096, MLP 14336; its config.json), bfloat16, 64 GB free,
    all 32 layers captured."""
    from attnscan.engine.batching import AUTO_BATCH_CAP, estimate_batch_size
    from attnscan.engine.capture import CUDA_CHUNK_BYTES

    llama = {"heads": 32, "hidden": 4096, "intermediate": 14336, "dtype_bytes": 2, "layers": 32}
    assert CUDA_CHUNK_BYTES == 268_435_456
    # T = 4096, chunks of rows handed to the collector (absolute alignment, right padding). Shared by the batch:
    # 3 * 268_435_456 (chunk scores, softmax, mask) + 32 * 4096 * 4097 / 2 * 4 (packed float32 buffer)
    # = 1_879_270_336 bytes. Per prompt: 2 * 4096^2 (masks) + 16 * 32 * 4096 * (2 + 8) (the 16-row chunk floor)
    # + 4096 * (4 * 4096 + 3 * 14336) * 2 (activations) = 541_065_216 bytes. (0.7 * 64e9 - 1_879_270_336)
    # / 541_065_216 = 79.3.
    assert estimate_batch_size(**llama, length=4096, free_bytes=64 * 10**9) == 79
    # Whole maps (relative alignment or left padding): the buffer is the square (2_147_483_648 bytes) and each
    # prompt adds four float32 maps (268_435_456 bytes): (44.8e9 - 2_952_790_016) / 809_500_672 = 51.7.
    assert estimate_batch_size(**llama, length=4096, free_bytes=64 * 10**9, whole_maps=True) == 51
    assert estimate_batch_size(**llama, length=2048, free_bytes=64 * 10**9) == AUTO_BATCH_CAP == 128  # the cap
    assert estimate_batch_size(**llama, length=8192, free_bytes=10**9) == 1  # never below one
    assert estimate_batch_size(**llama, length=2048, free_bytes=16 * 10**9) > estimate_batch_size(
        **llama, length=4096, free_bytes=16 * 10**9
    )  # shorter prompts, more of them


def test_state_reduction_in_a_group_of_one_leaves_the_state_as_it_is(tmp_path: Path) -> None:
    """The all-reduce of a collector's state in a one-process group (gloo here; bench/gpu_check.py runs the same on
    nccl): sums, counts, per-prompt summaries and the seen flags come back unchanged, dtypes included."""
    import torch.distributed as dist

    from attnscan.engine.distributed import all_reduce_state

    model = build_model("llama")
    seqs = random_prompts((5, 9, 12), seed=41)
    col = GridCollector("s", (0, 1), 3, 12)
    run_collect(model, seqs, col, route="interface", pad_id=0, batch_size=2)
    before = {key: value.clone() for key, value in col.state().items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        all_reduce_state(col)
    finally:
        dist.destroy_process_group()
    after = col.state()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert int(after["seen"].sum()) == 3 and after["sums"].abs().sum() > 0
