"""Restart diversity: how many different starts the restarts give, and what more restarts buy.

For a few datasets of the quality suite (benchmarks/quality.py; full covariance), for n_init = 1..30:

- left panel: the number of distinct starting partitions among the restarts (each start's hard
  assignment, labels canonicalized by first appearance), for torchgmm's default ``kmeans`` start
  (restart 0 k-means++ + up to 5 Lloyd steps, restarts 1.. the diverse recipes of
  ``torchgmm.init.DIVERSE_RECIPES``), the start before issue 14 (every restart k-means++ seeds + 5
  Lloyd steps: ``torchgmm.init._start(..., "kmeans")``; ``init_params=["kmeans"]`` is the default
  again, a one-name list collapses to the name) and scikit-learn's (``KMeans(n_init=1)`` labels per
  restart, from one ``RandomState(0)`` as its ``GaussianMixture(n_init=...)`` draws them);
- right panel: the shortfall per point of the best clean log-likelihood reached with ``n_init``
  restarts (tol 1e-6, max_iter 1000) from the best any of them reached, for the same three and for
  the default followed by ``torchgmm.refine.refine``.

Each torchgmm point is its own fit with that ``n_init`` (``random_state=0``); scikit-learn's restarts
of ``n_init=n`` are the first ``n`` of ``n_init=30`` (one RandomState consumed in order), so its
curve is the running best of 30 single restarts.

    python benchmarks/diversity.py                                 # figure to /tmp/restart_diversity.png
    python benchmarks/diversity.py --out docs/restart_diversity.png --json /tmp/diversity.json
    python benchmarks/diversity.py --replot /tmp/diversity.json --out /tmp/d.png  # redraw only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_K = {"iris": 5, "wine": 3, "overlap": 5, "univariate": 5}
TOL, MAX_ITER, REG, SEED = 1e-6, 1000, 1e-6, 0
METHODS = ("default", "before", "sklearn", "default+refine")


def _canonical(labels: np.ndarray) -> tuple:
    """A partition's labels renamed by order of first appearance (``(N,)`` -> hashable)."""
    _, first = np.unique(labels, return_index=True)
    rename = {lab: i for i, lab in enumerate(labels[np.sort(first)])}
    return tuple(rename[v] for v in labels)


def _old_start(xs, w, k, n_init, init_params, cov, reg, gen, **kw):
    """The start before issue 14: every restart k-means++ seeds + up to 5 Lloyd steps."""
    from torchgmm import init as tinit

    return tinit._start(xs, w, k, n_init, "kmeans", cov, reg, gen, **kw)


def start_partitions(x: np.ndarray, k: int, n_init: int, old: bool = False) -> list:
    """The hard assignments ``(N,)`` of torchgmm's ``n_init`` starting parameters."""
    import torch
    from torchgmm import init as tinit
    from torchgmm.density import joint_log_prob
    from torchgmm.units import standardize

    xt = torch.tensor(x).unsqueeze(0)
    w = torch.ones(xt.shape[:-1], dtype=xt.dtype)
    xs, _, _, reg = standardize(xt, w, REG)
    gen = tinit.make_generator(SEED)
    make = _old_start if old else tinit.initialize
    params, _ = make(xs, w, k, n_init, "kmeans", "full", reg, gen)
    labels = joint_log_prob(xs.unsqueeze(1), params, "full").argmax(-2)[0]  # (R, N)
    return [_canonical(lab.numpy()) for lab in labels]


def torchgmm_best(x: np.ndarray, k: int, n_init: int, old: bool = False, refine: bool = False) -> float:
    import torch
    import torchgmm
    import torchgmm.fitting as fitting

    current = fitting.initialize
    if old:
        fitting.initialize = _old_start
    try:
        xt = torch.tensor(x)
        r = torchgmm.fit(xt, k, n_init=n_init, random_state=SEED, tol=TOL, max_iter=MAX_ITER, reg_covar=REG, warn=False)
    finally:
        fitting.initialize = current
    lbs = np.where(r.restart_degenerate.numpy().ravel(), -np.inf, r.restart_lower_bounds.numpy().ravel())
    best = float(lbs.max())
    if refine:
        from torchgmm.refine import refine as refine_fit

        rr = refine_fit(xt, r, tol=TOL, max_iter=MAX_ITER, reg_covar=REG)
        if int(rr.status) < torchgmm.FitStatus.DEGENERATE:
            best = max(best, float(rr.lower_bound))
    return best


def sklearn_runs(x: np.ndarray, k: int, n: int) -> tuple[list, list]:
    """scikit-learn's first ``n`` restarts: their k-means partitions and clean lower bounds."""
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    from torchgmm.result import DEGENERATE_FACTOR

    parts, values = [], []
    rs_init, rs_fit = np.random.RandomState(SEED), np.random.RandomState(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            parts.append(_canonical(KMeans(k, n_init=1, random_state=rs_init).fit(x).labels_))
            gm = GaussianMixture(k, tol=TOL, max_iter=MAX_ITER, reg_covar=REG, random_state=rs_fit).fit(x)
            clean = min(np.linalg.eigvalsh(c).min() for c in gm.covariances_) > DEGENERATE_FACTOR * REG
            values.append(float(gm.score(x)) if clean else -np.inf)
    return parts, values


def measure(names, ks, max_n: int = 30, log=print) -> dict:
    from quality import datasets

    out = {}
    for name, x in datasets(names).items():
        k = ks.get(name, DEFAULT_K.get(name, 3))
        t = time.perf_counter()
        ns = list(range(1, max_n + 1))
        distinct = {
            "default": [len(set(start_partitions(x, k, n))) for n in ns],
            "before": [len(set(start_partitions(x, k, n, old=True))) for n in ns],
        }
        sk_parts, sk_values = sklearn_runs(x, k, max_n)
        distinct["sklearn"] = [len(set(sk_parts[:n])) for n in ns]
        best = {
            "default": [torchgmm_best(x, k, n) for n in ns],
            "before": [torchgmm_best(x, k, n, old=True) for n in ns],
            "sklearn": list(np.maximum.accumulate(sk_values)),
            "default+refine": [torchgmm_best(x, k, n, refine=True) for n in ns],
        }
        out[name] = {"k": k, "n": x.shape[0], "d": x.shape[1], "n_init": ns, "distinct": distinct, "best": best}
        top = max(max(v) for v in best.values())
        log(f"{name} (N={x.shape[0]}, D={x.shape[1]}, K={k}), {time.perf_counter() - t:.1f} s; best {top:.5f}")
        for m in METHODS:
            gap = [top - v for v in best[m]]
            dist = distinct.get(m)
            at = ", ".join(f"n={n}: {gap[n - 1]:.4f}" + (f" ({dist[n - 1]} starts)" if dist else "")
                           for n in (1, 5, 10, 20, 30) if n <= max_n)
            log(f"  {m:15s} {at}")
    return out


def draw(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"default": "-", "before": "--", "sklearn": ":", "default+refine": "-."}
    for i, (name, r) in enumerate(results.items()):
        c = colors[i % len(colors)]
        label = f"{name} K={r['k']}"
        for m, ls in styles.items():
            if m in r["distinct"]:
                left.plot(r["n_init"], r["distinct"][m], ls, color=c, label=f"{label}, {m}")
            top = max(max(v) for v in r["best"].values())
            gap = np.asarray([top - v for v in r["best"][m]])
            right.plot(r["n_init"], np.maximum(gap, 0.0), ls, color=c, label=f"{label}, {m}")
    n_max = max(max(r["n_init"]) for r in results.values())
    left.plot([1, n_max], [1, n_max], color="0.8", lw=0.8, zorder=0)
    left.set(xlabel="n_init", ylabel="distinct starting partitions", title="Different starts among the restarts (full)")
    right.set(xlabel="n_init", ylabel="shortfall from the best found (nats / point)", yscale="symlog",
              title="Best clean log-likelihood vs n_init")
    right.set_yscale("symlog", linthresh=1e-4)
    right.axhline(1e-4, color="0.6", lw=0.8)
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], label=f"{n} K={r['k']}") for i, (n, r) in enumerate(results.items())]
    handles += [plt.Line2D([], [], color="k", ls=ls, label=m) for m, ls in styles.items()]
    left.legend(handles=handles, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*", default=list(DEFAULT_K))
    p.add_argument("--k", nargs="*", default=[], help="overrides as name=K, e.g. iris=4")
    p.add_argument("--max-n-init", type=int, default=30)
    p.add_argument("--out", default="/tmp/restart_diversity.png")
    p.add_argument("--json", help="save the measurements here")
    p.add_argument("--replot", help="draw from the --json of an earlier run instead of measuring")
    a = p.parse_args(argv)
    if a.replot:
        draw(json.loads(Path(a.replot).read_text()), a.out)
        print(f"figure: {a.out}")
        return
    import torch

    torch.set_num_threads(1)
    ks = {s.split("=")[0]: int(s.split("=")[1]) for s in a.k}
    results = measure(a.datasets, ks, a.max_n_init, log=lambda s: print(s, flush=True))
    draw(results, a.out)
    print(f"figure: {a.out}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
