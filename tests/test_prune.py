"""``prune_after``: a cheap restart strategy (all restarts run a few EM iterations, then only each
series' best goes on). The kept restart must be exactly the unpruned run of that restart; every
other restart must stop exactly where it was after ``prune_after`` iterations."""

from __future__ import annotations

import pytest
import torch

import torchgmm
from torchgmm import GaussianMixture
from conftest import blobs

SETTINGS = dict(n_init=5, tol=1e-8, max_iter=300, random_state=0, init_params="random", warn=False)


def data() -> torch.Tensor:
    return torch.stack([torch.tensor(blobs(seed, n=200, d=2, overlap=1.5)) for seed in range(4)])  # (4, 200, 2)


def test_pruned_restarts_stop_where_they_were_and_the_kept_one_runs_on():
    x, p = data(), 3
    full = torchgmm.fit(x, 3, **SETTINGS)
    short = torchgmm.fit(x, 3, **{**SETTINGS, "max_iter": p})  # every restart after p iterations
    pruned = torchgmm.fit(x, 3, prune_after=p, **SETTINGS)
    kept = short.restart_lower_bounds.argmax(-1)  # (4,) the best restart of each series after p iterations
    rows = torch.arange(x.shape[0])
    expected = short.restart_lower_bounds.clone()
    expected[rows, kept] = full.restart_lower_bounds[rows, kept]
    torch.testing.assert_close(pruned.restart_lower_bounds, expected, rtol=0, atol=1e-12)
    assert torch.equal(pruned.best_restart, kept)
    # the restarts really differ here, so pruning is not a no-op
    assert bool((short.restart_lower_bounds.std(-1) > 1e-6).all())


def test_pruning_at_the_last_iteration_changes_nothing():
    x = data()
    full = torchgmm.fit(x, 3, **SETTINGS)
    late = torchgmm.fit(x, 3, prune_after=SETTINGS["max_iter"], **SETTINGS)
    torch.testing.assert_close(late.restart_lower_bounds, full.restart_lower_bounds, rtol=0, atol=1e-12)
    torch.testing.assert_close(late.params.means, full.params.means, rtol=0, atol=1e-12)


def test_module_passes_prune_after():
    x = data()
    gm = GaussianMixture(3, prune_after=2, **{k: v for k, v in SETTINGS.items() if k != "warn"})
    gm.fit(x)
    assert gm.prune_after == 2
    expected = torchgmm.fit(x, 3, prune_after=2, **SETTINGS)
    assert torch.equal(gm.result_.restart_lower_bounds, expected.restart_lower_bounds)


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_invalid_prune_after_is_an_error(value, error):
    with pytest.raises(error, match="prune_after"):
        torchgmm.fit(data(), 3, prune_after=value)


def test_prune_after_with_another_method_is_an_error():
    with pytest.raises(ValueError, match="prune_after=2 applies to method='em' only"):
        torchgmm.fit(data(), 3, prune_after=2, method="squarem")
