"""Batched semantics: a batch of fits is the same fits one by one.

A series' result must not depend on which other series share its batch, on its padding, on the
number or shape of batch dims, or on when the other members converge. Initial random draws are
shared across series by design, so a series gets the same initialization alone or in a batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm import FitStatus
from torchgmm.init import INIT_METHODS
from conftest import (
    assert_same_fit,
    blobs,
    index_result,
    sklearn_init,
    solo_result,
    stack_inits,
    status_checked_fit,
)

N_SERIES = 5
SETTINGS = dict(tol=1e-6, max_iter=500)


def batch_of_blobs(n_series: int = N_SERIES, n: int = 200, d: int = 2) -> torch.Tensor:
    """``(n_series, n, d)``: each series its own clusters, overlapping enough that the series
    need different numbers of iterations."""
    return torch.stack([torch.tensor(blobs(seed, n=n, d=d, overlap=1.0)) for seed in range(n_series)])


def assert_batch_equals_solo(batched, solo_fits, indices) -> None:
    for index, solo in zip(indices, solo_fits):
        assert_same_fit(index_result(batched, index), solo_result(solo), what=f"series {index}: ")


def test_batch_equals_solo_fits_with_given_init(cov_type):
    x = batch_of_blobs()
    inits = [sklearn_init(s.numpy(), 3, cov_type) for s in x]
    batched = torchgmm.fit(x, 3, covariance_type=cov_type, **stack_inits(inits), **SETTINGS)
    solos = [torchgmm.fit(s, 3, covariance_type=cov_type, **init, **SETTINGS) for s, init in zip(x, inits)]

    assert batched.batch_shape == (N_SERIES,)
    assert_batch_equals_solo(batched, solos, range(N_SERIES))


def test_batch_equals_solo_fits_with_default_kmeans_init(cov_type):
    x = batch_of_blobs()
    batched = torchgmm.fit(x, 3, covariance_type=cov_type, random_state=0, **SETTINGS)
    solos = [torchgmm.fit(s, 3, covariance_type=cov_type, random_state=0, **SETTINGS) for s in x]

    assert_batch_equals_solo(batched, solos, range(N_SERIES))


def test_converged_members_stop_changing_while_others_iterate(cov_type):
    x = batch_of_blobs()
    batched = torchgmm.fit(x, 3, covariance_type=cov_type, random_state=0, **SETTINGS)

    n_iter = batched.n_iter.tolist()
    assert len(set(n_iter)) > 1, f"the batch should need different iteration counts, got {n_iter}"
    assert bool(batched.converged.all())
    history = batched.lower_bounds
    for i, n in enumerate(n_iter):
        assert torch.isfinite(history[i, :n]).all()
        assert torch.isnan(history[i, n:]).all(), f"series {i} kept iterating after converging at {n}"
        # converged: the last step changed the lower bound by less than tol (sklearn's rule)
        assert abs(float(history[i, n - 1] - history[i, n - 2])) < SETTINGS["tol"]
    # and a member that stopped early equals its solo fit (it was not advanced with the others)
    first = int(np.argmin(n_iter))
    solo = torchgmm.fit(x[first], 3, covariance_type=cov_type, random_state=0, **SETTINGS)
    assert_same_fit(index_result(batched, first), solo_result(solo))


def test_multiple_batch_dims_equal_flat_batch_and_solo_fits(cov_type):
    x = batch_of_blobs(6, n=150).reshape(2, 3, 150, 2)
    nested = torchgmm.fit(x, 3, covariance_type=cov_type, random_state=1, **SETTINGS)
    flat = torchgmm.fit(x.reshape(6, 150, 2), 3, covariance_type=cov_type, random_state=1, **SETTINGS)

    assert nested.batch_shape == (2, 3)
    assert nested.params.means.shape == (2, 3, 3, 2)
    assert nested.lower_bounds.shape == (2, 3, SETTINGS["max_iter"])
    for i in range(2):
        for j in range(3):
            assert_same_fit(index_result(nested, (i, j)), index_result(flat, 3 * i + j), what=f"series {(i, j)}: ")
    solo = torchgmm.fit(x[1, 2], 3, covariance_type=cov_type, random_state=1, **SETTINGS)
    assert_same_fit(index_result(nested, (1, 2)), solo_result(solo))


def test_init_without_batch_dims_is_broadcast_to_every_series(cov_type):
    x = batch_of_blobs(3).reshape(3, 200, 2)
    init = sklearn_init(x[0].numpy(), 3, cov_type)
    # series 0's start collapses a component of some other series, depending on the type: the
    # DegenerateWarning each call emits is checked against the statuses it returns
    batched = status_checked_fit(x, 3, covariance_type=cov_type, **init, **SETTINGS)
    solos = [status_checked_fit(s, 3, covariance_type=cov_type, **init, **SETTINGS) for s in x]

    assert_batch_equals_solo(batched, solos, range(3))


def test_restarts_keep_the_best_restart(cov_type):
    x = batch_of_blobs(3)
    n_init = 6
    result = torchgmm.fit(x, 3, covariance_type=cov_type, n_init=n_init, init_params="random_from_data", random_state=0, **SETTINGS)

    restart_lb = result.restart_lower_bounds
    assert restart_lb.shape == (3, n_init)
    assert bool((result.status == FitStatus.OK).all())  # every restart clean: plain max
    torch.testing.assert_close(result.lower_bound, restart_lb.max(-1).values, rtol=0, atol=0)
    # the kept restart is a best one (restarts at the same optimum may tie to the last digit)
    torch.testing.assert_close(restart_lb.gather(-1, result.best_restart.unsqueeze(-1)).squeeze(-1), restart_lb.max(-1).values, rtol=0, atol=0)
    assert bool((restart_lb.max(-1).values - restart_lb.min(-1).values > 1e-3).any()), (
        "restarts should disagree somewhere, else this test proves nothing"
    )
    # the kept parameters belong to the kept lower bound: its history ends on it, and the final
    # parameters score within tol of it (lower_bound is the value before the last M-step)
    last = result.lower_bounds.gather(-1, (result.n_iter - 1).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(last, result.lower_bound, rtol=0, atol=0)
    final_ll = torchgmm.log_prob(x, result.params, cov_type).mean(-1)
    assert bool(((final_ll - result.lower_bound).abs() < 10 * SETTINGS["tol"]).all())


def test_restarts_in_a_batch_equal_restarts_solo(cov_type):
    x = batch_of_blobs(3)
    settings = dict(covariance_type=cov_type, n_init=4, init_params="k-means++", random_state=3, **SETTINGS)
    batched = torchgmm.fit(x, 3, **settings)
    solos = [torchgmm.fit(s, 3, **settings) for s in x]

    assert_batch_equals_solo(batched, solos, range(3))
    for i, solo in enumerate(solos):
        torch.testing.assert_close(batched.restart_lower_bounds[i], solo.restart_lower_bounds, rtol=1e-9, atol=1e-9)


PADDINGS = {
    "huge": lambda n, d, rng: np.full((n, d), 1e200),
    "noise": lambda n, d, rng: rng.normal(50.0, 30.0, (n, d)),
    "zeros": lambda n, d, rng: np.zeros((n, d)),
}


def padded_batch(series: list[np.ndarray], length: int, padding: str, seed: int = 0):
    """Ragged ``series`` padded at the end to ``length`` with ``padding``; weights 0 on padding."""
    rng = np.random.default_rng(seed)
    d = series[0].shape[1]
    x = np.stack([np.concatenate([s, PADDINGS[padding](length - len(s), d, rng)]) for s in series])
    w = np.stack([np.r_[np.ones(len(s)), np.zeros(length - len(s))] for s in series])
    return torch.tensor(x), torch.tensor(w)


@pytest.mark.parametrize("padding", PADDINGS)
def test_ragged_series_by_zero_weight_padding_equal_unpadded_fits(cov_type, padding):
    series = [blobs(seed, n=n, d=2, overlap=1.0) for seed, n in ((0, 60), (1, 140), (2, 100))]
    solos = [torchgmm.fit(torch.tensor(s), 3, covariance_type=cov_type, random_state=0, **SETTINGS) for s in series]
    for length in (140, 200):  # different padded lengths, including one series with no padding
        x, w = padded_batch(series, length, padding)
        batched = torchgmm.fit(x, 3, covariance_type=cov_type, sample_weight=w, random_state=0, **SETTINGS)
        assert torch.isfinite(batched.params.means).all()
        assert_batch_equals_solo(batched, solos, range(3))
        torch.testing.assert_close(batched.n_samples, torch.tensor([60, 140, 100]))


@pytest.mark.parametrize("dtype, huge", [(torch.float64, 1e200), (torch.float32, 1e30)], ids=["float64", "float32"])
def test_huge_padding_does_not_change_the_series_standardization(dtype, huge):
    from torchgmm.units import standardize

    x = torch.tensor(blobs(0, n=100, d=2) * 1e3, dtype=dtype)
    padded = torch.cat([x, torch.full((20, 2), huge, dtype=dtype)])
    w = torch.cat([torch.ones(100, dtype=dtype), torch.zeros(20, dtype=dtype)])
    _, shift, scale, reg = standardize(x[None], torch.ones(1, 100, dtype=dtype), 1e-6)
    _, shift_p, scale_p, reg_p = standardize(padded[None], w[None], 1e-6)

    torch.testing.assert_close(shift_p, shift)
    torch.testing.assert_close(scale_p, scale)  # today: 1.0 instead of ~4e3
    torch.testing.assert_close(reg_p, reg)


@pytest.mark.parametrize("init_params", INIT_METHODS)
def test_ragged_series_equal_unpadded_fits_for_every_init_method(init_params):
    series = [blobs(seed, n=n, d=2, overlap=1.0) for seed, n in ((3, 80), (4, 130))]
    settings = dict(init_params=init_params, n_init=2, random_state=5, **SETTINGS)
    x, w = padded_batch(series, 150, "noise")
    batched = torchgmm.fit(x, 3, sample_weight=w, **settings)
    solos = [torchgmm.fit(torch.tensor(s), 3, **settings) for s in series]

    assert_batch_equals_solo(batched, solos, range(2))


def test_same_random_state_gives_bitwise_identical_results(cov_type):
    x = batch_of_blobs(4)
    settings = dict(covariance_type=cov_type, n_init=3, random_state=123, **SETTINGS)
    first, second = torchgmm.fit(x, 3, **settings), torchgmm.fit(x, 3, **settings)
    from_generator = torchgmm.fit(x, 3, **{**settings, "random_state": torch.Generator().manual_seed(123)})

    for other in (second, from_generator):
        for a, b in zip(first.params, other.params):
            assert torch.equal(a, b)
        for name in ("lower_bound", "n_iter", "status", "restart_lower_bounds", "best_restart"):
            assert torch.equal(getattr(first, name), getattr(other, name)), name
        assert torch.equal(first.lower_bounds.nan_to_num(7.0), other.lower_bounds.nan_to_num(7.0))


def test_different_random_states_give_different_initializations():
    x = batch_of_blobs(1)[0]
    a = torchgmm.fit(x, 3, init_params="random", max_iter=0, random_state=0)
    b = torchgmm.fit(x, 3, init_params="random", max_iter=0, random_state=1)
    assert not torch.equal(a.params.means, b.params.means)


# -- recovery of known parameters ------------------------------------------------------------
def synthetic_univariate(n_series: int, n: int, seed: int):
    """``n_series`` univariate 3-component series with well-separated known parameters."""
    rng = np.random.default_rng(seed)
    means = np.sort(rng.uniform(-1.0, 1.0, (n_series, 1)) + np.array([-8.0, 0.0, 8.0]) + rng.uniform(-1.0, 1.0, (n_series, 3)), -1)
    stds = rng.uniform(0.5, 1.5, (n_series, 3))
    weights = rng.dirichlet([6.0, 6.0, 6.0], n_series)
    weights = 0.15 + 0.55 * weights  # every component at least 15% of the points
    weights /= weights.sum(-1, keepdims=True)
    labels = np.stack([rng.choice(3, n, p=p) for p in weights])
    x = rng.normal(np.take_along_axis(means, labels, -1), np.take_along_axis(stds, labels, -1))
    return x[..., None], means, stds, weights, labels


def test_recovers_known_parameters_of_hundreds_of_series_in_one_call():
    n_series, n = 300, 400
    x, means, stds, weights, labels = synthetic_univariate(n_series, n, seed=11)
    # n_init=3: one k-means++ seeding in a few hundred lands two seeds in one cluster (a local
    # optimum, for scikit-learn too); the best of three restarts is the global one everywhere.
    model = torchgmm.GaussianMixture(3, n_init=3, random_state=0, tol=1e-6, max_iter=500).fit(torch.tensor(x))
    result = model.result_

    assert bool((result.status == FitStatus.OK).all()), result.status_counts()
    order = result.means[..., 0].argsort(-1)
    fitted_means = result.means[..., 0].gather(-1, order).numpy()
    fitted_std = result.covariances[..., 0, 0].gather(-1, order).sqrt().numpy()
    fitted_weights = result.weights.gather(-1, order).numpy()
    counts = np.stack([np.bincount(row, minlength=3) for row in labels])
    # errors within 5 standard errors of each estimate (a wrong M-step is off by far more)
    assert np.all(np.abs(fitted_means - means) < 5 * stds / np.sqrt(counts))
    assert np.all(np.abs(fitted_std / stds - 1) < 5 / np.sqrt(2 * counts))
    assert np.all(np.abs(fitted_weights - weights) < 5 * np.sqrt(weights * (1 - weights) / n))
    # the fit is at least as likely as scikit-learn's, on a sample of the series
    from sklearn.mixture import GaussianMixture

    ours = model.score(torch.tensor(x)).numpy()
    for i in range(0, n_series, 30):
        theirs = GaussianMixture(3, random_state=0, tol=1e-6, max_iter=500).fit(x[i]).score(x[i])
        assert ours[i] >= theirs - 1e-6, f"series {i}: mean log-likelihood {ours[i]} < sklearn's {theirs}"


@pytest.mark.parametrize("init_params", INIT_METHODS)
def test_fit_in_cache_blocks_equals_one_block(init_params, monkeypatch):
    """Initialization and EM run on blocks of members (cache-sized); with blocks of one series
    the fit must be the same as with the whole batch in one block."""
    import sys

    x = batch_of_blobs(n_series=7, d=2)
    settings = dict(n_init=3, random_state=0, init_params=init_params, **SETTINGS)
    one_block = torchgmm.fit(x, 3, **settings)
    monkeypatch.setattr(sys.modules["torchgmm.plan"], "BLOCK_BYTES", 1)  # one series (or member) per block
    many_blocks = torchgmm.fit(x, 3, **settings)
    assert torch.equal(many_blocks.n_iter, one_block.n_iter)
    assert torch.equal(many_blocks.best_restart, one_block.best_restart)
    torch.testing.assert_close(many_blocks.restart_lower_bounds, one_block.restart_lower_bounds, rtol=0, atol=1e-12)
    for name in ("log_weights", "means", "prec_chol"):
        torch.testing.assert_close(getattr(many_blocks.params, name), getattr(one_block.params, name), rtol=0, atol=1e-10)


def test_even_slices_cover_the_rows_in_near_equal_blocks():
    from hypothesis import given, strategies as st

    from torchgmm._ops import even_slices

    @given(st.integers(1, 10_000), st.integers(1, 5_000))
    def check(n, max_size):
        slices = even_slices(n, max_size)
        sizes = [s.stop - s.start for s in slices]
        assert slices[0].start == 0 and slices[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(slices[:-1], slices[1:]))
        assert max(sizes) <= max_size and max(sizes) - min(sizes) <= 1
        assert len(slices) == -(-n // max_size)  # the fewest blocks

    check()
