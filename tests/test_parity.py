"""Parity with scikit-learn's ``GaussianMixture`` (float64), attribute by attribute.

From the same initial parameters torchgmm must follow scikit-learn's EM step for step: the same
parameters, iteration count, lower bound and lower-bound history, and the same scores. With
scikit-learn's default initialization (k-means), or with only ``means_init``, it must reach the
same optimum on well-separated data.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import torchgmm
from conftest import blobs, rel_err, seed_series, sklearn_init, status_checked_module_fit

# Parameters and scores agree to ~1e-13 today; 1e-6 leaves room for a different summation order.
RTOL = 1e-6

DATASETS = {
    "2d-overlapping": lambda: (blobs(0, n=300, d=2, k=3, overlap=1.0), 3),
    "3d": lambda: (blobs(1, n=400, d=3, k=3, overlap=1.0), 3),
    "seed-series": lambda: (seed_series()[:, None], 3),
}
# (tol, max_iter): run to convergence, or stop mid-way where the parameters still move a lot.
REGIMES = {"converged": (1e-8, 1000), "5-iterations": (1e-3, 5)}

FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")


def fit_both(x: np.ndarray, k: int, cov_type: str, **settings):
    """scikit-learn and torchgmm fitted on ``x`` with identical settings. Each library's warnings
    are checked against its own outcome (the 5-iteration regime stops unconverged): scikit-learn
    warns once iff it did not converge; torchgmm as its statuses call for."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sk = SkGaussianMixture(k, covariance_type=cov_type, **settings).fit(x)
    assert [w.category for w in caught] == ([] if sk.converged_ else [SkConvergenceWarning]), [str(w.message) for w in caught]
    tg = status_checked_module_fit(torchgmm.GaussianMixture(k, covariance_type=cov_type, **settings), torch.tensor(x))
    return sk, tg


def parity_errors(sk, tg, x: np.ndarray) -> dict[str, float]:
    """Relative error of every compared attribute and method (scikit-learn is the reference)."""
    xt = torch.tensor(x)
    errors = {name: rel_err(getattr(tg, name), getattr(sk, name)) for name in FITTED}
    errors["lower_bound_"] = rel_err(tg.lower_bound_, sk.lower_bound_)
    errors["score_samples"] = rel_err(tg.score_samples(xt), sk.score_samples(x))
    # Probabilities are compared on an absolute scale (they are in [0, 1]).
    errors["predict_proba"] = float(np.max(np.abs(tg.predict_proba(xt).numpy() - sk.predict_proba(x))))
    errors["bic"] = rel_err(tg.bic(xt), sk.bic(x))
    errors["aic"] = rel_err(tg.aic(xt), sk.aic(x))
    return errors


@functools.lru_cache(maxsize=None)
def fit_from_sklearn_init(cov_type: str, dataset: str, regime: str):
    """``(x, sk, tg)``: both libraries fitted from scikit-learn's k-means initial parameters
    (cached: several promises are checked on the same pair of fits; nothing mutates them)."""
    x, k = DATASETS[dataset]()
    tol, max_iter = REGIMES[regime]
    sk, tg = fit_both(x, k, cov_type, tol=tol, max_iter=max_iter, **sklearn_init(x, k, cov_type))
    return x, sk, tg


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dataset", DATASETS)
def test_em_from_given_init_matches_sklearn(cov_type, dataset, regime):
    x, sk, tg = fit_from_sklearn_init(cov_type, dataset, regime)

    assert int(tg.n_iter_) == sk.n_iter_
    assert bool(tg.converged_) == sk.converged_
    errors = parity_errors(sk, tg, x)
    bad = {name: err for name, err in errors.items() if not err <= RTOL}
    assert not bad, f"parity errors above {RTOL}: {bad}"


@pytest.mark.parametrize("dataset", DATASETS)
def test_lower_bound_history_matches_sklearn_nan_padded(cov_type, dataset):
    x, sk, tg = fit_from_sklearn_init(cov_type, dataset, "converged")
    max_iter = REGIMES["converged"][1]

    history = tg.lower_bounds_.numpy()
    assert history.shape == (max_iter,)
    n = len(sk.lower_bounds_)
    np.testing.assert_allclose(history[:n], sk.lower_bounds_, rtol=RTOL)
    assert np.isnan(history[n:]).all()
    assert history[n - 1] == float(tg.lower_bound_)


def test_default_kmeans_init_reaches_sklearn_lower_bound(cov_type):
    x = blobs(3, n=300, d=2, k=3, overlap=0.3)  # well separated: one optimum worth finding
    sk, tg = fit_both(x, 3, cov_type, tol=1e-10, max_iter=1000, random_state=0)

    assert rel_err(tg.lower_bound_, sk.lower_bound_) <= RTOL
    order_sk, order_tg = np.argsort(sk.means_[:, 0]), np.argsort(tg.means_[:, 0].numpy())
    np.testing.assert_allclose(tg.means_.numpy()[order_tg], sk.means_[order_sk], rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(tg.weights_.numpy()[order_tg], sk.weights_[order_sk], rtol=RTOL)


def test_means_init_only_reaches_sklearn_optimum(cov_type):
    x = blobs(4, n=300, d=2, k=3, overlap=0.3)
    rng = np.random.default_rng(7)
    # Rough guesses near the true clusters; weights and covariances come from each library's init.
    exact = SkGaussianMixture(3, covariance_type=cov_type, random_state=0).fit(x).means_
    means_init = exact + rng.normal(0.0, 0.3, exact.shape)
    sk, tg = fit_both(x, 3, cov_type, tol=1e-10, max_iter=1000, random_state=0, means_init=means_init)

    assert rel_err(tg.lower_bound_, sk.lower_bound_) <= RTOL
    # means_init fixes the component order in both libraries.
    np.testing.assert_allclose(tg.means_.numpy(), sk.means_, rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(tg.weights_.numpy(), sk.weights_, rtol=RTOL)


def test_integer_sample_weight_equals_sklearn_on_repeated_rows(cov_type):
    x = blobs(0, n=120, d=2, k=3, overlap=1.0)
    counts = np.random.default_rng(3).integers(1, 4, len(x))
    repeated = np.repeat(x, counts, axis=0)
    init = sklearn_init(repeated, 3, cov_type)
    sk = SkGaussianMixture(3, covariance_type=cov_type, tol=1e-8, max_iter=1000, **init).fit(repeated)
    tg = torchgmm.GaussianMixture(3, covariance_type=cov_type, tol=1e-8, max_iter=1000, **init)
    tg.fit(torch.tensor(x), sample_weight=torch.tensor(counts, dtype=torch.float64))

    assert int(tg.n_iter_) == sk.n_iter_
    for name in FITTED:
        assert rel_err(getattr(tg, name), getattr(sk, name)) <= RTOL, name
    assert rel_err(tg.lower_bound_, sk.lower_bound_) <= RTOL
    weighted_score = tg.score(torch.tensor(x), sample_weight=torch.tensor(counts, dtype=torch.float64))
    assert rel_err(weighted_score, sk.score(repeated)) <= RTOL
