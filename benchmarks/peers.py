"""One adapter per method, all with the signature ``fit(X, task) -> FitOut``.

X is a float64 numpy array (B, N, D) of B independent datasets. An adapter converts X to what its
library wants (dtype, device, layout) *outside* the timed region, times the fit only (plus picking
the best restart, which is part of fitting with n_init > 1), and returns the chosen parameters as
numpy arrays in full form: weights (B, K), means (B, K, D), covariances (B, K, D, D).
Quality is never taken from a library's own score: run.py evaluates the returned parameters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Task:
    K: int
    covariance_type: str = "full"
    n_init: int = 1
    max_iter: int = 100
    tol: float = 1e-3
    reg_covar: float = 1e-6
    init_params: str = "kmeans"
    seed: int = 0
    dtype: str = "float64"
    device: str = "cpu"
    seed_per_series: bool = False  # batched methods must give series i its own seed (SEED workload)
    options: dict = None  # torchgmm only: extra GaussianMixture settings (compile, prune_after, ...)


@dataclass
class FitOut:
    weights: np.ndarray      # (B, K)
    means: np.ndarray        # (B, K, D)
    covariances: np.ndarray  # (B, K, D, D)
    seconds: float


class Timer:
    """Wall-clock timer; synchronizes CUDA on entry and exit when the task runs on a GPU."""

    def __init__(self, device: str = "cpu"):
        self.cuda = device.startswith("cuda")

    def _sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def __enter__(self):
        self._sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.t0


def to_full(cov: np.ndarray, covariance_type: str, K: int, D: int) -> np.ndarray:
    """scikit-learn-shaped covariances with a batch axis in front -> (B, K, D, D)."""
    cov = np.asarray(cov, dtype=np.float64)
    if covariance_type == "full":
        return cov
    if covariance_type == "diag":
        return cov[..., :, None] * np.eye(D)
    if covariance_type == "spherical":
        return cov[..., None, None] * np.eye(D)
    if covariance_type == "tied":
        return np.broadcast_to(cov[:, None], (cov.shape[0], K, D, D)).copy()
    raise ValueError(covariance_type)


def best_restart(score: np.ndarray, *arrays: np.ndarray, n_init: int):
    """Pick per dataset the restart with the highest score; restarts are tiled dataset-major."""
    score = np.nan_to_num(np.asarray(score, dtype=np.float64).reshape(-1, n_init), nan=-np.inf)
    idx = np.arange(score.shape[0]) * n_init + score.argmax(1)
    return [np.asarray(a)[idx] for a in arrays]


def _centers(X, labels, K, fallback):
    """Per-row cluster means and counts of a hard labelling (bincount: no tiny batched matmuls)."""
    R, N, D = X.shape
    flat = (np.arange(R)[:, None] * K + labels).ravel()
    nk = np.bincount(flat, minlength=R * K).reshape(R, K).astype(X.dtype)
    S = np.stack([np.bincount(flat, X[..., j].ravel(), R * K) for j in range(D)], -1).reshape(R, K, D)
    return np.where(nk[..., None] > 0, S / np.maximum(nk, 1)[..., None], fallback).astype(X.dtype), nk


def _sqdist(X, C):
    """Squared distances (R, N, K) of points X (R, N, D) to centers C (R, K, D)."""
    if X.shape[-1] == 1:  # plain broadcasting beats many tiny batched matmuls
        return (X - C.swapaxes(1, 2)) ** 2
    return (X**2).sum(-1)[..., None] - 2 * X @ C.swapaxes(1, 2) + (C**2).sum(-1)[:, None]


def kmeans_init(X: np.ndarray, K: int, n_init: int, seed: int, reg_covar: float, iters: int = 100):
    """Harness-side k-means initialization for peers without a usable one (gmm-gpu, gmmx), modelled on
    scikit-learn's init_params="kmeans" (greedy k-means++ seeding, Lloyd until the labels stop changing,
    then the hard-assignment M-step).

    The n_init restarts are tiled into the batch axis (dataset-major): returns weights (R, K),
    means (R, K, D), covariances (R, K, D, D) with R = B * n_init, in X's dtype. Adapters call it
    inside their timed region.
    """
    rng = np.random.default_rng(seed)
    X = np.repeat(X, n_init, axis=0)
    R, N, D = X.shape
    rows = np.arange(R)
    C = X[rows, rng.integers(N, size=R)][:, None]                   # (R, 1, D)
    d2 = ((X - C) ** 2).sum(-1)                                     # (R, N) distance to closest center
    for _ in range(1, K):  # greedy k-means++: best of 2 + log K D^2-sampled candidates
        cum = np.cumsum(d2, axis=1)
        best = None
        for _ in range(2 + int(np.log(K))):
            j = (cum < rng.random((R, 1)) * cum[:, -1:]).sum(1).clip(max=N - 1)
            c = X[rows, j][:, None]
            nd2 = np.minimum(d2, ((X - c) ** 2).sum(-1))
            if best is None:
                best = [c, nd2]
            else:
                better = nd2.sum(1) < best[1].sum(1)
                best = [np.where(better[:, None, None], c, best[0]), np.where(better[:, None], nd2, best[1])]
        C, d2 = np.concatenate([C, best[0]], axis=1), best[1]
    # Lloyd on the rows still moving; a row stops when its labels repeat or, as in scikit-learn,
    # its centers shift by at most 1e-4 x the mean feature variance (squared distance)
    labels, act, tol = np.full((R, N), -1), rows, 1e-4 * X.var(1).mean(-1)
    for _ in range(iters):
        Xa, Ca = X[act], C[act]
        new = _sqdist(Xa, Ca).argmin(-1)
        changed = (new != labels[act]).any(1)
        labels[act] = new
        act, Xa, new, Ca = act[changed], Xa[changed], new[changed], Ca[changed]
        C[act] = _centers(Xa, new, K, Ca)[0]
        act = act[((C[act] - Ca) ** 2).sum((1, 2)) > tol[act]]
        if not len(act):
            break
    C, nk = _centers(X, labels, K, C)
    nk = nk + 10 * np.finfo(X.dtype).eps
    covs = np.stack([((labels == k)[..., None] * (X - C[:, k, None])).swapaxes(1, 2) @ (X - C[:, k, None])
                     for k in range(K)], axis=1) / nk[..., None, None]
    covs += reg_covar * np.eye(D, dtype=X.dtype)
    return (nk / N).astype(X.dtype), C, covs


# ---------------------------------------------------------------------------------------------
# adapters


def fit_sklearn(X, t: Task) -> FitOut:
    """scikit-learn GaussianMixture, one dataset after another, float64 (its native dtype)."""
    from sklearn.mixture import GaussianMixture
    B, N, D = X.shape
    W, M, C = [], [], []
    with Timer() as tm:
        for i in range(B):
            gm = GaussianMixture(t.K, covariance_type=t.covariance_type, tol=t.tol, reg_covar=t.reg_covar,
                                 max_iter=t.max_iter, n_init=t.n_init, init_params=t.init_params,
                                 random_state=t.seed + i).fit(X[i])
            W.append(gm.weights_), M.append(gm.means_), C.append(gm.covariances_)
    return FitOut(np.stack(W), np.stack(M), to_full(np.stack(C), t.covariance_type, t.K, D), tm.seconds)


def fit_torchgmm(X, t: Task) -> FitOut:
    """This project: all B datasets and their restarts in one batched fit."""
    import torch
    import torchgmm
    Xt = torch.as_tensor(X, dtype=getattr(torch, t.dtype), device=t.device)
    # under one random_state identical datasets get identical initializations, so the SEED copies
    # would all share one "seed": there, fit series i alone with random_state seed + i
    parts = list(Xt.split(1)) if t.seed_per_series else [Xt]
    gms = [torchgmm.GaussianMixture(n_components=t.K, covariance_type=t.covariance_type, tol=t.tol,
                                    reg_covar=t.reg_covar, max_iter=t.max_iter, n_init=t.n_init,
                                    init_params=t.init_params, random_state=t.seed + i, **(t.options or {}))
           for i in range(len(parts))]
    with Timer(t.device) as tm:
        for gm, x in zip(gms, parts):
            gm.fit(x)
    out = [torch.cat([getattr(gm, a).detach() for gm in gms]).cpu().double().numpy()
           for a in ("weights_", "means_", "covariances_")]
    return FitOut(out[0], out[1], to_full(out[2], t.covariance_type, t.K, X.shape[2]), tm.seconds)


def fit_gmm_gpu(X, t: Task) -> FitOut:
    """gmm-gpu: batched natively; restarts tiled into the batch axis; harness k-means init passed in
    (its own initialization leaves many short univariate series NaN). Its internal k-means still runs
    and is timed. The best restart is chosen by its own `score`, inside the timing. Note: gmm-gpu
    0.2.8 stores `reg_covar` but never adds it to the covariances."""
    import torch
    from gmm_gpu.gmm import GMM
    Xn = X.astype(np.float32)
    Xt = torch.as_tensor(np.repeat(Xn, t.n_init, axis=0), device=t.device)
    with Timer(t.device) as tm:
        w0, m0, c0 = kmeans_init(Xn, t.K, t.n_init, t.seed, t.reg_covar)
        # precision in float64 with covariance eigenvalues floored at 1e-5, gmm-gpu's own repair for
        # non-PD covariances: a raw float32 inverse of a near-singular k-means cluster is not PD and
        # makes its Cholesky raise for the whole batch
        e, V = np.linalg.eigh(c0.astype(np.float64))
        p0 = (V / np.maximum(e, 1e-5)[..., None, :]) @ V.swapaxes(-1, -2)
        w0, m0, p0 = (torch.as_tensor(a, dtype=torch.float32, device=t.device) for a in (w0, m0, p0))
        gm = GMM(t.K, max_iter=t.max_iter, device=t.device, tol=t.tol, reg_covar=t.reg_covar,
                 means_init=m0, weights_init=w0, precisions_init=p0,
                 random_seed=t.seed + 1)  # it ignores a seed of 0
        gm.fit(Xt)
        score = gm.score(Xt).numpy()
    # the model it evaluates is (pi, means, precision Cholesky factors); rebuild covariances from those
    P = torch.stack(gm._precisions_cholesky, 1).double().cpu()
    covs = torch.linalg.inv(P @ P.mT)
    w, m, c = best_restart(score, torch.stack(gm._pi, 1).cpu(), torch.stack(gm.means, 1).cpu(), covs,
                           n_init=t.n_init)
    return FitOut(w.astype(np.float64), m.astype(np.float64), c, tm.seconds)


_GMMX_CACHE = {}


def fit_gmmx(X, t: Task) -> FitOut:
    """gmmx (JAX): one dataset per call, so jax.vmap over datasets x restarts; float32.
    Harness k-means init (gmmx's own runs scikit-learn KMeans per dataset). The best restart is
    chosen by gmmx's final log-likelihood."""
    import jax
    from gmmx import EMFitter, GaussianMixtureModelJax
    key = (t.covariance_type, t.max_iter, t.tol, t.reg_covar)
    if key not in _GMMX_CACHE:  # the jitted function is kept, so the warm-up compiles it once
        fitter = EMFitter(max_iter=t.max_iter, tol=t.tol, reg_covar=t.reg_covar)

        def one(x, w, m, c):
            gmm = GaussianMixtureModelJax.from_squeezed(m, c, w, covariance_type=t.covariance_type)
            r = fitter.fit(x, gmm)
            return r.gmm.weights[0, :, 0, 0], r.gmm.means[0, ..., 0], r.gmm.covariances.values_dense[0], r.log_likelihood
        _GMMX_CACHE[key] = jax.jit(jax.vmap(one))
    Xn = X.astype(np.float32)
    Xj = jax.device_put(np.repeat(Xn, t.n_init, axis=0))
    with Timer() as tm:
        w0, m0, c0 = kmeans_init(Xn, t.K, t.n_init, t.seed, t.reg_covar)
        if t.covariance_type == "diag":
            c0 = np.diagonal(c0, axis1=-2, axis2=-1)
        out = jax.block_until_ready(_GMMX_CACHE[key](Xj, w0, m0, c0))
        w, m, c = best_restart(out[3], *out[:3], n_init=t.n_init)
    return FitOut(w.reshape(-1, t.K).astype(np.float64), m.astype(np.float64), c.astype(np.float64), tm.seconds)


def fit_pomegranate(X, t: Task) -> FitOut:
    """pomegranate 1.x GeneralMixtureModel: one dataset and one restart per call (no n_init), its own
    k-means initialization, tol scaled by N (it tests the total log-probability). Parameters stay
    float32. The best restart is chosen by its own log_probability, inside the timing; a restart
    that raises is dropped, a series whose restarts all raise gets NaN parameters."""
    import torch
    from pomegranate.distributions import Normal
    from pomegranate.gmm import GeneralMixtureModel
    kind = {"full": "full", "diag": "diag", "spherical": "sphere"}[t.covariance_type]
    B, N, D = X.shape
    Xs = [torch.as_tensor(x, dtype=torch.float32, device=t.device) for x in X]
    W, M, C = [], [], []
    cshape = {"full": (t.K, D, D), "diag": (t.K, D), "sphere": (t.K,)}[kind]
    with Timer(t.device) as tm:
        for i, x in enumerate(Xs):
            best = (-np.inf, None)
            for r in range(t.n_init):
                try:  # it raises on some data (empty k-means cluster, non-PD covariance): a failed restart
                    g = GeneralMixtureModel([Normal(covariance_type=kind, min_cov=t.reg_covar) for _ in range(t.K)],
                                            max_iter=t.max_iter, tol=t.tol * N,
                                            random_state=t.seed + i * t.n_init + r).to(t.device).fit(x)
                    lp = float(g.log_probability(x).sum())
                except Exception:  # noqa: BLE001
                    continue
                if best[1] is None or lp > best[0]:
                    best = (lp, g)
            g = best[1]
            if g is None:  # every restart failed: NaN parameters, counted as a failed series
                W.append(np.full(t.K, np.nan)), M.append(np.full((t.K, D), np.nan)), C.append(np.full(cshape, np.nan))
                continue
            W.append(g.priors.detach().cpu().numpy())
            M.append(np.stack([d.means.detach().cpu().numpy() for d in g.distributions]))
            C.append(np.stack([d.covs.detach().cpu().numpy() for d in g.distributions]))
    return FitOut(np.stack(W).astype(np.float64), np.stack(M).astype(np.float64),
                  to_full(np.stack(C), t.covariance_type, t.K, D), tm.seconds)


ALL_COV = ("full", "diag", "spherical", "tied")
ALL_INIT = ("kmeans", "k-means++", "random", "random_from_data")


@dataclass
class Adapter:
    fit: Callable[[np.ndarray, Task], FitOut]
    module: str                       # must be importable, else the method is skipped
    dtypes: tuple = ("float32",)      # first one is the default
    covariance_types: tuple = ALL_COV
    init_params: tuple = ALL_INIT
    why: str = ""                     # why the limits above exist


ADAPTERS = {
    "sklearn": Adapter(fit_sklearn, "sklearn", ("float64",)),
    "torchgmm": Adapter(fit_torchgmm, "torchgmm", ("float32", "float64")),
    "gmm_gpu": Adapter(fit_gmm_gpu, "gmm_gpu", covariance_types=("full",), init_params=("kmeans",),
                       why="full covariance only; float64 crashes in its k-means; harness k-means init"),
    "gmmx": Adapter(fit_gmmx, "gmmx", covariance_types=("full", "diag"), init_params=("kmeans",),
                    why="float32, full/diag only; harness k-means init"),
    "pomegranate": Adapter(fit_pomegranate, "pomegranate", covariance_types=("full", "diag", "spherical"),
                           init_params=("kmeans",), why="parameters stay float32; no tied; own k-means init"),
}


def unsupported(name: str, t: Task) -> str | None:
    """Why method `name` cannot run task `t`, or None if it can."""
    a = ADAPTERS[name]
    for field, allowed in (("dtype", a.dtypes), ("covariance_type", a.covariance_types),
                           ("init_params", a.init_params)):
        if getattr(t, field) not in allowed:
            return f"{field}={getattr(t, field)} not supported ({name}: {'/'.join(allowed)} only)"
    return None
