"""Properties of the fit and the density, checked with hypothesis (derandomized: the same examples
on every run). Each property is a promise of the batched fitter; examples are small so the file
runs in well under a minute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from torchgmm import GMMParams
from torchgmm.covariance import get_covariance
from torchgmm.density import log_prob, responsibilities
from conftest import COV_TYPES, REG_COVAR_ABOVE_VARIANCE, blobs, sklearn_init, status_checked_fit

# Whether a fit warns (not converged at max_iter, a collapsed component) depends on the example:
# status_checked_fit checks each warning against the statuses the fit returns.
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(derandomize=True, database=None, deadline=None, max_examples=40)

seeds = st.integers(0, 2**16)
cov_types = st.sampled_from(COV_TYPES)
dims = st.integers(1, 3)
n_components = st.integers(1, 3)
FIT = dict(tol=1e-10, max_iter=60)


def problem(seed: int, d: int, k: int, n: int = 60):
    """Data ``(n, d)`` float64 tensor from ``k`` clusters and scikit-learn's k-means start for it."""
    x = blobs(seed, n=max(n, 10 * k + 10), d=d, k=k)
    return torch.as_tensor(x), sklearn_init(x, k, "full", seed=seed)


def init_for(start: dict, cov_type: str) -> dict:
    """The full-covariance start reduced to ``cov_type``'s shapes (precisions of the averaged
    covariances), so every type starts from the same place."""
    covs = np.linalg.inv(start["precisions_init"])
    shaped = {
        "full": covs,
        "tied": covs.mean(0),
        "diag": np.diagonal(covs, axis1=-2, axis2=-1),
        "spherical": np.diagonal(covs, axis1=-2, axis2=-1).mean(-1),
    }[cov_type]
    precisions = np.linalg.inv(shaped) if cov_type in ("full", "tied") else 1.0 / shaped
    return dict(weights_init=start["weights_init"], means_init=start["means_init"], precisions_init=precisions)


# -- invariances of the fit -------------------------------------------------------------------
@PROPERTY
@given(seed=seeds, d=dims, k=n_components, cov_type=cov_types)
def test_permuting_the_points_changes_nothing(seed, d, k, cov_type):
    x, start = problem(seed, d, k)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    kwargs = dict(covariance_type=cov_type, **init_for(start, cov_type), **FIT)
    a, b = status_checked_fit(x, k, **kwargs), status_checked_fit(x[perm], k, **kwargs)
    for ta, tb in zip(a.params, b.params):
        torch.testing.assert_close(ta, tb, rtol=1e-8, atol=1e-10)
    assert int(a.n_iter) == int(b.n_iter)


@PROPERTY
@given(seed=seeds, d=dims, k=st.integers(2, 3), cov_type=cov_types)
def test_relabelling_components_leaves_the_likelihood_unchanged(seed, d, k, cov_type):
    x, start = problem(seed, d, k)
    init = init_for(start, cov_type)
    result = status_checked_fit(x, k, covariance_type=cov_type, **init, **FIT)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    params = result.params
    relabelled = GMMParams(params.log_weights[perm], params.means[perm], params.prec_chol if cov_type == "tied" else params.prec_chol[perm])
    torch.testing.assert_close(log_prob(x, relabelled, cov_type), log_prob(x, params, cov_type), rtol=1e-12, atol=1e-12)
    # EM is equivariant too: a relabelled start ends in the relabelled fit.
    p = perm.numpy()
    init_p = {"weights_init": init["weights_init"][p], "means_init": init["means_init"][p],
              "precisions_init": init["precisions_init"] if cov_type == "tied" else init["precisions_init"][p]}
    other = status_checked_fit(x, k, covariance_type=cov_type, **init_p, **FIT)
    torch.testing.assert_close(other.means, result.means[perm], rtol=1e-8, atol=1e-10)
    assert float(other.lower_bound) == pytest.approx(float(result.lower_bound), rel=1e-10)


@PROPERTY
@given(seed=seeds, d=dims, k=n_components, cov_type=cov_types, init_params=st.sampled_from(["kmeans", "k-means++", "random_from_data"]))
def test_zero_weight_points_equal_dropped_points(seed, d, k, cov_type, init_params):
    x, _ = problem(seed, d, k)
    keep = torch.rand(len(x), generator=torch.Generator().manual_seed(seed)) > 0.3
    kwargs = dict(covariance_type=cov_type, init_params=init_params, random_state=seed, n_init=2, **FIT)
    weighted = status_checked_fit(x, k, sample_weight=keep.double(), **kwargs)
    dropped = status_checked_fit(x[keep], k, **kwargs)
    for ta, tb in zip(weighted.params, dropped.params):
        torch.testing.assert_close(ta, tb, rtol=1e-8, atol=1e-10)
    assert int(weighted.n_iter) == int(dropped.n_iter)


@PROPERTY
@given(seed=seeds, d=dims, k=n_components, cov_type=cov_types)
def test_a_series_result_does_not_depend_on_the_other_series_in_its_batch(seed, d, k, cov_type):
    series = [problem(seed + i, d, k, n=50)[0] for i in range(3)]
    scale = torch.tensor([1.0, 1e3, 1e-3], dtype=torch.float64)[:, None, None]
    kwargs = dict(covariance_type=cov_type, random_state=seed, n_init=2, **FIT)
    small = (REG_COVAR_ABOVE_VARIANCE,)  # the series scaled by 1e-3 may have a variance below reg_covar
    ab = status_checked_fit(torch.stack(series[:2]) * scale[:2], k, allow=small, **kwargs)
    cb = status_checked_fit(torch.stack([series[2], series[1]]) * scale[[2, 1]], k, allow=small, **kwargs)
    torch.testing.assert_close(ab.means[1], cb.means[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ab.precisions_cholesky[1], cb.precisions_cholesky[1], rtol=1e-9, atol=1e-9)
    assert int(ab.n_iter[1]) == int(cb.n_iter[1]) and int(ab.status[1]) == int(cb.status[1])


def _affine(seed: int, d: int, cov_type: str) -> torch.Tensor:
    """A well-conditioned linear map the covariance type is closed under."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.5, 3.0, d) * rng.choice([-1.0, 1.0], d)
    if cov_type == "diag":
        return torch.tensor(np.diag(scales))
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    if cov_type == "spherical":
        return torch.tensor(q * scales[0])
    return torch.tensor(q * scales)


@PROPERTY
@given(seed=seeds, d=dims, k=n_components, cov_type=cov_types)
def test_affine_maps_of_the_data_map_the_fitted_means_and_covariances(seed, d, k, cov_type):
    x, start = problem(seed, d, k)
    a = _affine(seed, d, cov_type)
    b = torch.tensor(np.random.default_rng(seed + 1).normal(0, 100, d))
    init = init_for(start, cov_type)
    mapped_init = dict(weights_init=init["weights_init"], means_init=start["means_init"] @ a.numpy().T + b.numpy())
    cov = get_covariance(cov_type)
    result = status_checked_fit(x, k, covariance_type=cov_type, reg_covar=0.0, **init, **FIT)
    full = cov.full_covariance(result.precisions_cholesky, k, d)
    mapped_full = a @ full @ a.T
    shaped = {"full": mapped_full, "tied": mapped_full[0], "diag": torch.diagonal(mapped_full, dim1=-2, dim2=-1),
              "spherical": torch.diagonal(mapped_full, dim1=-2, dim2=-1).mean(-1)}[cov_type]
    start_full = cov.full_covariance(cov.prec_chol_from_precision(torch.as_tensor(init["precisions_init"])), k, d)
    start_mapped = a @ start_full @ a.T
    start_shaped = {"full": start_mapped, "tied": start_mapped[0], "diag": torch.diagonal(start_mapped, dim1=-2, dim2=-1),
                    "spherical": torch.diagonal(start_mapped, dim1=-2, dim2=-1).mean(-1)}[cov_type]
    mapped_init["precisions_init"] = (torch.linalg.inv(start_shaped) if cov_type in ("full", "tied") else 1 / start_shaped).numpy()
    moved = status_checked_fit(x @ a.T + b, k, covariance_type=cov_type, reg_covar=0.0, **mapped_init, **FIT)
    torch.testing.assert_close(moved.means, result.means @ a.T + b, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(moved.covariances, shaped, rtol=1e-6, atol=1e-8)
    log_det = torch.linalg.slogdet(a).logabsdet
    assert float(moved.lower_bound) == pytest.approx(float(result.lower_bound - log_det), rel=1e-8, abs=1e-8)


# -- EM's own guarantees ----------------------------------------------------------------------
@FAST
@given(seed=seeds, d=dims, k=n_components, cov_type=cov_types, far=st.floats(0.0, 50.0))
def test_responsibilities_sum_to_one(seed, d, k, cov_type, far):
    gen = torch.Generator().manual_seed(seed)
    cov = get_covariance(cov_type)
    x = torch.randn(40, d, generator=gen, dtype=torch.float64) * (1 + far)
    covs = torch.rand(k, d, generator=gen, dtype=torch.float64) * 2 + 0.01
    shaped = {"full": torch.diag_embed(covs), "tied": torch.diag_embed(covs[0]), "diag": covs, "spherical": covs.mean(-1)}[cov_type]
    prec_chol, _ = cov.prec_chol_from_covariance(shaped, torch.zeros((), dtype=torch.float64))
    params = GMMParams(torch.log_softmax(torch.randn(k, generator=gen, dtype=torch.float64), -1),
                       torch.randn(k, d, generator=gen, dtype=torch.float64), prec_chol)
    resp = responsibilities(x, params, cov)
    assert bool(torch.isfinite(resp).all()) and bool((resp >= 0).all())
    torch.testing.assert_close(resp.sum(-1), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-12)


@PROPERTY
@given(seed=seeds, d=dims, k=n_components, cov_type=cov_types, init_params=st.sampled_from(["kmeans", "random", "random_from_data"]))
def test_the_em_lower_bound_never_decreases_at_reg_covar_zero(seed, d, k, cov_type, init_params):
    x, _ = problem(seed, d, k, n=80)
    result = status_checked_fit(x, k, covariance_type=cov_type, init_params=init_params, reg_covar=0.0, random_state=seed, tol=1e-12, max_iter=80)
    history = result.lower_bounds[~result.lower_bounds.isnan()]
    steps = history[1:] - history[:-1]
    if steps.numel():
        assert float(steps.min()) >= -1e-10 * (1 + float(history.abs().max()))


@PROPERTY
@given(seed=seeds, d=dims, cov_type=cov_types, weighted=st.booleans())
def test_one_component_equals_the_closed_form_maximum_likelihood_estimate(seed, d, cov_type, weighted):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(50, d)) @ rng.normal(size=(d, d)) + rng.normal(0, 10, d)
    w = rng.uniform(0.1, 2.0, 50) if weighted else np.ones(50)
    result = status_checked_fit(x, 1, covariance_type=cov_type, sample_weight=w, reg_covar=0.0)
    mean = (w[:, None] * x).sum(0) / w.sum()
    centred = x - mean
    full = (w[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0) / w.sum()
    expected = {"full": full[None], "tied": full, "diag": np.diag(full)[None], "spherical": np.diag(full).mean()[None]}[cov_type]
    np.testing.assert_allclose(result.means[0].numpy(), mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(result.covariances.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert float(result.weights) == pytest.approx(1.0)


# -- the density against independent implementations ------------------------------------------
def _random_covariances(gen: np.random.Generator, k: int, d: int, condition: float) -> np.ndarray:
    covs = []
    for _ in range(k):
        q, _ = np.linalg.qr(gen.normal(size=(d, d)))
        eig = np.logspace(0, math.log10(condition), d) * gen.uniform(0.1, 10)
        covs.append((q * eig) @ q.T)
    return np.stack(covs)


@FAST
@given(seed=seeds, d=st.integers(1, 5), k=n_components, log_condition=st.sampled_from([0.0, 2.0, 4.0, 6.0]))
def test_log_density_equals_torch_distributions_and_scipy(seed, d, k, log_condition):
    condition = 10.0**log_condition
    gen = np.random.default_rng(seed)
    covs = _random_covariances(gen, k, d, condition)
    means = gen.normal(0, 5, (k, d))
    weights = gen.dirichlet(np.ones(k))
    x = np.concatenate([gen.multivariate_normal(means[j], covs[j], size=20) for j in range(k)])
    cov = get_covariance("full")
    prec_chol, ok = cov.prec_chol_from_covariance(torch.tensor(covs), torch.zeros((), dtype=torch.float64))
    assert bool(ok)
    params = GMMParams(torch.tensor(np.log(weights)), torch.tensor(means), prec_chol)
    ours = log_prob(torch.tensor(x), params, cov).numpy()
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=torch.tensor(weights)),
        torch.distributions.MultivariateNormal(torch.tensor(means), covariance_matrix=torch.tensor(covs)),
    )
    reference = mixture.log_prob(torch.tensor(x)).numpy()
    per_component = np.stack([multivariate_normal(means[j], covs[j]).logpdf(x).reshape(-1) for j in range(k)], -1)
    scipy_ref = logsumexp(per_component + np.log(weights), axis=-1)
    tol = 1e-12 * condition + 1e-10
    assert np.abs(ours - scipy_ref).max() <= tol * (1 + np.abs(scipy_ref).max())
    assert np.abs(ours - reference).max() <= tol * (1 + np.abs(reference).max())


@FAST
@given(seed=seeds, d=st.integers(1, 4), k=n_components, cov_type=st.sampled_from(["tied", "diag", "spherical"]))
def test_every_covariance_type_has_the_density_of_its_full_covariance(seed, d, k, cov_type):
    gen = np.random.default_rng(seed)
    covs = _random_covariances(gen, k, d, 100.0)
    shaped = {"tied": covs[0], "diag": np.diagonal(covs, axis1=-2, axis2=-1), "spherical": np.diagonal(covs, axis1=-2, axis2=-1).mean(-1)}[cov_type]
    cov = get_covariance(cov_type)
    prec_chol, _ = cov.prec_chol_from_covariance(torch.tensor(shaped), torch.zeros((), dtype=torch.float64))
    full = cov.full_covariance(prec_chol, k, d)
    means = torch.tensor(gen.normal(0, 3, (k, d)))
    log_w = torch.log_softmax(torch.tensor(gen.normal(size=k)), -1)
    x = torch.tensor(gen.normal(0, 4, (30, d)))
    ours = log_prob(x, GMMParams(log_w, means, prec_chol), cov)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=log_w), torch.distributions.MultivariateNormal(means, covariance_matrix=full)
    ).log_prob(x)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


# -- the eager fast paths equal the difference-based E-step and the pass over the points ---------------
@FAST
@given(seed=seeds, n=st.integers(1, 60), k=st.integers(1, 5), r=st.integers(1, 4), steps=st.integers(1, 6))
def test_lloyd_on_the_sorted_line_equals_the_pass_over_the_points(seed, n, k, r, steps):
    from torchgmm.init import SortedLine, kmeans

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 1, generator=g, dtype=torch.float64) * 3
    w = torch.rand(2, n, generator=g, dtype=torch.float64)
    centers = torch.randn(2, r, k, 1, generator=g, dtype=torch.float64) * 3  # distinct with probability 1
    labels, expected = kmeans(x, w, centers, max_iter=steps)
    line = SortedLine(x, w)
    cells, _, got = line.lloyd(centers, steps)
    assert torch.equal(line.labels(cells), labels)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@FAST
@given(seed=seeds, d=st.integers(2, 5), k=st.integers(1, 4), r=st.integers(1, 3), cov_type=st.sampled_from(["full", "tied"]))
def test_whitened_statistics_equal_the_difference_based_statistics(seed, d, k, r, cov_type):
    from torchgmm.stats import e_step_statistics, whitened_statistics

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 40, d, generator=g, dtype=torch.float64)
    w = torch.rand(2, 1, 40, generator=g, dtype=torch.float64)
    a = torch.randn(2, r, k, d, d, generator=g, dtype=torch.float64)
    covs = a @ a.mT + 0.1 * torch.eye(d, dtype=torch.float64)
    cov = get_covariance(cov_type)
    prec_chol, _ = cov.prec_chol_from_covariance(covs if cov_type == "full" else covs[:, :, 0], torch.full((2, r), 1e-6, dtype=torch.float64))
    params = GMMParams(torch.log_softmax(torch.randn(2, r, k, generator=g, dtype=torch.float64), -1),
                       torch.randn(2, r, k, d, generator=g, dtype=torch.float64), prec_chol)
    ref, fast = e_step_statistics(x, w, params, cov), whitened_statistics(x, w, params, cov)
    for a_, b_ in zip(fast, ref):
        torch.testing.assert_close(a_, b_, rtol=1e-9, atol=1e-9)
