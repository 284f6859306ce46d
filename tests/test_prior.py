"""The conjugate prior (MAP EM): mclust's defaults, the posterior mode, the objective, and the
bundled 50-point time series on which a hand-written NumPy EM failed (see docs): no collapse onto
its repeated value with the prior, every collapse flagged without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

import torchgmm
from torchgmm import FitStatus, GMMParams
from torchgmm.covariance import get_covariance
from torchgmm.density import joint_log_prob
from torchgmm.em import em_step
from torchgmm.prior import ConjugatePrior, make_prior
from torchgmm.stats import m_step, statistics
from conftest import COV_TYPES, REPEATED_VALUE, status_checked_fit
from conftest import seed_series as seed_series_np


def seed_series() -> torch.Tensor:
    return torch.tensor(seed_series_np(), dtype=torch.float64)


def random_problem(seed=0, b=2, n=40, d=3, k=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    w = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.5
    return x, w * (n / w.sum(-1, keepdim=True)), gen


# -- the default prior is mclust's ----------------------------------------------------------------
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_default_hyperparameters_are_mclusts(cov_type):
    x, _, _ = random_problem(b=1, n=30, d=3)
    w = torch.ones(1, 30, dtype=torch.float64)
    k = 4
    prior = make_prior("default", x, w, k, get_covariance(cov_type))
    data = x[0].numpy()
    var = np.cov(data, rowvar=False)  # R's var(): n - 1 denominator
    fac = k ** (-2 / 3)
    assert float(prior.shrinkage[0]) == 0.01
    assert float(prior.dof[0]) == 3 + 2
    np.testing.assert_allclose(prior.mean[0].numpy(), data.mean(0), atol=1e-12)
    expected = {
        "full": fac * var,
        "tied": fac * var,
        "diag": np.full(3, fac * np.trace(var) / 3),  # mclust: one number for diagonal models
        "spherical": fac * np.trace(var) / 3,
    }[cov_type]
    np.testing.assert_allclose(prior.scale[0].numpy(), expected, rtol=1e-12)


def test_default_scale_is_diagonal_when_fewer_points_than_dimensions():
    x, _, _ = random_problem(b=1, n=4, d=6)
    prior = make_prior("default", x, torch.ones(1, 4, dtype=torch.float64), 2, get_covariance("full"))
    scale = prior.scale[0]
    assert torch.equal(scale, torch.diag_embed(torch.diagonal(scale)))
    assert bool((torch.diagonal(scale) > 0).all())


# -- the MAP M-step and the log prior -------------------------------------------------------------
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_map_m_step_maximizes_expected_complete_log_likelihood_plus_log_prior(cov_type):
    """At the MAP M-step's output the gradient of Q + log prior (means, covariance factor) is 0."""
    x, w, gen = random_problem()
    cov = get_covariance(cov_type)
    prior = make_prior("default", x, w, 3, cov)
    resp = torch.softmax(torch.randn(2, 3, 40, generator=gen, dtype=torch.float64), 1) * w.unsqueeze(1)
    ref = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)  # statistics about arbitrary means
    stats = statistics(x.unsqueeze(-3) - ref.unsqueeze(-2), resp, cov)
    params, ok = m_step(stats, ref, cov, torch.zeros(2, dtype=torch.float64), prior)
    assert bool(ok.all())
    means = params.means.clone().requires_grad_(True)
    raw = cov.to_unconstrained(params.prec_chol).clone().requires_grad_(True)
    at = GMMParams(params.log_weights, means, cov.from_unconstrained(raw))
    joint = joint_log_prob(x, at, cov)
    objective = (resp * (joint - at.log_weights.unsqueeze(-1))).sum() + prior.log_prior(at, cov).sum()
    g_means, g_raw = torch.autograd.grad(objective, [means, raw])
    if cov_type in ("full", "tied"):
        g_raw = torch.triu(g_raw)  # entries below the diagonal are not parameters
    assert float(g_means.abs().max()) < 1e-10
    assert float(g_raw.abs().max()) < 1e-10


def _scipy_log_prior(params: GMMParams, prior: ConjugatePrior, cov_type: str, s: int) -> float:
    """The prior's log density with scipy's distributions (series ``s``)."""
    cov = get_covariance(cov_type)
    k, d = params.means.shape[-2:]
    kappa, mu_p, nu = float(prior.shrinkage[s]), prior.mean[s].numpy(), float(prior.dof[s])
    means = params.means[s].numpy()
    covs = cov.full_covariance(params.prec_chol, k, d)[s].numpy()
    total = 0.0
    if cov_type in ("full", "tied"):
        scale = prior.scale[s].numpy()
        blocks = [covs[0]] if cov_type == "tied" else list(covs)
        total += sum(sps.invwishart(df=nu, scale=scale).logpdf(c) for c in blocks)
    else:
        variances = np.diagonal(covs, axis1=-2, axis2=-1)  # (K, D)
        if cov_type == "spherical":
            variances = variances[:, :1]
        scale = np.broadcast_to(prior.scale[s].numpy(), variances.shape[1:])
        total += sps.invgamma(a=nu / 2, scale=scale / 2).logpdf(variances).sum()
    total += sum(sps.multivariate_normal(mu_p, covs[j] / kappa).logpdf(means[j]) for j in range(k))
    return total


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_log_prior_equals_scipy_normal_inverse_wishart_up_to_a_constant(cov_type):
    x, w, gen = random_problem(d=2)
    cov = get_covariance(cov_type)
    prior = make_prior("default", x, w, 3, cov)

    def random_params():
        log_w = torch.log_softmax(torch.randn(2, 3, generator=gen, dtype=torch.float64), -1)
        means = torch.randn(2, 3, 2, generator=gen, dtype=torch.float64)
        a = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
        covs = a @ a.mT + 0.3 * torch.eye(2, dtype=torch.float64)
        shaped = {"full": covs, "tied": covs[:, 0], "diag": torch.diagonal(covs, dim1=-2, dim2=-1),
                  "spherical": torch.diagonal(covs, dim1=-2, dim2=-1).mean(-1)}[cov_type]
        prec_chol, _ = cov.prec_chol_from_covariance(shaped, torch.zeros(2, dtype=torch.float64))
        return GMMParams(log_w, means, prec_chol)

    p1, p2 = random_params(), random_params()
    ours = prior.log_prior(p1, cov) - prior.log_prior(p2, cov)
    for s in range(2):
        theirs = _scipy_log_prior(p1, prior, cov_type, s) - _scipy_log_prior(p2, prior, cov_type, s)
        assert float(ours[s]) == pytest.approx(theirs, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_map_em_objective_never_decreases(cov_type):
    """log-likelihood + log prior is monotone along MAP EM (reg_covar = 0)."""
    x, w, gen = random_problem(seed=3, n=60)
    cov = get_covariance(cov_type)
    prior = make_prior("default", x, w, 3, cov)
    reg = torch.zeros(2, dtype=torch.float64)
    resp = torch.softmax(3 * torch.randn(2, 3, 60, generator=gen, dtype=torch.float64), 1) * w.unsqueeze(1)
    ref = torch.zeros(2, 3, 3, dtype=torch.float64)
    params, _ = m_step(statistics(x.unsqueeze(-3) - ref.unsqueeze(-2), resp, cov), ref, cov, reg, prior)
    w_total = w.sum(-1)
    objective = []
    for _ in range(40):
        new, mean_ll, ok = em_step(x, w, w_total, params, cov, reg, prior)
        assert bool(ok.all())
        objective.append(mean_ll * w_total + prior.log_prior(params, cov))
        params = new
    objective = torch.stack(objective)  # (T, B)
    steps = objective[1:] - objective[:-1]
    assert float(steps.min()) >= -1e-9 * float(objective.abs().max())


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_negligible_prior_gives_the_maximum_likelihood_fit(cov_type):
    """Tiny shrinkage and many points: MAP ~ MLE from the same start."""
    gen = torch.Generator().manual_seed(5)
    centers = torch.tensor([[-4.0, 0.0], [4.0, 1.0]], dtype=torch.float64)
    labels = torch.arange(20000) % 2
    x = centers[labels] + torch.randn(20000, 2, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 0.5], dtype=torch.float64)
    kwargs = dict(covariance_type=cov_type, random_state=0, tol=1e-10, max_iter=300)
    mle = torchgmm.fit(x, 2, **kwargs)
    map_ = torchgmm.fit(x, 2, prior={"shrinkage": 1e-8}, **kwargs)
    order = lambda r: r.means[:, 0].argsort()  # noqa: E731
    np.testing.assert_allclose(map_.means[order(map_)], mle.means[order(mle)], atol=2e-3)
    np.testing.assert_allclose(map_.weights[order(map_)], mle.weights[order(mle)], atol=1e-3)
    ca, cb = map_.covariances, mle.covariances
    if cov_type != "tied":
        ca, cb = ca[order(map_)], cb[order(mle)]
    np.testing.assert_allclose(ca, cb, rtol=2e-3, atol=1e-4)
    assert float(map_.lower_bound) == pytest.approx(float(mle.lower_bound), abs=1e-3)


# -- the bundled 50-point time series on which a hand-written NumPy EM failed (see docs) ---------
def _collapsed_onto_repeated_value(result) -> bool:
    means = result.means.reshape(-1)
    variances = result.covariances.reshape(-1)
    return bool((((means - REPEATED_VALUE).abs() < 1e-3) & (variances < 1e-2)).any())


@pytest.fixture(scope="module")
def seed_fits():
    x = seed_series()
    fits = {}
    for prior in (None, "default"):
        # some seeds collapse without the prior: each fit's warnings are checked against its status
        fits[prior] = [status_checked_fit(x, 3, init_params="random_from_data", random_state=seed, prior=prior)
                       for seed in range(100)]
    return fits


def test_with_the_default_prior_no_fit_collapses_onto_the_repeated_value(seed_fits):
    fits = seed_fits["default"]
    assert sum(_collapsed_onto_repeated_value(r) for r in fits) == 0
    assert all(int(r.status) != FitStatus.DEGENERATE for r in fits)
    assert min(float(r.covariances.min()) for r in fits) > 0.1  # variances floored well above reg_covar


def test_without_a_prior_every_collapse_is_flagged_degenerate(seed_fits):
    fits = seed_fits[None]
    collapsed = [r for r in fits if _collapsed_onto_repeated_value(r)]
    assert len(collapsed) > 0  # random-from-data initialization does collapse on this series
    assert all(int(r.status) == FitStatus.DEGENERATE for r in collapsed)
    for r in collapsed:
        assert "collapsed" in r.summary() and "44.44" in r.summary()


# -- per series, restarts, scaling, specification -------------------------------------------------
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_prior_is_per_series_and_broadcasts_over_restarts(cov_type):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 50, 2, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)[:, None, None]
    x[:, :25] += 3 * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)[:, None, None]
    kwargs = dict(covariance_type=cov_type, n_init=3, random_state=0, prior="default")
    batch = torchgmm.fit(x, 2, **kwargs)
    for s in range(3):
        alone = torchgmm.fit(x[s], 2, **kwargs)
        torch.testing.assert_close(batch.means[s], alone.means, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(batch.covariances[s], alone.covariances, rtol=1e-9, atol=1e-12)
        assert float(batch.lower_bound[s]) == pytest.approx(float(alone.lower_bound), rel=1e-10)


def test_prior_fit_is_equivariant_to_shift_and_scale():
    x = seed_series()
    a, b = 1e-3, 5.0
    base = torchgmm.fit(x, 3, random_state=0, prior="default")
    moved = torchgmm.fit(a * x + b, 3, random_state=0, prior="default", reg_covar=1e-6 * a**2)  # reg_covar is absolute
    torch.testing.assert_close(moved.means, a * base.means + b, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(moved.covariances, a**2 * base.covariances, rtol=1e-7, atol=1e-14)


def test_prior_dict_overrides_shrinkage_and_dof():
    x, w, _ = random_problem()
    prior = make_prior({"shrinkage": 0.5, "dof": 7}, x, w, 3, get_covariance("full"))
    assert torch.equal(prior.shrinkage, torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.equal(prior.dof, torch.full((2,), 7.0, dtype=torch.float64))
    r = torchgmm.fit(x, 3, prior={"shrinkage": 0.5, "dof": 7}, random_state=0)
    assert bool(torch.isfinite(r.means).all())


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("mclust", ValueError, "prior='mclust'"),
        ({"shrink": 0.1}, ValueError, "unknown key"),
        ({"shrinkage": -1.0}, ValueError, "shrinkage"),
        ({"dof": 1.0}, ValueError, "dof"),  # D = 3: full needs dof > 2
        ({"dof": "3"}, TypeError, "dof"),
        (3, TypeError, "prior must be"),
    ],
)
def test_bad_prior_specification_is_an_error_naming_it(spec, error, match):
    x, w, _ = random_problem()
    with pytest.raises(error, match=match):
        torchgmm.fit(x, 3, prior=spec)


def test_prior_mean_and_scale_in_data_units_convert_with_the_standardization():
    x, w, _ = random_problem(b=1)
    shift, scale = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), torch.tensor([10.0], dtype=torch.float64)
    prior = make_prior({"mean": [11.0, 2.0, 3.0], "scale": 200.0}, x, w, 3, get_covariance("diag"), shift=shift, scale=scale)
    torch.testing.assert_close(prior.mean, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(prior.scale, torch.full((1, 3), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="standardization"):
        make_prior({"scale": 1.0}, x, w, 3, get_covariance("diag"))


def test_prior_scale_override_in_data_units_works_through_fit():
    x = seed_series()
    base = torchgmm.fit(x, 3, random_state=0, prior={"scale": 2.0, "mean": [30.0]})
    # reg_covar is absolute (in data units squared): it scales with the data for exact equivariance
    moved = torchgmm.fit(10 * x, 3, random_state=0, reg_covar=1e-4, prior={"scale": 200.0, "mean": [300.0]})
    torch.testing.assert_close(moved.means, 10 * base.means, rtol=1e-8, atol=1e-8)


def test_log_prior_is_differentiable():
    x, w, gen = random_problem(b=1, d=2)
    cov = get_covariance("full")
    prior = make_prior("default", x, w, 2, cov)
    means = torch.randn(1, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(1, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(means, raw):
        return prior.log_prior(GMMParams(torch.zeros(1, 2, dtype=torch.float64), means, cov.from_unconstrained(raw)), cov)

    assert torch.autograd.gradcheck(f, (means, raw))


def test_gradient_mode_with_prior_reaches_the_map_fit():
    pytest.importorskip("torchgmm.gradient")
    x = seed_series()
    em = torchgmm.fit(x, 3, random_state=0, prior="default", tol=1e-10, max_iter=500)
    grad = torchgmm.fit(x, 3, random_state=0, prior="default", method="gradient", tol=1e-10, max_iter=500)
    torch.testing.assert_close(grad.means.sort(0).values, em.means.sort(0).values, rtol=1e-3, atol=1e-2)
