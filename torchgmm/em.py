"""EM as a step rule of the member loop, and the EM map that SQUAREM builds on.

:func:`em_step` is the EM map: one E-step fused with the statistics (one pass over the data,
chunked over points), then the M-step, for every member at once. :class:`EMRule` is the step rule
that the member loop (``torchgmm.loop``) calls once per iteration; convergence, failures,
compaction and histories are the loop's.

Data arrive standardized (see ``fit``); no validation and no messages here.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from ._compile import compiled
from ._ops import even_slices, exp_normal
from .covariance import Covariance, get_covariance
from .density import GMMParams, univariate_quadratic
from .loop import Batch, Start, Step, all_finite
from .objective import penalized_params
from .stats import (Stats, chunked_sum, e_step_statistics, expansion_unsafe, fast_e_step_statistics, m_step,
                    underflow_floor, univariate_stats_about)

__all__ = ["em_step", "keep_masked", "in_blocks", "log_likelihood", "EMRule", "UnivariateEMRule", "EMMap"]

# (x, w, w_total, params, cov, reg_covar, prior, chunk_size) -> (new params, lower bound, ok)
EMMap = Callable[..., tuple]


def em_step(
    x, w, w_total, params: GMMParams, cov: Covariance, reg_covar, prior=None, chunk_size=None,
    stats_fn=e_step_statistics, penalized: bool = False, block_members: Optional[int] = None,
):
    """One EM iteration for every member: ``(new_params, lower_bound (L), ok (L))``.

    ``lower_bound`` is the weighted mean log-likelihood of ``params`` (before the update), as in
    scikit-learn. ``x (..., N, D)``, ``w (..., N)`` and ``w_total (...)`` broadcast against the
    parameters' leading dims ``L``. ``stats_fn`` is :func:`e_step_statistics` or its compiled
    twin. ``penalized``: the exact EM map of the shared objective ``F`` (``torchgmm.objective``):
    the E-step runs on the tilted log-weights, the M-step is the same, and the lower bound is
    ``F(params)`` without the prior term. ``block_members``: the statistics are taken on blocks of
    about that many members (:func:`in_blocks`), the M-step once for all.
    """
    e_params = penalized_params(params, cov, reg_covar) if penalized else params
    stats = in_blocks(
        lambda xb, wb, pb: chunked_sum(lambda xc, wc: stats_fn(xc, wc, pb, cov), xb, wb, chunk_size),
        x, w, e_params, block_members,
    )
    new, ok = m_step(stats, params.means, cov, reg_covar, prior)
    return keep_masked(new, params.log_weights), stats.log_lik / w_total, ok


def keep_masked(new: GMMParams, log_weights: Tensor) -> GMMParams:
    """``new`` with the components of weight exactly 0 in ``log_weights`` (masked: a model with
    fewer components) still at weight 0: only the M-step's guard against empty components would
    give them a tiny one."""
    return new._replace(log_weights=torch.where(torch.isneginf(log_weights), log_weights, new.log_weights))


def in_blocks(stats_of: Callable[..., Stats], x, w, params: GMMParams, block_members: Optional[int]) -> Stats:
    """``stats_of(x, w, params)`` on blocks of about ``block_members`` members at a time (whole rows
    of dim 0: series with their restarts, or single members once compacted), concatenated: per
    member the same numbers, but each block's temporaries stay in cache."""
    rows = params.log_weights.shape[0]
    block_rows = rows if block_members is None else max(1, block_members // params.log_weights.shape[1:-1].numel())
    if rows <= block_rows:
        return stats_of(x, w, params)
    parts = [stats_of(x[part], w[part], params.map(lambda t: t[part])) for part in even_slices(rows, block_rows)]
    return Stats(*(torch.cat(ts) for ts in zip(*parts)))


def log_likelihood(x, w, w_total, params: GMMParams, cov, chunk_size=None) -> Tensor:
    """Weighted mean log-likelihood of ``params``, shape of the parameters' leading dims."""
    stats = chunked_sum(lambda xc, wc: e_step_statistics(xc, wc, params, cov), x, w, chunk_size)
    return stats.log_lik / w_total


class EMRule:
    """EM (scikit-learn's iteration; ``penalized``: the exact EM of the shared objective) as a step
    rule: the state is the parameters ``GMMParams (S, ...)``; the value of an iteration is the
    log-likelihood of the parameters it started from."""

    def __init__(
        self, covariance_type: str | Covariance, *, chunk_size: Optional[int] = None, compile: bool = False,
        block_members: Optional[int] = None, penalized: bool = False,
    ):
        self.cov = get_covariance(covariance_type)
        self.chunk_size = chunk_size
        self.penalized = penalized
        self.map: EMMap = functools.partial(
            em_step, stats_fn=compiled(e_step_statistics) if compile else fast_e_step_statistics, penalized=penalized,
            block_members=block_members,
        )

    def apply(self, batch: Batch, params: GMMParams) -> tuple[GMMParams, Tensor, Tensor]:
        """The EM map of flat ``params (S, ...)``: ``(new (S, ...), value (S,), ok (S,))``, ``ok``
        covering the M-step, the value and the new parameters being finite."""
        new, value, ok = self.map(
            batch.x, batch.w, batch.w_total, batch.shaped(params), self.cov, batch.reg, batch.prior, self.chunk_size
        )
        new, value, ok = batch.flat(new), value.reshape(-1), ok.reshape(-1)
        return new, value, ok & torch.isfinite(value) & all_finite(new)

    def start(self, batch: Batch, params: GMMParams) -> Start:
        return Start(params)

    def step(self, batch: Batch, state: GMMParams, active: Tensor) -> Step:
        new, value, ok = self.apply(batch, state)
        return Step(new, value, ok)

    def params(self, state: GMMParams) -> GMMParams:
        return state

    def objective(self, batch: Batch, params: GMMParams) -> Tensor:
        return self.apply(batch, params)[1]


class UnivariateEMRule:
    """EM for univariate data (``D = 1``) in a few large operations per iteration, as a step rule
    of the member loop: what :class:`EMRule` computes, for fits whose per-call overhead dominates
    (short series).

    An iteration: the joint log-probabilities as the quadratic ``c0 + x (c1 + x c2)``
    (:func:`torchgmm.density.univariate_quadratic`, the one log-density's terms for ``D = 1``), the
    responsibilities, their moments against the weighted ``[1, x, x^2]`` (one product), the shifted
    statistics about the current means, and :func:`torchgmm.stats.m_step`. No synchronization: the
    guards :class:`EMRule`'s statistics apply at every iteration (a point where every component
    underflows, float32's expansion limit, a non-finite value) are kept per iteration, and
    :meth:`tripped` tells after the run whether any fired; the caller then runs :class:`EMRule`
    from the same start (same numbers otherwise, to rounding: tested)."""

    def __init__(self, covariance_type: str | Covariance):
        self.cov = get_covariance(covariance_type)
        self._guards: list = []  # per iteration: the smallest point sum, the values, float32's expansion flag
        self._masked = False  # some component has weight exactly 0 (model selection's padding)
        self._feats: tuple = (None,) * 4  # the batch's x, x (*L', 1, N), weighted [1, x, x^2] (*L', N, 3), w / w_total

    def tripped(self) -> bool:
        """Whether a guard fired during the run (one synchronization)."""
        if not self._guards:
            return False
        lows, values, unsafe = zip(*self._guards)
        fired = (torch.stack(lows) < underflow_floor(values[0].dtype)).any() | ~torch.isfinite(torch.cat(values)).all()
        if unsafe[0] is not None:
            fired = fired | torch.stack(unsafe).any()
        return bool(fired)

    def start(self, batch: Batch, params: GMMParams) -> Start:
        self._guards = []
        self._masked = bool(torch.isneginf(params.log_weights).any())
        return Start(params)

    def _features(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The batch's points as a row ``(*L', 1, N)``, their weighted ``[w, w x, w x^2]``
        ``(*L', N, 3)`` and their weights in units of the total ``(*L', N)``, computed once per batch."""
        if self._feats[0] is not batch.x:
            x, w = batch.x, batch.w.unsqueeze(-1)  # (*L', N, 1) each
            self._feats = (batch.x, x.mT, torch.cat([w, w * x, w * x.square()], -1), batch.w / batch.w_total.unsqueeze(-1))
        return self._feats[1:]

    def params(self, state: GMMParams) -> GMMParams:
        return state

    def objective(self, batch: Batch, params: GMMParams) -> Tensor:
        return EMRule(self.cov).objective(batch, params)

    def step(self, batch: Batch, state: GMMParams, active: Tensor) -> Step:
        p = batch.shaped(state)
        mu = p.means  # (*L, K, 1)
        q = self.cov.precision_from_prec_chol(p.prec_chol).reshape(mu.shape[:-2] + (-1, 1))  # (*L, K, 1); tied (*L, 1, 1)
        c0, c1, c2 = univariate_quadratic(p.log_weights.unsqueeze(-1), mu, q)  # (*L, K, 1) each
        x, feats, w_share = self._features(batch)  # (*L', 1, N), (*L', N, 3), (*L', N)
        e = exp_normal(torch.addcmul(c0, x, torch.addcmul(c1, x, c2)), True)  # (*L, K, N)
        s = e.sum(-2)  # (*L, N)
        value = (w_share * s.log()).sum(-1)  # (*L): mean log-likelihood before the update
        e.div_(s.unsqueeze(-2))  # responsibilities
        moments = torch.bmm(e, feats) if e.dim() == 3 else e @ feats  # (*L, K, 3): sums of r, r x, r x^2
        stats = univariate_stats_about(*moments.unbind(-1), mu.squeeze(-1), self.cov, value)  # about the current means
        new, ok = m_step(stats, p.means, self.cov, batch.reg)
        if self._masked:  # a component of weight exactly 0 stays at 0, as in em_step
            new = keep_masked(new, p.log_weights)
        new, value, ok = batch.flat((new, value, ok))
        unsafe = expansion_unsafe(c2, mu).any() if x.dtype != torch.float64 else None
        self._guards.append((s.amin(), value, unsafe))
        return Step(new, value, ok)
