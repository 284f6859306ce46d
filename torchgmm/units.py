"""Units, in one place: the per-series standardization of the data and the conversion of
parameters and log-likelihoods between data units and the standardized units the core works in.

Every fit works on ``xs = (x - shift) / scale`` per series (one number ``scale`` per series, so
every covariance type maps back exactly); ``reg_covar`` is rescaled alike. Log-densities differ by
the Jacobian: ``log p_data(x) = log p_std(xs) - D log(scale)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .covariance import Covariance
from .density import GMMParams

__all__ = ["standardize", "Scaling"]


def standardize(x: Tensor, w: Tensor, reg_covar: float, unit_weights: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-series centring and scaling of ``x (B, N, D)`` with weights ``w (B, N)``.

    Returns ``(xs, shift (B, D), scale (B,), reg (B,))`` with ``xs = (x - shift) / scale`` (zero
    where ``w == 0``) and ``reg = reg_covar / scale**2``. ``scale`` is the root mean variance over
    features (one number, so every covariance type maps back exactly), floored at
    ``sqrt(reg_covar)`` so that a constant or tiny-scale series never divides by ~0.
    ``unit_weights``: every weight is 1 (the same numbers without the masks and products).
    """
    tiny = torch.finfo(x.dtype).tiny
    if unit_weights:
        w_total = float(x.shape[-2])

        def masked(t: Tensor) -> Tensor:
            return t

        weighted = masked
    else:
        w_col = w.unsqueeze(-1)  # (B, N, 1)
        valid = w_col > 0  # padding may hold anything finite, however large
        w_total = w.sum(-1, keepdim=True).clamp_min(tiny)  # (B, 1)

        def masked(t: Tensor) -> Tensor:
            return torch.where(valid, t, 0.0)

        def weighted(t: Tensor) -> Tensor:
            return w_col * t
    # Sums of values and squares are taken relative to the largest magnitude, so they cannot
    # overflow even where x**2 would (|x| > 1.8e19 in float32).
    big = masked(x.abs()).amax((-2, -1)).clamp_min(tiny)  # (B,)
    shift = weighted(masked(x / big.view(-1, 1, 1))).sum(-2) / w_total * big.unsqueeze(-1)  # (B, D)
    centred = masked(x - shift.unsqueeze(-2))
    spread = centred.abs().amax((-2, -1)).clamp_min(tiny)  # (B,)
    var = weighted((centred / spread.view(-1, 1, 1)).square()).sum(-2) / w_total  # (B, D), in spread^2
    scale = (var.mean(-1).sqrt() * spread).clamp_min(math.sqrt(reg_covar))
    scale = torch.where(scale > 0, scale, 1.0)
    xs = centred / scale.view(-1, 1, 1)
    return xs, shift, scale, reg_covar / scale.square()


class Scaling(NamedTuple):
    """The standardization ``xs = (x - shift) / scale`` of a batch of series."""

    shift: Tensor  # (B, D)
    scale: Tensor  # (B,)

    def to_standard(self, params: GMMParams, cov: Covariance) -> GMMParams:
        """Parameters in data units ``(B, ...)`` -> standardized units."""
        return GMMParams(
            params.log_weights,
            (params.means - self.shift.unsqueeze(-2)) / self.scale[:, None, None],
            cov.rescale(params.prec_chol, self.scale.reciprocal()),
        )

    def to_data(self, params: GMMParams, cov: Covariance) -> GMMParams:
        """Standardized parameters ``(B, ...)`` -> data units."""
        return GMMParams(
            params.log_weights,
            self.shift.unsqueeze(-2) + self.scale[:, None, None] * params.means,
            cov.rescale(params.prec_chol, self.scale),
        )

    def log_lik_to_data(self, values: Tensor, n_features: int) -> Tensor:
        """Mean log-likelihoods ``(B, ...)`` in standardized units -> data units."""
        log_scale = torch.log(self.scale)
        return values - n_features * log_scale.reshape(log_scale.shape + (1,) * (values.dim() - 1))

    def log_lik_to_standard(self, values: Tensor, n_features: int) -> Tensor:
        """Mean log-likelihoods ``(B, ...)`` in data units -> standardized units."""
        log_scale = torch.log(self.scale)
        return values + n_features * log_scale.reshape(log_scale.shape + (1,) * (values.dim() - 1))
