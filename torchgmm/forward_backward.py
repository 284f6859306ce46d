"""The hidden Markov recursions: forward, backward, smoothed state posteriors with the expected
transition counts, the log-likelihood (differentiable), and Viterbi.

Every function works on any leading dims ``*L`` (series, restarts, or the flat members of the
member loop), which broadcast between the parameters and the data: ``log_start (*L, K)``,
``log_trans (*L, K, K)`` (row ``i`` is ``log P(z_t = . | z_{t-1} = i)``), ``log_emit (*L, T, K)``
(``log N(x_t | k)``, from :func:`torchgmm.density.joint_log_prob` with zero log-weights) and
``valid (*L, T)``, a bool mask of ones then zeros (padding at the end; None: no padding).
Padded steps are absent: their posteriors are 0, they add no transition and no likelihood, so a
padded sequence gives the numbers of the unpadded one.

Numerics. The forward-backward runs in probability space with scaling (Rabiner's): the
emissions are exponentiated once, after subtracting each step's largest log-density
(``E_t = exp(e_t - max_k e_t)``, so ``max_k E_t = 1``), and the forward and backward variables
are renormalized to sum 1 every few steps; the log-likelihood is the sum of the logs of the
per-step normalizers plus the subtracted maxima. Never a product of unscaled probabilities. The
two recursions run in one loop, stacked into one tensor, three small ops per step for both
(``state * E_t``, ``* [A, A^T]``, ``sum``), against about ten per direction for a log-semiring
step. A member whose scaled variables came within ``tiny / eps`` of underflow (a structural zero
or an outlier that every reachable state explains with ``exp(-700)``) is recomputed in log space
(``logsumexp`` per step), so the result is the log-space one wherever the scaled one could have
lost digits. Viterbi stays in log space (max-plus needs no scaling). On CUDA, sequences of at least
:data:`SCAN_MIN_STEPS` steps run the forward and backward recursions as associative scans in the
log semiring (``log2 T`` batched matrix products each, not a launch per step).

The members are the contiguous last dim inside the recursions, so that small K still vectorizes.
Pure tensor functions; no validation here.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._ops import broadcast_shapes

__all__ = ["Posteriors", "forward_log", "log_likelihood", "posteriors", "posteriors_member_last", "viterbi",
           "RENORMALIZE_EVERY", "SCAN_MIN_STEPS"]

#: Steps between renormalizations of the scaled forward and backward variables, per dtype (a
#: normalizer below ``tiny / eps`` over that many steps sends the member to the log-space path).
RENORMALIZE_EVERY = {torch.float64: 8, torch.float32: 1, torch.float16: 1, torch.bfloat16: 1}

#: On CUDA, sequences at least this long run the recursions as associative scans (O(log T) kernel
#: launches instead of a few per time step); on the CPU the scaled loop is faster (the scan does K
#: times the arithmetic).
SCAN_MIN_STEPS = 256


def _use_scan(e: Tensor) -> bool:
    """Whether member-last emissions ``e (T, K, S)`` take the scan (long sequences on a GPU)."""
    return e.device.type == "cuda" and e.shape[0] >= SCAN_MIN_STEPS


def _member_last(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor]):
    """Broadcast the leading dims, flatten them to ``S`` members and put the member dim last, so
    that every per-step op runs over contiguous members (small K would otherwise make the
    innermost loop 3 long): ``start (K, S)``, ``trans (K_i, K_j, S)``, ``e (T, K, S)``,
    ``v (T, 1, S)`` or None, and the leading shape."""
    k, n_steps = log_emit.shape[-1], log_emit.shape[-2]
    shapes = [log_start.shape[:-1], log_trans.shape[:-2], log_emit.shape[:-2]]
    if valid is not None:
        shapes.append(valid.shape[:-1])
    lead = broadcast_shapes(*shapes)
    flat = lambda t, event: t.expand(lead + t.shape[t.dim() - event:]).reshape((-1,) + t.shape[t.dim() - event:])  # noqa: E731
    start = flat(log_start, 1).mT.contiguous()  # (K, S)
    trans = flat(log_trans, 2).permute(1, 2, 0).contiguous()  # (K_i, K_j, S)
    e = flat(log_emit, 2).permute(1, 2, 0).contiguous()  # (T, K, S)
    # No mask when every step is valid (one check here saves a select per step).
    v = None if valid is None or bool(valid.all()) else flat(valid, 1).mT.unsqueeze(1).contiguous()  # (T, 1, S)
    return start, trans, e, v, lead, n_steps, k


def _to_lead(t: Tensor, lead, event: int) -> Tensor:
    """Member-last ``(*event, S)`` -> ``(*lead, *event)``."""
    return t.movedim(-1, 0).reshape(tuple(lead) + t.shape[:event])


# -- log space (the reference, and the fallback of the scaled recursion) --------------------------------
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


def _semiring(a: Tensor, b: Tensor) -> Tensor:
    """Log-semiring matrix product ``(a (x) b)[i, j] = logsumexp_k a[i, k] + b[k, j]`` of member-last
    matrices ``(..., K, K, S)``."""
    return _logsumexp(a.unsqueeze(-2) + b.unsqueeze(-4), -3)


def _max_plus(a: Tensor, b: Tensor) -> Tensor:
    """Max-plus matrix product ``max_k a[i, k] + b[k, j]`` (Viterbi's semiring), member-last."""
    return (a.unsqueeze(-2) + b.unsqueeze(-4)).amax(-3)


def _step_matrices(trans: Tensor, e: Tensor, v: Optional[Tensor]) -> Tensor:
    """``M_t[i, j] = log A_ij + e_{t}(j)`` for ``t = 1 .. T-1``, ``(T-1, K, K, S)``; the log identity
    at padded steps (the state carries through them unchanged)."""
    m = trans.unsqueeze(0) + e[1:].unsqueeze(1)
    if v is not None:
        k = trans.shape[0]
        eye = torch.full((k, k, 1), -torch.inf, dtype=e.dtype, device=e.device)
        eye[torch.arange(k), torch.arange(k)] = 0.0
        m = torch.where(v[1:].unsqueeze(1), m, eye)
    return m


def _scan(m: Tensor, later_first: bool = False, product=_semiring) -> Tensor:
    """Inclusive scan of ``m (T', ...)`` under an associative ``product`` (default the log-semiring
    matrix product), in ``log2 T'`` batched products (Hillis-Steele): ``P_t = m_0 (x) ... (x) m_t``,
    or with ``later_first`` the products taken in the other order (``m_t (x) ... (x) m_0``, for
    suffixes of a reversed sequence)."""
    d = 1
    while d < m.shape[0]:
        earlier, current = m[:-d], m[d:]
        m = torch.cat([m[:d], product(current, earlier) if later_first else product(earlier, current)])
        d *= 2
    return m


def _compose(f: Tensor, g: Tensor) -> Tensor:
    """``(f o g)[j] = f[g[j]]`` for state maps ``(..., K, S)`` (int64): associative."""
    return torch.gather(f, -2, g)


def _viterbi_scan(start: Tensor, trans: Tensor, e: Tensor, v: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Viterbi without a loop over time: the best scores ``delta_t`` by a max-plus scan, every
    step's back-pointers at once, and the path by a scan of composed back-pointer maps.
    ``(states (T, S), log_p (S,))``."""
    n_steps = e.shape[0]
    delta0 = start + e[0]  # (K, S)
    if n_steps == 1:
        log_p, state = delta0.max(0)
        return state.unsqueeze(0), log_p
    m = _step_matrices(trans, e, v)  # (T-1, K_i, K_j, S)
    prefix = _scan(m, product=_max_plus)
    delta = torch.cat([delta0.unsqueeze(0), (delta0.unsqueeze(-2).unsqueeze(0) + prefix).amax(1)])  # (T, K, S)
    pointers = (delta[:-1].unsqueeze(2) + m).argmax(1)  # (T-1, K_j, S): best previous state for each state
    log_p, last = delta[-1].max(0)  # (S,)
    # state_t = pointer_{t+1}(pointer_{t+2}(... pointer_{T-1}(last))): suffix compositions, then apply.
    maps = _scan(pointers.flip(0), later_first=True, product=_compose).flip(0)  # F_t = p_{t+1} o ... o p_{T-1}
    states = torch.cat([torch.gather(maps, 1, last.expand(n_steps - 1, 1, -1)).squeeze(1), last.unsqueeze(0)])
    return states, log_p


def _forward_backward_scan(start: Tensor, trans: Tensor, e: Tensor, v: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The log-space forward and backward variables ``(alpha, beta)``, each ``(T, K, S)``, by two
    associative scans instead of two loops over time: ``O(log T)`` batched kernels (for long
    sequences on a GPU, where one launch per step would dominate) at ``K`` times the arithmetic."""
    alpha0 = start + e[0]  # (K, S)
    if e.shape[0] == 1:
        return alpha0.unsqueeze(0), torch.zeros_like(alpha0).unsqueeze(0)
    m = _step_matrices(trans, e, v)  # (T-1, K, K, S)
    prefix = _scan(m)  # M_1 (x) ... (x) M_t
    alpha = _logsumexp(alpha0.unsqueeze(-2).unsqueeze(0) + prefix, 1)  # (T-1, K_j, S)
    suffix = _scan(m.flip(0), later_first=True).flip(0)  # M_{t+1} (x) ... (x) M_{T-1}, for t = 0 .. T-2
    beta = _logsumexp(suffix, 2)  # (T-1, K_i, S)
    return torch.cat([alpha0.unsqueeze(0), alpha]), torch.cat([beta, torch.zeros_like(alpha0).unsqueeze(0)])


def _posteriors_log(start: Tensor, trans: Tensor, e: Tensor, v: Optional[Tensor], scan: bool = False):
    """Member-last log-space forward-backward: ``(log_lik (S,), gamma (T, K, S), counts (K, K, S))``;
    ``scan``: the recursions as associative scans (:func:`_forward_backward_scan`)."""
    n_steps, k = e.shape[0], e.shape[1]
    if scan:
        a, b = _forward_backward_scan(start, trans, e, v)
        log_lik = _logsumexp(a[-1], 0)
    else:
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
    zero = torch.zeros((), dtype=e.dtype, device=e.device)
    gamma = torch.exp(a + b - log_lik)
    if v is not None:
        gamma = torch.where(v, gamma, zero)  # (NaN padding stays out)
    counts = torch.zeros((k, k, e.shape[-1]), dtype=e.dtype, device=e.device)
    for t0 in range(0, n_steps - 1, _CHUNK):  # the (steps, K, K, S) temporary in chunks
        t1 = min(t0 + _CHUNK, n_steps - 1)
        eb = e[t0 + 1:t1 + 1] + b[t0 + 1:t1 + 1]  # (c, K_j, S)
        xi = torch.exp(a[t0:t1].unsqueeze(2) + trans + eb.unsqueeze(1) - log_lik)  # (c, K_i, K_j, S)
        if v is not None:
            xi = torch.where(v[t0 + 1:t1 + 1].unsqueeze(1), xi, zero)
        counts = counts + xi.sum(0)
    return log_lik, gamma, counts


_CHUNK = 64  # time steps per (steps, K, K, S) temporary of the log-space transition counts


# -- probability space with scaling ------------------------------------------------------------------
_LOCAL = threading.local()


class _Workspace(NamedTuple):
    """The scaled loop's buffers, directions first and time in order for both: ``g, a (n, T, K, S)``,
    ``norm (n, T, 1, S)``, ``big_e (n, T, K, S)`` (the emissions, once per direction), ``tmp (n, K, K, S)``,
    and per step ``s`` views pairing the forward at time ``s`` with the backward at time ``T-1-s``."""

    g: Tensor
    a: Tensor
    norm: Tensor
    big_e: Tensor
    tmp: Tensor
    steps: list  # per step: (g view, a view, a view with a unit dim for the contraction, E view, norm view)


def _step_view(t: Tensor, s: int) -> Tensor:
    """``t (n, T, ...)`` -> ``(n, ...)``: direction 0 at time ``s``, direction 1 at time ``T-1-s``."""
    n, n_steps = t.shape[:2]
    if n == 1:
        return t[:, s]
    inner = t[0, 0]
    stride = t.stride(0) + (n_steps - 1 - 2 * s) * t.stride(1)  # > 0: direction 1 lies after direction 0
    return t.as_strided((2,) + tuple(inner.shape), (stride,) + tuple(inner.stride()), t.storage_offset() + s * t.stride(1))


def _workspace(n_steps: int, n_dir: int, k: int, s_count: int, dtype, device) -> _Workspace:
    """The buffers for one call; on the CPU the last ones of each direction count are kept (per
    thread) while the shape stays: a fresh large buffer costs a page fault per 4 KiB on first
    touch, as much as the loop itself."""
    key = (n_steps, n_dir, k, s_count, dtype, torch.device(device))
    cache = getattr(_LOCAL, "cache", None)
    if cache is None:
        cache = _LOCAL.cache = {}
    ws = cache.get(n_dir)
    if ws is None or ws[0] != key:
        opts = dict(dtype=dtype, device=device)
        g, a, big_e = (torch.empty((n_dir, n_steps, k, s_count), **opts) for _ in range(3))
        norm = torch.empty((n_dir, n_steps, 1, s_count), **opts)
        tmp = torch.empty((n_dir, k, k, s_count), **opts)
        steps = [(_step_view(g, s), _step_view(a, s), _step_view(a, s).unsqueeze(2), _step_view(big_e, s),
                  _step_view(norm, s)) for s in range(n_steps)]
        ws = (key, _Workspace(g, a, norm, big_e, tmp, steps))
        if key[-1].type == "cpu":
            cache[n_dir] = ws
    ws[1].norm.fill_(1.0)
    return ws[1]


def scratch(tag: str, shape, dtype, device) -> Tensor:
    """A per-thread buffer for a temporary of the E-step (``tag`` names it), reused while its shape
    stays (on the CPU; elsewhere a fresh tensor). Its contents are garbage; it is overwritten by
    the next call with the same tag on this thread."""
    shape, device = tuple(shape), torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    pool = getattr(_LOCAL, "scratch", None)
    if pool is None:
        pool = _LOCAL.scratch = {}
    t = pool.get(tag)
    if t is None or tuple(t.shape) != shape or t.dtype != dtype:
        t = pool[tag] = torch.empty(shape, dtype=dtype, device=device)
    return t


def _scaled(start: Tensor, trans: Tensor, e: Tensor, v: Optional[Tensor], backward: bool):
    """The scaled forward (and backward) recursion, member-last.

    Returns ``(log_lik (S,), bad (S,), ws)``: ``bad`` marks members whose scaled variables came
    near underflow (or turned non-finite), to be recomputed in log space; ``ws`` the
    :class:`_Workspace` holding the variables (valid until the next call on this thread).

    Step ``s`` advances the forward at time ``s`` and the backward at time ``T-1-s`` as one
    ``(n, K, S)`` tensor: ``a = g * E`` (the forward's ``alpha_s`` from its predictive ``g_s``; the
    backward's ``beta_t E_t``), then the next ``g = sum_i a_i M_i.`` with ``M = [A, A^T]`` (the
    forward's predictive ``g_{s+1}``; the backward's ``beta_{t-1}``), each up to a factor. Every
    ``RENORMALIZE_EVERY`` steps ``g`` is divided by its sum, kept in ``norm`` (1 elsewhere).
    """
    n_steps, k, s_count = e.shape
    dtype, device = e.dtype, e.device
    n_dir = 2 if backward else 1
    ws = _workspace(n_steps, n_dir, k, s_count, dtype, device)
    if v is not None:
        e = torch.where(v, e, torch.zeros((), dtype=dtype, device=device))  # padding: E = 1, as if no data
    m = e.amax(1, keepdim=True).clamp_min(torch.finfo(dtype).min)  # (T, 1, S); all -inf: E = 0, then bad
    torch.sub(e, m, out=ws.big_e[0]).exp_()  # (T, K, S), max 1 per step
    ws.g[0, 0].copy_(start).exp_()
    if backward:
        ws.big_e[1].copy_(ws.big_e[0])
        ws.g[1, -1].fill_(1.0)  # beta_{T-1} = 1
        mats = torch.stack([trans, trans.transpose(0, 1)], 0).exp_()  # (2, K, K, S): [A, A^T]
    else:
        mats = trans.exp().unsqueeze(0)
    every = RENORMALIZE_EVERY.get(dtype, 1)
    tmp, steps = ws.tmp, ws.steps
    for s in range(n_steps):
        g_s, a_s, a_col, e_s, norm_s = steps[s]
        if s and s % every == 0:
            torch.sum(g_s, 1, keepdim=True, out=norm_s)
            g_s.div_(norm_s)
        torch.mul(g_s, e_s, out=a_s)
        if s + 1 < n_steps:
            torch.mul(a_col, mats, out=tmp)
            torch.sum(tmp, 1, out=steps[s + 1][0])
    # The forward's normalizers: c_t = sum alpha_t / sum g_t = p(x_t | x_<t) / exp(m_t).
    sum_a = ws.a.sum(2)  # (n, T, S)
    log_c = torch.log(sum_a[0] / ws.g[0].sum(1)) + m.squeeze(1)
    if v is not None:
        log_c = torch.where(v.squeeze(1), log_c, torch.zeros((), dtype=dtype, device=device))
    log_lik = log_c.sum(0)
    # Near underflow (or not finite) anywhere, in either direction: recompute in log space.
    tiny = torch.finfo(dtype).tiny / torch.finfo(dtype).eps
    bad = ~(sum_a.amin((0, 1)) >= tiny) | ~torch.isfinite(log_lik)
    return log_lik, bad, ws, mats[0]


def _fallback(bad: Tensor, start: Tensor, trans: Tensor, e: Tensor, v: Optional[Tensor]):
    """The members ``bad`` marks, their indices and their log-space posteriors."""
    idx = bad.nonzero().squeeze(-1)
    return idx, _posteriors_log(start[:, idx], trans[..., idx], e[..., idx], None if v is None else v[..., idx])


def _posteriors_scaled(start: Tensor, trans: Tensor, e: Tensor, v: Optional[Tensor], reuse: bool = False):
    """Member-last forward-backward: ``(log_lik (S,), gamma (T, K, S), counts (K, K, S))``; members
    whose scaled recursion came near underflow are recomputed in log space. ``reuse``: gamma is a
    :func:`scratch` buffer (tag ``"gamma"``)."""
    log_lik, bad, ws, prob_trans = _scaled(start, trans, e, v, backward=True)
    gf, af, be = ws.g[0], ws.a[0], ws.a[1]  # the forward's predictive and alpha, the backward's beta E; time order
    # gamma_t ~ alpha_t beta_t = g_t E_t beta_t = g_t (beta_t E_t)
    gamma = torch.mul(gf, be, out=scratch("gamma", gf.shape, gf.dtype, gf.device)) if reuse else gf * be  # (T, K, S)
    z = gamma.sum(1, keepdim=True)  # (T, 1, S)
    gamma.div_(z)
    if v is not None:
        gamma.masked_fill_(~v, 0.0)
    # xi_t(i, j) ~ alpha_t(i) A_ij E_{t+1}(j) beta_{t+1}(j), whose sum over (i, j) is z_{t+1} times
    # the renormalization of g_{t+1}: counts_ij = A_ij sum_t alpha_t(i) w_{t+1}(j).
    w = be[1:].div_(z[1:] * ws.norm[0, 1:])  # (T-1, K, S), in place in the workspace
    if v is not None:
        w.masked_fill_(~v[1:], 0.0)
    counts = torch.empty_like(prob_trans)  # (K, K, S); no (T, K, K, S) temporary
    spare = ws.big_e[0, 1:]
    for i in range(prob_trans.shape[0]):
        torch.sum(torch.mul(af[:-1, i:i + 1], w, out=spare), 0, out=counts[i])
    counts.mul_(prob_trans)
    if bool(bad.any()):
        idx, (ll_b, gamma_b, counts_b) = _fallback(bad, start, trans, e, v)
        log_lik = log_lik.clone()
        log_lik[idx], gamma[..., idx], counts[..., idx] = ll_b, gamma_b, counts_b
    return log_lik, gamma, counts


def posteriors_member_last(start: Tensor, trans: Tensor, e: Tensor, v: Optional[Tensor] = None):
    """:func:`posteriors` on member-last tensors, for callers that build them so (the univariate
    Baum-Welch step): ``start (K, S)``, ``trans (K_i, K_j, S)`` (log), ``e (T, K, S)`` (log emissions),
    ``v (T, 1, S)`` bool or None -> ``(log_lik (S,), gamma (T, K, S), counts (K, K, S))``; gamma is
    a :func:`scratch` buffer (read it before the next call on this thread)."""
    if _use_scan(e):
        return _posteriors_log(start, trans, e, v, scan=True)
    return _posteriors_scaled(start, trans, e, v, reuse=True)


def _log_likelihood_ml(start: Tensor, trans: Tensor, e: Tensor, v: Optional[Tensor]) -> Tensor:
    if _use_scan(e):
        return _logsumexp(_forward_backward_scan(start, trans, e, v)[0][-1], 0)
    log_lik, bad, _, _ = _scaled(start, trans, e, v, backward=False)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(-1)
        vb = None if v is None else v[..., idx]
        last = _forward(start[:, idx], trans[..., idx].transpose(0, 1), e[..., idx], vb)[-1]
        log_lik = log_lik.clone()
        log_lik[idx] = _logsumexp(last, 0)
    return log_lik


# -- the public functions -------------------------------------------------------------------------------
def forward_log(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Forward variables ``log p(x_0..x_t, z_t = k)``, ``(*L, T, K)`` (at padding: the last valid
    one), by the log-space recursion."""
    start, trans, e, v, lead, _, _ = _member_last(log_start, log_trans, log_emit, valid)
    alpha = torch.stack(_forward(start, trans.transpose(0, 1), e, v))  # (T, K, S)
    return _to_lead(alpha, lead, 2)


class Posteriors(NamedTuple):
    log_lik: Tensor  # (*L,)        log p(x) per sequence
    gamma: Tensor  # (*L, T, K)     p(z_t = k | x), 0 at padding
    trans_counts: Tensor  # (*L, K, K)  sum_t p(z_t = i, z_{t+1} = j | x)


def posteriors(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None,
               *, log_space: bool = False) -> Posteriors:
    """Forward-backward: the log-likelihood, the smoothed state posteriors and the expected
    transition counts (the E-step of Baum-Welch). ``log_space=True``: the log-semiring recursion
    for every member (the reference; slower)."""
    start, trans, e, v, lead, _, _ = _member_last(log_start, log_trans, log_emit, valid)
    if log_space or _use_scan(e):
        log_lik, gamma, counts = _posteriors_log(start, trans, e, v, scan=_use_scan(e))
    else:
        log_lik, gamma, counts = _posteriors_scaled(start, trans, e, v)
    return Posteriors(log_lik.reshape(lead), _to_lead(gamma, lead, 2), _to_lead(counts, lead, 2))


class _LogLikelihood(torch.autograd.Function):
    """``log p(x)`` with the gradient of Fisher's identity: ``d log p / d log_emit[t, k] = gamma_t(k)``,
    ``d / d log_trans[i, j] = E[n_ij | x]`` (the transition counts), ``d / d log_start[k] = gamma_0(k)``
    (exact for the log-parameters as free entries; one forward-backward, no graph over time)."""

    @staticmethod
    def forward(ctx, log_start, log_trans, log_emit, valid):
        post = posteriors(log_start, log_trans, log_emit, valid)
        ctx.save_for_backward(post.gamma, post.trans_counts)
        ctx.shapes = (log_start.shape, log_trans.shape, log_emit.shape)
        return post.log_lik

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gamma, counts = ctx.saved_tensors
        s_shape, t_shape, e_shape = ctx.shapes
        g1, g2 = grad.unsqueeze(-1), grad[..., None, None]
        d_start = (g1 * gamma[..., 0, :]).sum_to_size(s_shape) if ctx.needs_input_grad[0] else None
        d_trans = (g2 * counts).sum_to_size(t_shape) if ctx.needs_input_grad[1] else None
        d_emit = (g2 * gamma).sum_to_size(e_shape) if ctx.needs_input_grad[2] else None
        return d_start, d_trans, d_emit, None


def log_likelihood(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """``log p(x_0 .. x_{L-1})`` of each sequence, ``(*L,)``; differentiable (first order) in the
    three log-parameters, by Fisher's identity (one forward-backward pass)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (log_start, log_trans, log_emit)):
        return _LogLikelihood.apply(log_start, log_trans, log_emit, valid)
    start, trans, e, v, lead, _, _ = _member_last(log_start, log_trans, log_emit, valid)
    return _log_likelihood_ml(start, trans, e, v).reshape(lead)


def viterbi(log_start: Tensor, log_trans: Tensor, log_emit: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The most likely state path ``(*L, T)`` (int64, -1 at padding) and its log-probability ``(*L,)``."""
    start, trans, e, v, lead, n_steps, k = _member_last(log_start, log_trans, log_emit, valid)
    if _use_scan(e):  # long sequences on a GPU: no loop over time
        states, log_p = _viterbi_scan(start, trans, e, v)
        states = states.mT  # (S, T)
        if v is not None:
            states = torch.where(v.squeeze(1).mT, states, torch.full_like(states, -1))
        return states.reshape(tuple(lead) + (n_steps,)), log_p.reshape(lead)
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
