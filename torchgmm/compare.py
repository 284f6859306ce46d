"""EM against gradient-based optimizers, from the same start, on the same data and objective.

:func:`compare` builds one initialization (``torchgmm.fit(..., max_iter=0)``: the k-means start
that ``fit`` would use), then runs every method on the same standardized data and the shared
penalized objective ``F`` of :mod:`torchgmm.objective` (EM and SQUAREM with the exact EM map of
``F``; L-BFGS and Adam on ``F`` itself), and measures per series: the final objective, the gap to
the best value any method found, and the data passes (density evaluations: E-steps, or value and
gradient evaluations with line-search trials) and wall time each method needed to come within
given gaps of that best value.

Objective values are in the data's units (mean log-likelihood per point, as ``lower_bound_``);
gaps are differences. Times are those of the whole batch (every method fits all series at once), so they compare
methods, not series. Pure bookkeeping on top of the runners; no plotting here (see
``examples/em_vs_gradient.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from .covariance import get_covariance
from .fitting import fit, prepare
from .loop import Members, run_members
from .methods import EM, SQUAREM, Gradient
from .objective import objective
from .units import Scaling, standardize

__all__ = ["compare", "Comparison", "METHODS"]

METHODS = ("em", "squarem", "lbfgs", "adam")
# Methods whose returned parameters are one (unevaluated) EM step past their last history entry.
_EM_LIKE = ("em", "squarem")


def _gap_key(kind: str, gap: float) -> str:
    return f"{kind}_to_{gap:.0e}"


@dataclass
class Comparison:
    """Outcome of :func:`compare`.

    ``rows``: one dict per (series, method) with ``series``, ``method``, ``final`` (objective of
    the returned parameters), ``gap`` (best found minus final), ``n_iter``, ``converged``,
    ``failed``, and for each target gap ``g`` ``passes_to_<g>`` / ``time_to_<g>`` (NaN when never
    reached). ``curves[method]`` holds the raw ``(values (B, T), passes (B, T), times (B, T))`` of
    every evaluated point (initial and final included), ``best (B,)`` the best value per series.
    """

    methods: tuple
    gaps: tuple
    rows: list
    curves: dict
    best: Tensor
    wall_time: dict = field(default_factory=dict)

    def gap_curve(self, method: str, grid: Tensor, axis: str = "passes", floor: float = 1e-16) -> Tensor:
        """``(B, G)``: per series, ``best - F`` of the last point reached within each ``grid``
        value of data passes (``axis="passes"``) or seconds (``"time"``); ``floor`` clips zero
        gaps for log plots. Before the first point, the initial gap."""
        if method not in self.curves:
            raise ValueError(f"method={method!r} was not compared; choose one of {list(self.curves)}")
        if axis not in ("passes", "time"):
            raise ValueError(f"axis={axis!r} is not supported; choose 'passes' or 'time'")
        grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)  # a list or an array is fine
        values, passes, times = self.curves[method]
        where = passes if axis == "passes" else times
        gap = (self.best.unsqueeze(-1) - values).clamp_min(floor)  # (B, T)
        ok = torch.isfinite(where) & torch.isfinite(gap)
        pos = torch.where(ok, where, torch.inf)
        # index of the last point with position <= grid value
        reached = pos.unsqueeze(-1) <= grid.to(pos.dtype)  # (B, T, G)
        t_idx = torch.arange(values.shape[-1]).reshape(1, -1, 1)
        last = torch.where(reached, t_idx, -1).amax(1)  # (B, G)
        first = gap[:, :1].expand(-1, grid.numel())
        picked = torch.gather(gap, 1, last.clamp_min(0))
        return torch.where(last >= 0, picked, first)

    def summary(self) -> list:
        """One dict per method: medians over series (and the 90th percentile of passes)."""
        out = []
        for method in self.methods:
            rows = [r for r in self.rows if r["method"] == method]
            gaps = torch.tensor([r["gap"] for r in rows], dtype=torch.float64)
            entry = {
                "method": method,
                "series": len(rows),
                "median_final": _median([r["final"] for r in rows]),
                "median_gap": _median(gaps.tolist()),
                "failures": sum(bool(r["failed"]) for r in rows),
                "wall_time_s": self.wall_time.get(method, math.nan),
            }
            for g in self.gaps:
                passes = [r[_gap_key("passes", g)] for r in rows]
                times = [r[_gap_key("time", g)] for r in rows]
                entry[f"reached_{g:.0e}"] = sum(math.isfinite(p) for p in passes) / max(len(rows), 1)
                entry[f"median_passes_{g:.0e}"] = _median(passes)
                entry[f"p90_passes_{g:.0e}"] = _quantile(passes, 0.9)
                entry[f"median_time_{g:.0e}"] = _median(times)
            out.append(entry)
        return out

    def to_markdown(self) -> str:
        """The summary as a markdown table (passes and times over the series that reached)."""
        summary = self.summary()
        cols = ["method", "series", "failures", "median_gap"]
        for g in self.gaps:
            cols += [f"reached_{g:.0e}", f"median_passes_{g:.0e}", f"p90_passes_{g:.0e}", f"median_time_{g:.0e}"]
        cols.append("wall_time_s")
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for entry in summary:
            lines.append("| " + " | ".join(_fmt(entry[c]) for c in cols) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _fmt(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}"


def _finite(values) -> list:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _median(values) -> float:
    vals = _finite(values)
    return float(torch.tensor(vals, dtype=torch.float64).median()) if vals else math.nan


def _quantile(values, q: float) -> float:
    vals = _finite(values)
    return float(torch.tensor(vals, dtype=torch.float64).quantile(q)) if vals else math.nan


def _method(name: str, lr: Optional[float]):
    """The method object each compared name runs: EM and SQUAREM on the exact EM map of ``F``."""
    return {"em": EM(penalized=True), "squarem": SQUAREM(penalized=True)}.get(name) or Gradient(name, lr)


def compare(
    X,
    n_components: int,
    methods: Sequence[str] = METHODS,
    *,
    covariance_type: str = "full",
    reg_covar: float = 1e-6,
    init_params: str = "kmeans",
    random_state=0,
    tol: float = 1e-10,
    max_iter: int = 1000,
    max_iter_adam: Optional[int] = None,
    lr: Optional[float] = None,
    gaps: Sequence[float] = (1e-3, 1e-6),
    dtype: Optional[torch.dtype] = torch.float64,
    device=None,
    chunk_size: Optional[int] = None,
    sample_weight=None,
    n_init: int = 1,
) -> Comparison:
    """Run ``methods`` (any of ``"em"``, ``"squarem"``, ``"lbfgs"``, ``"adam"``) on every series of
    ``X`` (``(N, D)`` or ``(B, N, D)``) from one shared initialization; see :class:`Comparison`.

    ``tol`` and ``max_iter`` apply to every method (``max_iter`` counts iterations: E-steps for
    EM and SQUAREM, steps for L-BFGS and Adam; ``max_iter_adam`` overrides it for Adam); the
    small default ``tol`` lets each method run close to its optimum so that the passes needed
    for each target gap can be read off its history. ``lr`` is passed to the gradient methods.
    ``sample_weight (*B, N)`` weighs the points (0 = padding), as in ``fit``. ``n_init``: the
    shared start is the best of that many initializations (by its log-likelihood), the one
    ``fit(..., max_iter=0, n_init=n_init)`` returns; every method starts from it.
    """
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not supported; choose from {list(METHODS)}")
    cov = get_covariance(covariance_type)
    start_fit = fit(X, n_components, covariance_type=cov.name, reg_covar=reg_covar, max_iter=0, n_init=n_init,
                    init_params=init_params, random_state=random_state, sample_weight=sample_weight,
                    dtype=dtype, device=device, warn=False)
    data = prepare(X, sample_weight, n_components, "raise", dtype, device)
    n_series, d = data.x.shape[0], data.x.shape[-1]
    xs, shift, scale, reg = standardize(data.x, data.w, reg_covar)
    scaling, w = Scaling(shift, scale), data.w
    start = start_fit.params.map(lambda t: t.reshape(n_series, *t.shape[len(start_fit.batch_shape):]))
    init = scaling.to_standard(start, cov).map(lambda t: t.unsqueeze(1))  # (B, 1, ...)
    members = Members(xs, w, reg)

    runs, finals, wall = {}, {}, {}
    for method in methods:
        iters = max_iter_adam if (method == "adam" and max_iter_adam is not None) else max_iter
        rule = _method(method, lr).rule(cov, tol, chunk_size=chunk_size)
        t0 = time.perf_counter()
        with torch.no_grad():
            run = run_members(members, init, rule, tol, iters)
        wall[method] = time.perf_counter() - t0
        with torch.no_grad():
            final = objective(xs, w, run.params, cov, reg, chunk_size=chunk_size)
        runs[method], finals[method] = run, scaling.log_lik_to_data(final, d).to("cpu", torch.float64)

    with torch.no_grad():
        f_init = scaling.log_lik_to_data(objective(xs, w, init.map(lambda t: t[:, 0]), cov, reg, chunk_size=chunk_size), d)  # (B,)
    curves = {}
    for method, run in runs.items():
        hist = scaling.log_lik_to_data(run.history.detach(), d).to("cpu", torch.float64)
        passes = run.passes.to("cpu", torch.float64)
        times = run.elapsed.to(torch.float64).unsqueeze(0).expand_as(hist)
        times = torch.where(torch.isfinite(hist), times, torch.nan)
        zeros = torch.zeros(n_series, 1, dtype=torch.float64)  # (also: max_iter=0 leaves no history)
        last_pass = torch.cat([zeros, torch.nan_to_num(passes, nan=0.0)], -1).amax(-1)
        last_time = torch.cat([zeros, torch.nan_to_num(times, nan=0.0)], -1).amax(-1)
        extra = 1.0 if method in _EM_LIKE else 0.0
        values = torch.cat([f_init.to("cpu", torch.float64).unsqueeze(-1), hist, finals[method].to("cpu", torch.float64).unsqueeze(-1)], -1)
        passes = torch.cat([zeros + 1.0, passes, (last_pass + extra).unsqueeze(-1)], -1)
        times = torch.cat([zeros, times, last_time.unsqueeze(-1)], -1)
        curves[method] = (values, passes, times)

    best = torch.stack([torch.nan_to_num(c[0], nan=-torch.inf).amax(-1) for c in curves.values()]).amax(0)  # (B,)
    rows = []
    for method in methods:
        run = runs[method]
        values, passes, times = curves[method]
        gap_t = best.unsqueeze(-1) - values  # (B, T)
        for b in range(n_series):
            row = {
                "series": b,
                "method": method,
                "final": float(finals[method][b]),
                "gap": float(best[b] - finals[method][b]),
                "n_iter": int(run.n_iter[b]),
                "converged": bool(run.converged[b]),
                "failed": bool(run.failed[b]),
            }
            for g in gaps:
                hit = (gap_t[b] <= g) & torch.isfinite(values[b])
                j = int(hit.nonzero()[0]) if bool(hit.any()) else -1
                row[_gap_key("passes", g)] = float(passes[b, j]) if j >= 0 else math.nan
                row[_gap_key("time", g)] = float(times[b, j]) if j >= 0 else math.nan
            rows.append(row)
    return Comparison(tuple(methods), tuple(gaps), rows, curves, best, wall)
