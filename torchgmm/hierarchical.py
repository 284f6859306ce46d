"""Model-based agglomerative clustering (Banfield & Raftery 1993; Fraley 1998), batched over series:
the start ``init_params="hierarchical"``, as R's mclust starts EM.

Every point starts as its own cluster; each step merges the pair of clusters whose merge least
decreases the classification likelihood of the unconstrained Gaussian model (mclust's ``VVV``),
until ``K`` clusters remain. With cluster ``C`` of (weighted) size ``n_C`` and scatter ``W_C`` about
its mean, the criterion to minimize is

    sum_C  n_C log det((W_C + alpha I) / n_C)

(-2 times the classification log-likelihood at its maximum, up to a constant). ``alpha I``
regularizes clusters with fewer points than dimensions, whose scatter is singular (mclust adds a
trace-based term for the same purpose). The data are whitened per series first (mclust's
default ``hcUse="SVD"`` transforms them likewise), so ``alpha = 1`` is the data's own variance, the
criterion is affine-invariant up to the regularization, and a singleton looks like a cluster as
wide as the data. The cost of merging ``a`` and ``b`` is

    T(a + b) - T(a) - T(b),   T(C) = n_C log det((W_C + alpha I) / n_C),
    W_(a+b) = W_a + W_b + n_a n_b / (n_a + n_b) (m_a - m_b)(m_a - m_b)^T.

Cost: ``O(M^2)`` memory and ``O(M^2 + M D^3)`` work per merge for ``M`` points per series, ``M - K``
merges. Series with more than ``max_points`` positive-weight points (default
:data:`HC_MAX_POINTS` = 2,000, mclust's ``subset`` default) are clustered on a random subsample of
that many points (drawn from the generator, shared by every series and prefix-stable in ``N``, so a
series gets the same subsample alone, in a batch, or padded); the start's parameters are those of
the subsample's partition, and EM takes it from there on all the points. Series are processed in
blocks of at most :data:`HC_BLOCK_ENTRIES` pair costs.

Pure tensor functions; no validation here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["HC_MAX_POINTS", "Hierarchy", "agglomerate", "subsample"]

#: Largest number of points per series clustered hierarchically; larger series are subsampled.
HC_MAX_POINTS = 2000
#: Pair costs held at once (series per block x M^2): about 128 MB of float64.
HC_BLOCK_ENTRIES = 1 << 24


class Hierarchy(NamedTuple):
    """``labels (B, N)``: the cluster (0..K-1, in order of first point) of every point (-1 for a
    zero-weight point); ``merges (B, S, 2)``: the pair merged at each step, as point indices (the
    smallest index of each cluster names it; the second one disappears), -1 once a series has
    reached K; ``costs (B, S)``: the increase of the criterion at each merge (NaN after the end)."""

    labels: Tensor
    merges: Tensor
    costs: Tensor


def _whiten(x: Tensor, w: Tensor) -> Tensor:
    """``x (B, N, D)`` centred and whitened by the weighted covariance of each series (a tiny
    ridge keeps a singular covariance, e.g. a constant feature, invertible)."""
    total = w.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    mean = (w.unsqueeze(-1) * x).sum(-2, keepdim=True) / total.unsqueeze(-1)
    xc = x - mean
    cov = (w.unsqueeze(-1) * xc).mT @ xc / total.unsqueeze(-1)
    d = x.shape[-1]
    ridge = 1e-10 * cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(x.dtype).tiny)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    chol, _ = torch.linalg.cholesky_ex(cov + ridge[..., None, None] * eye)
    return torch.linalg.solve_triangular(chol, xc.mT, upper=False).mT


def _term(n: Tensor, logdet_reg: Tensor, d: int) -> Tensor:
    """``n log det((W + alpha I) / n)`` from ``log det(W + alpha I)``."""
    return n * (logdet_reg - d * torch.log(n))


def _logdet_reg(scatter: Tensor, alpha: float) -> Tensor:
    """``log det(W + alpha I)`` of ``(..., D, D)`` scatters."""
    d = scatter.shape[-1]
    if d == 1:
        return torch.log(scatter[..., 0, 0] + alpha)
    eye = torch.eye(d, dtype=scatter.dtype, device=scatter.device)
    chol, _ = torch.linalg.cholesky_ex(scatter + alpha * eye)
    return 2 * torch.log(chol.diagonal(dim1=-2, dim2=-1)).sum(-1)


def _agglomerate_block(x: Tensor, w: Tensor, n_clusters: int, alpha: float) -> Hierarchy:
    b, m, d = x.shape
    dev, dt = x.device, x.dtype
    inf = torch.tensor(torch.inf, dtype=dt, device=dev)
    active = w > 0  # (B, M)
    n = torch.where(active, w, torch.ones((), dtype=dt, device=dev))
    mean = x.clone()
    scatter = torch.zeros(b, m, d, d, dtype=dt, device=dev)
    term = _term(n, torch.full_like(n, d * math.log(alpha)), d)
    rows = torch.arange(b, device=dev)
    idx = torch.arange(m, device=dev)

    # Every pair of singletons: W = c dd^T (rank one), det(c dd^T + alpha I) = alpha^(D-1) (alpha + c |d|^2).
    nn = n.unsqueeze(-1) + n.unsqueeze(-2)
    c = n.unsqueeze(-1) * n.unsqueeze(-2) / nn
    d2 = (x.unsqueeze(-2) - x.unsqueeze(-3)).square().sum(-1) if d <= 2 else (
        x.square().sum(-1).unsqueeze(-1) + x.square().sum(-1).unsqueeze(-2) - 2 * x @ x.mT).clamp_min(0)
    pair_logdet = (d - 1) * math.log(alpha) + torch.log(alpha + c * d2)
    cost = _term(nn, pair_logdet, d) - term.unsqueeze(-1) - term.unsqueeze(-2)
    valid = active.unsqueeze(-1) & active.unsqueeze(-2) & ~torch.eye(m, dtype=torch.bool, device=dev)
    cost = torch.where(valid, cost, inf)
    owner = idx.expand(b, m).clone()

    # Each row's smallest cost and where: the global argmin is then O(M) per merge; a row needs a
    # full rescan only when its best partner was one of the merged pair.
    row_min, row_arg = cost.min(-1)
    n_steps = max(int(active.sum(-1).max()) - n_clusters, 0)
    merges = torch.full((b, n_steps, 2), -1, dtype=torch.long, device=dev)
    costs = torch.full((b, n_steps), torch.nan, dtype=dt, device=dev)
    for step in range(n_steps):
        go = active.sum(-1) > n_clusters  # (B,); a finished series' updates below are harmless
        p = row_min.argmin(-1)
        q = row_arg[rows, p]
        i, j = torch.minimum(p, q), torch.maximum(p, q)
        merges[:, step] = torch.where(go.unsqueeze(-1), torch.stack([i, j], -1), -1)
        costs[:, step] = torch.where(go, row_min[rows, p], torch.nan)
        # The merged cluster's statistics, written at i; j disappears.
        ni, nj = n[rows, i], n[rows, j]
        nij = ni + nj
        delta = mean[rows, i] - mean[rows, j]
        sc = scatter[rows, i] + scatter[rows, j] + (ni * nj / nij)[:, None, None] * delta.unsqueeze(-1) * delta.unsqueeze(-2)
        mu = (ni.unsqueeze(-1) * mean[rows, i] + nj.unsqueeze(-1) * mean[rows, j]) / nij.unsqueeze(-1)
        t_new = _term(nij, _logdet_reg(sc, alpha), d)
        n[rows, i], mean[rows, i], scatter[rows, i], term[rows, i] = nij, mu, sc, t_new
        active[rows, j] = active[rows, j] & ~go
        owner = torch.where(go.unsqueeze(-1) & (owner == j.unsqueeze(-1)), i.unsqueeze(-1), owner)
        # The merged cluster against every other cluster: its row and column of the cost matrix.
        tot = n + nij.unsqueeze(-1)  # (B, M)
        dl = mean - mu.unsqueeze(-2)  # (B, M, D)
        w_pair = scatter + sc.unsqueeze(-3) + (n * nij.unsqueeze(-1) / tot)[..., None, None] * dl.unsqueeze(-1) * dl.unsqueeze(-2)
        new_cost = _term(tot, _logdet_reg(w_pair, alpha), d) - term - t_new.unsqueeze(-1)
        new_cost = torch.where(active & (idx != i.unsqueeze(-1)) & active[rows, i].unsqueeze(-1), new_cost, inf)
        cost[rows, i] = new_cost
        cost[rows, :, i] = new_cost
        cost[rows, j] = inf
        cost[rows, :, j] = inf
        # Row minima: the merged row afresh; rows that pointed at i or j rescanned; others may now prefer i.
        stale = (row_arg == i.unsqueeze(-1)) | (row_arg == j.unsqueeze(-1))
        better = new_cost < row_min
        row_min = torch.where(better, new_cost, row_min)
        row_arg = torch.where(better, i.unsqueeze(-1), row_arg)
        stale[rows, i] = True
        stale[rows, j] = True
        sr, sl = stale.nonzero(as_tuple=True)
        if sr.numel():
            m_val, m_arg = cost[sr, sl].min(-1)
            row_min[sr, sl], row_arg[sr, sl] = m_val, m_arg
    # Labels 0..K-1 in order of each cluster's first point (its name).
    rank = torch.cumsum(active.long(), -1) - 1
    labels = torch.gather(rank, 1, owner)
    labels = torch.where(w > 0, labels, -1)
    return Hierarchy(labels, merges, costs)


def agglomerate(x: Tensor, w: Tensor, n_clusters: int, alpha: float = 1.0, whiten: bool = True) -> Hierarchy:
    """Model-based agglomerative clustering of every series of ``x (B, M, D)`` (weights ``w (B, M)``,
    zero = absent) down to ``n_clusters``: a :class:`Hierarchy`. ``whiten=False`` clusters the
    coordinates as given (the tests' hand-computed merges)."""
    xs = _whiten(x, w) if whiten else x
    m = x.shape[-2]
    per_block = max(1, HC_BLOCK_ENTRIES // max(m * m, 1))
    parts = [_agglomerate_block(xs[s:s + per_block], w[s:s + per_block], n_clusters, alpha)
             for s in range(0, x.shape[0], per_block)]
    if len(parts) == 1:
        return parts[0]
    steps = max(p.merges.shape[1] for p in parts)

    def pad(t, fill):
        extra = steps - t.shape[1]
        return t if extra == 0 else torch.cat([t, t.new_full((t.shape[0], extra, *t.shape[2:]), fill)], 1)

    return Hierarchy(torch.cat([p.labels for p in parts]), torch.cat([pad(p.merges, -1) for p in parts]),
                     torch.cat([pad(p.costs, torch.nan) for p in parts]))


def subsample(x: Tensor, w: Tensor, max_points: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """At most ``max_points`` positive-weight points of every series of ``x (B, N, D)``: those with
    the smallest uniform keys (one key per point index, shared by all series, prefix-stable in N),
    kept in their original order. Returns ``(x (B, M, D), w (B, M))``, M = min(N, max_points),
    zero weight where a series has fewer points."""
    n = x.shape[-2]
    if n <= max_points:
        return x, w
    keys = torch.rand((n,), generator=gen, device=gen.device, dtype=torch.float64).to(x.device)
    keys = torch.where(w > 0, keys, torch.inf)  # (B, N)
    chosen = keys.topk(max_points, -1, largest=False).indices.sort(-1).values  # (B, M)
    return torch.gather(x, 1, chosen.unsqueeze(-1).expand(-1, -1, x.shape[-1])), torch.gather(w, 1, chosen)
