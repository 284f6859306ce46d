"""Sufficient statistics and the M-step (``torchgmm/stats.py``): additive over chunks of points,
taken about any reference means with the same M-step, scikit-learn's M-step from the same
responsibilities for every covariance type, hard partitions, and float32 at a large offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.mixture._gaussian_mixture import _compute_precision_cholesky, _estimate_gaussian_parameters

from torchgmm.covariance import get_covariance
from torchgmm.density import GMMParams, log_prob, responsibilities
from torchgmm.stats import (
    Stats,
    chunked_sum,
    e_step_statistics,
    m_step,
    params_from_responsibilities,
    partition_statistics,
    point_chunks,
    statistics,
)
from conftest import COV_TYPES

FAST = settings(derandomize=True, database=None, deadline=None, max_examples=30)
F64 = torch.float64
K, D, N = 3, 2, 60


def data(seed: int = 0, n: int = N, d: int = D, batch: tuple = (), offset: float = 0.0) -> torch.Tensor:
    """Points from three correlated clusters, ``(*batch, n, d)``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (K, d))
    labels = rng.integers(0, K, (*batch, n))
    x = centres[labels] + rng.normal(size=(*batch, n, d)) @ rng.normal(size=(d, d))
    return torch.tensor(x + offset)


def params_for(x: torch.Tensor, cov_type: str, seed: int = 0, k: int = K) -> GMMParams:
    """Plausible parameters for ``x (*B, N, D)``: means on data points, unit-ish covariances."""
    gen = torch.Generator().manual_seed(seed)
    cov = get_covariance(cov_type)
    batch, d = x.shape[:-2], x.shape[-1]
    picks = torch.randint(0, x.shape[-2], (*batch, k), generator=gen)
    means = torch.gather(x, -2, picks.unsqueeze(-1).expand(*batch, k, d))
    shape = tuple(batch) + cov.covariance_shape(k, d)
    variances = torch.rand(*shape, generator=gen, dtype=F64) + 0.5
    covariance = torch.diag_embed(variances.diagonal(dim1=-2, dim2=-1)) if cov_type in ("full", "tied") else variances
    prec_chol, _ = cov.prec_chol_from_covariance(covariance, torch.zeros(batch, dtype=F64))
    log_weights = torch.log_softmax(torch.randn(*batch, k, generator=gen, dtype=F64), -1)
    return GMMParams(log_weights, means, prec_chol)


def random_resp(seed: int, n: int = N, k: int = K) -> np.ndarray:
    """Responsibilities ``(N, K)`` in scikit-learn's layout, rows summing to one."""
    return np.random.default_rng(seed).dirichlet(np.full(k, 0.7), n)


def stats_from_resp(x: torch.Tensor, resp_nk: np.ndarray, ref: torch.Tensor, cov_type: str) -> Stats:
    """Statistics of ``x (N, D)`` with responsibilities ``(N, K)`` about ``ref (K, D)``."""
    diff = x.unsqueeze(-3) - ref.unsqueeze(-2)  # (K, N, D)
    return statistics(diff, torch.tensor(resp_nk, dtype=x.dtype).T, get_covariance(cov_type))


def assert_same_params(a: GMMParams, b: GMMParams, rtol: float, atol: float) -> None:
    for name, ta, tb in zip(GMMParams._fields, a, b):
        torch.testing.assert_close(ta, tb, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_same_stats(a: Stats, b: Stats, rtol: float = 1e-12, atol: float = 1e-10) -> None:
    for name, ta, tb in zip(Stats._fields, a, b):
        torch.testing.assert_close(ta, tb, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


REG = torch.tensor(1e-6, dtype=F64)


# -- additivity ------------------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 2**16), cov_type=st.sampled_from(COV_TYPES), n=st.integers(1, 80), chunk=st.integers(1, 90))
def test_e_step_statistics_summed_over_chunks_equal_one_pass(seed, cov_type, n, chunk):
    x = data(seed, n=n, batch=(2,))
    w = torch.rand(2, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    params = params_for(data(seed + 1, batch=(2,)), cov_type, seed)
    one_pass = e_step_statistics(x, w, params, cov_type)
    chunked = chunked_sum(lambda xc, wc: e_step_statistics(xc, wc, params, cov_type), x, w, chunk)
    assert_same_stats(chunked, one_pass)


def test_chunked_sum_hands_each_chunk_its_own_per_point_tensors():
    x = data(1)
    w = torch.ones(N, dtype=F64)
    labels = torch.arange(N) % K
    centres = torch.zeros(K, D, dtype=F64)
    whole = partition_statistics(x, w, labels, centres, "diag")
    chunked = chunked_sum(lambda xc, wc, lc: partition_statistics(xc, wc, lc, centres, "diag"), x, w, 7, labels)
    assert_same_stats(chunked, whole)


@FAST
@given(n=st.integers(1, 200), chunk=st.one_of(st.none(), st.integers(1, 250)))
def test_point_chunks_cover_every_point_once_in_order(n, chunk):
    slices = point_chunks(n, chunk)
    covered = [i for s in slices for i in range(n)[s]]
    assert covered == list(range(n))
    if chunk is None or chunk >= n:
        assert len(slices) == 1
    else:
        assert all(len(range(n)[s]) <= chunk for s in slices)


def test_zero_weight_points_contribute_nothing(cov_type):
    x = data(2)
    keep = torch.rand(N, generator=torch.Generator().manual_seed(2)) > 0.4
    params = params_for(x, cov_type, 2)
    padded = e_step_statistics(x, keep.to(F64), params, cov_type)
    dropped = e_step_statistics(x[keep], torch.ones(int(keep.sum()), dtype=F64), params, cov_type)
    assert_same_stats(padded, dropped)


def test_e_step_log_lik_is_the_weighted_log_likelihood_of_the_parameters(cov_type):
    x = data(3)
    w = torch.rand(N, generator=torch.Generator().manual_seed(3), dtype=F64) * 2
    params = params_for(x, cov_type, 3)
    stats = e_step_statistics(x, w, params, cov_type)
    torch.testing.assert_close(stats.log_lik, (w * log_prob(x, params, cov_type)).sum(), rtol=1e-13, atol=0)
    torch.testing.assert_close(stats.nk, (w.unsqueeze(-1) * responsibilities(x, params, cov_type)).sum(0), rtol=1e-13, atol=0)


# -- the M-step against scikit-learn ----------------------------------------------------------------
def sklearn_m_step(x: np.ndarray, resp_nk: np.ndarray, cov_type: str, reg: float):
    nk, means, covariances = _estimate_gaussian_parameters(x, resp_nk, reg, cov_type)
    return nk / nk.sum(), means, _compute_precision_cholesky(covariances, cov_type)


def assert_equals_sklearn(params: GMMParams, expected, rtol: float = 1e-10) -> None:
    weights, means, prec_chol = expected
    np.testing.assert_allclose(params.log_weights.exp().numpy(), weights, rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(params.means.numpy(), means, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(params.prec_chol.numpy(), prec_chol, rtol=rtol, atol=1e-12)


def test_m_step_equals_scikit_learns_from_the_same_responsibilities(cov_type):
    x, resp = data(4), random_resp(4)
    ref = torch.tensor(np.random.default_rng(4).normal(0, 3, (K, D)))  # any reference
    params, ok = m_step(stats_from_resp(x, resp, ref, cov_type), ref, cov_type, REG)
    assert bool(ok)
    assert_equals_sklearn(params, sklearn_m_step(x.numpy(), resp, cov_type, float(REG)))


def test_one_em_step_equals_scikit_learns_e_step_then_m_step(cov_type):
    x = data(5)
    params = params_for(x, cov_type, 5)
    stats = e_step_statistics(x, torch.ones(N, dtype=F64), params, cov_type)
    new, ok = m_step(stats, params.means, cov_type, REG)
    resp = responsibilities(x, params, cov_type).numpy()  # (N, K), as scikit-learn's E-step
    assert bool(ok)
    assert_equals_sklearn(new, sklearn_m_step(x.numpy(), resp, cov_type, float(REG)))


def test_params_from_responsibilities_with_integer_weights_equals_scikit_learn_on_repeated_points(cov_type):
    x, resp = data(6), random_resp(6)
    counts = np.random.default_rng(6).integers(0, 4, N)  # 0: a padding point
    params, ok = params_from_responsibilities(x, torch.tensor(counts, dtype=F64), torch.tensor(resp).T, cov_type, REG)
    assert bool(ok)
    repeated = sklearn_m_step(np.repeat(x.numpy(), counts, 0), np.repeat(resp, counts, 0), cov_type, float(REG))
    assert_equals_sklearn(params, repeated)


def test_m_step_of_a_batch_with_per_member_reg_covar_equals_each_member_alone(cov_type):
    x = data(7, batch=(3,))
    params = params_for(x, cov_type, 7)
    reg = torch.tensor([1e-6, 1e-2, 1.0], dtype=F64)
    stats = e_step_statistics(x, torch.ones(3, N, dtype=F64), params, cov_type)
    batched, ok = m_step(stats, params.means, cov_type, reg)
    assert ok.tolist() == [True] * 3
    for b in range(3):
        alone, _ = m_step(Stats(*(t[b] for t in stats)), params.means[b], cov_type, reg[b])
        assert_same_params(batched.map(lambda t: t[b]), alone, rtol=1e-13, atol=1e-13)


def test_an_empty_component_keeps_the_reference_mean_reg_covar_and_a_vanishing_weight(cov_type):
    x, resp = data(8), random_resp(8)
    resp[:, 2] = 0.0  # component 2 owns no point
    resp /= resp.sum(1, keepdims=True)
    ref = torch.tensor(np.random.default_rng(8).normal(0, 3, (K, D)))
    reg = torch.tensor(1e-3, dtype=F64)
    params, ok = m_step(stats_from_resp(x, resp, ref, cov_type), ref, cov_type, reg)
    assert bool(ok) and all(bool(torch.isfinite(t).all()) for t in params)
    assert float(params.log_weights.exp()[2]) < 1e-12
    torch.testing.assert_close(params.means[2], ref[2], rtol=0, atol=1e-12)
    if cov_type != "tied":  # tied pools the other components' scatter
        variances = get_covariance(cov_type).full_covariance(params.prec_chol, K, D)[2].diagonal()
        torch.testing.assert_close(variances, torch.full((D,), 1e-3, dtype=F64), rtol=1e-9, atol=0)


# -- shifted statistics ----------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 2**16), cov_type=st.sampled_from(COV_TYPES), distance=st.floats(0.0, 1e3))
def test_statistics_about_any_reference_give_the_same_m_step(seed, cov_type, distance):
    x, resp = data(seed, offset=50.0), random_resp(seed)
    rng = np.random.default_rng(seed)
    near = torch.tensor(resp.T @ x.numpy() / resp.sum(0)[:, None])  # the new means themselves
    far = near + torch.tensor(rng.normal(0, 1, (K, D)) * distance)
    a, ok_a = m_step(stats_from_resp(x, resp, near, cov_type), near, cov_type, REG)
    b, ok_b = m_step(stats_from_resp(x, resp, far, cov_type), far, cov_type, REG)
    assert bool(ok_a) and bool(ok_b)
    assert_same_params(a, b, rtol=1e-10, atol=1e-10 * (1 + distance))


def two_pass_covariances(x: np.ndarray, resp: np.ndarray, cov_type: str) -> np.ndarray:
    """The maximum-likelihood covariances in ``cov_type``'s shape, centred on the new means first
    (float64; scikit-learn's diag, tied and spherical estimates use one-pass sums, which lose
    digits at an offset of 1e6 even in float64)."""
    nk = resp.sum(0)
    means = resp.T @ x / nk[:, None]
    centred = x[None] - means[:, None]  # (K, N, D)
    full = np.einsum("nk,knd,kne->kde", resp, centred, centred) / nk[:, None, None]
    return {
        "full": full,
        "tied": (full * nk[:, None, None]).sum(0) / nk.sum(),
        "diag": np.diagonal(full, axis1=-2, axis2=-1),
        "spherical": np.diagonal(full, axis1=-2, axis2=-1).mean(-1),
    }[cov_type]


def test_float32_at_offset_1e6_keeps_the_covariance_to_a_few_digits(cov_type):
    """About the previous means the covariance is a small correction of a centred scatter; the
    one-pass ``E[xx^T] - mu mu^T`` loses every digit here (checked below, so the test can tell)."""
    x = (data(9, n=400) * 0.5 + 1e6).float()
    exact = x.double().numpy()  # float64 on exactly the float32 numbers
    resp = random_resp(9, n=400)
    expected = two_pass_covariances(exact, resp, cov_type)
    nk = resp.sum(0)
    previous_means = torch.tensor(resp.T @ exact / nk[:, None]).float() + 0.25  # one EM step behind
    params, ok = m_step(stats_from_resp(x, resp, previous_means, cov_type), previous_means, cov_type, torch.tensor(0.0))
    assert params.means.dtype == torch.float32 and bool(ok)
    ours = get_covariance(cov_type).covariance_from_prec_chol(params.prec_chol).double().numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # the cancellation the shifted statistics avoid: the one-pass variance in float32
    r = torch.tensor(resp.T, dtype=torch.float32)  # (K, N)
    naive = (r @ x.square()) / r.sum(-1, keepdim=True) - ((r @ x) / r.sum(-1, keepdim=True)).square()
    assert np.abs(naive.double().numpy() - two_pass_covariances(exact, resp, "diag")).max() > 0.1


# -- hard partitions ---------------------------------------------------------------------------------
def test_partition_statistics_equal_statistics_of_one_hot_responsibilities(cov_type):
    x = data(10, batch=(2,))
    gen = torch.Generator().manual_seed(10)
    labels = torch.randint(0, K - 1, (2, N), generator=gen)  # component K-1 stays empty
    w = torch.rand(2, N, generator=gen, dtype=F64)
    centres = torch.randn(2, K, D, generator=gen, dtype=F64)
    one_hot = torch.nn.functional.one_hot(labels, K).to(F64).mT * w.unsqueeze(-2)  # (2, K, N)
    expected = statistics(x.unsqueeze(-3) - centres.unsqueeze(-2), one_hot, get_covariance(cov_type))
    ours = partition_statistics(x, w, labels, centres, cov_type)
    assert_same_stats(ours, expected, rtol=1e-13, atol=1e-13)
    assert bool((ours.nk[:, K - 1] == 0).all())


@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_univariate_statistics_equal_the_difference_based_e_step(cov_type, dtype):
    """The univariate fast path (two matrix products) gives the statistics of e_step_statistics,
    restarts folded into one product, and float32 stays within float32 rounding."""
    from torchgmm.init import initialize, make_generator
    from torchgmm.stats import e_step_statistics, univariate_statistics

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 80, 1, dtype=torch.float64, generator=gen) * 3 + 2)
    w = torch.rand(3, 80, dtype=torch.float64, generator=gen)
    params, _ = initialize(x, w, 3, 4, "kmeans", cov_type, torch.full((3,), 1e-6, dtype=torch.float64), make_generator(1))
    ref = e_step_statistics(x.unsqueeze(1), w.unsqueeze(1), params, cov_type)
    fast = univariate_statistics(x.to(dtype).unsqueeze(1), w.to(dtype).unsqueeze(1), params.map(lambda t: t.to(dtype)), cov_type)
    tol = dict(rtol=1e-10, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-3)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("cov_type", ["full", "tied"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("folded", [True, False])
@pytest.mark.parametrize("form", ["whitened_statistics", "quadratic_statistics"])
def test_whitened_statistics_equal_the_difference_based_e_step(cov_type, dtype, folded, form):
    """The whitened path (one product per series for every component of every restart, statistics
    in whitened coordinates mapped back) and the quadratic one (features [1, x, x_i x_j] times the
    log-density's coefficients, the statistics from the same features) give e_step_statistics'
    numbers: restarts sharing the data (folded) or each member with its own rows."""
    import torchgmm.stats as stats
    from torchgmm.init import initialize, make_generator
    from torchgmm.stats import e_step_statistics

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 120, 4, dtype=torch.float64, generator=gen) @ torch.randn(4, 4, dtype=torch.float64, generator=gen)
    x[:, :40] += 3.0
    w = torch.rand(3, 120, dtype=torch.float64, generator=gen)
    params, _ = initialize(x, w, 3, 4, "kmeans", cov_type, torch.full((3,), 1e-6, dtype=torch.float64), make_generator(2))
    xb, wb = (x.unsqueeze(1), w.unsqueeze(1)) if folded else (x.unsqueeze(1).expand(3, 4, 120, 4), w.unsqueeze(1).expand(3, 4, 120))
    ref = e_step_statistics(xb, wb, params, cov_type)
    fast = getattr(stats, form)(xb.to(dtype), wb.to(dtype), params.map(lambda t: t.to(dtype)), cov_type)
    tol = dict(rtol=1e-10, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    for name, a, b in zip(ref._fields, fast, ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, **tol)


def test_whitened_statistics_in_float32_fall_back_where_the_product_would_cancel_digits():
    """A tight component far from the series' centre (|mu U| large) sends float32 to the
    difference-based E-step: the scatter keeps its digits."""
    from torchgmm.density import GMMParams
    from torchgmm.stats import e_step_statistics, whitened_statistics

    gen = torch.Generator().manual_seed(0)
    x = (100 + 1e-2 * torch.randn(1, 200, 3, dtype=torch.float64, generator=gen)).float().double()  # |mu U| ~ 2e4
    w = torch.ones(1, 200, dtype=torch.float64)
    means = x.mean(1, keepdim=True).expand(1, 2, 3).float().double()
    params = GMMParams(torch.log(torch.full((1, 2), 0.5, dtype=torch.float64)), means,
                       torch.eye(3, dtype=torch.float64).expand(1, 2, 3, 3) * 100)
    ref = e_step_statistics(x, w, params, "full")  # float64, on the same float32 numbers
    fast = whitened_statistics(x.float(), w.float(), params.map(lambda t: t.float()), "full")
    # the product U^T x - U^T mu would lose ~1e-3 of the scatter here; the differences keep ~1e-6
    torch.testing.assert_close(fast.scatter.double(), ref.scatter, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_univariate_statistics_at_points_where_every_component_underflows(dtype):
    """Points hundreds of standard deviations from every component: exp underflows for all of
    them, the exact logsumexp takes over for those points only (log-likelihood and
    responsibilities as the difference-based E-step)."""
    from torchgmm.density import GMMParams
    from torchgmm.stats import e_step_statistics, univariate_statistics

    x = torch.tensor([[-0.5, 0.1, 0.4, 60.0, -45.0]], dtype=torch.float64).unsqueeze(-1)  # (1, 5, 1)
    w = torch.ones(1, 5, dtype=torch.float64)
    params = GMMParams(torch.log(torch.tensor([[0.3, 0.7]], dtype=torch.float64)),
                       torch.tensor([[[-0.4], [0.3]]], dtype=torch.float64), torch.full((1, 2, 1, 1), 4.0, dtype=torch.float64))
    ref = e_step_statistics(x, w, params, "full")
    fast = univariate_statistics(x.to(dtype), w.to(dtype), params.map(lambda t: t.to(dtype)), "full")
    assert float(ref.log_lik) < -1e4  # the far points dominate: their joints are far below log(tiny)
    tol = dict(rtol=1e-10, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-3)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.double(), b, **tol)


def _mixed_batch():
    """Three rows (series) of two components in float32 numbers, ``(x, w, params)`` in float64:
    row 1 is a tight cluster far from the origin (|mu U| ~ 2e4: the products would cancel digits)."""
    from torchgmm.density import GMMParams

    g = torch.Generator().manual_seed(1)
    tight = 100 + 1e-2 * torch.randn(1, 200, 3, dtype=torch.float64, generator=g)
    loose = torch.randn(2, 200, 3, dtype=torch.float64, generator=g)
    x = torch.cat([loose[:1], tight, loose[1:]]).float().double()
    w = torch.ones(3, 200, dtype=torch.float64)
    means = x.mean(1, keepdim=True).expand(3, 2, 3).float().double()
    prec = torch.stack([torch.eye(3), 100 * torch.eye(3), torch.eye(3)]).double().unsqueeze(1).expand(3, 2, 3, 3)
    return x, w, GMMParams(torch.log(torch.full((3, 2), 0.5, dtype=torch.float64)), means, prec)


@pytest.mark.parametrize("form", ["whitened_statistics", "quadratic_statistics"])
def test_whitened_statistics_fall_back_per_row_in_a_mixed_batch(form):
    """Only the rows (series with their restarts) whose product would cancel digits take the
    difference form (the quadratic form: a shift about the tight component instead); the others
    keep the fast path; all rows match the float64 reference, the tight row with its digits."""
    import torchgmm.stats as stats
    from torchgmm.stats import e_step_statistics

    x, w, params = _mixed_batch()
    ref = e_step_statistics(x, w, params, "full")
    fast = getattr(stats, form)(x.float(), w.float(), params.map(lambda t: t.float()), "full")
    for a, b in zip(fast, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.scatter[1].double(), ref.scatter[1], rtol=1e-4, atol=0)  # digits kept


def test_univariate_statistics_take_float64_per_row_in_a_mixed_batch():
    """float32: a row with a tight component far from the series' centre runs in float64 (its
    scatter keeps its digits), the other rows stay float32; every row matches the reference."""
    from torchgmm.density import GMMParams
    from torchgmm.stats import e_step_statistics, univariate_statistics

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 200, 1, dtype=torch.float64, generator=g)
    x[1] = 40 + 1e-3 * x[1]  # q mu^2 / 2 ~ 8e8 nats: far beyond the expansion limit
    x = x.float().double()
    w = torch.ones(3, 200, dtype=torch.float64)
    means = x.mean(1, keepdim=True).expand(3, 2, 1).float().double()
    prec = torch.tensor([1.0, 1e3, 1.0], dtype=torch.float64)[:, None, None, None].expand(3, 2, 1, 1)
    params = GMMParams(torch.log(torch.full((3, 2), 0.5, dtype=torch.float64)), means, prec)
    ref = e_step_statistics(x, w, params, "full")
    fast = univariate_statistics(x.float(), w.float(), params.map(lambda t: t.float()), "full")
    for a, b in zip(fast, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.scatter[1].double(), ref.scatter[1], rtol=1e-4, atol=0)


def test_quadratic_coefficients_reduce_to_the_univariate_ones_and_give_the_joint():
    from torchgmm.density import (GMMParams, joint_log_prob, quadratic_coefficients, quadratic_features,
                                  univariate_coefficients)

    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g)
    prec_chol = torch.linalg.cholesky(torch.linalg.inv(a @ a.mT + torch.eye(3)).flip(-1, -2)).flip(-1, -2)  # upper
    params = GMMParams(torch.log_softmax(torch.randn(2, 3, dtype=torch.float64, generator=g), -1),
                       torch.randn(2, 3, 3, dtype=torch.float64, generator=g), prec_chol)
    x = torch.randn(2, 50, 3, dtype=torch.float64, generator=g)
    joint = quadratic_coefficients(params, "full") @ quadratic_features(x.mT)  # (2, 3, 50)
    torch.testing.assert_close(joint, joint_log_prob(x, params, "full"), rtol=1e-12, atol=1e-10)
    one = GMMParams(params.log_weights, params.means[..., :1], prec_chol[..., :1, :1])
    torch.testing.assert_close(quadratic_coefficients(one, "full"), univariate_coefficients(one, "full"), rtol=1e-14, atol=0)


def test_quadratic_statistics_shift_rows_that_would_cancel_and_send_the_rest_to_the_whitened_form(monkeypatch):
    """float32 rows whose expansion would cancel digits (mu^T P mu / 2 beyond the limit) are taken
    about the mean of their least safe component (same numbers: test above); a row with two such
    components apart, and rows with a density too high to exponentiate, take whitened_statistics;
    the other rows stay."""
    import torchgmm.stats as stats
    from torchgmm.stats import e_step_statistics

    sent = []
    real = stats.whitened_statistics
    monkeypatch.setattr(stats, "whitened_statistics", lambda x, *a: sent.append(x.shape[0]) or real(x, *a))
    x, w, params = _mixed_batch()
    stats.quadratic_statistics(x.float(), w.float(), params.map(lambda t: t.float()), "full")
    assert sent == []  # row 1 shifted to its tight component
    apart = params._replace(means=params.means.clone())
    apart.means[1, 1] = -apart.means[1, 1]  # row 1: its two tight components on either side of 0
    fast = stats.quadratic_statistics(x.float(), w.float(), apart.map(lambda t: t.float()), "full")
    assert sent == [1]  # row 1 alone
    for a, b in zip(fast, e_step_statistics(x, w, apart, "full")):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    sent.clear()
    stats.quadratic_statistics(x, w, apart, "full")  # float64: no cancellation guard
    assert sent == []
    huge = params._replace(prec_chol=params.prec_chol * torch.tensor([1.0, 1.0, 1e120], dtype=torch.float64)[:, None, None, None])
    stats.quadratic_statistics(x, w, huge, "full")  # row 2's peak density (log ~830) cannot be exponentiated
    assert sent == [1]
