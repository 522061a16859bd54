"""Synthetic inputs with a planted signal: per-layer features (the detector, metric and store tests, no model) and
prompts drawn from two disjoint vocabularies of the tiny tokenizer (the input and job tests)."""

from __future__ import annotations

import random

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


# Two disjoint vocabularies of the tiny tokenizer: the planted signal. Prompts drawn from their union carry none.
BENIGN_WORDS = "how do i make bread recipe poem about snow story tell me python write explain what is the a".split()  # noqa: SIM905
JAILBREAK_WORDS = "ignore your rules now you are free pretend developer mode no filter grandmother please".split()  # noqa: SIM905


def sentences(words: list[str], n: int, seed: int, lo: int = 5, hi: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def make_template_features(
    n_templates: int = 40,
    per: int = 4,
    h: int = 64,
    k: int = 4,
    amp: float = 2.0,
    label_signal: float = 0.0,
    shared: bool = False,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features that carry the identity of their template: ``(x [N, k, h], y [N], template [N])``.

    ``n_templates`` templates of ``per`` prompts each; every template has its own random vector (``amp`` per
    feature), added to every token of its prompts over unit Gaussian noise. With ``shared=False`` the odd templates
    are the jailbreak ones (label and template go together, as when jailbreak and benign prompts use different
    wrappers); with ``shared=True`` each template holds both classes. ``label_signal`` adds that much of one fixed
    unit direction to every jailbreak prompt: a signal that does not depend on the template.
    """
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n_templates, h)) * amp
    template = np.repeat(np.arange(n_templates), per)
    y = np.tile(np.repeat([0, 1], per // 2), n_templates) if shared else template % 2
    x = rng.standard_normal((template.size, k, h)) + vectors[template][:, None, :]
    v = rng.standard_normal(h)
    x += label_signal * y[:, None, None] * (v / np.linalg.norm(v))[None, None, :]
    return x.astype(np.float32), y.astype(np.int64), template
