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
    "univariate_coefficients",
    "univariate_quadratic",
    "quadratic_coefficients",
    "quadratic_features",
    "whitened",
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
    diff = x.unsqueeze(-3) - params.means.unsqueeze(-2)  # (*B, K, N, D)
    maha = cov.mahalanobis(diff, params.prec_chol)  # (*B, K, N)
    return _log_peak(params, cov, x.shape[-1]).unsqueeze(-1) - 0.5 * maha, diff


def whitened(x_t: Tensor, means: Tensor, whitener: Tensor) -> Tensor:
    """``y = (x - mu_m) U_m`` of every point for many components ``m`` at once, ``(G, M, D, N)``:
    the Mahalanobis term of :func:`joint_log_prob_and_diff` is ``|y|^2`` summed over ``D``.

    ``x_t (G, D, N)`` (points contiguous), ``means (G, M, D)``, ``whitener (G, M, D, D)`` (see
    ``Covariance.whitener``). One product per row ``g`` with every component's ``U^T`` stacked,
    ``y = U^T x - U^T mu``, instead of a difference per component and a product per component:
    the components of all restarts of a series share its points. (The subtraction cancels terms
    of size ``|mu U|``; callers bound it in float32.)"""
    g, m, d = means.shape
    shift = (means.unsqueeze(-2) @ whitener).reshape(g, m * d, 1)  # (G, M D, 1): U^T mu
    return torch.bmm(whitener.mT.reshape(g, m * d, d), x_t).sub_(shift).view(g, m, d, x_t.shape[-1])


def _log_peak(params: GMMParams, cov: Covariance, n_features: int) -> Tensor:
    """``log w_k + log det U_k - D/2 log 2 pi``: the joint log-probability at the mean, ``(*B, K)``."""
    return params.log_weights + cov.log_det(params.prec_chol, n_features) - 0.5 * n_features * LOG_2PI


def univariate_coefficients(params: GMMParams, covariance_type: str | Covariance) -> Tensor:
    """For univariate data (D = 1) the same joint log-probability as a quadratic in ``x``:
    ``joint_k(x) = c0 + c1 x + c2 x^2``, coefficients ``(*B, K, 3)``.

    Built from the same terms as :func:`joint_log_prob_and_diff` (the log-weight and log-det
    constant, and the Mahalanobis term of the covariance type, here of a unit difference,
    ``q_k``): ``joint_k = peak_k - q_k (x - mu_k)^2 / 2``. The joint log-probabilities of all
    points are then one matrix product ``[1, x, x^2] @ c`` (``stats.univariate_statistics``).
    Exact in float64; in float32 the expansion loses ``eps * q_k mu_k^2`` nats, so callers take
    the product in float64."""
    cov = get_covariance(covariance_type)
    mu = params.means  # (*B, K, 1)
    q = cov.mahalanobis(torch.ones_like(mu).unsqueeze(-2), params.prec_chol)  # (*B, K, 1): q (x - mu)^2 = maha
    half_q = 0.5 * q.squeeze(-1)
    peak = _log_peak(params, cov, 1)
    return torch.stack(torch.broadcast_tensors(*_quadratic(peak, mu.squeeze(-1), half_q)), -1)


def _quadratic(peak: Tensor, mu: Tensor, half_q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``peak - half_q (x - mu)^2`` as the coefficients of ``1, x, x^2``."""
    return peak - half_q * mu.square(), 2 * half_q * mu, -half_q


def quadratic_features(x_t: Tensor) -> Tensor:
    """The points' quadratic features ``[1, x_1..x_D, x_i x_j (i <= j)]``, ``(G, F, N)`` with
    ``F = 1 + D + D (D + 1) / 2``, for ``x_t (G, D, N)`` (points contiguous)."""
    g, d, n = x_t.shape
    feats = x_t.new_empty(g, 1 + d + d * (d + 1) // 2, n)
    feats[:, 0] = 1
    feats[:, 1:1 + d] = x_t
    row = 1 + d
    for i in range(d):  # x_i x_j for j >= i: one broadcast product per i (an index gather: 19x slower)
        torch.mul(feats[:, 1 + i:2 + i], feats[:, 1 + i:1 + d], out=feats[:, row:row + d - i])
        row += d - i
    return feats


def quadratic_coefficients(params: GMMParams, covariance_type: str | Covariance) -> Tensor:
    """For full and tied covariances the joint log-probability as a quadratic in ``x``: its
    coefficients against :func:`quadratic_features`, ``(*B, K, F)``.

    The same terms as :func:`joint_log_prob_and_diff`: ``joint_k = peak_k - (x - mu_k)^T P_k (x -
    mu_k) / 2`` with ``P_k = U_k U_k^T`` (the whitener of the Mahalanobis term), so the constant
    is ``peak_k - mu^T P mu / 2``, the linear ones ``P mu``, the square ones ``-P_ii / 2`` and the
    cross ones ``-P_ij``. :func:`univariate_coefficients` is its ``D = 1`` case (for every
    covariance type). Exact in float64; in float32 the expansion loses about ``eps |mu|^2 |P|``
    nats (callers bound it)."""
    cov = get_covariance(covariance_type)
    k, d = params.means.shape[-2:]
    u = cov.whitener(params.prec_chol, k)  # (*B, K, D, D)
    precision = u @ u.mT
    p_mu = (precision @ params.means.unsqueeze(-1)).squeeze(-1)  # (*B, K, D)
    const = _log_peak(params, cov, d) - 0.5 * (params.means * p_mu).sum(-1)
    i, j = torch.triu_indices(d, d, device=u.device)
    square = -precision[..., i, j] * torch.where(i == j, 0.5, 1.0).to(u.dtype)
    return torch.cat([const.unsqueeze(-1), p_mu, square], -1)


def univariate_quadratic(log_weights: Tensor, means: Tensor, precisions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`univariate_coefficients` from plain per-component tensors of one shape (e.g.
    ``(*B, K)``; the precisions of a tied model may have 1 in place of ``K``): ``(c0, c1, c2)``.
    The same terms (for ``D = 1`` every covariance type's ``log det U`` is ``log(q) / 2`` and its
    Mahalanobis term of a unit difference the precision ``q``): ``c0 = log w + (log q - q mu^2) / 2
    - log(2 pi) / 2``, ``c1 = q mu``, ``c2 = -q / 2``, in six small operations, for the lean
    univariate EM rule (``em.UnivariateEMRule``); tested equal to :func:`univariate_coefficients`."""
    c1 = precisions * means
    c0 = torch.add(log_weights, torch.addcmul(precisions.log(), c1, means, value=-1), alpha=0.5).sub_(0.5 * LOG_2PI)
    return c0, c1, -0.5 * precisions


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
