"""Small tensor helpers shared by the core."""

from __future__ import annotations

import torch
from torch import Tensor


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``a (..., n, m)``, ``b (..., m, p)``.

    Eager: a BLAS call. While ``torch.compile`` traces: a broadcast multiply-sum, which Inductor
    fuses with the surrounding element-wise work into one pass (the inner dims here are small:
    features or components), instead of an opaque matmul that forces its inputs to memory.
    """
    if torch.compiler.is_compiling():
        return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    return a @ b
