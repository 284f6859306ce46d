"""Regimes over time: a 3-state Gaussian HMM on the bundled 50-point series, next to the mixture.

The series (``torchgmm.datasets.seed_series()``) sits near 24, jumps to a long run at the repeated
value 44.4457, returns to 24 and climbs again. A mixture treats the points as exchangeable; the
HMM says when the series switched. Prints the Viterbi path as runs of states with their levels,
then the mixture's three components. Writes no file.

    python examples/hmm_regimes.py
"""

import time

import torch

import torchgmm
from torchgmm.datasets import seed_series
from torchgmm.hmm import regime_runs


def main():
    x = seed_series()  # (50,) float64
    clock = time.perf_counter()
    hmm = torchgmm.GaussianHMM(3, n_init=10, random_state=0).fit(x)
    path = hmm.predict(x).tolist()
    elapsed = time.perf_counter() - clock

    # Order the states by level, so that the names read low / middle / high.
    order = hmm.means_[:, 0].argsort().tolist()
    name = {k: ("low", "middle", "high")[order.index(k)] for k in range(3)}
    print(f"GaussianHMM(3, n_init=10): status {hmm.status_names_}, {int(hmm.n_iter_)} iterations, "
          f"mean log-likelihood {float(hmm.lower_bound_):.4f} per step; fit + Viterbi in {elapsed:.2f} s")
    for k in order:
        print(f"  state {name[k]:6s} mean {float(hmm.means_[k, 0]):8.3f}  sd {float(hmm.covariances_[k, 0, 0].sqrt()):6.3f}  "
              f"stays with probability {float(hmm.transmat_[k, k]):.3f}")
    print("Regimes (Viterbi path as runs; steps are 0-based, first-last inclusive):")
    for k, first, last in regime_runs(path):
        values = x[first:last + 1]
        print(f"  steps {first:2d}-{last:2d} ({last - first + 1:2d} steps): {name[k]:6s} "
              f"level {float(values.mean()):7.3f}  (values {float(values.min()):.2f} .. {float(values.max()):.2f})")

    gm = torchgmm.GaussianMixture(3, n_init=10, random_state=0).fit(x)
    print(f"GaussianMixture(3, n_init=10): status {gm.status_names_}, mean log-likelihood "
          f"{float(gm.lower_bound_):.4f} per point (points exchangeable: no time, no switches)")
    for k in gm.means_[:, 0].argsort().tolist():
        print(f"  component mean {float(gm.means_[k, 0]):8.3f}  sd {float(gm.covariances_[k, 0, 0].sqrt()):6.3f}  "
              f"weight {float(gm.weights_[k]):.3f}")
    labels = gm.predict(x.unsqueeze(-1)).tolist()
    switches_hmm = sum(a != b for a, b in zip(path, path[1:]))
    switches_gm = sum(a != b for a, b in zip(labels, labels[1:]))
    print(f"Label changes along time: HMM {switches_hmm}, mixture (labels read in time order) {switches_gm}")


if __name__ == "__main__":
    torch.set_printoptions(precision=4)
    main()
