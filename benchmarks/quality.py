"""Quality of the optimum found: torchgmm's best log-likelihood against scikit-learn's and R's mclust.

For every dataset, covariance type and K = 1..5: the best mean log-likelihood per point (data units)
that each contender reaches, and its time::

    python benchmarks/quality.py                       # the whole table, markdown on stdout
    python benchmarks/quality.py --datasets iris wine --types full --ks 3
    python benchmarks/quality.py --no-mclust --json /tmp/quality.json
    python benchmarks/quality.py --contenders torchgmm torchgmm-refine torchgmm-n20 torchgmm-n30 \
        --no-mclust --recorded docs/quality.md       # best also over the table recorded there

Contenders (each fitted to convergence, tol=1e-6, max_iter=1000, so that the table compares the
optima the starts lead to, not how early EM stops):

- ``torchgmm``: default settings (``init_params="kmeans"``), ``n_init=10``;
- ``torchgmm-hc``: ``init_params="hierarchical"`` (mclust-style start + diverse restarts), ``n_init=10``;
- ``torchgmm-mix``: ``init_params=["kmeans", "k-means++", "random_from_data"]``, ``n_init=10``;
- ``torchgmm-refine``: the default with ``n_init=10``, then ``torchgmm.refine.refine`` (merge or
  delete one component, split another, refit; kept when the log-likelihood rises);
- ``torchgmm-n20``, ``torchgmm-n30`` (only with ``--contenders``): the default with ``n_init=20``
  / ``30``, the equal-time comparison for the refinement;
- ``sklearn``: ``sklearn.mixture.GaussianMixture``, ``n_init=10``, k-means start;
- ``mclust``: R's ``Mclust`` (its hierarchical start, EM to convergence), when ``Rscript`` with the
  mclust package is available (``apt-get install -y r-cran-mclust``); skipped otherwise.

``best`` is the highest value any of them reaches among their *clean* fits (no component whose
smallest variance is within 10x reg_covar, the rule torchgmm uses to refuse collapsed optima), and a
contender "reaches" the best when it is within 1e-4 per point of it.

Data: scikit-learn's bundled iris (150 x 4), wine (178 x 13), breast cancer (569 x 30), digits
reduced to its first 8 principal components (1797 x 8: 64 raw pixels include constant ones, on
which every fit collapses), and synthetic hard cases made here with a fixed seed (overlapping
components, weights down to 2%, uniform outliers, a univariate 5-component mixture with a 2%
component).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COV_TYPES = ("full", "tied", "diag", "spherical")
MCLUST_MODEL = {"full": "VVV", "tied": "EEE", "diag": "VVI", "spherical": "VII"}
TOL, MAX_ITER, N_INIT, REG = 1e-6, 1000, 10, 1e-6
MATCH = 1e-4  # per point


# -- data ------------------------------------------------------------------------------------------
def _overlap(rng):
    means = np.array([[0.0, 0.0], [1.5, 0.5], [0.5, 1.8]])
    covs = [np.array([[1.0, 0.5], [0.5, 1.0]]), np.array([[0.6, -0.2], [-0.2, 0.8]]), np.eye(2) * 0.7]
    sizes = [250, 200, 150]
    return np.concatenate([rng.multivariate_normal(m, c, s) for m, c, s in zip(means, covs, sizes)])


def _small_weights(rng):
    means = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [3.0, 3.0]])
    sizes = [500, 300, 180, 20]  # 2%
    return np.concatenate([rng.multivariate_normal(m, np.eye(2) * s, n)
                           for m, s, n in zip(means, [1.0, 0.8, 0.6, 0.1], sizes)])


def _outliers(rng):
    means = np.array([[0.0, 0.0], [5.0, 1.0], [2.0, 5.0]])
    core = np.concatenate([rng.multivariate_normal(m, np.eye(2), 190) for m in means])
    return np.concatenate([core, rng.uniform(-15, 20, (30, 2))])  # 5% uniform outliers


def _univariate(rng):
    means, sds = [0.0, 3.0, 6.0, 10.0, 14.0], [1.0, 0.6, 1.2, 0.5, 0.3]
    sizes = [400, 250, 200, 130, 20]  # 2%
    return np.concatenate([rng.normal(m, s, n) for m, s, n in zip(means, sds, sizes)])[:, None]


def datasets(names=None) -> dict:
    """``{name: (N, D) float64 array}``: the public and synthetic suite."""
    from sklearn import datasets as skd
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(2024)
    make = {
        "iris": lambda: skd.load_iris().data,
        "wine": lambda: skd.load_wine().data,
        "breast_cancer": lambda: skd.load_breast_cancer().data,
        "digits_pca8": lambda: PCA(8, random_state=0).fit_transform(skd.load_digits().data),
        "overlap": lambda: _overlap(rng),
        "small_weights": lambda: _small_weights(rng),
        "outliers": lambda: _outliers(rng),
        "univariate": lambda: _univariate(rng),
    }
    out = {}
    for name, fn in make.items():  # every maker runs, in order, so the synthetic draws never depend on the selection
        x = np.asarray(fn(), dtype=np.float64)
        if names is None or name in names:
            out[name] = x
    return out


def _zscore(x):
    return (x - x.mean(0)) / x.std(0)


# breast cancer's 30 features span 7 orders of magnitude of variance: its smallest variances sit within
# 10x reg_covar, so every fit of every library would be "collapsed"; the table uses its z-scores.
PREPROCESS = {"breast_cancer": _zscore}


# -- contenders ------------------------------------------------------------------------------------
def _clean_best(result) -> float:
    lbs, deg = result.restart_lower_bounds.numpy().ravel(), result.restart_degenerate.numpy().ravel()
    lbs = np.where(deg, -np.inf, lbs)
    return float(lbs.max())


def run_torchgmm(x, k, cov, init_params="kmeans", seed=0, n_init=N_INIT):
    import torch
    import torchgmm

    t = time.perf_counter()
    r = torchgmm.fit(torch.tensor(x), k, covariance_type=cov, n_init=n_init, init_params=init_params, random_state=seed,
                     tol=TOL, max_iter=MAX_ITER, reg_covar=REG, warn=False)
    return _clean_best(r), time.perf_counter() - t


def run_refine(x, k, cov, seed=0):
    """The default fit (``n_init=10``) then :func:`torchgmm.refine.refine` with the same settings;
    the best clean value of the restarts and of the refined fit."""
    import torch
    import torchgmm
    from torchgmm.refine import refine

    t = time.perf_counter()
    xt = torch.tensor(x)
    r = torchgmm.fit(xt, k, covariance_type=cov, n_init=N_INIT, random_state=seed, tol=TOL, max_iter=MAX_ITER,
                     reg_covar=REG, warn=False)
    rr = refine(xt, r, tol=TOL, max_iter=MAX_ITER, reg_covar=REG)
    refined = float(rr.lower_bound) if int(rr.status) < torchgmm.FitStatus.DEGENERATE else -np.inf
    return max(_clean_best(r), refined), time.perf_counter() - t


def run_sklearn(x, k, cov, seed=0):
    import warnings
    from sklearn.mixture import GaussianMixture

    from torchgmm.result import DEGENERATE_FACTOR

    best, t = -np.inf, time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # n_init restarts one by one (the estimator keeps only its best, which may be a collapsed one)
        rng = np.random.RandomState(seed)
        for _ in range(N_INIT):
            gm = GaussianMixture(k, covariance_type=cov, tol=TOL, max_iter=MAX_ITER, reg_covar=REG,
                                 random_state=rng.randint(2**31 - 1)).fit(x)
            covs = gm.covariances_
            var = {"full": lambda c: np.linalg.eigvalsh(c).min(), "tied": lambda c: np.linalg.eigvalsh(c).min(),
                   "diag": lambda c: c.min(), "spherical": lambda c: c.min()}[cov](covs)
            if var > DEGENERATE_FACTOR * REG:
                best = max(best, float(gm.score(x)))
    return best, time.perf_counter() - t


R_SCRIPT = r"""
suppressMessages(library(mclust))
args <- commandArgs(trailingOnly = TRUE)
x <- as.matrix(read.csv(args[1], header = FALSE))
models <- strsplit(args[2], ",")[[1]]
t0 <- proc.time()[["elapsed"]]
b <- mclustBIC(x, G = 1:5, modelNames = unique(models), verbose = FALSE)
t1 <- proc.time()[["elapsed"]]
n <- nrow(x); d <- ncol(x)
for (m in unique(models)) for (g in 1:5) {
  v <- b[as.character(g), m]
  ll <- if (is.na(v)) NA else (v + nMclustParams(m, d, g) * log(n)) / 2 / n
  cat(m, g, format(ll, digits = 15), (t1 - t0) / (5 * length(unique(models))), "\n")
}
"""


def run_mclust(x, types):
    """``{(cov, k): (mean log-likelihood, seconds)}`` from R's mclust (its BIC table back to the
    log-likelihood), or None when Rscript / mclust is unavailable."""
    if shutil.which("Rscript") is None:
        return None
    d = x.shape[1]
    names = {c: ("V" if c != "tied" else "E") if d == 1 else MCLUST_MODEL[c] for c in types}
    with tempfile.TemporaryDirectory() as tmp:
        data, script = Path(tmp) / "x.csv", Path(tmp) / "run.R"
        np.savetxt(data, x, delimiter=",", fmt="%.17g")
        script.write_text(R_SCRIPT)
        proc = subprocess.run(["Rscript", str(script), str(data), ",".join(names.values())], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    table = {}
    for line in proc.stdout.splitlines():
        m, g, ll, t = line.split()
        table[(m, int(g))] = (float(ll) if ll != "NA" else -np.inf, float(t))
    return {(c, k): table[(names[c], k)] for c in types for k in range(1, 6) if (names[c], k) in table}


CONTENDERS = ("torchgmm", "torchgmm-hc", "torchgmm-mix", "torchgmm-refine", "sklearn", "mclust")
RUNNERS = {
    "torchgmm": run_torchgmm,
    "torchgmm-hc": lambda x, k, cov: run_torchgmm(x, k, cov, "hierarchical"),
    "torchgmm-mix": lambda x, k, cov: run_torchgmm(x, k, cov, ["kmeans", "k-means++", "random_from_data"]),
    "torchgmm-refine": run_refine,
    "torchgmm-n20": lambda x, k, cov: run_torchgmm(x, k, cov, n_init=20),
    "torchgmm-n30": lambda x, k, cov: run_torchgmm(x, k, cov, n_init=30),
    "sklearn": run_sklearn,
}


def recorded_best(path) -> dict:
    """``{(dataset, cov, K): best}`` from the markdown table of an earlier run (docs/quality.md)."""
    best = {}
    for line in Path(path).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 4 and cells[2].isdigit():
            try:
                best[(cells[0], cells[1], int(cells[2]))] = float(cells[3])
            except ValueError:
                continue
    return best


def quality_table(names=None, types=COV_TYPES, ks=range(1, 6), use_mclust=True, log=print, contenders=CONTENDERS,
                  recorded=None):
    """One row per dataset x covariance type x K; ``best`` over ``contenders`` (and over
    ``recorded``, ``{(dataset, cov, K): value}``, when given)."""
    rows = []
    for name, x in datasets(names).items():
        x = PREPROCESS.get(name, lambda a: a)(x)
        mcl = run_mclust(x, types) if use_mclust and "mclust" in contenders else None
        for cov in types:
            for k in ks:
                row = {"dataset": name, "n": x.shape[0], "d": x.shape[1], "cov": cov, "k": k}
                for c in contenders:
                    if c == "mclust":
                        row[c] = mcl.get((cov, k), (np.nan, np.nan)) if mcl else (np.nan, np.nan)
                    else:
                        row[c] = RUNNERS[c](x, k, cov)
                vals = [row[c][0] for c in contenders if np.isfinite(row[c][0])]
                if recorded and (name, cov, k) in recorded:
                    vals.append(recorded[(name, cov, k)])
                row["best"] = max(vals) if vals else -np.inf
                rows.append(row)
                log(_line(row, contenders))
    return rows


def _line(row, contenders=CONTENDERS) -> str:
    cells = []
    for c in contenders:
        v, t = row[c]
        gap = row["best"] - v
        mark = "—" if not np.isfinite(v) else ("✓" if gap <= MATCH else f"-{gap:.4f}")
        cells.append(f"{mark} ({t:.2f}s)" if np.isfinite(t) else mark)
    return f"| {row['dataset']} | {row['cov']} | {row['k']} | {row['best']:.5f} | " + " | ".join(cells) + " |"


def summary(rows, contenders=CONTENDERS) -> str:
    out = []
    for c in contenders:
        have = [r for r in rows if np.isfinite(r[c][0])]
        hit = sum(r["best"] - r[c][0] <= MATCH for r in have)
        t = sum(r[c][1] for r in have if np.isfinite(r[c][1]))
        out.append(f"- {c}: reaches the best (within {MATCH:g}/point) in {hit} of {len(have)} cases; total {t:.1f} s")
    return "\n".join(out)


def w1_ratio(repeats: int = 5):
    """W1 (1,000 synthetic univariate series of 500 points, K=3, n_init=10): the time of
    ``torchgmm.fit`` with today's starts against the pre-issue-14 starts (every restart k-means++
    seeds + 5 Lloyd steps), interleaved in one process; the minimum of ``repeats`` each."""
    import torchgmm
    import torchgmm.fitting as fitting
    import torchgmm.init as tinit
    from torchgmm.datasets import synthetic_series

    x = synthetic_series(1000, 500, 3, seed=0).x

    def before(xs, w, k, r, method, cov, reg, gen, **kw):
        return tinit._start(xs, w, k, r, method, cov, reg, gen, **kw)

    times, lbs, current = {"before": [], "after": []}, {}, fitting.initialize
    torchgmm.fit(x, 3, n_init=10, random_state=0, warn=False)  # warm-up
    try:
        for _ in range(repeats):
            for label, fn in (("before", before), ("after", current)):
                fitting.initialize = fn
                t = time.perf_counter()
                r = torchgmm.fit(x, 3, n_init=10, random_state=0, warn=False)
                times[label].append(time.perf_counter() - t)
                lbs[label] = float(r.lower_bound.mean())
    finally:
        fitting.initialize = current
    return {k: (min(v), float(np.median(v)), lbs[k]) for k, v in times.items()}


def machine_line() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, threads {torch.get_num_threads()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="*")
    p.add_argument("--types", nargs="*", default=list(COV_TYPES))
    p.add_argument("--ks", nargs="*", type=int, default=[1, 2, 3, 4, 5])
    p.add_argument("--no-mclust", action="store_true")
    p.add_argument("--w1", action="store_true", help="only the W1 time ratio")
    p.add_argument("--json")
    p.add_argument("--contenders", nargs="*", default=list(CONTENDERS), choices=list(RUNNERS) + ["mclust"])
    p.add_argument("--recorded", help="a markdown table of an earlier run (docs/quality.md): its best joins the best")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    print(machine_line())
    if a.w1:
        print(w1_ratio())
        return
    cs = tuple(a.contenders)
    print("| dataset | cov | K | best | " + " | ".join(cs) + " |")
    print("|---|---|---|---|" + "---|" * len(cs))
    rows = quality_table(a.datasets, a.types, a.ks, not a.no_mclust, log=lambda s: print(s, flush=True), contenders=cs,
                         recorded=recorded_best(a.recorded) if a.recorded else None)
    print(summary(rows, cs))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, default=float, indent=1))


if __name__ == "__main__":
    main()
