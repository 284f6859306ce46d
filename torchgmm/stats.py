"""Sufficient statistics and the M-step.

Statistics are additive: chunks of points (bounded memory), a stream of mini-batches, or ranks of
``torch.distributed`` (all-reduce) are combined by adding :class:`Stats`; the M-step turns the sum
into parameters. They are *shifted*: ``sum_diff`` and ``scatter`` are taken about reference means
``ref`` (the current means during EM), so the covariance is a small correction of a centred
scatter and never ``E[xx^T] - mu mu^T`` (which loses every digit at large offsets in float32).

Pure tensor functions; no validation here.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ._ops import _BLAS_MIN_WORK, broadcast_shapes, exp_normal, matmul, product
from .covariance import Covariance, get_covariance
from .density import (GMMParams, _log_peak, joint_log_prob_and_diff, quadratic_coefficients, quadratic_features,
                      univariate_coefficients, whitened)

__all__ = [
    "Stats", "sum_sq_about", "univariate_stats_about", "statistics", "e_step_statistics", "univariate_statistics", "fast_e_step_statistics", "moment_statistics", "partition_statistics", "m_step",
    "expected_log_joint",
    "chunked_sum", "point_chunks",
    "params_from_responsibilities",
]


def sum_sq_about(s0: Tensor, s1: Tensor, s2: Tensor, c: Tensor) -> Tensor:
    """``sum w (x - c)^2`` from a univariate cell's sums ``s0 = sum w``, ``s1 = sum w x``,
    ``s2 = sum w x^2`` (the fast paths' moments; exact in float64, guarded in float32 by the
    callers' expansion limits)."""
    return s2 - 2 * c * s1 + c.square() * s0


class Stats(NamedTuple):
    """Additive statistics of weighted points about reference means ``ref (*B, K, D)``."""

    nk: Tensor  # (*B, K)        sum_n w_n r_nk
    sum_diff: Tensor  # (*B, K, D)     sum_n w_n r_nk (x_n - ref_k)
    scatter: Tensor  # full/tied (*B, K, D, D); diag/spherical (*B, K, D)
    log_lik: Tensor  # (*B,)          sum_n w_n log p(x_n)  (0 when resp was given)

    def __add__(self, other: "Stats") -> "Stats":  # type: ignore[override]
        return Stats(*(a + b for a, b in zip(self, other)))


def statistics(diff: Tensor, resp: Tensor, cov: Covariance, log_lik: Optional[Tensor] = None) -> Stats:
    """Statistics from ``diff = x - ref (*B, K, N, D)`` and weighted ``resp (*B, K, N)``."""
    nk = resp.sum(-1)  # (*B, K)
    sum_diff = matmul(resp.unsqueeze(-2), diff).squeeze(-2)  # (*B, K, D)
    scatter = cov.scatter(diff, resp)
    if log_lik is None:
        log_lik = torch.zeros(nk.shape[:-1], dtype=nk.dtype, device=nk.device)
    return Stats(nk, sum_diff, scatter, log_lik)


def e_step_statistics(
    x: Tensor, w: Tensor, params: GMMParams, covariance_type: str | Covariance
) -> Stats:
    """The E-step fused with the statistics: one pass over ``x (*B, N, D)``, weights ``w (*B, N)``.

    Statistics are about ``params.means``; ``log_lik`` is the weighted log-likelihood sum of
    ``params`` (the EM lower bound before this M-step).
    """
    cov = get_covariance(covariance_type)
    joint, diff = joint_log_prob_and_diff(x, params, cov)  # (*B, K, N), (*B, K, N, D)
    peak = joint.amax(-2, keepdim=True)  # (*B, 1, N): logsumexp's shift, one exp for both uses
    e = exp_normal(joint - peak, inplace=True)  # (*B, K, N), max 1
    total = e.sum(-2)  # (*B, N), >= 1
    log_norm = peak.squeeze(-2) + total.log()  # (*B, N)
    resp = e.mul_((w / total).unsqueeze(-2))  # (*B, K, N), weighted
    return statistics(diff, resp, cov, (w * log_norm).sum(-1))


# float32 runs the expanded quadratic in float32 while the largest cancelled term, q mu^2 / 2 (q: the
# component's precision, mu its mean, standardized units), stays below this many nats: then the
# expansion's rounding is at most ~1e-4 nats in a joint log-probability and ~1e-4 relative in a
# variance; beyond it (tight or collapsed components far from the series' centre) the series (a row
# with its restarts) runs in float64.
_FLOAT32_EXPANSION_LIMIT = 1e3


def univariate_stats_about(s0: Tensor, s1: Tensor, s2: Tensor, mu: Tensor, covariance_type: str | Covariance,
                           log_lik: Tensor) -> Stats:
    """:class:`Stats` about the means ``mu (*L, K)`` of univariate points from their sums ``s0 =
    sum r``, ``s1 = sum r x``, ``s2 = sum r x^2`` (each ``(*L, K)``: the fast paths' moments), with
    ``log_lik``: ``sum r (x - mu) = s1 - s0 mu`` and ``sum r (x - mu)^2 = s2 - mu (s1 + sum r (x -
    mu))``."""
    sum_diff = torch.addcmul(s1, s0, mu, value=-1)
    centred = torch.addcmul(s2, mu, s1 + sum_diff, value=-1)
    return Stats(s0, sum_diff.unsqueeze(-1), get_covariance(covariance_type).univariate_scatter(centred), log_lik)


def underflow_floor(dtype: torch.dtype) -> float:
    """The sum of a point's exponentiated joints below which the univariate fast paths call the
    point underflowed (every component far) and take the exact logsumexp instead."""
    return 2.0**-900 if dtype == torch.float64 else 2.0**-100


def expansion_unsafe(c2: Tensor, mu: Tensor) -> Tensor:
    """Where the univariate quadratic's float32 expansion would cancel too much: the cancelled
    term ``q mu^2 / 2 = -c2 mu^2`` is not below ``_FLOAT32_EXPANSION_LIMIT`` (NaN included);
    ``c2 (*L, K)`` (tied: ``(*L, 1)``), ``mu (*L, K)``."""
    return ~(-c2 * mu.square() < _FLOAT32_EXPANSION_LIMIT)


def univariate_statistics(x: Tensor, w: Tensor, params: GMMParams, covariance_type: str | Covariance) -> Stats:
    """:func:`e_step_statistics` for univariate data (``D = 1``) in a handful of large kernels.

    The joint log-probabilities are one batched matrix product of the features ``[1, x, x^2]``
    with the quadratic's coefficients (:func:`torchgmm.density.univariate_coefficients`, from
    the one log-density), and the statistics are a second one, of the features with the weighted
    responsibilities: no ``(K, N)`` differences. Restarts broadcast against the data
    (``x (B, 1, N, 1)`` against parameters ``(B, R, ...)``) become rows of one product. The
    exponentials are taken without a per-point maximum; points where every component underflows
    (far from all of them) are recomputed with ``logsumexp``. float32 is guarded: the expansion
    cancels terms of size ``q mu^2`` (data standardized per series keep them small), so the rows
    (series with their restarts) whose terms exceed ``_FLOAT32_EXPANSION_LIMIT`` run in float64
    (same result to float32 rounding; :func:`_rows_apart`).
    """
    cov = get_covariance(covariance_type)
    dtype = x.dtype
    coef = univariate_coefficients(params, cov)  # (*L, K, 3)
    if dtype != torch.float64:
        # Near component k (where its joint matters) the expansion cancels terms of size q mu^2 / 2;
        # far from it the rounding is relative to the joint itself, as in the direct form.
        unsafe = expansion_unsafe(coef[..., 2], params.means.squeeze(-1))
        if bool(unsafe.any()):  # those rows in float64

            def in_float64(xr, wr, pr):
                f64 = torch.float64
                return Stats(*(t.to(dtype) for t in univariate_statistics(xr.to(f64), wr.to(f64), pr.map(lambda t: t.to(f64)), cov)))

            return _rows_apart(unsafe, x, w, params, lambda *a: univariate_statistics(*a, cov), in_float64)
    lead, k, n = coef.shape[:-2], coef.shape[-2], x.shape[-2]
    outer, xf, wf, r = _fold(x, w, lead)  # restarts sharing the data: one product per series, rows (R, K)
    g = outer.numel()  # products run on (G, rows, N): components in rows, points contiguous
    coef = _as_rows(coef, outer, r, k, 1)  # (G, R K, 3)
    xg = xf.squeeze(-1).expand(*outer, n).reshape(g, 1, n)
    feats = xg.new_empty(g, 3, n)  # (G, 3, N): [1, x, x^2], written in place (no cat)
    feats[:, 0] = 1
    feats[:, 1:2] = xg
    torch.square(xg, out=feats[:, 2:3])

    def joint_log_prob() -> Tensor:
        """c0 + c1 x + c2 x^2, (G, R K, N): BLAS for large products only (the small form's sums
        over components add rows and its per-point factors broadcast over them)."""
        if g * r * k * n * 2 >= _BLAS_MIN_WORK:
            return torch.bmm(coef, feats)  # the ones row carries c0: no broadcast copy of it
        return torch.addcmul(coef[..., :1], xg, torch.addcmul(coef[..., 1:2], xg, coef[..., 2:]))

    moments, log_lik = _expanded_pass(joint_log_prob, feats, wf.expand(*outer, n).reshape(g, 1, n), r, k)
    moments, log_lik = _from_rows(moments, outer, r, k, 1), _from_rows(log_lik, outer, r, None, 0)  # (*L, K, 3), (*L)
    return univariate_stats_about(*moments.unbind(-1), params.means.squeeze(-1), cov, log_lik)


def _expanded_pass(joint_log_prob: Callable[[], Tensor], feats: Tensor, wg: Tensor, r: int, k: int) -> tuple[Tensor, Tensor]:
    """The E-step of the expanded forms (univariate and quadratic): the joints ``(G, R K, N)``
    that ``joint_log_prob()`` computes as a product of coefficients with the points' features
    ``feats (G, F, N)``, their exponentials without a per-point maximum (points where every
    component underflows are recomputed with ``logsumexp``), and the responsibilities weighted by
    ``wg (G, 1, N)`` against the same features: ``(moments (G, R K, F), log_lik (G, R))``."""
    g, _, n = feats.shape
    dtype = feats.dtype
    e = exp_normal(joint_log_prob(), inplace=True).view(g, r, k, n)
    s = e.sum(-2)  # (G, R, N)
    tiny = underflow_floor(dtype)
    if bool(s.amin() < tiny):  # every component underflowed: the exact logsumexp for those points
        bad = s < tiny
        jb = joint_log_prob().view(g, r, k, n).transpose(-1, -2)[bad]  # (n_bad, K), recomputed (rare)
        lse = torch.logsumexp(jb, -1)
        e.transpose(-1, -2)[bad] = torch.exp(jb - lse.unsqueeze(-1))
        s = torch.where(bad, torch.ones((), dtype=dtype), s)
        log_s = s.log()
        log_s[bad] = lse
    else:
        log_s = s.log()
    resp = e.mul_((wg / s).unsqueeze(-2))  # (G, R, K, N), weighted
    return product(resp.view(g, r * k, n), feats.mT), (wg * log_s).sum(-1)


def quadratic_statistics(x: Tensor, w: Tensor, params: GMMParams, covariance_type: str | Covariance) -> Stats:
    """:func:`e_step_statistics` for full and tied covariances of a few features in two products:
    the joint log-probabilities are the points' quadratic features ``[1, x, x_i x_j]``
    (:func:`torchgmm.density.quadratic_features`) times the coefficients of the one log-density
    (:func:`torchgmm.density.quadratic_coefficients`), and the statistics ``sum r [1, x, x x^T]``
    are the weighted responsibilities times the same features, mapped to the shifted statistics
    about the current means. ``F = 1 + D + D (D + 1) / 2`` numbers per point and component instead
    of the whitened form's ``2 D^2``, in wide products. As :func:`univariate_statistics` (its
    ``D = 1`` case): in float32 the expansion cancels ``mu^T P mu / 2`` nats (the univariate
    ``q mu^2 / 2``: near the component, in the joint and in the scatter about it, the rounding is
    ``eps`` times that in whitened units); where that exceeds ``_FLOAT32_EXPANSION_LIMIT`` for some
    component (a tight one far from the series' centre), the row's points and means are taken about
    the mean of its least safe component (:func:`_row_shift`: the same numbers, shifted), and rows
    still beyond the limit (two such components apart), or with a component whose peak density
    could overflow an exponential, take :func:`whitened_statistics` (:func:`_rows_apart`)."""
    cov = get_covariance(covariance_type)
    lead, (k, d), n = params.means.shape[:-2], params.means.shape[-2:], x.shape[-2]
    outer, xf, wf, r = _fold(x, w, lead)
    g = outer.numel()  # rows of the products: (G, R K, ...)
    coef = quadratic_coefficients(params, cov)  # (*L, K, F)
    unsafe = ~(_log_peak(params, cov, d) < _peak_limit(x.dtype))  # a density too high to exponentiate
    shift, mu = None, params.means
    if x.dtype != torch.float64:
        def cancelled(mu: Tensor, coef: Tensor) -> Tensor:  # mu^T P mu / 2 (P mu: the linear coefficients), (*L, K)
            return 0.5 * (mu * coef[..., 1:1 + d]).sum(-1)

        cancel = cancelled(mu, coef)
        if not bool((cancel < _FLOAT32_EXPANSION_LIMIT).all()):
            # each row about the mean of its least safe component (a tight component far from the
            # series' centre then cancels nothing); rows still beyond the limit go apart below
            shift, mu = _row_shift(cancel, mu, outer, r, k)
            coef = quadratic_coefficients(params._replace(means=mu), cov)
            cancel = cancelled(mu, coef)
        unsafe = unsafe | ~(cancel < _FLOAT32_EXPANSION_LIMIT)
    if bool(unsafe.any()):
        return _rows_apart(unsafe, x, w, params, lambda *a: quadratic_statistics(*a, cov),
                           lambda *a: whitened_statistics(*a, cov))
    xg = xf.expand(*outer, n, d).reshape(g, n, d)
    feats = quadratic_features((xg if shift is None else xg - shift.unsqueeze(-2)).mT)  # (G, F, N)
    coef = _as_rows(coef, outer, r, k, 1)  # (G, R K, F)
    moments, log_lik = _expanded_pass(lambda: torch.bmm(coef, feats), feats, wf.expand(*outer, n).reshape(g, 1, n), r, k)
    moments, log_lik = _from_rows(moments, outer, r, k, 1), _from_rows(log_lik, outer, r, None, 0)  # (*L, K, F), (*L)
    nk, s1, s2 = _quadratic_sums(moments, d)  # of r [1, y, y y^T], y = x - shift; mu shifted alike
    sum_diff = s1 - nk.unsqueeze(-1) * mu
    # about the current means: sum r (x - mu)(x - mu)^T = S2 - s1 mu^T - mu s1^T + nk mu mu^T
    cross = s1.unsqueeze(-1) * mu.unsqueeze(-2)
    scatter = s2 - cross - cross.mT + nk[..., None, None] * (mu.unsqueeze(-1) * mu.unsqueeze(-2))
    return Stats(nk, sum_diff, scatter, log_lik)


def _quadratic_sums(moments: Tensor, d: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(sum r (*L, K), sum r x (*L, K, D), sum r x x^T (*L, K, D, D))`` from the sums ``moments
    (*L, K, F)`` of ``r`` times :func:`torchgmm.density.quadratic_features`."""
    i, j = torch.triu_indices(d, d, device=moments.device)
    s2 = moments.new_empty(*moments.shape[:-1], d, d)  # from its upper triangle
    s2[..., i, j] = moments[..., 1 + d:]
    s2[..., j, i] = moments[..., 1 + d:]
    return moments[..., 0], moments[..., 1:1 + d], s2


def _row_shift(cancel: Tensor, mu: Tensor, outer: torch.Size, r: int, k: int) -> tuple[Tensor, Tensor]:
    """Per row of the products (see :func:`_fold`) the mean of its component whose expansion
    cancels most, ``cancel (*L, K)``, where that is beyond ``_FLOAT32_EXPANSION_LIMIT`` (else 0):
    ``(shift (G, D), mu - shift)``, the means in the shifted coordinates."""
    g, d = outer.numel(), mu.shape[-1]
    row_cancel = _as_rows(cancel, outer, r, k, 0).reshape(g, r * k)
    row_mu = _as_rows(mu, outer, r, k, 1).reshape(g, r * k, d)
    worst = row_cancel.argmax(-1, keepdim=True)  # (G, 1); NaN counts as the largest
    shift = torch.gather(row_mu, 1, worst.unsqueeze(-1).expand(g, 1, d)).squeeze(1)  # (G, D)
    shift = torch.where((~(row_cancel < _FLOAT32_EXPANSION_LIMIT)).any(-1, keepdim=True), shift, 0.0)
    return shift, mu - shift.view(*outer, *((1,) if r > 1 else ()), 1, d)


#: Features up to which full and tied E-steps may take the quadratic form (:func:`quadratic_statistics`;
#: its ``F = 1 + D + D (D + 1) / 2`` features against the whitened form's ``2 D^2`` products per point and
#: component; W2's D = 8: 45 vs 128, a full iteration 3x faster).
QUADRATIC_MAX_FEATURES = 8


def _peak_limit(dtype: torch.dtype) -> float:
    """Joint log-probabilities the quadratic form may exponentiate without a shift (10 nats below
    the largest finite exponential)."""
    return math.log(torch.finfo(dtype).max) - 10.0


def _fold(x: Tensor, w: Tensor, lead: tuple) -> tuple:
    """How parameters with leading dims ``lead`` meet ``x (*Lx, N, D)``, ``w (*Lx, N)``: ``(outer,
    x, w, r)``, where restarts share the data (``Lx = (..., 1)`` against ``(..., R)``) the data
    without that dim and ``r = R``, else the broadcast dims and ``r = 1``."""
    x_lead = x.shape[:-2]
    if len(x_lead) == len(lead) >= 1 and x_lead[-1] == 1 and lead[-1] > 1:
        return broadcast_shapes(x_lead[:-1], lead[:-1]), x.squeeze(-3), w.squeeze(-2), lead[-1]
    return broadcast_shapes(x_lead, lead), x, w, 1


def _as_rows(t: Tensor, outer: torch.Size, r: int, k: int, tail: int) -> Tensor:
    """Per-member ``t (*L, K, *tail)`` as the rows of the products, ``(G, R K, *tail)`` (see :func:`_fold`)."""
    t = t if r > 1 else t.unsqueeze(-tail - 2)
    end = t.shape[t.dim() - tail:]
    return t.expand(*outer, r, k, *end).reshape(outer.numel(), r * k, *end)


def _from_rows(t: Tensor, outer: torch.Size, r: int, k: Optional[int], tail: int) -> Tensor:
    """The inverse of :func:`_as_rows`: results whose leading elements are the products' rows,
    ``(G, R K, *tail)`` or ``(G R K, *tail)`` (``k`` None: one per member, ``(G, R)``), as
    ``(*L, K, *tail)`` (``(*L)``)."""
    end = t.shape[t.dim() - tail:] if tail else ()
    t = t.reshape(*outer, r, *(() if k is None else (k,)), *end)
    return t if r > 1 else t.squeeze(len(outer))


def _rows_apart(unsafe: Tensor, x: Tensor, w: Tensor, params: GMMParams, fast: Callable, exact: Callable) -> Stats:
    """Statistics with the rows of dim 0 (a series with its restarts) where ``unsafe (*L, ...)``
    holds anywhere from ``exact(x, w, params)``, the other rows from ``fast``: a row's numbers
    depend on its own parameters only, and one tight component does not send a whole block to the
    slow form. Everything by ``exact`` when the rows cannot be split (data broadcast over dim 0)."""
    lead = params.log_weights.shape[:-1]
    if not lead or x.shape[0] != lead[0] or w.shape[0] != lead[0]:
        return exact(x, w, params)
    bad = unsafe.reshape(lead[0], -1).any(-1)  # (L0,)
    rows, keep = bad.nonzero().squeeze(-1), (~bad).nonzero().squeeze(-1)
    if len(keep) == 0:
        return exact(x, w, params)
    parts = [fn(x[i], w[i], params.map(lambda t: t[i])) for fn, i in ((fast, keep), (exact, rows))]
    return Stats(*(torch.empty((lead[0],) + a.shape[1:], dtype=a.dtype, device=a.device)
                   .index_copy_(0, keep, a).index_copy_(0, rows, b) for a, b in zip(*parts)))


def whitened_statistics(x: Tensor, w: Tensor, params: GMMParams, covariance_type: str | Covariance) -> Stats:
    """:func:`e_step_statistics` for full and tied covariances (``D >= 2``) in whitened
    coordinates: ``y = (x - mu_k) U_k`` for every component of every restart of a series is one
    product (:func:`torchgmm.density.whitened`), the Mahalanobis term is ``|y|^2``, and the
    statistics are taken in ``y`` (``sum r y``, ``sum r y y^T``: centred on the current means and
    well scaled) and mapped back by two triangular solves per component (``d = U^{-T} y``). No
    ``(K, N, D)`` difference and no product per component (W2's E-step 6x, its scatter 2.6x in
    one block). float32: the product cancels terms of size ``|mu U|``; the rows (series with
    their restarts) where that could cost more than the univariate path's budget run
    :func:`e_step_statistics` (:func:`_rows_apart`)."""
    cov = get_covariance(covariance_type)
    lead, (k, d), n = params.means.shape[:-2], params.means.shape[-2:], x.shape[-2]
    u = cov.whitener(params.prec_chol, k)  # (*L, K, D, D)
    if x.dtype != torch.float64:
        # y rounds by eps |mu U|, a joint near the component (|y| ~ sqrt(D)) by eps sqrt(D) |mu U|:
        # kept within the univariate path's budget (eps 2 _FLOAT32_EXPANSION_LIMIT nats); rows
        # (dim 0: a series with its restarts) beyond it take the difference form, the others not
        shift_sq = (params.means.unsqueeze(-2) @ u).square().sum(-1)  # (*L, K)
        unsafe = ~(shift_sq * d < 4 * _FLOAT32_EXPANSION_LIMIT**2)  # (NaN parameters too)
        if bool(unsafe.any()):
            return _rows_apart(unsafe, x, w, params, lambda *a: whitened_statistics(*a, cov),
                               lambda *a: e_step_statistics(*a, cov))
    outer, xf, wf, r = _fold(x, w, lead)
    g = outer.numel()  # rows of the products: (G, R K, ...)
    u, means = _as_rows(u, outer, r, k, 2), _as_rows(params.means, outer, r, k, 1)
    x_t = xf.expand(*outer, n, d).reshape(g, n, d).mT.contiguous()  # (G, D, N)
    wg = wf.expand(*outer, n).reshape(g, 1, n)
    y = whitened(x_t, means, u)  # (G, R K, D, N)
    peak = _as_rows(_log_peak(params, cov, d).expand(*lead, k), outer, r, k, 0).view(g, r, k, 1)
    joint = (y * y).sum(-2).view(g, r, k, n).mul_(-0.5).add_(peak)  # (G, R, K, N)
    top = joint.amax(-2, keepdim=True)
    e = exp_normal(joint.sub_(top), inplace=True)
    total = e.sum(-2)  # (G, R, N), >= 1
    log_lik = (wg * (top.squeeze(-2) + total.log())).sum(-1)  # (G, R)
    resp = e.mul_((wg / total).unsqueeze(-2)).view(g * r * k, n, 1)  # weighted
    yk = y.view(g * r * k, d, n)
    weighted = yk * resp.mT  # (G R K, D, N)
    sum_y = weighted.sum(-1)  # (G R K, D)
    scatter_y = torch.bmm(weighted, yk.mT)  # (G R K, D, D)
    uk = u.reshape(g * r * k, d, d)  # upper triangular: d = U^{-T} y
    sum_diff = torch.linalg.solve_triangular(uk.mT, sum_y.unsqueeze(-1), upper=False).squeeze(-1)
    scatter = torch.linalg.solve_triangular(
        uk, torch.linalg.solve_triangular(uk.mT, scatter_y, upper=False), upper=True, left=False)

    nk = _from_rows(resp.view(g * r * k, n).sum(-1), outer, r, k, 0)
    return Stats(nk, _from_rows(sum_diff, outer, r, k, 1), _from_rows(scatter, outer, r, k, 2),
                 _from_rows(log_lik, outer, r, None, 0))


def fast_e_step_statistics(x: Tensor, w: Tensor, params: GMMParams, covariance_type: str | Covariance) -> Stats:
    """The eager E-step with statistics: :func:`univariate_statistics` for univariate data; for
    full and tied covariances when the products are large enough for BLAS,
    :func:`quadratic_statistics` up to ``QUADRATIC_MAX_FEATURES`` features (where restarts share
    their series' points the features serve all of them; per member, W2's compacted iterations,
    still about 2x faster than the whitened form), else :func:`whitened_statistics`; otherwise
    :func:`e_step_statistics`."""
    if x.shape[-1] == 1:
        return univariate_statistics(x, w, params, covariance_type)
    cov = get_covariance(covariance_type)
    if cov.matrix_scatter:
        work = params.log_weights.numel() * x.shape[-2] * x.shape[-1] ** 2
        if work >= _BLAS_MIN_WORK:
            if x.shape[-1] <= QUADRATIC_MAX_FEATURES:
                return quadratic_statistics(x, w, params, cov)
            return whitened_statistics(x, w, params, cov)
    return e_step_statistics(x, w, params, cov)


def m_step(
    stats: Stats, ref: Tensor, covariance_type: str | Covariance, reg_covar: Tensor, prior=None
) -> tuple[GMMParams, Tensor]:
    """Parameters from summed statistics about ``ref (*B, K, D)``; and ``ok (*B)``.

    ``reg_covar (*B)`` is added to every covariance diagonal. As in scikit-learn, ``10 * eps``
    is added to ``nk`` so that an empty component keeps finite parameters (its mean stays at the
    reference, its covariance is ``reg_covar``, its weight is ~0). ``ok`` is False where a
    covariance was not positive definite even after jitter.

    ``prior`` (a :class:`torchgmm.prior.ConjugatePrior`, batch ``(*B)``) makes this the MAP
    M-step: the prior augments the statistics (pseudo-points at its mean, its scale added to the
    scatter) and sets the covariance's denominator; the rest is this same code.
    """
    cov = get_covariance(covariance_type)
    nk = stats.nk + 10 * torch.finfo(stats.nk.dtype).eps  # (*B, K)
    n, sum_diff, scatter, count = nk, stats.sum_diff, stats.scatter, None
    if prior is not None:
        (n, sum_diff, scatter, _), count = prior.augment(Stats(nk, sum_diff, scatter, stats.log_lik), ref, cov)
    shift = sum_diff / n.unsqueeze(-1)  # (*B, K, D): new mean - ref
    covariance = cov.covariance(n, shift, scatter, reg_covar, count)
    prec_chol, ok = cov.prec_chol_from_covariance(covariance, reg_covar)
    log_weights = torch.log(nk / nk.sum(-1, keepdim=True))  # the data's counts, never the prior's
    return GMMParams(log_weights, ref + shift, prec_chol), ok


def expected_log_joint(stats: Stats, ref: Tensor, params: GMMParams, covariance_type: str | Covariance) -> Tensor:
    """EM's ``Q``: ``sum_n w_n sum_k r_nk log(w_k N(x_n | mu_k, P_k))`` per member, ``(*L)``, of any
    ``params`` (differentiable), from the statistics ``stats`` of fixed responsibilities about the
    means ``ref (*L, K, D)`` (what :func:`m_step` maximizes)::

        sum_k n_k peak_k - 1/2 sum_k [tr(S_k P_k) - 2 d_k^T P_k s_k + n_k d_k^T P_k d_k],  d = mu - ref

    (``peak_k = log w_k + log det U_k - D/2 log 2 pi``, ``s_k`` the summed differences, ``S_k`` the
    scatter), the traces through :meth:`~torchgmm.covariance.Covariance.scatter_form` and the other
    terms through the covariance type's Mahalanobis term (the cross term by polarization, ``2 d^T P
    s = m(d + s) - m(d) - m(s)``), so no type is special-cased. At the parameters the
    responsibilities came from, its gradient is the log-likelihood's (Fisher's identity): the
    gradient mode's evaluation from one E-step."""
    cov = get_covariance(covariance_type)
    k, d = params.means.shape[-2:]
    n_lead = params.means.dim() - 2
    peak = _log_peak(params, cov, d)  # (*L, K)
    counts = torch.where(stats.nk > 0, stats.nk * peak, 0.0).sum(-1)  # (a component without points adds nothing)
    precision = cov.scatter_form(cov.precision_from_prec_chol(params.prec_chol), k, d)
    trace = (stats.scatter * precision).flatten(n_lead).sum(-1)  # sum_k tr(S_k P_k)
    delta = params.means - ref  # (*L, K, D)
    m = cov.mahalanobis(torch.stack([delta + stats.sum_diff, delta, stats.sum_diff], -2), params.prec_chol)  # (*L, K, 3)
    quadratic = (m[..., 0] - (1 + stats.nk) * m[..., 1] - m[..., 2]).sum(-1)  # 2 d^T P s - n d^T P d, summed
    return counts - 0.5 * trace + 0.5 * quadratic


def moment_statistics(moments: Tensor, centers: Tensor, covariance_type: str | Covariance, dtype: torch.dtype) -> Stats:
    """:class:`Stats` (in ``dtype``, ``log_lik`` 0) of univariate cells from their float64 sums
    ``moments (*B, K, 3)`` = ``(sum w, sum w x, sum w x^2)``, about ``centers (*B, K, 1)``; the
    sum of squares is floored at 0 (a raw-moment expansion may round a tiny cell below it)."""
    cov = get_covariance(covariance_type)
    s0, s1, s2 = moments.unbind(-1)
    c = centers.squeeze(-1).to(torch.float64)
    centred = sum_sq_about(s0, s1, s2, c).clamp_min(0).to(dtype)
    return Stats(s0.to(dtype), (s1 - s0 * c).unsqueeze(-1).to(dtype), cov.univariate_scatter(centred),
                 torch.zeros(s0.shape[:-1], dtype=dtype, device=centers.device))


def partition_statistics(x: Tensor, w: Tensor, labels: Tensor, centers: Tensor, covariance_type: str | Covariance) -> Stats:
    """Statistics of a hard partition ``labels (*B, N)`` of ``x (*B, N, D)`` (weights ``w``),
    about ``centers (*B, K, D)``. Pure and fusable: no one-hot tensor is needed when compiled."""
    cov = get_covariance(covariance_type)
    ks = torch.arange(centers.shape[-2], device=labels.device).unsqueeze(-1)  # (K, 1)
    if x.shape[-1] == 1 and not torch.compiler.is_compiling():  # univariate, eager: moments, no (K, N) diff
        f64 = torch.float64  # raw moments shifted in float64: no cancellation
        resp = (labels.unsqueeze(-2) == ks).to(f64) * w.to(f64).unsqueeze(-2)  # (*B, K, N)
        xf = x.to(f64)
        feats = torch.cat([torch.ones_like(xf), xf, xf.square()], -1)  # (*B', N, 3)
        if x.dim() == labels.dim() + 1 >= 3 and x.shape[-3] == 1 and labels.shape[-2] > 1:  # restarts share the data
            lead = resp.shape[:-2]  # (*B, R)
            moments = product(resp.reshape(*lead[:-1], -1, resp.shape[-1]), feats.squeeze(-3)).view(*lead, -1, 3)
        else:
            moments = product(resp, feats)  # (*B, K, 3)
        return moment_statistics(moments, centers, cov, x.dtype)
    (k, d), n = centers.shape[-2:], x.shape[-2]
    if cov.matrix_scatter and d <= QUADRATIC_MAX_FEATURES and not torch.compiler.is_compiling():
        # eager full / tied: each point about its own cell's center (no cancellation), the sums of
        # [1, x - c, (x - c)(x - c)^T] per cell one product of the one-hot rows with their quadratic
        # features: no (K, N, D) difference (W2's partitions 2x faster)
        lead = labels.shape[:-1]
        m = lead.numel()
        onehot = (labels.unsqueeze(-2) == ks).to(x.dtype)  # (*B, K, N)
        own = torch.bmm(onehot.reshape(m, k, n).mT, centers.reshape(m, k, d))  # (M, N, D): each point's center
        feats = quadratic_features((x - own.view(*lead, n, d)).reshape(m, n, d).mT)  # (M, F, N)
        weighted = onehot.mul_(w.unsqueeze(-2)).reshape(m, k, n)
        nk, sum_diff, scatter = _quadratic_sums(torch.bmm(weighted, feats.mT).view(*lead, k, -1), d)
        return Stats(nk, sum_diff, scatter, torch.zeros(nk.shape[:-1], dtype=x.dtype, device=x.device))
    resp = (labels.unsqueeze(-2) == ks).to(x.dtype) * w.unsqueeze(-2)  # (*B, K, N)
    diff = x.unsqueeze(-3) - centers.unsqueeze(-2)  # (*B, K, N, D)
    return statistics(diff, resp, cov)


def point_chunks(n: int, chunk_size: Optional[int]) -> list[slice]:
    """``range(n)`` (the points) in chunks of ``chunk_size`` (one chunk if None)."""
    step = n if chunk_size is None or chunk_size >= n else chunk_size
    return [slice(start, start + step) for start in range(0, n, step)]


def chunked_sum(fn: Callable[..., Stats], x: Tensor, w: Tensor, chunk_size: Optional[int], *per_point: Tensor) -> Stats:
    """``fn(x_chunk, w_chunk, *per_point_chunks)`` summed over chunks of ``chunk_size`` points
    (all at once if None). ``x (..., N, D)``, ``w (..., N)``, ``per_point`` tensors ``(..., N)``."""
    if chunk_size is None or chunk_size >= x.shape[-2]:  # one chunk: the data themselves, no slices
        return fn(x, w, *per_point)
    total = None
    for part in point_chunks(x.shape[-2], chunk_size):
        stats = fn(x[..., part, :], w[..., part], *(t[..., part] for t in per_point))
        total = stats if total is None else total + stats
    return total


def params_from_responsibilities(
    x: Tensor,
    w: Tensor,
    resp: Tensor,
    covariance_type: str | Covariance,
    reg_covar: Tensor,
) -> tuple[GMMParams, Tensor]:
    """M-step from given responsibilities ``resp (*B, K, N)`` (unweighted), in two passes: means
    first, then the scatter about them. Used by initialization."""
    cov = get_covariance(covariance_type)
    wr = resp * w.unsqueeze(-2)  # (*B, K, N)
    nk = wr.sum(-1) + 10 * torch.finfo(wr.dtype).eps
    means = matmul(wr, x) / nk.unsqueeze(-1)  # (*B, K, D)
    diff = x.unsqueeze(-3) - means.unsqueeze(-2)  # (*B, K, N, D)
    return m_step(statistics(diff, wr, cov), means, cov, reg_covar)
