"""SQUAREM: EM accelerated by squared extrapolation (Varadhan & Roland 2008), per member.

One cycle per member, from the current iterate ``theta0``:

1. ``theta1 = EM(theta0)``, ``theta2 = EM(theta1)`` (each E-step also gives the objective of its
   input, ``L0 = F(theta0)``, ``L1 = F(theta1)``);
2. ``r = theta1 - theta0``, ``v = theta2 - 2 theta1 + theta0`` and the SqS3 step
   ``alpha = -clamp(|r| / |v|, 1, step_max)``, all in the unconstrained coordinates of
   :class:`torchgmm.gradient.ParamPacker` (log-weights, means, log-diagonal precision Cholesky
   factor), so the extrapolated point is always a valid mixture;
3. ``theta' = theta0 - 2 alpha r + alpha^2 v`` and one stabilizing EM step from it,
   ``theta3 = EM(theta')``, which also gives ``L' = F(theta')``;
4. the monotonicity safeguard: if ``L' < L1`` (or ``theta'`` is not a valid mixture), the member
   falls back to the plain EM iterate ``theta2``; else it continues from ``theta3``.
   ``step_max`` (per member) grows 4x after an accepted step at the cap and shrinks 4x after a
   rejection (SQUAREM's ``mstep``).

Every E-step is an "iteration": ``max_iter`` caps E-steps (data passes), ``n_iter`` counts them,
``history`` holds ``F`` of the point each E-step evaluated (on a rejection, the last accepted
value), and convergence is EM's rule ``|change of F| < tol`` between consecutive evaluated points
of a member's accepted path. The EM map is :func:`torchgmm.em.em_step`, the one ``run_em`` uses,
so SQUAREM converges to the fixed points plain EM converges to and reports the same lower bound
(scikit-learn's map: the mean log-likelihood, which it increases up to ``O(reg_covar)``).
``penalized=True`` accelerates instead the exact EM map of the shared penalized objective
(:func:`torchgmm.gradient.penalized_em_step`), which EM increases exactly, so that the safeguard
makes SQUAREM monotone in it; :func:`torchgmm.compare.compare` runs it so.

Data arrive standardized (see ``fit``); no validation and no messages here.
"""

from __future__ import annotations

import functools
import time
from typing import Optional

import torch
from torch import Tensor

from ._compile import compiled
from .covariance import Covariance, get_covariance
from .density import GMMParams
from .em import MemberRun, _all_finite, em_step, in_blocks, member_outputs
from .gradient import ParamPacker, _Members, penalized_em_step
from .stats import e_step_statistics

__all__ = ["run_squarem", "STEP_FACTOR"]

#: SQUAREM's ``mstep``: growth (and shrink) factor of the per-member cap on ``|alpha|``.
STEP_FACTOR = 4.0


def run_squarem(
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
    penalized: bool = False,
    compile: bool = False,
    compact_below: float = 0.5,
    catch_interrupt: bool = True,
    block_members: Optional[int] = None,
) -> MemberRun:
    """SQUAREM (SqS3) for ``init (B, R, ...)`` on standardized ``x (B, N, D)``, ``w (B, N)``,
    ``reg_covar (B,)``; arguments and result as :func:`torchgmm.em.run_em` (``max_iter`` counts
    E-steps). ``compile`` fuses the E-step and statistics with ``torch.compile``, as in ``run_em``."""
    cov = get_covariance(covariance_type)
    step = penalized_em_step if penalized else em_step
    if compile:
        step = functools.partial(step, stats_fn=compiled(e_step_statistics))
    step = in_blocks(step, block_members)
    n_series, n_init, k = init.log_weights.shape
    d = x.shape[-1]
    device, dtype = x.device, x.dtype
    packer = ParamPacker(cov, k, d)
    pool = _Members(x, w, reg_covar, prior, n_init)
    m = pool.m

    out = init.map(lambda t: t.reshape(m, *t.shape[2:]).clone())
    out_lb, out_n_iter, out_conv, out_failed, history, passes, elapsed = member_outputs(m, max_iter, dtype, device)
    idx = torch.arange(m, device=device)  # working members
    params = out.map(lambda t: t.clone())  # current iterate per working member (flat)
    l_prev = torch.full((m,), -torch.inf, dtype=dtype, device=device)  # F of the last accepted point
    lb = out_lb.clone()
    n_iter = out_n_iter.clone()
    conv, failed = out_conv.clone(), out_failed.clone()
    active = torch.ones(m, dtype=torch.bool, device=device)
    step_max = torch.ones(m, dtype=dtype, device=device)
    clock = {"j": 0, "start": time.perf_counter()}

    def em(p: GMMParams):
        """One E+M step of every working member (flat params) -> flat (new, ll, good)."""
        lead, xw, ww, wtw, regw, priorw = pool.data(idx)
        shaped = p.map(lambda t: t.reshape(*lead, *t.shape[1:]))
        new, ll, ok = step(xw, ww, wtw, shaped, cov, regw, priorw, chunk_size)
        new = new.map(lambda t: t.reshape(len(idx), *t.shape[len(lead):]))
        ll, ok = ll.reshape(-1), ok.reshape(-1)
        good = ok & torch.isfinite(ll) & _all_finite(new, 1)
        return new, ll, good

    def record(values: Tensor, mask: Tensor):
        j = clock["j"]
        history[idx, j] = torch.where(mask, values, torch.nan)
        n_iter_new = torch.where(mask, j + 1, n_iter)
        passes[idx, j] = torch.where(mask, (j + 1.0), torch.nan).to(dtype)
        elapsed[j] = time.perf_counter() - clock["start"]
        clock["j"] = j + 1
        return n_iter_new

    def select(mask: Tensor, a: GMMParams, b: GMMParams) -> GMMParams:
        return GMMParams(*(torch.where(mask.reshape(mask.shape + (1,) * (ta.dim() - 1)), ta, tb) for ta, tb in zip(a, b)))

    def write_back():
        for o, p in zip(out, params):
            o[idx] = p
        out_lb[idx], out_n_iter[idx], out_conv[idx], out_failed[idx] = lb, n_iter, conv, failed

    def plain_em_step(p: GMMParams):
        """EM's own bookkeeping for one step from ``p``; returns the step's output ``new``."""
        nonlocal lb, n_iter, conv, failed, active, l_prev
        new, ll, good = em(p)
        good = good & active
        done = good & ((ll - l_prev).abs() < tol)
        bad = active & ~good
        n_iter = record(torch.where(active & torch.isfinite(ll), ll, lb), active)
        lb = torch.where(good, ll, lb)
        l_prev = torch.where(good, ll, l_prev)
        conv, failed = conv | done, failed | bad
        return new, good, done, bad

    if max_iter == 0:
        out_lb.copy_(em(params)[1])
        return MemberRun(out, out_lb, out_n_iter, out_conv, out_failed, history, passes, elapsed, False)

    interrupted = False
    try:
        while clock["j"] < max_iter and bool(active.any()):
            p0 = params
            # EM step 1: theta1 = EM(theta0), L0 = F(theta0)
            p1, good, done, bad = plain_em_step(p0)
            params = select(good, p1, p0)  # converged members return theta1, failed keep theta0
            active = active & ~done & ~bad
            if clock["j"] >= max_iter or not bool(active.any()):
                break
            # EM step 2: theta2 = EM(theta1), L1 = F(theta1)
            p2, good, done, bad = plain_em_step(p1)
            params = select(good, p2, params)
            active = active & ~done & ~bad
            l1 = l_prev.clone()
            if clock["j"] >= max_iter or not bool(active.any()):
                break
            # SqS3 extrapolation in the unconstrained coordinates.
            t0, t1, t2 = packer.pack(p0), packer.pack(p1), packer.pack(p2)
            r, v = t1 - t0, t2 - 2 * t1 + t0
            rr, vv = r.square().sum(-1), v.square().sum(-1)
            ratio = torch.where(vv > 0, (rr / vv.clamp_min(torch.finfo(dtype).tiny)).sqrt(), torch.ones_like(rr))
            alpha = -torch.minimum(torch.clamp(ratio, min=1.0), step_max)
            alpha = torch.where(torch.isfinite(alpha), alpha, -torch.ones_like(alpha))
            t_ext = t0 - 2 * alpha.unsqueeze(-1) * r + alpha.square().unsqueeze(-1) * v
            p_ext = packer.unpack(t_ext)
            # Stabilizing EM step from the extrapolated point, with the safeguard.
            p3, l_ext, good3 = em(p_ext)
            accept = active & good3 & (l_ext >= l1)
            done = accept & ((l_ext - l1).abs() < tol)
            n_iter = record(torch.where(accept, l_ext, l1), active)
            params = select(accept, p3, params)  # rejected: theta2 (already there)
            lb = torch.where(accept, l_ext, lb)
            l_prev = torch.where(accept, l_ext, l_prev)
            at_cap = accept & (alpha <= -step_max)
            step_max = torch.where(at_cap, step_max * STEP_FACTOR, step_max)
            rejected = active & ~accept
            step_max = torch.where(rejected, torch.clamp(step_max / STEP_FACTOR, min=1.0), step_max)
            conv = conv | done
            active = active & ~done
            n_active = int(active.sum())
            if 0 < n_active <= compact_below * len(idx):
                write_back()
                keep = active.nonzero().squeeze(-1)
                idx = idx[keep]
                params = params.map(lambda t: t[keep])
                lb, n_iter, conv, failed = lb[keep], n_iter[keep], conv[keep], failed[keep]
                l_prev, step_max, active = l_prev[keep], step_max[keep], active[keep]
    except KeyboardInterrupt:
        if not catch_interrupt:
            raise
        interrupted = True
    write_back()
    return MemberRun(out, out_lb, out_n_iter, out_conv, out_failed, history, passes, elapsed, interrupted)
