"""THE log-density (``torchgmm/density.py``): per-component, mixture and responsibility outputs
against scikit-learn and scipy for every covariance type, normalization over components, restart
broadcasting, gradients (float64 gradcheck) and float32 stability at large offsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.mixture._gaussian_mixture import _estimate_log_gaussian_prob

from torchgmm.covariance import get_covariance
from torchgmm.density import (
    GMMParams,
    component_log_prob,
    joint_log_prob,
    joint_log_prob_and_diff,
    log_prob,
    log_responsibilities,
    responsibilities,
)
from conftest import COV_TYPES

FAST = settings(derandomize=True, database=None, deadline=None, max_examples=40)
F64 = torch.float64
K, D, N = 3, 2, 25


def random_params(cov_type: str, batch: tuple = (), k: int = K, d: int = D, seed: int = 0, offset: float = 0.0,
                  dtype=F64) -> GMMParams:
    """Mixture parameters with ``batch`` dims: well-conditioned covariances, means about ``offset``."""
    gen = torch.Generator().manual_seed(seed)
    cov = get_covariance(cov_type)
    shape = tuple(batch) + cov.covariance_shape(k, d)
    if cov_type in ("full", "tied"):
        a = torch.randn(*shape, generator=gen, dtype=F64)
        covariance = a @ a.mT / d + 0.3 * torch.eye(d, dtype=F64)
    else:
        covariance = torch.rand(*shape, generator=gen, dtype=F64) * 2.0 + 0.3
    prec_chol, ok = cov.prec_chol_from_covariance(covariance, torch.zeros(batch, dtype=F64))
    assert bool(ok.all())
    log_weights = torch.log_softmax(torch.randn(*batch, k, generator=gen, dtype=F64), -1)
    means = offset + 2.0 * torch.randn(*batch, k, d, generator=gen, dtype=F64)
    return GMMParams(log_weights, means, prec_chol).map(lambda t: t.to(dtype))


def points(n: int = N, d: int = D, batch: tuple = (), seed: int = 1, spread: float = 3.0, offset: float = 0.0) -> torch.Tensor:
    return offset + spread * torch.randn(*batch, n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def full_covariances(params: GMMParams, cov_type: str) -> np.ndarray:
    k, d = params.means.shape[-2:]
    return get_covariance(cov_type).full_covariance(params.prec_chol, k, d).numpy()


# -- against scikit-learn and scipy --------------------------------------------------------------
def test_component_log_prob_equals_scikit_learns_weighted_log_gaussian_prob(cov_type):
    params, x = random_params(cov_type), points()
    expected = _estimate_log_gaussian_prob(x.numpy(), params.means.numpy(), params.prec_chol.numpy(), cov_type)
    expected = expected + params.log_weights.numpy()
    np.testing.assert_allclose(component_log_prob(x, params, cov_type).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_log_prob_equals_the_scipy_mixture_density(cov_type):
    params, x = random_params(cov_type, seed=2), points(seed=3)
    covs = full_covariances(params, cov_type)
    per_component = np.stack([multivariate_normal(params.means[j].numpy(), covs[j]).logpdf(x.numpy()) for j in range(K)], -1)
    expected = logsumexp(per_component + params.log_weights.numpy(), axis=-1)
    np.testing.assert_allclose(log_prob(x, params, cov_type).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_log_responsibilities_equal_scikit_learns_predict_proba(cov_type):
    params, x = random_params(cov_type, seed=4), points(seed=5)
    sk = SkGaussianMixture(K, covariance_type=cov_type)
    sk.weights_, sk.means_ = params.log_weights.exp().numpy(), params.means.numpy()
    sk.precisions_cholesky_ = params.prec_chol.numpy()  # everything predict_proba reads
    np.testing.assert_allclose(log_responsibilities(x, params, cov_type).exp().numpy(), sk.predict_proba(x.numpy()),
                               rtol=1e-10, atol=1e-14)


def test_the_three_outputs_are_one_joint_density(cov_type):
    """``log_prob = logsumexp_k component_log_prob`` and ``log_responsibilities = component - log_prob``."""
    params, x = random_params(cov_type, seed=6), points(seed=7)
    joint = component_log_prob(x, params, cov_type)
    lp = log_prob(x, params, cov_type)
    torch.testing.assert_close(lp, torch.logsumexp(joint, -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(log_responsibilities(x, params, cov_type), joint - lp.unsqueeze(-1), rtol=0, atol=1e-12)


def test_joint_log_prob_is_component_major_and_returns_the_centred_data(cov_type):
    params, x = random_params(cov_type, batch=(2,), seed=8), points(batch=(2,), seed=9)
    joint, diff = joint_log_prob_and_diff(x, params, cov_type)
    assert joint.shape == (2, K, N) and diff.shape == (2, K, N, D)
    torch.testing.assert_close(joint, joint_log_prob(x, params, cov_type), rtol=0, atol=0)
    torch.testing.assert_close(joint.transpose(-1, -2), component_log_prob(x, params, cov_type), rtol=0, atol=0)
    torch.testing.assert_close(diff, x.unsqueeze(-3) - params.means.unsqueeze(-2), rtol=0, atol=0)


# -- normalization -------------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 2**16), cov_type=st.sampled_from(COV_TYPES), far=st.floats(0.0, 1e4), k=st.integers(1, 4))
def test_responsibilities_sum_to_one_over_components_even_where_densities_underflow(seed, cov_type, far, k):
    """Points up to 1e4 standard deviations away: every density underflows in linear space, the
    responsibilities must still be a distribution over the K components."""
    params = random_params(cov_type, k=k, seed=seed)
    x = points(n=10, seed=seed + 1, spread=1.0 + far)
    resp = responsibilities(x, params, cov_type)
    assert resp.shape == (10, k)
    assert bool(torch.isfinite(resp).all()) and bool((resp >= 0).all())
    torch.testing.assert_close(resp.sum(-1), torch.ones(10, dtype=F64), rtol=0, atol=1e-12)
    assert bool(torch.isfinite(log_prob(x, params, cov_type)).all())


# -- batch broadcasting --------------------------------------------------------------------------
@pytest.mark.parametrize("output", [log_prob, component_log_prob, log_responsibilities], ids=lambda f: f.__name__)
def test_restarts_broadcast_against_shared_data_as_each_member_alone(cov_type, output):
    """Parameters ``(B, R, ...)`` against data ``(B, 1, N, D)``: member ``(b, r)`` sees series ``b``."""
    b, r = 2, 3
    params = random_params(cov_type, batch=(b, r), seed=10)
    x = points(batch=(b,), seed=11)
    batched = output(x.unsqueeze(1), params, cov_type)
    assert batched.shape[:3] == (b, r, N)
    for i in range(b):
        for j in range(r):
            alone = output(x[i], params.map(lambda t: t[i, j]), cov_type)
            torch.testing.assert_close(batched[i, j], alone, rtol=1e-13, atol=1e-13)


# -- gradients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("output", [log_prob, log_responsibilities], ids=lambda f: f.__name__)
def test_outputs_pass_gradcheck_in_the_data_and_every_parameter(cov_type, output):
    params = random_params(cov_type, k=2, seed=12)
    x = points(n=4, seed=13)
    inputs = (x.clone().requires_grad_(True),) + tuple(t.clone().requires_grad_(True) for t in params)

    def fn(x, log_weights, means, prec_chol):
        return output(x, GMMParams(log_weights, means, prec_chol), cov_type)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# -- float32 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_float32_at_a_large_offset_equals_float64_on_the_same_numbers(cov_type, offset):
    """Data and means both near ``offset``: in float32 ``x - mu`` is exact (the numbers are
    within a factor of two), so the log-density keeps float32's relative accuracy of the
    distance, not of the offset."""
    params32 = random_params(cov_type, seed=14, offset=offset, dtype=torch.float32)
    x32 = points(seed=15, offset=offset).float()
    lp32 = log_prob(x32, params32, cov_type)
    lp64 = log_prob(x32.double(), params32.map(lambda t: t.double()), cov_type)  # the same numbers
    assert lp32.dtype == torch.float32 and bool(torch.isfinite(lp32).all())
    torch.testing.assert_close(lp32.double(), lp64, rtol=1e-5, atol=1e-4)
    resp32 = log_responsibilities(x32, params32, cov_type).exp()
    torch.testing.assert_close(resp32.sum(-1), torch.ones(N), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
def test_univariate_quadratic_coefficients_give_the_one_log_density(cov_type):
    """The fast univariate E-step's quadratic in x is the same joint log-probability."""
    from torchgmm.density import joint_log_prob, univariate_coefficients
    from torchgmm.init import initialize, make_generator

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 50, 1, dtype=torch.float64, generator=gen) * 2 + 1
    w = torch.ones(4, 50, dtype=torch.float64)
    params, _ = initialize(x, w, 3, 2, "kmeans", cov_type, torch.full((4,), 1e-6, dtype=torch.float64), make_generator(0))
    coef = univariate_coefficients(params, cov_type)  # (4, 2, K, 3)
    xb = x.unsqueeze(1)  # (4, 1, 50, 1)
    quadratic = coef[..., 0:1] + coef[..., 1:2] * xb.mT + coef[..., 2:3] * xb.mT.square()  # (4, 2, K, 50)
    torch.testing.assert_close(quadratic, joint_log_prob(xb, params, cov_type), rtol=1e-12, atol=1e-10)
