"""One fit of the bundled 50-point series per call (K=3, n_init=1, default settings), torchgmm's
``GaussianMixture(3).fit(x)`` against scikit-learn's (one BLAS thread), alternated in one process:
median milliseconds per call after the first, and the operations torchgmm dispatches per fit.

    python benchmarks/small_fit.py [calls per repeat, default 30]
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torchgmm.datasets
from torchgmm import GaussianMixture


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def main(calls: int = 30) -> None:
    from sklearn.mixture import GaussianMixture as SKGaussianMixture
    from threadpoolctl import threadpool_limits

    x = torch.as_tensor(torchgmm.datasets.seed_series())
    xn = x.numpy().reshape(-1, 1).astype(np.float64)
    fits = {
        "torchgmm": lambda: GaussianMixture(3, random_state=0).fit(x),
        "sklearn (1 thr)": lambda: SKGaussianMixture(3, random_state=0).fit(xn),
    }
    print(f"load avg {' '.join(f'{v:.1f}' for v in os.getloadavg())}, torch threads {torch.get_num_threads()}")
    first = {}
    for name, fit in fits.items():
        start = time.perf_counter()
        fit()
        first[name] = time.perf_counter() - start
    with _Count() as count:
        fits["torchgmm"]()
    with threadpool_limits(1):
        medians = collections.defaultdict(list)
        for _ in range(3):
            for name, fit in fits.items():
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    fit()
                    times.append(time.perf_counter() - start)
                medians[name].append(statistics.median(times))
    for name in fits:
        ms = ", ".join(f"{t * 1e3:.2f}" for t in medians[name])
        print(f"{name:16s} first call {first[name] * 1e3:7.1f} ms; medians of {calls} calls, three repeats: {ms} ms")
    ratio = [s / t for s, t in zip(medians["sklearn (1 thr)"], medians["torchgmm"])]
    print(f"scikit-learn / torchgmm: {', '.join(f'{r:.2f}x' for r in ratio)}")
    print(f"torchgmm operations per fit: {sum(count.ops.values())}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
