"""The CP and probe detectors on synthetic features (no model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from planted import PLANTED, N

from attnscan.detect.detectors import CPDetector, ProbeDetector, check_cp_params, check_probe_params
from attnscan.errors import AttnscanError

# ------------------------------------------------------------------------------------------- CP projection


def test_cp_projection_reproduces_exact_training_factors() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 3))
    a -= a.mean(axis=0)  # zero-mean prompt factors: the per-feature centring leaves the tensor exactly rank 3
    b, c = rng.standard_normal((6, 3)), rng.standard_normal((16, 3))
    x = np.einsum("nr,kr,hr->nkh", a, b, c)
    y = np.repeat([0, 1], 20)
    det = CPDetector(rank=3, seed=0, max_iter=2000, tol=1e-12).fit(x, y)
    assert det.rec_error_ is not None and det.rec_error_ < 1e-6
    fitted = det.train_factors_
    assert fitted is not None
    projected = det.transform(x)
    assert np.linalg.norm(projected - fitted) / np.linalg.norm(fitted) < 1e-3

    # The vec order matters: flattening each slab column-major instead of row-major does not reproduce them.
    assert det.mean_ is not None and det.scale_ is not None
    assert det.token_factors_ is not None and det.feature_factors_ is not None
    xs = (x - det.mean_) / det.scale_
    kr = (det.token_factors_[:, None, :] * det.feature_factors_[None, :, :]).reshape(-1, 3)
    wrong = xs.transpose(0, 2, 1).reshape(40, -1) @ np.linalg.pinv(kr).T
    assert np.linalg.norm(wrong - fitted) / np.linalg.norm(fitted) > 0.1

    # and the factors reconstruct the standardised tensor in tensorly's convention
    import tensorly as tl

    assert det.weights_ is not None
    recon = tl.cp_to_tensor((det.weights_, [fitted / det.weights_, det.token_factors_, det.feature_factors_]))
    np.testing.assert_allclose(recon, xs, atol=1e-5)


@pytest.mark.parametrize("layer", [0, PLANTED])
def test_cp_projection_matches_noisy_training_factors(features: Any, layer: int) -> None:
    tensors, _, y = features
    det = CPDetector(rank=4, seed=0).fit(tensors[layer], y)
    projected, fitted = det.transform(tensors[layer]), det.train_factors_
    assert fitted is not None and projected.shape == fitted.shape == (N, 4)
    for r in range(4):
        assert np.corrcoef(projected[:, r], fitted[:, r])[0, 1] > 0.9


def test_cp_detector_is_seeded(features: Any) -> None:
    tensors, _, y = features
    p1 = CPDetector(rank=4, seed=3).fit(tensors[PLANTED], y).predict_proba(tensors[PLANTED])
    p2 = CPDetector(rank=4, seed=3).fit(tensors[PLANTED], y).predict_proba(tensors[PLANTED])
    np.testing.assert_array_equal(p1, p2)
    assert p1.shape == (N,) and ((p1 >= 0) & (p1 <= 1)).all()


def test_detector_input_errors(features: Any) -> None:
    tensors, pooled, y = features
    with pytest.raises(AttnscanError, match="not fitted"):
        CPDetector().predict_proba(tensors[0])
    with pytest.raises(AttnscanError, match="not fitted"):
        ProbeDetector().predict_proba(pooled[0])
    with pytest.raises(AttnscanError, match="both benign"):
        CPDetector(rank=2).fit(tensors[0], np.zeros(N, dtype=int))
    with pytest.raises(AttnscanError, match="0 \\(benign\\) or 1"):
        ProbeDetector().fit(pooled[0], np.full(N, 2))
    with pytest.raises(AttnscanError, match="one label per prompt"):
        ProbeDetector().fit(pooled[0], y[:-1])
    with pytest.raises(AttnscanError, match="3 dimensions"):
        CPDetector().fit(pooled[0], y)
    bad = tensors[0].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(AttnscanError, match="NaN"):
        CPDetector().fit(bad, y)
    det = CPDetector(rank=2).fit(tensors[0], y)
    with pytest.raises(AttnscanError, match="fitted on"):
        det.predict_proba(tensors[0][:, :, :8])
    with pytest.raises(AttnscanError, match="rank"):
        CPDetector(rank=0).fit(tensors[0], y)


def test_parameters_are_checked_once_at_fit(features: Any) -> None:
    """The constructors keep the parameters as given; fit checks them with the one check per parameter."""
    tensors, pooled, y = features
    assert CPDetector(rank=0).rank == 0 and ProbeDetector(C=-1.0).C == -1.0
    for bad, match in [
        ({"rank": 0}, "CP rank must be a positive integer"),
        ({"rank": 2.5}, "CP rank must be a positive integer"),
        ({"C": 0.0}, "C must be positive"),
        ({"max_iter": 0}, "max_iter must be at least 1"),
    ]:
        with pytest.raises(AttnscanError, match=match):
            check_cp_params(**{"rank": 2, "C": 1.0, "max_iter": 10, **bad})
        with pytest.raises(AttnscanError, match=match):
            CPDetector(**bad).fit(tensors[0], y)
    with pytest.raises(AttnscanError, match="C must be positive"):
        check_probe_params(-1.0)
    with pytest.raises(AttnscanError, match="C must be positive"):
        ProbeDetector(C=-1.0).fit(pooled[0], y)
    check_cp_params(2, 1.0, 10)
    check_probe_params(0.5)


def test_from_state_checks_its_input(features: Any) -> None:
    tensors, _, y = features
    arrays, meta = CPDetector(rank=2).fit(tensors[0], y).to_state()
    assert meta["kind"] == "cp" and meta["rank"] == 2
    with pytest.raises(AttnscanError, match="kind"):
        ProbeDetector.from_state(arrays, meta)
    with pytest.raises(AttnscanError, match="lacks array 'coef'"):
        CPDetector.from_state({k: v for k, v in arrays.items() if k != "coef"}, meta)
    with pytest.raises(AttnscanError, match="shape"):
        CPDetector.from_state({**arrays, "mean": arrays["mean"][:3]}, meta)
    with pytest.raises(AttnscanError, match="CP rank must be a positive integer"):
        CPDetector.from_state(arrays, {**meta, "rank": 0})
