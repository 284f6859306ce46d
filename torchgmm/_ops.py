"""Small tensor helpers shared by the core."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# While compiling, a product contracting at most this many terms, or with at most this many
# outputs per batch member, is written as a broadcast multiply-sum (fused with its neighbours).
_FUSE_MAX_TERMS = 4
_FUSE_MAX_OUTPUTS = 16


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``a (..., n, m)``, ``b (..., m, p)``.

    Eager: a BLAS call, except for ``m <= 2`` (a product or a sum of two, element-wise: as fast,
    and rounded the same whatever the batch shape, where BLAS kernels differ by shape). While
    ``torch.compile`` traces, a contraction over few terms (``m <= 4``: e.g. univariate data) or
    into few outputs (``n * p <= 16`` per batch member: the statistics' sums over points) is a
    broadcast multiply-sum, which Inductor fuses with the surrounding element-wise work instead of
    forcing the inputs to memory for an opaque matmul. Other products (contractions over 5 or
    more features into data-sized results, scatters into D x D) stay BLAS calls: Inductor's own
    loops were 5-35x slower there on the CPU (D = 8 and 16).
    """
    m = a.shape[-1]
    if m <= 2 or (
        torch.compiler.is_compiling() and (m <= _FUSE_MAX_TERMS or a.shape[-2] * b.shape[-1] <= _FUSE_MAX_OUTPUTS)
    ):
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    return a @ b


# Multiply-adds below which ``product`` stays element-wise: a BLAS call on a tiny product costs more
# than the product, and MKL's threads spin-wait on a busy machine (measured: a 50-point fit 20x
# slower with two threads on a loaded 2-core machine when its products went to BLAS).
_BLAS_MIN_WORK = 1 << 16


def exp_normal(t: Tensor, inplace: bool = False) -> Tensor:
    """``exp(t)`` with ``t`` raised to ``log(tiny) + 1`` first: the result is a normal number
    (``>= 3e-38`` in float32), never 0 or subnormal. torch's vectorized CPU ``exp`` takes a path
    6-15x slower for arguments whose result underflows (float32 below -87, float64 below -708),
    and the joint log-probabilities of far components are just that (measured: a block of W1's
    E-step 6.3 ms -> 0.5 ms). Callers use it where such terms are negligible next to a sum of
    order one (responsibilities, normalized by their sum); a weight that must stay exactly 0
    is kept by its own mask."""
    floor = math.log(torch.finfo(t.dtype).tiny) + 1.0
    return t.clamp_min_(floor).exp_() if inplace else t.clamp_min(floor).exp_()


def broadcast_shapes(*shapes) -> torch.Size:
    """``torch.broadcast_shapes`` without its first-call cost: torch's version imports its
    symbolic-shapes machinery (sympy, ~0.4 s) on first use, which a fit would pay on its first call."""
    if torch.compiler.is_compiling():
        return torch.broadcast_shapes(*shapes)
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if out[i] not in (1, size):
                    raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = size
    return torch.Size(out)


def product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (broadcasting batch dims): BLAS for large products, a broadcast multiply-sum for
    small ones (fewer than ``_BLAS_MIN_WORK`` multiply-adds), whose kernels are below torch's
    parallel grain and never wait for a thread."""
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2]).numel()
    if batch * a.shape[-2] * a.shape[-1] * b.shape[-1] >= _BLAS_MIN_WORK:
        return a @ b
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def even_slices(n: int, max_size: int) -> list[slice]:
    """``range(n)`` cut into the fewest slices of at most ``max_size``, their sizes differing by at
    most one (no small remainder: a block of one row would make the compiled step recompile)."""
    count = max(1, -(-n // max(1, max_size)))  # at least one (possibly empty) slice
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
