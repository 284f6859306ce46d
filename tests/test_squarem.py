"""SQUAREM (torchgmm.squarem): accelerated EM, per member, with a monotonicity safeguard."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchgmm
from torchgmm.em import EMRule
from torchgmm.loop import run
from torchgmm.objective import objective
from torchgmm.squarem import SquaremRule

from test_gradient import COV_TYPES, clusters, prepared, run_em


def run_squarem(xs, w, init, cov_type, reg, tol, max_iter, *, penalized=False):
    """SQUAREM on standardized data through the member loop."""
    return run(SquaremRule(EMRule(cov_type, penalized=penalized)), xs, w, reg, init, tol, max_iter)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_reaches_em_fixed_point_with_fewer_e_steps(cov_type):
    xs, w, reg, init = prepared(clusters(6, spread=2.5, seed=3), cov_type)
    em = run_em(xs, w, init, cov_type, reg, 1e-10, 2000, penalized=True)
    sq = run_squarem(xs, w, init, cov_type, reg, 1e-10, 2000, penalized=True)
    assert bool(sq.converged.all()) and not bool(sq.failed.any())
    f_em = objective(xs, w, em.params, cov_type, reg)
    f_sq = objective(xs, w, sq.params, cov_type, reg)
    # same optimum (SQUAREM lands at least as high: EM stops early on slow series)
    assert float((f_em - f_sq).max()) <= 1e-7
    assert float(sq.n_iter.double().median()) < float(em.n_iter.double().median())
    assert int(sq.n_iter.sum()) < int(em.n_iter.sum())


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_objective_never_decreases(cov_type):
    """The safeguard: an extrapolation that would lower F falls back to the plain EM iterate."""
    xs, w, reg, init = prepared(clusters(6, spread=1.5, seed=4), cov_type)
    sq = run_squarem(xs, w, init, cov_type, reg, 0.0, 90, penalized=True)
    steps = sq.history.diff(dim=-1)
    assert float(torch.nan_to_num(steps, nan=0.0).min()) >= -1e-12
    assert sq.n_iter.max() == 90 and not bool(sq.converged.any())  # tol=0: runs to max_iter E-steps


def test_each_member_runs_its_own_cycle():
    x = torch.cat([clusters(2, seed=5), clusters(2, spread=1.5, seed=6)])
    xs, w, reg, init = prepared(x, "full", n_init=2)
    batched = run_squarem(xs, w, init, "full", reg, 1e-9, 500, penalized=True)
    for b in range(4):
        solo = run_squarem(xs[b : b + 1], w[b : b + 1], init.map(lambda t: t[b : b + 1]), "full", reg[b : b + 1], 1e-9, 500, penalized=True)
        rows = slice(2 * b, 2 * b + 2)
        assert torch.equal(batched.n_iter[rows], solo.n_iter)
        torch.testing.assert_close(batched.lower_bound[rows], solo.lower_bound, rtol=0, atol=1e-10)
        for a, s in zip(batched.params, solo.params):
            torch.testing.assert_close(a[rows], s, rtol=0, atol=1e-8)


def test_max_iter_counts_e_steps_and_passes_are_recorded():
    xs, w, reg, init = prepared(clusters(3, spread=1.5), "diag")
    sq = run_squarem(xs, w, init, "diag", reg, 0.0, 10, penalized=True)
    assert sq.history.shape == (3, 10) and sq.n_iter.tolist() == [10, 10, 10]
    torch.testing.assert_close(sq.passes[0], torch.arange(1.0, 11.0, dtype=xs.dtype))
    assert bool(torch.isfinite(sq.elapsed).all())
    zero = run_squarem(xs, w, init, "diag", reg, 1e-3, 0, penalized=True)
    for a, b in zip(zero.params, init):
        torch.testing.assert_close(a, b.reshape(a.shape))
    torch.testing.assert_close(zero.lower_bound, objective(xs, w, init.map(lambda t: t[:, 0]), "diag", reg))


def test_by_default_accelerates_run_ems_own_map_to_its_fixed_point():
    xs, w, reg, init = prepared(clusters(3, spread=3.0, seed=7), "full")
    em = run_em(xs, w, init, "full", reg, 1e-11, 2000)
    sq = run_squarem(xs, w, init, "full", reg, 1e-11, 2000)
    torch.testing.assert_close(sq.lower_bound, em.lower_bound, rtol=0, atol=1e-8)
    torch.testing.assert_close(sq.params.means, em.params.means, rtol=0, atol=1e-4)


def test_failed_member_keeps_finite_params_and_neighbours_are_untouched():
    xs, w, reg, init = prepared(clusters(3, spread=2.0), "full")
    broken = init._replace(means=init.means.clone())
    broken.means[1] = torch.nan
    sq = run_squarem(xs, w, broken, "full", reg, 1e-9, 300)
    clean = run_squarem(xs[[0, 2]], w[[0, 2]], init.map(lambda t: t[[0, 2]]), "full", reg[[0, 2]], 1e-9, 300)
    assert not bool(torch.isfinite(sq.params.means[1]).all())  # the last (given) params, kept
    assert sq.failed.tolist() == [False, True, False]
    torch.testing.assert_close(sq.lower_bound[[0, 2]], clean.lower_bound, rtol=0, atol=1e-10)


def test_fit_with_method_squarem():
    x = clusters(4, spread=2.0, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        em = torchgmm.fit(x, 3, tol=1e-8, max_iter=1000, random_state=0)
        sq = torchgmm.fit(x, 3, tol=1e-8, max_iter=1000, random_state=0, method="squarem")
    assert sq.method == "squarem"
    assert bool(sq.converged.all())
    # the same EM map, accelerated: the same optimum and the same kind of lower bound
    torch.testing.assert_close(sq.lower_bound, em.lower_bound, rtol=0, atol=1e-7)
    torch.testing.assert_close(sq.means, em.means, rtol=0, atol=1e-2)  # EM stops early on flat series
    assert int(sq.n_iter.sum()) < int(em.n_iter.sum())
