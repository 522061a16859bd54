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
round-trip through :meth:`to_state` / ``from_state`` (arrays + JSON-able metadata) and
:func:`~attnscan.detect.store.save_detector` / :func:`~attnscan.detect.store.load_detector`
(``detector.safetensors`` + ``detector.json``). The logistic regression is fitted with scikit-learn and then scored
with its stored ``coef``/``intercept``, so a loaded detector gives bit-identical scores.

Their metrics, cross-validation and the per-layer detection table are in :mod:`attnscan.detect.metrics`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from ..errors import AttnscanError

__all__ = [
    "CPDetector",
    "Detector",
    "Kind",
    "ProbeDetector",
    "check_cp_params",
    "check_probe_params",
    "fit_detectors",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# --------------------------------------------------------------------------------------------------- helpers


def as_labels(y: npt.ArrayLike, n: int | None = None) -> IntArray:
    """``y`` as ``int64 [N]`` of 0/1, checked (length ``n`` when given)."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise AttnscanError(f"labels must be a 1-D array of 0/1, got shape {arr.shape}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise AttnscanError(f"labels must be 0 (benign) or 1 (jailbreak), got values {np.unique(arr)[:5].tolist()}")
    if n is not None and arr.shape[0] != n:
        raise AttnscanError(f"{arr.shape[0]} labels for {n} prompts: give one label per prompt")
    return arr.astype(np.int64)


def check_both_classes(y: IntArray, what: str) -> None:
    """Refuse labels ``y`` (``int [N]``) that hold only one class; ``what`` names the task that needs both."""
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
        if list(model.classes_) != [0, 1]:  # pragma: no cover - guarded by check_both_classes
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


def check_cp_params(rank: int, C: float, max_iter: int) -> None:
    """Refuse CP detector settings that cannot be fitted: ``rank`` (components) must be a positive integer,
    ``C`` positive (:func:`check_probe_params`), ``max_iter`` (ALS iterations) at least 1.

    :meth:`CPDetector.fit` checks its parameters with this; a job checks its settings with it before any work.
    """
    if int(rank) != rank or rank < 1:
        raise AttnscanError(f"CP rank must be a positive integer, got {rank}")
    check_probe_params(C)
    if max_iter < 1:
        raise AttnscanError(f"max_iter must be at least 1, got {max_iter}")


def check_probe_params(C: float) -> None:
    """Refuse a logistic regression strength ``C`` that is not positive (:meth:`ProbeDetector.fit` checks with it)."""
    if not C > 0:
        raise AttnscanError(f"C must be positive, got {C}")


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

    As in scikit-learn, the constructor stores the parameters as given and :meth:`fit` checks them
    (:func:`check_cp_params`).

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
        self.rank = rank
        self.seed = seed
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.lr_max_iter = lr_max_iter
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
        check_cp_params(self.rank, self.C, self.max_iter)
        x = _features(tensor, 3, "CP detector input (prompts × tokens × features)")
        labels = as_labels(y, x.shape[0])
        check_both_classes(labels, "fitting a detector")
        import tensorly as tl
        from tensorly.decomposition import parafac

        self.mean_, self.scale_ = _standardiser(x, (0, 1))
        xs = (x - self.mean_) / self.scale_
        with _threads(self.threads), tl.backend_context("numpy"):
            cp, errors = parafac(
                xs,
                int(self.rank),
                n_iter_max=int(self.max_iter),
                init="random",
                random_state=int(self.seed),
                normalize_factors=True,
                tol=float(self.tol),
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
            self._head = _LogisticHead.fit(features, labels, float(self.C), int(self.lr_max_iter))
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
            kr = (b[:, None, :] * c[None, :, :]).reshape(-1, b.shape[1])
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
            "rank": int(self.rank),
            "seed": int(self.seed),
            "C": float(self.C),
            "max_iter": int(self.max_iter),
            "tol": float(self.tol),
            "lr_max_iter": int(self.lr_max_iter),
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
        check_cp_params(det.rank, det.C, det.max_iter)
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

    The constructor stores the parameters as given; :meth:`fit` checks them (:func:`check_probe_params`).
    """

    kind: ClassVar[str] = "probe"

    def __init__(self, C: float = 1.0, max_iter: int = 1000, threads: int | None = 1) -> None:
        self.C = C
        self.max_iter = max_iter
        self.threads = threads
        self._head: _LogisticHead | None = None

    def __repr__(self) -> str:
        fitted = "fitted" if self._head is not None else "unfitted"
        return f"ProbeDetector(C={self.C}, {fitted})"

    def fit(self, pooled: npt.ArrayLike, y: npt.ArrayLike) -> ProbeDetector:
        """Fit on ``pooled [N, H]`` and labels ``y [N]`` (1 = jailbreak); returns ``self``."""
        check_probe_params(self.C)
        x = _features(pooled, 2, "probe input (prompts × features)")
        labels = as_labels(y, x.shape[0])
        check_both_classes(labels, "fitting a detector")
        with _threads(self.threads):
            self._head = _LogisticHead.fit(x, labels, float(self.C), int(self.max_iter))
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
        meta = {
            "kind": self.kind,
            "C": float(self.C),
            "max_iter": int(self.max_iter),
            "features": int(head.mean.shape[0]),
        }
        return head.arrays(), meta

    @classmethod
    def from_state(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> ProbeDetector:
        """Rebuild a fitted detector from :meth:`to_state`'s output."""
        _check_meta(meta, cls.kind)
        try:
            det = cls(C=float(meta["C"]), max_iter=int(meta["max_iter"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise AttnscanError(f"probe metadata is incomplete or malformed ({exc!r})") from None
        check_probe_params(det.C)
        n_features = _need(arrays, "coef", (None,)).shape[0]
        det._head = _LogisticHead.from_arrays(arrays, n_features)
        return det


Detector = CPDetector | ProbeDetector
Kind = Literal["cp", "probe"]
DetectorT = TypeVar("DetectorT", CPDetector, ProbeDetector)
DETECTOR_KINDS: dict[str, type[CPDetector] | type[ProbeDetector]] = {"cp": CPDetector, "probe": ProbeDetector}


def fit_detectors(
    features: Mapping[int, npt.ArrayLike], y: npt.ArrayLike, make_detector: Callable[[], DetectorT]
) -> dict[int, DetectorT]:
    """One detector per layer, fitted on all prompts: ``{layer: make_detector().fit(features[layer], y)}``."""
    return {int(layer): make_detector().fit(x, y) for layer, x in sorted(features.items())}
