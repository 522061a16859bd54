"""Model anatomy on every tiny architecture: the decoder, its layers and each layer's attention module."""

from __future__ import annotations

import pytest
from torch import nn

from attnscan.models.anatomy import attention_module, base_model, decoder_layers
from attnscan.testing.tiny import BUILDERS, build_model


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_anatomy_finds_decoder_layers_and_attention(arch: str) -> None:
    model = build_model(arch)
    base = base_model(model)
    assert base is model.base_model and base is not model  # the decoder without the LM head
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert all(any(layer is sub for sub in base.modules()) for layer in layers)
    for layer in layers:
        attention = attention_module(layer)
        assert type(attention).__name__.endswith("Attention")
        # The outermost one: no module above it inside the layer is also an attention module.
        assert attention is next(m for m in layer.modules() if type(m).__name__.endswith("Attention"))


def test_anatomy_without_the_expected_parts() -> None:
    plain = nn.Linear(2, 2)
    assert base_model(plain) is plain  # no base_model attribute: the model itself

    class Config:
        num_hidden_layers = 3

    class NoLayers(nn.Module):
        config = Config()

    with pytest.raises(ValueError, match="cannot find the 3 decoder layers of NoLayers"):
        decoder_layers(NoLayers())
    with pytest.raises(ValueError, match="cannot find the attention module in Linear"):
        attention_module(plain)
