"""SQUAREM: EM accelerated by squared extrapolation (Varadhan & Roland 2008), per member.

One cycle per member, from the current iterate ``theta0``:

1. ``theta1 = EM(theta0)``, ``theta2 = EM(theta1)`` (each E-step also gives the objective of its
   input, ``L0 = F(theta0)``, ``L1 = F(theta1)``);
2. ``r = theta1 - theta0``, ``v = theta2 - 2 theta1 + theta0`` and the SqS3 step
   ``alpha = -clamp(|r| / |v|, 1, step_max)``, all in the unconstrained coordinates of
   :class:`torchgmm.objective.ParamPacker` (log-weights, means, log-diagonal precision Cholesky
   factor), so the extrapolated point is always a valid mixture;
3. ``theta' = theta0 - 2 alpha r + alpha^2 v`` and one stabilizing EM step from it,
   ``theta3 = EM(theta')``, which also gives ``L' = F(theta')``;
4. the monotonicity safeguard: if ``L' < L1`` (or ``theta'`` is not a valid mixture), the member
   falls back to the plain EM iterate ``theta2``; else it continues from ``theta3``.
   ``step_max`` (per member) grows 4x after an accepted step at the cap and shrinks 4x after a
   rejection (SQUAREM's ``mstep``).

Every E-step is an iteration of the member loop (``torchgmm.loop``): the rule cycles through three
phases (steps 1, 2 and 3 above), all working members in the same phase, so ``max_iter`` caps
E-steps (data passes), ``n_iter`` counts them, ``history`` holds ``F`` of the point each E-step
evaluated (on a rejection, the last accepted value), and convergence is EM's rule
``|change of F| < tol`` between consecutive accepted points of a member's path. The EM map is
:class:`torchgmm.em.EMRule`'s, the one EM uses, so SQUAREM converges to the fixed points plain EM
converges to and reports the same lower bound (scikit-learn's map: the mean log-likelihood, which
it increases up to ``O(reg_covar)``). ``penalized=True`` accelerates instead the exact EM map of
the shared objective (``torchgmm.objective``), which EM increases exactly, so that the safeguard
makes SQUAREM monotone in it; :func:`torchgmm.compare.compare` runs it so.

Data arrive standardized (see ``fit``); no validation and no messages here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .density import GMMParams
from .em import EMRule
from .loop import Batch, Start, Step
from .objective import ParamPacker

__all__ = ["SquaremRule", "STEP_FACTOR"]

#: SQUAREM's ``mstep``: growth (and shrink) factor of the per-member cap on ``|alpha|``.
STEP_FACTOR = 4.0


class _State(NamedTuple):
    params: GMMParams  # (S, ...) the current iterate
    theta0: GMMParams  # the cycle's start
    theta1: GMMParams  # EM(theta0)
    value1: Tensor  # (S,) F(theta1)
    step_max: Tensor  # (S,) cap on |alpha|


class SquaremRule:
    """SQUAREM (SqS3) as a step rule: one E-step per iteration, three phases per cycle."""

    def __init__(self, em: EMRule):
        self.em = em
        self.phase = 0

    def start(self, batch: Batch, params: GMMParams) -> Start:
        self.phase = 0
        s = params.means.shape[0]
        nan = torch.full((s,), torch.nan, dtype=params.means.dtype, device=params.means.device)
        return Start(_State(params, params, params, nan, torch.ones_like(nan)))

    def params(self, state: _State) -> GMMParams:
        return state.params

    def objective(self, batch: Batch, params: GMMParams) -> Tensor:
        return self.em.objective(batch, params)

    def step(self, batch: Batch, state: _State, active: Tensor) -> Step:
        phase, self.phase = self.phase, (self.phase + 1) % 3
        if phase == 0:  # theta1 = EM(theta0); value F(theta0)
            new, value, ok = self.em.apply(batch, state.params)
            return Step(state._replace(params=new, theta0=state.params, theta1=new), value, ok)
        if phase == 1:  # theta2 = EM(theta1); value F(theta1)
            new, value, ok = self.em.apply(batch, state.params)
            return Step(state._replace(params=new, value1=value), value, ok)
        # SqS3 extrapolation in the unconstrained coordinates, then a stabilizing EM step.
        k, d = state.params.means.shape[-2:]
        packer = ParamPacker(self.em.cov, k, d)
        t0, t1, t2 = packer.pack(state.theta0), packer.pack(state.theta1), packer.pack(state.params)
        r, v = t1 - t0, t2 - 2 * t1 + t0
        rr, vv = r.square().sum(-1), v.square().sum(-1)
        ratio = torch.where(vv > 0, (rr / vv.clamp_min(torch.finfo(rr.dtype).tiny)).sqrt(), torch.ones_like(rr))
        alpha = -torch.minimum(ratio.clamp_min(1.0), state.step_max)
        alpha = torch.where(torch.isfinite(alpha), alpha, -torch.ones_like(alpha))
        extrapolated = packer.unpack(t0 - 2 * alpha.unsqueeze(-1) * r + alpha.square().unsqueeze(-1) * v)
        theta3, value_ext, good = self.em.apply(batch, extrapolated)
        # The safeguard: keep theta3 only where F(theta') >= F(theta1); else fall back to theta2.
        accept = good & (value_ext >= state.value1)
        at_cap = accept & (alpha <= -state.step_max)
        step_max = torch.where(at_cap, state.step_max * STEP_FACTOR, state.step_max)
        step_max = torch.where(accept, step_max, (step_max / STEP_FACTOR).clamp_min(1.0))
        params = GMMParams(*(torch.where(accept.reshape(-1, *(1,) * (a.dim() - 1)), a, b) for a, b in zip(theta3, state.params)))
        value = torch.where(accept, value_ext, state.value1)
        return Step(state._replace(params=params, step_max=step_max), value, torch.ones_like(accept), accepted=accept)
