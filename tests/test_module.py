"""The ``GaussianMixture`` module's basic promises: scikit-learn's method contracts, dtypes,
sampling, ``max_iter=0`` and ``tol=0``, and one warning per call."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm import ConvergenceWarning, GaussianMixture
from conftest import blobs, sklearn_init


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.tensor(blobs(2, n=300, d=2, overlap=0.6))


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """``(2, 3, 150, 2)``."""
    return torch.stack([torch.tensor(blobs(seed, n=150, d=2, overlap=0.6)) for seed in range(6)]).reshape(2, 3, 150, 2)


def quiet(model: GaussianMixture, x, **kwargs) -> GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        return model.fit(x, **kwargs)


def test_fit_returns_self(data):
    model = GaussianMixture(3, random_state=0)
    assert quiet(model, data) is model


def test_fit_predict_equals_fit_then_predict(data, cov_type):
    # few iterations and several restarts: the labels of the last E-step are not yet final
    settings = dict(covariance_type=cov_type, n_init=3, max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        labels = GaussianMixture(3, **settings).fit_predict(data)
        model = GaussianMixture(3, **settings).fit(data)
    assert torch.equal(labels, model.predict(data))


def test_fit_predict_equals_fit_then_predict_in_a_batch(batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        labels = GaussianMixture(3, max_iter=4, random_state=1).fit_predict(batch)
        model = GaussianMixture(3, max_iter=4, random_state=1).fit(batch)
    assert labels.shape == (2, 3, 150)
    assert torch.equal(labels, model.predict(batch))


def test_predict_proba_rows_sum_to_one_and_argmax_is_predict(batch, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), batch)
    proba = model.predict_proba(batch)

    assert proba.shape == (2, 3, 150, 3)
    torch.testing.assert_close(proba.sum(-1), torch.ones(2, 3, 150, dtype=torch.float64))
    assert bool((proba >= 0).all())
    assert torch.equal(proba.argmax(-1), model.predict(batch))


def test_score_is_the_mean_of_score_samples(batch, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), batch)
    per_sample = model.score_samples(batch)

    assert per_sample.shape == (2, 3, 150)
    torch.testing.assert_close(model.score(batch), per_sample.mean(-1))
    torch.testing.assert_close(model(batch), per_sample)  # forward is the same log-density
    weights = torch.rand(2, 3, 150, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.score(batch, sample_weight=weights), (per_sample * weights).sum(-1) / weights.sum(-1))


def test_score_samples_is_the_log_density_of_the_fitted_mixture(data, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), data)
    reference = model.to_distribution().log_prob(data)  # torch.distributions' own density

    torch.testing.assert_close(model.score_samples(data), reference)


@pytest.mark.parametrize("n", [1, 5])
def test_sample_shapes(batch, n):
    model = quiet(GaussianMixture(3, random_state=0), batch)
    x, labels = model.sample(n)

    assert x.shape == (2, 3, n, 2)
    assert labels.shape == (2, 3, n)
    assert x.dtype == torch.float64
    assert bool(((labels >= 0) & (labels < 3)).all())


def test_sample_moments_approach_the_fitted_mixture(data, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), data)
    n = 200_000
    x, labels = model.sample(n, random_state=0)

    weights, means = model.weights_, model.means_
    covs = torchgmm.get_covariance(cov_type).full_covariance(model.precisions_cholesky_, 3, 2)
    freq = torch.bincount(labels, minlength=3).double() / n
    torch.testing.assert_close(freq, weights, rtol=0, atol=5 * (0.25 / n) ** 0.5)
    for k in range(3):
        xk = x[labels == k]
        se = (covs[k].diagonal() / len(xk)).sqrt()
        assert bool(((xk.mean(0) - means[k]).abs() < 5 * se).all()), f"component {k} mean"
        torch.testing.assert_close(torch.cov(xk.T), covs[k], rtol=0.05, atol=0.05 * float(covs[k].diagonal().max()))
    # and the mixture's overall moments
    overall_mean = (weights[:, None] * means).sum(0)
    torch.testing.assert_close(x.mean(0), overall_mean, rtol=0, atol=0.05)


def test_sample_with_the_same_random_state_is_reproducible(data):
    model = quiet(GaussianMixture(2, random_state=0), data)
    a, la = model.sample(50, random_state=3)
    b, lb = model.sample(50, random_state=3)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_float64_in_gives_float64_out(data, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), data)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "lower_bound_", "lower_bounds_"):
        assert getattr(model, name).dtype == torch.float64, name
    for out in (model.score_samples(data), model.predict_proba(data), model.score(data), model.bic(data)):
        assert out.dtype == torch.float64


def offset_tight_float32(d: int, seed: int = 0) -> torch.Tensor:
    """Three clusters of unit-scale spread, shrunk to scale 1e-2 and shifted by 1e4, in float32
    (whose spacing at 1e4 is ~1e-3: a tenth of the spread)."""
    rng = np.random.default_rng(seed)
    z = np.concatenate([rng.normal(c, s, (n, d)) for c, s, n in ((-6, 1.0, 100), (0, 1.5, 120), (6, 0.8, 80))])
    return (1e4 + 1e-2 * torch.tensor(z[rng.permutation(len(z))])).float()


def test_float32_on_offset_tightly_scaled_data_matches_float64(cov_type):
    x32 = offset_tight_float32(d=1)
    x64 = x32.double()  # the very same values
    settings = dict(covariance_type=cov_type, random_state=0, tol=1e-6, max_iter=300)
    fit32 = quiet(GaussianMixture(3, **settings), x32)
    fit64 = quiet(GaussianMixture(3, **settings), x64)

    assert fit32.means_.dtype == torch.float32
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert torch.isfinite(getattr(fit32, name)).all(), name
    ll32 = float(fit32.score(x32))
    assert np.isfinite(ll32)
    assert abs(ll32 - float(fit64.score(x64))) < 1e-3


def test_float32_fit_loses_only_the_rounding_of_its_means(cov_type):
    """In float32 the means themselves are rounded to ~1e-3 at 1e4, which costs up to ~1e-3 of
    mean log-likelihood per feature on this data; the fit must lose nothing beyond that (no
    E[xx] - mu mu^T cancellation): it scores like the float64 optimum with float32 means."""
    x32 = offset_tight_float32(d=2, seed=1)
    x64 = x32.double()
    settings = dict(covariance_type=cov_type, random_state=0, tol=1e-6, max_iter=300)
    fit32 = quiet(GaussianMixture(3, **settings), x32)
    best = quiet(GaussianMixture(3, **settings), x64).mixture_params().map(lambda t: t.detach())
    rounded = best._replace(means=best.means.float().double())

    ll_rounded = float(torchgmm.log_prob(x64, rounded, cov_type).mean())
    assert abs(float(fit32.score(x32)) - ll_rounded) < 1e-4


def test_max_iter_zero_returns_the_given_init_without_convergence_warning(data, cov_type):
    init = sklearn_init(data.numpy(), 3, cov_type)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = GaussianMixture(3, covariance_type=cov_type, max_iter=0, **init).fit(data)

    assert int(model.n_iter_) == 0
    assert not bool(model.converged_)
    assert model.lower_bounds_.shape == (0,)
    torch.testing.assert_close(model.weights_, torch.tensor(init["weights_init"]))
    torch.testing.assert_close(model.means_, torch.tensor(init["means_init"]))
    torch.testing.assert_close(model.precisions_, torch.tensor(init["precisions_init"]))
    # lower_bound_ is the mean log-likelihood of those initial parameters
    torch.testing.assert_close(model.lower_bound_, model.score(data))


def test_max_iter_zero_matches_sklearn_initialization(data, cov_type):
    """sklearn's ``max_iter=0`` fit returns its k-means initialization; from the same partition
    (given as means) torchgmm's ``max_iter=0`` returns the same parameters."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    sk = SkGaussianMixture(3, covariance_type=cov_type, max_iter=0, random_state=0).fit(data.numpy())
    model = GaussianMixture(
        3, covariance_type=cov_type, max_iter=0,
        weights_init=sk.weights_, means_init=sk.means_, precisions_init=sk.precisions_,
    ).fit(data)
    np.testing.assert_allclose(model.precisions_cholesky_.numpy(), sk.precisions_cholesky_, rtol=1e-10)
    np.testing.assert_allclose(model.score_samples(data).numpy(), sk.score_samples(data.numpy()), rtol=1e-10)


def test_tol_zero_runs_to_max_iter_and_warns_once_per_call():
    x = torch.stack([torch.tensor(blobs(seed, n=60, d=1, k=2)) for seed in range(50)])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = GaussianMixture(2, tol=0.0, max_iter=7, random_state=0).fit(x)

    assert bool((model.n_iter_ == 7).all())
    assert not bool(model.converged_.any())
    assert bool((model.status_ == torchgmm.FitStatus.NOT_CONVERGED).all())
    convergence = [w for w in record if issubclass(w.category, ConvergenceWarning)]
    assert len(convergence) == 1, [str(w.message) for w in convergence]
    assert "50 of 50" in str(convergence[0].message)


def test_converged_fit_does_not_warn(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchgmm.FitWarning)
        model = GaussianMixture(3, random_state=0).fit(data)
    assert bool(model.converged_)


def test_refit_gives_the_same_predictions(data):
    model = quiet(GaussianMixture(3, random_state=0), data)
    first = model.predict(data)
    assert torch.equal(quiet(model, data).predict(data), first)


def test_bic_and_aic_count_free_parameters(data, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), data)
    n, d, k = len(data), 2, 3
    cov_params = {"full": k * d * (d + 1) // 2, "tied": d * (d + 1) // 2, "diag": k * d, "spherical": k}[cov_type]
    n_params = cov_params + k * d + k - 1
    log_lik = model.score(data) * n
    torch.testing.assert_close(model.bic(data), -2 * log_lik + n_params * np.log(n))
    torch.testing.assert_close(model.aic(data), -2 * log_lik + 2 * n_params)
