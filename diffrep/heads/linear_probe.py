"""LinearProbe: a standardised multinomial logistic regression on pooled image features.

This is the head of the linear-probe protocol of Xiang et al. (ICCV 2023, "Denoising diffusion
autoencoders are unified self-supervised learners"): one linear layer on globally pooled U-Net
activations. DDAE trains ``nn.Linear`` with Adam; here the same linear model is fitted to its
optimum with L-BFGS (scikit-learn's ``LogisticRegression``), which for ~1e5 images x ~1e3
features takes seconds to a minute on a CPU and has no learning-rate schedule to tune.

The estimator follows scikit-learn's contract: ``__init__`` stores its arguments only, ``fit``
returns ``self``, fitted state ends in ``_``; ``clone``, ``Pipeline`` and ``GridSearchCV`` work.
A fitted probe is saved with ``save`` / :func:`diffrep.persistence.save_fitted` (no pickle).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import as_numpy, check_positive_int


def _as_numpy(X: Any) -> Any:
    """Torch tensors (any dtype/device) become numpy arrays (``errors.as_numpy``; half precision as float32);
    everything else (lists, arrays) passes unchanged for sklearn to validate."""
    import torch

    if not isinstance(X, torch.Tensor):
        return X
    X = as_numpy(X, "X")
    return X.astype(np.float32) if X.dtype == np.float16 else X


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Standardise features, then fit an L2-regularised multinomial logistic regression.

    Args:
        C: inverse L2 regularisation strength (scikit-learn's convention; larger = weaker).
        max_iter: most solver iterations.
        tol: solver tolerance.
        standardise: z-score each feature with statistics of the training data first. Pooled
            U-Net channels differ in scale by orders of magnitude, so this matters for L-BFGS.
        solver: ``LogisticRegression`` solver (``"lbfgs"``, ``"newton-cg"``, ``"sag"``, ``"saga"``...).
        class_weight: ``None`` or ``"balanced"`` or a dict, as in ``LogisticRegression``.
        seed: seed for the stochastic solvers (``"sag"``, ``"saga"``), scikit-learn's ``random_state``.

    Fitted attributes: ``classes_``, ``n_features_in_``, ``pipeline_`` (the fitted
    ``Pipeline(StandardScaler, LogisticRegression)``), ``coef_`` and ``intercept_`` (in the
    standardised space), ``n_iter_``.

    Input: array-like or torch tensor of shape (n_samples, n_features); float16 features are
    computed in float32.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4, standardise: bool = True,
                 solver: str = "lbfgs", class_weight: Any = None, seed: Any = None) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.standardise = standardise
        self.solver = solver
        self.class_weight = class_weight
        self.seed = seed

    def _build(self) -> Pipeline:
        if not (isinstance(self.C, (int, float, np.number)) and not isinstance(self.C, bool) and self.C > 0):
            raise ValueError(f"C: expected a positive number, got {self.C!r}")
        check_positive_int(self.max_iter, "max_iter")
        steps = [("scale", StandardScaler() if self.standardise else "passthrough"),
                 ("logreg", LogisticRegression(C=float(self.C), max_iter=int(self.max_iter), tol=self.tol,
                                               solver=self.solver, class_weight=self.class_weight,
                                               random_state=self.seed))]
        return Pipeline(steps)

    def fit(self, X: Any, y: Any) -> "LinearProbe":
        """Fit the scaler and the classifier on (n_samples, n_features) features and labels."""
        X, y = validate_data(self, _as_numpy(X), _as_numpy(y), dtype=[np.float32, np.float64],
                             y_numeric=False, ensure_min_samples=2)
        check_classification_targets(y)
        pipeline = self._build()
        pipeline.fit(X, y)
        self.pipeline_ = pipeline
        logreg = pipeline.named_steps["logreg"]
        self.classes_ = logreg.classes_
        self.coef_ = logreg.coef_
        self.intercept_ = logreg.intercept_
        self.n_iter_ = logreg.n_iter_
        return self

    def _check(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "pipeline_")
        return validate_data(self, _as_numpy(X), dtype=[np.float32, np.float64], reset=False)

    def decision_function(self, X: Any) -> np.ndarray:
        """Class scores (logits), (n_samples, n_classes), or (n_samples,) for two classes."""
        X = self._check(X)
        return self.pipeline_.decision_function(X)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, (n_samples, n_classes), columns in ``classes_`` order."""
        X = self._check(X)
        return self.pipeline_.predict_proba(X)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        X = self._check(X)
        return self.pipeline_.predict_log_proba(X)

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each sample (a value from ``classes_``)."""
        X = self._check(X)
        return self.pipeline_.predict(X)

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Mean accuracy on (X, y); tensors are accepted as well as arrays."""
        return super().score(X, np.asarray(_as_numpy(y)), sample_weight=sample_weight)

    # ------------------------------------------------------------------------- persistence
    _SCALER = ("mean_", "scale_", "var_", "n_samples_seen_", "n_features_in_")
    _LOGREG = ("classes_", "coef_", "intercept_", "n_iter_", "n_features_in_")

    def _fitted_state(self) -> dict[str, Any]:
        """The fitted scaler and logistic regression, attribute by attribute (see diffrep.persistence)."""
        check_is_fitted(self, "pipeline_")
        scaler, logreg = self.pipeline_.named_steps["scale"], self.pipeline_.named_steps["logreg"]
        state = {f"logreg.{name}": getattr(logreg, name) for name in self._LOGREG}
        if self.standardise:
            state.update({f"scale.{name}": getattr(scaler, name) for name in self._SCALER})
        for name in ("n_features_in_", "feature_names_in_"):
            if hasattr(self, name):
                state[name] = getattr(self, name)
        return state

    def _set_fitted_state(self, state: dict[str, Any]) -> None:
        """Rebuild the pipeline from its saved attributes (outputs equal the fitted one's bit for bit)."""
        pipeline = self._build()
        for key, value in state.items():
            step, _, name = key.rpartition(".")
            setattr(pipeline.named_steps[step] if step else self, name, value)
        logreg = pipeline.named_steps["logreg"]
        self.pipeline_ = pipeline
        self.classes_, self.coef_, self.intercept_, self.n_iter_ = (logreg.classes_, logreg.coef_,
                                                                    logreg.intercept_, logreg.n_iter_)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``state.safetensors`` (:func:`diffrep.persistence.save_fitted`)."""
        from ..persistence import save_fitted

        return save_fitted(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "LinearProbe":
        """A fitted probe saved by :meth:`save`."""
        from ..persistence import load_fitted

        return load_fitted(directory, expected=cls)
