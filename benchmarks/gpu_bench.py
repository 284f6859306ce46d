"""GPU throughput of torchgmm (run by benchmarks/gpu.sh on a lent CUDA device).

Prints and writes a markdown table: W1 series per second (500-point univariate series, K=3,
n_init=10, tol=1e-3, float32) at several batch sizes, W2/W3 fit times, and the fused E-step's
achieved memory bandwidth (bytes of data read per pass / time per pass). Medians of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torchgmm  # noqa: E402
from torchgmm._compile import compiled  # noqa: E402
from torchgmm.covariance import get_covariance  # noqa: E402
from torchgmm.density import GMMParams  # noqa: E402
from torchgmm.stats import e_step_statistics  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def w1_data(n_series, n=500, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    mu = torch.randn(n_series, 3, device=DEV, generator=g) * 5
    sd = torch.rand(n_series, 3, device=DEV, generator=g) * 1.5 + 0.5
    z = torch.randint(0, 3, (n_series, n), device=DEV, generator=g)
    x = torch.gather(mu, 1, z) + torch.gather(sd, 1, z) * torch.randn(n_series, n, device=DEV, generator=g)
    return x.unsqueeze(-1)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_bench.md")
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink W2/W3/E-step sizes (dry runs on a CPU)")
    args = ap.parse_args()
    rows = []
    fit = lambda x, **kw: torchgmm.fit(x, warn=False, compile=True, random_state=0, **kw)  # noqa: E731

    # W1 with default settings: the first call of this process (everything included), then a second.
    x = w1_data(100_000)
    for call in ("first", "second"):
        t, r = timed(lambda: torchgmm.fit(x, n_components=3, n_init=10, tol=1e-3, warn=False, random_state=0), 1)
        rows.append((f"W1 B=100000 default, {call} call", f"{t:.3f}", f"{100_000 / t:,.0f} series/s", f"{float(r.lower_bound.mean()):.4f}"))
        print(rows[-1], flush=True)

    # W1: warm up the compiled graphs once on a small batch, then time each size.
    fit(w1_data(256), n_components=3, n_init=10, tol=1e-3)
    for n_series in map(int, args.sizes.split(",")):
        x = w1_data(n_series)
        t, r = timed(lambda: fit(x, n_components=3, n_init=10, tol=1e-3), 3)
        rows.append((f"W1 B={n_series}", f"{t:.3f}", f"{n_series / t:,.0f} series/s", f"{float(r.lower_bound.mean()):.4f}"))
        print(rows[-1], flush=True)

    # Fused E-step bandwidth on W1-shaped data (B=100000, restarts broadcast, no data copies).
    cov = get_covariance("full")
    x = w1_data(int(100_000 * args.scale)).unsqueeze(1)  # (B, 1, N, 1)
    w = torch.ones(x.shape[:-1], device=DEV)
    b, r_, k = x.shape[0], 10, 3
    params = GMMParams(torch.full((b, r_, k), -1.0986, device=DEV), torch.randn(b, r_, k, 1, device=DEV), torch.ones(b, r_, k, 1, 1, device=DEV))
    step = compiled(e_step_statistics)
    step(x, w, params, cov)
    t, _ = timed(lambda: step(x, w, params, cov), 10)
    read = (x.numel() + w.numel()) * 4
    rows.append((f"E-step, B={b} x R=10 x N=500 x K=3 (full, D=1)", f"{t * 1e3:.2f} ms", f"{read / t / 1e9:.0f} GB/s of data read", f"{b * r_ * 500 * k / t / 1e9:.1f} G point-components/s"))
    print(rows[-1], flush=True)

    # W2 and W3.
    g = torch.Generator(device=DEV).manual_seed(1)
    x2 = torch.randn(100, 1000, 8, device=DEV, generator=g) + 4 * torch.randint(0, 4, (100, 1000, 1), device=DEV, generator=g)
    fit(x2, n_components=4, n_init=3)
    t, r = timed(lambda: fit(x2, n_components=4, n_init=3), 3)
    rows.append(("W2 B=100 N=1000 D=8 K=4 full n_init=3", f"{t:.3f}", "", f"{float(r.lower_bound.mean()):.4f}"))
    print(rows[-1], flush=True)
    n3 = int(1_000_000 * args.scale)
    x3 = torch.randn(n3, 16, device=DEV, generator=g) + 3 * torch.randint(0, 16, (n3, 1), device=DEV, generator=g)
    for ct in ("diag",):
        fit(x3[: n3 // 10], n_components=16, covariance_type=ct, max_iter=3)
        t, r = timed(lambda: fit(x3, n_components=16, covariance_type=ct, max_iter=50), 2)
        rows.append((f"W3 N=1e6 D=16 K=16 {ct}", f"{t:.3f}", f"{int(r.n_iter)} iters", f"{float(r.lower_bound):.4f}"))
        print(rows[-1], flush=True)

    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu"
    lines = [f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}", "",
             "| workload | seconds (median) | throughput | mean ll / note |", "|---|---|---|---|"]
    lines += [f"| {a} | {b_} | {c} | {d} |" for a, b_, c, d in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
