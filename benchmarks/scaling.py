"""How time and memory grow with B, N, K and D (log-log, with fitted slopes).

Each point is one fit with exactly ``--iters`` EM iterations (tol=0, n_init=1, float32, eager), run
in a fresh subprocess so that its peak resident memory (ru_maxrss, minus the same process's
footprint after importing torch and making the data) is its own. Writes ``docs/scaling.png`` and
prints a markdown table of slopes.

    python benchmarks/scaling.py [--quick] [--out docs/scaling.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, resource, sys, time, torch, warnings
sys.path.insert(0, {root!r})
import torchgmm
torch.manual_seed(0)
b, n, k, d, cov, iters = {b}, {n}, {k}, {d}, {cov!r}, {iters}
x = torch.randn(b, n, d) + 4 * torch.randint(0, k, (b, n, 1)).float()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
warnings.simplefilter("ignore")
torchgmm.fit(x[:1, : min(n, 200)], k, covariance_type=cov, max_iter=1, tol=0.0, compile=False)  # warm-up
times = []
for _ in range(3):
    t = time.perf_counter()
    torchgmm.fit(x, k, covariance_type=cov, max_iter=iters, tol=0.0, compile=False, random_state=0)
    times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": sorted(times)[1], "peak_mib": max(peak - base, 0) / 1024}}))
"""

SWEEPS = {
    "B (series)": dict(values=[100, 300, 1000, 3000, 10000], base=dict(b=None, n=500, k=3, d=1, cov="full")),
    "N (points)": dict(values=[10_000, 30_000, 100_000, 300_000, 1_000_000], base=dict(b=4, n=None, k=3, d=1, cov="full")),
    "K (components)": dict(values=[2, 4, 8, 16, 32], base=dict(b=100, n=1000, k=None, d=1, cov="full")),
    "D (features)": dict(values=[1, 2, 4, 8, 16], base=dict(b=100, n=1000, k=3, d=None, cov="full")),
}


def run_point(params: dict, iters: int) -> dict:
    code = WORKER.format(root=str(ROOT), iters=iters, **params)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="three points per sweep, smaller sizes")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "docs" / "scaling.png"))
    args = ap.parse_args()
    results = {}
    for name, sweep in SWEEPS.items():
        values = sweep["values"][:3] if args.quick else sweep["values"]
        key = next(k for k, v in sweep["base"].items() if v is None)
        rows = []
        for value in values:
            params = dict(sweep["base"], **{key: value})
            rows.append((value, run_point(params, args.iters)))
            print(f"{name:>15} = {value:>8}: {rows[-1][1]['seconds']:.3f} s, {rows[-1][1]['peak_mib']:.0f} MiB", flush=True)
        results[name] = rows

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(4 * len(results), 7))
    lines = ["| sweep | time slope | memory slope | range |", "|---|---|---|---|"]
    for col, (name, rows) in enumerate(results.items()):
        v = np.array([r[0] for r in rows], dtype=float)
        t = np.array([r[1]["seconds"] for r in rows])
        m = np.array([max(r[1]["peak_mib"], 1e-3) for r in rows])
        st = np.polyfit(np.log(v), np.log(t), 1)[0]
        # memory: slope over the points above 20 MiB (below that the allocator's noise dominates)
        big = m > 20
        sm = np.polyfit(np.log(v[big]), np.log(m[big]), 1)[0] if big.sum() >= 2 else float("nan")
        for row, (y, label, slope) in enumerate(((t, "seconds", st), (m, "peak MiB", sm))):
            ax = axes[row, col]
            ax.loglog(v, y, "o-")
            ax.set_xlabel(name)
            ax.set_ylabel(label)
            ax.set_title(f"slope {slope:.2f}")
            ax.grid(True, which="both", alpha=0.3)
        lines.append(f"| {name} | {st:.2f} | {sm:.2f} | {int(v[0])}..{int(v[-1])} |")
    fig.suptitle(f"torchgmm scaling: {args.iters} EM iterations, float32, eager, one CPU process (2 cores)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
