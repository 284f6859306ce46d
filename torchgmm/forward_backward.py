"""The hidden Markov recursions in log space (log-semiring): forward, backward, smoothed state
posteriors with the expected transition counts, and Viterbi.

Every function works on any leading dims ``*L`` (series, restarts, or the flat members of the
member loop), which broadcast between the parameters and the data: ``log_start (*L, K)``,
``log_trans (*L, K, K)`` (row ``i`` is ``log P(z_t = . | z_{t-1} = i)``), ``log_emit (*L, T, K)``
(``log N(x_t | k)``, from :func:`torchgmm.density.joint_log_prob` with zero log-weights) and
``valid (*L, T)``, a bool mask of ones then zeros (padding at the end; None: no padding).

Padded steps are absent: the forward variable is carried through them unchanged, the backward
variable is 0 (log 1) before them, their posteriors are 0 and they add no transition. A padded
sequence therefore gives the numbers of the unpadded one.

Numerics: never a product of raw probabilities; each step is one ``logsumexp`` over the previous
state for every member at once (a Python loop over time, a few batched ops per step, with the
members as the contiguous last dim inside, so that small K still vectorizes). A parallel
(associative) scan over time in the log-semiring is the way to long sequences on CUDA; see
docs/hmm.md.

Pure, differentiable tensor functions; no validation here.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["Posteriors", "forward_log", "log_likelihood", "posteriors", "viterbi"]


def _member_last(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor]):
    """Broadcast the leading dims, flatten them to ``S`` members and put the member dim last, so
    that every per-step op runs over contiguous members (small K would otherwise make the
    innermost loop 3 long): ``start (K, S)``, ``trans (K_i, K_j, S)``, ``e (T, K, S)``,
    ``v (T, 1, S)`` or None, and the leading shape."""
    k, n_steps = log_emit.shape[-1], log_emit.shape[-2]
    shapes = [log_start.shape[:-1], log_trans.shape[:-2], log_emit.shape[:-2]]
    if valid is not None:
        shapes.append(valid.shape[:-1])
    lead = torch.broadcast_shapes(*shapes)
    flat = lambda t, event: t.expand(lead + t.shape[t.dim() - event:]).reshape((-1,) + t.shape[t.dim() - event:])  # noqa: E731
    start = flat(log_start, 1).mT.contiguous()  # (K, S)
    trans = flat(log_trans, 2).permute(1, 2, 0).contiguous()  # (K_i, K_j, S)
    e = flat(log_emit, 2).permute(1, 2, 0).contiguous()  # (T, K, S)
    # No mask when every step is valid (one check here saves a select per step).
    v = None if valid is None or bool(valid.all()) else flat(valid, 1).mT.unsqueeze(1).contiguous()  # (T, 1, S)
    return start, trans, e, v, lead, n_steps, k


def _logsumexp(s: Tensor, dim: int) -> Tensor:
    """``logsumexp`` over ``dim`` for a log-semiring step (the members contiguous); -inf where every
    term is -inf."""
    m = s.amax(dim, keepdim=True).clamp_min(torch.finfo(s.dtype).min)  # all -inf: s - m stays -inf, not NaN
    return (s - m).exp_().sum(dim).log_() + m.squeeze(dim)


def _forward(start: Tensor, trans_t: Tensor, e: Tensor, v: Optional[Tensor]) -> list[Tensor]:
    """Forward variables ``log p(x_{0..t}, z_t = k)`` as ``T`` tensors ``(K, S)`` (carried unchanged
    through padding); ``trans_t (K_j, K_i, S)`` is the transposed log transition matrix."""
    alpha = [start + e[0]]
    for t in range(1, e.shape[0]):
        new = _logsumexp(alpha[-1].unsqueeze(0) + trans_t, 1) + e[t]
        alpha.append(new if v is None else torch.where(v[t], new, alpha[-1]))
    return alpha


def _to_lead(t: Tensor, lead, event: int) -> Tensor:
    """Member-last ``(*event, S)`` -> ``(*lead, *event)``."""
    return t.movedim(-1, 0).reshape(tuple(lead) + t.shape[:event])


def forward_log(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Forward variables ``log p(x_0..x_t, z_t = k)``, ``(*L, T, K)`` (at padding: the last valid one)."""
    start, trans, e, v, lead, _, _ = _member_last(log_start, log_trans, log_emit, valid)
    alpha = torch.stack(_forward(start, trans.transpose(0, 1), e, v))  # (T, K, S)
    return _to_lead(alpha, lead, 2)


def log_likelihood(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """``log p(x_0 .. x_{L-1})`` of each sequence, ``(*L,)``; differentiable."""
    start, trans, e, v, lead, _, _ = _member_last(log_start, log_trans, log_emit, valid)
    last = _forward(start, trans.transpose(0, 1), e, v)[-1]  # (K, S)
    return _logsumexp(last, 0).reshape(lead)


class Posteriors(NamedTuple):
    log_lik: Tensor  # (*L,)        log p(x) per sequence
    gamma: Tensor  # (*L, T, K)     p(z_t = k | x), 0 at padding
    trans_counts: Tensor  # (*L, K, K)  sum_t p(z_t = i, z_{t+1} = j | x)


def posteriors(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None) -> Posteriors:
    """Forward-backward: the log-likelihood, the smoothed state posteriors and the expected
    transition counts (the E-step of Baum-Welch)."""
    start, trans, e, v, lead, n_steps, k = _member_last(log_start, log_trans, log_emit, valid)
    alpha = _forward(start, trans.transpose(0, 1), e, v)
    log_lik = _logsumexp(alpha[-1], 0)  # (S,)
    zero = torch.zeros((), dtype=e.dtype, device=e.device)
    # beta_t = log p(x_{t+1..} | z_t): 0 at the last step and wherever the next step is padding.
    beta = [torch.zeros_like(alpha[-1])]
    for t in range(n_steps - 2, -1, -1):
        new = _logsumexp(trans + (e[t + 1] + beta[-1]).unsqueeze(0), 1)
        beta.append(new if v is None else torch.where(v[t + 1], new, zero))
    beta.reverse()
    a = torch.stack(alpha)  # (T, K, S)
    b = torch.stack(beta)
    gamma = torch.exp(a + b - log_lik)
    if v is not None:
        gamma = gamma * v.to(gamma.dtype)
    if n_steps > 1:
        eb = e[1:] + b[1:]  # (T-1, K_j, S)
        xi = torch.exp(a[:-1].unsqueeze(2) + trans + eb.unsqueeze(1) - log_lik)  # (T-1, K_i, K_j, S)
        if v is not None:
            xi = xi * v[1:].unsqueeze(1).to(xi.dtype)
        counts = xi.sum(0)  # (K, K, S)
    else:
        counts = torch.zeros((k, k, e.shape[-1]), dtype=e.dtype, device=e.device)
    return Posteriors(log_lik.reshape(lead), _to_lead(gamma, lead, 2), _to_lead(counts, lead, 2))


def viterbi(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The most likely state path ``(*L, T)`` (int64, -1 at padding) and its log-probability ``(*L,)``."""
    start, trans, e, v, lead, n_steps, k = _member_last(log_start, log_trans, log_emit, valid)
    trans_t = trans.transpose(0, 1)  # (K_j, K_i, S)
    delta = start + e[0]  # (K, S)
    identity = torch.arange(k, device=e.device).unsqueeze(-1)  # (K, 1)
    pointers = []
    for t in range(1, n_steps):
        best, arg = (delta.unsqueeze(0) + trans_t).max(dim=1)  # over the previous state: (K_j, S)
        new = best + e[t]
        if v is not None:
            new = torch.where(v[t], new, delta)
            arg = torch.where(v[t], arg, identity)
        delta = new
        pointers.append(arg)
    log_p, state = delta.max(dim=0)  # the state at the last valid step (carried through padding): (S,)
    path = [state]
    for arg in reversed(pointers):
        state = torch.gather(arg, 0, state.unsqueeze(0)).squeeze(0)
        path.append(state)
    path.reverse()
    states = torch.stack(path, dim=-1)  # (S, T)
    if v is not None:
        states = torch.where(v.squeeze(1).mT, states, torch.full_like(states, -1))
    return states.reshape(tuple(lead) + (n_steps,)), log_p.reshape(lead)
