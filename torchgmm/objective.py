"""The objective every method maximizes, and the unconstrained coordinates some of them move in.

The objective (see ``docs/gradient.md``): per series, with weights ``w_n`` summing to ``W``,

    F(theta) = 1/W sum_n w_n log sum_k pi_k N(x_n | mu_k, Sigma_k) exp(-reg/2 tr(Sigma_k^-1))
               [+ log_prior(theta) / W]

i.e. the mean log-likelihood of a mixture whose complete-data log-density carries the penalty
``-reg/2 tr(P_k)`` (``P_k`` the precision; ``tied``: one ``P``). EM on ``F`` is exact: the E-step
takes its responsibilities from the *tilted* log-weights ``log pi_k - reg/2 tr P_k`` and the
M-step is exactly the familiar ``Sigma_k = S_k / n_k + reg I`` (diag, spherical and tied alike),
so ``F`` never decreases and EM's fixed points are stationary points of ``F``
(``torchgmm.em.em_step(..., penalized=True)``). scikit-learn's EM (the untilted E-step with
``+ reg I``) is the same iteration with responsibilities off by ``O(reg)``; it is the fixed point of
no objective.

``F`` is evaluated through :func:`torchgmm.density.log_prob` (no second copy of the math).
:class:`ParamPacker` maps parameters to one unconstrained vector per member (softmax logits,
means, the precision Cholesky factor with a log-diagonal), where the gradient methods step and
SQUAREM extrapolates.

Pure tensor functions; no validation here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .covariance import Covariance, get_covariance
from .density import GMMParams, log_prob

__all__ = ["trace_precision", "penalized_params", "log_prior", "objective", "ParamPacker"]


def trace_precision(prec_chol: Tensor, covariance_type: str | Covariance, n_components: int, n_features: int) -> Tensor:
    """``tr(P_k)`` per component, ``(*L, K)``, from the covariance type's own Mahalanobis term:
    ``tr P = sum_d e_d^T P e_d`` (the unit vectors as ``D`` points), so no type is special-cased."""
    cov = get_covariance(covariance_type)
    eye = torch.eye(n_features, dtype=prec_chol.dtype, device=prec_chol.device)
    unit = eye.expand(n_components, n_features, n_features)  # (K, "N" = D, D)
    return cov.mahalanobis(unit, prec_chol).sum(-1)  # (*L, K)


def penalized_params(params: GMMParams, covariance_type: str | Covariance, reg_covar: Tensor) -> GMMParams:
    """``params`` with the log-weights tilted by ``-reg/2 tr(P_k)`` (no longer normalized): the
    log-density of these parameters is ``F``'s per-point term. ``reg_covar`` broadcasts against
    the parameters' leading dims ``(*L)``."""
    k, d = params.means.shape[-2:]
    reg = torch.as_tensor(reg_covar, dtype=params.means.dtype, device=params.means.device)
    tilt = -0.5 * reg.unsqueeze(-1) * trace_precision(params.prec_chol, covariance_type, k, d)  # (*L, K)
    return params._replace(log_weights=params.log_weights + tilt)


def log_prior(prior, params: GMMParams, cov: Covariance) -> Optional[Tensor]:
    if prior is None or not hasattr(prior, "log_prior"):
        return None
    return prior.log_prior(params, cov)


def objective(
    x: Tensor,
    w: Tensor,
    params: GMMParams,
    covariance_type: str | Covariance,
    reg_covar,
    prior=None,
    chunk_size: Optional[int] = None,
    w_total: Optional[Tensor] = None,
) -> Tensor:
    """The shared objective ``F`` (module docstring) per member, ``(*L)``; differentiable.

    ``x (..., N, D)``, ``w (..., N)`` and ``reg_covar`` broadcast against the parameters' leading
    dims ``(*L)``. Chunks of ``chunk_size`` points bound the memory of the forward pass.
    """
    cov = get_covariance(covariance_type)
    tilted = penalized_params(params, cov, reg_covar)
    n = x.shape[-2]
    step = n if chunk_size is None else max(1, int(chunk_size))
    total = None
    for start in range(0, n, step):
        part = (w[..., start : start + step] * log_prob(x[..., start : start + step, :], tilted, cov)).sum(-1)
        total = part if total is None else total + part
    if w_total is None:
        w_total = w.sum(-1)
    value = total / w_total
    extra = log_prior(prior, params, cov)
    return value if extra is None else value + extra / w_total


# -- unconstrained parameter vectors -----------------------------------------------------------
class ParamPacker:
    """``GMMParams`` <-> one unconstrained vector per member, ``(*L, P)``:
    ``[logits (K), means (K*D), to_unconstrained(prec_chol) (type's shape)]``.

    Logits are the log-weights themselves (any constant shift is the same mixture); entries of the
    raw factor that ``from_unconstrained`` ignores (below a full factor's diagonal) stay zero and
    get zero gradient.
    """

    def __init__(self, covariance_type: str | Covariance, n_components: int, n_features: int):
        self.cov = get_covariance(covariance_type)
        self.k, self.d = n_components, n_features
        self.raw_shape = self.cov.prec_chol_shape(n_components, n_features)
        self.sizes = (n_components, n_components * n_features, math.prod(self.raw_shape))
        self.size = sum(self.sizes)

    def pack(self, params: GMMParams) -> Tensor:
        n_lead = params.means.dim() - 2
        logits = params.log_weights.clamp_min(torch.finfo(params.log_weights.dtype).min / 4)  # no -inf
        raw = self.cov.to_unconstrained(params.prec_chol)
        return torch.cat([logits.flatten(n_lead), params.means.flatten(n_lead), raw.flatten(n_lead)], -1)

    def unpack(self, theta: Tensor) -> GMMParams:
        lead = theta.shape[:-1]
        logits, means, raw = theta.split(self.sizes, -1)
        return GMMParams(
            torch.log_softmax(logits, -1),
            means.reshape(*lead, self.k, self.d),
            self.cov.from_unconstrained(raw.reshape(*lead, *self.raw_shape)),
        )
