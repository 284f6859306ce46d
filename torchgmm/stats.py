"""Sufficient statistics and the M-step.

Statistics are additive: chunks of points (bounded memory), a stream of mini-batches, or ranks of
``torch.distributed`` (all-reduce) are combined by adding :class:`Stats`; the M-step turns the sum
into parameters. They are *shifted*: ``sum_diff`` and ``scatter`` are taken about reference means
``ref`` (the current means during EM), so the covariance is a small correction of a centred
scatter and never ``E[xx^T] - mu mu^T`` (which loses every digit at large offsets in float32).

Pure tensor functions; no validation here.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ._ops import matmul
from .covariance import Covariance, get_covariance
from .density import GMMParams, joint_log_prob_and_diff

__all__ = [
    "Stats", "statistics", "e_step_statistics", "partition_statistics", "m_step", "chunked_sum", "point_chunks",
    "params_from_responsibilities",
]


class Stats(NamedTuple):
    """Additive statistics of weighted points about reference means ``ref (*B, K, D)``."""

    nk: Tensor  # (*B, K)        sum_n w_n r_nk
    sum_diff: Tensor  # (*B, K, D)     sum_n w_n r_nk (x_n - ref_k)
    scatter: Tensor  # full/tied (*B, K, D, D); diag/spherical (*B, K, D)
    log_lik: Tensor  # (*B,)          sum_n w_n log p(x_n)  (0 when resp was given)

    def __add__(self, other: "Stats") -> "Stats":  # type: ignore[override]
        return Stats(*(a + b for a, b in zip(self, other)))


def statistics(diff: Tensor, resp: Tensor, cov: Covariance, log_lik: Optional[Tensor] = None) -> Stats:
    """Statistics from ``diff = x - ref (*B, K, N, D)`` and weighted ``resp (*B, K, N)``."""
    nk = resp.sum(-1)  # (*B, K)
    sum_diff = matmul(resp.unsqueeze(-2), diff).squeeze(-2)  # (*B, K, D)
    scatter = cov.scatter(diff, resp)
    if log_lik is None:
        log_lik = torch.zeros(nk.shape[:-1], dtype=nk.dtype, device=nk.device)
    return Stats(nk, sum_diff, scatter, log_lik)


def e_step_statistics(
    x: Tensor, w: Tensor, params: GMMParams, covariance_type: str | Covariance
) -> Stats:
    """The E-step fused with the statistics: one pass over ``x (*B, N, D)``, weights ``w (*B, N)``.

    Statistics are about ``params.means``; ``log_lik`` is the weighted log-likelihood sum of
    ``params`` (the EM lower bound before this M-step).
    """
    cov = get_covariance(covariance_type)
    joint, diff = joint_log_prob_and_diff(x, params, cov)  # (*B, K, N), (*B, K, N, D)
    log_norm = torch.logsumexp(joint, dim=-2)  # (*B, N)
    resp = torch.exp(joint - log_norm.unsqueeze(-2)) * w.unsqueeze(-2)  # (*B, K, N)
    return statistics(diff, resp, cov, (w * log_norm).sum(-1))


def m_step(
    stats: Stats, ref: Tensor, covariance_type: str | Covariance, reg_covar: Tensor, prior=None
) -> tuple[GMMParams, Tensor]:
    """Parameters from summed statistics about ``ref (*B, K, D)``; and ``ok (*B)``.

    ``reg_covar (*B)`` is added to every covariance diagonal. As in scikit-learn, ``10 * eps``
    is added to ``nk`` so that an empty component keeps finite parameters (its mean stays at the
    reference, its covariance is ``reg_covar``, its weight is ~0). ``ok`` is False where a
    covariance was not positive definite even after jitter.

    ``prior`` (a :class:`torchgmm.prior.ConjugatePrior`, batch ``(*B)``) makes this the MAP
    M-step: the prior augments the statistics (pseudo-points at its mean, its scale added to the
    scatter) and sets the covariance's denominator; the rest is this same code.
    """
    cov = get_covariance(covariance_type)
    nk = stats.nk + 10 * torch.finfo(stats.nk.dtype).eps  # (*B, K)
    stats, count = (stats._replace(nk=nk), None) if prior is None else prior.augment(stats._replace(nk=nk), ref, cov)
    shift = stats.sum_diff / stats.nk.unsqueeze(-1)  # (*B, K, D): new mean - ref
    covariance = cov.covariance(stats.nk, shift, stats.scatter, reg_covar, count)
    prec_chol, ok = cov.prec_chol_from_covariance(covariance, reg_covar)
    log_weights = torch.log(nk) - torch.log(nk.sum(-1, keepdim=True))  # the data's counts, never the prior's
    return GMMParams(log_weights, ref + shift, prec_chol), ok


def partition_statistics(x: Tensor, w: Tensor, labels: Tensor, centers: Tensor, covariance_type: str | Covariance) -> Stats:
    """Statistics of a hard partition ``labels (*B, N)`` of ``x (*B, N, D)`` (weights ``w``),
    about ``centers (*B, K, D)``. Pure and fusable: no one-hot tensor is needed when compiled."""
    cov = get_covariance(covariance_type)
    ks = torch.arange(centers.shape[-2], device=labels.device).unsqueeze(-1)  # (K, 1)
    resp = (labels.unsqueeze(-2) == ks).to(x.dtype) * w.unsqueeze(-2)  # (*B, K, N)
    diff = x.unsqueeze(-3) - centers.unsqueeze(-2)  # (*B, K, N, D)
    return statistics(diff, resp, cov)


def point_chunks(n: int, chunk_size: Optional[int]) -> list[slice]:
    """``range(n)`` (the points) in chunks of ``chunk_size`` (one chunk if None)."""
    step = n if chunk_size is None or chunk_size >= n else chunk_size
    return [slice(start, start + step) for start in range(0, n, step)]


def chunked_sum(fn: Callable[..., Stats], x: Tensor, w: Tensor, chunk_size: Optional[int], *per_point: Tensor) -> Stats:
    """``fn(x_chunk, w_chunk, *per_point_chunks)`` summed over chunks of ``chunk_size`` points
    (all at once if None). ``x (..., N, D)``, ``w (..., N)``, ``per_point`` tensors ``(..., N)``."""
    total = None
    for part in point_chunks(x.shape[-2], chunk_size):
        stats = fn(x[..., part, :], w[..., part], *(t[..., part] for t in per_point))
        total = stats if total is None else total + stats
    return total


def params_from_responsibilities(
    x: Tensor,
    w: Tensor,
    resp: Tensor,
    covariance_type: str | Covariance,
    reg_covar: Tensor,
) -> tuple[GMMParams, Tensor]:
    """M-step from given responsibilities ``resp (*B, K, N)`` (unweighted), in two passes: means
    first, then the scatter about them. Used by initialization."""
    cov = get_covariance(covariance_type)
    wr = resp * w.unsqueeze(-2)  # (*B, K, N)
    nk = wr.sum(-1) + 10 * torch.finfo(wr.dtype).eps
    means = matmul(wr, x) / nk.unsqueeze(-1)  # (*B, K, D)
    diff = x.unsqueeze(-3) - means.unsqueeze(-2)  # (*B, K, N, D)
    return m_step(statistics(diff, wr, cov), means, cov, reg_covar)
