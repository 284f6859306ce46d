"""Optional ``torch.compile`` of the pure hot functions (E-step + statistics, k-means step).

Fusion, not batching, is where the speed is: compiled, the E-step and the statistics become one
pass over the data with no ``(K, N)`` temporaries. Only the batch dim (dim 0 of every tensor
argument) is dynamic, so the working set can shrink as members converge without recompiling;
points, components and features stay static, which lets the inner loops vectorize.

If compilation fails (no C++ compiler, an unsupported backend), the eager function is used from
then on, with one warning.
"""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["compiled", "should_compile"]

# Work bound (members x N x K x D x max_iter) from which "auto" compiles. A cold compile takes
# 10-20 s on a 2-core CPU (a few seconds once torch's on-disk cache holds the graphs); measured
# there, eager EM runs ~3e8 point-component-features per second and the compiled step 5-15x more,
# while EM typically stops after 5-20% of max_iter. So below ~1e10 one fit rarely repays a cold
# compile; pass compile=True to fit many problems of the same shape in one process.
AUTO_COMPILE_WORK = 1e10


def should_compile(setting, work: float, n_features: int | None = None) -> bool:
    """``"auto"``: compile when the work bound is large (any device, D >= 2: contractions over
    features stay BLAS calls inside the compiled graph, see ``_ops.matmul``). Univariate data
    (``n_features == 1``) never compile under "auto": their eager E-step is two matrix products
    and a few element-wise passes (``stats.univariate_statistics``), within ~2x of the compiled
    step, while a cold compile costs 10-20 s on a 2-core CPU."""
    if setting == "auto":
        return work >= AUTO_COMPILE_WORK and n_features != 1
    return bool(setting)


def _mark_batch_dynamic(value):
    if isinstance(value, torch.Tensor):
        if value.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(value, 0)
    elif isinstance(value, tuple):
        for item in value:
            _mark_batch_dynamic(item)


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """``fn`` compiled with a dynamic batch dim, falling back to ``fn`` if compilation fails."""
    # Each covariance type, dtype and data layout is its own graph; leave room for all of them.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compiled_fn = torch.compile(fn, dynamic=False)
    state = {"failed": False}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if state["failed"]:
            return fn(*args, **kwargs)
        for arg in args:
            _mark_batch_dynamic(arg)
        try:
            return compiled_fn(*args, **kwargs)
        except Exception as err:  # compiler missing or backend failure: stay correct, go eager
            state["failed"] = True
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); using eager mode", RuntimeWarning)
            return fn(*args, **kwargs)

    return wrapper
