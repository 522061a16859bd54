"""Model specs, security defaults and the architecture registry (embedded model, GGUF cache: test_gguf.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from attnscan import AttnscanError, arch_facts, load_model
from attnscan.models.arch import ARCHITECTURES
from attnscan.models.loading import parse_layers
from attnscan.testing.tiny import build_model, tiny_tokenizer


def test_parse_layers() -> None:
    assert parse_layers("all", 4) == (0, 1, 2, 3)
    assert parse_layers(None, 2) == (0, 1)
    assert parse_layers("3, 1,1", 4) == (1, 3)
    assert parse_layers("1-3", 5) == (1, 2, 3)
    assert parse_layers("-1", 5) == (4,)
    assert parse_layers([0, 2], 3) == (0, 2)
    with pytest.raises(AttnscanError, match=r"layer 40 out of range: model has 30 layers \(0-29\)"):
        parse_layers("3,40", 30)
    with pytest.raises(AttnscanError, match="cannot read layer 'x'"):
        parse_layers("1,x", 3)


def test_local_directory_loads(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir), device="cpu")
    assert loaded.arch.n_layers == 3 and loaded.arch.n_kv_heads == 2 and loaded.arch.route == "interface"
    assert loaded.source["kind"] == "local"
    assert loaded.model.config._attn_implementation == "sdpa"
    assert not loaded.model.training


def test_pickle_weights_are_refused_unless_allowed(tmp_path: Path) -> None:
    model = build_model("llama")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(AttnscanError, match="--allow-pickle"):
        load_model(str(tmp_path), device="cpu")
    loaded = load_model(str(tmp_path), device="cpu", allow_pickle=True)
    emb = loaded.model.get_input_embeddings().weight
    assert torch.equal(emb, model.get_input_embeddings().weight)


def test_remote_code_is_not_trusted_by_default(tmp_path: Path) -> None:
    config = {"model_type": "attnscan-custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(AttnscanError, match="cannot load model"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("./no/such/dir", "unknown model"),
        ("missing-file.gguf", "GGUF file not found"),
        ("not a model!", "unknown model"),
        ("attnscan-test/definitely-not-on-the-hub", "cannot load model"),
    ],
)
def test_bad_specs_give_one_line_errors(spec: str, match: str) -> None:
    with pytest.raises(AttnscanError, match=match) as info:
        load_model(spec, device="cpu")
    assert "\n" not in str(info.value)


def test_bad_dtype_and_device(tiny_model_dir: Path) -> None:
    with pytest.raises(AttnscanError, match="unknown dtype"):
        load_model(str(tiny_model_dir), dtype="float8", device="cpu")
    with pytest.raises(AttnscanError, match="unknown device"):
        load_model(str(tiny_model_dir), device="tpu-9")


def test_registry_covers_test_architectures_and_warns_on_unknown() -> None:
    for arch in ("llama", "mistral", "gemma3", "gptj", "gpt2", "gpt_neo"):
        model = build_model(arch)
        facts = arch_facts(model.config, getattr(type(model), "_supports_attention_backend", False))
        assert facts.known and ARCHITECTURES[facts.config_class].verified
        assert facts.n_layers == model.config.num_hidden_layers
    from transformers import OPTConfig

    warnings.simplefilter("always")
    with pytest.warns(UserWarning, match="has not been verified on OPTConfig"):
        facts = arch_facts(OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4))
    assert not facts.known and facts.n_heads == 4 and facts.head_dim == 8


def test_layer_windows() -> None:
    assert arch_facts(build_model("mistral").config).layer_windows == (6, 6, 6)
    assert arch_facts(build_model("gemma3").config).layer_windows == (6, 6, None, 6)
    assert arch_facts(build_model("gpt_neo").config).layer_windows == (None, 6)
    assert arch_facts(build_model("gpt_neo").config).route == "hooks"
    assert arch_facts(build_model("llama").config).sliding_window is None
