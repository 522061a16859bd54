"""Jailbreak detectors on per-prompt layer features, their metrics, and a per-layer detection table.

The inputs are plain arrays extracted elsewhere (nothing here loads or runs a model, prints, or pickles):

- ``tensors[layer]``: ``float [N, K, H]`` — for each of N prompts, the representations of its last K token
  positions (H features, the hidden size);
- ``pooled[layer]``: ``float [N, H]`` — one vector per prompt (e.g. the mean over the prompt's tokens);
- ``y``: ``int [N]`` — 1 = jailbreak, 0 = benign.

Detectors
---------
:class:`CPDetector` follows Kadali & Papalexakis (2026, "Jailbreaking Leaves a Trace"):

1. **Standardise.** Each feature ``h`` is centred and scaled by its mean and standard deviation over all training
   prompts *and* token positions (``mean_[h]``, ``scale_[h]``; a constant feature keeps scale 1). New prompts use
   the training statistics. Without it a few high-variance hidden dimensions would dominate the decomposition.
2. **Decompose** the standardised training tensor with CP/PARAFAC (``tensorly.decomposition.parafac``: ALS, random
   initialisation seeded by ``seed``, unit-norm factor columns)::

       X ≈ Σ_r w_r · a_r ∘ b_r ∘ c_r      prompt factors A [N,R], token factors B [K,R], feature factors C [H,R]

3. **Project.** The prompt factor of a prompt slab ``X_i [K,H]`` is the least-squares solution of
   ``min_a ||X_i − B diag(a) Cᵀ||_F``, i.e. ``a = pinv(B ⊙ C) vec(X_i)`` with ``⊙`` the Khatri–Rao product and
   ``vec`` the row-major flattening — the order of tensorly's mode-0 unfolding, so for the training prompts it
   reproduces ``A · diag(w)`` once ALS has converged. Training prompts go through the same projection as new
   prompts (for them it is one more ALS update of the prompt mode), so the classifier sees features computed the
   same way at fit and at scoring time. The fitted ALS factors stay available as ``train_factors_``.
4. **Classify** with an L2 logistic regression (scikit-learn, ``C``) on the prompt factors, each standardised with
   its training mean and standard deviation.

CP components come out in arbitrary order and sign, so components are not comparable across layers or fits; only
the detector's scores are.

:class:`ProbeDetector` is the baseline: the same standardised logistic regression on ``pooled[layer]``.

Both return ``predict_proba(x) -> float [N]``, the probability of *jailbreak* (not scikit-learn's ``[N, 2]``), and
round-trip through :meth:`to_state` / ``from_state`` (arrays + JSON-able metadata) and :func:`save_detector` /
:func:`load_detector` (``detector.safetensors`` + ``detector.json``). The logistic regression is fitted with
scikit-learn and then scored with its stored ``coef``/``intercept``, so a loaded detector gives bit-identical scores.

Metrics (:func:`metrics`)
-------------------------
- ``auroc``: area under the ROC curve, rank-based (Mann–Whitney with mid-ranks: a tied jailbreak/benign pair counts
  one half). Equals ``sklearn.metrics.roc_auc_score``.
- ``f1`` and ``accuracy``: at threshold 0.5 on the probability (``score >= 0.5`` predicts jailbreak).
- ``tpr1`` / ``tpr5``: true-positive rate at 1 % / 5 % false-positive rate, without interpolation: the largest TPR
  among the points of the empirical ROC curve (thresholds at the observed scores, ``score >= t`` predicts
  jailbreak) whose FPR is at most the target. With fewer than 100 benign prompts, "FPR ≤ 1 %" means *no* benign
  prompt above the threshold.

:func:`cross_validate` scores every prompt out of fold (stratified k-fold, shuffled with ``seed``; the detector,
CP decomposition included, is fitted on the training folds only) and computes the metrics on the pooled
out-of-fold scores. Pooling assumes the folds' models give comparably scaled probabilities, as is usual. Its 95 %
intervals are percentile bootstrap intervals over prompts, resampled within each class (so each resample keeps the
class counts) with ``seed``; they hold the fitted models fixed and so reflect the test-set sampling only.

Layer table (:func:`layer_detection_table`)
-------------------------------------------
One row per layer with the CP and probe metrics (``cp_auroc``, ``cp_auroc_low``, ``cp_auroc_high``, ``cp_f1``,
``cp_accuracy``, ``cp_tpr1``, ``cp_tpr5``, ``cp_tpr5_low``, ``cp_tpr5_high``, and the same with ``probe_``) and
``flagged``: the layer's out-of-fold AUROC (of the CP detector, or of the probe with ``flag_on="probe"``) is at
least ``threshold``. All layers share the same folds and bootstrap resamples. A flag says the layer's
representations separate the two prompt sets; it is not a measurement of jailbreak success.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd

from ..errors import AttnscanError

__all__ = [
    "CPDetector",
    "Detector",
    "ProbeDetector",
    "auroc",
    "best_layer",
    "cross_validate",
    "fit_detectors",
    "flagged_layers",
    "layer_detection_table",
    "load_detector",
    "metrics",
    "save_detector",
    "tpr_at_fpr",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

STATE_FILE = "detector.safetensors"
META_FILE = "detector.json"
FORMAT = "attnscan.detector"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------- helpers


def _labels(y: npt.ArrayLike, n: int | None = None) -> IntArray:
    """``y`` as ``int64 [N]`` of 0/1, checked (length ``n`` when given)."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise AttnscanError(f"labels must be a 1-D array of 0/1, got shape {arr.shape}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise AttnscanError(f"labels must be 0 (benign) or 1 (jailbreak), got values {np.unique(arr)[:5].tolist()}")
    if n is not None and arr.shape[0] != n:
        raise AttnscanError(f"{arr.shape[0]} labels for {n} prompts: give one label per prompt")
    return arr.astype(np.int64)


def _both_classes(y: IntArray, what: str) -> None:
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise AttnscanError(
            f"{what} needs both benign (0) and jailbreak (1) prompts; got {y.size - n_pos} benign and {n_pos} jailbreak"
        )


def _features(x: npt.ArrayLike, ndim: int, what: str) -> FloatArray:
    """``x`` as float64 with ``ndim`` dimensions and finite values."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != ndim:
        raise AttnscanError(f"{what} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise AttnscanError(f"{what} holds no prompts")
    if not np.isfinite(arr).all():
        raise AttnscanError(f"{what} holds NaN or infinite values: check the feature extraction")
    return arr


def _standardiser(x: FloatArray, axes: tuple[int, ...]) -> tuple[FloatArray, FloatArray]:
    """Mean and standard deviation of ``x`` over ``axes`` (population sd; a zero sd becomes 1)."""
    mean = x.mean(axis=axes)
    scale = x.std(axis=axes)
    scale = np.where(scale > 0, scale, 1.0)
    return np.asarray(mean, dtype=np.float64), np.asarray(scale, dtype=np.float64)


def _sigmoid(z: FloatArray) -> FloatArray:
    return np.asarray(np.exp(-np.logaddexp(0.0, -z)), dtype=np.float64)


def _need(arrays: Mapping[str, np.ndarray], name: str, shape: tuple[int | None, ...]) -> FloatArray:
    """``arrays[name]`` as float64, checked against ``shape`` (None matches any length)."""
    if name not in arrays:
        raise AttnscanError(f"detector state lacks array {name!r}: the file is incomplete or not an attnscan detector")
    arr = np.asarray(arrays[name], dtype=np.float64)
    if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape, strict=True)):
        raise AttnscanError(f"detector state array {name!r} has shape {arr.shape}, expected {shape}")
    return arr


class _LogisticHead:
    """Standardise features ``[N, F]`` with training statistics, then an L2 logistic regression.

    Fitted with scikit-learn's ``LogisticRegression`` (lbfgs), then kept as plain arrays: ``mean [F]``,
    ``scale [F]``, ``coef [F]``, ``intercept`` (scalar) — so scoring needs no scikit-learn object.
    """

    def __init__(self, mean: FloatArray, scale: FloatArray, coef: FloatArray, intercept: float) -> None:
        self.mean = mean
        self.scale = scale
        self.coef = coef
        self.intercept = intercept

    @classmethod
    def fit(cls, features: FloatArray, y: IntArray, c: float, max_iter: int) -> _LogisticHead:
        from sklearn.linear_model import LogisticRegression

        mean, scale = _standardiser(features, (0,))
        model = LogisticRegression(C=c, max_iter=max_iter)
        model.fit((features - mean) / scale, y)
        if list(model.classes_) != [0, 1]:  # pragma: no cover - guarded by _both_classes
            raise AttnscanError(f"unexpected classes {model.classes_!r}")
        coef = np.asarray(model.coef_, dtype=np.float64).reshape(-1)
        return cls(mean, scale, coef, float(np.asarray(model.intercept_).reshape(-1)[0]))

    def decision(self, features: FloatArray) -> FloatArray:
        return np.asarray(((features - self.mean) / self.scale) @ self.coef + self.intercept, dtype=np.float64)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "head_mean": self.mean,
            "head_scale": self.scale,
            "coef": self.coef,
            "intercept": np.array([self.intercept], dtype=np.float64),
            "classes": np.array([0, 1], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], n_features: int) -> _LogisticHead:
        if "classes" in arrays and np.asarray(arrays["classes"]).tolist() != [0, 1]:
            raise AttnscanError(f"detector classes must be [0, 1], got {np.asarray(arrays['classes']).tolist()}")
        return cls(
            _need(arrays, "head_mean", (n_features,)),
            _need(arrays, "head_scale", (n_features,)),
            _need(arrays, "coef", (n_features,)),
            float(_need(arrays, "intercept", (1,))[0]),
        )


@functools.cache
def _thread_controller() -> Any:
    """One threadpoolctl controller, made on first use (after the numerical libraries it must see are loaded)."""
    import sklearn.linear_model  # noqa: F401  (loads scipy's and scikit-learn's native thread pools)
    import tensorly  # noqa: F401
    from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

    return ThreadpoolController()


def _threads(n: int | None) -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS and OpenMP pools to ``n`` threads inside the block (None: leave them)."""
    if n is None:
        return contextlib.nullcontext()
    return _thread_controller().limit(limits=int(n))  # type: ignore[no-any-return]


def _check_meta(meta: Mapping[str, Any], kind: str) -> None:
    if meta.get("kind") != kind:
        raise AttnscanError(f"detector state is of kind {meta.get('kind')!r}, not {kind!r}")


# --------------------------------------------------------------------------------------------------- detectors


class CPDetector:
    """CP (PARAFAC) prompt factors + logistic regression; see the module docstring for the method.

    Args:
        rank: number of CP components R.
        seed: seeds the random initialisation of the decomposition.
        C: inverse L2 regularisation strength of the logistic regression.
        max_iter: most ALS iterations of the decomposition.
        tol: ALS stops when the relative reconstruction error falls by less than this between iterations.
        lr_max_iter: most lbfgs iterations of the logistic regression.
        threads: BLAS/OpenMP threads while fitting and projecting (None leaves the libraries' settings). One
            thread is the default: at these sizes (10⁴–10⁶ tensor entries, a few hundred prompts) thread start-up
            makes ALS and lbfgs several times slower; pass None (or more) for very large tensors.

    Attributes after :meth:`fit` (float64): ``mean_ [H]``, ``scale_ [H]`` (feature standardisation),
    ``weights_ [R]``, ``token_factors_ [K, R]``, ``feature_factors_ [H, R]`` (unit-norm columns),
    ``train_factors_ [N, R]`` (the ALS prompt factors times the weights; not saved), ``rec_error_`` (relative
    reconstruction error of the standardised training tensor), ``n_iter_``.
    """

    kind: ClassVar[str] = "cp"

    def __init__(
        self,
        rank: int = 8,
        seed: int = 0,
        C: float = 1.0,
        max_iter: int = 100,
        tol: float = 1e-6,
        lr_max_iter: int = 1000,
        threads: int | None = 1,
    ) -> None:
        if int(rank) != rank or rank < 1:
            raise AttnscanError(f"CP rank must be a positive integer, got {rank}")
        if not C > 0:
            raise AttnscanError(f"C must be positive, got {C}")
        if max_iter < 1:
            raise AttnscanError(f"max_iter must be at least 1, got {max_iter}")
        self.rank = int(rank)
        self.seed = int(seed)
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.lr_max_iter = int(lr_max_iter)
        self.threads = threads
        self.mean_: FloatArray | None = None
        self.scale_: FloatArray | None = None
        self.weights_: FloatArray | None = None
        self.token_factors_: FloatArray | None = None
        self.feature_factors_: FloatArray | None = None
        self.train_factors_: FloatArray | None = None
        self.rec_error_: float | None = None
        self.n_iter_: int | None = None
        self._head: _LogisticHead | None = None
        self._projector: FloatArray | None = None

    def __repr__(self) -> str:
        fitted = "fitted" if self._head is not None else "unfitted"
        return f"CPDetector(rank={self.rank}, seed={self.seed}, C={self.C}, {fitted})"

    def fit(self, tensor: npt.ArrayLike, y: npt.ArrayLike) -> CPDetector:
        """Fit on ``tensor [N, K, H]`` and labels ``y [N]`` (1 = jailbreak); returns ``self``."""
        x = _features(tensor, 3, "CP detector input (prompts × tokens × features)")
        labels = _labels(y, x.shape[0])
        _both_classes(labels, "fitting a detector")
        import tensorly as tl
        from tensorly.decomposition import parafac

        self.mean_, self.scale_ = _standardiser(x, (0, 1))
        xs = (x - self.mean_) / self.scale_
        with _threads(self.threads), tl.backend_context("numpy"):
            cp, errors = parafac(
                xs,
                self.rank,
                n_iter_max=self.max_iter,
                init="random",
                random_state=self.seed,
                normalize_factors=True,
                tol=self.tol,
                return_errors=True,
            )
            weights, (a, b, c) = cp
            self.weights_ = np.asarray(weights, dtype=np.float64)
            self.token_factors_ = np.asarray(b, dtype=np.float64)
            self.feature_factors_ = np.asarray(c, dtype=np.float64)
            self.train_factors_ = np.asarray(a, dtype=np.float64) * self.weights_
            self.rec_error_ = float(errors[-1]) if len(errors) else float("nan")
            self.n_iter_ = len(errors)
            self._projector = None
            features = self._project(xs)
            self._head = _LogisticHead.fit(features, labels, self.C, self.lr_max_iter)
        return self

    def _fitted(self) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, _LogisticHead]:
        if (
            self._head is None
            or self.mean_ is None
            or self.scale_ is None
            or self.token_factors_ is None
            or self.feature_factors_ is None
        ):
            raise AttnscanError("this CPDetector is not fitted: call fit() or load one with load_detector()")
        return self.mean_, self.scale_, self.token_factors_, self.feature_factors_, self._head

    def _project(self, xs: FloatArray) -> FloatArray:
        """Least-squares prompt factors ``[N, R]`` of a standardised tensor ``xs [N, K, H]``."""
        b, c = self.token_factors_, self.feature_factors_
        if b is None or c is None:  # pragma: no cover - callers check
            raise AttnscanError("this CPDetector is not fitted")
        if self._projector is None:
            # Khatri–Rao product, row k*H + h = B[k] * C[h]: the row-major vec of a [K, H] slab (tensorly's order).
            kr = (b[:, None, :] * c[None, :, :]).reshape(-1, self.rank)
            self._projector = np.asarray(np.linalg.pinv(kr), dtype=np.float64)  # [R, K*H]
        return np.asarray(xs.reshape(xs.shape[0], -1) @ self._projector.T, dtype=np.float64)

    def transform(self, tensor: npt.ArrayLike) -> FloatArray:
        """Prompt factors ``float [N, R]`` of ``tensor [N, K, H]`` on the learned token and feature factors."""
        mean, scale, b, c, _ = self._fitted()
        x = _features(tensor, 3, "CP detector input (prompts × tokens × features)")
        if x.shape[1:] != (b.shape[0], c.shape[0]):
            raise AttnscanError(
                f"CP detector was fitted on [N, {b.shape[0]}, {c.shape[0]}] (tokens, features), got {list(x.shape)}"
            )
        with _threads(self.threads):
            return self._project((x - mean) / scale)

    def decision_function(self, tensor: npt.ArrayLike) -> FloatArray:
        """Log-odds of jailbreak, ``float [N]``."""
        _, _, _, _, head = self._fitted()
        return head.decision(self.transform(tensor))

    def predict_proba(self, tensor: npt.ArrayLike) -> FloatArray:
        """Probability of jailbreak, ``float [N]``."""
        return _sigmoid(self.decision_function(tensor))

    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays (float64) and JSON-able metadata that :meth:`from_state` turns back into this detector."""
        mean, scale, b, c, head = self._fitted()
        assert self.weights_ is not None
        arrays = {
            "mean": mean,
            "scale": scale,
            "weights": self.weights_,
            "token_factors": b,
            "feature_factors": c,
            **head.arrays(),
        }
        meta = {
            "kind": self.kind,
            "rank": self.rank,
            "seed": self.seed,
            "C": self.C,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "lr_max_iter": self.lr_max_iter,
            "tokens": int(b.shape[0]),
            "features": int(c.shape[0]),
            "rec_error": self.rec_error_,
            "n_iter": self.n_iter_,
        }
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> CPDetector:
        """Rebuild a fitted detector from :meth:`to_state`'s output."""
        _check_meta(meta, cls.kind)
        try:
            det = cls(
                rank=int(meta["rank"]),
                seed=int(meta["seed"]),
                C=float(meta["C"]),
                max_iter=int(meta["max_iter"]),
                tol=float(meta["tol"]),
                lr_max_iter=int(meta["lr_max_iter"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AttnscanError(f"CP detector metadata is incomplete or malformed ({exc!r})") from None
        k = _need(arrays, "token_factors", (None, det.rank)).shape[0]
        h = _need(arrays, "feature_factors", (None, det.rank)).shape[0]
        det.mean_ = _need(arrays, "mean", (h,))
        det.scale_ = _need(arrays, "scale", (h,))
        det.weights_ = _need(arrays, "weights", (det.rank,))
        det.token_factors_ = _need(arrays, "token_factors", (k, det.rank))
        det.feature_factors_ = _need(arrays, "feature_factors", (h, det.rank))
        det.rec_error_ = None if meta.get("rec_error") is None else float(meta["rec_error"])
        det.n_iter_ = None if meta.get("n_iter") is None else int(meta["n_iter"])
        det._head = _LogisticHead.from_arrays(arrays, det.rank)
        return det


class ProbeDetector:
    """Baseline: logistic regression on standardised pooled hidden states ``[N, H]``.

    Args:
        C: inverse L2 regularisation strength.
        max_iter: most lbfgs iterations.
        threads: BLAS/OpenMP threads while fitting (see :class:`CPDetector`).
    """

    kind: ClassVar[str] = "probe"

    def __init__(self, C: float = 1.0, max_iter: int = 1000, threads: int | None = 1) -> None:
        if not C > 0:
            raise AttnscanError(f"C must be positive, got {C}")
        self.C = float(C)
        self.max_iter = int(max_iter)
        self.threads = threads
        self._head: _LogisticHead | None = None

    def __repr__(self) -> str:
        fitted = "fitted" if self._head is not None else "unfitted"
        return f"ProbeDetector(C={self.C}, {fitted})"

    def fit(self, pooled: npt.ArrayLike, y: npt.ArrayLike) -> ProbeDetector:
        """Fit on ``pooled [N, H]`` and labels ``y [N]`` (1 = jailbreak); returns ``self``."""
        x = _features(pooled, 2, "probe input (prompts × features)")
        labels = _labels(y, x.shape[0])
        _both_classes(labels, "fitting a detector")
        with _threads(self.threads):
            self._head = _LogisticHead.fit(x, labels, self.C, self.max_iter)
        return self

    def _fitted(self) -> _LogisticHead:
        if self._head is None:
            raise AttnscanError("this ProbeDetector is not fitted: call fit() or load one with load_detector()")
        return self._head

    def decision_function(self, pooled: npt.ArrayLike) -> FloatArray:
        """Log-odds of jailbreak, ``float [N]``."""
        head = self._fitted()
        x = _features(pooled, 2, "probe input (prompts × features)")
        if x.shape[1] != head.mean.shape[0]:
            raise AttnscanError(f"probe was fitted on {head.mean.shape[0]} features, got {x.shape[1]}")
        return head.decision(x)

    def predict_proba(self, pooled: npt.ArrayLike) -> FloatArray:
        """Probability of jailbreak, ``float [N]``."""
        return _sigmoid(self.decision_function(pooled))

    def to_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays (float64) and JSON-able metadata that :meth:`from_state` turns back into this detector."""
        head = self._fitted()
        meta = {"kind": self.kind, "C": self.C, "max_iter": self.max_iter, "features": int(head.mean.shape[0])}
        return head.arrays(), meta

    @classmethod
    def from_state(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> ProbeDetector:
        """Rebuild a fitted detector from :meth:`to_state`'s output."""
        _check_meta(meta, cls.kind)
        try:
            det = cls(C=float(meta["C"]), max_iter=int(meta["max_iter"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise AttnscanError(f"probe metadata is incomplete or malformed ({exc!r})") from None
        n_features = _need(arrays, "coef", (None,)).shape[0]
        det._head = _LogisticHead.from_arrays(arrays, n_features)
        return det


Detector = CPDetector | ProbeDetector
DetectorT = TypeVar("DetectorT", CPDetector, ProbeDetector)
_KINDS: dict[str, type[CPDetector] | type[ProbeDetector]] = {"cp": CPDetector, "probe": ProbeDetector}


def fit_detectors(
    features: Mapping[int, npt.ArrayLike], y: npt.ArrayLike, make_detector: Callable[[], DetectorT]
) -> dict[int, DetectorT]:
    """One detector per layer, fitted on all prompts: ``{layer: make_detector().fit(features[layer], y)}``."""
    return {int(layer): make_detector().fit(x, y) for layer, x in sorted(features.items())}


# --------------------------------------------------------------------------------------------------- save / load


def save_detector(
    path_dir: str | os.PathLike[str],
    detectors: Mapping[int, Detector],
    meta: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write per-layer detectors to ``path_dir`` as ``detector.safetensors`` + ``detector.json`` (no pickle).

    Arrays are stored under ``L{layer}/{name}``; ``detector.json`` holds the format tag, each layer's kind and
    metadata, and ``meta`` (JSON-serialisable: e.g. the model and the layers' provenance). The directory appears
    complete or not at all; an existing detector directory is replaced only with ``overwrite=True``.
    """
    from safetensors.numpy import save_file

    from .._version import __version__

    if not detectors:
        raise AttnscanError("no detectors to save")
    final = Path(path_dir)
    tensors: dict[str, np.ndarray] = {}
    layers: list[dict[str, Any]] = []
    for layer, det in sorted(detectors.items()):
        arrays, state = det.to_state()
        for name, arr in arrays.items():
            tensors[f"L{int(layer)}/{name}"] = np.ascontiguousarray(arr)
        layers.append({"layer": int(layer), "kind": det.kind, "state": state})
    try:
        text = json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "attnscan_version": __version__,
                "layers": layers,
                "meta": dict(meta or {}),
            },
            indent=2,
        )
    except (TypeError, ValueError) as exc:
        raise AttnscanError(
            f"detector metadata is not JSON-serialisable ({exc}): pass plain str/int/float/list/dict"
        ) from None
    from .._io import atomic_dir

    with atomic_dir(final, overwrite, marker=META_FILE, what="a detector") as tmp:
        save_file(tensors, str(tmp / STATE_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(text + "\n", encoding="utf-8")
    return final


def load_detector(path_dir: str | os.PathLike[str]) -> tuple[dict[int, Detector], dict[str, Any]]:
    """Read what :func:`save_detector` wrote: ``({layer: detector}, meta)``."""
    from safetensors.numpy import load_file

    root = Path(path_dir)
    meta_path, state_path = root / META_FILE, root / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise AttnscanError(f"{root} is not a detector directory: expected {META_FILE} and {STATE_FILE}")
    try:
        doc = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AttnscanError(f"{meta_path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise AttnscanError(f"{meta_path} is not an attnscan detector file")
    if doc.get("format_version") != FORMAT_VERSION:
        raise AttnscanError(
            f"{meta_path} has detector format version {doc.get('format_version')}; this attnscan reads version "
            f"{FORMAT_VERSION}: upgrade attnscan or re-fit the detector"
        )
    try:
        tensors = load_file(str(state_path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise AttnscanError(f"{state_path} cannot be read as safetensors ({exc}): save the detector again") from None
    detectors: dict[int, Detector] = {}
    for entry in doc.get("layers", []):
        try:
            layer, kind = int(entry["layer"]), entry.get("kind")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise AttnscanError(f"{meta_path}: malformed layer entry {entry!r}") from None
        if kind not in _KINDS:
            raise AttnscanError(f"{meta_path}: layer {layer} has unknown detector kind {kind!r}")
        prefix = f"L{layer}/"
        arrays = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        detectors[layer] = _KINDS[kind].from_state(arrays, entry.get("state", {}))
    return detectors, dict(doc.get("meta", {}))


# --------------------------------------------------------------------------------------------------- metrics


def _midranks(s: FloatArray) -> FloatArray:
    """Ranks (1-based, ties get their mean rank) along the last axis of ``s [..., n]``."""
    n = s.shape[-1]
    order = np.argsort(s, axis=-1, kind="stable")
    srt = np.take_along_axis(s, order, axis=-1)
    idx = np.broadcast_to(np.arange(n), s.shape)
    new = np.ones(s.shape, dtype=bool)
    new[..., 1:] = srt[..., 1:] != srt[..., :-1]
    last = np.ones(s.shape, dtype=bool)
    last[..., :-1] = new[..., 1:]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=-1)
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, idx, n - 1), axis=-1), axis=-1), axis=-1)
    ranks = np.empty(s.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=-1)
    return ranks


def _auroc_rows(pos: FloatArray, neg: FloatArray) -> FloatArray:
    """AUROC of each row: positives ``[B, n1]`` against negatives ``[B, n0]`` (Mann–Whitney with mid-ranks)."""
    n1, n0 = pos.shape[-1], neg.shape[-1]
    ranks = _midranks(np.concatenate([pos, neg], axis=-1))
    return np.asarray((ranks[..., :n1].sum(axis=-1) - n1 * (n1 + 1) / 2.0) / (n1 * n0), dtype=np.float64)


def _tpr_rows(pos: FloatArray, neg: FloatArray, target: float) -> FloatArray:
    """Largest empirical-ROC TPR with FPR <= ``target`` for each row of ``pos [B, n1]``, ``neg [B, n0]``.

    At most ``m = floor(target · n0)`` negatives may score at or above the threshold, so the best threshold lies
    just above the (m+1)-th highest negative score ``v``; the TPR there is the share of positives scoring above ``v``.
    """
    n0 = neg.shape[-1]
    m = math.floor(target * n0 + 1e-9)
    if m >= n0:
        return np.ones(pos.shape[:-1], dtype=np.float64)
    v = -np.sort(-neg, axis=-1)[..., m]
    return np.asarray((pos > v[..., None]).mean(axis=-1), dtype=np.float64)


def _split(y_true: npt.ArrayLike, score: npt.ArrayLike) -> tuple[IntArray, FloatArray]:
    y = _labels(y_true)
    s = np.asarray(score, dtype=np.float64)
    if s.shape != y.shape:
        raise AttnscanError(f"{s.shape[0] if s.ndim else 0} scores for {y.shape[0]} labels: give one score per prompt")
    if not np.isfinite(s).all():
        raise AttnscanError("scores hold NaN or infinite values")
    _both_classes(y, "computing detection metrics")
    return y, s


def auroc(y_true: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Area under the ROC curve of ``score [N]`` for labels ``y_true [N]`` (1 = jailbreak); ties count one half."""
    y, s = _split(y_true, score)
    return float(_auroc_rows(s[y == 1][None], s[y == 0][None])[0])


def tpr_at_fpr(y_true: npt.ArrayLike, score: npt.ArrayLike, target: float) -> float:
    """The largest TPR on the empirical ROC curve whose FPR is at most ``target`` (no interpolation)."""
    if not 0.0 <= target <= 1.0:
        raise AttnscanError(f"target false-positive rate must lie in [0, 1], got {target}")
    y, s = _split(y_true, score)
    return float(_tpr_rows(s[y == 1][None], s[y == 0][None], target)[0])


def metrics(y_true: npt.ArrayLike, score: npt.ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Detection metrics of probabilities ``score [N]`` against ``y_true [N]`` (1 = jailbreak).

    Returns ``auroc``, ``f1`` and ``accuracy`` (``score >= threshold`` predicts jailbreak), ``tpr1`` and ``tpr5``
    (TPR at 1 % and 5 % FPR, see :func:`tpr_at_fpr`), ``n`` and ``n_jailbreak``.
    """
    y, s = _split(y_true, score)
    pos, neg = s[y == 1][None], s[y == 0][None]
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return {
        "auroc": float(_auroc_rows(pos, neg)[0]),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
        "accuracy": float(np.mean(pred == (y == 1))),
        "tpr1": float(_tpr_rows(pos, neg, 0.01)[0]),
        "tpr5": float(_tpr_rows(pos, neg, 0.05)[0]),
        "n": float(y.size),
        "n_jailbreak": float(y.sum()),
    }


def usable_folds(y: IntArray, k: int) -> int:
    """The number of stratified cross-validation folds the labels allow: ``k``, reduced (with a warning) to the
    size of the smaller class when that is below ``k``.

    ``y`` is ``int [N]`` (1 = jailbreak, 0 = benign). Raises :class:`~attnscan.errors.AttnscanError` for ``k < 2``
    or fewer than two prompts in either class. The warning names the caller's caller (``stacklevel=3``), so a
    function that calls this for its user gets the user's line.
    """
    if k < 2:
        raise AttnscanError(f"cross-validation needs k >= 2 folds, got {k}")
    smallest = int(min(y.sum(), y.size - y.sum()))
    if smallest < 2:
        raise AttnscanError(
            f"cross-validation needs at least 2 prompts of each class; got {y.size - int(y.sum())} benign and "
            f"{int(y.sum())} jailbreak"
        )
    if smallest < k:
        warnings.warn(
            f"only {smallest} prompts in the smaller class: using {smallest}-fold instead of {k}-fold cross-validation",
            UserWarning,
            stacklevel=3,
        )
        return smallest
    return k


def cross_validate(
    make_detector: Callable[[], Detector],
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    k: int = 5,
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """Out-of-fold detection metrics with bootstrap intervals.

    Args:
        make_detector: returns a fresh unfitted detector (e.g. ``lambda: CPDetector(rank=8)``).
        X: the detector's input for all prompts, ``[N, ...]`` (``[N, K, H]`` for CP, ``[N, H]`` for the probe).
        y: labels ``[N]`` (1 = jailbreak).
        k: folds of the stratified k-fold (shuffled with ``seed``); reduced, with a warning, to the smaller class's
            size when that is below ``k``.
        seed: seeds the fold assignment and the bootstrap.
        n_bootstrap: bootstrap resamples for the 95 % intervals (0 gives NaN intervals).

    Returns:
        The :func:`metrics` of the pooled out-of-fold probabilities, plus ``auroc_low``/``auroc_high`` and
        ``tpr5_low``/``tpr5_high`` (2.5 and 97.5 percentiles over resamples of prompts within each class), ``k``
        (folds used), ``seed``, ``n_bootstrap``, ``oof_score`` (``float [N]``) and ``fold`` (``int [N]``).
    """
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(X)
    labels = _labels(y, x.shape[0] if x.ndim else 0)
    k_used = usable_folds(labels, int(k))
    oof = np.full(labels.shape, np.nan, dtype=np.float64)
    fold = np.full(labels.shape, -1, dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k_used, shuffle=True, random_state=seed)
    for i, (train, test) in enumerate(splitter.split(np.zeros(labels.size), labels)):
        detector = make_detector().fit(x[train], labels[train])
        oof[test] = detector.predict_proba(x[test])
        fold[test] = i
    out: dict[str, Any] = dict(metrics(labels, oof))
    auc_ci, tpr_ci = bootstrap_intervals(labels, oof, n_bootstrap, seed)
    out.update(
        auroc_low=auc_ci[0],
        auroc_high=auc_ci[1],
        tpr5_low=tpr_ci[0],
        tpr5_high=tpr_ci[1],
        k=k_used,
        seed=seed,
        n_bootstrap=n_bootstrap,
        oof_score=oof,
        fold=fold,
    )
    return out


def bootstrap_intervals(
    y: IntArray, score: FloatArray, n_bootstrap: int, seed: int, chunk: int = 256
) -> tuple[tuple[float, float], tuple[float, float]]:
    """95 % percentile bootstrap intervals ``((auroc_low, auroc_high), (tpr5_low, tpr5_high))`` of the AUROC and
    of the TPR at 5 % FPR of the scores ``score`` (``float [N]``) against the labels ``y`` (``int [N]``, 1 =
    jailbreak).

    Each of the ``n_bootstrap`` resamples draws the jailbreak and the benign prompts with replacement within their
    class (so the class counts stay fixed), from a generator seeded with ``seed``; ``chunk`` resamples are scored at
    once, which bounds the memory and does not change the result. ``n_bootstrap <= 0`` gives NaN intervals. These
    are the intervals of :func:`cross_validate` and of the ``*_low``/``*_high`` columns of
    :func:`layer_detection_table`.
    """
    nan = (float("nan"), float("nan"))
    if n_bootstrap <= 0:
        return nan, nan
    rng = np.random.default_rng(seed)
    pos, neg = score[y == 1], score[y == 0]
    aucs, tprs = [], []
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        p = pos[rng.integers(0, pos.size, size=(b, pos.size))]
        q = neg[rng.integers(0, neg.size, size=(b, neg.size))]
        aucs.append(_auroc_rows(p, q))
        tprs.append(_tpr_rows(p, q, 0.05))
    auc_ci = np.percentile(np.concatenate(aucs), [2.5, 97.5])
    tpr_ci = np.percentile(np.concatenate(tprs), [2.5, 97.5])
    return (float(auc_ci[0]), float(auc_ci[1])), (float(tpr_ci[0]), float(tpr_ci[1]))


# --------------------------------------------------------------------------------------------------- layer table

#: The per-detector metric names of a detection table, in column order: ``cp_<name>`` and ``probe_<name>`` in
#: :func:`layer_detection_table`, the same in :func:`attnscan.detect_job.evaluate_detector`.
METRIC_COLUMNS = (
    "auroc",
    "auroc_low",
    "auroc_high",
    "f1",
    "accuracy",
    "tpr1",
    "tpr5",
    "tpr5_low",
    "tpr5_high",
)


def layer_detection_table(
    tensors: Mapping[int, npt.ArrayLike] | None,
    pooled: Mapping[int, npt.ArrayLike] | None,
    y: npt.ArrayLike,
    *,
    rank: int = 8,
    k: int = 5,
    seed: int = 0,
    threshold: float = 0.9,
    flag_on: Literal["cp", "probe"] = "cp",
    n_bootstrap: int = 1000,
    C: float = 1.0,
    max_iter: int = 100,
) -> pd.DataFrame:
    """Cross-validated CP and probe detection metrics for every layer.

    Args:
        tensors: ``{layer: float [N, K, H]}`` for the CP detector (None skips the ``cp_`` columns).
        pooled: ``{layer: float [N, H]}`` for the probe (None skips the ``probe_`` columns).
        y: labels ``[N]`` (1 = jailbreak).
        rank, max_iter: of the CP decomposition; ``C``: of both logistic regressions.
        k, seed, n_bootstrap: see :func:`cross_validate`; every layer uses the same folds and resamples.
        threshold, flag_on: ``flagged`` is ``{flag_on}_auroc >= threshold``.

    Returns:
        One row per layer (ascending): ``layer``, ``n``, ``n_jailbreak``, ``k``, ``cp_<m>`` and ``probe_<m>`` for
        ``m`` in auroc, auroc_low, auroc_high, f1, accuracy, tpr1, tpr5, tpr5_low, tpr5_high, then ``flagged``.
        ``table.attrs`` records the settings.
    """
    if flag_on not in ("cp", "probe"):
        raise AttnscanError(f"flag_on must be 'cp' or 'probe', got {flag_on!r}")
    sources: dict[str, tuple[Mapping[int, npt.ArrayLike], Callable[[], Detector]]] = {}
    if tensors is not None:
        sources["cp"] = (tensors, lambda: CPDetector(rank=rank, seed=seed, C=C, max_iter=max_iter))
    if pooled is not None:
        sources["probe"] = (pooled, lambda: ProbeDetector(C=C))
    if not sources:
        raise AttnscanError("give tensors (for the CP detector), pooled (for the probe), or both")
    if flag_on not in sources:
        raise AttnscanError(f"flag_on={flag_on!r} needs {'tensors' if flag_on == 'cp' else 'pooled'} features")
    layer_sets = [sorted(int(layer) for layer in features) for features, _ in sources.values()]
    if len(layer_sets) == 2 and layer_sets[0] != layer_sets[1]:
        raise AttnscanError(
            f"tensors hold layers {layer_sets[0]} but pooled holds {layer_sets[1]}: give the same layers"
        )
    if not layer_sets[0]:
        raise AttnscanError("no layers given")
    labels = _labels(y)
    k_used = usable_folds(labels, int(k))  # warns once here rather than once per layer and detector
    rows: list[dict[str, Any]] = []
    for layer in layer_sets[0]:
        row: dict[str, Any] = {"layer": layer}
        for name, (features, make) in sources.items():
            res = cross_validate(make, features[layer], labels, k=k_used, seed=seed, n_bootstrap=n_bootstrap)
            row.update(n=int(res["n"]), n_jailbreak=int(res["n_jailbreak"]), k=res["k"])
            row.update({f"{name}_{m}": res[m] for m in METRIC_COLUMNS})
        row["flagged"] = bool(row[f"{flag_on}_auroc"] >= threshold)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs.update(
        rank=rank, k=k, seed=seed, threshold=threshold, flag_on=flag_on, n_bootstrap=n_bootstrap, C=C, max_iter=max_iter
    )
    return table


def best_layer(table: pd.DataFrame, by: str = "cp_auroc") -> int:
    """The layer with the highest ``by`` (ties: the lowest layer)."""
    if by not in table.columns:
        raise AttnscanError(f"table has no column {by!r}; columns are {list(table.columns)}")
    values = table[by].to_numpy(dtype=np.float64)
    if not np.isfinite(values).any():
        raise AttnscanError(f"column {by!r} holds no finite values")
    layers = table["layer"].to_numpy()
    best = np.nanmax(values)
    return int(np.min(layers[values == best]))


def flagged_layers(table: pd.DataFrame) -> list[int]:
    """The flagged layers, ascending."""
    return sorted(int(layer) for layer in table.loc[table["flagged"].astype(bool), "layer"])
