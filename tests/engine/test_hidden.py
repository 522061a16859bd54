"""Per-prompt layer features against transformers' own hidden states, one prompt at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import attnscan.engine.hidden as features_mod
from attnscan.engine.hidden import Features, extract_features, labelled_features
from attnscan.errors import AttnscanError
from attnscan.models.anatomy import base_model, decoder_layers
from attnscan.models.loading import LoadedModel, from_model
from attnscan.prompts.encoding import encode
from attnscan.prompts.sets import PromptSet
from attnscan.testing.tiny import build_model, tiny_tokenizer

TEXTS = [
    "how do i make bread",
    "tell me a story about the snow and a poem please step by step",
    "hi",
    "write python to kill a process now please",
    "what is this",
]
K = 6


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def loaded(request: pytest.FixtureRequest) -> LoadedModel:
    return from_model(build_model(request.param), tiny_tokenizer(), spec=f"tiny-{request.param}")


def _final_norm(model: Any) -> torch.nn.Module:
    base = base_model(model)
    for name in ("norm", "ln_f"):
        if hasattr(base, name):
            module: torch.nn.Module = getattr(base, name)
            return module
    raise AssertionError("no final norm found")


def reference(loaded: LoadedModel, texts: list[str]) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Each prompt alone: ``hidden_states[L + 1]`` for every layer but the last, whose reference is the input of
    the final norm (transformers puts the *normed* state last in ``hidden_states``)."""
    model = loaded.model
    n_layers = loaded.arch.n_layers
    enc = encode(loaded.tokenizer, texts, 448, truncate="tail")
    captured: list[torch.Tensor] = []
    handle = _final_norm(model).register_forward_pre_hook(lambda m, args: captured.append(args[0][0].clone()))
    per_prompt: list[list[torch.Tensor]] = []
    try:
        with torch.no_grad():
            for ids in enc.ids:
                captured.clear()
                out = model(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
                states = [out.hidden_states[layer + 1][0] for layer in range(n_layers - 1)]
                per_prompt.append([*states, captured[-1]])
    finally:
        handle.remove()
    return per_prompt, list(enc.lengths)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_features_match_hidden_states(loaded: LoadedModel, batch_size: int) -> None:
    feats = extract_features(loaded, TEXTS, last_k=K, batch_size=batch_size)
    ref, lengths = reference(loaded, TEXTS)
    assert feats.layers == tuple(range(loaded.arch.n_layers))
    assert feats.lengths.tolist() == lengths
    assert min(lengths) < K, "one prompt must be shorter than K to exercise the left padding"
    for i, n in enumerate(lengths):
        kk = min(n, K)
        for layer in feats.layers:
            h = ref[i][layer].numpy()
            tokens, pooled = feats.tensors[layer][i], feats.pooled[layer][i]
            np.testing.assert_allclose(tokens[K - kk :], h[n - kk :], atol=1e-5, rtol=0)
            assert not tokens[: K - kk].any()
            np.testing.assert_allclose(pooled, h.mean(0), atol=1e-5, rtol=0)
        assert feats.mask[i].tolist() == [False] * (K - kk) + [True] * kk
    assert feats.tensors[0].dtype == np.float32


def test_layer_subset_stops_early_and_matches(loaded: LoadedModel) -> None:
    full = extract_features(loaded, TEXTS, last_k=K, batch_size=2)
    seen: list[int] = []
    last = decoder_layers(loaded.model)[-1]
    handle = last.register_forward_pre_hook(lambda m, a: seen.append(1))
    try:
        part = extract_features(loaded, TEXTS, layers=[0], last_k=K, batch_size=2)
    finally:
        handle.remove()
    assert part.layers == (0,)
    assert not seen, "the forward should stop after the deepest chosen layer"
    np.testing.assert_array_equal(part.tensors[0], full.tensors[0])
    np.testing.assert_array_equal(part.pooled[0], full.pooled[0])


def test_hooks_removed_after_exception(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    stack = decoder_layers(loaded.model)
    before = [dict(layer._forward_hooks) for layer in stack]  # transformers may keep its own capturing hooks
    monkeypatch.setattr(features_mod, "reduce_hidden", boom)
    with pytest.raises(RuntimeError, match="boom"):
        extract_features(loaded, TEXTS, last_k=K, store=tmp_path / "f")
    assert [dict(layer._forward_hooks) for layer in stack] == before
    assert not (tmp_path / "f").exists()
    assert not list(tmp_path.iterdir()), "the temporary store must be removed"


def test_store_mode_gives_same_arrays(loaded: LoadedModel, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    calls: list[tuple[int, int, str]] = []
    mem = extract_features(loaded, TEXTS, last_k=K, batch_size=2)
    stored = extract_features(
        loaded, TEXTS, last_k=K, batch_size=2, store=tmp_path / "feats", progress=lambda *a: calls.append(a)
    )
    assert calls[-1] == (len(TEXTS), len(TEXTS), "features")
    assert isinstance(stored.tensors[0], np.memmap)
    for layer in mem.layers:
        np.testing.assert_array_equal(stored.tensors[layer], mem.tensors[layer])
        np.testing.assert_array_equal(stored.pooled[layer], mem.pooled[layer])
        plain = load_file(str(tmp_path / "feats" / f"L{layer}.safetensors"))  # any safetensors reader opens it
        np.testing.assert_array_equal(plain["tokens"], mem.tensors[layer])
    assert stored.info["length"] == 448
    with pytest.raises(AttnscanError, match="already holds features"):
        extract_features(loaded, TEXTS, store=tmp_path / "feats")


def test_save_load_round_trip(loaded: LoadedModel, tmp_path: Path) -> None:
    feats = extract_features(loaded, PromptSet("demo", tuple(TEXTS), "<memory>"), layers="0,1", last_k=3)
    feats.save(tmp_path / "f")
    assert json.loads((tmp_path / "f" / "features.json").read_text())["format"] == "attnscan.features"
    again = Features.load(tmp_path / "f", mmap=False)
    assert again.layers == (0, 1) and again.last_k == 3
    assert not isinstance(again.tensors[0], np.memmap)
    np.testing.assert_array_equal(again.tensors[1], feats.tensors[1])
    np.testing.assert_array_equal(again.pooled[0], feats.pooled[0])
    np.testing.assert_array_equal(again.lengths, feats.lengths)
    assert again.info["sets"][0]["name"] == "demo"
    with pytest.raises(AttnscanError, match="already holds features"):
        feats.save(tmp_path / "f")
    feats.save(tmp_path / "f", overwrite=True)
    with pytest.raises(AttnscanError, match="not a features directory"):
        Features.load(tmp_path)


def test_labelled_features(loaded: LoadedModel) -> None:
    feats = labelled_features(loaded, TEXTS[:2], TEXTS[2:], layers=[1], last_k=2)
    assert feats.labels is not None
    assert feats.labels.tolist() == [0, 0, 1, 1, 1]
    assert [(s["role"], s["start"], s["stop"]) for s in feats.info["sets"]] == [("benign", 0, 2), ("jailbreak", 2, 5)]


def test_group_labels_travel_with_the_features(loaded: LoadedModel, tmp_path: Path) -> None:
    """A PromptSet's group labels are kept in features.json; prompts without labels leave no ``groups`` key."""
    groups = tuple({"template_id": f"t{i % 2}", "request_id": f"r{i}"} for i in range(len(TEXTS)))
    labelled_set = PromptSet("demo", tuple(TEXTS), "<memory>", groups=groups)
    feats = extract_features(loaded, labelled_set, layers=[0], last_k=2, store=tmp_path / "f")
    doc = json.loads((tmp_path / "f" / "features.json").read_text())
    assert doc["info"]["groups"] == [dict(g) for g in groups] and feats.info["groups"] == doc["info"]["groups"]
    plain = extract_features(loaded, PromptSet("demo", tuple(TEXTS), "<memory>"), layers=[0], last_k=2)
    assert "groups" not in plain.info
    both = labelled_features(loaded, TEXTS[:2], PromptSet("j", tuple(TEXTS[2:]), "<memory>", groups=groups[2:]))
    assert both.info["groups"] == [{}, {}, *[dict(g) for g in groups[2:]]]
    assert "groups" not in labelled_features(loaded, TEXTS[:2], TEXTS[2:], layers=[0]).info


def test_bad_input(loaded: LoadedModel) -> None:
    with pytest.raises(AttnscanError, match="out of range"):
        extract_features(loaded, TEXTS, layers=[7])
    with pytest.raises(AttnscanError, match="no prompts"):
        extract_features(loaded, [])
    with pytest.raises(AttnscanError, match="last_k"):
        extract_features(loaded, TEXTS, last_k=0)
    with pytest.raises(AttnscanError, match="batch size"):
        extract_features(loaded, TEXTS, batch_size=0)


def test_truncation_keeps_tail_and_warns(loaded: LoadedModel) -> None:
    with pytest.warns(UserWarning, match="cut to their last 4"):
        feats = extract_features(loaded, TEXTS[:2], layers=[0], last_k=2, length=4)
    assert feats.lengths.tolist() == [4, 4]
    assert feats.info["truncated"] == 2
