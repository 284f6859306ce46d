"""Degenerate data: collapsed components, empty and short series, and the bundled 50-point time
series on which a hand-written NumPy EM failed (see docs).

Degenerate inputs never raise in a batch and never poison their neighbours: the series gets a
status (DEGENERATE, EMPTY, INSUFFICIENT_DATA), finite parameters and one summarized
``DegenerateWarning`` per call. A restart that collapsed is not chosen while a clean one exists.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm import DegenerateWarning, FitStatus, FitWarning
from conftest import (
    FEWER_DISTINCT_POINTS,
    REG_COVAR_ABOVE_VARIANCE,
    REPEATED_VALUE,
    assert_same_fit,
    blobs,
    index_result,
    solo_result,
    status_checked_fit,
    warns_each,
)

REG_COVAR = 1e-6


def assert_finite_params(result) -> None:
    for name, t in zip(("log_weights", "means", "prec_chol"), result.params):
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
    assert torch.isfinite(result.covariances).all()


def variances(result) -> torch.Tensor:
    """Per-component diagonal variances ``(*B, K, D)`` whatever the covariance type."""
    cov = torchgmm.get_covariance(result.covariance_type)
    k, d = result.means.shape[-2:]
    return cov.full_covariance(result.params.prec_chol, k, d).diagonal(dim1=-2, dim2=-1)


# -- constant and two-valued series ------------------------------------------------------------
def test_constant_series_stays_finite_and_is_flagged_degenerate(cov_type):
    x = torch.full((50, 2), 3.0, dtype=torch.float64)
    with warns_each((FitWarning, REG_COVAR_ABOVE_VARIANCE), (FitWarning, FEWER_DISTINCT_POINTS),
                    (DegenerateWarning, "DEGENERATE")):
        result = torchgmm.fit(x, 2, covariance_type=cov_type, random_state=0)

    assert result.status == FitStatus.DEGENERATE
    assert_finite_params(result)
    assert torch.isfinite(result.lower_bound)
    torch.testing.assert_close(result.means, torch.full((2, 2), 3.0, dtype=torch.float64))
    # the only spread left is the regularization (edge case: variance = reg_covar)
    torch.testing.assert_close(variances(result), torch.full((2, 2), REG_COVAR, dtype=torch.float64))
    assert bool(result.degenerate_components.any())


def test_two_valued_series_stays_finite_and_is_flagged_degenerate(cov_type):
    x = torch.tensor([1.0, 5.0] * 25, dtype=torch.float64)
    with warns_each((FitWarning, FEWER_DISTINCT_POINTS), (DegenerateWarning, "DEGENERATE")):
        result = torchgmm.fit(x, 3, covariance_type=cov_type, random_state=0)

    assert result.status == FitStatus.DEGENERATE
    assert_finite_params(result)
    assert torch.isfinite(result.lower_bound)
    heavy = result.weights > 0.1
    assert int(heavy.sum()) == 2  # the third component is empty, its weight ~0 and not NaN
    torch.testing.assert_close(result.means[heavy, 0].sort().values, torch.tensor([1.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(result.weights[heavy], torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_all_restarts_degenerate_returns_the_best_degenerate_one():
    x = torch.full((30, 1), -2.0, dtype=torch.float64)
    with warns_each((FitWarning, REG_COVAR_ABOVE_VARIANCE), (FitWarning, FEWER_DISTINCT_POINTS),
                    (DegenerateWarning, "DEGENERATE")):
        result = torchgmm.fit(x, 2, n_init=3, random_state=0)

    assert result.status == FitStatus.DEGENERATE
    assert float(result.lower_bound) == float(result.restart_lower_bounds.max())
    assert_finite_params(result)


# -- the bundled 50-point time series on which a hand-written NumPy EM failed (see docs) ----------
def test_seed_series_default_init_reaches_the_sensible_optimum(seed_x):
    model = torchgmm.GaussianMixture(3, random_state=0).fit(seed_x)

    assert model.status_ == FitStatus.OK
    assert abs(float(model.score(seed_x)) - (-2.1237)) < 1e-3
    means = model.means_.flatten().sort().values
    torch.testing.assert_close(means, torch.tensor([24.57, 37.6, 44.34], dtype=torch.float64), rtol=0, atol=0.05)


def test_seed_series_default_init_reaches_the_sensible_optimum_for_every_seed(seed_x):
    """Run to convergence. (At the default tol=1e-3 about one seed in ten, for scikit-learn too,
    stops on a slow plateau at -2.153 after a k-means partition (26.0, 38.8, 44.3).)"""
    seeds = range(20)
    for seed in seeds:
        model = torchgmm.GaussianMixture(3, random_state=seed, tol=1e-8, max_iter=1000).fit(seed_x)
        assert model.status_ == FitStatus.OK, f"seed {seed}"
        assert abs(float(model.score(seed_x)) - (-2.1237)) < 1e-3, f"seed {seed}"


def test_seed_series_restart_collapsed_onto_repeated_value_is_flagged(seed_x):
    """Every random-from-data fit that reaches the spurious high likelihood (a component on the
    value repeated 13 times, variance pinned near reg_covar) says so, and names the component."""
    collapsed = 0
    for seed in range(40):
        result = status_checked_fit(seed_x, 3, init_params="random_from_data", random_state=seed)
        if float(result.lower_bound) > -1.5:  # the sensible optimum is about -2.1
            collapsed += 1
            assert result.status == FitStatus.DEGENERATE, f"seed {seed}"
            flagged = result.degenerate_components
            assert int(flagged.sum()) == 1
            assert abs(float(result.means[flagged]) - REPEATED_VALUE) < 1e-3
            assert float(variances(result)[flagged]) <= 10 * REG_COVAR
        elif result.status == FitStatus.OK:
            assert float(result.lower_bound) < -2.0
    assert collapsed >= 5, "random_from_data should collapse on this series for several seeds"


def test_seed_series_collapsed_restarts_are_not_chosen(seed_x):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateWarning)  # the collapsed restarts are not reported
        model = torchgmm.GaussianMixture(3, init_params="random_from_data", n_init=100, random_state=0).fit(seed_x)
    result = model.result_

    restart_lb = result.restart_lower_bounds
    assert bool((restart_lb > -1.5).any()), "some restarts should have collapsed (lower bound about -1.2)"
    assert model.status_ == FitStatus.OK
    assert not bool(result.degenerate_components.any())
    # the best of the clean restarts: all collapsed ones lie above -2 on this series
    assert float(model.lower_bound_) == float(restart_lb[restart_lb < -2.0].max())
    assert float(model.lower_bound_) < -2.0
    assert (model.means_.flatten() - REPEATED_VALUE).abs().min() > 1e-2


def test_collapsed_component_summary_names_the_value(seed_x):
    precisions = [[[1 / 0.14]], [[1 / 24.0]], [[1e5]]]
    with pytest.warns(DegenerateWarning, match=r"component 2 .* on \(44\.445"):
        result = torchgmm.fit(
            seed_x, 3, tol=1e-8, weights_init=[0.2, 0.3, 0.5],
            means_init=[[24.6], [37.6], [REPEATED_VALUE]], precisions_init=precisions,
        )
    assert result.status == FitStatus.DEGENERATE
    assert result.degenerate_components.tolist() == [False, False, True]
    assert abs(float(result.means[2, 0]) - REPEATED_VALUE) < 1e-3
    assert float(result.lower_bound) > -1.5  # the spurious "better" likelihood of the spike
    assert "component 2 (weight 0.279) on (44.445" in result.summary()


# -- isolation inside a batch --------------------------------------------------------------------
def healthy_pair(n: int = 120) -> torch.Tensor:
    return torch.stack([torch.tensor(blobs(seed, n=n, d=2, overlap=1.0)) for seed in (5, 6)])


def assert_neighbours_unchanged(batched, neighbours_alone, batch_indices) -> None:
    for index, alone in zip(batch_indices, neighbours_alone):
        assert_same_fit(index_result(batched, index), solo_result(alone), what=f"neighbour {index}: ")


def test_degenerate_series_does_not_change_its_neighbours(cov_type):
    good = healthy_pair()
    constant = torch.full((1, 120, 2), 7.0, dtype=torch.float64)
    x = torch.cat([good[:1], constant, good[1:]])
    settings = dict(covariance_type=cov_type, random_state=0, tol=1e-6, max_iter=300)
    with warns_each((FitWarning, REG_COVAR_ABOVE_VARIANCE + r".*\(first: series \(1,\)\)"),
                    (FitWarning, FEWER_DISTINCT_POINTS + r".*\(first: series \(1,\)\)"),
                    (DegenerateWarning, "1 of 3")):
        batched = torchgmm.fit(x, 3, **settings)
    alone = [torchgmm.fit(s, 3, **settings) for s in good]

    assert batched.status.tolist()[1] == FitStatus.DEGENERATE
    assert_neighbours_unchanged(batched, alone, (0, 2))


def test_empty_series_in_a_batch_is_flagged_empty_with_finite_params(cov_type):
    good = healthy_pair()
    x = torch.cat([good[:1], torch.zeros(1, 120, 2, dtype=torch.float64), good[1:]])
    w = torch.ones(3, 120, dtype=torch.float64)
    w[1] = 0.0
    settings = dict(covariance_type=cov_type, random_state=0, tol=1e-6, max_iter=300)
    with pytest.warns(DegenerateWarning, match="EMPTY"):
        batched = torchgmm.fit(x, 3, sample_weight=w, **settings)
    alone = [torchgmm.fit(s, 3, **settings) for s in good]

    assert batched.status[1] == FitStatus.EMPTY
    assert float(batched.lower_bound[1]) == -np.inf
    assert int(batched.n_iter[1]) == 0
    assert int(batched.n_samples[1]) == 0
    assert not bool(batched.converged[1])
    assert torch.isnan(batched.lower_bounds[1]).all()
    assert_finite_params(batched)
    assert_neighbours_unchanged(batched, alone, (0, 2))


def test_series_with_fewer_points_than_components_is_flagged_in_a_batch(cov_type):
    good = healthy_pair()
    w = torch.ones(3, 120, dtype=torch.float64)
    w[1, 2:] = 0.0  # two positive-weight points for three components
    x = torch.cat([good[:1], good[:1] + 1.0, good[1:]])
    settings = dict(covariance_type=cov_type, random_state=0, tol=1e-6, max_iter=300)
    with warns_each((FitWarning, FEWER_DISTINCT_POINTS + r".*\(first: series \(1,\)\)"),
                    (DegenerateWarning, "INSUFFICIENT_DATA")):
        batched = torchgmm.fit(x, 3, sample_weight=w, **settings)
    alone = [torchgmm.fit(s, 3, **settings) for s in good]

    assert batched.status[1] == FitStatus.INSUFFICIENT_DATA
    assert int(batched.n_samples[1]) == 2
    assert_finite_params(batched)
    assert_neighbours_unchanged(batched, alone, (0, 2))


def test_series_with_fewer_points_than_components_raises_unbatched(cov_type):
    x = torch.tensor(blobs(0, n=40, d=2))
    w = torch.zeros(40, dtype=torch.float64)
    w[:2] = 1.0
    with pytest.raises(ValueError, match=r"n_components=3 .*n_samples=2"):
        torchgmm.fit(x, 3, covariance_type=cov_type, sample_weight=w)


def test_huge_scale_float32_series_fits_without_nan():
    x = torch.tensor(blobs(0, n=200, d=2, overlap=0.3))
    scale = 1e18  # x**2 summed over 200 points exceeds float32's 3.4e38; x itself is fine
    reference = torchgmm.fit(x, 3, random_state=0)
    result = torchgmm.fit((x * scale).float(), 3, random_state=0)

    assert_finite_params(result)
    torch.testing.assert_close(result.means.double() / scale, reference.means, rtol=1e-3, atol=1e-3)


def test_float32_flags_the_same_components_as_float64(seed_x):
    """Narrow but sound components (two clusters 100 apart, std 0.1: variance 4e-6 of the series'
    in standardized units) are not collapsed in float32 either; a component collapsed onto the
    bundled series' repeated value is flagged in both precisions."""
    g = torch.Generator().manual_seed(0)
    narrow = torch.cat([torch.randn(200, generator=g) * 0.1, torch.randn(200, generator=g) * 0.1 + 100])
    for dtype in (torch.float64, torch.float32):
        result = torchgmm.fit(narrow.to(dtype), 2, random_state=0)
        assert int(result.status) == FitStatus.OK, dtype
        assert not bool(result.degenerate_components.any()), dtype
    flags = []
    for dtype in (torch.float64, torch.float32):
        with pytest.warns(DegenerateWarning):
            result = torchgmm.fit(seed_x.to(dtype), 3, init_params="random_from_data", random_state=3, tol=1e-6)
        assert int(result.status) == FitStatus.DEGENERATE, dtype
        flags.append(result.degenerate_components.tolist())
    assert flags[0] == flags[1]
