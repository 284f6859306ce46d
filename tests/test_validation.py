"""Bad input: every mistake is a ValueError/TypeError raised at fit (or predict) time whose
message names the argument, the offending value or shape, and in a batch the offending series."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm import GaussianMixture, NotFittedError
from conftest import blobs, quiet_fit

COV_NAMES = r"\['diag', 'full', 'spherical', 'tied'\]"
INIT_NAMES = r"\['kmeans', 'k-means\+\+', 'random', 'random_from_data', 'hierarchical'\] \(or a list of them"


@pytest.fixture
def x2d() -> torch.Tensor:
    return torch.tensor(blobs(0, n=40, d=2))


@pytest.fixture
def batch() -> torch.Tensor:
    """``(2, 3, 20, 2)``: six series in two batch dims."""
    return torch.tensor(np.random.default_rng(0).normal(size=(2, 3, 20, 2)))


# -- X ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_x_names_how_many_series_and_the_first(batch, bad):
    batch[0, 1, 3, 0] = bad
    batch[1, 2, 5, 1] = bad
    with pytest.raises(ValueError, match=r"X contains (NaN|inf|NaN or inf) in 2 of 6 series \(first: \(0, 1\)\)"):
        torchgmm.fit(batch, 2)


def test_non_finite_x_in_one_series_names_it(x2d):
    x2d[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"X contains NaN"):
        torchgmm.fit(x2d, 2)


def test_more_components_than_points_raises(x2d):
    with pytest.raises(ValueError, match=r"n_components=5 .*n_samples=3"):
        torchgmm.fit(x2d[:3], 5)


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.complex128])
def test_bool_or_complex_x_is_a_type_error(x2d, dtype):
    with pytest.raises(TypeError, match=rf"X must be real numeric, got dtype {re.escape(str(dtype))}"):
        torchgmm.fit(x2d.to(dtype), 2)


@pytest.mark.parametrize("array", [np.zeros((10, 2), dtype=bool), np.zeros((10, 2), dtype=complex)])
def test_bool_or_complex_numpy_x_is_a_type_error(array):
    with pytest.raises(TypeError, match=r"X must be real numeric"):
        torchgmm.fit(array, 2)


def test_integer_x_is_cast_to_the_default_float(x2d):
    ints = (x2d * 10).round().to(torch.int64)
    from_int = quiet_fit(ints, 2, random_state=0)
    from_float = quiet_fit(ints.to(torch.get_default_dtype()), 2, random_state=0)

    assert from_int.means.dtype == torch.get_default_dtype()
    for a, b in zip(from_int.params, from_float.params):
        assert torch.equal(a, b)


def test_single_sample_raises_mentioning_n_samples_1():
    with pytest.raises(ValueError, match=r"n_samples=1"):
        torchgmm.fit(torch.randn(1, 2), 1)
    with pytest.raises(ValueError, match=r"n_samples=1"):
        torchgmm.fit(torch.randn(4, 1, 2), 1)


def test_zero_features_raises():
    with pytest.raises(ValueError, match=r"X has 0 feature\(s\) \(shape=\(5, 0\)\)"):
        torchgmm.fit(torch.randn(5, 0), 1)


def test_scalar_x_raises():
    with pytest.raises(ValueError, match=r"X must have shape"):
        torchgmm.fit(torch.tensor(1.0), 1)


# -- settings (checked at fit, named with their value) -----------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(covariance_type="bad"), rf"covariance_type='bad' is not supported; choose one of {COV_NAMES}"),
        (dict(init_params="bad"), rf"init_params='bad' is not supported; choose one of {INIT_NAMES}"),
        (dict(init_params=["kmeans", "bad"]), r"init_params=\['kmeans', 'bad'\] is not supported"),
        (dict(reg_covar=-1e-3), r"reg_covar must be >= 0.*reg_covar=-0.001"),
        (dict(tol=-1.0), r"tol must be >= 0.*tol=-1.0"),
        (dict(max_iter=-1), r"max_iter must be >= 0.*max_iter=-1"),
        (dict(n_init=0), r"n_init must be >= 1.*n_init=0"),
        (dict(n_components=0), r"n_components must be >= 1.*n_components=0"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_invalid_setting_raises_at_fit_naming_it(x2d, settings, message):
    settings = {"n_components": 2, **settings}
    model = GaussianMixture(**settings)  # constructing is fine, as in scikit-learn
    with pytest.raises(ValueError, match=message):
        model.fit(x2d)


@pytest.mark.parametrize("name, value", [("n_components", 2.0), ("max_iter", 1.5), ("n_init", True)])
def test_non_integer_count_setting_is_a_type_error(x2d, name, value):
    with pytest.raises(TypeError, match=rf"{name} must be an int"):
        torchgmm.fit(x2d, **{"n_components": 2, name: value})


# -- sample_weight --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda n: -torch.ones(n), ValueError, r"sample_weight contains negative values"),
        (lambda n: torch.ones(n - 1), ValueError, r"sample_weight has shape \(39,\) but X has shape \(40, 2\)"),
        (lambda n: torch.full((n,), float("nan")), ValueError, r"sample_weight contains NaN"),
        (lambda n: torch.ones(n, dtype=torch.bool), TypeError, r"sample_weight must be real numeric"),
    ],
    ids=["negative", "mis-shaped", "nan", "bool"],
)
def test_invalid_sample_weight_raises_naming_it(x2d, make, error, message):
    with pytest.raises(error, match=message):
        torchgmm.fit(x2d, 2, sample_weight=make(len(x2d)))


def test_all_zero_sample_weight_raises_unbatched(x2d):
    with pytest.raises(ValueError, match=r"sample_weight is zero everywhere"):
        torchgmm.fit(x2d, 2, sample_weight=torch.zeros(len(x2d)))


# -- initial parameters -----------------------------------------------------------------------
def test_mis_shaped_means_init_raises_with_both_shapes(batch):
    with pytest.raises(ValueError, match=r"means_init has shape \(3, 2\); expected \(2, 2\) or \(2, 3, 2, 2\)"):
        torchgmm.fit(batch, 2, means_init=torch.zeros(3, 2))


def test_mis_shaped_means_init_of_one_dataset_names_one_shape():
    with pytest.raises(ValueError, match=r"means_init has shape \(3, 1\); expected \(2, 1\)$"):
        torchgmm.fit(torch.randn(10), 2, means_init=[[0.0], [1.0], [2.0]])


def test_means_init_with_wrong_batch_dims_raises(batch):
    with pytest.raises(ValueError, match=r"means_init has batch shape \(5,\).*batch shape \(2, 3\)"):
        torchgmm.fit(batch, 2, means_init=torch.zeros(5, 2, 2))


def test_mis_shaped_weights_init_raises(batch):
    with pytest.raises(ValueError, match=r"weights_init has shape \(3,\); expected \(2,\)"):
        torchgmm.fit(batch, 2, weights_init=torch.ones(3) / 3)


def test_weights_init_not_summing_to_one_raises(x2d):
    with pytest.raises(ValueError, match=r"weights_init must sum to 1"):
        torchgmm.fit(x2d, 2, weights_init=[0.3, 0.3])


def test_negative_weights_init_raises(x2d):
    with pytest.raises(ValueError, match=r"weights_init must be finite and non-negative"):
        torchgmm.fit(x2d, 2, weights_init=[1.5, -0.5])


def valid_precisions(cov_type: str, k: int = 2, d: int = 2) -> torch.Tensor:
    shape = torchgmm.get_covariance(cov_type).covariance_shape(k, d)
    if cov_type in ("full", "tied"):
        return torch.eye(d, dtype=torch.float64).expand(shape).clone()
    return torch.ones(shape, dtype=torch.float64)


def test_mis_shaped_precisions_init_raises_with_the_expected_shape(x2d, cov_type):
    expected = torchgmm.get_covariance(cov_type).covariance_shape(2, 2)
    wrong = valid_precisions(cov_type, k=3)
    if wrong.shape == expected:  # tied: no K axis, so add a feature instead
        wrong = valid_precisions(cov_type, d=3)
    with pytest.raises(ValueError, match=rf"precisions_init has shape .*expected {re.escape(str(expected))}"):
        torchgmm.fit(x2d, 2, covariance_type=cov_type, precisions_init=wrong)


def test_non_positive_definite_precisions_init_raises(x2d, cov_type):
    bad = valid_precisions(cov_type)
    if cov_type in ("full", "tied"):
        bad[..., 0, 1] = bad[..., 1, 0] = 2.0  # symmetric, eigenvalues 3 and -1
    else:
        bad[0] = -1.0
    with pytest.raises(ValueError, match=rf"precisions_init must be .*positive.* for covariance_type='{cov_type}'"):
        torchgmm.fit(x2d, 2, covariance_type=cov_type, precisions_init=bad)


def test_asymmetric_precisions_init_raises(x2d):
    bad = torch.eye(2, dtype=torch.float64).repeat(2, 1, 1)
    bad[:, 0, 1] = 0.5
    with pytest.raises(ValueError, match=r"precisions_init must be symmetric positive definite"):
        torchgmm.fit(x2d, 2, precisions_init=bad)


# -- using a model ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: m.predict(x),
        lambda m, x: m.predict_proba(x),
        lambda m, x: m.score(x),
        lambda m, x: m.score_samples(x),
        lambda m, x: m.bic(x),
        lambda m, x: m.aic(x),
        lambda m, x: m.sample(3),
        lambda m, x: m(x),
    ],
    ids=["predict", "predict_proba", "score", "score_samples", "bic", "aic", "sample", "forward"],
)
def test_using_an_unfitted_model_raises_not_fitted(x2d, call):
    with pytest.raises(NotFittedError, match=r"not fitted yet; call fit"):
        call(GaussianMixture(2), x2d)


@pytest.fixture(scope="module")
def fitted_2d() -> GaussianMixture:
    return GaussianMixture(2, random_state=0).fit(torch.tensor(blobs(0, n=40, d=2)))


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score", "score_samples", "bic"])
def test_wrong_number_of_features_at_predict_raises(fitted_2d, method):
    with pytest.raises(ValueError, match=r"X has 3 features, but .* expecting 2"):
        getattr(fitted_2d, method)(torch.randn(5, 3, dtype=torch.float64))


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score", "score_samples"])
def test_non_finite_x_at_predict_raises(fitted_2d, method):
    x = torch.zeros(5, 2, dtype=torch.float64)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"X contains NaN"):
        getattr(fitted_2d, method)(x)


@pytest.fixture(scope="module")
def fitted_batch() -> GaussianMixture:
    """Fitted on ``(2, 3, 20, 2)``: batch shape ``(2, 3)``."""
    x = torch.tensor(np.random.default_rng(1).normal(size=(2, 3, 20, 2)))
    return quiet_model(GaussianMixture(2, random_state=0, max_iter=5), x)


def quiet_model(model: GaussianMixture, x) -> GaussianMixture:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        return model.fit(x)


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score", "score_samples", "bic", "aic"])
def test_x_whose_batch_shape_does_not_broadcast_raises_naming_both_shapes(fitted_batch, method):
    with pytest.raises(ValueError, match=r"X has batch shape \(5,\) \(shape \(5, 20, 2\)\), which does not broadcast "
                                         r"against the model's batch shape \(2, 3\); pass X of shape \(2, 3, N, D\)"):
        getattr(fitted_batch, method)(torch.zeros(5, 20, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"X has batch shape \(3, 2\)"):
        getattr(fitted_batch, method)(torch.zeros(3, 2, 20, 2, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(20, 2), (3, 20, 2), (2, 1, 20, 2), (2, 3, 20, 2)])
def test_x_whose_batch_shape_broadcasts_is_scored_against_every_mixture(fitted_batch, shape):
    x = torch.tensor(np.random.default_rng(2).normal(size=shape))
    scores = fitted_batch.score_samples(x)
    assert scores.shape == (2, 3, 20)
    full = x.expand(2, 3, 20, 2)
    torch.testing.assert_close(scores, fitted_batch.score_samples(full), rtol=0, atol=0)
    assert fitted_batch.predict(x).shape == (2, 3, 20)


@pytest.mark.parametrize(
    "value, error, message",
    [
        ("abc", TypeError, r"random_state must be None, an int seed >= 0 or a torch.Generator, got 'abc' of type str"),
        (1.5, TypeError, r"random_state must be None, an int seed >= 0 or a torch.Generator, got 1.5 of type float"),
        (True, TypeError, r"random_state must be None, an int seed >= 0 .*got True of type bool"),
        (-1, ValueError, r"random_state must be an int seed in \[0, 2\*\*64 - 1\].*got random_state=-1"),
        (2**64, ValueError, r"random_state must be an int seed in \[0, 2\*\*64 - 1\]"),
    ],
)
def test_invalid_random_state_says_what_is_accepted(x2d, value, error, message):
    with pytest.raises(error, match=message):
        GaussianMixture(2, random_state=value).fit(x2d)


@pytest.mark.parametrize("value, error", [("abc", TypeError), (1.5, TypeError), (-1, ValueError)])
def test_invalid_random_state_at_sample_says_what_is_accepted(fitted_2d, value, error):
    with pytest.raises(error, match=r"random_state must be"):
        fitted_2d.sample(3, random_state=value)


@pytest.mark.parametrize("value", [None, 0, np.int64(3), 2**64 - 1, torch.Generator().manual_seed(1)])
def test_valid_random_states_are_accepted(value):
    from torchgmm.validation import check_random_state

    check_random_state(value)  # no error
    assert torchgmm.init.make_generator(value).initial_seed() >= 0


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score", "score_samples"])
def test_nan_at_predict_on_a_model_fitted_with_omit_says_to_remove_or_impute(x2d, method):
    x = x2d.clone()
    x[3, 0] = float("nan")
    model = quiet_model(GaussianMixture(2, nan_policy="omit", random_state=0), x)  # fitting with NaN is fine
    with pytest.raises(ValueError, match=r"X contains NaN at 1 of 40 samples \(first: row 3\); points with NaN cannot "
                                         r"be scored or predicted .*remove or impute them") as info:
        getattr(model, method)(x)
    assert "nan_policy='omit'" not in str(info.value)


def test_sample_needs_a_positive_count(fitted_2d):
    with pytest.raises(ValueError, match=r"n_samples must be a positive int, got 0"):
        fitted_2d.sample(0)


# -- devices --------------------------------------------------------------------------------
@pytest.mark.cuda
def test_init_on_another_device_than_x_raises_naming_both(x2d):
    x = x2d.cuda()
    with pytest.raises(ValueError, match=r"means_init is on cpu but X is on cuda"):
        torchgmm.fit(x, 2, means_init=torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sample_weight is on cpu but X is on cuda"):
        torchgmm.fit(x, 2, sample_weight=torch.ones(len(x2d), dtype=torch.float64))


@pytest.mark.cuda
def test_cuda_fit_matches_cpu_fit_and_stays_on_cuda(x2d):
    init = dict(weights_init=[0.5, 0.5], means_init=x2d[:2].numpy(), precisions_init=np.stack([np.eye(2)] * 2), max_iter=50, tol=1e-8)
    on_cpu = quiet_fit(x2d, 2, **init)
    on_cuda = quiet_fit(x2d.cuda(), 2, **init)

    assert on_cuda.means.device.type == "cuda"
    assert int(on_cuda.n_iter) == int(on_cpu.n_iter)
    torch.testing.assert_close(on_cuda.means.cpu(), on_cpu.means, rtol=1e-9, atol=1e-9)
    model = GaussianMixture(2, random_state=0).fit(x2d.cuda())  # k-means init on the device
    assert model.means_.device.type == "cuda"
    assert model.predict(x2d.cuda()).device.type == "cuda"
