"""Synthetic per-layer features with a planted signal, for the detector, metric and store tests (no model)."""

from __future__ import annotations

import numpy as np

N, K, H, LAYERS, PLANTED = 80, 6, 16, 4, 2


def make_features(
    n: int = N, k: int = K, h: int = H, layers: int = LAYERS, planted: int = PLANTED, amp: float = 5.0, seed: int = 0
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], np.ndarray]:
    """Gaussian noise in every layer; in ``planted`` the jailbreak prompts also get ``amp · w_i · u vᵀ``.

    ``u [K]`` and ``v [H]`` are fixed unit vectors (a rank-1 token × feature pattern), ``w_i ~ U(0.5, 1.5)`` a
    positive per-prompt weight. ``pooled`` is the mean over tokens.
    """
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    u = rng.uniform(0.5, 1.5, k)
    u /= np.linalg.norm(u)
    v = rng.standard_normal(h)
    v /= np.linalg.norm(v)
    tensors, pooled = {}, {}
    for layer in range(layers):
        x = rng.standard_normal((n, k, h))
        if layer == planted:
            w = rng.uniform(0.5, 1.5, n) * y
            x += amp * w[:, None, None] * np.outer(u, v)[None]
        tensors[layer] = x.astype(np.float32)
        pooled[layer] = x.mean(axis=1).astype(np.float32)
    return tensors, pooled, y
