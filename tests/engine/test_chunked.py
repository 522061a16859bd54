"""The chunked path of the capture engine: head-mean probabilities by chunks of query rows, and the eager fallback
for what it cannot reproduce."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnscan.engine.capture as capture_mod
from attnscan.engine.accumulate import GridCollector
from attnscan.engine.batching import run_collect
from attnscan.engine.capture import (
    capture_attention,
    chunk_rows,
    chunked_attention,
    chunked_head_mean,
    eager_reason,
)
from attnscan.testing.tiny import build_model, eager_reference, random_prompts

LENGTH = 12
TOL = 1e-5


def _full_reference(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Every head's whole square at once, as eager attention does it, then the head mean (float64)."""
    group = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(group, dim=1)
    scores = (query.double() @ keys.double().transpose(2, 3)) * scaling
    p = query.shape[2]
    if mask is None:
        mask = torch.ones(p, p, dtype=torch.bool).tril()[None, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=1)


def _padded_window_mask(lengths: list[int], p: int, window: int | None) -> torch.Tensor:
    """Left padding, causal, optionally a sliding window: ``[B, 1, P, P]`` bool."""
    i = torch.arange(p)[:, None]
    j = torch.arange(p)[None, :]
    masks = []
    for n in lengths:
        m = (j <= i) & (j >= p - n)
        if window is not None:
            m &= (i - j) < window
        masks.append(m)
    return torch.stack(masks)[:, None]


@pytest.mark.parametrize("rows", [1, 3, 5, 16])
@pytest.mark.parametrize(("heads", "kv"), [(4, 4), (6, 2)])
@pytest.mark.parametrize("window", [None, 4, "causal"])
def test_chunks_equal_the_whole_square(rows: int, heads: int, kv: int, window: Any) -> None:
    """Any chunking gives the head mean of the whole square's softmax: with grouped keys, padding and windows."""
    g = torch.Generator().manual_seed(rows * 7 + heads)
    p, lengths = 11, [11, 7, 3]
    query = torch.randn(3, heads, p, 8, generator=g)
    key = torch.randn(3, kv, p, 8, generator=g)
    mask = None if window == "causal" else _padded_window_mask(lengths, p, window)
    value = torch.randn(3, kv, p, 8, generator=g)
    got, out = chunked_attention(query, key, value, mask, 0.3, rows=rows)
    assert torch.equal(got, chunked_head_mean(query, key, mask, 0.3, rows=rows))
    ref = _full_reference(query, key, mask, 0.3)
    real = mask[:, 0].any(-1) if mask is not None else torch.ones(3, p, dtype=torch.bool)  # rows of real tokens
    assert got.dtype == torch.float32 and got.shape == (3, p, p)
    assert torch.all(got.triu(1)[real] == 0)
    err = (got.double() - ref)[real].abs().max().item()
    assert err < 1e-6, f"chunked head mean off by {err:.2e}"
    # The output, [B, P, H, D] as eager attention returns it, equals eager attention's on the real tokens' rows.
    attn_mask = mask if mask is not None else torch.ones(p, p, dtype=torch.bool).tril()
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, scale=0.3, enable_gqa=True
    ).transpose(1, 2)
    assert out is not None and out.shape == (3, p, heads, 8)
    assert torch.allclose(out[real], sdpa[real], atol=1e-5)


def test_chunk_rows_bound_the_chunk() -> None:
    cpu = torch.device("cpu")
    assert chunk_rows(1, 9, 2048, cpu) * 9 * 2048 * 4 <= capture_mod.CHUNK_BYTES
    assert chunk_rows(1, 9, 2048, cpu) % 16 == 0
    assert chunk_rows(64, 32, 8192, cpu) == 16  # never fewer than 16 rows


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3", "gptj", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_many_small_chunks_match_the_eager_reference(arch: str, side: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The capture with 5-row chunks (so that chunk borders cut the windows and the padding) still equals HF eager
    attention, one prompt at a time."""
    from attnscan.models.loading import from_model

    monkeypatch.setattr(capture_mod, "chunk_rows", lambda *args: 5)
    model = build_model(arch, seed=2)
    layers = tuple(range(model.config.num_hidden_layers))
    seqs = [s[:LENGTH] for s in random_prompts((3, 12, 9, 7, 12), seed=4)]
    collector = GridCollector("s", layers, len(seqs), LENGTH)
    route = from_model(model, None).arch.route
    run_collect(model, seqs, collector, route=route, pad_id=0, batch_size=3, padding_side=side)  # type: ignore[arg-type]
    result = collector.result()
    ref, count = eager_reference(model, seqs, layers, LENGTH)
    assert torch.equal(result.count, count)
    for layer in layers:
        err = (result.mean(layer) - ref[layer]).nan_to_num(0.0).abs().max().item()
        assert err < TOL, f"{arch} layer {layer}: max |capture - eager| = {err:.2e}"


class _Heads:
    """Records how many heads each layer's weights had when they reached the collector."""

    def __init__(self) -> None:
        self.heads: dict[int, int] = {}

    def add(self, layer: int, weights: torch.Tensor) -> None:
        self.heads[layer] = int(weights.shape[1])


def test_chunked_path_hands_over_the_head_mean_and_records_no_fallback() -> None:
    model = build_model("llama")
    rec = _Heads()
    ids = torch.tensor(random_prompts((9, 9)))
    with torch.inference_mode(), capture_attention(model, [0, 1], rec, "interface") as info:
        model.base_model(input_ids=ids, use_cache=False)
    assert rec.heads == {0: 1, 1: 1} and info.eager == {}
    rec = _Heads()
    with torch.inference_mode(), capture_attention(model, [0, 1], rec, "interface", chunked=False) as info:
        model.base_model(input_ids=ids, use_cache=False)
    assert rec.heads == {0: model.config.num_attention_heads, 1: model.config.num_attention_heads}
    assert info.eager == {0: "chunked path off", 1: "chunked path off"}


@pytest.mark.parametrize("chosen", [(0, 1), (1,)])
def test_soft_capping_falls_back_to_eager_and_stays_exact(chosen: tuple[int, ...]) -> None:
    """Gemma 2 soft-caps its logits: the chunked path (and SDPA) cannot, so every layer runs eager attention, the
    layers not captured too (transformers' SDPA function refuses soft-capping); the captured layers equal the
    reference and say why they fell back."""
    model = build_model("gemma2", attn="eager")
    seqs = [s[:LENGTH] for s in random_prompts((12, 8, 5), seed=3)]
    collector = GridCollector("s", chosen, len(seqs), LENGTH)
    run_collect(model, seqs, collector, route="interface", pad_id=0, batch_size=2, padding_side="left")
    ref, _ = eager_reference(model, seqs, chosen, LENGTH)
    result = collector.result()
    for layer in chosen:
        err = (result.mean(layer) - ref[layer]).nan_to_num(0.0).abs().max().item()
        assert err < TOL, f"layer {layer}: {err:.2e}"
    with torch.inference_mode(), capture_attention(model, chosen, _Heads(), "interface") as info:
        model.base_model(input_ids=torch.tensor([seqs[0]]), use_cache=False)
    assert info.eager == dict.fromkeys(chosen, "logit soft-capping")


class _Module(torch.nn.Module):
    is_causal = True


def test_eager_reason_names_what_the_chunked_path_cannot_do() -> None:
    q = torch.zeros(1, 2, 4, 8)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    module = _Module()
    assert eager_reason(module, q, q, None, {}) == ""
    assert eager_reason(module, q, q, causal, {"sliding_window": 2}) == ""
    assert eager_reason(module, q, q, None, {"s_aux": torch.zeros(2)}) == "attention sinks"
    assert eager_reason(module, q, q, None, {"softcap": 30.0}) == "logit soft-capping"
    assert eager_reason(module, q, q, None, {"position_bias": torch.zeros(1)}) == "position bias"
    assert eager_reason(module, q, q, None, {"is_causal": False}) == "not a causal module"  # said per call
    assert eager_reason(module, q, q, None, {"is_causal": True}) == ""
    assert eager_reason(torch.nn.Module(), q, q, None, {}) == ""  # no is_causal attribute: causal
    held = _Module()
    held.sinks = torch.zeros(2)  # sinks held by the module, not passed in
    assert eager_reason(held, q, q, None, {}) == "attention sinks"
    assert eager_reason(module, q, q[:, :, :1], None, {}) == "query shorter than its keys"
    assert eager_reason(module, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool), {}) == (
        "a mask that lets a query see a later key"
    )
    assert eager_reason(module, q, q, torch.zeros(1, 1, 4, 4), {}) == "a mask that is not boolean [B, 1, Q, K]"
    module.train()
    assert eager_reason(module, q, q, None, {"dropout": 0.1}) == "dropout in training mode"
    module.eval()
    assert eager_reason(module, q, q, None, {"dropout": 0.1}) == ""
    module.is_causal = False
    assert eager_reason(module, q, q, None, {}) == "not a causal module"


def test_a_chunk_never_has_more_rows_than_the_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """A short query under a large budget is one chunk of its own length (nothing is sized by the budget alone)."""
    monkeypatch.setattr(capture_mod, "CHUNK_BYTES", 1 << 40)
    query = torch.randn(1, 2, 12, 8)
    got = chunked_head_mean(query, query, None, 0.5)
    assert torch.allclose(got.double(), _full_reference(query, query, None, 0.5), atol=1e-6)


def test_the_mask_of_a_forward_is_checked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer gets the same padding mask: it is checked for later keys once per forward, not once per layer
    (on a GPU each check waits for the device)."""
    calls: list[torch.Tensor] = []
    original = capture_mod._mask_reason

    def counting(mask: torch.Tensor) -> str:
        calls.append(mask)
        return original(mask)

    monkeypatch.setattr(capture_mod, "_mask_reason", counting)
    model = build_model("llama")
    n_layers = model.config.num_hidden_layers
    ids = torch.tensor(random_prompts((9, 9)))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: transformers hands the layers a boolean mask
    with torch.inference_mode(), capture_attention(model, range(n_layers), _Heads(), "interface") as info:
        model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert len(calls) == 2 and info.eager == {}


class _Paths(GridCollector):
    """Counts the whole maps (take_head_mean) and the chunks of rows (take_rows) that reach the collector."""

    maps = 0
    chunks = 0

    def add(self, layer: int, weights: torch.Tensor) -> None:
        raise AssertionError("the chunked path hands its head mean over without a copy (take_head_mean)")

    def take_head_mean(self, layer: int, head_mean: torch.Tensor) -> None:
        self.maps += 1
        super().take_head_mean(layer, head_mean)

    def _add_rows(self, li: int, q0: int, q1: int, rows: torch.Tensor) -> None:
        self.chunks += 1
        super()._add_rows(li, q0, q1, rows)


@pytest.mark.parametrize(
    ("align", "side", "by_rows"),
    [("absolute", "right", True), ("absolute", "left", False), ("relative", "right", False)],
)
def test_absolute_right_padded_batches_never_build_the_whole_map(
    align: str, side: str, by_rows: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default layout goes to the collector by chunks of 5 rows as they are computed (no [B, P, P] map); the
    layouts that need whole maps still get them, and both give the same sums as one whole map per layer."""
    monkeypatch.setattr(capture_mod, "chunk_rows", lambda *args: 5)
    model = build_model("llama", seed=3)
    seqs = [s[:LENGTH] for s in random_prompts((3, 12, 9, 7), seed=5)]
    col = _Paths("s", (0, 1), len(seqs), LENGTH, align=align)  # type: ignore[arg-type]
    run_collect(model, seqs, col, route="interface", pad_id=0, batch_size=2, padding_side=side)  # type: ignore[arg-type]
    batches_times_layers = 2 * 2
    if by_rows:  # longest first: batches of widths 12 and 7, so 3 + 2 chunks of 5 rows per layer
        assert col.maps == 0 and col.chunks == 2 * (3 + 2)
        assert col.sums.shape == (2, LENGTH * (LENGTH + 1) // 2)  # the packed lower triangle
    else:
        assert col.maps == batches_times_layers and col.chunks == 0
    monkeypatch.setattr(capture_mod, "chunk_rows", lambda *args: 64)
    whole = GridCollector("s", (0, 1), len(seqs), LENGTH, align=align)  # type: ignore[arg-type]
    run_collect(model, seqs, whole, route="interface", pad_id=0, batch_size=2, padding_side=side)  # type: ignore[arg-type]
    a, b = col.result(), whole.result()
    assert torch.equal(a.count, b.count)
    torch.testing.assert_close(a.sums, b.sums, rtol=1e-6, atol=1e-7)
    for key in ("blocks", "sink", "entropy"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_a_checkpoint_that_kept_the_whole_square_loads_into_the_packed_sums() -> None:
    """Checkpoints written before the sums were packed hold [layers, T, T]: they load, and give the same result."""
    model = build_model("llama", seed=3)
    seqs = [s[:LENGTH] for s in random_prompts((3, 12, 9), seed=6)]
    col = GridCollector("s", (0, 1), len(seqs), LENGTH)
    run_collect(model, seqs, col, route="interface", pad_id=0, batch_size=2)
    state = col.state()
    old = {**state, "sums": col.result().sums}  # the square form
    again = GridCollector("s", (0, 1), len(seqs), LENGTH)
    again.load_state(old)
    torch.testing.assert_close(again.result().sums, col.result().sums, rtol=0, atol=0)
    assert again.sums.shape == state["sums"].shape


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_accelerator_branch_sdpa_output_and_chunked_probabilities(
    side: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off the CPU a captured layer takes its output from SDPA and computes only the probabilities by chunks. Forced
    on here (the suite has no GPU): the maps still equal HF eager, and the hidden states equal an uncaptured SDPA
    forward's, so the branch's output is the fused kernel's, untouched."""
    monkeypatch.setattr(capture_mod, "_output_from_chunks", lambda device: False)
    monkeypatch.setattr(capture_mod, "chunk_rows", lambda *args: 5)
    model = build_model("mistral", seed=2)
    layers = tuple(range(model.config.num_hidden_layers))
    seqs = [s[:LENGTH] for s in random_prompts((3, 12, 9, 7, 12), seed=4)]
    collector = GridCollector("s", layers, len(seqs), LENGTH)
    run_collect(model, seqs, collector, route="interface", pad_id=0, batch_size=3, padding_side=side)  # type: ignore[arg-type]
    result = collector.result()
    ref, count = eager_reference(model, seqs, layers, LENGTH)
    assert torch.equal(result.count, count)
    for layer in layers:
        err = (result.mean(layer) - ref[layer]).nan_to_num(0.0).abs().max().item()
        assert err < TOL, f"layer {layer}: max |capture - eager| = {err:.2e}"
    ids = torch.tensor([seqs[1]])
    model.set_attn_implementation("sdpa")
    heads = _Heads()
    with torch.inference_mode():
        plain = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        with capture_attention(model, layers, heads, "interface") as info:
            captured = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    assert info.eager == {} and heads.heads == dict.fromkeys(layers, 1)
    torch.testing.assert_close(captured, plain, rtol=0, atol=1e-6)


def test_a_bfloat16_model_is_captured_in_its_dtype_with_float32_probabilities() -> None:
    """The chunks are scored in the model's dtype (bfloat16 here) and softmaxed and averaged in float32: the head
    mean that reaches the collector is float32 and agrees with HF eager in bfloat16 to bfloat16 precision (eager
    rounds its probabilities to bfloat16; the two forwards also round their hidden states differently)."""
    model = build_model("llama", seed=2)
    with torch.no_grad():  # sharper attention than random initial weights give, so a wrong map stands out
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    model = model.to(torch.bfloat16)
    seqs = [s[:LENGTH] for s in random_prompts((12, 9, 7), seed=4)]
    dtypes: list[torch.dtype] = []

    class Dtypes(GridCollector):
        def _add_rows(self, li: int, q0: int, q1: int, rows: torch.Tensor) -> None:
            dtypes.append(rows.dtype)
            super()._add_rows(li, q0, q1, rows)

    layers = tuple(range(model.config.num_hidden_layers))
    collector = Dtypes("s", layers, len(seqs), LENGTH)
    run_collect(model, seqs, collector, route="interface", pad_id=0, batch_size=3)
    assert dtypes and set(dtypes) == {torch.float32}
    result = collector.result()
    ref, count = eager_reference(model, seqs, layers, LENGTH)
    assert torch.equal(result.count, count)
    for layer in layers:
        err = (result.mean(layer) - ref[layer]).nan_to_num(0.0).abs().max().item()
        assert err < 2e-2, f"layer {layer}: max |capture - eager| = {err:.2e}"
        uniform = torch.tril(torch.ones(LENGTH, LENGTH)) / torch.arange(1, LENGTH + 1)[:, None]
        assert (ref[layer] - uniform.double()).nan_to_num(0.0).abs().max().item() > 10 * err  # not merely uniform


def test_chunk_rows_on_cuda_and_the_cpu() -> None:
    """Whole multiples of 16 rows within each device's budget (CUDA's 256 MiB, the CPU's 8 MiB), at least 16."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    assert chunk_rows(1, 9, 2048, cuda) == 3632  # 2^28 / (4 * 9 * 2048) = 3640.9, down to a multiple of 16
    assert chunk_rows(1, 9, 2048, cpu) == 112  # 2^23 / (4 * 9 * 2048) = 113.8
    assert chunk_rows(64, 32, 8192, cuda) == 16  # the floor
    assert all(isinstance(chunk_rows(b, 9, 448, cpu), int) for b in (1, 3, 8))


def test_mask_reason_refuses_masks_the_chunks_cannot_follow() -> None:
    from attnscan.engine.capture import _mask_reason

    causal = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    assert _mask_reason(causal) == ""
    peek = causal.clone()
    peek[1, 0, 2, 3] = True  # one query sees the key right after it
    assert _mask_reason(peek) == "a mask that lets a query see a later key"
    assert _mask_reason(causal[:, 0]) == "a mask that is not boolean [B, 1, Q, K]"  # 3-D
    assert _mask_reason(causal.expand(2, 2, 5, 5)) == "a mask that is not boolean [B, 1, Q, K]"  # per-head
    assert _mask_reason(causal.float()) == "a mask that is not boolean [B, 1, Q, K]"


def test_layers_not_captured_run_sdpa_unless_it_would_drop_their_sinks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cheap path for the other layers is SDPA; a layer with attention sinks (which SDPA drops) runs its own
    eager attention instead, captured or not."""
    from transformers.integrations import sdpa_attention

    calls: list[int] = []
    original = sdpa_attention.sdpa_attention_forward

    def counting(module: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(module.layer_idx))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", counting)
    model = build_model("llama")
    ids = torch.tensor(random_prompts((9,)))
    with torch.inference_mode(), capture_attention(model, [0], _Heads(), "interface"):
        model.base_model(input_ids=ids, use_cache=False)
    assert calls == [1, 2]
    calls.clear()
    model.model.layers[2].self_attn.sinks = torch.zeros(model.config.num_attention_heads)
    with torch.inference_mode(), capture_attention(model, [0], _Heads(), "interface"):
        model.base_model(input_ids=ids, use_cache=False)
    assert calls == [1]


def test_eager_masks_for_the_fallback() -> None:
    """What the eager fallback hands to the model's eager function: ``None`` for a module that says it is not causal
    and got no mask, else an additive mask in the query's dtype (0 where a key may be seen, the dtype's lowest
    value elsewhere); the causal pattern ends at the last key when the query is shorter (a cached decode step)."""
    from attnscan.engine.capture import _additive_mask, _causal

    q, k = torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 5, 4)
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[None, None]
    assert torch.equal(_causal(None, _Module(), q, k), expected)
    given = torch.zeros(1, 1, 2, 5, dtype=torch.bool)
    assert _causal(given, _Module(), q, k) is given
    on_meta = _causal(None, _Module(), q.to("meta"), k.to("meta"))  # built where the query is (no GPU needed)
    assert on_meta.device.type == "meta" and on_meta.shape == expected.shape

    plain = torch.nn.Module()  # no is_causal attribute: causal, as transformers assumes
    square = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    low = torch.finfo(torch.bfloat16).min
    additive = _additive_mask(None, plain, square, square)
    assert additive.dtype == torch.bfloat16 and additive.shape == (1, 1, 3, 3)
    assert torch.equal(additive[0, 0], torch.tensor([[0, low, low], [0, 0, low], [0, 0, 0]], dtype=torch.bfloat16))
    custom = torch.tensor([[True, False, True]]).expand(3, 3)[None, None]
    converted = _additive_mask(custom, plain, square.float(), square.float())
    assert converted.dtype == torch.float32 and torch.equal(converted == 0, custom)
    assert (converted[~custom] == torch.finfo(torch.float32).min).all()
    already = torch.zeros(1, 1, 3, 3)
    assert _additive_mask(already, plain, square, square) is already  # a float mask is already additive
    module = _Module()
    module.is_causal = False
    assert _additive_mask(None, module, square, square) is None
    assert _additive_mask(custom, module, square, square).shape == (1, 1, 3, 3)  # a given mask still applies


def test_what_sdpa_cannot_run_and_where_outputs_come_from() -> None:
    from attnscan.engine.capture import _beyond_sdpa, _output_from_chunks

    module = _Module()
    assert not _beyond_sdpa(module, {})
    assert not _beyond_sdpa(module, {"sliding_window": 4, "dropout": 0.0})
    assert _beyond_sdpa(module, {"s_aux": torch.zeros(2)})  # sinks passed in (gpt-oss)
    assert _beyond_sdpa(module, {"softcap": 50.0})
    module.sinks = torch.zeros(2)  # sinks held by the module
    assert _beyond_sdpa(module, {})
    assert _output_from_chunks(torch.device("cpu")) is True
    assert _output_from_chunks(torch.device("cuda")) is False


def test_the_eager_function_is_the_models_own() -> None:
    import transformers.models.gemma2.modeling_gemma2 as gemma2
    import transformers.models.llama.modeling_llama as llama

    from attnscan.engine.capture import _eager_function

    model = build_model("gemma2", attn="eager")
    assert _eager_function(model.model.layers[0].self_attn) is gemma2.eager_attention_forward
    assert gemma2.eager_attention_forward is not llama.eager_attention_forward  # Gemma 2's soft-caps
    assert _eager_function(_Module()) is llama.eager_attention_forward  # a module without one: Llama's


@pytest.mark.parametrize("masked", [False, True])
def test_chunks_stay_on_the_inputs_device(masked: bool) -> None:
    """Every buffer of the chunked path is made where the inputs are (checked on the meta device, which needs no
    GPU: a buffer made on the CPU would fail against meta inputs or come back on the CPU)."""
    q = torch.zeros(2, 4, 10, 8, device="meta", dtype=torch.bfloat16)
    kv = torch.zeros(2, 2, 10, 8, device="meta", dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 10, 10, dtype=torch.bool, device="meta") if masked else None
    mean, out = chunked_attention(q, kv, kv, mask, 0.3, rows=4)
    assert mean is not None and out is not None
    assert (mean.device.type, mean.dtype, tuple(mean.shape)) == ("meta", torch.float32, (2, 10, 10))
    assert (out.device.type, out.dtype, tuple(out.shape)) == ("meta", torch.bfloat16, (2, 10, 4, 8))
