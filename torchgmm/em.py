"""EM as a step rule of the member loop, and the EM map that SQUAREM builds on.

:func:`em_step` is the EM map: one E-step fused with the statistics (one pass over the data,
chunked over points), then the M-step, for every member at once. :class:`EMRule` is the step rule
that the member loop (``torchgmm.loop``) calls once per iteration; convergence, failures,
compaction and histories are the loop's.

Data arrive standardized (see ``fit``); no validation and no messages here.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, Optional

import torch
from torch import Tensor

from ._compile import compiled
from ._ops import _BLAS_MIN_WORK, even_slices
from .covariance import Covariance, get_covariance
from .density import GMMParams, univariate_quadratic
from .loop import Batch, MemberRun, Members, Start, Step, all_finite, tree_map
from .objective import penalized_params
from .stats import _FLOAT32_EXPANSION_LIMIT, chunked_sum, e_step_statistics, fast_e_step_statistics, m_step, univariate_m_step

__all__ = ["em_step", "in_blocks", "log_likelihood", "EMRule", "EMMap", "run_univariate"]

# (x, w, w_total, params, cov, reg_covar, prior, chunk_size) -> (new params, lower bound, ok)
EMMap = Callable[..., tuple]


def em_step(
    x, w, w_total, params: GMMParams, cov: Covariance, reg_covar, prior=None, chunk_size=None,
    stats_fn=e_step_statistics, penalized: bool = False,
):
    """One EM iteration for every member: ``(new_params, lower_bound (L), ok (L))``.

    ``lower_bound`` is the weighted mean log-likelihood of ``params`` (before the update), as in
    scikit-learn. ``x (..., N, D)``, ``w (..., N)`` and ``w_total (...)`` broadcast against the
    parameters' leading dims ``L``. ``stats_fn`` is :func:`e_step_statistics` or its compiled
    twin. ``penalized``: the exact EM map of the shared objective ``F`` (``torchgmm.objective``):
    the E-step runs on the tilted log-weights, the M-step is the same, and the lower bound is
    ``F(params)`` without the prior term.
    """
    e_params = penalized_params(params, cov, reg_covar) if penalized else params
    stats = chunked_sum(lambda xc, wc: stats_fn(xc, wc, e_params, cov), x, w, chunk_size)
    new, ok = m_step(stats, params.means, cov, reg_covar, prior)
    # A component of weight exactly 0 (masked: a model with fewer components) stays at weight 0;
    # only the M-step's guard against empty components would give it a tiny one.
    new = new._replace(log_weights=torch.where(torch.isneginf(params.log_weights), params.log_weights, new.log_weights))
    return new, stats.log_lik / w_total, ok


def in_blocks(step: EMMap, block_members: Optional[int]) -> EMMap:
    """``step`` run on blocks of about ``block_members`` members at a time (whole rows of dim 0:
    series with their restarts, or single members once compacted), outputs concatenated: per
    member the same numbers, but each block's temporaries stay in cache."""
    if block_members is None:
        return step

    def blocked(x, w, w_total, params, cov, reg_covar, prior=None, chunk_size=None):
        rows = params.log_weights.shape[0]
        block_rows = max(1, block_members // params.log_weights.shape[1:-1].numel())
        if rows <= block_rows:
            return step(x, w, w_total, params, cov, reg_covar, prior, chunk_size)
        outs = []
        for part in even_slices(rows, block_rows):
            outs.append(step(
                x[part], w[part], w_total[part], params.map(lambda t: t[part]), cov, reg_covar[part],
                tree_map(lambda t: t[part], prior), chunk_size,
            ))
        news, lls, oks = zip(*outs)
        return GMMParams(*(torch.cat(ts) for ts in zip(*news))), torch.cat(lls), torch.cat(oks)

    return blocked


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
        step = functools.partial(
            em_step, stats_fn=compiled(e_step_statistics) if compile else fast_e_step_statistics, penalized=penalized
        )
        self.map: EMMap = in_blocks(step, block_members)

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


def run_univariate(members: Members, init: GMMParams, covariance_type: str | Covariance, tol: float,
                   max_iter: int, catch_interrupt: bool = True) -> Optional[MemberRun]:
    """EM for univariate data (``D = 1``), fused: what ``loop.run_members`` with an :class:`EMRule`
    computes, in about 30 small tensor operations per iteration instead of ~250, for fits whose
    per-call overhead dominates (one short series).

    Every member advances in lock-step; an iteration is the univariate E-step as two products
    against ``[1, x, x^2]`` (restarts as columns, as in ``stats.univariate_statistics``), the
    M-step on the moments (``stats.univariate_m_step``) and the next coefficients
    (``density.univariate_quadratic``). A member that converges keeps the parameters of its
    converging iteration, as in the loop; the others go on (no compaction: meant for problems whose
    temporaries fit the cache). One synchronization per iteration (how many members are still
    active); the guards the general path applies per iteration (underflow of every component at a
    point, float32's expansion limit, a failed or non-finite M-step, masked components) are
    checked once at the end, and where any of them fired this returns None: the caller runs the
    general loop from the same start instead, which handles each case (same numbers otherwise, to
    rounding: tested against ``run_members``). Ctrl-C stops at an iteration boundary, as in the loop.
    """
    cov = get_covariance(covariance_type)
    x, w, reg = members.x, members.w, members.reg  # (B, N, 1), (B, N), (B,)
    b, n = x.shape[0], x.shape[1]
    r, k = init.means.shape[1], init.means.shape[2]
    m, dtype, device = b * r, x.dtype, x.device
    log_w, mu = init.log_weights, init.means.squeeze(-1)  # (B, R, K)
    var = cov.covariance_from_prec_chol(init.prec_chol).reshape(b, r, -1)  # (B, R, K); tied (B, R, 1)
    w3 = w.unsqueeze(-1)  # (B, N, 1)
    w_mean = w3 / members.w_total[:, None, None]  # the log-likelihood's weights: its mean per point
    feats_w = torch.cat([w3, w3 * x, w3 * x.square()], -1)  # (B, N, 3): weighted [1, x, x^2]
    blas = b * n * 3 * r * k >= _BLAS_MIN_WORK  # the moments' product as _ops.product decides it
    feats_w = feats_w.mT if blas else feats_w.mT.unsqueeze(-1)  # (B, 3, N) / (B, 3, N, 1)
    reg3 = reg[:, None, None]
    guard32, tied = dtype != torch.float64, var.shape[-1] != k
    ref = torch.full((b, r), -torch.inf, dtype=dtype, device=device)
    active, n_active = torch.ones((b, r), dtype=torch.bool, device=device), m
    stop = torch.zeros((b, r), dtype=torch.long, device=device)
    converged = torch.zeros((b, r), dtype=torch.bool, device=device)
    final = (log_w, mu, var)
    values, lows, terms, elapsed = [], [], [], []
    t, interrupted, clock = 0, False, time.perf_counter()
    try:
        for it in range(max_iter):
            c0, c1, c2 = univariate_quadratic(log_w, mu, var)  # (B, R, K) each
            if guard32:  # the float32 expansion's largest cancelled term, q mu^2 / 2 (univariate_statistics)
                terms.append((c2 * mu.square()).amin())
            if tied:
                c2 = c2.expand(b, r, k)
            # joint log-probabilities c0 + x (c1 + x c2) of every point and member: (B, N, R*K)
            e = torch.addcmul(c0.reshape(b, 1, r * k), x, torch.addcmul(c1.reshape(b, 1, r * k), x, c2.reshape(b, 1, r * k))).exp_()
            e4 = e.view(b, n, r, k)
            s = e4.sum(-1)  # (B, N, R)
            lows.append(s.amin())
            value = (w_mean * s.log()).sum(-2)  # (B, R): mean log-likelihood before the update
            e4.div_(s.unsqueeze(-1))  # responsibilities
            moments = feats_w @ e if blas else (feats_w * e.unsqueeze(-3)).sum(-2)  # (B, 3, R*K)
            s0, s1, s2 = moments.view(b, 3, r, k).unbind(1)
            new = univariate_m_step(s0, s1, s2, mu, cov, reg3)
            values.append(value)
            done = (value - ref).abs_() < tol
            still = active > done  # active and not converged now
            n_still = int(still.sum())
            if n_still < n_active:  # members converged now: they keep this iteration's parameters
                done = active & done
                ended = (tuple(torch.where(done.unsqueeze(-1), a, f) for a, f in zip(new, final)),
                         torch.where(done, it + 1, stop), converged | done)
            else:
                ended = (final, stop, converged)
            # One assignment, so that an interrupt leaves a consistent state (as in the loop).
            (log_w, mu, var), ref, active, n_active, (final, stop, converged), t = new, value, still, n_still, ended, it + 1
            elapsed.append(time.perf_counter() - clock)
            if n_active == 0:
                break
    except KeyboardInterrupt:
        if not catch_interrupt:
            raise
        interrupted = True
    if t == 0:
        return None
    if n_active:  # stopped at max_iter (or interrupted): the last completed iteration
        final = tuple(torch.where(active.unsqueeze(-1), a, f) for a, f in zip((log_w, mu, var), final))
        stop = torch.where(active, t, stop)
    log_w, mu, var = final
    history = torch.stack(values[:t], -1)  # (B, R, T)
    ran = torch.arange(t, device=device) < stop.unsqueeze(-1)  # (B, R, T)
    # One synchronization for every guard: a sum is finite only if all its terms are.
    total = torch.where(ran, history, 0.0).sum() + init.log_weights.sum() + log_w.sum() + mu.sum() + var.sum()
    history = torch.where(ran, history, torch.nan)
    checks = [total, torch.stack(lows[:t]).amin(), var.amin()] + ([torch.stack(terms[:t]).amin()] if guard32 else [])
    total, low, var_min, *term = torch.stack(checks).tolist()
    if (not math.isfinite(total) or not low >= (2.0**-900 if dtype == torch.float64 else 2.0**-100)
            or not var_min > 0 or (guard32 and not term[0] > -_FLOAT32_EXPANSION_LIMIT)):
        return None
    lower_bound = history.gather(-1, (stop - 1).unsqueeze(-1)).squeeze(-1)
    prec_chol, _ = cov.prec_chol_from_covariance(var.reshape(m, *cov.covariance_shape(k, 1)), reg.repeat_interleave(r))
    params = GMMParams(log_w.reshape(m, k), mu.reshape(m, k, 1), prec_chol)
    pad = torch.full((b, r, max_iter - t), torch.nan, dtype=dtype, device=device)
    hist = torch.cat([history, pad], -1).reshape(m, max_iter)
    passes = torch.cat([torch.where(ran, torch.arange(1, t + 1, dtype=dtype, device=device), torch.nan), pad], -1)
    times = torch.tensor(elapsed[:t] + [math.nan] * (max_iter - t), dtype=torch.float64)
    return MemberRun(params, lower_bound.reshape(m), stop.reshape(m), converged.reshape(m),
                     torch.zeros(m, dtype=torch.bool, device=device), hist, passes.reshape(m, max_iter), times,
                     interrupted)
