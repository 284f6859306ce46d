"""The covariance registry: everything that depends on ``covariance_type``, in one place.

Each covariance type is one small class. It owns the shape of the precision Cholesky factor
``prec_chol`` (scikit-learn's ``precisions_cholesky_``), the Mahalanobis and log-determinant terms
of the log-density, the scatter statistic and the covariance estimate of the M-step, conversions
between covariances / precisions / precision Cholesky factors, the unconstrained form used by the
module and the gradient mode, and the number of free parameters. No other module branches on the
covariance type.

Shapes: batch ``(*B)`` (any leading dims, restarts included), ``K`` components, ``N`` points,
``D`` features. ``prec_chol`` is

=========  ===============  ==========================================
type       prec_chol        meaning
=========  ===============  ==========================================
full       (*B, K, D, D)    upper-triangular U_k with precision U_k U_k^T
tied       (*B, D, D)       one upper-triangular U shared by all k
diag       (*B, K, D)       1 / standard deviation per feature
spherical  (*B, K)          1 / standard deviation, same for all features
=========  ===============  ==========================================

Pure tensor functions only: no input validation here (that lives in ``validation``); the one
message is :func:`get_covariance`'s list of the valid names.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._ops import matmul

__all__ = ["Covariance", "COVARIANCE_TYPES", "get_covariance", "cholesky_with_jitter"]

# How often a failed Cholesky factorization is retried, each time with 10x more jitter.
_JITTER_TRIES = 4


def cholesky_with_jitter(matrix: Tensor, jitter: Tensor) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factor of SPD ``matrix (..., D, D)``, retrying failed members only.

    A member whose factorization fails is retried with ``jitter * 10**t`` (t = 0, 1, ...) added to
    its diagonal; the others are never changed. ``jitter`` broadcasts against ``matrix[..., 0, 0]``.
    Returns ``(L, ok)`` with ``ok`` of shape ``matrix.shape[:-2]``; where ``ok`` is False, ``L`` is
    the identity (finite, never NaN) and the caller decides what to do with that member.
    """
    if matrix.shape[-1] == 1:  # univariate: a square root, without LAPACK's per-matrix overhead
        positive = matrix > 0
        return torch.where(positive, matrix, 1.0).sqrt(), positive[..., 0, 0]
    chol, info = torch.linalg.cholesky_ex(matrix)
    ok = info == 0
    if not bool(ok.all()):
        eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        jitter = torch.as_tensor(jitter, dtype=matrix.dtype, device=matrix.device)
        jitter = jitter.clamp_min(torch.finfo(matrix.dtype).eps)
        for t in range(_JITTER_TRIES):
            bumped = matrix + (jitter * 10.0**t)[..., None, None] * eye
            retry, info = torch.linalg.cholesky_ex(bumped)
            fixed = ~ok & (info == 0)
            chol = torch.where(fixed[..., None, None], retry, chol)
            ok = ok | fixed
            if bool(ok.all()):
                break
        chol = torch.where(ok[..., None, None], chol, eye)
    return chol, ok


def _prec_chol_from_cov_matrix(cov: Tensor, jitter: Tensor) -> tuple[Tensor, Tensor]:
    """Upper-triangular U with ``U U^T = cov^-1`` for ``cov (..., D, D)``; and the ok mask."""
    if cov.shape[-1] == 1:  # univariate: 1 / sqrt, as cholesky_with_jitter's square root (no jitter needed)
        positive = cov > 0
        return torch.where(positive, cov, 1.0).rsqrt(), positive.view(positive.shape[:-2])
    chol, ok = cholesky_with_jitter(cov, jitter)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    inv_chol = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    return inv_chol.mT, ok


def _cov_from_prec_chol_matrix(prec_chol: Tensor) -> Tensor:
    """``(U U^T)^-1`` for triangular ``U (..., D, D)``, computed from the triangular inverse."""
    if prec_chol.shape[-1] == 1:
        return prec_chol.square().reciprocal()
    eye = torch.eye(prec_chol.shape[-1], dtype=prec_chol.dtype, device=prec_chol.device)
    inv = torch.linalg.solve_triangular(prec_chol, eye.expand_as(prec_chol), upper=True)
    return inv.mT @ inv


def _strict_upper(matrix: Tensor) -> Tensor:
    """``torch.triu(matrix, 1)`` as a masked select: ``torch.triu`` opens a parallel region even
    for one small matrix (grain 0), which costs milliseconds when another process holds a core."""
    idx = torch.arange(matrix.shape[-1], device=matrix.device)
    return torch.where(idx.unsqueeze(-1) < idx, matrix, torch.zeros((), dtype=matrix.dtype, device=matrix.device))


def _triu_to_unconstrained(prec_chol: Tensor) -> Tensor:
    """Upper-triangular factor with positive diagonal -> same matrix with ``log`` diagonal."""
    if prec_chol.shape[-1] == 1:  # 1 x 1: the diagonal alone
        return prec_chol.log()
    diag = torch.diagonal(prec_chol, dim1=-2, dim2=-1)
    return _strict_upper(prec_chol) + torch.diag_embed(torch.log(diag))


def _triu_from_unconstrained(raw: Tensor) -> Tensor:
    """Inverse of :func:`_triu_to_unconstrained`; entries below the diagonal are ignored."""
    if raw.shape[-1] == 1:  # 1 x 1: the diagonal alone
        return raw.exp()
    diag = torch.diagonal(raw, dim1=-2, dim2=-1)
    return _strict_upper(raw) + torch.diag_embed(torch.exp(diag))


class Covariance:
    """Interface of a covariance type. Subclasses are stateless; use :func:`get_covariance`."""

    name: str = ""
    precision_constraint: str = "positive"  # what valid_precision asks of a precision, for messages
    component_axis: Optional[int] = None  # the axis of prec_chol that indexes components (None: shared)
    matrix_scatter: bool = False  # scatter() is (*B, K, D, D): full and tied

    # -- shapes and counting -------------------------------------------------------------
    def prec_chol_shape(self, n_components: int, n_features: int) -> tuple[int, ...]:
        raise NotImplementedError

    def covariance_shape(self, n_components: int, n_features: int) -> tuple[int, ...]:
        return self.prec_chol_shape(n_components, n_features)

    def n_parameters(self, n_components: int, n_features: int) -> int:
        """Free parameters of the whole mixture (weights, means, covariances), as for BIC."""
        return self.n_cov_parameters(n_components, n_features) + n_features * n_components + n_components - 1

    def n_cov_parameters(self, n_components: int, n_features: int) -> int:
        raise NotImplementedError

    # -- the log-density ---------------------------------------------------------------------
    def log_det(self, prec_chol: Tensor, n_features: int) -> Tensor:
        """``log det U`` per component, ``(*B, K)`` (tied: ``(*B, 1)``): half the log-det precision."""
        raise NotImplementedError

    def mahalanobis(self, diff: Tensor, prec_chol: Tensor) -> Tensor:
        """Squared Mahalanobis distance ``(*B, K, N)`` from ``diff = x - mean``, ``(*B, K, N, D)``."""
        raise NotImplementedError

    def whitener(self, prec_chol: Tensor, n_components: int) -> Optional[Tensor]:
        """The matrix ``U_k (*B, K, D, D)`` with ``mahalanobis = |(x - mu_k) U_k|^2``, for types
        whose Mahalanobis term is a full product (full, tied); None for the others."""
        return None

    # -- the M-step ----------------------------------------------------------------------
    def scatter(self, diff: Tensor, resp: Tensor) -> Tensor:
        """Weighted scatter about the reference means: ``sum_n resp_kn diff_kn diff_kn^T``.

        ``diff (*B, K, N, D)``, ``resp (*B, K, N)``. Full and tied return ``(*B, K, D, D)``;
        diag and spherical only need its diagonal, ``(*B, K, D)``.
        """
        raise NotImplementedError

    def covariance(self, nk: Tensor, shift: Tensor, scatter: Tensor, reg_covar: Tensor, count: Optional[Tensor] = None) -> Tensor:
        """Covariance estimate in this type's shape, from statistics about the reference means.

        ``nk (*B, K)`` weights, ``shift (*B, K, D)`` = new mean - reference mean,
        ``scatter`` as returned by :meth:`scatter` (summed over chunks), ``reg_covar (*B)`` is
        added to the diagonal. The centred scatter ``scatter - nk shift shift^T`` (a small
        correction, because the reference is the previous mean: no ``E[xx^T] - mu mu^T``
        cancellation) is divided by ``count (*B, K)``, by default ``nk`` (maximum likelihood; the
        conjugate prior passes :meth:`prior_count`).
        """
        raise NotImplementedError

    def prec_chol_from_covariance(self, cov: Tensor, reg_covar: Tensor) -> tuple[Tensor, Tensor]:
        """``(prec_chol, ok)``; ``ok (*B)`` is False for members whose covariance is not SPD even
        after jitter (their ``prec_chol`` is finite but meaningless)."""
        raise NotImplementedError

    def valid_precision(self, precision: Tensor) -> bool:
        """Whether every precision in this type's shape is a valid one (SPD / positive, finite)."""
        return bool((precision > 0).all()) and bool(torch.isfinite(precision).all())

    def points_for_full_rank(self, n_components: int, n_features: int) -> Optional[int]:
        """Points below which the maximum-likelihood covariance is singular whatever the data
        (only ``reg_covar`` keeps it invertible); None where a few points always suffice."""
        return None

    # -- the conjugate prior (Fraley & Raftery 2007; see ``torchgmm.prior``) ------------------
    def prior_scale_shape(self, n_features: int) -> tuple[int, ...]:
        """Shape of the prior's scale per series: ``(D, D)`` full and tied, ``(D,)`` diag, ``()``
        spherical."""
        raise NotImplementedError

    def prior_scatter(self, scale: Tensor, n_components: int, n_features: int) -> Tensor:
        """The prior's ``scale (*B, *prior_scale_shape)`` as a term of each component's scatter
        (broadcasting against :meth:`scatter`'s shape): the posterior mode's numerator is the
        augmented data's centred scatter plus this."""
        raise NotImplementedError

    def prior_count(self, nk: Tensor, dof: Tensor, n_features: int) -> Tensor:
        """The posterior mode's denominator as a per-component ``count (*B, K)`` for
        :meth:`covariance`, from the data's ``nk (*B, K)`` and the prior's ``dof (*B)``."""
        raise NotImplementedError

    def prior_log_det_coef(self, dof: Tensor, n_features: int, n_components: int) -> Tensor:
        """Coefficient of ``sum log det U`` in the log prior density."""
        raise NotImplementedError

    def univariate_scatter(self, sum_sq: Tensor) -> Tensor:
        """:meth:`scatter` of univariate data (``D = 1``) from each component's weighted sum of
        squared differences ``sum_sq (*B, K)`` (a view: the fast paths' moments are already sums)."""
        raise NotImplementedError

    def scatter_form(self, values: Tensor, n_components: int, n_features: int) -> Tensor:
        """Per-type values (``prec_chol``-shaped, e.g. precisions) expanded to the shape of
        :meth:`scatter`, so that ``(prior_scatter * scatter_form(P)).sum()`` is ``sum tr(scale P)``."""
        return values

    # -- conversions -----------------------------------------------------------------------
    def covariance_from_prec_chol(self, prec_chol: Tensor) -> Tensor:
        raise NotImplementedError

    def precision_from_prec_chol(self, prec_chol: Tensor) -> Tensor:
        raise NotImplementedError

    def prec_chol_from_precision(self, precision: Tensor) -> Tensor:
        raise NotImplementedError

    def full_covariance(self, prec_chol: Tensor, n_components: int, n_features: int) -> Tensor:
        """Covariances expanded to ``(*B, K, D, D)`` (for sampling and torch.distributions)."""
        raise NotImplementedError

    def min_variance(self, cov: Tensor, n_components: int) -> Tensor:
        """Smallest eigenvalue of each component's covariance, ``(*B, K)``."""
        raise NotImplementedError

    def min_variance_bound(self, prec_chol: Tensor, n_components: int) -> Tensor:
        """A lower bound of :meth:`min_variance` from the factor alone, ``(*B, K)``: cheap, to skip
        the eigenvalues of every component it clears. Exact here (diagonal types)."""
        return self.min_variance(self.covariance_from_prec_chol(prec_chol), n_components)

    def rescale(self, prec_chol: Tensor, scale: Tensor) -> Tensor:
        """``prec_chol`` after the data are multiplied by ``scale (*B)``."""
        return prec_chol / scale.reshape(scale.shape + (1,) * (prec_chol.dim() - scale.dim()))

    # -- unconstrained form (module parameters, gradient mode) ------------------------------
    def to_unconstrained(self, prec_chol: Tensor) -> Tensor:
        return torch.log(prec_chol)

    def from_unconstrained(self, raw: Tensor) -> Tensor:
        return torch.exp(raw)

    def __repr__(self) -> str:
        return f"<covariance {self.name!r}>"


class Full(Covariance):
    name = "full"
    component_axis = -3
    matrix_scatter = True
    precision_constraint = "symmetric positive definite"

    def prec_chol_shape(self, n_components, n_features):
        return (n_components, n_features, n_features)

    def n_cov_parameters(self, n_components, n_features):
        return n_components * n_features * (n_features + 1) // 2

    def log_det(self, prec_chol, n_features):
        return torch.log(torch.diagonal(prec_chol, dim1=-2, dim2=-1)).sum(-1)

    def mahalanobis(self, diff, prec_chol):
        y = matmul(diff, prec_chol)  # (*B, K, N, D) @ (*B, K, D, D)
        return y.square().sum(-1)

    def whitener(self, prec_chol, n_components):
        return prec_chol

    def scatter(self, diff, resp):
        return matmul((diff * resp.unsqueeze(-1)).mT, diff)  # (*B, K, D, D)

    def univariate_scatter(self, sum_sq):
        return _matrix_dims(sum_sq)

    def _centred(self, n, shift, scatter):
        """The scatter about the new means, ``scatter - n shift shift^T``, for counts ``n (*B, K, 1, 1)``."""
        return torch.addcmul(scatter, n * shift.unsqueeze(-1), shift.unsqueeze(-2), value=-1)  # (*B, K, D, D)

    def covariance(self, nk, shift, scatter, reg_covar, count=None):
        n = _matrix_dims(nk)
        centred = self._centred(n, shift, scatter)
        denominator = n if count is None else _matrix_dims(count)
        if centred.shape[-1] == 1:  # (a 1 x 1 matrix is symmetric)
            return torch.addcdiv(reg_covar.view(reg_covar.shape + (1, 1, 1)), centred, denominator)
        cov = centred / denominator
        return 0.5 * (cov + cov.mT) + _diag_matrix(reg_covar.unsqueeze(-1), cov)

    def valid_precision(self, precision):
        symmetric = torch.allclose(precision, precision.mT, rtol=1e-5, atol=1e-8)
        return symmetric and bool((torch.linalg.cholesky_ex(precision).info == 0).all())

    def points_for_full_rank(self, n_components, n_features):
        return n_components * (n_features + 1)  # D + 1 per component

    def prior_scale_shape(self, n_features):
        return (n_features, n_features)

    def prior_scatter(self, scale, n_components, n_features):
        return scale.unsqueeze(-3)

    def prior_count(self, nk, dof, n_features):
        return nk + (dof + n_features + 2)[..., None]

    def prior_log_det_coef(self, dof, n_features, n_components):
        return dof + n_features + 2

    def prec_chol_from_covariance(self, cov, reg_covar):
        jitter = reg_covar[..., None] if cov.shape[-1] > 1 else reg_covar  # (a 1 x 1 factor takes none)
        prec_chol, ok = _prec_chol_from_cov_matrix(cov, jitter)
        return prec_chol, ok.all(-1)

    def covariance_from_prec_chol(self, prec_chol):
        return _cov_from_prec_chol_matrix(prec_chol)

    def precision_from_prec_chol(self, prec_chol):
        if prec_chol.shape[-1] == 1:  # univariate: a square, not a product of 1 x 1 matrices
            return prec_chol.square()
        return prec_chol @ prec_chol.mT

    def prec_chol_from_precision(self, precision):
        # U upper with U U^T = P: reverse the axes, take the lower Cholesky factor, reverse back.
        flipped = precision.flip(-1, -2)
        return torch.linalg.cholesky(flipped).flip(-1, -2)

    def full_covariance(self, prec_chol, n_components, n_features):
        return self.covariance_from_prec_chol(prec_chol)

    def min_variance(self, cov, n_components):
        if cov.shape[-1] == 1:  # (cuSOLVER's batched eigvalsh asks huge workspaces for 1x1)
            return cov[..., 0, 0]
        return torch.linalg.eigvalsh(cov)[..., 0]

    def min_variance_bound(self, prec_chol, n_components):
        # 1 / trace(P) <= 1 / (P's largest eigenvalue) = the covariance's smallest, P = U U^T
        return prec_chol.square().sum((-2, -1)).reciprocal()

    def to_unconstrained(self, prec_chol):
        return _triu_to_unconstrained(prec_chol)

    def from_unconstrained(self, raw):
        return _triu_from_unconstrained(raw)


class Tied(Full):
    name = "tied"
    component_axis = None

    def prec_chol_shape(self, n_components, n_features):
        return (n_features, n_features)

    def n_cov_parameters(self, n_components, n_features):
        return n_features * (n_features + 1) // 2

    def log_det(self, prec_chol, n_features):
        return super().log_det(prec_chol, n_features).unsqueeze(-1)

    def mahalanobis(self, diff, prec_chol):
        return super().mahalanobis(diff, prec_chol.unsqueeze(-3))

    def whitener(self, prec_chol, n_components):
        return prec_chol.unsqueeze(-3).expand(*prec_chol.shape[:-2], n_components, *prec_chol.shape[-2:])

    def covariance(self, nk, shift, scatter, reg_covar, count=None):
        cov = self._centred(_matrix_dims(nk), shift, scatter).sum(-3) / _matrix_dims((nk if count is None else count).sum(-1))
        cov = 0.5 * (cov + cov.mT)
        return cov + _diag_matrix(reg_covar, cov)

    def points_for_full_rank(self, n_components, n_features):
        return n_components + n_features  # the pooled scatter has N - K degrees of freedom

    def prior_scatter(self, scale, n_components, n_features):
        return scale.unsqueeze(-3) / n_components  # summed over the K components: scale once

    def prior_count(self, nk, dof, n_features):
        k = nk.shape[-1]
        return nk + ((dof + n_features + k + 1) / k)[..., None]  # summed: n + dof + D + K + 1

    def prior_log_det_coef(self, dof, n_features, n_components):
        return dof + n_features + n_components + 1

    def scatter_form(self, values, n_components, n_features):
        return values.unsqueeze(-3).expand(*values.shape[:-2], n_components, n_features, n_features)

    def prec_chol_from_covariance(self, cov, reg_covar):
        return _prec_chol_from_cov_matrix(cov, reg_covar)

    def full_covariance(self, prec_chol, n_components, n_features):
        cov = self.covariance_from_prec_chol(prec_chol).unsqueeze(-3)
        return cov.expand(*cov.shape[:-3], n_components, n_features, n_features)

    def min_variance(self, cov, n_components):
        low = super().min_variance(cov, n_components).unsqueeze(-1)
        return low.expand(*low.shape[:-1], n_components)

    def min_variance_bound(self, prec_chol, n_components):
        low = super().min_variance_bound(prec_chol, n_components).unsqueeze(-1)
        return low.expand(*low.shape[:-1], n_components)


class Diag(Covariance):
    name = "diag"
    component_axis = -2

    def prec_chol_shape(self, n_components, n_features):
        return (n_components, n_features)

    def n_cov_parameters(self, n_components, n_features):
        return n_components * n_features

    def log_det(self, prec_chol, n_features):
        return torch.log(prec_chol).sum(-1)

    def mahalanobis(self, diff, prec_chol):
        return (diff * prec_chol.unsqueeze(-2)).square().sum(-1)

    def scatter(self, diff, resp):
        return matmul(resp.unsqueeze(-2), diff.square()).squeeze(-2)  # (*B, K, D)

    def univariate_scatter(self, sum_sq):
        return sum_sq[..., None]

    def covariance(self, nk, shift, scatter, reg_covar, count=None):
        n = nk.unsqueeze(-1)
        var = (scatter - n * shift.square()).clamp_min(0.0) / (n if count is None else count.unsqueeze(-1))
        return var + _matrix_dims(reg_covar)

    def prior_scale_shape(self, n_features):
        return (n_features,)

    def prior_scatter(self, scale, n_components, n_features):
        return scale.unsqueeze(-2)

    def prior_count(self, nk, dof, n_features):
        return nk + (dof + 3)[..., None]

    def prior_log_det_coef(self, dof, n_features, n_components):
        return dof + 3

    def prec_chol_from_covariance(self, cov, reg_covar):
        positive = cov > 0
        return torch.rsqrt(torch.where(positive, cov, 1.0)), positive.flatten(-2).all(-1)

    def covariance_from_prec_chol(self, prec_chol):
        return prec_chol.square().reciprocal()

    def precision_from_prec_chol(self, prec_chol):
        return prec_chol.square()

    def prec_chol_from_precision(self, precision):
        return precision.sqrt()

    def full_covariance(self, prec_chol, n_components, n_features):
        return torch.diag_embed(self.covariance_from_prec_chol(prec_chol))

    def min_variance(self, cov, n_components):
        return cov.amin(-1)


class Spherical(Diag):
    name = "spherical"
    component_axis = -1

    def prec_chol_shape(self, n_components, n_features):
        return (n_components,)

    def n_cov_parameters(self, n_components, n_features):
        return n_components

    def log_det(self, prec_chol, n_features):
        return n_features * torch.log(prec_chol)

    def mahalanobis(self, diff, prec_chol):
        return diff.square().sum(-1) * prec_chol.square().unsqueeze(-1)

    def covariance(self, nk, shift, scatter, reg_covar, count=None):
        centred = (scatter - nk[..., None] * shift.square()).clamp_min(0.0).sum(-1)  # (*B, K): trace
        return centred / (shift.shape[-1] * (nk if count is None else count)) + reg_covar[..., None]

    def prior_scale_shape(self, n_features):
        return ()

    def prior_scatter(self, scale, n_components, n_features):
        return (scale / n_features)[..., None, None]  # on each of the D diagonal entries: the trace gains scale

    def prior_count(self, nk, dof, n_features):
        return nk + ((dof + n_features + 2) / n_features)[..., None]  # times D: D n_k + dof + D + 2

    def prior_log_det_coef(self, dof, n_features, n_components):
        return (dof + n_features + 2) / n_features

    def scatter_form(self, values, n_components, n_features):
        return values.unsqueeze(-1).expand(*values.shape, n_features)

    def prec_chol_from_covariance(self, cov, reg_covar):
        positive = cov > 0
        return torch.rsqrt(torch.where(positive, cov, 1.0)), positive.all(-1)

    def full_covariance(self, prec_chol, n_components, n_features):
        var = self.covariance_from_prec_chol(prec_chol)[..., None].expand(*prec_chol.shape, n_features)
        return torch.diag_embed(var)

    def min_variance(self, cov, n_components):
        return cov


def _matrix_dims(t: Tensor) -> Tensor:
    """``t (...)`` as ``(..., 1, 1)`` (one view), to broadcast against matrices."""
    return t.reshape(t.shape + (1, 1))


def _diag_matrix(values: Tensor, like: Tensor) -> Tensor:
    """``values (...)`` on the diagonal of a matrix shaped like ``like (..., D, D)``."""
    if like.shape[-1] == 1:
        return _matrix_dims(values)
    eye = torch.eye(like.shape[-1], dtype=like.dtype, device=like.device)
    return values[..., None, None] * eye


COVARIANCE_TYPES: dict[str, Covariance] = {c.name: c for c in (Full(), Tied(), Diag(), Spherical())}

LOG_2PI = math.log(2.0 * math.pi)


def get_covariance(covariance_type: str | Covariance) -> Covariance:
    """The registry entry for ``covariance_type`` (a name or a :class:`Covariance`)."""
    if isinstance(covariance_type, Covariance):
        return covariance_type
    try:
        return COVARIANCE_TYPES[covariance_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"covariance_type={covariance_type!r} is not supported; "
            f"choose one of {sorted(COVARIANCE_TYPES)}"
        ) from None
