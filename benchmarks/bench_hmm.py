"""HMM workload: 1,000 univariate sequences of T=200, K=3 states, the same number of Baum-Welch
iterations (tol=0), torchgmm batched vs hmmlearn looped over the sequences, one thread each.

    python benchmarks/bench_hmm.py                       # hmmlearn on the first 200 sequences
    python benchmarks/bench_hmm.py --hmmlearn-series 1000 --iters 20

Prints a machine line, seconds per sequence for both, the ratio, and the mean log-likelihood per
step of the final models on the sequences both fitted (data units). Writes nothing.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy / torch load their BLAS

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import torchgmm  # noqa: E402


def sticky_sequences(n_series: int, n_steps: int, k: int = 3, stay: float = 0.95, seed: int = 0) -> np.ndarray:
    """``(B, T, 1)``: each sequence from its own sticky K-state HMM (means ~ N(0, 5^2), sds ~ U(0.5, 2))."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 5.0, (n_series, k))
    sds = rng.uniform(0.5, 2.0, (n_series, k))
    trans = np.full((k, k), (1 - stay) / (k - 1))
    np.fill_diagonal(trans, stay)
    cum = trans.cumsum(-1)
    z = np.zeros((n_series, n_steps), dtype=np.int64)
    z[:, 0] = rng.integers(0, k, n_series)
    for t in range(1, n_steps):
        z[:, t] = (rng.random(n_series)[:, None] > cum[z[:, t - 1]]).sum(-1)
    rows = np.arange(n_series)[:, None]
    return rng.normal(means[rows, z], sds[rows, z])[..., None]


def machine_line() -> str:
    try:
        load = "%.2f" % os.getloadavg()[0]
    except OSError:
        load = "?"
    return (f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
            f"(load avg {load} at start), Python {platform.python_version()}, torch {torch.__version__}, "
            f"threads: torch {torch.get_num_threads()}, BLAS {os.environ.get('OMP_NUM_THREADS')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--hmmlearn-series", type=int, default=200, help="hmmlearn fits only the first n sequences")
    ap.add_argument("--covariance-type", default="diag")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = sticky_sequences(args.series, args.steps)
    print(machine_line())
    print(f"workload: {args.series} univariate sequences, T={args.steps}, K=3, covariance_type={args.covariance_type!r}, "
          f"{args.iters} iterations (tol=0), float64")

    xt = torch.tensor(x)
    settings = dict(covariance_type=args.covariance_type, tol=0.0, max_iter=args.iters, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torchgmm.GaussianHMM(3, **settings).fit(xt[:8])  # warm-up (one-off allocations, imports)
        clock = time.perf_counter()
        ours = torchgmm.GaussianHMM(3, **settings).fit(xt)
        t_ours = time.perf_counter() - clock
    n_ref = min(args.hmmlearn_series, args.series)
    ll_ours = ours.score(xt)  # mean log-likelihood per step of the final models
    print(f"torchgmm GaussianHMM, batched: {t_ours:.3f} s for {args.series} sequences = "
          f"{t_ours / args.series * 1e3:.3f} ms per sequence; statuses {ours.result_.status_counts()}")

    try:
        from hmmlearn.hmm import GaussianHMM as ReferenceHMM
    except ImportError:
        print("hmmlearn is not installed (pip install hmmlearn): no comparison")
        return
    ll_ref = np.empty(n_ref)
    clock = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in range(n_ref):
            ref = ReferenceHMM(3, covariance_type=args.covariance_type, n_iter=args.iters, tol=-np.inf, random_state=0)
            ref.fit(x[b])
            ll_ref[b] = ref.score(x[b]) / args.steps
    t_ref = time.perf_counter() - clock
    per_ref, per_ours = t_ref / n_ref, t_ours / args.series
    print(f"hmmlearn GaussianHMM, looped: {t_ref:.3f} s for {n_ref} sequences = {per_ref * 1e3:.3f} ms per sequence")
    print(f"speed-up per sequence: {per_ref / per_ours:.1f}x")
    mine = ll_ours[:n_ref].numpy()
    print(f"mean log-likelihood per step on those {n_ref} sequences: torchgmm {mine.mean():.5f}, hmmlearn {ll_ref.mean():.5f}; "
          f"torchgmm better or equal (within 1e-6) on {(mine >= ll_ref - 1e-6).mean() * 100:.1f}% of them")


if __name__ == "__main__":
    main()
