"""Refinement after the restarts: merge or delete one component, split another, refit, keep it if
the log-likelihood rises (issue 14, part 3).

EM from a handful of restarts often ends in a local optimum where two components share one cluster
while one component spans two clusters. More restarts find the better optimum only by chance;
moving one component does it directly (Ueda, Nakano, Ghahramani & Hinton 2000, "SMEM algorithm
for mixture models"). For every series of a fitted batch, :func:`candidate_moves` builds ``C``
candidate starts, each from the fitted responsibilities ``r (B, K, N)``:

1. *free* one component slot, either by **merging** a pair ``(i, j)`` whose responsibilities are
   most alike (Ueda's ``J_merge``: the cosine of ``r_i`` and ``r_j``, weighted by the sample
   weights; ``r_i + r_j`` goes to ``i``) or by **deleting** the component whose removal loses the
   least log-likelihood (its points go to the others, by their responsibilities without it);
2. **split** a component ``s`` into ``s`` and the freed slot: one of those with the worst local
   fit (Ueda's ``J_split``: the Kullback-Leibler divergence of the component's share of the
   empirical distribution from its Gaussian), or the merged pair itself (a re-split of ``r_i +
   r_j``), cut across the principal axis of its points' weighted scatter (each point's share
   goes to the side of the hyperplane through the mean it lies on);
3. the candidate's parameters are the library's M-step of those responsibilities
   (:func:`torchgmm.stats.params_from_responsibilities`, every covariance type).

:func:`refine` then runs every candidate of every series as one batched warm-started
:func:`torchgmm.fit` (batch ``(B, C)``; the same EM, rule and guards as any fit) and keeps, per
series, the best candidate when it is clean (status below ``DEGENERATE``: no component within
``DEGENERATE_FACTOR`` x ``reg_covar``, no failed M-step) and raises the lower bound by more than
``min_gain`` per point; a degenerate series is replaced by any clean candidate. Rounds repeat
on the series that improved. There is no loop over series or components: candidates are
tensors ``(B, C, ...)``.

Measured on ``benchmarks/quality.py`` (docs/quality.md).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .covariance import Covariance, get_covariance
from .density import GMMParams, joint_log_prob
from .result import FitResult, FitStatus
from .stats import params_from_responsibilities
from .units import Scaling, standardize

__all__ = ["refine", "candidate_moves", "move_scores"]


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``, accurate at both ends (``-inf`` at ``a = 0``)."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def move_scores(x: Tensor, w: Tensor, params: GMMParams, cov: Covariance) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fitted responsibilities and the three rankings of the moves.

    ``x (B, N, D)``, ``w (B, N)``, ``params (B, ...)``. Returns

    - ``joint (B, K, N)``: ``log w_k + log N(x_n | k)`` (:func:`torchgmm.density.joint_log_prob`);
    - ``merge (B, K, K)``: the weighted cosine of the responsibility vectors of ``i < j`` (higher:
      more alike), ``-inf`` elsewhere;
    - ``loss (B, K)``: the log-likelihood (sum over points) lost by deleting component ``k`` and
      renormalizing the weights (lower: weaker);
    - ``split (B, K)``: the local Kullback-Leibler divergence of component ``k`` (higher: worse fit).

    A component of weight 0 (masked) is never merged, deleted nor split.
    """
    joint = joint_log_prob(x, params, cov)  # (B, K, N)
    log_norm = torch.logsumexp(joint, -2, keepdim=True)  # (B, 1, N)
    log_resp = joint - log_norm  # (B, K, N)
    resp = log_resp.exp()
    k = joint.shape[-2]
    tiny = torch.finfo(x.dtype).tiny
    live = torch.isfinite(params.log_weights)  # (B, K)

    wr = resp * w.unsqueeze(-2)  # (B, K, N)
    gram = wr @ resp.mT  # (B, K, K): sum_n w_n r_ni r_nj
    norm = gram.diagonal(dim1=-2, dim2=-1).clamp_min(tiny).sqrt()  # (B, K)
    cosine = gram / (norm.unsqueeze(-1) * norm.unsqueeze(-2))
    upper = torch.ones(k, k, dtype=torch.bool, device=x.device).triu(1)
    pair_live = live.unsqueeze(-1) & live.unsqueeze(-2) & upper
    merge = torch.where(pair_live, cosine, -torch.inf)

    # deleting k: log p_{-k}(x) = log p(x) + log(1 - r_k(x)) - log(1 - pi_k)
    total = w.sum(-1, keepdim=True)  # (B, 1)
    log_rest = _log1mexp(params.log_weights.clamp_max(0.0))  # (B, K)
    loss = -(w.unsqueeze(-2) * _log1mexp(log_resp.clamp_max(0.0))).sum(-1) + total * log_rest
    loss = torch.where(live, loss, torch.inf)

    # local KL: f_n = w_n r_nk / n_k against N(x_n | k) = joint - log w_k
    nk = wr.sum(-1, keepdim=True).clamp_min(tiny)  # (B, K, 1)
    f = wr / nk
    log_comp = joint - params.log_weights.unsqueeze(-1)
    split = (torch.xlogy(f, f) - torch.where(f > 0, f * log_comp, 0.0)).sum(-1)
    split = torch.where(live & torch.isfinite(split), split, -torch.inf)
    return joint, merge, loss, split


def candidate_moves(x: Tensor, w: Tensor, params: GMMParams, covariance_type: Union[str, Covariance], reg: Tensor,
                    n_merge: int = 3, n_delete: int = 2, n_split: int = 3) -> tuple[GMMParams, Tensor]:
    """Candidate starts ``(params (B, C, ...), valid (B, C))`` for one refinement round.

    ``x (B, N, D)``, ``w (B, N)``, ``params (B, ...)`` (fitted), ``reg (B,)`` (``reg_covar`` in
    the units of ``x``). The ``F = n_merge' + n_delete'`` frees (the ``n_merge`` most alike pairs,
    the ``n_delete`` weakest components; fewer when ``K`` is small) are crossed with the
    ``n_split'`` worst-fitting components, and each merge also re-splits its own pair: ``F *
    n_split' + n_merge'`` pairs of a free and a split, less those that would split the slot they
    freed and the crossed merges that split their merged slot (the re-split already is one): the
    valid ones come first, and ``C`` is the largest number of valid candidates of a series; a
    series with fewer has invalid ones at the end (their start is the input's parameters;
    :func:`refine` never accepts them). Needs ``K >= 2``.
    """
    cov = get_covariance(covariance_type)
    b, n, d = x.shape
    k = params.means.shape[-2]
    joint, merge, loss, split = move_scores(x, w, params, cov)
    n_merge, n_delete, n_split = min(n_merge, k * (k - 1) // 2), min(n_delete, k), min(n_split, k)
    dev = x.device

    pair = merge.flatten(1).topk(n_merge, -1).indices  # (B, Mm)
    weak = loss.topk(n_delete, -1, largest=False).indices  # (B, Md)
    worst = split.topk(n_split, -1).indices  # (B, S)
    keep = torch.cat([pair // k, weak], -1)  # (B, F): the slot that keeps the mass (merge) / is emptied (delete)
    gone = torch.cat([pair % k, weak], -1)  # (B, F): the freed slot
    n_free = n_merge + n_delete
    is_merge = (torch.arange(n_free, device=dev) < n_merge).view(1, n_free, 1, 1)

    ks = torch.arange(k, device=dev).view(1, 1, k, 1)
    onehot_keep = keep.view(b, n_free, 1, 1) == ks  # (B, F, K, 1)
    onehot_gone = gone.view(b, n_free, 1, 1) == ks
    log_resp = joint - torch.logsumexp(joint, -2, keepdim=True)
    resp = log_resp.exp().unsqueeze(1)  # (B, 1, K, N)
    r_gone = (resp * onehot_gone).sum(-2, keepdim=True)  # (B, F, 1, N)
    merged = torch.where(onehot_gone, 0.0, resp + onehot_keep * r_gone)
    without = torch.softmax(torch.where(onehot_gone, -torch.inf, joint.unsqueeze(1)), -2)  # the others' shares
    freed = torch.where(is_merge, merged, without)  # (B, F, K, N)

    # candidates: every free x every worst-fitting component, then the re-split of each merged pair
    free_idx = torch.cat([torch.arange(n_free, device=dev).repeat_interleave(n_split), torch.arange(n_merge, device=dev)])
    target = torch.cat([worst.repeat(1, n_free), pair // k], -1)  # (B, C0)
    resplit = torch.arange(free_idx.numel(), device=dev) >= n_free * n_split
    merge_c = free_idx < n_merge
    free_c = free_idx.expand(b, -1)  # (B, C0)
    gone_c, keep_c = gone.gather(1, free_c), keep.gather(1, free_c)
    # invalid: splitting the freed slot; a crossed merge whose target is the merged slot (the re-split
    # of that pair is already a candidate). The valid ones first, cut to the most any series has.
    live = torch.isfinite(params.log_weights)  # (B, K): masked components (weight 0) never move
    valid = (target != gone_c) & (resplit | ~merge_c | (target != keep_c))
    valid &= live.gather(1, target) & live.gather(1, gone_c) & live.gather(1, keep_c)
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    c = max(int(valid.sum(-1).amax()), 1)
    order = order[:, :c]
    free_c, target, gone_c, valid = (t.gather(1, order) for t in (free_c, target, gone_c, valid))
    resp_c = freed[torch.arange(b, device=dev).unsqueeze(-1), free_c]  # (B, C, K, N)
    onehot_t = target.view(b, c, 1, 1) == ks  # (B, C, K, 1)
    onehot_g = gone_c.view(b, c, 1, 1) == ks
    r_t = (resp_c * onehot_t).sum(-2)  # (B, C, N)

    # the cut: across the principal axis of the target's weighted scatter, through its mean
    wt = r_t * w.unsqueeze(1)  # (B, C, N)
    nt = wt.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)  # (B, C, 1)
    xb = x.unsqueeze(1)  # (B, 1, N, D)
    centre = (wt.unsqueeze(-2) @ xb) / nt.unsqueeze(-1)  # (B, C, 1, D)
    diff = xb - centre  # (B, C, N, D)
    scatter = (diff * wt.unsqueeze(-1)).mT @ diff / nt.unsqueeze(-1)  # (B, C, D, D)
    if d == 1:
        axis = torch.ones(b, c, 1, dtype=x.dtype, device=x.device)
    else:
        axis = torch.linalg.eigh(scatter).eigenvectors[..., -1]  # (B, C, D): the largest eigenvalue's
    side = (diff @ axis.unsqueeze(-1)).squeeze(-1) > 0  # (B, C, N)
    hi, lo = (r_t * side).unsqueeze(-2), (r_t * ~side).unsqueeze(-2)
    resp_c = torch.where(onehot_t, lo, torch.where(onehot_g, hi, resp_c))

    start, ok = params_from_responsibilities(xb, w.unsqueeze(1), resp_c, cov, reg.unsqueeze(-1))  # (B, C, ...)
    # masked components stay masked (weight exactly 0), the others renormalized
    masked = ~live.unsqueeze(1)  # (B, 1, K)
    log_weights = torch.where(masked, -torch.inf, start.log_weights)
    start = start._replace(log_weights=log_weights - torch.logsumexp(log_weights, -1, keepdim=True))
    finite = (torch.isfinite(start.log_weights) | masked).all(-1)
    finite &= torch.isfinite(start.means).flatten(2).all(-1) & torch.isfinite(start.prec_chol).flatten(2).all(-1)
    valid = valid & ok & finite
    same = params.map(lambda t: t.unsqueeze(1))
    start = GMMParams(*(torch.where(valid.view(b, c, *[1] * (s.dim() - 2)), s, o.expand_as(s)) for s, o in zip(start, same)))
    return start, valid


def _rows(t: Tensor, index: Tensor) -> Tensor:
    return t.index_select(0, index)


def _widen(t: Tensor, width: int) -> Tensor:
    """A history ``(B, T)`` NaN-padded (or cut) to ``width`` columns."""
    if t.shape[-1] >= width:
        return t[..., :width]
    return torch.cat([t, t.new_full((*t.shape[:-1], width - t.shape[-1]), torch.nan)], -1)


def refine(
    X,
    result: Union[FitResult, GMMParams],
    *,
    covariance_type: Optional[str] = None,
    n_rounds: int = 4,
    n_merge: int = 3,
    n_delete: int = 2,
    n_split: int = 3,
    min_gain: Optional[float] = None,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    sample_weight=None,
    nan_policy: str = "raise",
    moves: Callable[..., tuple[GMMParams, Tensor]] = candidate_moves,
    **fit_kwargs,
) -> FitResult:
    """Refine fitted mixtures of ``X (*B, N, D)`` by merge/delete-and-split moves (module doc).

    ``result``: the :class:`~torchgmm.FitResult` of ``torchgmm.fit(X, ...)`` (or parameters
    ``GMMParams (*B, ...)`` in data units, then ``covariance_type`` is required: they are scored by
    a ``max_iter=0`` fit first). ``tol``, ``reg_covar``, ``max_iter``, ``sample_weight``,
    ``nan_policy`` and ``fit_kwargs`` (``prior``, ``method``, ``dtype``, ...) are passed to the
    refits and should be those of the original fit. Each round builds ``C = (n_merge' +
    n_delete') * n_split' + n_merge'`` candidates per series (:func:`candidate_moves`, or
    ``moves`` with its signature) and refits them all in one batched :func:`torchgmm.fit`; a
    series takes its best clean candidate when it beats its lower bound by more than
    ``min_gain`` per point (default ``tol``); a degenerate series takes any clean candidate.
    Rounds go on while some series improves, at most ``n_rounds``.

    Returns a :class:`~torchgmm.FitResult` equal to ``result`` where nothing was accepted; for a
    refined series ``params``, ``lower_bound``, ``lower_bounds``, ``passes``, ``n_iter``,
    ``converged``, ``status`` and ``degenerate_components`` are those of the accepted refit (its
    history, not the restarts'), while ``restart_lower_bounds`` / ``best_restart`` still describe
    the original restarts. Never lowers a clean series' lower bound.
    """
    from .fitting import fit, prepare

    if isinstance(result, GMMParams):
        if covariance_type is None:
            raise ValueError("refine(X, params) needs covariance_type")
        k = result.means.shape[-2]
        result = fit(X, k, covariance_type=covariance_type, warm_start=result, max_iter=0, reg_covar=reg_covar,
                     sample_weight=sample_weight, nan_policy=nan_policy, warn=False, **fit_kwargs)
    cov = get_covariance(result.covariance_type)
    k = result.params.means.shape[-2]
    min_gain = tol if min_gain is None else min_gain
    data = prepare(X, sample_weight, k, nan_policy, fit_kwargs.get("dtype"), fit_kwargs.get("device"))
    x, w, batch_shape = data.x, data.w, data.batch_shape
    n_series = x.shape[0]
    flat = {name: getattr(result, name).reshape(n_series, *getattr(result, name).shape[len(batch_shape):])
            for name in ("lower_bound", "lower_bounds", "passes", "n_iter", "converged", "status",
                         "degenerate_components")}
    params = result.params.map(lambda t: t.reshape(n_series, *t.shape[len(batch_shape):]).to(x))
    if k < 2 or n_rounds < 1:
        return result
    width = flat["lower_bounds"].shape[-1]
    clean = flat["status"] < FitStatus.DEGENERATE
    eligible = (flat["status"] <= FitStatus.DIVERGED) & ~data.empty & ~data.insufficient
    active = torch.nonzero(eligible).flatten()
    for _ in range(n_rounds):
        if active.numel() == 0:
            break
        xa, wa = _rows(x, active), _rows(w, active)
        xs, shift, scale, reg = standardize(xa, wa, reg_covar)
        scaling = Scaling(shift, scale)
        start_s, valid = moves(xs, wa, scaling.to_standard(params.map(lambda t: _rows(t, active)), cov), cov, reg,
                               n_merge=n_merge, n_delete=n_delete, n_split=n_split)
        a, c = start_s.means.shape[:2]
        wide = Scaling(shift.repeat_interleave(c, 0), scale.repeat_interleave(c))
        start = wide.to_data(start_s.map(lambda t: t.flatten(0, 1)), cov).map(lambda t: t.unflatten(0, (a, c)))
        refit = fit(xa.unsqueeze(1).expand(a, c, *xa.shape[1:]), k, covariance_type=cov.name, warm_start=start,
                    tol=tol, reg_covar=reg_covar, max_iter=max_iter, sample_weight=wa.unsqueeze(1).expand(a, c, -1),
                    warn=False, **fit_kwargs)
        good = valid & (refit.status < FitStatus.DEGENERATE) & torch.isfinite(refit.lower_bound)
        score = torch.where(good, refit.lower_bound, -torch.inf)  # (A, C)
        # among the candidates within min_gain of the best (one optimum, reached by several moves),
        # the first: the choice does not hang on the last digits of the refits
        top = score.amax(-1, keepdim=True)
        choice = (score >= top - min_gain).to(torch.int8).argmax(-1)
        best = score.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        base = torch.where(_rows(clean, active), _rows(flat["lower_bound"], active), -torch.inf)
        accept = torch.isfinite(best) & (best > base + min_gain)
        if not bool(accept.any()):
            break
        rows, pick = active[accept], choice[accept]
        src = torch.nonzero(accept).flatten()

        def chosen(t):
            return t[src, pick]

        new_params = refit.params.map(chosen)
        params = GMMParams(*(p.index_put((rows,), q.to(p)) for p, q in zip(params, new_params)))
        for name in ("lower_bound", "n_iter", "converged", "status", "degenerate_components"):
            flat[name] = flat[name].index_put((rows,), chosen(getattr(refit, name)).to(flat[name].dtype))
        for name in ("lower_bounds", "passes"):
            flat[name] = flat[name].index_put((rows,), _widen(chosen(getattr(refit, name)), width).to(flat[name].dtype))
        clean = clean.index_put((rows,), torch.ones_like(rows, dtype=torch.bool))
        active = rows

    def unflatten(t):
        return t.reshape(tuple(batch_shape) + tuple(t.shape[1:]))

    out = {name: unflatten(t) for name, t in flat.items()}
    return FitResult(
        params=params.map(lambda t: unflatten(t).to(result.params.means.dtype)), covariance_type=result.covariance_type,
        n_samples=result.n_samples, restart_lower_bounds=result.restart_lower_bounds,
        restart_degenerate=result.restart_degenerate, best_restart=result.best_restart, elapsed=result.elapsed,
        interrupted=result.interrupted, method=result.method, n_components=result.n_components,
        criterion=result.criterion, **out,
    )
