"""EM against gradient-based maximum likelihood on a suite of synthetic series.

Every method starts from the same initialization (by default random data points as seeds, one
Lloyd assignment: a rough start; `--init kmeans` for fit's default) and optimizes the same penalized
log-likelihood (see docs/gradient.md). Two families of 2-D, 3-component series: well separated
and overlapping. Prints a table per family, the figures quoted in docs/gradient.md, and writes a
figure (log10 gap to the best value found, against data passes and against time; median with
quartile bands) to ``--out`` (default ``em_vs_gradient.png`` in the current directory; the copy in
docs/ is regenerated only when asked for: ``--out docs/em_vs_gradient.png``).

    pip install 'torchgmm[plot]'   # matplotlib
    python examples/em_vs_gradient.py [--series 100] [--points 300] [--init random_from_data] [--out FILE.png]

The run time on the 2-core CPU is in docs/gradient.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchgmm.compare import compare  # noqa: E402

METHODS = ("em", "squarem", "lbfgs", "adam")
COLORS = {"em": "tab:blue", "squarem": "tab:cyan", "lbfgs": "tab:red", "adam": "tab:orange"}


def synthetic(n_series: int, n: int, spread: float, seed: int, d: int = 2, k: int = 3) -> torch.Tensor:
    """``(B, n, d)``: ``k`` Gaussian clusters per series, random orientations and elongations,
    centres ~ N(0, spread^2 I) (spread 6: well separated; 1.5: overlapping)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_series, n, d))
    for b in range(n_series):
        centres = rng.normal(0.0, spread, (k, d))
        weights = rng.dirichlet(np.full(k, 4.0))
        labels = rng.choice(k, n, p=weights)
        for j in range(k):
            q, _ = np.linalg.qr(rng.normal(size=(d, d)))
            a = q * rng.uniform(0.4, 1.3, d)
            idx = labels == j
            out[b, idx] = centres[j] + rng.normal(size=(idx.sum(), d)) @ a.T
    return torch.tensor(out)


def ratio_median(rows, method, base, key):
    """Median over series of ``method``'s ``key`` divided by ``base``'s (series both reached)."""
    by = {(r["series"], r["method"]): r for r in rows}
    ratios = []
    for (series, m), r in by.items():
        if m != method:
            continue
        a, b = r[key], by[(series, base)][key]
        if math.isfinite(a) and math.isfinite(b) and b > 0:
            ratios.append(a / b)
    return float(np.median(ratios)) if ratios else math.nan


def report(name, comp, stop):
    rows = comp.rows
    print(f"\n## {name}: {len(rows) // len(comp.methods)} series\n")
    print(comp.to_markdown())
    by = {(r["series"], r["method"]): r for r in rows}
    series = sorted({r["series"] for r in rows})
    # gradient mode vs EM's optimum, from the same start
    for m in ("lbfgs", "adam", "squarem"):
        diff = np.array([by[(s, m)]["final"] - by[(s, "em")]["final"] for s in series])
        print(f"{m}: reaches EM's optimum (F_em - F <= 1e-6) on {int((diff >= -1e-6).sum())}/{len(series)} series "
              f"(same optimum {int((abs(diff) <= 1e-6).sum())}, better {int((diff > 1e-6).sum())}, worse {int((diff < -1e-6).sum())}); "
              f"median ratio to EM: passes to 1e-6 {ratio_median(rows, m, 'em', 'passes_to_1e-06'):.2f}, "
              f"time to 1e-6 {ratio_median(rows, m, 'em', 'time_to_1e-06'):.2f}, "
              f"passes to 1e-3 {ratio_median(rows, m, 'em', 'passes_to_1e-03'):.2f}; "
              f"wall time of the batch {comp.wall_time[m] / comp.wall_time['em']:.2f}x EM's")
    # E-steps: SQUAREM vs EM, to the same accuracy (series both reached) and to their own stopping rule
    for g in comp.gaps:
        key = f"passes_to_{g:.0e}"
        both = [s for s in series if math.isfinite(by[(s, "em")][key]) and math.isfinite(by[(s, "squarem")][key])]
        parts = []
        for m in ("em", "squarem"):
            vals = np.array([by[(s, m)][key] for s in both])
            parts.append(f"{m} median {np.median(vals):.0f}, p90 {np.percentile(vals, 90):.0f}")
        print(f"E-steps to gap {g:.0e} ({len(both)} series both reached): " + "; ".join(parts))
    for m in ("em", "squarem"):
        n_iter = np.array([r["n_iter"] for r in stop.rows if r["method"] == m])
        print(f"E-steps until |dF| < {STOP_TOL:g}, {m}: median {np.median(n_iter):.0f}, p90 {np.percentile(n_iter, 90):.0f}")


def band(ax, x, gaps, label, color):
    logs = torch.log10(gaps)
    q = torch.quantile(logs, torch.tensor([0.25, 0.5, 0.75], dtype=logs.dtype), dim=0)
    ax.plot(x, q[1], color=color, label=label)
    ax.fill_between(x, q[0], q[2], color=color, alpha=0.2, linewidth=0)


STOP_TOL = 1e-6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=100, help="series per family")
    parser.add_argument("--points", type=int, default=300)
    parser.add_argument("--max-iter", type=int, default=600)
    parser.add_argument("--init", default="random_from_data", help="init_params shared by every method")
    parser.add_argument("--out", default="em_vs_gradient.png", help="where to write the figure (default: %(default)s)")
    args = parser.parse_args()
    try:  # before any work: the figure is the point of the run
        import matplotlib
    except ImportError:
        sys.exit("examples/em_vs_gradient.py needs matplotlib: pip install 'torchgmm[plot]'")
    torch.set_num_threads(1)  # small batches: one thread is faster and steadier on a shared machine

    families = {"overlapping": 1.5, "well separated": 6.0}
    results = {}
    t0 = time.perf_counter()
    for i, (name, spread) in enumerate(families.items()):
        x = synthetic(args.series, args.points, spread, seed=10 + i)
        comp = compare(x, 3, METHODS, covariance_type="full", init_params=args.init, tol=1e-10, max_iter=args.max_iter)
        stop = compare(x, 3, ("em", "squarem"), covariance_type="full", init_params=args.init, tol=STOP_TOL, max_iter=args.max_iter)
        results[name] = comp
        report(name, comp, stop)
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4.2 * len(results)), squeeze=False)
    for row, (name, comp) in enumerate(results.items()):
        max_pass = max(float(torch.nan_to_num(c[1], nan=0).max()) for c in comp.curves.values())
        max_time = max(float(torch.nan_to_num(c[2], nan=0).max()) for c in comp.curves.values())
        pass_grid = torch.unique(torch.logspace(0, math.log10(max_pass), 200).round())
        time_grid = torch.linspace(0, max_time, 200, dtype=torch.float64)
        for method in comp.methods:
            band(axes[row, 0], pass_grid, comp.gap_curve(method, pass_grid, "passes"), method, COLORS[method])
            band(axes[row, 1], time_grid, comp.gap_curve(method, time_grid, "time"), method, COLORS[method])
        axes[row, 0].set_xscale("log")
        axes[row, 0].set_xlabel("data passes (E-steps / value+gradient evaluations)")
        axes[row, 1].set_xlabel("wall time of the batch [s]")
        for ax in axes[row]:
            ax.set_ylabel("log10 gap to best found")
            ax.set_ylim(-16.5, 1)
            ax.axhline(-6, color="grey", lw=0.6, ls=":")
            ax.axhline(-3, color="grey", lw=0.6, ls=":")
            ax.set_title(f"{name} ({len(comp.best)} series): median, quartiles")
            ax.legend(loc="upper right")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
