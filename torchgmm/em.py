"""The EM loop: many independent fits ("members": series x restarts) advanced in lock-step.

Per-member bookkeeping: each member has its own lower bound, iteration count, convergence
(``|change of the lower bound| < tol``, as scikit-learn) and failure flag. A finished member stops
changing. When at most ``compact_below`` of the working set is still active, the working set is
compacted to the active members (their data gathered once), so converged members stop costing.

A member whose M-step fails (a covariance not positive definite even after jitter, or non-finite
numbers) keeps its last finite parameters, the lower bound that belongs to them, and is marked
failed: it never raises and never touches its neighbours.

Data arrive standardized (see ``fit``); no validation and no messages here.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ._compile import compiled
from ._ops import even_slices
from .covariance import Covariance, get_covariance
from .density import GMMParams
from .stats import chunked_sum, e_step_statistics, m_step

__all__ = ["MemberRun", "member_outputs", "em_step", "in_blocks", "run_em", "log_likelihood"]


class MemberRun(NamedTuple):
    """Outcome of every member, flattened to ``M = B * R`` (series-major)."""

    params: GMMParams  # (M, ...)
    lower_bound: Tensor  # (M,) mean log-likelihood of the final parameters' predecessor (sklearn)
    n_iter: Tensor  # (M,) int64
    converged: Tensor  # (M,) bool
    failed: Tensor  # (M,) bool
    history: Tensor  # (M, T) lower bound per iteration, NaN after the member stopped
    passes: Tensor  # (M, T) data passes spent so far (density evaluations), NaN after the stop
    elapsed: Tensor  # (T,) seconds since the start, at the end of each iteration
    interrupted: bool


# (x, w, w_total, params, cov, reg_covar, prior, chunk_size) -> (new params, lower bound, ok)
StepFn = Callable[..., tuple]


def member_outputs(m: int, max_iter: int, dtype, device) -> tuple[Tensor, ...]:
    """Fresh per-member outputs of a run (shared by EM, SQUAREM and the gradient mode):
    ``(lower_bound, n_iter, converged, failed, history, passes, elapsed)`` as in :class:`MemberRun`."""
    return (
        torch.full((m,), -torch.inf, dtype=dtype, device=device),
        torch.zeros(m, dtype=torch.long, device=device),
        torch.zeros(m, dtype=torch.bool, device=device),
        torch.zeros(m, dtype=torch.bool, device=device),
        torch.full((m, max_iter), torch.nan, dtype=dtype, device=device),
        torch.full((m, max_iter), torch.nan, dtype=dtype, device=device),
        torch.full((max_iter,), torch.nan, dtype=torch.float64),
    )


def em_step(
    x, w, w_total, params: GMMParams, cov: Covariance, reg_covar, prior=None, chunk_size=None,
    stats_fn=e_step_statistics,
):
    """One EM iteration for every member: ``(new_params, lower_bound (L), ok (L))``.

    ``lower_bound`` is the weighted mean log-likelihood of ``params`` (before the update), as in
    scikit-learn. ``x (..., N, D)``, ``w (..., N)`` and ``w_total (...)`` broadcast against the
    parameters' leading dims ``L``. ``stats_fn`` is :func:`e_step_statistics` or its compiled
    twin.
    """
    stats = chunked_sum(lambda xc, wc: stats_fn(xc, wc, params, cov), x, w, chunk_size)
    new, ok = m_step(stats, params.means, cov, reg_covar, prior)
    return new, stats.log_lik / w_total, ok


def in_blocks(step: StepFn, block_members: Optional[int]) -> StepFn:
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
                _map_optional(prior, lambda t: t[part]), chunk_size,
            ))
        news, lls, oks = zip(*outs)
        return GMMParams(*(torch.cat(ts) for ts in zip(*news))), torch.cat(lls), torch.cat(oks)

    return blocked


def log_likelihood(x, w, w_total, params: GMMParams, cov, chunk_size=None) -> Tensor:
    """Weighted mean log-likelihood of ``params``, shape of the parameters' leading dims."""
    stats = chunked_sum(lambda xc, wc: e_step_statistics(xc, wc, params, cov), x, w, chunk_size)
    return stats.log_lik / w_total


def _expand_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(mask.shape + (1,) * (like.dim() - mask.dim()))


def _select(mask: Tensor, a: GMMParams, b: GMMParams) -> GMMParams:
    return GMMParams(*(torch.where(_expand_mask(mask, x), x, y) for x, y in zip(a, b)))


def _map_optional(tree, fn):
    """``fn`` over the tensors of an optional NamedTuple of per-series tensors."""
    return None if tree is None else type(tree)(*(fn(t) for t in tree))


def _all_finite(params: GMMParams, n_lead: int) -> Tensor:
    ok = None
    for t in params:
        fin = torch.isfinite(t).flatten(n_lead).all(-1) if t.dim() > n_lead else torch.isfinite(t)
        ok = fin if ok is None else ok & fin
    return ok


def run_em(
    x: Tensor,
    w: Tensor,
    init: GMMParams,
    covariance_type: str | Covariance,
    reg_covar: Tensor,
    tol: float,
    max_iter: int,
    *,
    prior=None,
    chunk_size: Optional[int] = None,
    step: Optional[StepFn] = None,
    compile: bool = False,
    prune_after: Optional[int] = None,
    compact_below: float = 0.5,
    catch_interrupt: bool = True,
    block_members: Optional[int] = None,
) -> MemberRun:
    """Run EM for ``init (B, R, ...)`` on standardized ``x (B, N, D)``, weights ``w (B, N)``.

    ``reg_covar (B,)`` and ``prior`` (a NamedTuple of ``(B, ...)`` tensors, or None) are per
    series (both are rescaled with the data). ``step`` replaces :func:`em_step`; ``compile``
    fuses the E-step and statistics with ``torch.compile``. ``prune_after``: after that many
    iterations only the best restart of each series (highest lower bound so far) goes on; the
    others stop where they are (not converged). ``block_members``: each iteration runs on blocks of
    about that many members (see :func:`in_blocks`). Returns a :class:`MemberRun`.
    """
    cov = get_covariance(covariance_type)
    if step is None:
        step = functools.partial(em_step, stats_fn=compiled(e_step_statistics) if compile else e_step_statistics)
    step = in_blocks(step, block_members)
    n_series, n_init = init.log_weights.shape[:2]
    m = n_series * n_init
    device, dtype = x.device, x.dtype
    w_total = w.sum(-1)  # (B,)
    series_of = torch.arange(m, device=device) // n_init  # (M,)

    out = init.map(lambda t: t.reshape(m, *t.shape[2:]).clone())
    out_lb, out_n_iter, out_conv, out_failed, history, passes, elapsed = member_outputs(m, max_iter, dtype, device)

    if max_iter == 0:
        lb0 = log_likelihood(x.unsqueeze(1), w.unsqueeze(1), w_total.unsqueeze(1), init, cov, chunk_size)
        return MemberRun(out, lb0.reshape(m), out_n_iter, out_conv, out_failed, history, passes, elapsed, False)

    # Working set, first as (B, R) against data broadcast as (B, 1, N, D) (no copies), later as a
    # flat list of the active members with their data gathered.
    idx = torch.arange(m, device=device)
    xw, ww, wtw, regw = x.unsqueeze(1), w.unsqueeze(1), w_total.unsqueeze(1), reg_covar.unsqueeze(1)
    priorw = _map_optional(prior, lambda t: t.unsqueeze(1))
    params = init
    lead = (n_series, n_init)
    lb = out_lb.reshape(lead)
    n_iter = out_n_iter.reshape(lead)
    conv = out_conv.reshape(lead)
    failed = out_failed.reshape(lead)
    active = torch.ones(lead, dtype=torch.bool, device=device)

    def write_back():
        flat = len(idx)
        for o, p in zip(out, params):
            o[idx] = p.reshape(flat, *o.shape[1:])
        out_lb[idx] = lb.reshape(flat)
        out_n_iter[idx] = n_iter.reshape(flat)
        out_conv[idx] = conv.reshape(flat)
        out_failed[idx] = failed.reshape(flat)

    interrupted = False
    start = time.perf_counter()
    try:
        for it in range(max_iter):
            new, ll, ok = step(xw, ww, wtw, params, cov, regw, priorw, chunk_size)
            ll_ok = torch.isfinite(ll)
            good = active & ok & ll_ok & _all_finite(new, active.dim())
            converged_now = good & ((ll - lb).abs() < tol)
            failed_now = active & ~good
            history[idx, it] = torch.where(active, ll, torch.nan).reshape(-1)
            passes[idx, it] = torch.where(active, float(it + 1), torch.nan).reshape(-1).to(dtype)
            # One assignment, so that an interrupt leaves a consistent state.
            params, lb, n_iter, conv, failed, active = (
                _select(good, new, params),
                torch.where(active & ll_ok, ll, lb),
                torch.where(active, it + 1, n_iter),
                conv | converged_now,
                failed | failed_now,
                active & ~converged_now & ~failed_now,
            )
            elapsed[it] = time.perf_counter() - start
            if prune_after is not None and it + 1 == prune_after and n_init > 1:
                write_back()
                score = torch.where(out_failed, -torch.inf, out_lb).reshape(n_series, n_init)
                keep = torch.zeros_like(score, dtype=torch.bool)
                keep[torch.arange(n_series, device=device), score.argmax(-1)] = True
                active = active & keep.reshape(-1)[idx].reshape(active.shape)
            n_active = int(active.sum())
            if n_active == 0:
                break
            if n_active <= compact_below * active.numel():
                write_back()
                idx = idx[active.reshape(-1)]
                if len(idx) == 1:  # keep >= 2 rows: a batch of 1 would recompile the fused step
                    idx = idx.repeat(2)  # (the twin rows compute and write back identical values)
                params = out.map(lambda t: t[idx])
                lb, n_iter, conv, failed = out_lb[idx], out_n_iter[idx], out_conv[idx], out_failed[idx]
                active = torch.ones(len(idx), dtype=torch.bool, device=device)
                rows = series_of[idx]
                xw, ww, wtw, regw = x[rows], w[rows], w_total[rows], reg_covar[rows]
                priorw = _map_optional(prior, lambda t: t[rows])
    except KeyboardInterrupt:
        if not catch_interrupt:
            raise
        interrupted = True
    write_back()
    return MemberRun(out, out_lb, out_n_iter, out_conv, out_failed, history, passes, elapsed, interrupted)
