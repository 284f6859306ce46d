"""A scikit-learn estimator over torchgmm: numpy in, numpy out, for pipelines and grid searches.

:class:`GaussianMixture` follows ``sklearn.mixture.GaussianMixture`` (same constructor names,
attributes and methods) and passes scikit-learn's ``check_estimator``. It wraps the
``torchgmm.GaussianMixture`` module; the math, the validation of settings and the per-fit status
all live there. This file only adapts conventions: scikit-learn's input validation (2-D X, a
reshape hint for 1-D X, ``n_features_in_``, feature names), scikit-learn's ``NotFittedError``
and ``ConvergenceWarning``, numpy outputs, and ``random_state`` as int / None / ``RandomState``.

It needs the optional ``sklearn`` extra (``pip install torchgmm[sklearn]``). Imports are absolute:
``sklearn`` below is scikit-learn, never this module.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.utils import check_array, check_random_state
from sklearn.utils.validation import _check_sample_weight, check_is_fitted

import torchgmm
from torchgmm.mixture import GaussianMixture as _Module
from torchgmm.mixture import _caller_stacklevel, _reemit
from torchgmm.result import FitStatus

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - older scikit-learn

    def _validate_data(estimator, X, **kwargs):
        return estimator._validate_data(X, **kwargs)


__all__ = ["GaussianMixture", "bic_scorer", "aic_scorer", "ConvergenceWarning"]

_FLOAT_DTYPES = (np.float64, np.float32)


class ConvergenceWarning(torchgmm.ConvergenceWarning, SklearnConvergenceWarning):
    """torchgmm's convergence warning, also a scikit-learn ``ConvergenceWarning`` (so filters on
    either category apply)."""


def _seed(random_state) -> Optional[int]:
    """An int seed for the module from scikit-learn's ``random_state`` (None, int, RandomState)."""
    if random_state is None or isinstance(random_state, (int, np.integer)):
        return None if random_state is None else int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# scikit-learn's own texts (sklearn.mixture: BaseMixture.fit_predict, _check_shape, _check_weights,
# _check_precisions), so that code and tests written against scikit-learn see the same messages.
_NOT_CONVERGED = (
    "Best performing initialization did not converge. Try different init parameters, or increase "
    "max_iter, tol, or check for degenerate data."
)
_PRECISION_SHAPES = {
    "full": lambda k, d: (k, d, d),
    "tied": lambda k, d: (d, d),
    "diag": lambda k, d: (k, d),
    "spherical": lambda k, d: (k,),
}


def _check_shape(value: np.ndarray, shape: tuple, name: str) -> None:
    if value.shape != shape:
        raise ValueError(f"The parameter '{name}' should have the shape of {shape}, but got {value.shape}")


def _checked_weights(weights, n_components: int) -> np.ndarray:
    weights = check_array(weights, dtype=_FLOAT_DTYPES, ensure_2d=False)
    _check_shape(weights, (n_components,), "weights")
    if (weights < 0.0).any() or (weights > 1.0).any():
        raise ValueError(
            "The parameter 'weights' should be in the range [0, 1], but got max value "
            f"{np.min(weights):.5f}, min value {np.max(weights):.5f}"  # (sic: scikit-learn's order)
        )
    atol = 1e-6 if weights.dtype == np.float32 else 1e-8
    if not np.allclose(float(np.abs(1.0 - np.sum(weights))), 0.0, atol=atol):
        raise ValueError(f"The parameter 'weights' should be normalized, but got sum(weights) = {np.sum(weights):.5f}")
    return weights


def _checked_means(means, n_components: int, n_features: int) -> np.ndarray:
    means = check_array(means, dtype=_FLOAT_DTYPES, ensure_2d=False)
    _check_shape(means, (n_components, n_features), "means")
    return means


def _check_precision_matrix(precision: np.ndarray, covariance_type: str) -> None:
    if not (np.allclose(precision, precision.T, rtol=1e-5, atol=1e-8) and (np.linalg.eigvalsh(precision) > 0.0).all()):
        raise ValueError(f"'{covariance_type} precision' should be symmetric, positive-definite")


def _checked_precisions(precisions, covariance_type: str, n_components: int, n_features: int) -> np.ndarray:
    precisions = check_array(precisions, dtype=_FLOAT_DTYPES, ensure_2d=False, allow_nd=covariance_type == "full")
    shape = _PRECISION_SHAPES[covariance_type](n_components, n_features)
    _check_shape(precisions, shape, f"{covariance_type} precision")
    if covariance_type == "full":
        for precision in precisions:
            _check_precision_matrix(precision, covariance_type)
    elif covariance_type == "tied":
        _check_precision_matrix(precisions, covariance_type)
    elif (precisions <= 0.0).any():
        raise ValueError(f"'{covariance_type} precision' should be positive")
    return precisions


class GaussianMixture(DensityMixin, BaseEstimator):
    """Gaussian mixture fitted by torchgmm's EM, with scikit-learn's interface.

    Parameters mean what they mean in ``sklearn.mixture.GaussianMixture``; ``verbose_interval`` is
    accepted for compatibility. Extra: ``prior`` (None, ``"default"`` for the Fraley & Raftery
    conjugate prior, or a dict of overrides), ``method`` (``"em"``, ``"squarem"``, ``"gradient"``)
    and ``device`` (where to fit; outputs are numpy on the CPU either way).

    Fitted attributes: ``weights_ (K,)``, ``means_ (K, D)``, ``covariances_``, ``precisions_``,
    ``precisions_cholesky_`` (scikit-learn's per-type shapes), ``converged_``, ``n_iter_``,
    ``lower_bound_``, ``lower_bounds_`` (per-iteration history), ``status_`` (a
    :class:`torchgmm.FitStatus`), ``n_features_in_`` (and ``feature_names_in_`` for DataFrames),
    and ``model_``, the fitted ``torchgmm.GaussianMixture`` module.

    As scikit-learn does: bad ``weights_init`` / ``means_init`` / ``precisions_init`` raise
    scikit-learn's own errors (same types, same messages); a fit whose best start did not
    converge warns with scikit-learn's ``ConvergenceWarning`` and message; ``score`` is the mean
    of ``score_samples`` (taken in float64); ``_n_parameters()`` counts the free parameters.
    """

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        prior=None,
        method="em",
        device=None,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.prior = prior
        self.method = method
        self.device = device

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, X, y=None, sample_weight=None):
        """Fit to ``X (n_samples, n_features)``; ``sample_weight (n_samples,)`` is optional."""
        X = _validate_data(self, X, dtype=_FLOAT_DTYPES, ensure_min_samples=2)
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, dtype=X.dtype)
        init = self._checked_init(X.shape[1])
        warm = self.warm_start and self.__sklearn_is_fitted__()
        model = _Module(
            self.n_components,
            covariance_type=self.covariance_type,
            tol=self.tol,
            reg_covar=self.reg_covar,
            max_iter=self.max_iter,
            n_init=self.n_init,
            init_params=self.init_params,
            **init,
            random_state=_seed(self.random_state),
            warm_start=warm,
            verbose=self.verbose,
            device=self.device,
            method=self.method,
            prior=self.prior,
        )
        if warm:  # continue from the previous fit (one start, as scikit-learn)
            model.set_params_(self.model_.mixture_params().map(lambda t: t.detach()))
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.fit(X, sample_weight=sample_weight)
        finally:  # re-issue at the caller's line; convergence is reported as scikit-learn does
            _reemit([w for w in caught if not issubclass(w.category, torchgmm.ConvergenceWarning)])
        if self.max_iter > 0 and not bool(model.converged_):
            warnings.warn(_NOT_CONVERGED, ConvergenceWarning, stacklevel=_caller_stacklevel())
        self.model_ = model
        self._set_attributes(model)
        return self

    def _checked_init(self, n_features: int) -> dict:
        """``weights_init``, ``means_init``, ``precisions_init`` checked as scikit-learn checks
        them (same exceptions, same messages)."""
        init = dict(weights_init=self.weights_init, means_init=self.means_init, precisions_init=self.precisions_init)
        if self.covariance_type not in _PRECISION_SHAPES:
            return init  # the module names the valid choices
        if self.weights_init is not None:
            init["weights_init"] = _checked_weights(self.weights_init, self.n_components)
        if self.means_init is not None:
            init["means_init"] = _checked_means(self.means_init, self.n_components, n_features)
        if self.precisions_init is not None:
            init["precisions_init"] = _checked_precisions(
                self.precisions_init, self.covariance_type, self.n_components, n_features
            )
        return init

    def _set_attributes(self, model: _Module) -> None:
        self.weights_ = _numpy(model.weights_)
        self.means_ = _numpy(model.means_)
        self.covariances_ = _numpy(model.covariances_)
        self.precisions_ = _numpy(model.precisions_)
        self.precisions_cholesky_ = _numpy(model.precisions_cholesky_)
        self.converged_ = bool(model.converged_)
        self.n_iter_ = int(model.n_iter_)
        self.lower_bound_ = float(model.lower_bound_)
        history = _numpy(model.lower_bounds_)
        self.lower_bounds_ = history[: self.n_iter_].tolist()
        self.status_ = FitStatus(int(model.status_))

    def fit_predict(self, X, y=None, sample_weight=None):
        """Fit, then the label of every sample of ``X`` (the same as ``fit(X).predict(X)``)."""
        return self.fit(X, sample_weight=sample_weight).predict(X)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    # -- scoring and prediction ------------------------------------------------------------
    def _validated(self, X) -> np.ndarray:
        check_is_fitted(self)
        return _validate_data(self, X, reset=False, dtype=_FLOAT_DTYPES)

    def score_samples(self, X) -> np.ndarray:
        """Log-likelihood of each sample, ``(n_samples,)``."""
        x = self._validated(X)
        return _numpy(self.model_.score_samples(x))

    def score(self, X, y=None, sample_weight=None) -> float:
        """Mean log-likelihood per sample (higher is better; scikit-learn's default scorer): the
        (weighted) mean of ``score_samples(X)``, taken in float64 whatever the data's dtype."""
        x = self._validated(X)
        per_sample = _numpy(self.model_.score_samples(x)).astype(np.float64)
        if sample_weight is None:
            return float(per_sample.mean())
        weights = _check_sample_weight(sample_weight, x, dtype=np.float64)
        return float(np.average(per_sample, weights=weights))

    def predict(self, X) -> np.ndarray:
        """Most likely component of each sample, ``(n_samples,)``."""
        x = self._validated(X)
        return _numpy(self.model_.predict(x))

    def predict_proba(self, X) -> np.ndarray:
        """Responsibilities ``(n_samples, n_components)``."""
        x = self._validated(X)
        return _numpy(self.model_.predict_proba(x))

    def _n_parameters(self) -> int:
        """Number of free parameters of the fitted model (as scikit-learn's ``_n_parameters``)."""
        check_is_fitted(self)
        return int(self.model_._n_parameters())

    def bic(self, X) -> float:
        """Bayesian information criterion on ``X`` (lower is better)."""
        x = self._validated(X)
        return float(self.model_.bic(x))

    def aic(self, X) -> float:
        """Akaike information criterion on ``X`` (lower is better)."""
        x = self._validated(X)
        return float(self.model_.aic(x))

    def sample(self, n_samples=1):
        """``(X (n_samples, n_features), labels (n_samples,))`` drawn from the fitted mixture."""
        check_is_fitted(self)
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
            raise ValueError(f"Invalid value for 'n_samples': {n_samples!r}. The sampling requires at least one sample.")
        x, labels = self.model_.sample(int(n_samples), random_state=_seed(self.random_state))
        return _numpy(x), _numpy(labels)


def bic_scorer(estimator, X, y=None) -> float:
    """Scorer for model selection by BIC: ``-estimator.bic(X)`` (scikit-learn maximizes scores).

    ``GridSearchCV(GaussianMixture(), {"n_components": [1, 2, 3]}, scoring=bic_scorer)``. Works
    on a ``Pipeline`` whose last step is a :class:`GaussianMixture` too.
    """
    return -float(_last_step_criterion(estimator, X, "bic"))


def aic_scorer(estimator, X, y=None) -> float:
    """Scorer for model selection by AIC: ``-estimator.aic(X)``."""
    return -float(_last_step_criterion(estimator, X, "aic"))


def _last_step_criterion(estimator, X, name: str) -> float:
    if hasattr(estimator, "steps"):  # a Pipeline: transform through all but the last step
        for _, step in estimator.steps[:-1]:
            if step is not None and step != "passthrough":
                X = step.transform(X)
        estimator = estimator.steps[-1][1]
    return getattr(estimator, name)(X)
