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
state for every member at once (a Python loop over time, ``T`` small batched ops). A parallel
(associative) scan over time in the log-semiring is the way to long sequences on CUDA; see
docs/hmm.md.

Pure, differentiable tensor functions; no validation here.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["Posteriors", "forward_log", "log_likelihood", "posteriors", "viterbi"]


def _time_major(log_emit: Tensor, valid: Optional[Tensor]):
    """``log_emit (*L, T, K)`` -> ``(T, *L, K)`` (contiguous slices per step); ``valid`` ->
    ``(T, *L', 1)`` or None."""
    e = log_emit.movedim(-2, 0).contiguous()
    v = None if valid is None else valid.movedim(-1, 0).unsqueeze(-1)
    return e, v


def _forward(log_start: Tensor, log_trans: Tensor, e: Tensor, v: Optional[Tensor]) -> list[Tensor]:
    """The forward variables ``log p(x_{0..t}, z_t = k)`` as a list of ``T`` tensors ``(*L, K)``
    (carried unchanged through padding)."""
    alpha = [log_start + e[0]]
    for t in range(1, e.shape[0]):
        new = torch.logsumexp(alpha[-1].unsqueeze(-1) + log_trans, dim=-2) + e[t]
        alpha.append(new if v is None else torch.where(v[t], new, alpha[-1]))
    return alpha


def forward_log(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Forward variables ``log p(x_0..x_t, z_t = k)``, ``(*L, T, K)`` (at padding: the last valid one)."""
    e, v = _time_major(log_emit, valid)
    return torch.stack(_forward(log_start, log_trans, e, v), dim=-2)


def log_likelihood(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """``log p(x_0 .. x_{L-1})`` of each sequence, ``(*L,)``; differentiable."""
    e, v = _time_major(log_emit, valid)
    return torch.logsumexp(_forward(log_start, log_trans, e, v)[-1], dim=-1)


class Posteriors(NamedTuple):
    log_lik: Tensor  # (*L,)        log p(x) per sequence
    gamma: Tensor  # (*L, T, K)     p(z_t = k | x), 0 at padding
    trans_counts: Tensor  # (*L, K, K)  sum_t p(z_t = i, z_{t+1} = j | x)


def posteriors(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None) -> Posteriors:
    """Forward-backward: the log-likelihood, the smoothed state posteriors and the expected
    transition counts (the E-step of Baum-Welch)."""
    e, v = _time_major(log_emit, valid)
    n_steps = e.shape[0]
    alpha = _forward(log_start, log_trans, e, v)
    log_lik = torch.logsumexp(alpha[-1], dim=-1)  # (*L,)
    zero = torch.zeros((), dtype=e.dtype, device=e.device)
    # beta_t = log p(x_{t+1..} | z_t): 0 at the last step and wherever the next step is padding.
    beta = [torch.zeros_like(alpha[-1])]
    for t in range(n_steps - 2, -1, -1):
        new = torch.logsumexp(log_trans + (e[t + 1] + beta[-1]).unsqueeze(-2), dim=-1)
        beta.append(new if v is None else torch.where(v[t + 1], new, zero))
    beta.reverse()
    a = torch.stack(alpha, dim=-2)  # (*L, T, K)
    b = torch.stack(beta, dim=-2)
    ll = log_lik[..., None, None]
    gamma = torch.exp(a + b - ll)
    if valid is not None:
        gamma = gamma * valid.unsqueeze(-1).to(gamma.dtype)
    if n_steps > 1:
        eb = e.movedim(0, -2) + b  # (*L, T, K): log p(x_t | z_t) + beta_t
        log_xi = a[..., :-1, :, None] + log_trans.unsqueeze(-3) + eb[..., 1:, None, :] - ll.unsqueeze(-1)  # (*L, T-1, K, K)
        xi = torch.exp(log_xi)
        if valid is not None:
            xi = xi * valid[..., 1:, None, None].to(xi.dtype)
        counts = xi.sum(-3)
    else:
        counts = torch.zeros(log_lik.shape + log_trans.shape[-2:], dtype=e.dtype, device=e.device)
    return Posteriors(log_lik, gamma, counts)


def viterbi(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The most likely state path ``(*L, T)`` (int64, -1 at padding) and its log-probability ``(*L,)``."""
    e, v = _time_major(log_emit, valid)
    n_steps, k = e.shape[0], e.shape[-1]
    delta = log_start + e[0]
    identity = torch.arange(k, device=e.device)
    pointers = []
    for t in range(1, n_steps):
        scores = delta.unsqueeze(-1) + log_trans  # (*L, K_prev, K)
        best, arg = scores.max(dim=-2)
        new = best + e[t]
        if v is not None:
            new = torch.where(v[t], new, delta)
            arg = torch.where(v[t], arg, identity)
        delta, pointers = new, pointers + [arg]
    log_p, state = delta.max(dim=-1)  # the state at the last valid step (carried through padding)
    path = [state]
    for arg in reversed(pointers):
        state = torch.gather(arg, -1, state.unsqueeze(-1)).squeeze(-1)
        path.append(state)
    path.reverse()
    states = torch.stack(path, dim=-1)
    if valid is not None:
        states = torch.where(valid.expand(states.shape), states, torch.full_like(states, -1))
    return states, log_p
