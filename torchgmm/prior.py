"""The conjugate prior of Fraley & Raftery (2007): MAP estimation by EM, as R's mclust does it.

Owns the prior's hyperparameters per series, how they augment the sufficient statistics (the MAP
M-step is then :func:`torchgmm.stats.m_step` itself) and the log prior density. Every per-type
constant of the table below lives in the covariance registry (``prior_scatter``, ``prior_count``,
``prior_log_det_coef``, ``prior_scale_shape``). No input checking of data here (``fit`` did that); the one place
that raises is :func:`make_prior`, for a bad prior specification.

The prior (per series, per component ``k``; mclust's ``priorControl()`` / ``defaultPrior``):

- mean: ``mu_k | Sigma_k ~ N(mean_p, Sigma_k / shrinkage)``;
- covariance: inverse Wishart with ``dof`` degrees of freedom and scale matrix ``scale`` (full,
  tied), or an inverse gamma ``IG(dof / 2, scale / 2)`` per variance (diag: per feature,
  spherical: one per component);
- mixing weights: no prior (maximum likelihood, as in mclust).

Defaults (mclust's ``defaultPrior(data, G, modelName)``): ``shrinkage = 0.01``, ``mean`` = the
data mean, ``dof = D + 2``, ``scale = var(data) / K^(2/D)`` (full, tied; its diagonal when
``N <= D``) or ``mean(diag(var(data))) / K^(2/D)`` (diag, spherical: one number, as mclust),
``var`` with the ``N - 1`` denominator.

The posterior mode (the MAP M-step) is the maximum-likelihood M-step of the data plus
``shrinkage`` pseudo-points at ``mean_p``, with ``scale`` added to the scatter and a larger
denominator: with ``A_k`` the centred scatter of component ``k`` of the augmented data,

=========  ========================================  ============================
type       covariance                                log-det coefficient (prior)
=========  ========================================  ============================
full       (A_k + scale) / (n_k + dof + D + 2)       dof + D + 2
tied       (sum_k A_k + scale) / (n + dof + D + K + 1)  dof + D + K + 1
diag       (diag A_k + scale) / (n_k + dof + 3)      dof + 3
spherical  (tr A_k + scale) / (D n_k + dof + D + 2)  (dof + D + 2) / D
=========  ========================================  ============================

and ``mean_k = (n_k xbar_k + shrinkage mean_p) / (n_k + shrinkage)``. The log prior, up to a
constant, is ``sum_blocks coef * log det U - tr(scale P) / 2 - shrinkage / 2 * sum_k
(mu_k - mean_p)^T P_k (mu_k - mean_p)`` with ``U`` the precision Cholesky factor and ``P`` the
precision: the M-step above is its exact maximizer together with the expected complete-data
log-likelihood, so MAP EM never decreases ``log-likelihood + log prior`` (at ``reg_covar = 0``).

Everything works in the standardized units ``fit`` hands over; the prior is built from the data
it sees, so it is equivariant under the per-series shift and scale.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from .covariance import Covariance, get_covariance
from .density import GMMParams

__all__ = ["ConjugatePrior", "make_prior", "DEFAULT_SHRINKAGE", "PRIOR_KEYS"]

#: mclust's default shrinkage (the prior mean is worth 1/100 of an observation).
DEFAULT_SHRINKAGE = 0.01

#: Keys accepted in a prior specification dict (mclust's ``priorControl`` names).
PRIOR_KEYS = ("shrinkage", "mean", "dof", "scale")


def _lead(t: Tensor, event_dims: int, n_lead: int) -> Tensor:
    """``t (*L', *event)`` with singleton dims inserted after ``L'`` until it has ``n_lead`` leading
    dims: a per-series ``(B, ...)`` prior broadcasts against ``(B, R, ...)`` restarts."""
    missing = n_lead - (t.dim() - event_dims)
    if missing <= 0:
        return t
    at = t.dim() - event_dims
    return t.reshape(t.shape[:at] + (1,) * missing + t.shape[at:])


class ConjugatePrior(NamedTuple):
    """Per-series hyperparameters of the Fraley & Raftery (2007) conjugate prior, batch ``(B)`` in
    front (any leading dims that broadcast against the parameters' do).

    ``scale`` is in the covariance type's shape without the component dim: ``(B, D, D)`` full and
    tied, ``(B, D)`` diag, ``(B,)`` spherical. Units are those of the data the fit works on.
    """

    shrinkage: Tensor  # (B,)   kappa_p
    mean: Tensor  # (B, D)          mu_p
    dof: Tensor  # (B,)             nu_p
    scale: Tensor  # (B, D, D) | (B, D) | (B,)

    def _aligned(self, n_lead: int, cov: Covariance, d: int):
        """The hyperparameters with ``n_lead`` leading dims (restarts broadcast)."""
        return (
            _lead(self.shrinkage, 0, n_lead),
            _lead(self.mean, 1, n_lead),
            _lead(self.dof, 0, n_lead),
            _lead(self.scale, len(cov.prior_scale_shape(d)), n_lead),
        )

    def augment(self, stats, ref: Tensor, covariance_type: str | Covariance):
        """``(augmented Stats, count (*L, K))`` for :func:`torchgmm.stats.m_step`: the data plus
        ``shrinkage`` pseudo-points at the prior mean, as shifted statistics about
        ``ref (*L, K, D)``, the prior's scale added to the scatter, and the posterior mode's
        denominator as the covariance's count."""
        cov = get_covariance(covariance_type)
        k, d = ref.shape[-2:]
        kappa, mean_p, dof, scale = self._aligned(stats.nk.dim() - 1, cov, d)
        kappa_k = kappa[..., None].expand_as(stats.nk)  # (*L, K)
        to_prior = mean_p.unsqueeze(-2) - ref  # (*L, K, D)
        augmented = stats._replace(
            nk=stats.nk + kappa_k,
            sum_diff=stats.sum_diff + kappa_k.unsqueeze(-1) * to_prior,
            scatter=stats.scatter + cov.scatter(to_prior.unsqueeze(-2), kappa_k.unsqueeze(-1)) + cov.prior_scatter(scale, k, d),
        )
        return augmented, cov.prior_count(stats.nk, dof, d)

    def log_prior(self, params: GMMParams, covariance_type: str | Covariance) -> Tensor:
        """Log prior density of ``params`` up to an additive constant, ``(*L,)``; differentiable."""
        cov = get_covariance(covariance_type)
        k, d = params.means.shape[-2:]
        n_lead = params.means.dim() - 2
        kappa, mean_p, dof, scale = self._aligned(n_lead, cov, d)
        log_det = cov.log_det(params.prec_chol, d).sum(-1)  # (*L): sum over components (tied: one)
        precision = cov.scatter_form(cov.precision_from_prec_chol(params.prec_chol), k, d)
        trace = (cov.prior_scatter(scale, k, d) * precision).flatten(n_lead).sum(-1)  # sum_k tr(scale P_k)
        diff = (params.means - mean_p.unsqueeze(-2)).unsqueeze(-2)  # (*L, K, 1, D)
        maha = cov.mahalanobis(diff, params.prec_chol).squeeze(-1).sum(-1)  # (*L)
        return cov.prior_log_det_coef(dof, d, k) * log_det - 0.5 * trace - 0.5 * kappa * maha


# -- building the prior from the data ---------------------------------------------------------
def _default_scale(xs: Tensor, w: Tensor, k: int, event_dims: int) -> Tensor:
    """mclust's default scale from the weighted data ``xs (B, N, D)``, ``w (B, N)`` (weights in
    units of points; the variance uses the ``n - 1`` denominator)."""
    d = xs.shape[-1]
    w_total = w.sum(-1)  # (B,)
    mean = (w.unsqueeze(-1) * xs).sum(-2) / w_total.clamp_min(torch.finfo(xs.dtype).tiny).unsqueeze(-1)
    centred = (xs - mean.unsqueeze(-2)) * w.unsqueeze(-1).sqrt()
    denom = torch.where(w_total > 1, w_total - 1, torch.ones_like(w_total))
    var = centred.mT @ centred / denom[:, None, None]  # (B, D, D)
    fac = float(k) ** (-2.0 / d)
    if event_dims == 2:
        diag_only = torch.diag_embed(torch.diagonal(var, dim1=-2, dim2=-1))
        return fac * torch.where((w_total > d)[:, None, None], var, diag_only)  # mclust: diag when n <= p
    avg = torch.diagonal(var, dim1=-2, dim2=-1).mean(-1)  # (B,)
    return fac * (avg.unsqueeze(-1).expand(-1, d) if event_dims == 1 else avg)


def _number(spec: Mapping, key: str, low: float, inclusive: bool) -> Optional[float]:
    if key not in spec:
        return None
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"prior[{key!r}] must be a finite real number, got {value!r}")
    if not (value >= low if inclusive else value > low):
        raise ValueError(f"prior[{key!r}] must be {'>=' if inclusive else '>'} {low:g}, got {value!r}")
    return float(value)


def _per_series(value, name: str, event_shape: tuple, n_series: int, like: Tensor) -> Tensor:
    """A user value with ``event_shape``, optionally with the (flattened) batch in front."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if tuple(t.shape[t.dim() - len(event_shape):]) != tuple(event_shape) or t.dim() < len(event_shape):
        raise ValueError(f"prior[{name!r}] has shape {tuple(t.shape)}; expected {tuple(event_shape)} (or with the batch dims in front)")
    t = t.reshape(-1, *event_shape) if t.dim() > len(event_shape) else t.unsqueeze(0)
    if t.shape[0] not in (1, n_series):
        raise ValueError(f"prior[{name!r}] holds {t.shape[0]} series but the data hold {n_series}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"prior[{name!r}] must be finite")
    return t.expand(n_series, *event_shape)


def make_prior(
    prior,
    xs: Tensor,
    w: Tensor,
    n_components: int,
    covariance_type: str | Covariance,
    *,
    shift: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
) -> Optional[ConjugatePrior]:
    """The prior for standardized data ``xs (B, N, D)`` with weights ``w (B, N)`` (in units of
    points), one per series.

    ``prior`` is None (no prior), ``"default"`` (mclust's default prior), a dict overriding any of
    ``shrinkage`` (>= 0), ``dof`` (> D - 1 for full/tied, > 0 otherwise), ``mean`` (``(D,)``, in
    data units) and ``scale`` (a number, meaning ``scale * I``, or an array in the covariance
    type's shape without the component dim, in data units; full/tied: SPD), or a ready
    :class:`ConjugatePrior` in standardized units. ``shift (B, D)`` and ``scale (B,)`` describe
    the standardization ``xs = (x - shift) / scale`` and are needed for ``mean`` / ``scale`` given
    in data units.
    """
    if prior is None:
        return None
    cov = get_covariance(covariance_type)
    n_series, _, d = xs.shape
    event_dims = len(cov.prior_scale_shape(d))
    factory = dict(dtype=xs.dtype, device=xs.device)
    if isinstance(prior, ConjugatePrior):
        return ConjugatePrior(*(t.to(**factory) for t in prior))
    if isinstance(prior, str):
        if prior != "default":
            raise ValueError(f"prior={prior!r} is not supported; use None, 'default' or a dict with keys {list(PRIOR_KEYS)}")
        spec: Mapping = {}
    elif isinstance(prior, Mapping):
        spec = prior
        unknown = sorted(set(spec) - set(PRIOR_KEYS))
        if unknown:
            raise ValueError(f"prior has unknown key(s) {unknown}; valid keys are {list(PRIOR_KEYS)}")
    else:
        raise TypeError(f"prior must be None, 'default', a dict or a ConjugatePrior, got {type(prior).__name__}")

    in_data_units = [key for key in ("mean", "scale") if key in spec]
    if in_data_units and (shift is None or scale is None):
        raise ValueError(
            f"prior[{in_data_units[0]!r}] is given in data units, but the data's standardization "
            "(shift, scale) was not passed to make_prior"
        )
    shrinkage = _number(spec, "shrinkage", 0.0, inclusive=True)
    dof = _number(spec, "dof", max(d - 1.0, 0.0) if event_dims == 2 else 0.0, inclusive=False)
    ones = torch.ones(n_series, **factory)
    kappa = ones * (DEFAULT_SHRINKAGE if shrinkage is None else shrinkage)
    nu = ones * (d + 2.0 if dof is None else dof)

    w_total = w.sum(-1, keepdim=True).clamp_min(torch.finfo(xs.dtype).tiny)
    if "mean" in spec:
        mean_p = (_per_series(spec["mean"], "mean", (d,), n_series, xs) - shift.to(**factory)) / scale.to(**factory)[:, None]
    else:
        mean_p = (w.unsqueeze(-1) * xs).sum(-2) / w_total  # the data mean (~0 after standardizing)

    event = (d, d)[: event_dims]
    if "scale" in spec:
        value = spec["scale"]
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
            if event_dims == 2:
                value = value * torch.eye(d, **factory)
            elif event_dims == 1:
                value = torch.full((d,), value, **factory)
        s = _per_series(value, "scale", event, n_series, xs)
        if event_dims == 2:
            symmetric = torch.allclose(s, s.mT, rtol=1e-5, atol=0.0)
            if not symmetric or not bool((torch.linalg.cholesky_ex(s).info == 0).all()):
                raise ValueError(f"prior['scale'] must be symmetric positive definite for covariance_type={cov.name!r}")
        elif not bool((s > 0).all()):
            raise ValueError(f"prior['scale'] must be positive for covariance_type={cov.name!r}")
        s2 = scale.to(**factory).square()
        prior_scale = s / s2.reshape(s2.shape + (1,) * event_dims)
    else:
        prior_scale = _default_scale(xs, w, n_components, event_dims)
    return ConjugatePrior(kappa, mean_p, nu, prior_scale)
