"""Detector inputs on the tiny Llama: the attention block summaries equal the scan's."""

from __future__ import annotations

import numpy as np
import pytest
from planted import BENIGN_WORDS, JAILBREAK_WORDS, sentences

from attnscan.analysis.scan import scan
from attnscan.detect.inputs import attention_blocks
from attnscan.models.loading import LoadedModel


@pytest.mark.filterwarnings("ignore:set '.*' has only")
def test_attention_blocks_equal_the_scan_summaries(loaded: LoadedModel) -> None:
    texts = sentences(BENIGN_WORDS, 5, 30, 3, 20)
    other = sentences(JAILBREAK_WORDS, 3, 31)
    got = attention_blocks(loaded, texts, layers=[0, 2], length=24, blocks=4, batch_size=2)
    result = scan(
        loaded,
        texts,
        other,
        layers=[0, 2],
        length=24,
        summary_blocks=4,
        align="relative",
        truncate="tail",
        batch_size=3,
    )
    ref = result.sets["benign"].blocks.numpy()
    assert got.blocks[0].shape == (5, 4, 4)
    np.testing.assert_allclose(got.blocks[0], ref[:, 0], rtol=0, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got.blocks[2], ref[:, 1], rtol=0, atol=1e-6, equal_nan=True)
    assert got.lengths.tolist() == result.sets["benign"].lengths.tolist()
    assert np.isnan(got.blocks[0][:, 0, 3]).all()  # above the causal diagonal: nothing to average
