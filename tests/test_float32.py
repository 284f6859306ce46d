"""float32 stress suite: large offsets, tiny and huge scales, duplicate points, more components than
clusters, fewer points per component than dimensions. In float32 a fit must raise nothing, contain
no NaN or inf anywhere, and reach a mean log-likelihood within 1e-3 of the float64 fit of the same
numbers from the same start."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch

from torchgmm import GaussianMixture
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

from conftest import COV_TYPES, REG_COVAR_ABOVE_VARIANCE, SERIES_AS_FEATURES, blobs, seed_series, status_checked_module_fit

OFFSETS = (0.0, 1e4, 1e6)
SCALES = (1e-4, 1.0, 1e4)
LOGLIK_TOL = 1e-3
SETTINGS = dict(tol=0.0, max_iter=60)  # the same number of iterations in both precisions
# With fewer points than dimensions a full covariance has eigenvalues at reg_covar. float32 resolves
# an eigenvalue only above ~D * eps * (largest variance) ~ 1e-6 relative, so there reg_covar is set
# relative to the data's variance (docs/robustness.md); everywhere else it is the default 1e-6.
RELATIVE_REG_COVAR = {"fewer_points_per_component_than_dimensions": 1e-3}


def dataset(kind: str) -> tuple[np.ndarray, int]:
    """``(X (N, D) float64, K)`` for each stress case."""
    if kind == "well_separated":
        return blobs(0, n=200, d=2, k=3), 3
    if kind == "duplicate_points":
        return np.repeat(blobs(1, n=60, d=2, k=2), 5, axis=0), 2
    if kind == "more_components_than_clusters":
        return blobs(2, n=200, d=2, k=2, spread=8.0, overlap=0.5), 5
    if kind == "fewer_points_per_component_than_dimensions":
        return blobs(3, n=30, d=12, k=3), 3  # 10 points per component in 12 dimensions
    if kind == "bundled_series":  # the 50-point series a hand-written NumPy EM failed on: forward-filled repeats
        return seed_series().reshape(-1, 1), 3
    raise ValueError(kind)


KINDS = ("well_separated", "duplicate_points", "more_components_than_clusters",
         "fewer_points_per_component_than_dimensions", "bundled_series")


def same_start(x: np.ndarray, k: int, cov_type: str, reg_covar: float) -> dict:
    """scikit-learn's k-means start (computed once, in float64) for ``cov_type``."""
    # Rounded to float32, the points at a large offset and a small scale collapse onto fewer
    # distinct values than K: scikit-learn's k-means says so.
    collapsed = len(np.unique(x, axis=0)) < k
    with pytest.warns(SklearnConvergenceWarning, match="Number of distinct clusters") if collapsed else contextlib.nullcontext():
        start = SklearnGaussianMixture(k, covariance_type=cov_type, reg_covar=reg_covar, max_iter=0, random_state=0).fit(x)
    # Rounded to float32, so that both fits really start from the same numbers (at an offset of 1e4
    # float32 rounds a mean by ~5e-4, which is a large step for data with a spread of 1e-4).
    as32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731
    return dict(weights_init=start.weights_, means_init=as32(start.means_), precisions_init=start.precisions_, reg_covar=reg_covar)


def fitted(x: torch.Tensor, k: int, cov_type: str, start: dict, scale: float) -> GaussianMixture:
    """The fit; it may flag DEGENERATE and always stops at max_iter (tol=0): its warnings are
    checked against its statuses. Data of spread 1e-4 lie below sqrt(reg_covar) = 1e-3: there
    the fit may also say that reg_covar exceeds the data variance."""
    gm = GaussianMixture(k, covariance_type=cov_type, **start, **SETTINGS)
    allow = (REG_COVAR_ABOVE_VARIANCE,) if scale < 1 else ()
    if x.shape[-1] >= 8:  # 12 dimensions from 30 points: the shape guard asks whether these are series
        allow = allow + (SERIES_AS_FEATURES,)
    return status_checked_module_fit(gm, x, allow=allow)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_float32_fit_is_finite_and_matches_float64_from_the_same_start(kind, cov_type, offset, scale):
    values, k = dataset(kind)
    x32 = torch.as_tensor(values * scale + offset).float()  # the float32 numbers ...
    x64 = x32.double()  # ... and exactly the same numbers in float64
    reg_covar = RELATIVE_REG_COVAR.get(kind, 0.0) * float(x64.var(0).mean()) or 1e-6
    start = same_start(x64.numpy(), k, cov_type, reg_covar)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow / invalid-value warnings either
        gm32 = fitted(x32, k, cov_type, start, scale)
        gm64 = fitted(x64, k, cov_type, start, scale)

        assert gm32.means_.dtype == torch.float32
        for name, value in [(n, p) for n, p in gm32.named_parameters()] + [
            ("lower_bound_", gm32.lower_bound_),
            ("lower_bounds_", gm32.lower_bounds_[: int(gm32.n_iter_)]),
            ("weights_", gm32.weights_),
            ("precisions_cholesky_", gm32.precisions_cholesky_),
            ("score_samples", gm32.score_samples(x32)),
            ("predict_proba", gm32.predict_proba(x32)),
            ("score", gm32.score(x32)),
        ]:
            assert bool(torch.isfinite(value).all()), f"{name} is not finite"
        torch.testing.assert_close(gm32.predict_proba(x32).sum(-1), torch.ones(len(x32)), rtol=0, atol=1e-5)

    difference = abs(float(gm32.lower_bound_) - float(gm64.lower_bound_))
    assert difference <= LOGLIK_TOL, f"float32 mean log-likelihood differs from float64 by {difference:.3g}"
