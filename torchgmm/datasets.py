"""Bundled and synthetic data: the bundled 50-point series (a time series on which a hand-written
NumPy EM failed; see docs/robustness.md) and batches of known mixtures."""

from __future__ import annotations

from importlib import resources
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["seed_series", "SyntheticBatch", "synthetic_series"]

# The value the bundled series repeats (forward-filled), where unlucky starts collapse.
REPEATED_VALUE = 44.44571429


def seed_series(dtype=torch.float64) -> torch.Tensor:
    """The bundled univariate series (on which a hand-written NumPy EM failed), ``(50,)``: near 24-25, a jump to about 44 with long runs of
    one repeated value, and values in between (see the README)."""
    with resources.files("torchgmm").joinpath("data/seed_series.csv").open() as f:
        values = np.loadtxt(f, delimiter=",", skiprows=1, usecols=1)
    return torch.tensor(values, dtype=dtype)


class SyntheticBatch(NamedTuple):
    x: torch.Tensor  # (B, N, 1)
    weights: torch.Tensor  # (B, K) true mixing weights
    means: torch.Tensor  # (B, K) true means
    stds: torch.Tensor  # (B, K) true standard deviations


def synthetic_series(
    n_series: int = 1000, n_points: int = 500, n_components: int = 3, separation: float = 5.0,
    seed: int = 0, dtype=torch.float32,
) -> SyntheticBatch:
    """A batch of univariate series, each drawn from its own random ``n_components`` mixture:
    means ~ N(0, separation^2), standard deviations ~ U(0.5, 2), weights ~ Dirichlet(3)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, separation, (n_series, n_components))
    stds = rng.uniform(0.5, 2.0, (n_series, n_components))
    weights = rng.dirichlet(np.full(n_components, 3.0), n_series)
    cum = weights.cumsum(-1)
    labels = (rng.random((n_series, n_points, 1)) > cum[:, None, :]).sum(-1).clip(max=n_components - 1)
    rows = np.arange(n_series)[:, None]
    x = rng.normal(means[rows, labels], stds[rows, labels])[..., None]
    as_t = lambda a: torch.tensor(a, dtype=dtype)  # noqa: E731
    return SyntheticBatch(as_t(x), as_t(weights), as_t(means), as_t(stds))
