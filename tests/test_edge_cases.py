"""Every row of the edge-cases table in ``docs/edge-cases.md``: one test per row, named after the
row's promise (``test_rowNN_...`` tests row NN).

"Error" means a ValueError/TypeError whose message names the argument, the shape and, in a batch,
the offending series. "Flag" means no exception: the series gets a status in ``status_`` and the
call emits one summarized warning. docs/robustness.md says which test checks each row.
"""

from __future__ import annotations

import importlib
import io
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import torchgmm
from torchgmm import FitStatus, FitWarning, GaussianMixture, GMMParams, NotFittedError, fit
from torchgmm.covariance import cholesky_with_jitter, get_covariance
from torchgmm.density import log_prob
from conftest import (
    COV_TYPES,
    FEWER_DISTINCT_POINTS,
    REG_COVAR_ABOVE_VARIANCE,
    blobs,
    quiet_fit,
    warns_each,
)

fit_module = importlib.import_module("torchgmm.fitting")
plan_module = importlib.import_module("torchgmm.plan")
em_module = importlib.import_module("torchgmm.em")
NAN = float("nan")


def caught_warnings(fn, *args, **kwargs):
    """``(result, [warnings])`` of ``fn(*args, **kwargs)``, every warning recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, caught


def of_category(caught, category) -> list:
    return [w for w in caught if issubclass(w.category, category)]


def without_warnings(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, failing on any warning at all (not only torchgmm's)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def two_clusters(n=60, d=2, seed=0, dtype=torch.float64):
    x = randn(n, d, seed=seed, dtype=dtype)
    x[: n // 2] += 6
    return x


def assert_finite(result) -> None:
    for t in result.params:
        assert bool(torch.isfinite(t).all()), "non-finite parameters"


def patch_em_step(monkeypatch, edit):
    """Wrap the EM step: ``edit(call_number, new, ll, ok) -> (new, ll, ok)`` (calls count from 1)."""
    real = em_module.em_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        return edit(calls["n"], *real(*args, **kwargs))

    monkeypatch.setattr(em_module, "em_step", step)
    return calls


# -- 1-3: non-finite input --------------------------------------------------------------------
def test_row01_nan_in_X_is_an_error_counting_series_and_naming_the_first_and_omit_masks_it():
    x = randn(10, 20, 2)
    x[7, 3, 0] = x[8, 1, 1] = x[9, 0, 0] = NAN
    with pytest.raises(ValueError, match=r"X contains NaN in 3 of 10 series \(first: \(7,\)\).*nan_policy='omit'"):
        fit(x, 2)
    with pytest.raises(ValueError, match=r"X contains NaN at 1 of 20 samples \(first: row 3\)"):
        fit(x[7], 2)
    # Opt in: NaN points become zero-weight padding.
    with pytest.warns(torchgmm.DegenerateWarning):  # incidental: K=2 on 20 points of noise collapses
        omitted = fit(x, 2, nan_policy="omit", random_state=0)
        padded = fit(torch.nan_to_num(x), 2, sample_weight=(~x.isnan().any(-1)).double(), random_state=0)
    torch.testing.assert_close(omitted.means, padded.means, rtol=0, atol=0)
    with pytest.raises(ValueError, match="nan_policy='mask' is not supported"):
        fit(x, 2, nan_policy="mask")  # the old alias is gone: one name per policy
    with pytest.warns(torchgmm.DegenerateWarning):
        alone = fit(torch.cat([x[7, :3], x[7, 4:]]), 2, random_state=0)  # the trimmed series alone
    torch.testing.assert_close(omitted.means[7], alone.means, rtol=1e-9, atol=1e-9)
    assert omitted.n_samples.tolist() == [20] * 7 + [19] * 3


def test_row02_inf_in_X_is_an_error_under_every_nan_policy():
    x = randn(4, 10, 2)
    x[2, 5, 1] = -math.inf
    for policy in ("raise", "omit"):
        with pytest.raises(ValueError, match=r"X contains inf in 1 of 4 series \(first: \(2,\)\)"):
            fit(x, 2, nan_policy=policy)
    x[1, 0, 0] = NAN
    with pytest.raises(ValueError, match="X contains NaN and inf in 2 of 4 series"):
        fit(x, 2)


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score_samples", "score", "bic", "aic"])
@pytest.mark.parametrize("bad", [NAN, math.inf])
def test_row03_nan_or_inf_at_predict_and_score_is_an_error_not_silent_nan(method, bad):
    gm = GaussianMixture(2, random_state=0).fit(two_clusters())
    x = two_clusters(seed=1)
    x[4, 0] = bad
    with pytest.raises(ValueError, match="X contains (NaN|inf)"):
        getattr(gm, method)(x)


# -- 4-10: degenerate data --------------------------------------------------------------------
@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_row04_constant_series_fits_with_variance_reg_covar_finite_bound_and_is_flagged(cov_type):
    x = torch.cat([torch.full((1, 30, 2), 3.0, dtype=torch.float64), two_clusters(30).unsqueeze(0)])
    with warns_each((FitWarning, REG_COVAR_ABOVE_VARIANCE + r".*\(first: series \(0,\)\)"),
                    (torchgmm.DegenerateWarning, r"series \(0,\): DEGENERATE")) as caught:
        result = fit(x, 1, covariance_type=cov_type, reg_covar=1e-6)
    assert result.status.tolist() == [FitStatus.DEGENERATE, FitStatus.OK]
    variances = get_covariance(cov_type).min_variance(result.covariances[0], 1)
    torch.testing.assert_close(variances, torch.full_like(variances, 1e-6), rtol=1e-6, atol=0)
    torch.testing.assert_close(result.means[0], torch.full((1, 2), 3.0, dtype=torch.float64))
    assert bool(torch.isfinite(result.lower_bound).all())
    assert len(of_category(caught, torchgmm.DegenerateWarning)) == 1


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random_from_data", "random"])
def test_row05_fewer_distinct_points_than_K_never_gives_nan_and_empty_components_get_weight_zero(cov_type, init_params):
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 2.0]] * 5, dtype=torch.float64)  # 2 distinct points, K = 4
    expected = [(torchgmm.DegenerateWarning, "DEGENERATE")]
    if init_params != "random":  # random responsibilities start no component on a point
        expected.insert(0, (FitWarning, FEWER_DISTINCT_POINTS))
    with warns_each(*expected):
        result = fit(x, 4, covariance_type=cov_type, init_params=init_params, random_state=0)
    assert_finite(result)
    assert bool(torch.isfinite(result.lower_bound))
    torch.testing.assert_close(result.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    if init_params != "random":  # random responsibilities may share a point's mass between components
        weights = result.weights.sort(descending=True).values
        assert float(weights[2:].max()) < 1e-6
    assert int(result.status) == FitStatus.DEGENERATE


def test_row05_fewer_distinct_points_than_K_warns_n_distinct():
    x = torch.tensor([[0.0]] * 5 + [[1.0]] * 5, dtype=torch.float64)
    with warns_each((FitWarning, r"1 series have fewer distinct points than n_components=3.*\(n distinct < K\)"),
                    (torchgmm.DegenerateWarning, "DEGENERATE")):
        fit(x, 3, random_state=0)


def test_row06_fewer_points_than_K_is_an_error_alone_and_flagged_insufficient_in_a_batch():
    with pytest.raises(ValueError, match=r"n_components=3.*n_samples=2"):
        fit(randn(2, 2), 3)
    x = randn(3, 10, 2)
    w = torch.ones(3, 10, dtype=torch.float64)
    w[1, 2:] = 0  # series 1 has 2 valid points for K = 3
    with warns_each((FitWarning, FEWER_DISTINCT_POINTS + r".*\(first: series \(1,\)\)"),
                    (torchgmm.DegenerateWarning, "INSUFFICIENT_DATA")) as caught:
        result = fit(x, 3, sample_weight=w, random_state=0)
    assert result.status[1] == FitStatus.INSUFFICIENT_DATA
    assert result.status[0] != FitStatus.INSUFFICIENT_DATA and result.status[2] != FitStatus.INSUFFICIENT_DATA
    assert_finite(result)
    assert len(of_category(caught, torchgmm.DegenerateWarning)) == 1
    alone = fit(x[0], 3, random_state=0)
    torch.testing.assert_close(result.means[0], alone.means, rtol=1e-9, atol=1e-9)


def test_row07_one_sample_is_an_error_mentioning_n_samples_1():
    with pytest.raises(ValueError, match="n_samples=1"):
        fit(randn(1, 3), 1)
    with pytest.raises(ValueError, match="n_samples=1"):
        GaussianMixture().fit(randn(4, 1, 3))


def test_row08_one_component_on_few_points_works_and_samples():
    gm = GaussianMixture(1)
    with pytest.warns(torchgmm.DegenerateWarning, match="DEGENERATE"):  # rank 1: flagged degenerate
        gm.fit(torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(gm.means_, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    x, labels = gm.sample(7, random_state=0)
    assert x.shape == (7, 2) and labels.shape == (7,) and bool(torch.isfinite(x).all())


def test_row09_univariate_data_as_N_or_N_by_1_and_the_estimator_rejects_1d_with_a_reshape_hint():
    values = two_clusters(40, d=1)
    a = GaussianMixture(2, random_state=0).fit(values)
    b = GaussianMixture(2, random_state=0).fit(values[:, 0])  # (N,) is one univariate series
    torch.testing.assert_close(a.means_, b.means_, rtol=0, atol=0)
    assert a.means_.shape == (2, 1) and a.predict(values[:, 0]).shape == (40,)
    from torchgmm.sklearn import GaussianMixture as Estimator

    with pytest.raises(ValueError, match="reshape"):
        Estimator(2).fit(values[:, 0].numpy())


def test_row10_high_dimension_few_points_stays_positive_definite_and_is_flagged():
    x = randn(2, 12, 20)  # 12 points in 20 dimensions: every full covariance is singular
    with pytest.warns(torchgmm.DegenerateWarning, match="2 of 2") as caught:
        result = fit(x, 1, random_state=0)
    assert bool((torch.linalg.cholesky_ex(result.covariances).info == 0).all())
    assert_finite(result)
    assert result.status.tolist() == [FitStatus.DEGENERATE] * 2
    assert len(of_category(caught, torchgmm.DegenerateWarning)) == 1


def test_row10_high_dimension_few_points_warning_suggests_diag():
    with pytest.warns(torchgmm.FitWarning) as record:
        fit(randn(12, 20), 1, random_state=0)
    messages = [str(w.message) for w in record]
    assert any("consider covariance_type='diag'" in m for m in messages if "flagged" in m)
    # 12 rows of 20 numbers: also asked whether these are 12 series of 20 points (once)
    assert sum("fit X[..., None] (shape (12, 20, 1))" in m for m in messages) == 1


# -- 11-14: scale, offset, conditioning -------------------------------------------------------
def test_row11_huge_scale_fits_in_float64_without_inf_or_nan():
    x = two_clusters(60) * 1e30
    result = fit(x, 2, random_state=0)
    assert_finite(result)
    assert int(result.status) == FitStatus.OK
    small = fit(x / 1e30, 2, random_state=0, reg_covar=1e-6 / 1e60)
    torch.testing.assert_close(result.means / 1e30, small.means, rtol=1e-9, atol=1e-9)


def test_row11_huge_scale_whose_variance_overflows_float32_is_an_error_suggesting_float64():
    x = two_clusters(60, dtype=torch.float32) * 1e30  # variance 1e60: not representable in float32
    with pytest.raises(ValueError, match=r"overflows torch.float32.*float64"):
        fit(x, 2, random_state=0)
    result = fit(two_clusters(60, dtype=torch.float32) * 1e18, 2, random_state=0)  # representable: fits
    assert_finite(result)
    assert bool(torch.isfinite(result.covariances).all()) and int(result.status) == FitStatus.OK


def test_row11_float32_overflow_error_names_the_offending_series():
    batch = torch.stack([two_clusters(60, dtype=torch.float32), two_clusters(60, dtype=torch.float32) * 1e30])
    with pytest.raises(ValueError, match=r"series \(1,\)"):
        fit(batch, 2, random_state=0)


@pytest.mark.cuda
def test_row11_huge_scale_in_float32_on_cuda_is_the_same_error_not_a_linalg_failure():
    with pytest.raises(ValueError, match="overflows"):
        fit((two_clusters(60) * 1e30).float().cuda(), 2, random_state=0)
    result = fit((two_clusters(60) * 1e18).float().cuda(), 2, random_state=0)
    assert_finite(result)
    result.summary()


def test_row12_tiny_scale_fits_finite_and_flags_the_reg_covar_dominated_fit():
    x = two_clusters(60) * 1e-30
    with warns_each((FitWarning, REG_COVAR_ABOVE_VARIANCE), (torchgmm.DegenerateWarning, "DEGENERATE")) as caught:
        result = fit(x, 2, random_state=0)
    assert_finite(result)
    assert int(result.status) == FitStatus.DEGENERATE  # every variance is reg_covar
    assert len(of_category(caught, torchgmm.DegenerateWarning)) == 1
    scaled = fit(x, 2, random_state=0, reg_covar=1e-6 * 1e-60)  # reg_covar scaled with the data: a sane fit
    assert int(scaled.status) == FitStatus.OK


def test_row12_tiny_scale_warns_that_reg_covar_exceeds_the_data_variance():
    with warns_each((FitWarning, r"reg_covar=1e-06 is larger than the data variance of 1 series.*lower reg_covar"),
                    (torchgmm.DegenerateWarning, "DEGENERATE")):
        fit(two_clusters(60) * 1e-30, 2, random_state=0)


def test_row13_large_offset_uses_centred_statistics():
    noise = randn(500, 1, seed=3)
    for offset, dtype, rtol in ((1e8, torch.float64, 1e-7), (1e4, torch.float32, 1e-3)):
        x = (noise + offset).to(dtype)
        result = fit(x, 1, reg_covar=0.0)
        data = x.double()
        expected = (data - data.mean()).square().mean()  # two-pass variance of the same numbers
        assert float(result.covariances.reshape(())) == pytest.approx(float(expected), rel=rtol)
        assert float(result.means.reshape(())) == pytest.approx(float(data.mean()), rel=1e-7)


@pytest.mark.parametrize("condition", [1e2, 1e4, 1e6, 1e8])
def test_row14_ill_conditioned_log_density_matches_the_float64_oracle_within_the_documented_tolerance(condition):
    """docs/robustness.md: |error| <= 1e-13 * cond in float64, <= 2e-6 * (1 + sqrt(cond)) in float32."""
    rng = np.random.default_rng(int(math.log10(condition)))
    cov = get_covariance("full")
    d = 5
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sigma = (q * np.logspace(0, math.log10(condition), d)) @ q.T
    mean = rng.normal(size=d) * 10
    x = rng.multivariate_normal(mean, sigma, size=300)
    oracle = multivariate_normal(mean, sigma).logpdf(x)
    prec_chol, ok = cov.prec_chol_from_covariance(torch.tensor(sigma)[None], torch.zeros(1, dtype=torch.float64))
    params = GMMParams(torch.zeros(1, dtype=torch.float64), torch.tensor(mean)[None], prec_chol)
    lp64 = log_prob(torch.tensor(x), params, cov).numpy()
    lp32 = log_prob(torch.tensor(x, dtype=torch.float32), params.map(lambda t: t.float()), cov).double().numpy()
    assert np.abs(lp64 - oracle).max() <= 1e-13 * condition + 1e-12
    assert np.abs(lp32 - oracle).max() <= 2e-6 * (1 + math.sqrt(condition))


# -- 15-19: dtypes and shapes -----------------------------------------------------------------
def test_row15_integer_X_is_cast_to_the_default_float_and_bool_complex_object_are_errors():
    x = torch.randint(0, 20, (40, 2), generator=torch.Generator().manual_seed(0))
    result = fit(x, 2, random_state=0)
    assert result.means.dtype == torch.get_default_dtype()
    assert fit(x.numpy().astype(np.int32), 2, random_state=0).means.dtype == torch.get_default_dtype()
    for bad in (torch.ones(5, 2, dtype=torch.bool), np.ones((5, 2), dtype=complex), torch.ones(5, 2, dtype=torch.complex64),
                np.array([[1.0, "a"], [2.0, "b"]], dtype=object), [[1.0], [2.0, 3.0]]):
        with pytest.raises(TypeError, match="X"):
            fit(bad, 1)


def test_row16_float64_is_preserved_end_to_end():
    x = two_clusters()
    gm = GaussianMixture(2, random_state=0).fit(x)
    outputs = [gm.weights_, gm.means_, gm.covariances_, gm.precisions_cholesky_, gm.predict_proba(x),
               gm.score_samples(x), gm.score(x), gm.bic(x), gm.lower_bound_, gm(x), gm.sample(3)[0]]
    assert all(t.dtype == torch.float64 for t in outputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row17_half_precision_is_upcast_to_float32_for_the_linear_algebra(dtype):
    x = two_clusters(dtype=torch.float32).to(dtype)
    gm = GaussianMixture(2, random_state=0).fit(x)
    assert gm.means_.dtype == torch.float32 and gm.predict_proba(x).dtype == torch.float32
    reference = GaussianMixture(2, random_state=0).fit(x.float())
    torch.testing.assert_close(gm.means_, reference.means_)


@pytest.mark.parametrize("batch_shape", [(0,), (0, 3), (3, 0)])
def test_row18_empty_batch_returns_an_empty_shape_correct_result(batch_shape):
    result = without_warnings(fit, torch.zeros(*batch_shape, 10, 2), 3, covariance_type="diag")
    assert result.batch_shape == batch_shape
    assert result.means.shape == (*batch_shape, 3, 2) and result.precisions_cholesky.shape == (*batch_shape, 3, 2)
    assert result.status.shape == batch_shape and result.lower_bounds.shape[:-1] == batch_shape
    assert "0 fit(s)" in result.summary() or "fit(s)" in result.summary()


def test_row19_zero_samples_or_zero_features_is_an_error_showing_the_shape():
    with pytest.raises(ValueError, match=r"0 feature\(s\) \(shape=\(5, 0\)\)"):
        fit(torch.zeros(5, 0), 1)
    with pytest.raises(ValueError, match=r"0 sample\(s\) \(shape=\(0, 2\)"):
        fit(torch.zeros(0, 2), 1)
    with pytest.raises(ValueError, match=r"0 feature\(s\) \(shape=\(4, 5, 0\)\)"):
        fit(torch.zeros(4, 5, 0), 1)


# -- 20-26: masks, layouts, devices -----------------------------------------------------------
def test_row20_ragged_series_padded_with_zero_weight_equal_each_trimmed_series_alone():
    lengths = [30, 18, 25]
    x = torch.full((3, 30, 2), 1e3, dtype=torch.float64)  # junk in the padding
    w = torch.zeros(3, 30, dtype=torch.float64)
    series = [two_clusters(n, seed=s) for s, n in enumerate(lengths)]
    for s, (n, values) in enumerate(zip(lengths, series)):
        x[s, :n], w[s, :n] = values, 1.0
    batch = fit(x, 2, sample_weight=w, n_init=2, random_state=0)
    for s, values in enumerate(series):
        alone = fit(values, 2, n_init=2, random_state=0)
        torch.testing.assert_close(batch.means[s], alone.means, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(batch.covariances[s], alone.covariances, rtol=1e-9, atol=1e-12)
        assert int(batch.n_iter[s]) == int(alone.n_iter) and int(batch.n_samples[s]) == lengths[s]


def test_row21_all_masked_series_is_flagged_empty_without_touching_neighbours_or_gradients():
    x = randn(3, 20, 2)
    w = torch.ones(3, 20, dtype=torch.float64)
    w[1] = 0
    gm = GaussianMixture(2, random_state=0)
    with pytest.warns(torchgmm.DegenerateWarning, match=r"series \(1,\): EMPTY") as caught:
        gm.fit(x, sample_weight=w)
    assert gm.status_.tolist()[1] == FitStatus.EMPTY and gm.status_[0] != FitStatus.EMPTY
    assert gm.lower_bound_[1] == -math.inf and bool(torch.isfinite(gm.lower_bound_[[0, 2]]).all())
    assert len(of_category(caught, torchgmm.DegenerateWarning)) == 1
    assert all(bool(torch.isfinite(p).all()) for p in gm.parameters())
    neighbours = fit(x[[0, 2]], 2, random_state=0)
    torch.testing.assert_close(gm.means_[[0, 2]], neighbours.means, rtol=1e-9, atol=1e-9)
    gm(x).sum().backward()  # the layer on every series, the empty one included
    assert all(bool(torch.isfinite(p.grad).all()) for p in gm.parameters())


def test_row21_empty_series_is_not_described_as_collapsed():
    w = torch.ones(2, 20, dtype=torch.float64)
    w[1] = 0
    with pytest.warns(torchgmm.DegenerateWarning, match=r"series \(1,\): EMPTY"):
        result = fit(randn(2, 20, 2), 2, sample_weight=w, random_state=0)
    assert "collapsed" not in result.describe((1,))


def test_row22_sample_weight_of_wrong_dtype_or_shape_is_an_error_showing_both_shapes():
    x = randn(3, 10, 2)
    with pytest.raises(TypeError, match=r"sample_weight must be real numeric.*torch.bool.*to\(X.dtype\)"):
        fit(x, 2, sample_weight=torch.ones(3, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"sample_weight has shape \(3, 9\) but X has shape \(3, 10, 2\).*\(3, 10\)"):
        fit(x, 2, sample_weight=torch.ones(3, 9))
    with pytest.warns(torchgmm.DegenerateWarning):  # incidental: K=2 on 10 points of noise collapses
        result = fit(x, 2, sample_weight=torch.ones(10), random_state=0)  # broadcasts over the batch
    assert result.batch_shape == (3,)


def test_row23_non_contiguous_expanded_and_transposed_X_give_the_same_result():
    base = two_clusters(40)
    reference = fit(base, 2, random_state=0)
    transposed = base.T.contiguous().T
    strided = torch.zeros(40, 4, dtype=torch.float64)
    strided[:, ::2] = base
    assert not transposed.is_contiguous() and not strided[:, ::2].is_contiguous()
    for variant in (transposed, strided[:, ::2]):
        # the same fit; a strided layout may only change the summation order (rounding)
        torch.testing.assert_close(fit(variant, 2, random_state=0).means, reference.means, rtol=1e-12, atol=1e-12)
    expanded = base.expand(3, 40, 2)  # a stride-0 batch
    batch = fit(expanded, 2, random_state=0)
    for s in range(3):
        torch.testing.assert_close(batch.means[s], reference.means, rtol=1e-12, atol=1e-12)


def test_row24_X_requiring_grad_leaves_no_graph_behind():
    x = two_clusters().requires_grad_(True)
    result = fit(x, 2, random_state=0)
    assert all(t.grad_fn is None and not t.requires_grad for t in result.params)
    gm = GaussianMixture(2, random_state=0).fit(x)
    assert all(p.grad_fn is None for p in gm.parameters())
    assert x.grad is None


def test_row25_init_parameters_on_another_device_are_an_error_naming_both_devices():
    x = two_clusters()
    with pytest.raises(ValueError, match=r"means_init is on meta but X is on cpu"):
        fit(x, 2, means_init=torch.zeros(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"sample_weight is on meta but X is on cpu"):
        fit(x, 2, sample_weight=torch.ones(60, device="meta"))


@pytest.mark.cuda
def test_row25_cuda_fit_keeps_tensors_on_the_device_and_refits():
    x = two_clusters().cuda()
    gm = GaussianMixture(2, random_state=0).fit(x)
    assert gm.means_.device.type == "cuda" and gm.predict(x).device.type == "cuda"
    gm.fit(x * 2)  # refit on cuda
    assert gm.means_.device.type == "cuda"
    with pytest.raises(ValueError, match="cpu.*cuda|cuda.*cpu"):
        fit(x, 2, means_init=torch.zeros(2, 2))
    cpu = GaussianMixture(2, random_state=0).fit(x.cpu())
    torch.testing.assert_close(gm.fit(x).means_.cpu(), cpu.means_, rtol=1e-6, atol=1e-6)


def test_row26_read_only_and_memory_mapped_numpy_input_works(tmp_path):
    data = two_clusters().numpy()
    path = tmp_path / "x.npy"
    np.save(path, data)
    mapped = np.load(path, mmap_mode="r")
    read_only = data.copy()
    read_only.setflags(write=False)
    reference = fit(data, 2, random_state=0)
    for variant in (mapped, read_only):
        result = without_warnings(fit, variant, 2, random_state=0)  # no "non-writable array" warning either
        torch.testing.assert_close(result.means, reference.means, rtol=0, atol=0)


# -- 27-30: settings --------------------------------------------------------------------------
def test_row27_max_iter_zero_returns_the_initialization_without_a_convergence_warning():
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    means = torch.tensor([[0.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    precisions = torch.stack([2 * torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)])
    result = without_warnings(fit, two_clusters(), 2, max_iter=0, weights_init=weights, means_init=means,
                              precisions_init=precisions)
    torch.testing.assert_close(result.weights, weights)
    torch.testing.assert_close(result.means, means)
    torch.testing.assert_close(result.precisions, precisions)
    assert int(result.n_iter) == 0 and not bool(result.converged)
    assert bool(torch.isfinite(result.lower_bound))


def test_row28_tol_zero_runs_to_max_iter_and_warns_not_converged():
    with pytest.warns(torchgmm.ConvergenceWarning, match=r"1 of 1 fit\(s\) did not converge \(max_iter was reached\)") as caught:
        result = fit(blobs(0, n=200), 3, tol=0.0, max_iter=15, random_state=0)
    assert int(result.n_iter) == 15 and not bool(result.converged)
    assert len(of_category(caught, torchgmm.ConvergenceWarning)) == 1


@pytest.mark.parametrize(
    "setting, value, error",
    [("reg_covar", -1e-3, ValueError), ("tol", -1.0, ValueError), ("max_iter", -1, ValueError),
     ("n_components", 0, ValueError), ("n_init", 0, ValueError), ("max_iter", 2.5, TypeError),
     ("reg_covar", NAN, ValueError), ("covariance_type", "banded", ValueError), ("init_params", "magic", ValueError)],
)
def test_row29_bad_settings_are_an_error_at_fit_naming_the_setting_and_value(setting, value, error):
    kwargs = {"n_components": 2, setting: value}
    gm = GaussianMixture(**kwargs)  # never at construction (scikit-learn convention)
    with pytest.raises(error, match=setting):
        gm.fit(two_clusters())
    with pytest.raises(error, match=repr(value) if isinstance(value, str) else setting):
        fit(two_clusters(), **kwargs)


def test_row30_bad_sample_weight_is_an_error_and_a_zero_series_is_flagged_empty():
    x = randn(10, 2)
    for weights, match in ((torch.zeros(10), "zero everywhere"), (-torch.ones(10), "negative"),
                           (torch.full((10,), NAN), "NaN"), (torch.full((10,), math.inf), "inf")):
        with pytest.raises(ValueError, match=f"sample_weight.*{match}|{match}"):
            fit(x, 1, sample_weight=weights)
    w = torch.ones(2, 10, dtype=torch.float64)
    w[0] = 0
    with pytest.warns(torchgmm.DegenerateWarning, match=r"series \(0,\): EMPTY"):
        result = fit(randn(2, 10, 2), 1, sample_weight=w)
    assert result.status.tolist()[0] == FitStatus.EMPTY and result.status[1] != FitStatus.EMPTY


# -- 31-35: failures during the fit -----------------------------------------------------------
def test_row31_a_failed_m_step_flags_diverged_and_keeps_the_last_finite_parameters(monkeypatch):
    x = torch.as_tensor(np.stack([blobs(s, n=200, spread=1.5) for s in range(3)]))  # slow to converge: no compaction yet
    settings = dict(tol=1e-12, max_iter=40, random_state=0)

    def fail_series_1_at_iteration_4(call, new, ll, ok):
        if call == 4:
            new = new._replace(means=new.means.clone())
            new.means[1] = NAN  # what a broken M-step leaves behind
            ok = ok.clone()
            ok[1] = False
        return new, ll, ok

    patch_em_step(monkeypatch, fail_series_1_at_iteration_4)
    result, caught = caught_warnings(fit, x, 3, **settings)
    monkeypatch.undo()
    assert result.status[1] == FitStatus.DIVERGED and not bool(result.converged[1])
    assert_finite(result)
    three_steps = quiet_fit(x[1], 3, **{**settings, "max_iter": 3})  # the parameters before the failure
    torch.testing.assert_close(result.means[1], three_steps.means, rtol=1e-10, atol=1e-10)
    clean = quiet_fit(x[[0, 2]], 3, **settings)
    torch.testing.assert_close(result.means[[0, 2]], clean.means, rtol=1e-9, atol=1e-9)
    assert len(of_category(caught, torchgmm.DegenerateWarning)) == 1


def test_row31_cholesky_jitter_retries_only_the_failed_members():
    good = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    chol, ok = cholesky_with_jitter(torch.stack([good, singular, good]), torch.tensor(1e-6, dtype=torch.float64))
    assert ok.tolist() == [True, True, True]
    torch.testing.assert_close(chol[0], torch.linalg.cholesky(good), rtol=0, atol=0)
    torch.testing.assert_close(chol[2], torch.linalg.cholesky(good), rtol=0, atol=0)
    assert bool(torch.isfinite(chol[1]).all())
    _, ok = cholesky_with_jitter(torch.full((1, 2, 2), NAN, dtype=torch.float64), torch.tensor(1e-6, dtype=torch.float64))
    assert ok.tolist() == [False]


def test_row32_nan_lower_bound_is_a_divergence_and_the_best_finite_restart_is_kept(monkeypatch):
    x = blobs(1, n=150)

    def nan_restart_0_at_iteration_3(call, new, ll, ok):
        if call == 3:
            ll = ll.clone()
            ll[..., 0] = NAN
        return new, ll, ok

    patch_em_step(monkeypatch, nan_restart_0_at_iteration_3)
    result = quiet_fit(x, 3, n_init=2, random_state=0, tol=1e-8)
    assert int(result.best_restart) == 1
    assert result.status != FitStatus.DIVERGED and bool(torch.isfinite(result.lower_bound))

    def nan_everywhere_at_iteration_3(call, new, ll, ok):
        return new, torch.full_like(ll, NAN) if call == 3 else ll, ok

    patch_em_step(monkeypatch, nan_everywhere_at_iteration_3)
    result = quiet_fit(x, 3, n_init=2, random_state=0, tol=1e-8)
    assert int(result.status) == FitStatus.DIVERGED
    assert_finite(result)
    assert bool(torch.isfinite(result.lower_bound))


def test_row33_far_apart_points_stay_in_log_space():
    x = torch.cat([randn(30, 2), randn(30, 2, seed=1) + 1e4])
    gm = GaussianMixture(2, random_state=0).fit(x)
    far = torch.tensor([[5e3, 5e3], [-1e5, 1e5]], dtype=torch.float64)  # densities underflow in linear space
    scores = gm.score_samples(far)
    assert bool(torch.isfinite(scores).all()) and bool((scores < -1e3).all())
    proba = gm.predict_proba(far)
    assert bool(torch.isfinite(proba).all())
    torch.testing.assert_close(proba.sum(-1), torch.ones(2, dtype=torch.float64))


def test_row34_best_of_n_init_restarts_and_fit_predict_equals_fit_then_predict():
    x = blobs(2, n=200, k=4)
    result = fit(x, 4, n_init=5, init_params="random_from_data", random_state=0)
    assert float(result.lower_bound) == float(result.restart_lower_bounds.max())
    assert int(result.best_restart) == int(result.restart_lower_bounds.argmax())
    gm = GaussianMixture(4, n_init=5, init_params="random_from_data", random_state=0)
    labels = gm.fit_predict(x)
    assert torch.equal(labels, GaussianMixture(4, n_init=5, init_params="random_from_data", random_state=0).fit(x).predict(x))


def test_row35_keyboard_interrupt_stops_at_an_iteration_boundary_with_a_consistent_best_so_far_model(monkeypatch):
    x = torch.as_tensor(np.stack([blobs(s, n=150) for s in range(4)]))

    def interrupt_at_call_6(call, new, ll, ok):
        if call == 6:
            raise KeyboardInterrupt
        return new, ll, ok

    patch_em_step(monkeypatch, interrupt_at_call_6)
    gm = GaussianMixture(3, tol=1e-12, max_iter=100, random_state=0)
    _, caught = caught_warnings(gm.fit, x)
    monkeypatch.undo()
    assert gm.result_.interrupted
    assert not bool(gm.converged_.any()) and gm.n_iter_.tolist() == [5] * 4
    assert all(bool(torch.isfinite(p).all()) for p in gm.parameters())
    five = GaussianMixture(3, tol=1e-12, max_iter=5, random_state=0)
    caught_warnings(five.fit, x)
    torch.testing.assert_close(gm.means_, five.means_, rtol=0, atol=0)  # exactly the 5-iteration model
    messages = [str(w.message) for w in of_category(caught, torchgmm.ConvergenceWarning)]
    assert len(messages) == 1 and "interrupted" in messages[0]


def test_row35_keyboard_interrupt_can_be_re_raised(monkeypatch):
    def interrupt(call, new, ll, ok):
        raise KeyboardInterrupt

    patch_em_step(monkeypatch, interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit(two_clusters(), 2, catch_interrupt=False)


# -- 36-41: state, determinism, the estimator contract, memory ---------------------------------
def test_row36_state_dict_round_trips_as_plain_tensors_and_rejects_mismatched_models():
    x = randn(2, 50, 3)
    gm = GaussianMixture(2, covariance_type="diag", random_state=0).fit(x)
    buffer = io.BytesIO()
    torch.save(gm.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, map_location="cpu", weights_only=True)
    restored = GaussianMixture(2, covariance_type="diag")
    restored.load_state_dict(state)
    assert torch.equal(restored.predict(x), gm.predict(x)) and torch.equal(restored.status_, gm.status_)
    torch.testing.assert_close(restored.score_samples(x), gm.score_samples(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="n_components=3"):
        GaussianMixture(3, covariance_type="diag").load_state_dict(state)
    with pytest.raises(ValueError, match="covariance_type='full'"):
        GaussianMixture(2, covariance_type="full").load_state_dict(state)
    other = GaussianMixture(2, covariance_type="diag", random_state=0).fit(randn(5, 50, 3))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(state)


@pytest.mark.cuda
def test_row36_state_dict_saved_on_cuda_loads_on_cpu(tmp_path):
    x = randn(2, 50, 3)
    gm = GaussianMixture(2, random_state=0).fit(x.cuda())
    torch.save(gm.state_dict(), tmp_path / "gmm.pt")
    restored = GaussianMixture(2)
    restored.load_state_dict(torch.load(tmp_path / "gmm.pt", map_location="cpu", weights_only=True))
    assert restored.means_.device.type == "cpu"
    assert torch.equal(restored.predict(x), gm.predict(x.cuda()).cpu())


def test_row37_same_seed_is_bitwise_identical_on_cpu_and_never_touches_the_global_rng():
    x = torch.as_tensor(np.stack([blobs(s, n=100) for s in range(3)]))
    state = torch.random.get_rng_state()
    a = fit(x, 3, n_init=3, init_params="k-means++", random_state=7)
    torch.manual_seed(123)  # the global RNG must not matter
    b = fit(x, 3, n_init=3, init_params="k-means++", random_state=7)
    for ta, tb in zip(a.params, b.params):
        assert torch.equal(ta, tb)
    assert torch.equal(a.lower_bounds, b.lower_bounds) or bool(torch.equal(a.lower_bounds.isnan(), b.lower_bounds.isnan()))
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    fit(x, 3, random_state=None)
    assert torch.equal(torch.random.get_rng_state(), state)
    alone = fit(x[1], 3, n_init=3, init_params="k-means++", random_state=7)
    torch.testing.assert_close(a.means[1], alone.means, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", ["predict", "predict_proba", "score_samples", "score", "bic", "aic", "forward"])
def test_row38_using_an_unfitted_model_raises_not_fitted_error(method):
    gm = GaussianMixture(2)
    with pytest.raises(NotFittedError, match="not fitted"):
        getattr(gm, method)(two_clusters())
    with pytest.raises(NotFittedError):
        gm.sample(3)


def test_row39_a_different_number_of_features_at_predict_is_an_error():
    gm = GaussianMixture(2, random_state=0).fit(two_clusters(d=2))
    with pytest.raises(ValueError, match="X has 3 features, but the model is expecting 2 features"):
        gm.predict(randn(10, 3))


def test_row40_refitting_gives_the_same_predictions():
    x = blobs(3, n=150)
    gm = GaussianMixture(3, n_init=2, random_state=0)
    first = gm.fit(x).predict(x)
    means = gm.means_.clone()
    assert torch.equal(gm.fit(x).predict(x), first)
    assert torch.equal(gm.means_, means)


def test_row41_chunking_over_points_bounds_memory_without_changing_the_result():
    x = torch.as_tensor(np.stack([blobs(s, n=300) for s in range(2)]))
    with pytest.warns(torchgmm.DegenerateWarning):  # incidental: one series' fit collapses, chunked or not
        whole = fit(x, 3, random_state=0)
        chunked = fit(x, 3, random_state=0, memory_budget=20_000)  # a few dozen points per chunk
        by_hand = fit(x, 3, random_state=0, chunk_size=7)
    for other in (chunked, by_hand):
        torch.testing.assert_close(other.means, whole.means, rtol=1e-9, atol=1e-9)
        assert torch.equal(other.n_iter, whole.n_iter)


@pytest.mark.parametrize("n_restarts, k, n, d", [(10, 3, 500, 1), (3, 4, 1000, 8), (1, 16, 1_000_000, 16), (1, 64, 50_000, 64), (5, 2, 10**7, 2)])
@pytest.mark.parametrize("budget", [plan_module.DEFAULT_MEMORY_BUDGET, 100_000])
def test_row41_blocks_and_chunks_bound_the_working_set_whatever_n(n_restarts, k, n, d, budget):
    """The working data of a block (members x points x K x (D + 2) numbers) stays within the
    block size (or one row's minimum chunk), however many points; small rows are not chunked."""
    itemsize = 4
    chunk, members = plan_module.blocking(1000, n_restarts, k, n, d, itemsize, budget, None, torch.device("cpu"))
    points = chunk or n
    block_bytes = min(plan_module.BLOCK_BYTES, budget)
    chunk_bytes = min(plan_module.CHUNK_BYTES, budget)
    per_point = k * (d + 2) * itemsize
    row_bytes = n_restarts * per_point * n
    assert (chunk is None) == (row_bytes <= chunk_bytes)
    if chunk is not None:
        assert n_restarts * per_point * chunk <= max(chunk_bytes, n_restarts * per_point * plan_module.MIN_CHUNK)
    floor = plan_module.MIN_CHUNK if chunk_bytes == plan_module.CHUNK_BYTES else 1
    assert members * per_point * points <= max(block_bytes, n_restarts * per_point * floor)
    assert members >= 1 and (chunk is None or chunk >= floor)
    if chunk is None:  # whole rows per block, as many as fit
        assert (members + n_restarts) * per_point * n > block_bytes


def test_row41_on_cuda_all_series_form_one_block_bounded_by_the_budget():
    """The GPU wants large launches: no cache blocks there, only the memory budget chunks."""
    chunk, members = plan_module.blocking(100_000, 10, 3, 500, 1, 4, plan_module.DEFAULT_MEMORY_BUDGET, None, torch.device("cuda"))
    assert members >= 100_000 * 10
    assert chunk is not None and 100_000 * 10 * 3 * 3 * 4 * chunk <= plan_module.DEFAULT_MEMORY_BUDGET


def test_row41_an_impossible_request_is_an_error_estimating_the_bytes_before_allocating(monkeypatch):
    def must_not_allocate(*args, **kwargs):
        raise AssertionError("initialize() was reached: the parameters would have been allocated")

    monkeypatch.setattr(fit_module, "initialize", must_not_allocate)
    x = torch.zeros(10, 50, 200, dtype=torch.float64)  # parameters: 10 * 1000 * 50 * 200**2 * 8 bytes = 160 GB
    with pytest.warns(FitWarning, match=REG_COVAR_ABOVE_VARIANCE):  # incidental: the data are constant
        with pytest.raises(MemoryError, match="GiB|GB|bytes"):
            fit(x, 50, n_init=1000)


# -- status and warnings: one summarized warning per call --------------------------------------
def test_flagged_series_get_a_status_each_and_the_call_one_summarized_warning():
    x = torch.as_tensor(np.stack([blobs(s, n=60) for s in range(6)]))
    x[1] = 2.0  # constant
    w = torch.ones(6, 60, dtype=torch.float64)
    w[3] = 0  # empty
    w[4, 2:] = 0  # 2 points for K = 3
    gm = GaussianMixture(3, random_state=0, max_iter=200)
    with warns_each((FitWarning, REG_COVAR_ABOVE_VARIANCE + r".*\(first: series \(1,\)\)"),
                    (FitWarning, FEWER_DISTINCT_POINTS + r".*\(first: series \(1,\)\)"),
                    (torchgmm.DegenerateWarning, r"3 of 6 fit\(s\) are flagged")) as caught:
        gm.fit(x, sample_weight=w)
    status = gm.status_.tolist()
    assert status[1] == FitStatus.DEGENERATE and status[3] == FitStatus.EMPTY and status[4] == FitStatus.INSUFFICIENT_DATA
    assert [status[i] for i in (0, 2, 5)] == [FitStatus.OK] * 3  # so no ConvergenceWarning either
    assert len(of_category(caught, torchgmm.DegenerateWarning)) == 1
    assert "series (1,)" in gm.summary()
    named = gm.summary(names=["a", "const", "c", "gone", "two", "f"])  # a file's series ids in place of indices
    assert "series 'const': DEGENERATE" in named and "series 'gone': EMPTY" in named
    assert "series 'two': INSUFFICIENT_DATA" in named and "(1,)" not in named
    with pytest.raises(ValueError, match="names has 2 entries for a batch of 6 series"):
        gm.summary(names=["a", "b"])
