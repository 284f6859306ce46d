"""The fused univariate EM (``em.run_univariate``, what ``fit`` runs for small univariate problems)
gives what the general member loop gives from the same start, and leaves to the loop what it
does not handle."""

from __future__ import annotations

import pytest
import torch

import torchgmm
from torchgmm.covariance import get_covariance
from torchgmm.density import GMMParams, univariate_coefficients, univariate_quadratic
from torchgmm.em import EMRule, run_univariate
from torchgmm.fitting import FUSED_MAX_WORK
from torchgmm.init import initialize, make_generator
from torchgmm.loop import Members, run_members
from torchgmm.stats import m_step, univariate_m_step, univariate_statistics
from torchgmm.units import standardize

COV_TYPES = ["full", "tied", "diag", "spherical"]


def series(b=3, n=80, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 1, generator=gen, dtype=torch.float64)
    x[:, : n // 3] += 5.0
    x[:, n // 3 : n // 2] -= 4.0
    return x.to(dtype)


def start(x, w, k, r, cov, seed=0):
    xs, _, _, reg = standardize(x, w, 1e-6)
    init, _ = initialize(xs, w, k, r, "kmeans", cov, reg, make_generator(seed))
    return Members(xs, w, reg, None, r), init


def both(x, w, k, r, cov_type, tol=1e-3, max_iter=100):
    members, init = start(x, w, k, r, cov_type)
    fused = run_univariate(members, init, cov_type, tol, max_iter)
    loop = run_members(members, init, EMRule(cov_type), tol, max_iter)
    return fused, loop


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("r", [1, 4])
def test_fused_univariate_em_equals_the_member_loop(cov_type, r):
    x = series()
    w = torch.ones(x.shape[:2], dtype=x.dtype)
    w[1, 60:] = 0.0  # padding
    w[2] *= torch.linspace(0.5, 2.0, x.shape[1], dtype=x.dtype)  # weights
    fused, loop = both(x, w, 3, r, cov_type, tol=1e-6)
    assert fused is not None
    assert torch.equal(fused.n_iter, loop.n_iter)
    assert torch.equal(fused.converged, loop.converged) and not bool(fused.failed.any())
    for a, b in zip(fused.params, loop.params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fused.lower_bound, loop.lower_bound, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused.history, loop.history, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(fused.passes, loop.passes, equal_nan=True)
    assert fused.elapsed.shape == loop.elapsed.shape


def test_fused_univariate_em_stops_at_max_iter_like_the_loop():
    x = series(b=2)
    w = torch.ones(x.shape[:2], dtype=x.dtype)
    fused, loop = both(x, w, 3, 2, "full", tol=0.0, max_iter=7)
    assert fused.n_iter.tolist() == loop.n_iter.tolist() == [7] * 4
    assert not bool(fused.converged.any())
    for a, b in zip(fused.params, loop.params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_fused_univariate_em_in_float32_agrees_with_float64():
    x = series(dtype=torch.float32)
    w = torch.ones(x.shape[:2], dtype=x.dtype)
    fused32, _ = both(x, w, 3, 2, "full")
    fused64, _ = both(x.double(), w.double(), 3, 2, "full")
    assert fused32 is not None
    torch.testing.assert_close(fused32.params.means.double(), fused64.params.means, rtol=1e-4, atol=1e-4)


def test_fused_univariate_em_leaves_what_it_does_not_handle_to_the_loop():
    x = series(b=1)
    w = torch.ones(x.shape[:2], dtype=x.dtype)
    members, init = start(x, w, 3, 1, "full")
    masked = init._replace(log_weights=init.log_weights.clone())
    masked.log_weights[..., 2] = -torch.inf  # a masked component (model selection): the loop's case
    assert run_univariate(members, masked, "full", 1e-3, 100) is None
    nan = init._replace(means=torch.full_like(init.means, torch.nan))
    assert run_univariate(members, nan, "full", 1e-3, 100) is None
    # float32: a tight component far from the centre exceeds the expansion's limit
    x32 = x.float()
    members32, init32 = start(x32, w.float(), 3, 1, "full")
    tight = init32._replace(means=init32.means.clone(), prec_chol=init32.prec_chol.clone())
    tight.means[..., 0, 0], tight.prec_chol[..., 0, 0, 0] = 3.0, 1e3
    assert run_univariate(members32, tight, "full", 1e-3, 100) is None


def test_fit_runs_the_fused_path_for_small_univariate_problems_and_gives_the_loops_result(monkeypatch):
    import torchgmm.fitting as fitting

    x = series(b=2, n=60)
    calls = []
    real = fitting.run_univariate
    monkeypatch.setattr(fitting, "run_univariate", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = torchgmm.fit(x, 3, n_init=2, random_state=0, tol=1e-6)
    single = torchgmm.fit(x, 3, random_state=0, tol=1e-6)
    assert len(calls) == 2
    monkeypatch.setattr(fitting, "FUSED_MAX_WORK", 0)
    loop = torchgmm.fit(x, 3, n_init=2, random_state=0, tol=1e-6)
    assert len(calls) == 2
    # (restarts that reach the same optimum up to label order may be chosen either way: compare bounds)
    torch.testing.assert_close(fused.restart_lower_bounds, loop.restart_lower_bounds, rtol=1e-12, atol=1e-12)
    fused, loop = single, torchgmm.fit(x, 3, random_state=0, tol=1e-6)
    torch.testing.assert_close(fused.means, loop.means, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fused.lower_bound, loop.lower_bound, rtol=1e-12, atol=1e-12)
    assert torch.equal(fused.n_iter, loop.n_iter) and torch.equal(fused.status, loop.status)
    assert FUSED_MAX_WORK >= 50 * 3  # the bundled series takes it


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_univariate_quadratic_and_m_step_equal_the_general_ones(cov_type):
    cov = get_covariance(cov_type)
    gen = torch.Generator().manual_seed(1)
    b, k = 4, 3
    x = torch.randn(b, 1, 40, 1, generator=gen, dtype=torch.float64)
    w = torch.rand(b, 1, 40, generator=gen, dtype=torch.float64)
    var = torch.rand(b, 1, k, generator=gen, dtype=torch.float64) + 0.2
    if cov_type == "tied":
        var = var[..., :1]
    mu = torch.randn(b, 1, k, generator=gen, dtype=torch.float64)
    log_w = torch.log_softmax(torch.randn(b, 1, k, generator=gen, dtype=torch.float64), -1)
    prec_chol, _ = cov.prec_chol_from_covariance(var.reshape(b, 1, *cov.covariance_shape(k, 1)), torch.zeros(b, 1, dtype=torch.float64))
    params = GMMParams(log_w, mu.unsqueeze(-1), prec_chol)
    c0, c1, c2 = univariate_quadratic(log_w, mu, var)
    coef = torch.stack(torch.broadcast_tensors(c0, c1, c2), -1)
    torch.testing.assert_close(coef, univariate_coefficients(params, cov), rtol=1e-12, atol=1e-12)
    stats = univariate_statistics(x, w, params, cov)
    reg = torch.full((b, 1), 1e-6, dtype=torch.float64)
    general, ok = m_step(stats, params.means, cov, reg)
    assert bool(ok.all())
    # raw moments of the same responsibilities
    s0 = stats.nk
    s1 = stats.sum_diff.squeeze(-1) + s0 * mu
    scatter = stats.scatter.reshape(b, 1, k)  # sum r (x - mu)^2 (every type keeps it per component)
    s2 = scatter + 2 * mu * s1 - mu.square() * s0
    log_w1, mu1, var1 = univariate_m_step(s0, s1, s2, mu, cov, reg.unsqueeze(-1))
    torch.testing.assert_close(log_w1, general.log_weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mu1, general.means.squeeze(-1), rtol=1e-10, atol=1e-12)
    general_var = cov.covariance_from_prec_chol(general.prec_chol).reshape(var1.shape)
    torch.testing.assert_close(var1, general_var, rtol=1e-10, atol=1e-12)
