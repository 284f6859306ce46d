"""Gradient-based maximum likelihood on THE log-density, and the objective EM and it share.

The objective (see ``docs/gradient.md``): per series, with weights ``w_n`` summing to ``W``,

    F(theta) = 1/W sum_n w_n log sum_k pi_k N(x_n | mu_k, Sigma_k) exp(-reg/2 tr(Sigma_k^-1))
               [+ log_prior(theta) / W]

i.e. the mean log-likelihood of a mixture whose complete-data log-density carries the penalty
``-reg/2 tr(P_k)`` (``P_k`` the precision; ``tied``: one ``P``). EM on ``F`` is exact: the E-step
takes its responsibilities from the *tilted* log-weights ``log pi_k - reg/2 tr P_k`` and the
M-step is exactly the familiar ``Sigma_k = S_k / n_k + reg I`` (diag, spherical and tied alike),
so ``F`` never decreases and EM's fixed points are stationary points of ``F``
(:func:`penalized_em_step`). scikit-learn's EM (the untilted E-step with ``+ reg I``) is the
same iteration with responsibilities off by ``O(reg)``; it is the fixed point of no objective.

The gradient mode evaluates ``F`` through :func:`torchgmm.density.log_prob` (no second copy of the
math), on the unconstrained parameters: softmax logits, means, and the precision Cholesky factor
with a log-diagonal (``Covariance.to_unconstrained``), packed per member into one vector.

- L-BFGS is per member: each member has its own curvature pairs, its own step length and its own
  backtracking Armijo line search (batched two-loop recursion; members that finished stop
  changing). Not ``torch.optim.LBFGS``, which takes one step length for the whole batch.
- Adam: per-member moments, step counts and convergence.

Both report a :class:`torchgmm.em.MemberRun` exactly like :func:`torchgmm.em.run_em`: per member
the objective per iteration (``history``), the density evaluations spent (``passes``, line-search
trials included; one evaluation = value and gradient over all points) and the batch's elapsed
time. Convergence is EM's rule, ``|change of F| < tol`` per member; a member whose objective or
gradient turns non-finite where no smaller step helps keeps its last finite parameters and is
marked failed.

Data arrive standardized (see ``fit``); no validation and no messages here.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
from torch import Tensor

from .covariance import Covariance, get_covariance
from .density import GMMParams, log_prob
from .em import MemberRun, em_step, member_outputs

__all__ = [
    "trace_precision",
    "penalized_params",
    "objective",
    "penalized_em_step",
    "ParamPacker",
    "run_gradient",
    "DEFAULT_LR",
]

#: Default step sizes: L-BFGS's first trial step scale, Adam's learning rate.
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.05}

# L-BFGS settings: curvature pairs kept, line-search trials per iteration, Armijo constant.
HISTORY_SIZE = 20
MAX_LINE_SEARCH = 25
ARMIJO_C1 = 1e-4


# -- the shared objective ---------------------------------------------------------------------
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


def _log_prior(prior, params: GMMParams, cov: Covariance) -> Optional[Tensor]:
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
    extra = _log_prior(prior, params, cov)
    return value if extra is None else value + extra / w_total


def penalized_em_step(x, w, w_total, params: GMMParams, cov: Covariance, reg_covar, prior=None, chunk_size=None, **kwargs):
    """One EM iteration on ``F``, with :func:`torchgmm.em.em_step`'s signature and outputs.

    The E-step runs on the tilted log-weights (the complete-data penalty); the M-step is
    ``em_step``'s own, which returns normalized weights and ``S/n_k + reg I``. The returned lower
    bound is ``F(params)`` without the prior term (as ``em_step`` reports the log-likelihood
    without it). Pass it as ``run_em(..., step=penalized_em_step)``.
    """
    reg = torch.as_tensor(reg_covar, dtype=params.means.dtype, device=params.means.device)
    return em_step(x, w, w_total, penalized_params(params, cov, reg), cov, reg_covar, prior, chunk_size, **kwargs)


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


# -- members and their data ------------------------------------------------------------------
class _Members:
    """The data of any subset of the ``M = B * R`` members (series-major). The whole set is
    evaluated as ``(B, R)`` parameters against ``(B, 1, N, D)`` data (a view); a subset gathers
    its series' rows."""

    def __init__(self, x, w, reg_covar, prior, n_init):
        self.x, self.w, self.reg, self.prior = x, w, reg_covar, prior
        self.w_total = w.sum(-1)
        self.n_series, self.n_init = x.shape[0], n_init
        self.m = self.n_series * n_init
        self.series_of = torch.arange(self.m, device=x.device) // n_init

        self._cached = (None, None)

    def data(self, members: Tensor):
        """``(lead, x, w, w_total, reg, prior)`` for ``members`` (flat member ids, ascending).

        The rows gathered for the last ``members`` tensor are reused while it is passed again."""
        if members.numel() == self.m:  # everyone, in order: broadcast, no copy
            b = self.n_series
            prior = None if self.prior is None else type(self.prior)(*(t.unsqueeze(1) for t in self.prior))
            return (b, self.n_init), self.x.unsqueeze(1), self.w.unsqueeze(1), self.w_total.unsqueeze(1), self.reg.unsqueeze(1), prior
        if self._cached[0] is members:
            return self._cached[1]
        rows = self.series_of[members]
        prior = None if self.prior is None else type(self.prior)(*(t[rows] for t in self.prior))
        out = (len(members),), self.x[rows], self.w[rows], self.w_total[rows], self.reg[rows], prior
        self._cached = (members, out)
        return out


def _value_and_grad(theta: Tensor, members: Tensor, pool: _Members, packer: ParamPacker, chunk_size):
    """``(-F (S,), -dF/dtheta (S, P))`` for flat ``theta (S, P)`` of ``members (S,)``: one data
    pass (forward and backward), chunked over points."""
    lead, x, w, w_total, reg, prior = pool.data(members)
    theta = theta.detach().reshape(*lead, packer.size).requires_grad_(True)
    n = x.shape[-2]
    step = n if chunk_size is None else max(1, int(chunk_size))
    value = torch.zeros(lead, dtype=theta.dtype, device=theta.device)
    grad = torch.zeros_like(theta)
    with torch.enable_grad():
        for start in range(0, n, step):
            params = packer.unpack(theta)
            tilted = penalized_params(params, packer.cov, reg)
            part = (w[..., start : start + step] * log_prob(x[..., start : start + step, :], tilted, packer.cov)).sum(-1)
            if start == 0:
                extra = _log_prior(prior, params, packer.cov)
                if extra is not None:
                    part = part + extra
            part = part / w_total
            (g,) = torch.autograd.grad(part.sum(), theta)
            value += part.detach()
            grad += g
    return -value.reshape(-1), -grad.reshape(-1, packer.size)


def _finite_rows(t: Tensor) -> Tensor:
    return torch.isfinite(t).all(-1) if t.dim() > 1 else torch.isfinite(t)


# -- L-BFGS, per member ---------------------------------------------------------------------------
def _two_loop(g: Tensor, s_hist: Tensor, y_hist: Tensor, rho: Tensor, valid: Tensor) -> Tensor:
    """Batched L-BFGS direction ``-H g`` for ``g (S, P)``; history ``(S, m, P)``, newest first;
    ``valid (S, m)`` masks the pairs each member has (a member without any gets ``-g``)."""
    q = g.clone()
    m = s_hist.shape[1]
    alphas = []
    for i in range(m):
        a = torch.where(valid[:, i], rho[:, i] * (s_hist[:, i] * q).sum(-1), torch.zeros_like(rho[:, i]))
        q = q - a.unsqueeze(-1) * y_hist[:, i]
        alphas.append(a)
    sy = (s_hist[:, 0] * y_hist[:, 0]).sum(-1)
    yy = (y_hist[:, 0] * y_hist[:, 0]).sum(-1)
    gamma = torch.where(valid[:, 0], sy / yy.clamp_min(torch.finfo(g.dtype).tiny), torch.ones_like(sy))
    r = gamma.unsqueeze(-1) * q
    for i in reversed(range(m)):
        b = torch.where(valid[:, i], rho[:, i] * (y_hist[:, i] * r).sum(-1), torch.zeros_like(rho[:, i]))
        r = r + (alphas[i] - b).unsqueeze(-1) * s_hist[:, i]
    return -r


class _LBFGS:
    """Per-member L-BFGS state on the working members (flat, ``(S, ...)``)."""

    def __init__(self, n: int, size: int, history_size: int, like: Tensor):
        self.s = torch.zeros(n, history_size, size, dtype=like.dtype, device=like.device)
        self.y = torch.zeros_like(self.s)
        self.rho = torch.zeros(n, history_size, dtype=like.dtype, device=like.device)
        self.valid = torch.zeros(n, history_size, dtype=torch.bool, device=like.device)

    def select(self, keep: Tensor) -> None:
        self.s, self.y, self.rho, self.valid = self.s[keep], self.y[keep], self.rho[keep], self.valid[keep]

    def direction(self, g: Tensor) -> Tensor:
        return _two_loop(g, self.s, self.y, self.rho, self.valid)

    def reset(self, mask: Tensor) -> None:
        self.valid = self.valid & ~mask.unsqueeze(-1)

    def push(self, mask: Tensor, s: Tensor, y: Tensor) -> None:
        """Prepend the pair ``(s, y)`` for members in ``mask`` (oldest pair dropped)."""
        sy = (s * y).sum(-1)
        rho = 1.0 / torch.where(mask, sy, torch.ones_like(sy))
        m3 = mask[:, None, None]
        self.s = torch.where(m3, torch.cat([s.unsqueeze(1), self.s[:, :-1]], 1), self.s)
        self.y = torch.where(m3, torch.cat([y.unsqueeze(1), self.y[:, :-1]], 1), self.y)
        self.rho = torch.where(mask[:, None], torch.cat([rho.unsqueeze(1), self.rho[:, :-1]], 1), self.rho)
        new_valid = torch.cat([torch.ones_like(mask).unsqueeze(1), self.valid[:, :-1]], 1)
        self.valid = torch.where(mask[:, None], new_valid, self.valid)


class _Adam:
    """Per-member Adam state (moments and step counts) on the working members."""

    def __init__(self, n: int, size: int, like: Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.m = torch.zeros(n, size, dtype=like.dtype, device=like.device)
        self.v = torch.zeros_like(self.m)
        self.t = torch.zeros(n, dtype=like.dtype, device=like.device)
        self.betas, self.eps = betas, eps

    def select(self, keep: Tensor) -> None:
        self.m, self.v, self.t = self.m[keep], self.v[keep], self.t[keep]

    def step(self, g: Tensor, lr: float) -> Tensor:
        b1, b2 = self.betas
        self.t = self.t + 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g.square()
        m_hat = self.m / (1 - b1 ** self.t).unsqueeze(-1)
        v_hat = self.v / (1 - b2 ** self.t).unsqueeze(-1)
        return -lr * m_hat / (v_hat.sqrt() + self.eps)


# -- the loop ---------------------------------------------------------------------------------------
def run_gradient(
    x: Tensor,
    w: Tensor,
    init: GMMParams,
    covariance_type: str | Covariance,
    reg_covar: Tensor,
    tol: float,
    max_iter: int,
    *,
    optimizer: str = "lbfgs",
    lr: Optional[float] = None,
    prior=None,
    chunk_size: Optional[int] = None,
    history_size: int = HISTORY_SIZE,
    max_line_search: int = MAX_LINE_SEARCH,
    compact_below: float = 0.5,
    catch_interrupt: bool = True,
) -> MemberRun:
    """Maximize ``F`` for ``init (B, R, ...)`` on standardized ``x (B, N, D)``, weights
    ``w (B, N)``, ``reg_covar (B,)``, ``prior`` (a NamedTuple of ``(B, ...)`` tensors with a
    ``log_prior(params, cov)`` method, or None), with ``optimizer`` ``"lbfgs"`` or ``"adam"``.

    One iteration is one L-BFGS step (direction, then a line search of one or more evaluations)
    or one Adam step (one evaluation). ``lr``: the scale of L-BFGS's first trial step (default
    1), or Adam's learning rate (default 0.05). ``lower_bound`` is ``F`` of the returned
    parameters; ``history[m, t]`` is ``F`` after iteration ``t`` and ``passes[m, t]`` the
    evaluations spent by then, the one at ``init`` included.
    """
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"optimizer={optimizer!r} is not supported; choose 'lbfgs' or 'adam'")
    lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
    cov = get_covariance(covariance_type)
    n_series, n_init, k = init.log_weights.shape
    d = x.shape[-1]
    device, dtype = x.device, x.dtype
    packer = ParamPacker(cov, k, d)
    pool = _Members(x, w, reg_covar, prior, n_init)
    m = pool.m

    theta_out = packer.pack(init.map(lambda t: t.reshape(m, *t.shape[2:]).to(dtype))).detach().clone()  # (M, P)
    out_lb, out_n_iter, out_conv, out_failed, history, passes, elapsed = member_outputs(m, max_iter, dtype, device)

    def result(interrupted=False):
        params = packer.unpack(theta_out)
        return MemberRun(params, out_lb, out_n_iter, out_conv, out_failed, history, passes, elapsed, interrupted)

    idx = torch.arange(m, device=device)  # working members
    start = time.perf_counter()
    f, g = _value_and_grad(theta_out, idx, pool, packer, chunk_size)
    if max_iter == 0:
        out_lb.copy_(-f)
        return result()
    n_pass = torch.ones(m, dtype=dtype, device=device)
    start_ok = torch.isfinite(f) & _finite_rows(g)
    out_failed |= ~start_ok
    out_lb.copy_(torch.where(start_ok, -f, out_lb))

    theta = theta_out.clone()
    state = _LBFGS(m, packer.size, history_size, theta) if optimizer == "lbfgs" else _Adam(m, packer.size, theta)
    active = start_ok.clone()

    def write_back():
        theta_out[idx] = theta
        out_lb[idx] = torch.where(torch.isfinite(f), -f, out_lb[idx])

    interrupted = False
    try:
        for it in range(max_iter):
            if not bool(active.any()):
                break
            if optimizer == "lbfgs":
                theta_new, f_new, g_new, moved, stalled, n_eval, broke = _lbfgs_iteration(
                    theta, f, g, active, idx, state, pool, packer, chunk_size, lr, max_line_search
                )
            else:
                theta_new, f_new, g_new, moved, stalled, n_eval, broke = _adam_iteration(
                    theta, f, g, active, idx, state, pool, packer, chunk_size, lr
                )
            n_pass = n_pass + n_eval
            change = (f_new - f).abs()
            converged_now = active & ((moved & (change < tol)) | stalled)
            failed_now = active & broke
            f_kept = torch.where(moved, f_new, f)
            history[idx, it] = torch.where(active, -f_kept, torch.nan)
            passes[idx, it] = torch.where(active, n_pass, torch.nan)
            out_n_iter[idx] = torch.where(active, it + 1, out_n_iter[idx])
            out_conv[idx] = out_conv[idx] | converged_now
            out_failed[idx] = out_failed[idx] | failed_now
            # One assignment, so that an interrupt leaves parameters and objective consistent.
            theta, f, g, active = (
                torch.where(moved.unsqueeze(-1), theta_new, theta),
                f_kept,
                torch.where(moved.unsqueeze(-1), g_new, g),
                active & ~converged_now & ~failed_now,
            )
            elapsed[it] = time.perf_counter() - start
            n_active = int(active.sum())
            if 0 < n_active <= compact_below * len(idx):
                write_back()
                keep = active.nonzero().squeeze(-1)
                idx, theta, f, g, n_pass = idx[keep], theta[keep], f[keep], g[keep], n_pass[keep]
                state.select(keep)
                active = torch.ones(len(idx), dtype=torch.bool, device=device)
    except KeyboardInterrupt:
        if not catch_interrupt:
            raise
        interrupted = True
    write_back()
    return result(interrupted)


def _lbfgs_iteration(theta, f, g, active, idx, state: _LBFGS, pool, packer, chunk_size, lr, max_ls):
    """One L-BFGS step for the active members: direction, batched backtracking Armijo search.

    Returns ``(theta_new, f_new, g_new, moved, stalled, n_eval, broke)``: ``moved`` members found
    a sufficient decrease; ``stalled`` found none even by steepest descent (a stationary point to
    working precision: converged); ``broke`` found only non-finite values (failed). A member whose
    quasi-Newton direction finds no decrease drops its curvature pairs and retries next time.
    """
    d = state.direction(g)
    gd = (g * d).sum(-1)
    fresh = ~state.valid[:, 0]
    not_descent = ~(gd < 0) | ~_finite_rows(d)
    state.reset(not_descent)
    d = torch.where(not_descent.unsqueeze(-1), -g, d)
    gd = torch.where(not_descent, -(g * g).sum(-1), gd)
    fresh = fresh | not_descent
    gnorm = g.norm(dim=-1)
    t = torch.where(fresh, torch.clamp(lr / gnorm.clamp_min(torch.finfo(g.dtype).tiny), max=lr), torch.full_like(gd, 1.0))

    theta_new, f_new, g_new = theta.clone(), f.clone(), g.clone()
    searching = active.clone()
    any_finite = torch.zeros_like(active)
    n_eval = torch.zeros_like(f)
    for _ in range(max_ls):
        sel = searching.nonzero().squeeze(-1)
        if sel.numel() == 0:
            break
        trial = theta[sel] + t[sel].unsqueeze(-1) * d[sel]
        ft, gt = _value_and_grad(trial, idx[sel], pool, packer, chunk_size)
        n_eval[sel] += 1
        finite = torch.isfinite(ft) & _finite_rows(gt)
        any_finite[sel] |= finite
        ok = finite & (ft <= f[sel] + ARMIJO_C1 * t[sel] * gd[sel])
        acc = sel[ok]
        theta_new[acc], f_new[acc], g_new[acc] = trial[ok], ft[ok], gt[ok]
        searching[acc] = False
        # Backtrack the others: minimizer of the quadratic through f, f'(0) and f(t), kept in
        # [0.1 t, 0.5 t]; a non-finite trial shrinks by 10.
        rej = ~ok
        ts, fs, gds = t[sel][rej], f[sel][rej], gd[sel][rej]
        curv = ft[rej] - fs - ts * gds
        quad = -gds * ts.square() / (2 * curv)
        quad = torch.where(torch.isfinite(quad) & (curv > 0), quad, 0.1 * ts)
        t[sel[rej]] = torch.minimum(torch.maximum(quad, 0.1 * ts), 0.5 * ts)
    moved = active & ~searching
    # Curvature pairs: only where s^T y > 0 (kept positive definite without a Wolfe search).
    s, y = theta_new - theta, g_new - g
    sy = (s * y).sum(-1)
    good_pair = moved & (sy > 1e-10 * s.norm(dim=-1) * y.norm(dim=-1)) & (sy > 0)
    state.push(good_pair, s, y)
    failed_search = active & searching
    stalled = failed_search & fresh & any_finite
    broke = failed_search & ~any_finite
    state.reset(failed_search)  # quasi-Newton members retry with steepest descent next time
    return theta_new, f_new, g_new, moved, stalled, n_eval, broke


def _adam_iteration(theta, f, g, active, idx, state: _Adam, pool, packer, chunk_size, lr):
    """One Adam step for the active members (one evaluation each)."""
    sel = active.nonzero().squeeze(-1)
    step = state.step(g, lr)
    trial = theta[sel] + step[sel]
    ft, gt = _value_and_grad(trial, idx[sel], pool, packer, chunk_size)
    theta_new, f_new, g_new = theta.clone(), f.clone(), g.clone()
    finite = torch.isfinite(ft) & _finite_rows(gt)
    moved = torch.zeros_like(active)
    moved[sel] = finite
    theta_new[sel], f_new[sel], g_new[sel] = trial, ft, gt
    broke = torch.zeros_like(active)
    broke[sel] = ~finite
    n_eval = torch.zeros_like(f)
    n_eval[sel] = 1
    return theta_new, f_new, g_new, moved, torch.zeros_like(active), n_eval, broke
