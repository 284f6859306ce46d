"""The lean univariate EM rule (``em.UnivariateEMRule``, what ``fit`` runs for small univariate
problems, under the same member loop) gives what the general rule gives from the same start, and
says when a guard fired so that the general rule takes over."""

from __future__ import annotations

import pytest
import torch

import torchgmm
from torchgmm.covariance import get_covariance
from torchgmm.density import GMMParams, univariate_coefficients, univariate_quadratic
from torchgmm.em import EMRule, UnivariateEMRule
from torchgmm.fitting import FUSED_MAX_WORK
from torchgmm.init import initialize, make_generator
from torchgmm.loop import Members, run_members
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


def lean_run(members, init, cov_type, tol=1e-3, max_iter=100):
    """The lean rule's run, or None where it says a guard fired."""
    rule = UnivariateEMRule(cov_type)
    run = run_members(members, init, rule, tol, max_iter)
    return None if rule.tripped() else run


def both(x, w, k, r, cov_type, tol=1e-3, max_iter=100):
    members, init = start(x, w, k, r, cov_type)
    return lean_run(members, init, cov_type, tol, max_iter), run_members(members, init, EMRule(cov_type), tol, max_iter)


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("r", [1, 4])
def test_lean_univariate_rule_equals_the_general_rule(cov_type, r):
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


def test_lean_univariate_rule_stops_at_max_iter_like_the_general_one():
    x = series(b=2)
    w = torch.ones(x.shape[:2], dtype=x.dtype)
    fused, loop = both(x, w, 3, 2, "full", tol=0.0, max_iter=7)
    assert fused.n_iter.tolist() == loop.n_iter.tolist() == [7] * 4
    assert not bool(fused.converged.any())
    for a, b in zip(fused.params, loop.params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_lean_univariate_rule_in_float32_agrees_with_float64():
    x = series(dtype=torch.float32)
    w = torch.ones(x.shape[:2], dtype=x.dtype)
    fused32, _ = both(x, w, 3, 2, "full")
    fused64, _ = both(x.double(), w.double(), 3, 2, "full")
    assert fused32 is not None
    torch.testing.assert_close(fused32.params.means.double(), fused64.params.means, rtol=1e-4, atol=1e-4)


def test_the_lean_rule_says_when_the_general_rule_must_take_over():
    x = series(b=1)
    w = torch.ones(x.shape[:2], dtype=x.dtype)
    members, init = start(x, w, 3, 1, "full")
    masked = init._replace(log_weights=init.log_weights.clone())
    masked.log_weights[..., 2] = -torch.inf  # a masked component (model selection) stays at weight 0
    kept = lean_run(members, masked, "full", 1e-3, 100)
    assert kept is not None and float(kept.params.log_weights[0, 2]) == -float("inf")
    nan = init._replace(means=torch.full_like(init.means, torch.nan))
    assert lean_run(members, nan, "full", 1e-3, 100) is None
    # float32: a tight component far from the centre exceeds the expansion's limit
    x32 = x.float()
    members32, init32 = start(x32, w.float(), 3, 1, "full")
    tight = init32._replace(means=init32.means.clone(), prec_chol=init32.prec_chol.clone())
    tight.means[..., 0, 0], tight.prec_chol[..., 0, 0, 0] = 3.0, 1e3
    assert lean_run(members32, tight, "full", 1e-3, 100) is None


def test_fit_runs_the_lean_rule_for_small_univariate_problems_and_gives_the_general_result(monkeypatch):
    import torchgmm.fitting as fitting

    x = series(b=2, n=60)
    calls = []
    real = fitting.UnivariateEMRule
    monkeypatch.setattr(fitting, "UnivariateEMRule", lambda *a, **k: calls.append(1) or real(*a, **k))
    lean = torchgmm.fit(x, 3, n_init=2, random_state=0, tol=1e-6)
    single = torchgmm.fit(x, 3, random_state=0, tol=1e-6)
    assert len(calls) == 2
    monkeypatch.setattr(fitting, "FUSED_MAX_WORK", 0)
    general = torchgmm.fit(x, 3, n_init=2, random_state=0, tol=1e-6)
    assert len(calls) == 2
    # (restarts that reach the same optimum up to label order may be chosen either way: compare bounds)
    torch.testing.assert_close(lean.restart_lower_bounds, general.restart_lower_bounds, rtol=1e-12, atol=1e-12)
    lean, general = single, torchgmm.fit(x, 3, random_state=0, tol=1e-6)
    torch.testing.assert_close(lean.means, general.means, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lean.lower_bound, general.lower_bound, rtol=1e-12, atol=1e-12)
    assert torch.equal(lean.n_iter, general.n_iter) and torch.equal(lean.status, general.status)
    assert FUSED_MAX_WORK >= 50 * 3  # the bundled series takes it


def test_univariate_quadratic_equals_the_general_coefficients():
    for cov_type in COV_TYPES:
        cov = get_covariance(cov_type)
        gen = torch.Generator().manual_seed(1)
        b, k = 4, 3
        var = torch.rand(b, 1, k, generator=gen, dtype=torch.float64) + 0.2
        if cov_type == "tied":
            var = var[..., :1]
        mu = torch.randn(b, 1, k, generator=gen, dtype=torch.float64)
        log_w = torch.log_softmax(torch.randn(b, 1, k, generator=gen, dtype=torch.float64), -1)
        prec_chol, _ = cov.prec_chol_from_covariance(var.reshape(b, 1, *cov.covariance_shape(k, 1)), torch.zeros(b, 1, dtype=torch.float64))
        params = GMMParams(log_w, mu.unsqueeze(-1), prec_chol)
        coef = torch.stack(torch.broadcast_tensors(*univariate_quadratic(log_w, mu, var.reciprocal())), -1)
        torch.testing.assert_close(coef, univariate_coefficients(params, cov), rtol=1e-12, atol=1e-12)


def test_a_first_fit_does_not_import_torchs_symbolic_shape_machinery():
    """torch.broadcast_shapes imports sympy on first use (~0.4 s, paid by a fresh process's first
    fit): the eager paths use _ops.broadcast_shapes instead (and the summaries numpy's
    unravel_index, not torch's, which does the same)."""
    import subprocess
    import sys

    code = (
        "import sys, torch, torchgmm\n"
        "torchgmm.fit(torch.randn(40, 200, 1), 3, n_init=2)\n"  # the batched univariate path
        "torchgmm.fit(torch.randn(2, 30, 1), 2)\n"  # the lean rule
        "torchgmm.fit(torch.randn(4, 100, 3), 2, covariance_type='diag')\n"
        "torchgmm.GaussianHMM(2).fit(torch.randn(3, 50, 1))\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "x = torch.randn(3, 40, 1); x[1] = 2.0\n"  # a flagged series: its warning and summary name it
        "torchgmm.GaussianMixture(2).fit(x).summary()\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_broadcast_shapes_agrees_with_torchs():
    from torchgmm._ops import broadcast_shapes

    for shapes in [((2, 1, 3), (4, 1)), ((), (5,)), ((1,), (1, 1, 7)), ((3, 1), (3, 4), (1, 4))]:
        assert broadcast_shapes(*shapes) == torch.broadcast_shapes(*shapes)
    with pytest.raises(RuntimeError, match="do not broadcast"):
        broadcast_shapes((2, 3), (4, 3))


def test_em_runs_in_inference_mode_but_returns_ordinary_tensors():
    """EM fits run under torch.inference_mode (cheaper dispatch); what they return must not be
    inference tensors: users update results in place, and the layer trains its parameters."""
    x = series(b=2, n=60)
    result = torchgmm.fit(x, 3, n_init=2, random_state=0)
    tensors = [result.lower_bound, result.status, result.lower_bounds, result.restart_lower_bounds, *result.params]
    assert not any(t.is_inference() for t in tensors)
    result.means.add_(1.0)  # an inference tensor refuses this outside inference mode
    refined = torchgmm.fit(x, 3, refine=True, random_state=0)
    assert not any(t.is_inference() for t in refined.params)
    gm = torchgmm.GaussianMixture(3, random_state=0).fit(x)
    opt = torch.optim.SGD(gm.parameters(), lr=1e-3)
    loss = -gm(x).mean()
    loss.backward()
    opt.step()  # in-place updates of the fitted parameters
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)
