"""The covariance registry (``torchgmm/covariance.py``): for every covariance type, the shapes, the
conversions between covariance, precision and precision Cholesky factor, the parameter count, the
jittered Cholesky factorization, the unconstrained form, rescaling, the smallest variance, the
log-determinant and Mahalanobis terms, and the M-step's scatter and covariance estimate.

Everything runs in float64 against scikit-learn's private helpers or a direct NumPy computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.mixture._gaussian_mixture import _compute_log_det_cholesky, _compute_precision_cholesky

from torchgmm.covariance import COVARIANCE_TYPES, Covariance, cholesky_with_jitter, get_covariance
from conftest import COV_TYPES

FAST = settings(derandomize=True, database=None, deadline=None, max_examples=40)
F64 = torch.float64
K, D = 3, 4
BATCH = (2, 3)


def random_covariance(cov_type: str, k: int = K, d: int = D, batch: tuple = (), seed: int = 0) -> torch.Tensor:
    """A well-conditioned covariance in ``cov_type``'s shape, with leading ``batch`` dims."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(batch) + get_covariance(cov_type).covariance_shape(k, d)
    if cov_type in ("full", "tied"):
        a = torch.randn(*shape, generator=gen, dtype=F64)
        return a @ a.mT / d + 0.5 * torch.eye(d, dtype=F64)
    return torch.rand(*shape, generator=gen, dtype=F64) * 3.0 + 0.2


def prec_chol_of(cov_type: str, covariance: torch.Tensor) -> torch.Tensor:
    reg = torch.zeros(covariance.shape[: covariance.dim() - len(get_covariance(cov_type).covariance_shape(K, D))], dtype=F64)
    prec_chol, ok = get_covariance(cov_type).prec_chol_from_covariance(covariance, reg)
    assert bool(ok.all())
    return prec_chol


def expand_full(cov_type: str, covariance: torch.Tensor, k: int = K, d: int = D) -> torch.Tensor:
    """Covariances in ``cov_type``'s shape written as ``(..., K, D, D)`` matrices, directly."""
    if cov_type == "full":
        return covariance
    if cov_type == "tied":
        return covariance.unsqueeze(-3).expand(*covariance.shape[:-2], k, d, d)
    if cov_type == "diag":
        return torch.diag_embed(covariance)
    return covariance[..., None, None] * torch.eye(d, dtype=covariance.dtype)


# -- shapes and counting -------------------------------------------------------------------------
SHAPES = {"full": (K, D, D), "tied": (D, D), "diag": (K, D), "spherical": (K,)}


def test_registry_holds_exactly_the_four_scikit_learn_types():
    assert sorted(COVARIANCE_TYPES) == sorted(COV_TYPES)
    assert all(get_covariance(name).name == name for name in COV_TYPES)


def test_prec_chol_shape_is_scikit_learns_precisions_cholesky_shape(cov_type):
    cov = get_covariance(cov_type)
    assert cov.prec_chol_shape(K, D) == SHAPES[cov_type]
    assert cov.covariance_shape(K, D) == SHAPES[cov_type]
    sk = _compute_precision_cholesky(random_covariance(cov_type).numpy(), cov_type)
    assert sk.shape == SHAPES[cov_type]


@pytest.mark.parametrize("k, d", [(1, 1), (3, 1), (2, 5), (4, 3)])
def test_n_parameters_equals_scikit_learns_count(cov_type, k, d):
    sk = SkGaussianMixture(k, covariance_type=cov_type)
    sk.means_ = np.zeros((k, d))  # all _n_parameters reads
    assert get_covariance(cov_type).n_parameters(k, d) == sk._n_parameters()


def test_an_unknown_type_is_an_error_listing_the_valid_names():
    with pytest.raises(ValueError, match=r"covariance_type='banded' is not supported; choose one of \['diag', 'full', 'spherical', 'tied'\]"):
        get_covariance("banded")


def test_a_registry_entry_passes_through_get_covariance():
    entry = COVARIANCE_TYPES["diag"]
    assert isinstance(entry, Covariance) and get_covariance(entry) is entry


# -- conversions ---------------------------------------------------------------------------------
def test_prec_chol_from_covariance_equals_scikit_learns_compute_precision_cholesky(cov_type):
    covariance = random_covariance(cov_type, seed=1)
    expected = _compute_precision_cholesky(covariance.numpy(), cov_type)
    np.testing.assert_allclose(prec_chol_of(cov_type, covariance).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_covariance_round_trips_through_the_precision_cholesky_factor(cov_type):
    covariance = random_covariance(cov_type, batch=BATCH, seed=2)
    cov = get_covariance(cov_type)
    back = cov.covariance_from_prec_chol(prec_chol_of(cov_type, covariance))
    torch.testing.assert_close(back, covariance, rtol=1e-12, atol=1e-12)


def test_the_min_variance_bound_is_below_the_smallest_eigenvalue_and_tight_for_diagonal_types(cov_type):
    """The bound that lets the result skip the eigenvalues of sound components never exceeds them
    (a collapsed component still reaches the exact check)."""
    covariance = random_covariance(cov_type, batch=BATCH, seed=5)
    cov = get_covariance(cov_type)
    exact = cov.min_variance(covariance, K)
    bound = cov.min_variance_bound(prec_chol_of(cov_type, covariance), K)
    assert bound.shape == exact.shape == BATCH + (K,)
    assert bool((bound <= exact * (1 + 1e-12)).all())
    if cov_type in ("diag", "spherical"):
        torch.testing.assert_close(bound, exact, rtol=1e-12, atol=0)
    else:
        assert bool((bound > exact / D - 1e-12).all())  # 1 / trace(P) >= (smallest variance) / D


def test_precision_is_the_inverse_of_the_covariance(cov_type):
    covariance = random_covariance(cov_type, batch=BATCH, seed=3)
    cov = get_covariance(cov_type)
    precision = cov.precision_from_prec_chol(prec_chol_of(cov_type, covariance))
    expected = torch.linalg.inv(covariance) if cov_type in ("full", "tied") else covariance.reciprocal()
    torch.testing.assert_close(precision, expected, rtol=1e-11, atol=1e-12)


def test_prec_chol_round_trips_through_the_precision(cov_type):
    cov = get_covariance(cov_type)
    prec_chol = prec_chol_of(cov_type, random_covariance(cov_type, batch=BATCH, seed=4))
    back = cov.prec_chol_from_precision(cov.precision_from_prec_chol(prec_chol))
    torch.testing.assert_close(back, prec_chol, rtol=1e-11, atol=1e-12)


def test_full_prec_chol_is_upper_triangular_with_a_positive_diagonal():
    for cov_type in ("full", "tied"):
        prec_chol = prec_chol_of(cov_type, random_covariance(cov_type, batch=BATCH, seed=5))
        assert torch.equal(prec_chol, torch.triu(prec_chol))
        assert bool((torch.diagonal(prec_chol, dim1=-2, dim2=-1) > 0).all())


def test_full_covariance_expands_every_type_to_one_matrix_per_component(cov_type):
    covariance = random_covariance(cov_type, batch=BATCH, seed=6)
    full = get_covariance(cov_type).full_covariance(prec_chol_of(cov_type, covariance), K, D)
    assert full.shape == BATCH + (K, D, D)
    torch.testing.assert_close(full, expand_full(cov_type, covariance), rtol=1e-12, atol=1e-12)


def test_prec_chol_from_covariance_flags_only_the_members_that_are_not_positive_definite(cov_type):
    cov = get_covariance(cov_type)
    covariance = random_covariance(cov_type, batch=(3,), seed=7)
    bad = covariance.clone()
    if cov_type in ("full", "tied"):
        bad[1] = bad[1] - 10.0 * torch.eye(D, dtype=F64)  # indefinite beyond any jitter
    else:
        bad[1] = -bad[1]  # negative variances
    reg = torch.full((3,), 1e-6, dtype=F64)
    prec_chol, ok = cov.prec_chol_from_covariance(bad, reg)
    good, _ = cov.prec_chol_from_covariance(covariance, reg)
    assert ok.tolist() == [True, False, True]
    assert bool(torch.isfinite(prec_chol).all())
    torch.testing.assert_close(prec_chol[[0, 2]], good[[0, 2]], rtol=0, atol=0)


# -- the log-density's terms ---------------------------------------------------------------------
def test_log_det_equals_scikit_learns_compute_log_det_cholesky(cov_type):
    prec_chol = prec_chol_of(cov_type, random_covariance(cov_type, seed=8))
    ours = get_covariance(cov_type).log_det(prec_chol, D)
    expected = _compute_log_det_cholesky(prec_chol.numpy(), cov_type, D)
    np.testing.assert_allclose(ours.numpy(), np.broadcast_to(expected, ours.shape), rtol=1e-12, atol=1e-12)


def test_mahalanobis_equals_the_quadratic_form_of_the_precision(cov_type):
    cov = get_covariance(cov_type)
    covariance = random_covariance(cov_type, batch=BATCH, seed=9)
    diff = torch.randn(*BATCH, K, 11, D, generator=torch.Generator().manual_seed(9), dtype=F64)
    precision = torch.linalg.inv(expand_full(cov_type, covariance))  # (*B, K, D, D)
    expected = torch.einsum("...knd,...kde,...kne->...kn", diff, precision, diff)
    torch.testing.assert_close(cov.mahalanobis(diff, prec_chol_of(cov_type, covariance)), expected, rtol=1e-11, atol=1e-11)


# -- cholesky_with_jitter ------------------------------------------------------------------------
GOOD = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
SINGULAR = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)
JITTER_POWERS = (1.0, 10.0, 100.0, 1000.0)


def test_cholesky_with_jitter_leaves_factorizable_members_bitwise_unchanged():
    chol, ok = cholesky_with_jitter(torch.stack([GOOD, SINGULAR, GOOD]), torch.tensor(1e-6, dtype=F64))
    assert ok.tolist() == [True, True, True]
    assert torch.equal(chol[0], torch.linalg.cholesky(GOOD)) and torch.equal(chol[2], torch.linalg.cholesky(GOOD))


def test_cholesky_with_jitter_adds_its_own_jitter_to_each_failing_member_only():
    jitter = torch.tensor([1e-6, 1e-2], dtype=F64)
    chol, ok = cholesky_with_jitter(torch.stack([SINGULAR, SINGULAR]), jitter)
    assert ok.tolist() == [True, True]
    for member in range(2):
        added = chol[member] @ chol[member].mT - SINGULAR
        bump = float(added[0, 0])
        torch.testing.assert_close(added, bump * torch.eye(2, dtype=F64), rtol=0, atol=1e-12)
        assert any(bump == pytest.approx(float(jitter[member]) * p, rel=1e-6) for p in JITTER_POWERS), bump


@pytest.mark.parametrize(
    "matrix",
    [torch.full((2, 2), float("nan"), dtype=F64), -torch.eye(2, dtype=F64), torch.full((1, 1), -1.0, dtype=F64),
     torch.zeros(1, 1, dtype=F64), torch.full((1, 1), float("nan"), dtype=F64)],
    ids=["nan", "negative-definite", "negative-1x1", "zero-1x1", "nan-1x1"],
)
def test_cholesky_with_jitter_reports_a_hopeless_member_with_a_finite_identity_factor(matrix):
    chol, ok = cholesky_with_jitter(torch.stack([matrix, torch.eye(matrix.shape[-1], dtype=F64) * 4]), torch.tensor(1e-6, dtype=F64))
    assert ok.tolist() == [False, True]
    torch.testing.assert_close(chol[0], torch.eye(matrix.shape[-1], dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(chol[1], 2 * torch.eye(matrix.shape[-1], dtype=F64), rtol=0, atol=0)


@FAST
@given(seed=st.integers(0, 2**16), d=st.integers(1, 4), shift=st.floats(-3.0, 1.0))
def test_cholesky_with_jitter_never_returns_nan_and_a_factor_it_calls_ok_is_one(seed, d, shift):
    """Symmetric matrices, definite or not (``shift`` moves the spectrum across zero)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(5, d, d, generator=gen, dtype=F64)
    matrix = a @ a.mT / d + shift * torch.eye(d, dtype=F64)
    chol, ok = cholesky_with_jitter(matrix, torch.tensor(1e-6, dtype=F64))
    assert bool(torch.isfinite(chol).all())
    assert torch.equal(chol, torch.tril(chol))
    for member in ok.nonzero().flatten().tolist():
        added = chol[member] @ chol[member].mT - matrix[member]
        torch.testing.assert_close(added, added[0, 0] * torch.eye(d, dtype=F64), rtol=0, atol=1e-9)
        assert -1e-12 <= float(added[0, 0]) <= 1e-3 + 1e-12  # nothing, or one of the jitters tried


# -- unconstrained form, rescaling, smallest variance ---------------------------------------------
def test_unconstrained_form_round_trips(cov_type):
    cov = get_covariance(cov_type)
    prec_chol = prec_chol_of(cov_type, random_covariance(cov_type, batch=BATCH, seed=10))
    torch.testing.assert_close(cov.from_unconstrained(cov.to_unconstrained(prec_chol)), prec_chol, rtol=1e-13, atol=1e-13)


@FAST
@given(seed=st.integers(0, 2**16), cov_type=st.sampled_from(COV_TYPES), spread=st.floats(0.1, 20.0))
def test_any_unconstrained_tensor_maps_to_a_valid_precision_cholesky_factor(seed, cov_type, spread):
    cov = get_covariance(cov_type)
    raw = torch.randn(*cov.prec_chol_shape(K, D), generator=torch.Generator().manual_seed(seed), dtype=F64) * spread
    prec_chol = cov.from_unconstrained(raw)
    if cov_type in ("full", "tied"):
        assert torch.equal(prec_chol, torch.triu(prec_chol))
        diagonal = torch.diagonal(prec_chol, dim1=-2, dim2=-1)
    else:
        diagonal = prec_chol
    assert bool((diagonal > 0).all()) and bool(torch.isfinite(prec_chol).all())


def test_rescale_gives_the_factor_of_data_multiplied_by_scale(cov_type):
    """Multiplying the data by ``s`` multiplies every covariance by ``s**2``; one ``s`` per member."""
    cov = get_covariance(cov_type)
    covariance = random_covariance(cov_type, batch=BATCH, seed=11)
    scale = torch.tensor([[0.5, 3.0, 1e3], [1e-3, 1.0, 7.0]], dtype=F64)
    rescaled = cov.rescale(prec_chol_of(cov_type, covariance), scale)
    expected = covariance * scale.reshape(BATCH + (1,) * (covariance.dim() - 2)) ** 2
    torch.testing.assert_close(cov.covariance_from_prec_chol(rescaled), expected, rtol=1e-12, atol=0)


def test_min_variance_is_the_smallest_eigenvalue_of_each_components_covariance(cov_type):
    cov = get_covariance(cov_type)
    covariance = random_covariance(cov_type, batch=BATCH, seed=12)
    expected = torch.linalg.eigvalsh(expand_full(cov_type, covariance))[..., 0]  # (*B, K)
    torch.testing.assert_close(cov.min_variance(covariance, K), expected, rtol=1e-11, atol=1e-12)


# -- the M-step's scatter and covariance ----------------------------------------------------------
def weighted_points(seed: int, n: int = 40):
    """``x (N, D)``, a reference ``ref (K, D)`` away from the data, responsibilities ``resp (K, N)``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)) @ rng.normal(size=(D, D)) + rng.normal(0, 5, D)
    ref = rng.normal(0, 5, (K, D))
    resp = rng.dirichlet(np.ones(K), n).T * rng.uniform(0.2, 2.0, n)  # weighted responsibilities
    return x, ref, resp


def test_scatter_is_the_weighted_outer_product_sum_about_the_reference(cov_type):
    x, ref, resp = weighted_points(13)
    diff = x[None] - ref[:, None]  # (K, N, D)
    expected = np.einsum("kn,knd,kne->kde", resp, diff, diff)
    if cov_type in ("diag", "spherical"):
        expected = np.diagonal(expected, axis1=-2, axis2=-1)
    ours = get_covariance(cov_type).scatter(torch.tensor(diff), torch.tensor(resp))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_covariance_from_shifted_statistics_equals_the_direct_weighted_covariance(cov_type):
    x, ref, resp = weighted_points(14)
    reg = 1e-3
    cov = get_covariance(cov_type)
    nk = resp.sum(1)
    means = resp @ x / nk[:, None]
    centred = x[None] - means[:, None]  # about the new means: the textbook two-pass formula
    per_component = np.einsum("kn,knd,kne->kde", resp, centred, centred)
    expected = {
        "full": per_component / nk[:, None, None] + reg * np.eye(D),
        "tied": per_component.sum(0) / nk.sum() + reg * np.eye(D),
        "diag": np.diagonal(per_component, axis1=-2, axis2=-1) / nk[:, None] + reg,
        "spherical": np.diagonal(per_component, axis1=-2, axis2=-1).mean(-1) / nk + reg,
    }[cov_type]
    diff = torch.tensor(x[None] - ref[:, None])
    scatter = cov.scatter(diff, torch.tensor(resp))
    shift = torch.tensor(means - ref)
    ours = cov.covariance(torch.tensor(nk), shift, scatter, torch.tensor(reg, dtype=F64))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-12)
