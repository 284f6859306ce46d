"""THE log-density of a Gaussian mixture. Every consumer calls it: EM's E-step, the gradient mode,
``GaussianMixture.forward``, ``score_samples``, ``predict`` and ``predict_proba``.

Parameters are a :class:`GMMParams` with the batch in front: ``log_weights (*B, K)``,
``means (*B, K, D)`` and ``prec_chol`` in the covariance type's shape (see ``covariance``).
Data ``x (*B, N, D)`` broadcasts against the parameters' batch dims (restarts included: params
``(*B, R, ...)`` against data ``(*B, 1, N, D)`` — a view, never a copy).

Internally the component axis comes before the point axis, ``(*B, K, N)``, so reductions over
points run over contiguous memory; the public functions return scikit-learn's ``(*B, N, K)``
as a transposed view.

Pure, differentiable tensor functions; no validation here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .covariance import LOG_2PI, Covariance, get_covariance

__all__ = [
    "GMMParams",
    "joint_log_prob",
    "joint_log_prob_and_diff",
    "component_log_prob",
    "log_prob",
    "log_responsibilities",
    "responsibilities",
]


class GMMParams(NamedTuple):
    """Mixture parameters, batch in front. ``prec_chol`` is in the covariance type's shape."""

    log_weights: Tensor  # (*B, K)
    means: Tensor  # (*B, K, D)
    prec_chol: Tensor  # (*B, K, D, D) | (*B, D, D) | (*B, K, D) | (*B, K)

    def map(self, fn) -> "GMMParams":
        """Apply ``fn`` to each tensor (e.g. ``lambda t: t.detach()``)."""
        return GMMParams(*(fn(t) for t in self))


def joint_log_prob(x: Tensor, params: GMMParams, covariance_type: str | Covariance) -> Tensor:
    """``log w_k + log N(x_n | mu_k, Sigma_k)`` as ``(*B, K, N)``."""
    return joint_log_prob_and_diff(x, params, covariance_type)[0]


def joint_log_prob_and_diff(x: Tensor, params: GMMParams, covariance_type: str | Covariance) -> tuple[Tensor, Tensor]:
    """:func:`joint_log_prob` and ``diff = x - mu`` ``(*B, K, N, D)``, which the statistics reuse:
    the E-step and the statistics share one pass over the data, centred on the current means."""
    cov = get_covariance(covariance_type)
    n_features = x.shape[-1]
    diff = x.unsqueeze(-3) - params.means.unsqueeze(-2)  # (*B, K, N, D)
    maha = cov.mahalanobis(diff, params.prec_chol)  # (*B, K, N)
    log_det = cov.log_det(params.prec_chol, n_features)  # (*B, K)
    log_norm_const = log_det - 0.5 * n_features * LOG_2PI
    return (params.log_weights + log_norm_const).unsqueeze(-1) - 0.5 * maha, diff


def component_log_prob(x: Tensor, params: GMMParams, covariance_type: str | Covariance) -> Tensor:
    """Weighted per-component log-density ``log w_k + log N(x_n | k)``, ``(*B, N, K)``."""
    return joint_log_prob(x, params, covariance_type).transpose(-1, -2)


def log_prob(x: Tensor, params: GMMParams, covariance_type: str | Covariance) -> Tensor:
    """Per-sample mixture log-density ``log p(x_n)``, ``(*B, N)``."""
    return torch.logsumexp(joint_log_prob(x, params, covariance_type), dim=-2)


def log_responsibilities(x: Tensor, params: GMMParams, covariance_type: str | Covariance) -> Tensor:
    """``log p(k | x_n)``, ``(*B, N, K)``; rows sum to one after ``exp`` (normalized over K)."""
    joint = joint_log_prob(x, params, covariance_type)  # (*B, K, N)
    return (joint - torch.logsumexp(joint, dim=-2, keepdim=True)).transpose(-1, -2)


def responsibilities(x: Tensor, params: GMMParams, covariance_type: str | Covariance) -> Tensor:
    """``p(k | x_n)``, ``(*B, N, K)``."""
    return log_responsibilities(x, params, covariance_type).exp()
