"""The compiled path (``compile=True``) is the same computation as eager.

``torch.compile`` fuses the E-step with the statistics and the k-means steps; ``_ops.matmul``
rewrites some products as broadcast multiply-sums while tracing. Both must leave the numbers
alone: in float64 a compiled fit equals the eager fit from the same seed to rounding, for every
covariance type, in both regimes of ``matmul`` (univariate data: fused products; D = 5: BLAS
products inside the graph).
"""

from __future__ import annotations

import pytest
import torch

import torchgmm
from torchgmm._compile import AUTO_COMPILE_WORK, should_compile
from torchgmm._ops import matmul
from conftest import blobs

COV_TYPES = ("full", "tied", "diag", "spherical")


@pytest.mark.parametrize(
    "a_shape, b_shape",
    [
        ((3, 4, 200, 1), (3, 4, 1, 1)),  # one term: a product
        ((3, 4, 200, 3), (3, 4, 3, 3)),  # few terms: fused when compiled
        ((3, 4, 5, 200), (3, 4, 200, 5)),  # a reduction over points into 25 outputs: BLAS
        ((3, 4, 1, 200), (3, 4, 200, 5)),  # a reduction over points into 5 outputs: fused
        ((3, 4, 200, 6), (3, 4, 6, 6)),  # a contraction over 6 features: BLAS
    ],
)
def test_matmul_equals_the_product_eager_and_compiled(a_shape, b_shape):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(a_shape, generator=gen, dtype=torch.float64)
    b = torch.randn(b_shape, generator=gen, dtype=torch.float64)
    expected = a @ b
    torch.testing.assert_close(matmul(a, b), expected, rtol=1e-12, atol=1e-12)
    compiled = torch.compile(matmul, dynamic=False)
    torch.testing.assert_close(compiled(a, b), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("d", [1, 5])
def test_compiled_fit_equals_eager_fit(cov_type, d):
    if d == 1 and cov_type != "full":
        pytest.skip("univariate: one covariance type is enough")
    x = torch.stack([torch.tensor(blobs(seed, n=150, d=d, overlap=1.0)) for seed in range(3)])  # (3, 150, d)
    settings = dict(covariance_type=cov_type, n_init=2, tol=1e-8, max_iter=200, random_state=0, warn=False)
    eager = torchgmm.fit(x, 3, compile=False, **settings)
    fused = torchgmm.fit(x, 3, compile=True, **settings)
    assert torch.equal(eager.n_iter, fused.n_iter)
    torch.testing.assert_close(fused.restart_lower_bounds, eager.restart_lower_bounds, rtol=0, atol=1e-10)
    # Restarts that reach the same optimum (components permuted) tie up to rounding: compare the
    # parameters where both chose the same restart (most series).
    same = eager.best_restart == fused.best_restart
    assert int(same.sum()) >= 2
    for name in ("log_weights", "means", "prec_chol"):
        torch.testing.assert_close(getattr(fused.params, name)[same], getattr(eager.params, name)[same], rtol=1e-7, atol=1e-8)


def test_auto_compiles_only_large_fits():
    assert should_compile("auto", AUTO_COMPILE_WORK) and not should_compile("auto", AUTO_COMPILE_WORK / 2)
    assert should_compile(True, 1.0) and not should_compile(False, 1e20)
