"""The gradient mode and the objective it shares with EM (torchgmm.gradient).

One promise per test: the shared objective is what EM maximizes (its fixed points have zero
gradient, EM never lowers it), the gradient mode optimizes it per member through the one
log-density, and it reports what EM reports.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm.density import GMMParams, log_prob
from torchgmm.em import EMRule
from torchgmm.gradient import AdamRule, LBFGSRule
from torchgmm.init import initialize, make_generator
from torchgmm.loop import run
from torchgmm.objective import ParamPacker, objective, penalized_params, trace_precision
from torchgmm.units import standardize

COV_TYPES = ("full", "tied", "diag", "spherical")


def clusters(n_series: int, n: int = 240, d: int = 2, k: int = 3, spread: float = 6.0, seed: int = 0) -> torch.Tensor:
    """``(B, n, d)`` float64: ``k`` well-conditioned Gaussian clusters per series (eigenvalues of
    each covariance in [0.3, 1.5]); ``spread`` scales the distance between centres."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_series):
        centres = rng.normal(0.0, spread, (k, d))
        labels = rng.integers(0, k, n)
        pts = np.empty((n, d))
        for j in range(k):
            q, _ = np.linalg.qr(rng.normal(size=(d, d)))
            a = q * rng.uniform(0.55, 1.2, d)
            idx = labels == j
            pts[idx] = centres[j] + rng.normal(size=(idx.sum(), d)) @ a.T
        out.append(pts)
    return torch.tensor(np.stack(out))


def prepared(x: torch.Tensor, cov_type: str, k: int = 3, n_init: int = 1, reg_covar: float = 1e-6, seed: int = 0):
    """Standardized data, weights, per-series reg and a k-means init ``(B, R, ...)``, as fit does."""
    w = torch.ones(x.shape[:2], dtype=x.dtype)
    xs, _, _, reg = standardize(x, w, reg_covar)
    init, _ = initialize(xs, w, k, n_init, "kmeans", cov_type, reg, make_generator(seed))
    return xs, w, reg, init


def run_em(xs, w, init, cov_type, reg, tol, max_iter, *, penalized=False, prior=None):
    """EM on standardized data through the member loop (``penalized``: the exact EM of F)."""
    return run(EMRule(cov_type, penalized=penalized), xs, w, reg, init, tol, max_iter, prior=prior)


def run_gradient(xs, w, init, cov_type, reg, tol, max_iter, *, optimizer="lbfgs", lr=None, chunk_size=None, prior=None):
    """L-BFGS or Adam on standardized data through the member loop."""
    rule = (LBFGSRule if optimizer == "lbfgs" else AdamRule)(cov_type, tol, lr, chunk_size)
    return run(rule, xs, w, reg, init, tol, max_iter, prior=prior)


def objective_grad(xs, w, params: GMMParams, cov_type: str, reg, prior=None) -> torch.Tensor:
    """``dF/dtheta`` per member ``(M, P)`` for flat params ``(M, ...)`` of a single restart."""
    k, d = params.means.shape[-2:]
    packer = ParamPacker(cov_type, k, d)
    theta = packer.pack(params).detach().requires_grad_(True)
    f = objective(xs, w, packer.unpack(theta), cov_type, reg, prior=prior)
    return torch.autograd.grad(f.sum(), theta)[0]


# -- the shared objective ----------------------------------------------------------------------
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_trace_precision_is_trace_of_precision_matrix(cov_type):
    xs, w, reg, init = prepared(clusters(2), cov_type)
    cov = torchgmm.get_covariance(cov_type)
    precision = torch.linalg.inv(cov.full_covariance(init.prec_chol, 3, 2))  # (B, R, K, D, D)
    expected = torch.diagonal(precision, dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(trace_precision(init.prec_chol, cov, 3, 2), expected)


def test_objective_without_penalty_is_mean_log_likelihood_of_the_density():
    xs, w, reg, init = prepared(clusters(3), "full")
    params = init.map(lambda t: t[:, 0])
    expected = log_prob(xs, params, "full").mean(-1)
    torch.testing.assert_close(objective(xs, w, params, "full", torch.zeros(3, dtype=xs.dtype)), expected)
    # and the penalty is the complete-data term -reg/2 tr(P_k), inside the mixture
    tilted = penalized_params(params, "full", reg)
    torch.testing.assert_close(objective(xs, w, params, "full", reg), log_prob(xs, tilted, "full").mean(-1))


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("d", [1, 3, 9])
@pytest.mark.parametrize("with_prior", [False, True])
def test_evaluation_from_one_e_step_equals_autograd_through_the_objective(cov_type, d, with_prior):
    """The gradient mode's value and gradient (one E-step's statistics, EM's Q: Fisher's identity)
    equal autograd through the objective, at random parameters, with padded points, a prior, and
    restarts sharing their series' points (the three E-step forms: univariate, quadratic,
    whitened)."""
    from torchgmm.gradient import _value_and_grad
    from torchgmm.loop import Members
    from torchgmm.prior import make_prior

    cov = torchgmm.get_covariance(cov_type)
    b, r, k = 3, 2, 3
    x = clusters(b, n=80, d=d, k=k, spread=2.0)
    w = torch.ones(x.shape[:2], dtype=x.dtype)
    w[1, 50:] = 0  # padding
    xs, _, _, reg = standardize(x, w, 1e-2)
    prior = make_prior("default", xs, w, k, cov) if with_prior else None
    batch = Members(xs, w, reg, prior, r).batch()  # (B, R) against the data broadcast as (B, 1, N, D)
    packer = ParamPacker(cov, k, d)
    theta = 0.4 * torch.randn(b * r, packer.size, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    f, g = _value_and_grad(theta, batch, packer, None)
    leaf = theta.reshape(b, r, -1).clone().requires_grad_(True)
    ref = objective(batch.x, batch.w, packer.unpack(leaf), cov, batch.reg, batch.prior, w_total=batch.w_total)
    (ref_g,) = torch.autograd.grad(ref.sum(), leaf)
    torch.testing.assert_close(f, -ref.detach().reshape(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(g, -ref_g.reshape(b * r, -1), rtol=0, atol=1e-11)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_em_on_the_objective_never_decreases_it(cov_type):
    xs, w, _, init = prepared(clusters(4, spread=2.0), cov_type)
    reg = torch.full((4,), 0.05, dtype=xs.dtype)  # a penalty large enough to matter
    run = run_em(xs, w, init, cov_type, reg, 0.0, 60, penalized=True)
    steps = run.history.diff(dim=-1)
    assert float(torch.nan_to_num(steps, nan=0.0).min()) >= -1e-12
    # its lower bound is F of the parameters it evaluated
    torch.testing.assert_close(run.history[:, 0], objective(xs, w, init.map(lambda t: t[:, 0]), cov_type, reg))


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("reg_value", [1e-6, 1e-2])
def test_gradient_is_zero_at_em_fixed_point(cov_type, reg_value):
    """EM's update S/n_k + reg I (with the penalized E-step) is a stationary point of F."""
    xs, w, _, init = prepared(clusters(3), cov_type)
    reg = torch.full((3,), reg_value, dtype=xs.dtype)
    run = run_em(xs, w, init, cov_type, reg, 1e-12, 800, penalized=True)
    assert bool(run.converged.all())
    run = run_em(xs, w, run.params.map(lambda t: t.unsqueeze(1)), cov_type, reg, 0.0, 50, penalized=True)
    grad = objective_grad(xs, w, run.params, cov_type, reg)
    assert float(grad.abs().max()) < 1e-8


@pytest.mark.parametrize("cov_type", ["full", "diag", "spherical"])
def test_untilted_em_fixed_point_is_off_by_order_reg(cov_type):
    """scikit-learn's E-step (no tilt) with the same M-step stops O(reg) away from F's stationary
    point: why the shared objective's EM tilts the responsibilities (tied is exempt: its tilt is
    the same for every component)."""
    xs, w, _, init = prepared(clusters(3, spread=2.5), cov_type)
    reg = torch.full((3,), 1e-2, dtype=xs.dtype)
    run = run_em(xs, w, init, cov_type, reg, 0.0, 600)
    grad = objective_grad(xs, w, run.params, cov_type, reg)
    assert float(grad.abs().max()) > 1e-5


def test_prior_term_enters_the_objective():
    from torchgmm.prior import make_prior

    x = clusters(2)
    xs, w, _, init = prepared(x, "full")
    reg = torch.zeros(2, dtype=xs.dtype)  # the prior's M-step is then exactly MAP
    prior = make_prior("default", xs, w, 3, "full")
    run = run_em(xs, w, init, "full", reg, 0.0, 400, prior=prior, penalized=True)
    grad = objective_grad(xs, w, run.params, "full", reg, prior=prior)
    assert float(grad.abs().max()) < 1e-9
    assert float(objective_grad(xs, w, run.params, "full", reg).abs().max()) > 1e-6  # without it: not stationary


# -- the gradient mode ---------------------------------------------------------------------------
@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_gradient_fit_started_at_em_solution_stays_there(cov_type, optimizer):
    xs, w, reg, init = prepared(clusters(3), cov_type)
    em = run_em(xs, w, init, cov_type, reg, 0.0, 400, penalized=True)
    start = em.params.map(lambda t: t.unsqueeze(1))
    run = run_gradient(xs, w, start, cov_type, reg, 1e-10, 50, optimizer=optimizer, lr=1e-3 if optimizer == "adam" else None)
    assert bool(run.converged.all()) and not bool(run.failed.any())
    assert int(run.n_iter.max()) <= 3
    f_em = objective(xs, w, em.params, cov_type, reg)
    torch.testing.assert_close(run.lower_bound, f_em, rtol=0, atol=1e-10)
    for a, b in zip(run.params, em.params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_lbfgs_reaches_em_optimum_from_the_same_start(cov_type):
    xs, w, reg, init = prepared(clusters(4), cov_type)
    em = run_em(xs, w, init, cov_type, reg, 1e-11, 1000, penalized=True)
    run = run_gradient(xs, w, init, cov_type, reg, 1e-11, 300)
    f_em = objective(xs, w, em.params, cov_type, reg)
    assert bool(run.converged.all())
    assert float((f_em - run.lower_bound).max()) <= 1e-6
    # and it needed fewer data passes than EM's E-steps on these easy series? Not promised; but
    # every pass is accounted for: at least one evaluation per iteration plus the start.
    last = run.passes.nan_to_num(-1).amax(-1)
    assert bool((last >= run.n_iter + 1).all())


def test_adam_approaches_the_optimum():
    xs, w, reg, init = prepared(clusters(3), "diag")
    em = run_em(xs, w, init, "diag", reg, 1e-11, 1000, penalized=True)
    run = run_gradient(xs, w, init, "diag", reg, 1e-9, 2000, optimizer="adam", lr=0.02)
    f_em = objective(xs, w, em.params, "diag", reg)
    assert not bool(run.failed.any())
    assert float((f_em - run.lower_bound).max()) <= 1e-3


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_each_member_is_optimized_on_its_own(optimizer):
    """Per-member curvature pairs, step lengths and convergence: a series fitted inside a batch
    (with restarts) gets what it gets alone."""
    x = torch.cat([clusters(2, seed=1), clusters(2, spread=2.0, seed=2)])
    xs, w, reg, init = prepared(x, "full", n_init=2)
    batched = run_gradient(xs, w, init, "full", reg, 1e-8, 150, optimizer=optimizer)
    for b in range(4):
        solo = run_gradient(xs[b : b + 1], w[b : b + 1], init.map(lambda t: t[b : b + 1]), "full", reg[b : b + 1], 1e-8, 150, optimizer=optimizer)
        rows = slice(2 * b, 2 * b + 2)
        assert torch.equal(batched.n_iter[rows], solo.n_iter)
        torch.testing.assert_close(batched.lower_bound[rows], solo.lower_bound, rtol=0, atol=1e-9)
        torch.testing.assert_close(batched.passes[rows], solo.passes, equal_nan=True)
        for a, s in zip(batched.params, solo.params):
            torch.testing.assert_close(a[rows], s, rtol=0, atol=1e-6)


def test_history_passes_and_time_are_recorded():
    xs, w, reg, init = prepared(clusters(3, spread=2.0), "full")
    run = run_gradient(xs, w, init, "full", reg, 1e-6, 100)
    for m in range(3):
        n = int(run.n_iter[m])
        assert bool(torch.isfinite(run.history[m, :n]).all()) and bool(torch.isnan(run.history[m, n:]).all())
        assert bool((run.passes[m, :n].diff() >= 1).all())  # each iteration evaluates at least once
        assert float(run.passes[m, 0]) >= 2  # the start, then the first step
        # L-BFGS with a line search never lowers the objective
        assert float(run.history[m, :n].diff().min()) >= -1e-12
        torch.testing.assert_close(run.history[m, n - 1], run.lower_bound[m])
    t = run.elapsed[torch.isfinite(run.elapsed)]
    assert len(t) == int(run.n_iter.max()) and bool((t.diff() >= 0).all())


def test_max_iter_zero_returns_init():
    xs, w, reg, init = prepared(clusters(2), "diag")
    run = run_gradient(xs, w, init, "diag", reg, 1e-3, 0)
    for a, b in zip(run.params, init):
        torch.testing.assert_close(a, b.reshape(a.shape))
    torch.testing.assert_close(run.lower_bound, objective(xs, w, init.map(lambda t: t[:, 0]), "diag", reg))
    assert int(run.n_iter.max()) == 0 and run.history.shape == (2, 0)


def test_non_finite_member_is_flagged_and_others_are_untouched():
    xs, w, reg, init = prepared(clusters(3), "full")
    broken = init._replace(means=init.means.clone())
    broken.means[1] = torch.nan
    run = run_gradient(xs, w, broken, "full", reg, 1e-8, 100)
    clean = run_gradient(xs[[0, 2]], w[[0, 2]], init.map(lambda t: t[[0, 2]]), "full", reg[[0, 2]], 1e-8, 100)
    assert run.failed.tolist() == [False, True, False]
    assert not bool(run.converged[1])
    torch.testing.assert_close(run.lower_bound[[0, 2]], clean.lower_bound, rtol=0, atol=1e-9)


def test_chunked_evaluation_matches_whole():
    xs, w, reg, init = prepared(clusters(2, spread=2.0), "tied")
    whole = run_gradient(xs, w, init, "tied", reg, 1e-9, 40)
    chunked = run_gradient(xs, w, init, "tied", reg, 1e-9, 40, chunk_size=37)
    torch.testing.assert_close(chunked.lower_bound, whole.lower_bound, rtol=0, atol=1e-9)
    torch.testing.assert_close(chunked.passes, whole.passes, equal_nan=True)


def test_float32_runs():
    xs, w, reg, init = prepared(clusters(2).float(), "full")
    run = run_gradient(xs, w, init, "full", reg, 1e-4, 100)
    assert run.params.means.dtype == torch.float32
    assert bool(run.converged.all()) and not bool(run.failed.any())


def test_fit_with_method_gradient_matches_em():
    x = clusters(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        em = torchgmm.fit(x, 3, tol=1e-10, max_iter=500, random_state=0)
        gd = torchgmm.fit(x, 3, tol=1e-10, max_iter=500, random_state=0, method="gradient")
        adam = torchgmm.fit(x, 3, tol=1e-6, max_iter=500, random_state=0, method="gradient", optimizer="adam", lr=0.02)
    assert gd.method == "gradient"
    assert bool(gd.converged.all()) and gd.status.eq(0).all()
    # fit's EM reports the plain log-likelihood (scikit-learn's EM): the optima agree to O(reg)
    torch.testing.assert_close(gd.lower_bound, em.lower_bound, rtol=0, atol=1e-4)
    torch.testing.assert_close(gd.means, em.means, rtol=0, atol=1e-3)
    assert float((em.lower_bound - adam.lower_bound).max()) < 1e-2
    assert math.isfinite(float(gd.lower_bounds[0, 0]))


# -- the comparison -------------------------------------------------------------------------------
def test_compare_runs_every_method_from_one_start_on_one_objective():
    from torchgmm.compare import compare

    x = clusters(3, spread=2.0, seed=9)
    comp = compare(x, 3, max_iter=300, tol=1e-10)
    assert comp.methods == ("em", "squarem", "lbfgs", "adam")
    assert len(comp.rows) == 3 * 4
    for method in comp.methods:
        values = comp.curves[method][0]
        # the same start: every method's first recorded value is F(init)
        torch.testing.assert_close(values[:, 0], comp.curves["em"][0][:, 0])
    for row in comp.rows:
        assert row["gap"] >= 0 and not row["failed"]
        for g in comp.gaps:
            p = row[f"passes_to_{g:.0e}"]
            assert math.isnan(p) or p >= 1
        if row["gap"] <= 1e-6:
            assert math.isfinite(row["passes_to_1e-06"])
    summary = {e["method"]: e for e in comp.summary()}
    assert summary["lbfgs"]["reached_1e-03"] > 0
    table = comp.to_markdown()
    assert all(m in table for m in comp.methods) and str(comp) == table
    # EM's gap curve against data passes never increases
    grid = torch.arange(1.0, 50.0)
    curve = comp.gap_curve("em", grid)
    assert curve.shape == (3, 49) and bool((curve.diff(dim=-1) <= 1e-15).all())


def test_compare_rejects_unknown_methods():
    from torchgmm.compare import compare

    with pytest.raises(ValueError, match="newton"):
        compare(clusters(1), 2, methods=("em", "newton"))
