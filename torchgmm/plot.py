"""Pictures of fitted mixtures (matplotlib: ``pip install 'torchgmm[plot]'``).

``torchgmm.plot(model, X, series=..., kind="auto", ax=None)`` (the module is callable, and
``torchgmm.plot.plot`` is the same function) draws one series: a histogram (univariate data) or a
scatter of the first two features with the fitted mixture density and its weighted components,
collapsed components (``model.result_.degenerate_components``) marked in red; ``kind="time"``
draws the series over time coloured by its most likely component (``model.predict``). For a batch
with ``series=None`` it draws a grid of small multiples (the first 16 series) and, when the model
chose K per series (``n_components_``), the distribution of the chosen K. A fitted ``GaussianHMM``
is drawn over time: the series coloured by its Viterbi state, each regime (a run of one state)
shaded. It returns the
``matplotlib.figure.Figure``, made without pyplot (no window, no global state): save it with
``fig.savefig("fig.png")``, or pass ``ax=`` to draw into an axes of your own figure.
"""

from __future__ import annotations

import math
import sys
import types
from typing import Optional, Sequence

import numpy as np
import torch

from .hmm import regime_runs
from .io import full_covariances

__all__ = ["plot", "require_matplotlib", "PLOT_HINT"]

PLOT_HINT = "pip install 'torchgmm[plot]'"
KINDS = ("auto", "time")
_DEGENERATE = "#d62728"


def require_matplotlib():
    """Import matplotlib, or raise ImportError with the install hint."""
    try:
        import matplotlib.figure  # (the module the figures are built from)
    except ImportError:
        raise ImportError(f"torchgmm.plot needs matplotlib: {PLOT_HINT}") from None
    return matplotlib


def _as_numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


class _Batch:
    """The model's parameters and the data, flattened to ``B`` series, as numpy arrays."""

    def __init__(self, model, X, sample_weight, names):
        if not getattr(model, "is_fitted", False):
            raise ValueError("plot needs a fitted model (call fit first)")
        batch = tuple(model.batch_shape)
        k, d = model.means_.shape[-2:]
        self.b = int(np.prod(batch)) if batch else 1
        x = torch.as_tensor(X).detach()
        if x.dim() == len(batch) + 1 and d == 1:
            x = x.unsqueeze(-1)  # (*B, N) univariate
        if x.dim() == 2 and batch:
            x = x.expand(*batch, *x.shape)  # one dataset drawn against every series
        if x.dim() != len(batch) + 2 or tuple(x.shape[:-2]) != batch or x.shape[-1] != d:
            raise ValueError(f"X has shape {tuple(x.shape)}; expected (*B, N, D) = ({', '.join(map(str, batch))}"
                             f"{', ' if batch else ''}N, {d}) for this model")
        self.model_x = x
        self.x = _as_numpy(x).reshape(self.b, x.shape[-2], d)
        n = x.shape[-2]
        w = np.ones((*batch, n)) if sample_weight is None else _as_numpy(sample_weight)
        try:
            w = np.broadcast_to(w, (*batch, n)).reshape(self.b, n)
        except ValueError:
            raise ValueError(f"sample_weight has shape {w.shape}; expected {(*batch, n)}") from None
        self.w = np.where(np.isnan(self.x).any(-1), 0.0, w)
        self.x = np.nan_to_num(self.x)
        self.hmm = hasattr(model, "transmat_")  # a GaussianHMM: states over time, no mixture weights
        self.k = k
        self.weights = None if self.hmm else _as_numpy(model.weights_).reshape(self.b, k)
        self.means = _as_numpy(model.means_).reshape(self.b, k, d)
        self.cov = _as_numpy(full_covariances(model)).reshape(self.b, k, d, d)
        result = getattr(model, "result_", None)
        degenerate = getattr(result, "degenerate_components", None)
        self.degenerate = (degenerate.detach().cpu().numpy().reshape(self.b, k) if degenerate is not None
                           else np.zeros((self.b, k), dtype=bool))
        status = getattr(model, "status_", None)
        self.status = status.detach().cpu().numpy().reshape(self.b) if status is not None else None
        chosen = getattr(model, "n_components_", None)  # a chosen K is news only after a model selection
        selected = getattr(model, "criterion_", None) is not None
        self.chosen = chosen.detach().cpu().numpy().reshape(self.b) if selected and isinstance(chosen, torch.Tensor) else None
        self.names = [str(n) for n in names] if names is not None else None
        if self.names is not None and len(self.names) != self.b:
            raise ValueError(f"names has {len(self.names)} entries for {self.b} series")
        self.model = model
        self._labels = None

    def labels(self) -> np.ndarray:
        """``model.predict`` of every point ``(B, N)``; an HMM's Viterbi path over each series'
        points, which must come first (padding at the end: -1)."""
        if self._labels is None:
            x = torch.nan_to_num(self.model_x.to(self.model.loc.dtype))
            if self.hmm:
                lengths = torch.as_tensor((self.w > 0).sum(-1)).reshape(x.shape[:-2]).to(x.device)
                labels = self.model.predict(x, lengths)
            else:
                labels = self.model.predict(x)
            self._labels = labels.cpu().numpy().reshape(self.b, -1)
        return self._labels

    def title(self, i: int) -> str:
        from .result import FitStatus

        name = self.names[i] if self.names is not None else (f"series {i}" if self.b > 1 else "fit")
        parts = [str(name)]
        if self.chosen is not None:
            parts.append(f"K={int(self.chosen[i])}")
        if self.status is not None and int(self.status[i]) != FitStatus.OK:
            parts.append(FitStatus(int(self.status[i])).name)
        return ", ".join(parts)

    def index(self, series) -> int:
        if isinstance(series, str):
            if self.names is None or series not in self.names:
                raise ValueError(f"no series named {series!r}" + ("" if self.names else " (pass names=...)"))
            return self.names.index(series)
        i = int(series)
        if not -self.b <= i < self.b:
            raise IndexError(f"series {series} is out of range for {self.b} series")
        return i % self.b


def _normal_pdf(grid, mean, var):
    return np.exp(-0.5 * (grid - mean) ** 2 / var) / np.sqrt(2 * np.pi * var)


def _colors(k: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(j % 10) for j in range(k)]


def _draw_hist(ax, data: _Batch, i: int, bins) -> None:
    mask = data.w[i] > 0
    v, w = data.x[i, mask, 0], data.w[i, mask]
    live = np.flatnonzero(data.weights[i] > 0)
    colors = _colors(data.weights.shape[1])
    if len(v) == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    edges = np.histogram_bin_edges(v, bins=bins)  # numpy's rules ("auto") ignore weights
    heights, _, _ = ax.hist(v, bins=edges[: 201] if len(edges) > 201 else edges, weights=w, density=True, color="0.8", edgecolor="0.6", linewidth=0.5)
    lo, hi = float(v.min()), float(v.max())
    span = (hi - lo) or max(abs(lo), 1.0)
    grid = np.linspace(lo - 0.15 * span, hi + 0.15 * span, 800)
    means, var = data.means[i, :, 0], np.maximum(data.cov[i, :, 0, 0], 1e-300)
    grid = np.sort(np.concatenate([grid, means[live]]))
    top = float(np.max(heights)) if len(heights) else 1.0
    total = np.zeros_like(grid)
    for k in live:
        comp = data.weights[i, k] * _normal_pdf(grid, means[k], var[k])
        total += comp
        if data.degenerate[i, k]:
            ax.axvline(means[k], color=_DEGENERATE, linestyle=":", linewidth=2, zorder=4,
                       label=f"{k}: degenerate (w {data.weights[i, k]:.2f}, var {var[k]:.2g})")
            continue
        top = max(top, float(comp.max()))
        ax.plot(grid, comp, "--", color=colors[k], linewidth=1.6, zorder=3, label=f"{k}: w {data.weights[i, k]:.2f}")
    ax.plot(grid, total, color="black", linewidth=1.2, alpha=0.6, zorder=2, label="mixture")
    ax.set_ylim(0, 1.15 * top)  # a collapsed component's spike would flatten everything else
    for k in live[data.degenerate[i, live]]:
        ax.plot([means[k]], [1.1 * top], marker="x", color=_DEGENERATE, markersize=8, clip_on=False)
    ax.set_ylabel("density")


def _ellipse(ax, mean, cov, color, width, style, label):
    from matplotlib.patches import Ellipse

    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, 0.0)
    angle = math.degrees(math.atan2(vecs[1, -1], vecs[0, -1]))
    ax.add_patch(Ellipse(mean, 4 * math.sqrt(vals[-1]), 4 * math.sqrt(vals[0]), angle=angle, fill=False,
                         edgecolor=color, linewidth=width, linestyle=style, label=label))


def _draw_scatter(ax, data: _Batch, i: int) -> None:
    mask = data.w[i] > 0
    pts = data.x[i, mask][:, :2]
    live = np.flatnonzero(data.weights[i] > 0)
    colors = _colors(data.weights.shape[1])
    means, cov = data.means[i, :, :2], data.cov[i, :, :2, :2]
    ax.scatter(pts[:, 0], pts[:, 1], s=6, color="0.55", alpha=0.6, linewidths=0)
    if len(pts):
        lo, hi = pts.min(0), pts.max(0)
        span = np.where(hi - lo > 0, hi - lo, 1.0)
        gx, gy = np.meshgrid(np.linspace(lo[0] - 0.1 * span[0], hi[0] + 0.1 * span[0], 150),
                             np.linspace(lo[1] - 0.1 * span[1], hi[1] + 0.1 * span[1], 150))
        grid = np.stack([gx.ravel(), gy.ravel()], -1)
        dens = np.zeros(len(grid))
        for k in live:
            if data.degenerate[i, k]:
                continue  # its spike would take every contour level
            c = cov[k] + 1e-12 * np.eye(2)
            diff = grid - means[k]
            maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(c), diff)
            dens += data.weights[i, k] * np.exp(-0.5 * maha) / (2 * np.pi * math.sqrt(max(np.linalg.det(c), 1e-300)))
        if dens.max() > 0:
            ax.contour(gx, gy, dens.reshape(gx.shape), levels=8, cmap="viridis", linewidths=0.8)
    for k in live:
        w = float(data.weights[i, k])
        if data.degenerate[i, k]:
            _ellipse(ax, means[k], cov[k], _DEGENERATE, 1.5, "--", f"{k}: degenerate (w {w:.2f})")
            ax.plot(*means[k], marker="x", color=_DEGENERATE, markersize=9, markeredgewidth=2)
        else:
            _ellipse(ax, means[k], cov[k], colors[k], 0.8 + 3 * w, "-", f"{k}: w {w:.2f}")
            ax.plot(*means[k], marker="+", color=colors[k], markersize=6 + 10 * w, markeredgewidth=2)
    names = ("x0", "x1")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])


def _draw_time(ax, data: _Batch, i: int) -> None:
    mask = data.w[i] > 0
    t = np.flatnonzero(mask)
    y = data.x[i, mask, 0]
    labels = data.labels()[i, mask]
    colors = _colors(data.k)
    ax.plot(t, y, color="0.75", linewidth=0.8, zorder=1)
    if data.hmm:  # each regime (a run of one state) shaded in its state's colour
        for state, first, last in regime_runs(labels.tolist()):
            ax.axvspan(t[first] - 0.5, t[last] + 0.5, color=colors[state], alpha=0.12, linewidth=0, zorder=0)
    for k in np.unique(labels):
        sel = labels == k
        color = _DEGENERATE if data.degenerate[i, k] else colors[k]
        tag = "degenerate" if data.degenerate[i, k] else f"mean {data.means[i, k, 0]:.3g}"
        ax.scatter(t[sel], y[sel], s=12, color=color, zorder=2, label=f"{'state ' if data.hmm else ''}{k}: {tag}",
                   marker="x" if data.degenerate[i, k] else "o")
    ax.set_xlabel("index")
    ax.set_ylabel("value" if data.x.shape[-1] == 1 else "feature 0")


def _draw(ax, data: _Batch, i: int, kind: str, bins, legend: bool) -> None:
    if kind == "time":
        _draw_time(ax, data, i)
    elif data.x.shape[-1] == 1:
        _draw_hist(ax, data, i, bins)
    else:
        _draw_scatter(ax, data, i)
    ax.set_title(data.title(i), fontsize="medium" if legend else "small")
    if legend:
        ax.legend(fontsize="small", frameon=False)
    else:
        ax.tick_params(labelsize="x-small")
        ax.set_xlabel("")
        ax.set_ylabel("")


def plot(model, X, series=None, kind: str = "auto", ax=None, *, sample_weight=None,
         names: Optional[Sequence[str]] = None, max_series: int = 16, bins="auto"):
    """Draw a fitted ``GaussianMixture`` with its data; returns the matplotlib Figure.

    ``X`` is the data the model was fitted on, ``(*B, N, D)`` (or ``(*B, N)`` univariate;
    ``sample_weight (*B, N)`` marks padding with 0). ``series`` picks one series of the batch (an
    index, or a name from ``names``); ``None`` draws the only series, or for a batch a grid of the
    first ``max_series`` series plus, when the model chose K per series, a bar chart of the
    chosen K. ``kind``: ``"auto"`` (histogram with the density and its weighted components for
    univariate data, a scatter of features 0 and 1 with density contours and 2-sigma ellipses
    otherwise) or ``"time"`` (the series by index, coloured by ``model.predict``; a
    ``GaussianHMM`` is always drawn so, with its regimes shaded). Collapsed
    components are drawn in red (dotted line / dashed ellipse, an x at the mean). ``ax`` draws
    one series into an existing axes.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    data = _Batch(model, X, sample_weight, names)
    kind = "time" if data.hmm else kind  # a hidden Markov model is about time
    if series is None and data.b == 1:
        series = 0
    if series is not None:
        i = data.index(series)
        if ax is None:
            fig = Figure(figsize=(8, 3.2) if kind == "time" else (6.4, 4.2), layout="constrained")
            ax = fig.add_subplot()
        _draw(ax, data, i, kind, bins, legend=True)
        return ax.figure
    if ax is not None:
        raise ValueError("series=None draws a grid of series into a new figure; pass series=... to draw into ax")
    n = min(data.b, max_series)
    panels = n + (data.chosen is not None)
    ncols = min(4, math.ceil(math.sqrt(panels)))
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i in range(n):
        _draw(axes[i], data, i, kind, bins, legend=False)
    if data.chosen is not None:
        ks, counts = np.unique(data.chosen, return_counts=True)
        bar = axes[n]
        bar.bar(ks, counts, color="tab:blue")
        bar.set_xticks(ks)
        bar.set_title(f"chosen K ({data.b} series)", fontsize="small")
        bar.tick_params(labelsize="x-small")
    for extra in axes[panels:]:
        extra.set_visible(False)
    shown = f"the first {n} of {data.b} series" if n < data.b else f"{data.b} series"
    what = "by state, regimes shaded" if data.hmm else "by component" if kind == "time" else "data and fitted mixture"
    fig.suptitle(f"{shown}: {what}", fontsize="medium")
    return fig


class _CallableModule(types.ModuleType):
    """``torchgmm.plot(...)`` calls :func:`plot` whether ``torchgmm.plot`` was reached as an
    attribute or imported as a module (importing a submodule rebinds the package attribute)."""

    def __call__(self, *args, **kwargs):
        return plot(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
