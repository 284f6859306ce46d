"""Shared harness of torchgmm's core tests: data makers, scikit-learn oracles, fit comparisons.

Every covariance type runs through the same helpers (the ``cov_type`` fixture), float64 unless a
test says otherwise, fixed seeds everywhere.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg  # noqa: F401  (load every BLAS before limiting the thread pools below)
import sklearn.mixture  # noqa: F401
import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torchgmm  # noqa: E402
from torchgmm import ConvergenceWarning, DegenerateWarning, FitResult, FitStatus  # noqa: E402

# The tests fit small problems: one thread (torch's and BLAS's, which scikit-learn uses) avoids
# oversubscription; on two shared cores the default pools made a 5-series fit ~100x slower.
torch.set_num_threads(1)
threadpool_limits(1)

COV_TYPES = ("full", "tied", "diag", "spherical")
SEED_SERIES_CSV = ROOT / "torchgmm" / "data" / "seed_series.csv"
# The value the bundled 50-point time series repeats (13 times in torchgmm/data/seed_series.csv;
# the report that came with the series says 14), forward-filled: where random initializations collapse.
REPEATED_VALUE = 44.44571429


@pytest.fixture(params=COV_TYPES)
def cov_type(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# -- data ------------------------------------------------------------------------------------
def blobs(seed: int, n: int = 300, d: int = 2, k: int = 3, spread: float = 4.0, overlap: float = 1.0) -> np.ndarray:
    """``(n, d)`` float64 points from ``k`` anisotropic, correlated Gaussian clusters.

    ``spread`` sets the distance between centres, ``overlap`` scales every cluster's size, so
    ``overlap`` near 1 gives EM a few dozen iterations and small values separate clusters well.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, spread, (k, d))
    sizes = rng.multinomial(n - 10 * k, np.full(k, 1.0 / k)) + 10
    parts = []
    for c, m in zip(centres, sizes):
        a = rng.normal(0.0, 1.0, (d, d)) * overlap
        parts.append(c + rng.normal(0.0, 1.0, (m, d)) @ a)
    x = np.concatenate(parts)
    return x[rng.permutation(n)]


def seed_series() -> np.ndarray:
    """The bundled 50-point time series on which a hand-written NumPy EM failed (see docs), ``(50,)`` float64."""
    return np.loadtxt(SEED_SERIES_CSV, delimiter=",", skiprows=1, usecols=1)


def sklearn_init(x: np.ndarray, k: int, cov_type: str, seed: int = 0) -> dict:
    """``weights_init``, ``means_init``, ``precisions_init`` of scikit-learn's default (k-means)
    initialization, read from ``GaussianMixture(max_iter=0)``."""
    from sklearn.mixture import GaussianMixture

    sk = GaussianMixture(k, covariance_type=cov_type, max_iter=0, random_state=seed).fit(x)
    precisions = sk.precisions_cholesky_ ** 2 if cov_type in ("diag", "spherical") else None
    if precisions is None:
        u = sk.precisions_cholesky_
        precisions = u @ np.swapaxes(u, -1, -2)
    return dict(weights_init=sk.weights_.copy(), means_init=sk.means_.copy(), precisions_init=precisions)


def stack_inits(inits: list[dict]) -> dict:
    """Per-series initial parameters stacked along a new leading batch dim."""
    return {key: np.stack([i[key] for i in inits]) for key in inits[0]}


# -- comparisons ----------------------------------------------------------------------------
def rel_err(actual, expected) -> float:
    """Largest elementwise ``|a - e| / |e|``, with ``|e|`` floored at 1e-6 of the array's largest
    magnitude (so an entry that is ~0, such as an off-diagonal covariance, is not divided by ~0)."""
    a = np.asarray(torch.as_tensor(actual).detach().cpu().double() if isinstance(actual, torch.Tensor) else actual, dtype=np.float64)
    e = np.asarray(torch.as_tensor(expected).detach().cpu().double() if isinstance(expected, torch.Tensor) else expected, dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    if a.size == 0:
        return 0.0
    floor = max(1e-6 * float(np.max(np.abs(e))), 1e-300)
    return float(np.max(np.abs(a - e) / np.maximum(np.abs(e), floor)))


def index_result(result: FitResult, index) -> dict:
    """The per-series fields of ``result`` at batch ``index`` (an int or tuple), as a dict."""
    return dict(
        log_weights=result.params.log_weights[index],
        means=result.params.means[index],
        prec_chol=result.params.prec_chol[index],
        lower_bound=result.lower_bound[index],
        lower_bounds=result.lower_bounds[index],
        n_iter=result.n_iter[index],
        status=result.status[index],
        converged=result.converged[index],
    )


def assert_same_fit(batched: dict, solo: dict, rtol: float = 1e-9, atol: float = 1e-9, what: str = "") -> None:
    """Two fits of one series agree: parameters and lower bound to ``rtol``/``atol`` (rounding of a
    batched matmul may differ), iteration count, convergence and status exactly."""
    for key in ("n_iter", "status", "converged"):
        assert int(batched[key]) == int(solo[key]), f"{what}{key}: batched {int(batched[key])} != solo {int(solo[key])}"
    for key in ("log_weights", "means", "prec_chol", "lower_bound"):
        torch.testing.assert_close(batched[key], solo[key], rtol=rtol, atol=atol, msg=lambda m: f"{what}{key}: {m}")
    torch.testing.assert_close(batched["lower_bounds"], solo["lower_bounds"], rtol=rtol, atol=atol, equal_nan=True)


def solo_result(result: FitResult) -> dict:
    """``index_result`` of an unbatched fit."""
    return index_result(result, ())


def quiet_fit(*args, **kwargs) -> FitResult:
    """``torchgmm.fit`` with its summarized fit warnings silenced (tests that check warnings
    call ``fit`` directly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        return torchgmm.fit(*args, **kwargs)


# -- expected warnings ------------------------------------------------------------------------
# pyproject.toml turns torchgmm's warnings (FitWarning and its subclasses) into errors, so a test
# whose fit warns must say so. The messages of the two warnings torchgmm emits before fitting:
REG_COVAR_ABOVE_VARIANCE = r"reg_covar=\S+ is larger than the data variance"
FEWER_DISTINCT_POINTS = r"fewer distinct points than n_components"
SERIES_AS_FEATURES = r"If its rows are \d+ univariate series"


@contextlib.contextmanager
def warns_each(*expected):
    """Every ``(category, match)`` in ``expected`` is emitted inside the block (nested
    ``pytest.warns``); a warning that matches none of them is re-emitted, and fails the test."""
    with contextlib.ExitStack() as stack:
        recorders = [stack.enter_context(pytest.warns(category, match=match)) for category, match in expected]
        yield recorders[-1] if recorders else None


def _check_status_warnings(caught, result: FitResult, convergence: bool, allow) -> None:
    """The fit warnings in ``caught`` are exactly those ``result``'s statuses call for: one
    ``DegenerateWarning`` iff a series is DEGENERATE or worse, one ``ConvergenceWarning`` iff a
    series is NOT_CONVERGED (and ``convergence``); other warnings only if they match ``allow``."""
    status = result.status.reshape(-1)
    flagged = bool((status >= FitStatus.DEGENERATE).any())
    unconverged = convergence and bool((status == FitStatus.NOT_CONVERGED).any())
    degenerate = [w for w in caught if issubclass(w.category, DegenerateWarning)]
    converging = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(degenerate) == int(flagged), f"{len(degenerate)} DegenerateWarning(s) for statuses {result.status_counts()}"
    assert len(converging) == int(unconverged), f"{len(converging)} ConvergenceWarning(s) for statuses {result.status_counts()}"
    others = [w for w in caught if w not in degenerate and w not in converging]
    unexpected = [w for w in others if not any(re.search(pattern, str(w.message)) for pattern in allow)]
    assert not unexpected, f"unexpected warnings: {[f'{w.category.__name__}: {w.message}' for w in unexpected]}"


def status_checked_fit(*args, allow=(), **kwargs) -> FitResult:
    """``torchgmm.fit`` for a test about something else, whose data decide whether the fit warns
    (hypothesis examples, loops over seeds): the warnings are not silenced but checked against the
    statuses returned (see ``_check_status_warnings``); ``allow`` lists regexes of the other
    warnings this call may emit (``REG_COVAR_ABOVE_VARIANCE``, ``FEWER_DISTINCT_POINTS``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = torchgmm.fit(*args, **kwargs)
    _check_status_warnings(caught, result, kwargs.get("max_iter", 100) > 0, allow)
    return result


def status_checked_module_fit(model, *args, allow=(), **kwargs):
    """``model.fit(*args, **kwargs)`` (a ``GaussianMixture``) with its warnings checked as in
    :func:`status_checked_fit`; returns the model."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(*args, **kwargs)
    _check_status_warnings(caught, model.result_, model.max_iter > 0, allow)
    return model


@pytest.fixture
def seed_x() -> torch.Tensor:
    return torch.tensor(seed_series())
