"""Batched initialization: k-means (Lloyd, k-means++ seeded; its later restarts cycle over
diverse recipes), k-means++ seeds, random responsibilities, random distinct data points, the
hierarchical start (:mod:`torchgmm.hierarchical`), or a list of methods cycled over the restarts.

All functions take standardized data ``x (B, N, D)`` with weights ``w (B, N)`` and return
parameters for ``R`` restarts, ``(B, R, ...)``.

Random draws come from an explicit ``torch.Generator`` and have shape ``(R, ...)``, shared by every
series of the batch: a series gets the same initialization whether it is fitted alone or inside a
batch, and whatever its padding. Draws are made on the generator's device and then moved.

Pure tensor functions; no validation here.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._compile import compiled
from ._ops import matmul, product
from .covariance import Covariance, get_covariance
from .density import GMMParams
from .stats import (chunked_sum, m_step, moment_statistics, params_from_responsibilities, partition_statistics,
                    point_chunks, sum_sq_about)

__all__ = ["INIT_METHODS", "initialize", "kmeans", "make_generator"]

INIT_METHODS = ("kmeans", "k-means++", "random", "random_from_data", "hierarchical")

# Lloyd iterations of the k-means initialization (stops earlier once no label changes).
KMEANS_MAX_ITER = 5

#: Bytes of sorted series (values and three float64 prefix sums) per initialization block of
#: univariate data, whose k-means family runs on :class:`SortedLine` without (restarts x points)
#: temporaries: large blocks, few operations.
LINE_BLOCK_BYTES = 1 << 28


#: Points x restarts of a univariate series from which its k-means family runs on
#: :class:`SortedLine`: below, a pass over the points takes fewer operations (a 50-point fit: 1,766
#: operations with the line, 1,078 without). The same starts in distribution either way.
LINE_MIN_POINTS = 1024


def on_sorted_line(n_points: int, n_features: int, n_init: int) -> bool:
    """Whether the k-means family of a series runs on :class:`SortedLine`: univariate, with at
    least ``LINE_MIN_POINTS`` points x restarts (decided per series: a series starts the same
    alone or in a batch)."""
    return n_features == 1 and n_points * n_init >= LINE_MIN_POINTS


def block_series(default: int, n_series: int, n_points: int, n_features: int, n_init: int, init_params) -> int:
    """Series per initialization block: ``default`` (the plan's, bounding (restarts x points)
    temporaries), or for data started by the k-means family on the sorted line
    (:func:`on_sorted_line`) as many as ``LINE_BLOCK_BYTES`` allows."""
    names = list(init_params) if isinstance(init_params, (list, tuple)) else [init_params]
    if on_sorted_line(n_points, n_features, n_init) and all(
            name in ("kmeans", "k-means++", "random_from_data") for name in names):
        return max(default, min(n_series, LINE_BLOCK_BYTES // (32 * (n_points + 1))))
    return default


def make_generator(random_state, device=None) -> torch.Generator:
    """A ``torch.Generator`` from ``None`` (fresh entropy), an int seed, or a Generator (used as is)."""
    if isinstance(random_state, torch.Generator):
        return random_state
    gen = torch.Generator(device="cpu")
    if random_state is None:
        gen.seed()
    else:
        gen.manual_seed(int(random_state))
    return gen


def _uniform(shape, gen: torch.Generator, like: Tensor) -> Tensor:
    return torch.rand(shape, generator=gen, device=gen.device, dtype=torch.float64).to(
        device=like.device, dtype=like.dtype
    )


def _draw_index(prob: Tensor, u: Tensor) -> Tensor:
    """Indices drawn from unnormalized ``prob (..., N)`` by inverse CDF at ``u`` (broadcasts
    against ``prob[..., :1]``). Written as a count, not a search, so that it fuses."""
    cum = prob.cumsum(-1)
    idx = (cum <= u * cum[..., -1:]).sum(-1)  # first index whose cumulative mass exceeds the target
    return idx.clamp_max(prob.shape[-1] - 1)


def _gather_points(x: Tensor, idx: Tensor) -> Tensor:
    """``x (B, N, D)`` at ``idx (B, ...)`` -> ``(B, ..., D)``."""
    batch = torch.arange(x.shape[0], device=x.device).reshape((-1,) + (1,) * (idx.dim() - 1))
    return x[batch, idx]


def _squared_distances(x: Tensor, c: Tensor) -> Tensor:
    """``|x_n - c_l|^2`` for ``x (B, N, D)`` and ``c (B, R, L, D)``: ``(B, R, L, N)``.

    Few features: the direct difference (exact; fuses when compiled). Many features: the BLAS
    expansion ``|x|^2 - 2 x.c + |c|^2``, with values at rounding level set to exactly 0 so that
    a repeated point still counts as "not new".
    """
    xb = x.unsqueeze(1).unsqueeze(1)  # (B, 1, 1, N, D)
    if x.shape[-1] <= 2:
        return (xb - c.unsqueeze(-2)).square().sum(-1)
    b, r, ell, d = c.shape
    x_sq = xb.square().sum(-1)  # (B, 1, 1, N)
    c_sq = c.square().sum(-1, keepdim=True)  # (B, R, L, 1)
    # |c|^2 - 2 c.x: one product per series for all restarts' candidates
    d2 = torch.baddbmm(c_sq.view(b, r * ell, 1), c.reshape(b, r * ell, d), x.mT, alpha=-2).view(b, r, ell, -1).add_(x_sq)
    return d2.masked_fill_(d2 <= (x_sq + c_sq).mul_(100 * torch.finfo(x.dtype).eps), 0.0)


def greedy_trials(n_components: int) -> int:
    """Candidates per greedy k-means++ draw: ``2 + log K``, as scikit-learn."""
    return 2 + int(math.log(n_components))


def _seed_step(x: Tensor, base: Tensor, d2: Optional[Tensor], u: Tensor, d2_weighting: bool):
    """Draw the next seed for every restart: ``(seed (B, R, D), d2 (B, R, N), has_new (B, R))``.

    ``base (B, R, N)`` point weights, ``d2 (B, R, N)`` squared distance to the nearest seed so far
    (None before the first seed: every point new, at infinite distance; ``has_new`` is then None),
    ``u (R, L)`` uniforms for ``L`` candidates; the candidate that lowers the potential
    ``sum_n base_n d2_n`` most is kept (greedy k-means++).
    """
    if d2 is None:
        prob, has_new = base, None
    else:
        prob = base * (d2 if d2_weighting else (d2 > 0).to(base.dtype))
        has_new = prob.sum(-1) > 0
        prob = torch.where(has_new.unsqueeze(-1), prob, base)
    idx = _draw_index(prob.unsqueeze(-2), u.unsqueeze(-1))  # (B, R, L)
    cand = _gather_points(x, idx)  # (B, R, L, D)
    cand_d2 = _squared_distances(x, cand)  # (B, R, L, N)
    if d2 is not None:
        cand_d2 = torch.minimum(d2.unsqueeze(-2), cand_d2)
    if cand.shape[2] == 1:  # one candidate: it is the seed
        return cand.squeeze(2), cand_d2.squeeze(2), has_new
    best = (cand_d2 * base.unsqueeze(-2)).sum(-1).argmin(-1, keepdim=True).unsqueeze(-1)  # (B, R, 1, 1)
    seed = torch.gather(cand, 2, best.expand(-1, -1, 1, cand.shape[-1])).squeeze(2)
    d2 = torch.gather(cand_d2, 2, best.expand(-1, -1, 1, cand_d2.shape[-1])).squeeze(2)
    return seed, d2, has_new


def _seed_points(x: Tensor, w: Tensor, n_components: int, n_init: int, gen, *, d2_weighting: bool, compile: bool = False,
                 u: Optional[Tensor] = None, line: Optional["SortedLine"] = None):
    """K seed points per restart, ``(B, R, K, D)``; and ``distinct_ok (B, R)``.

    The first seed is drawn with probability ``w_n``. Each further seed is drawn with probability
    ``w_n * d2_n`` (greedy k-means++ as in scikit-learn: ``2 + log K`` candidates, keep the one
    that lowers the potential most) or ``w_n * [d2_n > 0]`` (uniform among points not equal to a
    seed), where ``d2_n`` is the squared distance to the nearest seed so far. Where every point
    coincides with a seed (fewer distinct points than K) the draw falls back to ``w_n`` and
    ``distinct_ok`` is False. ``u (K, R, L)``: the uniforms to use (drawn from ``gen`` when None).
    ``line``: ``x`` sorted (univariate data): the draws by binary search of prefix sums
    (:meth:`SortedLine.seeds`).
    """
    n_trials = greedy_trials(n_components) if d2_weighting else 1
    if u is None:
        u = _uniform((n_components, n_init, n_trials), gen, x)  # (K, R, L)
    if line is not None:
        seeds, distinct_ok = line.seeds(n_components, u, d2_weighting)
        return seeds.to(x.dtype), distinct_ok
    base = w.unsqueeze(1).expand(-1, n_init, -1)  # (B, R, N)
    step = compiled(_seed_step) if compile else _seed_step
    # The first seed: drawn by weight alone (every point "new", at infinite distance), one candidate.
    seed, d2, _ = step(x, base, None, u[0, :, :1], False)
    seeds = [seed]
    distinct_ok = torch.ones(base.shape[:2], dtype=torch.bool, device=x.device)
    for k in range(1, n_components):  # sequential by nature; vectorized over series and restarts
        seed, d2, has_new = step(x, base, d2, u[k], d2_weighting)
        seeds.append(seed)
        distinct_ok &= has_new
    return torch.stack(seeds, dim=-2), distinct_ok


def _one_hot(labels: Tensor, n_components: int, dtype) -> Tensor:
    """Hard responsibilities ``(..., K, N)`` from ``labels (..., N)``."""
    ks = torch.arange(n_components, device=labels.device).unsqueeze(-1)  # (K, 1)
    return (labels.unsqueeze(-2) == ks).to(dtype)


def _univariate_features(x: Tensor, w: Tensor, n_components: int) -> tuple[Tensor, ...]:
    """What :func:`_kmeans_assign_univariate` needs of the points ``x (B, 1, N, 1)``, ``w (B, 1, N)``
    whatever the centers (computed once per k-means run): the points as a column ``(B, N, 1, 1)``,
    the features ``[1, x]`` transposed ``(B, 2, N)``, the weights ``(B, N, 1, 1)`` and the component
    ids ``(K, 1)``."""
    x0 = x[:, 0]  # (B, N, 1)
    return (x0.unsqueeze(-1), torch.cat([torch.ones_like(x0), x0], -1).mT, w[:, 0, :, None, None],
            torch.arange(n_components, device=x.device).unsqueeze(-1))


def _kmeans_assign_univariate(x: Tensor, w: Tensor, centers: Tensor, features: Optional[tuple] = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`kmeans_assign` for ``D = 1`` (eager) in a few large kernels: the distances of all
    restarts at once, ``c^2 - 2 c x`` with columns ``(R, K)``, the nearest center their ``argmin``
    over K (ties: the first), and the cells' counts and sums one product of ``[1, x]`` with the
    weighted one-hot labels. ``features``: :func:`_univariate_features` of the points."""
    b, r, k = centers.shape[0], centers.shape[1], centers.shape[2]
    n = x.shape[-2]
    x_col, feats_t, w_cells, ks = _univariate_features(x, w, k) if features is None else features
    c = centers.view(b, 1, r, k)  # (B, 1, R, K)
    d2 = c.square() + x_col * (-2 * c)  # (B, N, R, K); |x|^2 omitted
    labels = d2.argmin(-1)  # (B, N, R)
    onehot = torch.where(labels.unsqueeze(-2) == ks, w_cells, 0.0)  # (B, N, K, R): weighted
    moments = product(feats_t, onehot.view(b, n, k * r)).view(b, 2, k, r).permute(0, 3, 2, 1)  # (B, R, K, 2)
    return labels.transpose(1, 2), moments[..., 1:], moments[..., :1]


def _shared_features(x: Tensor, w: Tensor, n_components: int) -> tuple[Tensor, ...]:
    """What :func:`_kmeans_assign_shared` needs of the points ``x (B, 1, N, D)``, ``w (B, 1, N)``
    whatever the centers: the points transposed ``(B, D, N)`` (contiguous), the weights ``(B, 1, 1,
    N)`` and the component ranks from the last, ``K - k`` as bytes ``(K, 1)``."""
    return (x[:, 0].mT.contiguous(), w[:, :, None],
            (n_components - torch.arange(n_components, device=x.device)).to(torch.uint8).unsqueeze(-1))


def _kmeans_assign_shared(x: Tensor, w: Tensor, centers: Tensor, features: tuple) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`kmeans_assign` for ``D >= 2`` (eager, ``K < 256``) with the restarts sharing the
    points: the distances of all restarts one product per series ``(B, R K, N)``, the nearest
    center by reductions over K (not the innermost axis: torch's ``argmin`` there, or over a
    K-sized last axis, is 10-300x slower), ties to the first center (ranks ``K - k`` as bytes: the
    largest rank among the nearest), the cells' sums one product of the weighted one-hot rows
    with the points. ``features``: :func:`_shared_features` of the points."""
    b, r, k, d = centers.shape
    x_t, w_cells, rank = _shared_features(x, w, k) if features is None else features
    n = x_t.shape[-1]
    c = centers.reshape(b, r * k, d)
    d2 = torch.baddbmm(c.square().sum(-1, keepdim=True), c, x_t, alpha=-2).view(b, r, k, n)  # |x|^2 omitted
    nearest = (d2 == d2.amin(-2, keepdim=True)).to(torch.uint8).mul_(rank)  # (B, R, K, N): rank where nearest
    top = nearest.amax(-2, keepdim=True)  # (B, R, 1, N): the first nearest center's rank
    onehot = (nearest == top).to(x.dtype).mul_(w_cells)  # (B, R, K, N), weighted
    sums = torch.bmm(onehot.view(b, r * k, n), x_t.mT).view(b, r, k, d)  # (x_t.mT: 2x faster than (B, N, D) rows)
    return (k - top.squeeze(-2)).long(), sums, onehot.sum(-1, keepdim=True)


def kmeans_assign(x: Tensor, w: Tensor, centers: Tensor, features: Optional[tuple] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Nearest-center labels ``(B, R, N)`` of ``x (B, 1, N, D)`` (weights ``w (B, 1, N)``) and the
    weighted sums ``(B, R, K, D)`` and counts ``(B, R, K, 1)`` of each cell: additive over chunks
    of points. ``features``: :func:`_point_parts`' features of the points (eager), or None."""
    if x.dim() == 4 and x.shape[-3] == 1 and not torch.compiler.is_compiling():
        if x.shape[-1] == 1:
            return _kmeans_assign_univariate(x, w, centers, features)
        if centers.shape[-2] < 256:
            return _kmeans_assign_shared(x, w, centers, features)
    # Squared distances with K last: argmin over the contiguous axis is fast.
    d2 = matmul(x, centers.mT) * -2 + centers.square().sum(-1).unsqueeze(-2)  # (B, R, N, K); |x|^2 omitted
    labels = d2.argmin(-1)  # (B, R, N)
    wr = _one_hot(labels, centers.shape[-2], x.dtype) * w.unsqueeze(-2)  # (B, R, K, N)
    return labels, matmul(wr, x), wr.sum(-1, keepdim=True)


def _point_parts(x: Tensor, w: Tensor, n_components: int, chunk_size: Optional[int], compile: bool = False) -> list:
    """The chunks of points of a Lloyd pass, ``(x (B, 1, n, D), w (B, 1, n), features)`` each (one
    chunk: the data itself), with :func:`kmeans_assign`'s features of the points when eager
    (:func:`_univariate_features`, :func:`_shared_features`)."""
    slices = point_chunks(x.shape[-2], chunk_size)
    pairs = [(x, w)] if len(slices) == 1 else [(x[..., part, :], w[..., part]) for part in slices]
    if compile or n_components >= 256:
        return [(xc, wc, None) for xc, wc in pairs]
    features = _univariate_features if x.shape[-1] == 1 else _shared_features
    return [(xc, wc, features(xc, wc, n_components)) for xc, wc in pairs]


def kmeans_step(x: Tensor, w: Tensor, centers: Tensor, chunk_size: Optional[int] = None, assign=kmeans_assign,
                parts: Optional[list] = None) -> tuple[Tensor, Tensor]:
    """One weighted Lloyd step: ``(labels (B, R, N), new centers (B, R, K, D))``, over chunks of
    ``chunk_size`` points (``assign`` is :func:`kmeans_assign` or its compiled twin; ``parts``:
    the chunks as :func:`_point_parts` gives them, when already made).

    ``x (B, 1, N, D)``, ``w (B, 1, N)``. A cluster that loses all its points keeps its center.
    """
    if parts is None:
        parts = _point_parts(x, w, centers.shape[-2], chunk_size, compile=assign is not kmeans_assign)
    results = [assign(xc, wc, centers) if features is None else assign(xc, wc, centers, features)
               for xc, wc, features in parts]
    labels = torch.cat([p[0] for p in results], -1) if len(results) > 1 else results[0][0]
    sums = functools.reduce(operator.add, (p[1] for p in results))
    nk = functools.reduce(operator.add, (p[2] for p in results))
    means = sums / nk.clamp_min(torch.finfo(x.dtype).tiny)
    return labels, torch.where(nk > 0, means, centers)


def _sort_series(x: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.sort(x, dim=-1, stable=True)`` of ``x (B, N)``. float32 rows on the CPU sort as
    packed int64 keys (the value's order-preserving bits, then the index) with numpy's vectorized
    sort: the same values and order, several times faster than torch's sort there."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[-1] >= 1 << 31:
        return torch.sort(x, dim=-1, stable=True)
    bits = (x.detach() + 0.0).numpy().view(np.int32).astype(np.int64)  # + 0.0: -0.0 sorts as 0.0, as in torch
    bits ^= (bits >> 31) & 0x7FFFFFFF  # negative floats: larger magnitude, smaller key
    keys = (bits << 32) | np.arange(x.shape[-1], dtype=np.int64)
    keys.sort(axis=-1)
    order = torch.from_numpy(keys & 0xFFFFFFFF)
    return torch.gather(x, -1, order), order


class SortedLine:
    """Univariate series sorted once, for Lloyd steps in ``O(K log N)`` per restart: the cells of
    the nearest-center partition of a line are intervals between midpoints of the sorted centers,
    so a step is a search of ``K - 1`` boundaries and differences of prefix sums of ``w``, ``w x``
    and ``w x^2`` (float64: exact enough for standardized data), whatever the number of restarts.

    ``x (B, N, 1)``, ``w (B, N)``. Ties go as in :func:`kmeans_assign`: a point equidistant from
    two centers (or nearest to several equal ones) joins the one of lowest index.
    """

    def __init__(self, x: Tensor, w: Tensor):
        f64 = torch.float64
        values, order = _sort_series(x.squeeze(-1))  # (B, N); float64 exact below
        values = values.to(f64)
        b, n = values.shape
        # (B, 3, N + 1): prefix sums of w, w x, w x^2, from 0
        terms = values.new_zeros(b, 3, n + 1)
        terms[:, 0, 1:] = torch.gather(w, -1, order)
        torch.mul(terms[:, 0, 1:], values, out=terms[:, 1, 1:])
        torch.mul(terms[:, 1, 1:], values, out=terms[:, 2, 1:])
        self.values = values
        self.prefix = terms.cumsum(-1)
        self.cum_weight = self.prefix[:, 0, 1:].contiguous()  # (B, N): weight up to and including each point
        self.order = order

    def cells(self, centers: Tensor) -> Tensor:
        """The cell of each of ``centers (B, R, K, 1)`` as ``(start, end)`` positions in sorted
        order, ``(B, R, K, 2)`` (centers in their own order; an empty cell has ``start == end``)."""
        c = centers.squeeze(-1).to(torch.float64)  # (B, R, K)
        b, r, k = c.shape
        sorted_c, rank = torch.sort(c, dim=-1, stable=True)  # equal centers keep index order
        lower, upper = sorted_c[..., :-1], sorted_c[..., 1:]
        mid = (lower + upper) / 2  # (B, R, K-1)
        # a point at a midpoint joins the lower index; among equal centers the first (lowest index) counts
        is_start = torch.cat([torch.ones_like(upper[..., :1], dtype=torch.bool), upper > lower], -1)  # (B, R, K)
        start = torch.cummax(torch.arange(k, device=c.device) * is_start, -1).values
        lead = torch.gather(rank, -1, start)
        first_lower = lead[..., :-1] < lead[..., 1:]
        flat = mid.reshape(b, r * (k - 1))
        n = self.values.shape[-1]
        left = torch.searchsorted(self.values, flat, side="left")
        # right == left unless a point sits exactly on a midpoint (then the second search)
        on_mid = torch.gather(self.values, 1, left.clamp_max(n - 1)) == flat
        right = torch.searchsorted(self.values, flat, side="right") if bool(on_mid.any()) else left
        ends = torch.where(first_lower, right.view(b, r, k - 1), left.view(b, r, k - 1))
        # equal centers: the first (lowest index) takes the whole cell, the others are empty
        ends = torch.where(upper > lower, ends, torch.full_like(ends, n))
        ends = torch.flip(torch.cummin(torch.flip(ends, [-1]), -1).values, [-1])  # nondecreasing
        edge = torch.zeros((b, r, 1), dtype=ends.dtype, device=ends.device)
        bounds = torch.cat([edge, ends, edge + n], -1)  # (B, R, K+1)
        pairs = torch.stack([bounds[..., :-1], bounds[..., 1:]], -1)  # (B, R, K, 2) in sorted-center order
        inverse = torch.argsort(rank, dim=-1)
        return torch.gather(pairs, 2, inverse.unsqueeze(-1).expand(b, r, k, 2))

    def moments(self, cells: Tensor) -> Tensor:
        """Sums of ``w``, ``w x``, ``w x^2`` over each cell ``(B, R, K, 2)``: ``(B, R, K, 3)`` float64."""
        b, r, k, _ = cells.shape
        idx = cells.reshape(b, 1, r * k * 2).expand(b, 3, r * k * 2)
        at = torch.gather(self.prefix, -1, idx).view(b, 3, r, k, 2)
        return (at[..., 1] - at[..., 0]).permute(0, 2, 3, 1)

    def lloyd(self, centers: Tensor, max_iter: int) -> tuple[Tensor, Tensor, Tensor]:
        """Up to ``max_iter`` Lloyd steps from ``centers (B, R, K, 1)`` (stopping when no cell
        changes anywhere in the batch): ``(cells, moments, centers)`` of the final partition, the
        centers being its means (where a cell is not empty)."""
        cells = None
        for _ in range(max(max_iter, 1)):
            new_cells = self.cells(centers)
            mom = self.moments(new_cells)
            means = (mom[..., 1] / mom[..., 0].clamp_min(torch.finfo(torch.float64).tiny)).to(centers.dtype).unsqueeze(-1)
            centers = torch.where(mom[..., :1] > 0, means, centers)
            if cells is not None and torch.equal(new_cells, cells):
                break
            cells = new_cells
        return new_cells, mom, centers

    def _gather(self, pos: Tensor) -> Tensor:
        """The three prefix sums at positions ``pos (B, ...)``: ``(3, B, ...)``."""
        b = pos.shape[0]
        flat = pos.reshape(b, 1, -1).expand(b, 3, -1)
        return torch.gather(self.prefix, 2, flat).transpose(0, 1).view(3, *pos.shape)

    def _mass(self, lo: Tensor, hi: Tensor, c: Tensor, run: Optional[tuple], d2_weighting: bool,
              p_lo: Optional[Tensor] = None) -> Tensor:
        """Seeding mass of the sorted points in ``[lo, hi)`` (a part of the cell of center ``c``):
        ``sum w (x - c)^2`` (``d2_weighting``), else ``sum w [x != c]`` (``run``: the positions of
        the points equal to ``c``). ``p_lo``: the prefix sums at ``lo``, if already gathered."""
        p_hi, p_lo = self._gather(hi), self._gather(lo) if p_lo is None else p_lo
        if d2_weighting:
            s0, s1, s2 = p_hi - p_lo
            return sum_sq_about(s0, s1, s2, c).clamp_min(0)
        e0, e1 = (t.clamp(lo, hi) for t in run)
        return (p_hi[0] - p_lo[0] - (self._gather(e1)[0] - self._gather(e0)[0])).clamp_min(0)

    def seeds(self, n_components: int, u: Tensor, d2_weighting: bool) -> tuple[Tensor, Tensor]:
        """:func:`_seed_points` on the sorted line: ``(seeds (B, R, K, 1), distinct_ok (B, R))``
        for uniforms ``u (K, R, L)``. The same draws in distribution (inverse CDF over the sorted
        points: the cell by the cells' masses, then a binary search of the prefix sums in it,
        instead of a pass over the points per candidate), the same greedy choice."""
        b, n = self.values.shape
        r = u.shape[1]
        u = u.to(torch.float64)
        total_w = self.prefix[:, 0, -1:].unsqueeze(-1)  # (B, 1, 1)

        def by_weight(t: Tensor) -> Tensor:  # positions drawn by weight alone, targets (B, R, L)
            return torch.searchsorted(self.cum_weight, t.reshape(b, -1), side="right").view(t.shape)

        centers = self.point(by_weight(u[0, :, :1].unsqueeze(0) * total_w))  # (B, R, 1)
        distinct_ok = torch.ones((b, r), dtype=torch.bool, device=centers.device)
        steps = max(1, math.ceil(math.log2(n + 1)))
        for k in range(1, n_components):
            cells = self.cells(centers.unsqueeze(-1))  # (B, R, J, 2), J = k
            run = None
            if not d2_weighting:
                run = tuple(torch.searchsorted(self.values, centers.reshape(b, -1), side=side).view(b, r, k)
                            for side in ("left", "right"))
            mass = self._mass(cells[..., 0], cells[..., 1], centers, run, d2_weighting)  # (B, R, J)
            order = torch.argsort(cells[..., 0], -1)  # cells in position order
            cum = torch.gather(mass, -1, order).cumsum(-1)  # (B, R, J)
            total = cum[..., -1:]
            has_new = total.squeeze(-1) > 0
            target = u[k].unsqueeze(0) * total  # (B, R, L)
            slot = (cum.unsqueeze(-2) <= target.unsqueeze(-1)).sum(-1).clamp_max(k - 1)  # (B, R, L)
            j = torch.gather(order, -1, slot)  # the drawn cell, by center index
            target = target - torch.gather(cum, -1, slot) + torch.gather(mass, -1, j)  # mass left in the cell

            def pick(t: Tensor) -> Tensor:
                return torch.gather(t, -1, j)

            lo, hi, c = pick(cells[..., 0]), pick(cells[..., 1]), pick(centers)
            run_j = None if run is None else tuple(pick(t) for t in run)
            start, p_start = lo, self._gather(lo)
            for _ in range(steps):  # the largest q in [start, end] with mass([start, q)) <= target
                mid = (lo + hi + 1) // 2
                ok = self._mass(start, mid, c, run_j, d2_weighting, p_start) <= target
                lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid - 1)
            cand = self.point(torch.where(has_new.unsqueeze(-1), lo, by_weight(u[k].unsqueeze(0) * total_w)))
            ell = cand.shape[-1]
            if ell > 1:  # greedy: the candidate that lowers the potential most
                trial = torch.cat([centers.unsqueeze(2).expand(b, r, ell, k), cand.unsqueeze(-1)], -1).view(b, r * ell, k + 1)
                mom = self.moments(self.cells(trial.unsqueeze(-1)))  # (B, R L, K+1, 3)
                potential = sum_sq_about(*mom.unbind(-1), trial).sum(-1).view(b, r, ell)
                cand = torch.gather(cand, -1, potential.argmin(-1, keepdim=True))
            centers = torch.cat([centers, cand[..., :1]], -1)
            distinct_ok &= has_new
        return centers.unsqueeze(-1), distinct_ok

    def point(self, pos: Tensor) -> Tensor:
        """The sorted values at positions ``pos (B, ...)`` (clamped to the last point)."""
        b = pos.shape[0]
        idx = pos.clamp(0, self.values.shape[-1] - 1).reshape(b, -1)
        return torch.gather(self.values, 1, idx).view(pos.shape)

    def labels(self, cells: Tensor) -> Tensor:
        """The cell of every point, ``(B, R, N)`` in the points' own order."""
        b, r, k, _ = cells.shape
        n = self.values.shape[-1]
        pos = torch.arange(n, device=cells.device)
        in_cell = (pos >= cells[..., :1]) & (pos < cells[..., 1:])  # (B, R, K, N) sorted order
        sorted_labels = in_cell.to(torch.uint8).argmax(-2)  # (B, R, N)
        return torch.empty_like(sorted_labels).scatter_(-1, self.order.unsqueeze(1).expand(b, r, n), sorted_labels)


def kmeans(x: Tensor, w: Tensor, centers: Tensor, max_iter: int = KMEANS_MAX_ITER, compile: bool = False,
           chunk_size: Optional[int] = None):
    """Weighted Lloyd iterations from ``centers (B, R, K, D)``: ``(labels (B, R, N), centers)``,
    the centers being the means of the returned partition (where a cell is not empty).

    ``x (B, N, D)``, ``w (B, N)``. Stops when no label changes anywhere in the batch.
    """
    assign = compiled(kmeans_assign) if compile else kmeans_assign
    xb, wb = x.unsqueeze(1), w.unsqueeze(1)
    parts = _point_parts(xb, wb, centers.shape[-2], chunk_size, compile)  # once for every step
    labels = None
    for _ in range(max(max_iter, 1)):
        new_labels, centers = kmeans_step(xb, wb, centers, chunk_size, assign, parts)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels, centers


def _start(
    x: Tensor,
    w: Tensor,
    n_components: int,
    n_init: int,
    init_params: str,
    covariance_type: str | Covariance,
    reg_covar: Tensor,
    gen: torch.Generator,
    compile: bool = False,
    chunk_size: Optional[int] = None,
    line: Optional[SortedLine] = None,
) -> tuple[GMMParams, Tensor]:
    """Initial parameters ``(B, R, ...)`` and ``distinct_ok (B, R)`` (False where the seeds could
    not all be distinct points). ``line``: ``x`` sorted (univariate data), for Lloyd steps without
    a pass over the points.

    The plain start of each name, as :func:`initialize` lists them (``kmeans`` here is always
    k-means++ seeds, up to 5 Lloyd steps and the M-step of the hard partition)."""
    cov = get_covariance(covariance_type)
    reg = reg_covar.unsqueeze(-1)  # (B, 1): broadcasts over restarts
    if init_params == "random":
        n = x.shape[-2]
        u = _uniform((n, n_init, n_components), gen, x).permute(1, 2, 0)  # (R, K, N): prefix-stable in N
        resp = u / u.sum(-2, keepdim=True)
        params, ok = params_from_responsibilities(x.unsqueeze(1), w.unsqueeze(1), resp, cov, reg)
        return params, torch.ones(x.shape[0], n_init, dtype=torch.bool, device=x.device)
    seeds, distinct_ok = _seed_points(
        x, w, n_components, n_init, gen, d2_weighting=init_params != "random_from_data", compile=compile, line=line
    )
    steps = KMEANS_MAX_ITER if init_params == "kmeans" else 1
    return _lloyd_params(x, w, seeds, steps, cov, reg, line, compile, chunk_size), distinct_ok


# -- restarts that differ, lists of methods, the hierarchical start ------------------------------------
# Every restart of the default ``kmeans`` start used to be k-means++ seeds + 5 Lloyd steps: k-means
# pulls most of them into the same few partitions (iris, K=3: 4 distinct partitions in 10
# restarts), so more restarts found little more. Restart 0 keeps that start; the later ones cycle
# over three recipes of the k-means family (benchmarks/quality.py, docs/quality.md).

#: The recipes of restarts 1, 2, 3, ... of ``kmeans`` (cycled): (greedy D^2 seeding? else uniform
#: among distinct points, Lloyd steps).
DIVERSE_RECIPES = ((True, 2), (False, 2), (True, KMEANS_MAX_ITER))


def _lloyd_params(x: Tensor, w: Tensor, seeds: Tensor, steps: int, cov: Covariance, reg: Tensor,
                  line: Optional[SortedLine], compile: bool = False, chunk_size: Optional[int] = None) -> GMMParams:
    """Up to ``steps`` Lloyd steps from ``seeds (B, R, K, D)``, then the M-step of the partition;
    on the sorted series ``line`` when given (univariate data: no pass over the points)."""
    if line is not None:
        _, moments, centers = line.lloyd(seeds, steps)
        return m_step(moment_statistics(moments, centers, cov, centers.dtype), centers, cov, reg)[0]
    labels, centers = kmeans(x, w, seeds, max_iter=steps, compile=compile, chunk_size=chunk_size)
    return _partition_params(x, w, labels, centers, cov, reg, compile, chunk_size)


def _partition_params(x: Tensor, w: Tensor, labels: Tensor, centers: Tensor, cov: Covariance, reg: Tensor,
                      compile: bool = False, chunk_size: Optional[int] = None) -> GMMParams:
    """The M-step of hard ``labels (B, R, N)`` about ``centers (B, R, K, D)``; ``reg (B, 1)``."""
    stats_fn = compiled(partition_statistics) if compile else partition_statistics
    stats = chunked_sum(lambda xc, wc, lc: stats_fn(xc, wc, lc, centers, cov), x.unsqueeze(1), w.unsqueeze(1),
                        chunk_size, labels)
    params, _ = m_step(stats, centers, cov, reg)
    return params


def _take(t: Tensor, order: Tensor) -> Tensor:
    return t.index_select(1, order)


def _recipes(n_restarts: int) -> list[tuple[bool, int]]:
    """The recipes of restarts 1..n of ``kmeans``: ``DIVERSE_RECIPES`` cycled."""
    return [DIVERSE_RECIPES[r % len(DIVERSE_RECIPES)] for r in range(n_restarts)]


def _diverse_uniforms(n_components: int, n_restarts: int, gen: torch.Generator, like: Tensor) -> Tensor:
    """The seeding uniforms of restarts 1..n of ``kmeans``, ``(K, n, L)``, drawn restart-major:
    the first ``n`` restarts get the same draws whatever ``n`` (more restarts only add starts)."""
    return _uniform((n_restarts, n_components, greedy_trials(n_components)), gen, like).permute(1, 0, 2)


def _kmeans_family(x: Tensor, w: Tensor, n_components: int, recipes: list[tuple[bool, int]], u: Tensor,
                   cov: Covariance, reg: Tensor, compile: bool = False, chunk_size: Optional[int] = None,
                   line: Optional[SortedLine] = None) -> tuple[GMMParams, Tensor]:
    """Restarts of the k-means family, restart ``r`` by ``recipes[r] = (greedy, steps)`` with the
    uniforms ``u[:, r] (K, R, L)``: k-means++ seeds (greedy) or uniform distinct seeds, then up to
    ``steps`` Lloyd steps and the M-step of the partition. ``(params (B, R, ...), distinct_ok (B,
    R))``. One seeding call per kind and one Lloyd run per step count, whatever the number of
    restarts (a restart's numbers do not depend on its neighbours, to rounding: Lloyd stops at a
    fixed point)."""
    def restarts(keep) -> Tensor:
        return torch.tensor([r for r, recipe in enumerate(recipes) if keep(*recipe)], dtype=torch.long, device=x.device)

    seeds, distinct, seed_order = [], [], []
    for greedy in (True, False):
        idx = restarts(lambda g, _: g == greedy)
        if len(idx):
            uu = _take(u, idx) if greedy else _take(u, idx)[..., :1]
            s, ok = _seed_points(x, w, n_components, len(idx), None, d2_weighting=greedy, compile=compile, u=uu, line=line)
            seeds.append(s), distinct.append(ok), seed_order.append(idx)
    seed_order = torch.cat(seed_order)
    by_restart = torch.argsort(seed_order)
    seeds, distinct = _take(torch.cat(seeds, 1), by_restart), _take(torch.cat(distinct, 1), by_restart)
    parts, order = [], []
    for steps in sorted({s for _, s in recipes}):
        idx = restarts(lambda _, s: s == steps)
        parts.append(_lloyd_params(x, w, _take(seeds, idx), steps, cov, reg, line, compile, chunk_size))
        order.append(idx)
    inverse = torch.argsort(torch.cat(order))
    params = GMMParams(*(torch.cat(ts, 1) for ts in zip(*parts)))
    return params.map(lambda t: _take(t, inverse)), distinct


def _diverse_restarts(x: Tensor, w: Tensor, n_components: int, n_restarts: int, cov: Covariance, reg: Tensor,
                      gen: torch.Generator, compile: bool = False, chunk_size: Optional[int] = None,
                      line: Optional[SortedLine] = None):
    """Restarts 1..n of ``kmeans``: ``(params (B, n, ...), distinct_ok (B, n))``. Restart ``r`` follows
    ``DIVERSE_RECIPES[(r - 1) % 3]``: k-means++ seeds and 2 Lloyd steps, uniform distinct seeds and
    2 Lloyd steps, k-means++ seeds and up to 5 Lloyd steps (``kmeans``). (One step instead of two
    found the same optima on the suite but cost 1.6x on W1: rougher starts need more EM.) Every
    restart has its own uniforms (:func:`_diverse_uniforms`)."""
    u = _diverse_uniforms(n_components, n_restarts, gen, x)
    return _kmeans_family(x, w, n_components, _recipes(n_restarts), u, cov, reg, compile, chunk_size, line)


def _cat_restarts(parts) -> tuple[GMMParams, Tensor]:
    params, ok = zip(*parts)
    return GMMParams(*(torch.cat(ts, 1) for ts in zip(*params))), torch.cat(ok, 1)


def _hierarchical(x: Tensor, w: Tensor, n_components: int, cov: Covariance, reg: Tensor, gen: torch.Generator,
                  compile: bool = False, chunk_size: Optional[int] = None) -> tuple[GMMParams, Tensor]:
    """One restart ``(B, 1, ...)`` from model-based agglomerative clustering (torchgmm.hierarchical)
    of at most ``HC_MAX_POINTS`` points per series: the M-step of its partition into K clusters."""
    from .hierarchical import HC_MAX_POINTS, agglomerate, subsample

    xs, ws = subsample(x, w, HC_MAX_POINTS, gen)
    labels = agglomerate(xs, ws, n_components).labels.clamp_min(0).unsqueeze(1)  # (B, 1, M); padding: weight 0
    onehot = _one_hot(labels, n_components, x.dtype) * ws.unsqueeze(1).unsqueeze(-2)  # (B, 1, K, M)
    nk = onehot.sum(-1, keepdim=True)
    total = ws.sum(-1).clamp_min(torch.finfo(x.dtype).tiny)[:, None, None, None]
    overall = (ws.unsqueeze(-1) * xs).sum(-2)[:, None, None] / total  # (B, 1, 1, D)
    centers = torch.where(nk > 0, (onehot @ xs.unsqueeze(1)) / nk.clamp_min(torch.finfo(x.dtype).tiny), overall)
    params = _partition_params(xs, ws, labels, centers, cov, reg, compile, chunk_size)
    ok = ((ws > 0).sum(-1) >= n_components).unsqueeze(-1)  # (B, 1)
    return params, ok


def initialize(
    x: Tensor,
    w: Tensor,
    n_components: int,
    n_init: int,
    init_params,
    covariance_type: str | Covariance,
    reg_covar: Tensor,
    gen: torch.Generator,
    compile: bool = False,
    chunk_size: Optional[int] = None,
) -> tuple[GMMParams, Tensor]:
    """Initial parameters ``(B, R, ...)`` and ``distinct_ok (B, R)`` (False where the seeds could
    not all be distinct points).

    - ``kmeans``: restart 0 is k-means++ seeds, up to 5 Lloyd iterations, then the M-step of the
      hard partition (scikit-learn's default, batched; the start of ``n_init=1``). Restarts 1, 2,
      3, ... cycle over three recipes (:func:`_diverse_restarts`): k-means++ seeds or uniform
      distinct seeds with 2 Lloyd steps, and the ``kmeans`` start, each with its own draws, so that they
      reach different partitions; the first ``n`` restarts do not depend on ``n_init``, so a
      larger ``n_init`` never loses a start a smaller one had.
    - ``k-means++`` / ``random_from_data``: seed points (greedy D^2-weighted / uniform among
      distinct points), then the M-step of the partition into nearest-seed cells (one Lloyd
      assignment). scikit-learn instead starts from the bare seeds with covariances of size
      ``reg_covar``; its first E-step is then the same nearest-seed assignment, but with equal
      weights.
    - ``random``: the M-step of uniform random responsibilities, as in scikit-learn.
    - ``hierarchical``: restart 0 from model-based agglomerative clustering (mclust's start;
      :mod:`torchgmm.hierarchical`, at most 2,000 points per series, subsampled beyond);
      restarts 1, 2, ... as those of ``kmeans``.
    - a list of these names: restart ``r`` uses ``init_params[r % len(init_params)]`` (each name
      its plain start: ``kmeans`` there is always k-means++ seeds and Lloyd).
    """
    cov = get_covariance(covariance_type)
    reg = reg_covar.unsqueeze(-1)  # (B, 1): broadcasts over restarts
    opts = dict(compile=compile, chunk_size=chunk_size)
    line = SortedLine(x, w) if on_sorted_line(x.shape[-2], x.shape[-1], n_init) else None
    kopts = dict(opts, line=line)
    if isinstance(init_params, (list, tuple)):
        names = list(init_params)
        if len(set(names)) == 1:
            init_params = names[0]
        else:
            per_restart = [names[r % len(names)] for r in range(n_init)]
            parts, order = [], []
            for name in dict.fromkeys(per_restart):  # in order of first use
                idx = [r for r, m in enumerate(per_restart) if m == name]
                if name == "hierarchical":
                    first = _hierarchical(x, w, n_components, cov, reg, gen, **opts)
                    parts.append(first if len(idx) == 1 else _cat_restarts(
                        [first, _diverse_restarts(x, w, n_components, len(idx) - 1, cov, reg, gen, **kopts)]))
                else:
                    parts.append(_start(x, w, n_components, len(idx), name, cov, reg_covar, gen, **kopts))
                order += idx
            params, ok = _cat_restarts(parts)
            inverse = torch.argsort(torch.tensor(order)).to(x.device)
            return params.map(lambda t: _take(t, inverse)), _take(ok, inverse)
    if init_params == "hierarchical":
        first = _hierarchical(x, w, n_components, cov, reg, gen, **opts)
    elif init_params == "kmeans" and n_init > 1:  # restart 0 is _start's kmeans, drawn first; all in one family
        u = torch.cat([_uniform((n_components, 1, greedy_trials(n_components)), gen, x), _diverse_uniforms(n_components, n_init - 1, gen, x)], 1)
        recipes = [(True, KMEANS_MAX_ITER)] + _recipes(n_init - 1)
        return _kmeans_family(x, w, n_components, recipes, u, cov, reg, **kopts)
    else:
        return _start(x, w, n_components, n_init, init_params, cov, reg_covar, gen, **kopts)
    if n_init == 1:
        return first
    return _cat_restarts([first, _diverse_restarts(x, w, n_components, n_init - 1, cov, reg, gen, **kopts)])
