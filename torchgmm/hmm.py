"""``GaussianHMM``: batched Gaussian hidden Markov models on the mixture's emission density.

The only new math is the forward-backward recursion and the transition counts
(:mod:`torchgmm.forward_backward`); everything else is the mixture's:

- the emission log-densities come from :func:`torchgmm.density.joint_log_prob_and_diff` (the one
  log-density, with zero log-weights: ``log N(x_t | k)``);
- the emission M-step is :func:`torchgmm.stats.statistics` + :func:`torchgmm.stats.m_step` with
  the smoothed state posteriors as responsibilities (so ``reg_covar`` and the conjugate ``prior``
  act exactly as in the mixture);
- data are standardized per series (:mod:`torchgmm.units`), emissions initialized by
  :func:`torchgmm.init.initialize` (k-means by default), restarts are a batch dim, and every
  (series x restart) member is advanced by the member loop (:func:`torchgmm.loop.run_members`)
  with :class:`HMMRule` as its step rule;
- the restart choice, the degenerate rule and the status codes are
  :meth:`torchgmm.result.FitResult.from_members`'s.

Sequences are ``X (*B, T, D)``; ``lengths (*B,)`` marks each sequence's valid prefix (padding at
the end), which becomes a validity mask: padded steps are absent from every recursion.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn

from . import validation
from .covariance import Covariance, get_covariance
from .density import GMMParams, joint_log_prob, joint_log_prob_and_diff, univariate_coefficients
from .forward_backward import log_likelihood, posteriors, posteriors_member_last, scratch, viterbi
from .init import INIT_METHODS, initialize, make_generator
from .gradient import AdamRule, LBFGSRule
from .loop import Batch, Members, Start, Step, all_finite, run_members
from .objective import ParamPacker
from .mixture import GaussianAttributes
from .result import FitResult, FitWarning
from .stats import expansion_unsafe, m_step, statistics, univariate_stats_about
from .units import Scaling, standardize
from .validation import NotFittedError

__all__ = ["GaussianHMM", "HMMParams", "HMMRule", "HMMLBFGSRule", "HMMAdamRule", "HMMFit", "fit_hmm", "METHODS",
           "STAY_PROBABILITY", "pad_states", "regime_runs"]

#: Diagonal of the default initial transition matrix (the rest of each row split evenly): a
#: sticky start, which favours regimes over state-flipping; K = 1 gives [[1]].
STAY_PROBABILITY = 0.9


class HMMParams(NamedTuple):
    """Gaussian HMM parameters, batch (or member) dims in front."""

    log_startprob: Tensor  # (*B, K)
    log_transmat: Tensor  # (*B, K, K): row i is log P(z_t = . | z_{t-1} = i)
    means: Tensor  # (*B, K, D)
    prec_chol: Tensor  # the covariance type's shape, as GMMParams.prec_chol

    def map(self, fn) -> "HMMParams":
        """Apply ``fn`` to each tensor."""
        return HMMParams(*(fn(t) for t in self))

    def emission(self) -> GMMParams:
        """The emission densities as mixture parameters with zero log-weights: with them
        ``joint_log_prob`` is ``log N(x_t | k)``."""
        return GMMParams(torch.zeros_like(self.log_startprob), self.means, self.prec_chol)


def pad_states(params: HMMParams, n_states: int, cov: Covariance) -> HMMParams:
    """``params`` of ``K`` states as a model of ``n_states >= K`` states whose extra states are
    never reached: their start and incoming transition probabilities exactly 0 (log ``-inf``), each
    staying in itself, their emissions the first state's. The same likelihood, posteriors (0 for
    the extra states) and Viterbi paths: models of different K as one batch (a choice of K per
    series)."""
    k = params.means.shape[-2]
    extra = n_states - k
    if extra == 0:
        return params
    lead = params.log_startprob.shape[:-1]
    never = params.log_startprob.new_full((*lead, extra), -torch.inf)
    log_start = torch.cat([params.log_startprob, never], -1)
    into = torch.cat([params.log_transmat, never.unsqueeze(-2).expand(*lead, k, extra)], -1)  # (*B, K, n)
    stay = torch.where(torch.eye(n_states, dtype=torch.bool, device=into.device)[k:], 0.0, -torch.inf).to(into.dtype)
    log_trans = torch.cat([into, stay.expand(*lead, extra, n_states)], -2)

    def repeat_first(t: Tensor, axis: int) -> Tensor:  # the first state's values for the extra states
        axis %= t.dim()
        shape = list(t.shape)
        shape[axis] = extra
        return torch.cat([t, t.narrow(axis, 0, 1).expand(shape)], axis)

    means = repeat_first(params.means, -2)
    prec_chol = params.prec_chol if cov.component_axis is None else repeat_first(params.prec_chol, cov.component_axis)
    return HMMParams(log_start, log_trans, means, prec_chol)


def regime_runs(states: list) -> list:
    """The runs of one state in a Viterbi path (e.g. ``predict(x).tolist()``) (``-1`` = padding, ignored): ``[(state, first, last), ...]``
    with inclusive indices."""
    runs = []
    for t, s in enumerate(states):
        if s < 0:
            break
        if runs and runs[-1][0] == s:
            runs[-1][2] = t
        else:
            runs.append([s, t, t])
    return [tuple(r) for r in runs]


def log_emissions(x: Tensor, params: HMMParams, cov: Covariance) -> Tensor:
    """``log N(x_t | k)``, ``(*B, T, K)``, through the one log-density."""
    return joint_log_prob(x, params.emission(), cov).transpose(-1, -2)


def _no_nan(t: Tensor, n_lead: int) -> Tensor:
    return ~torch.isnan(t).flatten(n_lead).any(-1)


def _transitions(gamma0: Tensor, counts: Tensor, log_trans: Tensor) -> tuple[Tensor, Tensor]:
    """The M-step of the chain: ``startprob = gamma_0``, ``transmat = counts / row sums`` (a row
    without counts keeps its values)."""
    rows = counts.sum(-1, keepdim=True)
    return torch.log(gamma0), torch.where(rows > 0, torch.log(counts) - torch.log(rows), log_trans)


def em_step(x: Tensor, valid: Tensor, w_total: Tensor, params: HMMParams, cov: Covariance, reg: Tensor, prior=None):
    """One Baum-Welch iteration for every member: ``(new params, value, ok)``; ``value`` is the
    mean log-likelihood per valid step of ``params`` (before the update)."""
    if x.shape[-1] == 1 and prior is None:
        out = _univariate_em_step(x, valid, w_total, params, cov, reg)
        if out is not None:
            return out
    joint, diff = joint_log_prob_and_diff(x, params.emission(), cov)  # (*L, K, T), (*L, K, T, D)
    post = posteriors(params.log_startprob, params.log_transmat, joint.transpose(-1, -2), valid)
    stats = statistics(diff, post.gamma.transpose(-1, -2), cov)  # posteriors as responsibilities (0 at padding)
    emission, ok = m_step(stats, params.means, cov, reg, prior)
    log_start, log_trans = _transitions(post.gamma[..., 0, :], post.trans_counts, params.log_transmat)
    new = HMMParams(log_start, log_trans, emission.means, emission.prec_chol)
    return new, post.log_lik / w_total, ok


def _univariate_em_step(x: Tensor, valid: Tensor, w_total: Tensor, params: HMMParams, cov: Covariance, reg: Tensor):
    """:func:`em_step` for univariate data without a prior, in the recursion's member-last layout
    throughout: the emission log-densities are the mixture's quadratic in ``x``
    (:func:`torchgmm.density.univariate_coefficients`, two fused multiply-adds over ``(T, K, S)``),
    the statistics from the moments ``sum gamma [1, x, x^2]`` and the M-step
    :func:`torchgmm.stats.m_step` on them; no ``(K, T, D)`` differences and no layout copies. None where
    float32's expansion limit is exceeded (the caller then takes the general step)."""
    lead, k = params.means.shape[:-2], params.means.shape[-2]
    n_steps, dtype = x.shape[-2], x.dtype
    coef = univariate_coefficients(params.emission(), cov)  # (*L, K, 3)
    mu = params.means.squeeze(-1)  # (*L, K)
    if dtype != torch.float64 and bool(expansion_unsafe(coef[..., 2], mu).any()):
        return None
    n = int(torch.Size(lead).numel())
    xm = x.squeeze(-1).expand(*lead, n_steps).reshape(n, n_steps).mT.unsqueeze(1).contiguous()  # (T, 1, S)
    v = None
    if not bool(valid.all()):
        v = valid.expand(*lead, n_steps).reshape(n, n_steps).mT.unsqueeze(1).contiguous()
    c0, c1, c2 = coef.reshape(n, k, 3).permute(2, 1, 0).contiguous().unbind(0)  # (K, S) each
    e = scratch("emissions", (n_steps, k, n), dtype, x.device)  # (T, K, S): c0 + x (c1 + x c2)
    torch.addcmul(c0, xm, torch.addcmul(c1, xm, c2, out=e), out=e)
    start = params.log_startprob.reshape(n, k).mT.contiguous()
    trans = params.log_transmat.reshape(n, k, k).permute(1, 2, 0).contiguous()
    log_lik, gamma, counts = posteriors_member_last(start, trans, e, v)  # gamma 0 at padding
    gx = torch.mul(gamma, xm, out=e)  # (the emissions are spent)
    s0, s1, s2 = gamma.sum(0).mT, gx.sum(0).mT, gx.mul_(xm).sum(0).mT  # (S, K)
    # The statistics about the current means from the moments (the mixture's fast paths' own), the
    # scatter floored at 0 (rounding of a tiny state), then the mixture's M-step.
    mu_s = mu.reshape(n, k)
    stats = univariate_stats_about(s0, s1, s2, mu_s, cov, torch.zeros_like(log_lik))
    stats = stats._replace(scatter=stats.scatter.clamp_min(0.0))
    emission, ok = m_step(stats, mu_s.unsqueeze(-1), cov, reg.expand(lead).reshape(n), None)
    means, prec_chol = emission.means, emission.prec_chol
    log_start, log_trans = _transitions(gamma[0].mT, counts.permute(2, 0, 1), params.log_transmat.reshape(n, k, k))
    new = HMMParams(log_start.reshape(*lead, k), log_trans.reshape(*lead, k, k), means.reshape(*lead, k, 1),
                    prec_chol.reshape(*lead, *prec_chol.shape[1:]))
    return new, log_lik.reshape(lead) / w_total, ok.reshape(lead)


class HMMRule:
    """Baum-Welch EM as a step rule of the member loop: the state is the :class:`HMMParams`
    ``(S, ...)``; the value of an iteration is the mean log-likelihood per step of the parameters
    it started from (as the mixture's EM)."""

    def __init__(self, covariance_type: str | Covariance):
        self.cov = get_covariance(covariance_type)

    def apply(self, batch: Batch, params: HMMParams):
        new, value, ok = em_step(batch.x, batch.w > 0, batch.w_total, batch.shaped(params), self.cov, batch.reg, batch.prior)
        new, value, ok = batch.flat(new), value.reshape(-1), ok.reshape(-1)
        ok = ok & torch.isfinite(value) & all_finite(GMMParams(value, new.means, new.prec_chol))
        ok = ok & _no_nan(new.log_startprob, 1) & _no_nan(new.log_transmat, 1)  # -inf: a structural zero
        return new, value, ok

    def start(self, batch: Batch, params: HMMParams) -> Start:
        return Start(params)

    def step(self, batch: Batch, state: HMMParams, active: Tensor) -> Step:
        new, value, ok = self.apply(batch, state)
        return Step(new, value, ok)

    def params(self, state: HMMParams) -> HMMParams:
        return state

    def objective(self, batch: Batch, params: HMMParams) -> Tensor:
        p = batch.shaped(params)
        ll = log_likelihood(p.log_startprob, p.log_transmat, log_emissions(batch.x, p, self.cov), batch.w > 0)
        return (ll / batch.w_total).reshape(-1)


class HMMPacker:
    """:class:`HMMParams` <-> one unconstrained vector per member, ``(*L, P)``: the mixture's
    :class:`torchgmm.objective.ParamPacker` for ``[start logits (K), means, raw precision factor]``
    (the start probabilities in its weights' slot), then the transition logits ``(K*K)``
    (log-softmax over each row). A structural zero (``-inf``) is packed as a very negative finite
    logit: its probability stays 0 and its gradient 0."""

    def __init__(self, covariance_type: str | Covariance, n_components: int, n_features: int):
        self.inner = ParamPacker(covariance_type, n_components, n_features)
        self.cov, self.k = self.inner.cov, n_components
        self.size = self.inner.size + n_components * n_components

    def pack(self, params: HMMParams) -> Tensor:
        n_lead = params.means.dim() - 2
        head = self.inner.pack(GMMParams(params.log_startprob, params.means, params.prec_chol))
        trans = params.log_transmat.clamp_min(torch.finfo(params.log_transmat.dtype).min / 4)
        return torch.cat([head, trans.flatten(n_lead)], -1)

    def unpack(self, theta: Tensor) -> HMMParams:
        head, tail = theta.split([self.inner.size, self.k * self.k], -1)
        g = self.inner.unpack(head)
        log_trans = torch.log_softmax(tail.reshape(*theta.shape[:-1], self.k, self.k), -1)
        return HMMParams(g.log_weights, log_trans, g.means, g.prec_chol)


class _HMMGradient:
    """What the gradient rules need of the HMM: its packer, and ``F`` = the mean log-likelihood
    per valid step (EM's value) with its gradient, through :func:`forward_backward.log_likelihood`
    (one forward-backward pass per evaluation: Fisher's identity) and the one log-density."""

    def _begin(self, batch: Batch, params: HMMParams):
        k, d = params.means.shape[-2:]
        self.packer = HMMPacker(self.cov, k, d)
        theta = self.packer.pack(params).detach()  # (S, P)
        f, g = self._evaluate(theta, batch)
        ok = torch.isfinite(f) & torch.isfinite(g).all(-1)
        return theta, f, g, ok

    def _evaluate(self, theta: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        theta = theta.detach().reshape(*batch.lead, self.packer.size).requires_grad_(True)
        with torch.enable_grad():
            p = self.packer.unpack(theta)
            ll = log_likelihood(p.log_startprob, p.log_transmat, log_emissions(batch.x, p, self.cov), batch.w > 0)
            f = ll / batch.w_total
            (g,) = torch.autograd.grad(f.sum(), theta)
        return -f.detach().reshape(-1), -g.reshape(-1, self.packer.size)

    def objective(self, batch: Batch, params: HMMParams) -> Tensor:
        return HMMRule(self.cov).objective(batch, params)


class HMMLBFGSRule(_HMMGradient, LBFGSRule):
    """The mixture's per-member L-BFGS (own curvature pairs, own Armijo line search, its
    convergence rule) on the HMM's unconstrained parameters (:class:`HMMPacker`)."""


class HMMAdamRule(_HMMGradient, AdamRule):
    """The mixture's per-member Adam on the HMM's unconstrained parameters."""


#: Fitting methods: Baum-Welch EM, or gradient ascent of the same log-likelihood ("gradient" is
#: L-BFGS, as for the mixture).
METHODS = ("em", "gradient", "lbfgs", "adam")


def _rule(method: str, cov: Covariance, tol: float, lr):
    if method == "em":
        return HMMRule(cov)
    if method in ("gradient", "lbfgs"):
        return HMMLBFGSRule(cov, tol, lr)
    return HMMAdamRule(cov, tol, lr)


# -- input ------------------------------------------------------------------------------------------
def _valid_mask(lengths, batch_shape: torch.Size, n_steps: int, device) -> tuple[Tensor, Tensor]:
    """``(valid (*B, T) bool, lengths (*B,) int64)`` from ``lengths`` (None: all steps)."""
    if lengths is None:
        lens = torch.full(tuple(batch_shape), n_steps, dtype=torch.long, device=device)
    else:
        t = lengths if isinstance(lengths, Tensor) else torch.as_tensor(np.asarray(lengths))
        if t.dtype == torch.bool or t.is_floating_point() and not bool((t == t.round()).all()) or t.is_complex():
            raise TypeError(f"lengths must hold integers (valid steps per sequence), got dtype {t.dtype}")
        t = t.to(device=device, dtype=torch.long)
        try:
            lens = torch.broadcast_to(t, tuple(batch_shape))
        except RuntimeError:
            raise ValueError(
                f"lengths has shape {tuple(t.shape)}; expected the batch shape {tuple(batch_shape)} of X "
                "(one valid length per sequence)"
            ) from None
        if bool((lens < 1).any()) or bool((lens > n_steps).any()):
            raise ValueError(
                f"lengths must be between 1 and the number of time steps T={n_steps}; got values in "
                f"[{int(lens.min())}, {int(lens.max())}]"
            )
    valid = torch.arange(n_steps, device=device) < lens.unsqueeze(-1)
    return valid, lens


def _sequences(X, lengths, *, dtype=None, device=None, n_features=None, at_predict=False):
    """``(x (*B, T, D), valid (*B, T), lengths (*B,))``: padding zeroed (it may hold anything,
    NaN included), the valid steps checked finite."""
    t = X if isinstance(X, Tensor) else torch.as_tensor(np.asarray(X))
    if t.dim() == 0:
        raise ValueError("X must have shape (T,), (T, D) or (*B, T, D); got a scalar")
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    if device is not None:
        t = t.to(device)
    valid, lens = _valid_mask(lengths, t.shape[:-2], t.shape[-2], t.device)
    if lengths is not None:
        t = torch.where(valid.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))
    x, _ = validation.as_data(t, dtype=dtype, n_features=n_features, at_predict=at_predict)
    return x, valid, lens


def _given(value, name: str, event_shape: tuple, batch_shape, factory) -> Optional[Tensor]:
    return validation.batched_init(value, name, event_shape, batch_shape, **factory)


def _check_stochastic(p: Optional[Tensor], name: str) -> None:
    if p is None:
        return
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    total = p.sum(-1)
    atol = 1e-6 if p.dtype == torch.float64 else 1e-4
    if not bool(torch.allclose(total, torch.ones_like(total), atol=atol)):
        raise ValueError(f"{name} must sum to 1 over the last dim (the next state), got sums in "
                         f"[{float(total.min()):.6g}, {float(total.max()):.6g}]")


def default_transmat(k: int, dtype=None, device=None) -> Tensor:
    """The default initial transition matrix: ``STAY_PROBABILITY`` on the diagonal."""
    if k == 1:
        return torch.ones(1, 1, dtype=dtype, device=device)
    off = (1 - STAY_PROBABILITY) / (k - 1)
    return torch.full((k, k), off, dtype=dtype, device=device).fill_diagonal_(STAY_PROBABILITY)


# -- the fit ------------------------------------------------------------------------------------------
@dataclass
class HMMFit:
    """Result of :func:`fit_hmm`: the emission side and the status as a :class:`FitResult` (its
    ``params.log_weights`` are a placeholder, uniform) and the start and transition probabilities."""

    result: FitResult
    log_startprob: Tensor  # (*B, K)
    log_transmat: Tensor  # (*B, K, K)

    @property
    def params(self) -> HMMParams:
        p = self.result.params
        return HMMParams(self.log_startprob, self.log_transmat, p.means, p.prec_chol)


def fit_hmm(
    X, lengths=None, n_components: int = 1, *, covariance_type: str = "full", tol: float = 1e-3,
    reg_covar: float = 1e-6, max_iter: int = 100, n_init: int = 1, init_params: str = "kmeans",
    startprob_init=None, transmat_init=None, means_init=None, precisions_init=None, random_state=None,
    prior=None, dtype=None, device=None, catch_interrupt: bool = True, progress=None, warn: bool = True,
    method: str = "em", lr: Optional[float] = None,
) -> HMMFit:
    """Fit independent Gaussian HMMs to every sequence of ``X (*B, T, D)`` at once (see
    :class:`GaussianHMM` for the settings)."""
    validation.check_settings(
        n_components=n_components, covariance_type=covariance_type, tol=tol, reg_covar=reg_covar,
        max_iter=max_iter, n_init=n_init, init_params=init_params, init_methods=INIT_METHODS,
    )
    validation.check_random_state(random_state)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "em" and prior is not None:
        raise ValueError(f"prior is only supported by method='em' (a MAP M-step), not by method={method!r}")
    cov, k = get_covariance(covariance_type), n_components
    x, valid, lens = _sequences(X, lengths, dtype=dtype, device=device)
    batch_shape, (n_steps, d) = x.shape[:-2], x.shape[-2:]
    x, valid, lens = x.reshape(-1, n_steps, d), valid.reshape(-1, n_steps), lens.reshape(-1)
    n_series = x.shape[0]
    insufficient = lens < k
    if len(batch_shape) == 0 and bool(insufficient.any()):
        raise ValueError(
            f"n_components={k} must be <= the number of valid time steps, {int(lens[0])}; reduce "
            "n_components or provide a longer sequence"
        )
    w = valid.to(x.dtype)
    xs, shift, scale, reg = standardize(x, w, reg_covar)
    scaling = Scaling(shift, scale)
    factory = dict(dtype=x.dtype, device=x.device)

    start0 = _given(startprob_init, "startprob_init", (k,), batch_shape, factory)
    trans0 = _given(transmat_init, "transmat_init", (k, k), batch_shape, factory)
    means0 = _given(means_init, "means_init", (k, d), batch_shape, factory)
    prec0 = _given(precisions_init, "precisions_init", cov.covariance_shape(k, d), batch_shape, factory)
    _check_stochastic(start0, "startprob_init")
    _check_stochastic(trans0, "transmat_init")
    validation.check_init_values(None, prec0, cov)
    all_given = all(v is not None for v in (start0, trans0, means0, prec0))
    n_restarts = 1 if all_given else n_init

    if means0 is not None and prec0 is not None:
        means = ((means0.reshape(n_series, k, d) - shift.unsqueeze(-2)) / scale[:, None, None]).unsqueeze(1)
        prec_chol = cov.rescale(cov.prec_chol_from_precision(prec0.reshape(n_series, *prec0.shape[len(batch_shape):])),
                                scale.reciprocal()).unsqueeze(1)
        means, prec_chol = means.expand(-1, n_restarts, -1, -1), prec_chol.expand(n_series, n_restarts, *prec_chol.shape[2:])
    else:
        emission, distinct = initialize(xs, w, k, n_restarts, init_params, cov, reg, make_generator(random_state))
        if warn and bool((~distinct.all(-1)).any()):
            warnings.warn(
                f"{int((~distinct.all(-1)).sum())} sequence(s) have fewer distinct values than n_components={k}: "
                "some states start on the same point; reduce n_components or check for repeated values",
                FitWarning, stacklevel=3,
            )
        means, prec_chol = emission.means, emission.prec_chol
        if means0 is not None:
            means = ((means0.reshape(n_series, k, d) - shift.unsqueeze(-2)) / scale[:, None, None]).unsqueeze(1).expand_as(means)
        if prec0 is not None:
            given = cov.rescale(cov.prec_chol_from_precision(prec0.reshape(n_series, *prec0.shape[len(batch_shape):])), scale.reciprocal())
            prec_chol = given.unsqueeze(1).expand_as(prec_chol)
    start = torch.full((k,), 1.0 / k, **factory) if start0 is None else start0.reshape(n_series, 1, k)
    trans = default_transmat(k, **factory) if trans0 is None else trans0.reshape(n_series, 1, k, k)
    init = HMMParams(
        torch.log(start).expand(n_series, n_restarts, k), torch.log(trans).expand(n_series, n_restarts, k, k),
        means, prec_chol,
    )

    prior_s = None
    if prior is not None:
        from .prior import make_prior

        prior_s = make_prior(prior, xs, w, k, cov, shift=shift, scale=scale)
    with torch.no_grad():
        run = run_members(Members(xs, w, reg, prior_s, n_restarts), init, _rule(method, cov, tol, lr), tol, max_iter,
                          catch_interrupt=catch_interrupt, progress=progress)
    # The restart choice, degenerate flags, status and units are the mixture's, on the emissions;
    # the weight slot holds a neutral uniform (start probabilities may be exactly 0: -inf).
    uniform = torch.full_like(run.params.log_startprob, -math.log(k))
    emission_run = run._replace(params=GMMParams(uniform, run.params.means, run.params.prec_chol))
    result = FitResult.from_members(
        emission_run, n_restarts=n_restarts, cov=cov, scaling=scaling, reg=reg, n_valid=lens,
        empty=torch.zeros_like(insufficient), insufficient=insufficient, batch_shape=batch_shape, method=method,
    )
    result.component = "state"  # (its summaries name states, without the placeholder weights)
    rows, best = torch.arange(n_series, device=x.device), result.best_restart.reshape(-1)
    log_start = run.params.log_startprob.reshape(n_series, n_restarts, k)[rows, best]
    log_trans = run.params.log_transmat.reshape(n_series, n_restarts, k, k)[rows, best]
    if warn:
        result.warn(stacklevel=3, convergence=max_iter > 0)
    return HMMFit(result, log_start.reshape(tuple(batch_shape) + (k,)), log_trans.reshape(tuple(batch_shape) + (k, k)))


# -- the module ---------------------------------------------------------------------------------------
_PARAMETERS = ("startprob_logits", "transmat_logits", "loc", "prec_chol_raw")
_BUFFERS = ("converged_", "n_iter_", "lower_bound_", "lower_bounds_", "status_")


class GaussianHMM(GaussianAttributes, nn.Module):
    """A batch of Gaussian hidden Markov models, fitted by batched Baum-Welch EM; an ``nn.Module``.

    Emissions are Gaussian with the mixture's covariance types and attribute shapes; ``K`` hidden
    states with start probabilities ``startprob_ (*B, K)`` and a transition matrix
    ``transmat_ (*B, K, K)`` (row ``i``: the distribution of the next state after ``i``). Data
    ``X`` is ``(T,)`` (one univariate sequence), ``(T, D)`` or ``(*B, T, D)`` (independent
    sequences, each fitted separately); ``lengths (*B,)`` gives each sequence's number of valid
    steps (padding at the end, which may hold anything).

    Parameters
    ----------
    n_components : int, default 1
        Number of hidden states ``K``.
    covariance_type : {"full", "tied", "diag", "spherical"}, default "full"
    tol : float, default 1e-3
        A member stops when its mean log-likelihood per step changes by less than ``tol``.
    reg_covar : float, default 1e-6
        Added to every emission covariance's diagonal (0 allowed).
    max_iter : int, default 100
    n_init : int, default 1
        Restarts per sequence (a batch dim); the best non-degenerate one is kept.
    init_params : {"kmeans", "k-means++", "random", "random_from_data", "hierarchical"}, default "kmeans"
        How the emissions are initialized (as the mixture's components).
    startprob_init : (K,) or (*B, K), optional
        Default: uniform.
    transmat_init : (K, K) or (*B, K, K), optional
        Default: sticky, ``STAY_PROBABILITY = 0.9`` on the diagonal, the rest of each row split
        evenly. Zeros stay zero (a structural zero, e.g. a left-right model).
    means_init, precisions_init : optional
        As the mixture's, with or without the batch dims.
    random_state : int, None or torch.Generator
    prior : None, "default" or dict
        The mixture's conjugate prior on the emissions (MAP emission M-step); none on the
        transitions.
    device, dtype : as the mixture's.
    method : {"em", "gradient", "lbfgs", "adam"}, default "em"
        Baum-Welch EM, or gradient ascent of the same mean log-likelihood per step on the
        unconstrained parameters (``"gradient"`` = ``"lbfgs"``: the mixture's per-member L-BFGS;
        ``"adam"``), through the same member loop; ``tol`` as for the mixture's gradient methods.
        No ``prior`` with a gradient method.
    lr : float, optional
        The gradient method's step size (default: the mixture's, ``gradient.DEFAULT_LR``).

    Attributes
    ----------
    startprob_ (*B, K), transmat_ (*B, K, K), means_ (*B, K, D),
    covariances_, precisions_, precisions_cholesky_ (the mixture's shapes),
    lower_bound_ (*B,) mean log-likelihood per valid step of the chosen restart (before its last
    M-step), lower_bounds_ (*B, max_iter), converged_, n_iter_, status_ (FitStatus codes),
    result_ (the fit record: restarts, timings, ``summary()``).
    The parameters are ``nn.Parameter``s in unconstrained form: ``startprob_logits``,
    ``transmat_logits`` (log-softmax over the last dim), ``loc``, ``prec_chol_raw``.
    """

    def __init__(
        self, n_components: int = 1, *, covariance_type: str = "full", tol: float = 1e-3, reg_covar: float = 1e-6,
        max_iter: int = 100, n_init: int = 1, init_params: str = "kmeans", startprob_init=None, transmat_init=None,
        means_init=None, precisions_init=None, random_state=None, prior=None, device=None, dtype=None,
        method: str = "em", lr: Optional[float] = None,
    ):
        super().__init__()
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.startprob_init = startprob_init
        self.transmat_init = transmat_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.prior = prior
        self.device = device
        self.dtype = dtype
        self.method = method
        self.lr = lr
        self.result_: Optional[FitResult] = None
        for name in _PARAMETERS:
            self.register_parameter(name, None)
        for name in _BUFFERS:
            self.register_buffer(name, None)

    # -- state -------------------------------------------------------------------------------------
    def _settings(self) -> dict:
        """The constructor's settings by name, as given (``save`` writes them)."""
        return {name: getattr(self, name) for name in list(inspect.signature(type(self).__init__).parameters)[1:]}

    def save(self, path) -> None:
        """Write the model (settings, parameters, fitted state) to one file that
        ``torch.load(path, weights_only=True)`` reads; ``torchgmm.load(path)`` restores it as a
        ``GaussianHMM`` (see :mod:`torchgmm.serialization`). The fit record ``result_`` is not saved."""
        from .serialization import save

        save(self, path)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        saved = self._saved_components(state_dict, prefix, _PARAMETERS, _BUFFERS)
        trans = state_dict.get(prefix + "transmat_logits")
        if saved is not None:
            loc, raw, expected = saved
            k, d = loc.shape[-2:]
            if k != self.n_components or tuple(raw.shape) != expected or (
                    trans is not None and tuple(trans.shape) != tuple(loc.shape[:-2]) + (k, k)):
                raise ValueError(
                    f"state_dict holds {k} states of dimension {d} with precision factor shape {tuple(raw.shape)}, "
                    f"which does not fit GaussianHMM(n_components={self.n_components}, "
                    f"covariance_type={self.covariance_type!r}) (expected shape {expected})"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet; call fit(X) first")

    def hmm_params(self) -> HMMParams:
        """The parameters as a differentiable :class:`HMMParams`."""
        self._check_fitted()
        return HMMParams(
            torch.log_softmax(self.startprob_logits, -1), torch.log_softmax(self.transmat_logits, -1),
            self.loc, self._cov.from_unconstrained(self.prec_chol_raw),
        )

    def set_params_(self, params: HMMParams) -> "GaussianHMM":
        """Overwrite the parameters (data units) under no_grad (in place where the shape, dtype and
        device are unchanged)."""
        with torch.no_grad():
            values = (params.log_startprob, params.log_transmat, params.means, self._cov.to_unconstrained(params.prec_chol))
            for name, value in zip(_PARAMETERS, values):
                current, value = getattr(self, name), value.detach()
                if current is not None and current.shape == value.shape and current.dtype == value.dtype and current.device == value.device:
                    current.copy_(value)
                else:
                    setattr(self, name, nn.Parameter(value.clone()))
        return self

    def _detached(self) -> HMMParams:
        return self.hmm_params().map(lambda t: t.detach())

    @property
    def startprob_(self) -> Tensor:
        return self._detached().log_startprob.exp()

    @property
    def transmat_(self) -> Tensor:
        return self._detached().log_transmat.exp()

    # -- fitting -----------------------------------------------------------------------------------
    def fit(self, X, lengths=None, y=None) -> "GaussianHMM":
        """Fit every sequence of ``X (*B, T, D)``; ``lengths (*B,)`` valid steps per sequence."""
        out = fit_hmm(
            X, lengths, self.n_components, covariance_type=self.covariance_type, tol=self.tol,
            reg_covar=self.reg_covar, max_iter=self.max_iter, n_init=self.n_init, init_params=self.init_params,
            startprob_init=self.startprob_init, transmat_init=self.transmat_init, means_init=self.means_init,
            precisions_init=self.precisions_init, random_state=self.random_state, prior=self.prior,
            dtype=self.dtype, device=self.device, method=self.method, lr=self.lr,
        )
        result = out.result
        self.result_ = result
        self.set_params_(out.params)
        self.converged_ = result.converged
        self.n_iter_ = result.n_iter
        self.lower_bound_ = result.lower_bound
        self.lower_bounds_ = result.lower_bounds
        self.status_ = result.status
        return self

    def summary(self, names=None) -> str:
        """A readable account of the last fit; ``names``: the series' names (flat batch order)."""
        self._check_fitted()
        return self.result_.summary(names=names) if self.result_ is not None else "GaussianHMM (no fit record)"

    # -- the layer ---------------------------------------------------------------------------------
    def _mask(self, X: Tensor, lengths):
        x = X.unsqueeze(-1) if X.dim() == 1 else X
        if lengths is None:
            return x, None
        valid, _ = _valid_mask(lengths, x.shape[:-2], x.shape[-2], x.device)
        return torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device)), valid

    def forward(self, X: Tensor, lengths=None) -> Tensor:
        """``log p(x_0 .. x_{L-1})`` of each sequence, ``(*B,)``; differentiable in ``X`` and the
        parameters. ``X (..., T, D)`` broadcasts against the batch shape."""
        x, valid = self._mask(X, lengths)
        p = self.hmm_params()
        return log_likelihood(p.log_startprob, p.log_transmat, log_emissions(x, p, self._cov), valid)

    # -- validated, detached methods ---------------------------------------------------------------
    def _validated(self, X, lengths):
        self._check_fitted()
        x, valid, lens = _sequences(X, lengths, dtype=self.loc.dtype, device=self.loc.device,
                                    n_features=self.n_features_in_, at_predict=True)
        validation.check_batch_shape(x, self.batch_shape)
        return x, valid, lens

    def score(self, X, lengths=None) -> Tensor:
        """Mean log-likelihood per valid step, ``(*B,)``."""
        ll, steps = self._log_likelihood(X, lengths)
        return ll / steps

    def _log_likelihood(self, X, lengths) -> tuple[Tensor, Tensor]:
        """``(log p(x), valid steps)`` per sequence, detached."""
        x, valid, lens = self._validated(X, lengths)
        with torch.no_grad():
            p = self._detached()
            ll = log_likelihood(p.log_startprob, p.log_transmat, log_emissions(x, p, self._cov), valid)
        return ll, lens.to(ll.dtype)

    def n_parameters(self) -> int:
        """Free parameters of each model: the emissions' means and covariances, ``K - 1`` start
        probabilities (in place of a mixture's weights) and ``K (K - 1)`` transitions."""
        self._check_fitted()
        k, d = self.loc.shape[-2:]
        return self._cov.n_parameters(k, d) + k * (k - 1)

    def bic(self, X, lengths=None) -> Tensor:
        """Bayesian information criterion per sequence, ``(*B,)``: ``-2 log p(x) + n_parameters
        log T`` with ``T`` the sequence's valid steps (lower is better; hmmlearn's ``bic``)."""
        ll, steps = self._log_likelihood(X, lengths)
        return -2 * ll + self.n_parameters() * torch.log(steps)

    def aic(self, X, lengths=None) -> Tensor:
        """Akaike information criterion per sequence, ``(*B,)``: ``-2 log p(x) + 2 n_parameters``."""
        return -2 * self._log_likelihood(X, lengths)[0] + 2 * self.n_parameters()

    def predict_proba(self, X, lengths=None) -> Tensor:
        """Smoothed state posteriors ``p(z_t = k | x)``, ``(*B, T, K)`` (0 at padding)."""
        x, valid, _ = self._validated(X, lengths)
        with torch.no_grad():
            p = self._detached()
            return posteriors(p.log_startprob, p.log_transmat, log_emissions(x, p, self._cov), valid).gamma

    def predict(self, X, lengths=None) -> Tensor:
        """The Viterbi path, ``(*B, T)`` int64 (-1 at padding)."""
        x, valid, _ = self._validated(X, lengths)
        with torch.no_grad():
            p = self._detached()
            return viterbi(p.log_startprob, p.log_transmat, log_emissions(x, p, self._cov), valid)[0]

    def sample(self, n_steps: int = 1, random_state=None) -> tuple[Tensor, Tensor]:
        """Draw one sequence of ``n_steps`` per model: ``(X (*B, n, D), states (*B, n))``."""
        gen = self._sampling_generator(n_steps, "n_steps", random_state)
        p = self._detached()
        k = p.means.shape[-2]
        start = p.log_startprob.exp().reshape(-1, k).to(device=gen.device, dtype=torch.float64)
        trans = p.log_transmat.exp().reshape(-1, k, k).to(device=gen.device, dtype=torch.float64)
        rows = torch.arange(start.shape[0], device=gen.device)
        state = torch.multinomial(start, 1, generator=gen).squeeze(-1)
        states = [state]
        for _ in range(n_steps - 1):
            state = torch.multinomial(trans[rows, state], 1, generator=gen).squeeze(-1)
            states.append(state)
        return self._emit(p, torch.stack(states, -1), gen)  # states (B, n)

    def extra_repr(self) -> str:
        shape = f", batch_shape={tuple(self.loc.shape[:-2])}" if self.is_fitted else ""
        return f"n_components={self.n_components}, covariance_type={self.covariance_type!r}{shape}"
