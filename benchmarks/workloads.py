"""Deterministic benchmark workloads.

Every generator returns float64 data of shape (B, N, D): B independent datasets of N points in D
dimensions, drawn with a numpy Generator seeded from the workload's ``seed``, so every run and every
worker process sees exactly the same data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Fit settings and data sizes per workload; a config entry overrides any of these keys.
DEFAULTS = {
    # many short univariate series, each a random 3-component 1-D mixture
    "w1": dict(B=1000, N=500, D=1, K=3, covariance_type="full", n_init=10, max_iter=100, tol=1e-3),
    # a batch of medium multivariate datasets
    "w2": dict(B=100, N=1000, D=8, K=4, covariance_type="full", n_init=3, max_iter=100, tol=1e-3),
    # one large dataset
    "w3": dict(B=1, N=1_000_000, D=16, K=16, covariance_type=["diag", "full"], n_init=1,
               max_iter=50, tol=1e-3),
    # gmm-gpu's published example: 1,000 datasets of 200 + 200 points around (0,0) and (1.5,1.5)
    "gg": dict(B=1000, N=400, D=2, K=2, covariance_type="full", n_init=1, max_iter=100, tol=1e-3),
    # the bundled 50-point series (torchgmm/data/seed_series.csv), refitted with `B` different seeds per initialization method
    "seed": dict(B=100, K=3, covariance_type="full", n_init=1, max_iter=100, tol=1e-3,
                 init_params=["kmeans", "k-means++", "random", "random_from_data"],
                 best_ll=-2.1237, best_tol=1e-3, seed_per_series=True),
}
COMMON = dict(reg_covar=1e-6, init_params="kmeans", seed=0, repeats=3, warmup=True, seed_per_series=False)


def random_mixture(rng: np.random.Generator, B: int, N: int, D: int, K: int) -> np.ndarray:
    """B datasets, each N points from its own random K-component Gaussian mixture in D dims."""
    weights = rng.dirichlet(np.full(K, 3.0), size=B)  # (B, K), no vanishing component
    means = rng.normal(0.0, 4.0, size=(B, K, D))
    A = rng.normal(0.0, 0.6, size=(B, K, D, D))
    scale = rng.uniform(0.5, 1.5, size=(B, K, 1, 1))
    covs = A @ A.swapaxes(-1, -2) / D + scale**2 * np.eye(D)
    chol = np.linalg.cholesky(covs)
    u = rng.random((B, N, 1))
    labels = (u > np.cumsum(weights, axis=1)[:, None, :]).sum(-1).clip(max=K - 1)  # (B, N)
    z = rng.standard_normal((B, N, D))
    X = np.empty((B, N, D))
    for k in range(K):  # one pass per component keeps memory at O(B N D)
        xk = means[:, k, None, :] + np.einsum("bde,bne->bnd", chol[:, k], z)
        np.copyto(X, xk, where=(labels == k)[..., None])
    return X


def gmm_gpu_example(rng: np.random.Generator, B: int, N: int) -> np.ndarray:
    """gmm-gpu's README example: half the points N(0, I), half N((1.5, 1.5), I), D=2."""
    h = N // 2
    return np.concatenate([rng.standard_normal((B, h, 2)),
                           rng.standard_normal((B, N - h, 2)) + 1.5], axis=1)


def seed_series(B: int) -> np.ndarray:
    """The bundled series (column `value`), repeated B times: one dataset per seed."""
    import csv
    path = next(p for p in (ROOT / "torchgmm" / "data" / "seed_series.csv", ROOT / "data" / "seed_series.csv")
                if p.exists())
    with open(path) as f:
        values = np.array([float(r["value"]) for r in csv.DictReader(f)])
    return np.broadcast_to(values[None, :, None], (B, len(values), 1)).copy()


def make(kind: str, p: dict) -> np.ndarray:
    """Data for workload `kind` with resolved parameters `p` (see DEFAULTS)."""
    rng = np.random.default_rng([p["seed"], sum(map(ord, kind))])
    if kind in ("w1", "w2", "w3"):
        return random_mixture(rng, p["B"], p["N"], p["D"], p["K"])
    if kind == "gg":
        return gmm_gpu_example(rng, p["B"], p["N"])
    if kind == "seed":
        return seed_series(p["B"])
    raise ValueError(f"unknown workload {kind!r}")
