"""Model selection over K across the batch: GaussianMixture(n_components=[...], criterion=...)."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchgmm


def known_k_series(n_series: int = 100, n: int = 300, seed: int = 0):
    """Univariate series whose true K cycles through 1..5: unit-variance components 8 apart."""
    gen = torch.Generator().manual_seed(seed)
    xs, ks = [], []
    for b in range(n_series):
        k = b % 5 + 1
        labels = torch.randint(0, k, (n,), generator=gen)
        xs.append(labels.double() * 8.0 + torch.randn(n, dtype=torch.float64, generator=gen))
        ks.append(k)
    return torch.stack(xs)[..., None], torch.tensor(ks)


def quiet(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        return model.fit(x)


def test_bic_picks_the_true_k_on_well_separated_series():
    x, true_k = known_k_series()
    gm = quiet(torchgmm.GaussianMixture([1, 2, 3, 4, 5], n_init=2, random_state=0), x)
    accuracy = float((gm.n_components_ == true_k).double().mean())
    assert accuracy >= 0.95
    assert gm.criterion_.shape == (100, 5) and gm.weights_.shape == (100, 5)


@pytest.mark.parametrize("criterion", ["bic", "aic"])
def test_each_candidates_criterion_equals_a_separate_fit_from_the_same_start(criterion):
    x, _ = known_k_series(n_series=4, n=200, seed=1)
    gm = quiet(torchgmm.GaussianMixture([1, 2, 3], criterion=criterion, random_state=0), x)
    for j, k in enumerate([1, 2, 3]):
        alone = quiet(torchgmm.GaussianMixture(k, random_state=0), x)
        expected = alone.bic(x) if criterion == "bic" else alone.aic(x)
        torch.testing.assert_close(gm.criterion_[:, j], expected, rtol=1e-9, atol=1e-7)


def test_unused_components_have_weight_zero_and_are_never_predicted():
    x, true_k = known_k_series(n_series=10, n=200, seed=2)
    gm = quiet(torchgmm.GaussianMixture([1, 2, 3, 4, 5], random_state=0), x)
    k = gm.n_components_
    unused = torch.arange(5) >= k[:, None]  # (B, 5)
    assert bool((gm.weights_[unused] == 0).all()) and bool((gm.weights_[~unused] > 0).all())
    proba = gm.predict_proba(x)
    assert bool((proba.transpose(-1, -2)[unused] == 0).all())
    assert bool((gm.predict(x) < k[:, None]).all())
    _, labels = gm.sample(500, random_state=0)
    assert bool((labels < k[:, None]).all())
    assert bool((gm.status_ == torchgmm.FitStatus.OK).all())  # masked components are not "degenerate"


def test_bic_and_aic_count_each_series_chosen_k():
    x, _ = known_k_series(n_series=5, n=200, seed=3)
    gm = quiet(torchgmm.GaussianMixture([1, 2, 3, 4, 5], random_state=0), x)
    torch.testing.assert_close(gm.bic(x), gm.criterion_.amin(-1), rtol=1e-9, atol=1e-7)
    for b in range(5):
        single = quiet(torchgmm.GaussianMixture(int(gm.n_components_[b]), random_state=0), x[b])
        torch.testing.assert_close(gm.bic(x)[b], single.bic(x[b]), rtol=1e-9, atol=1e-7)


def test_a_list_of_candidates_rejects_what_it_cannot_honour():
    x, _ = known_k_series(n_series=2, n=50)
    with pytest.raises(ValueError, match="means_init"):
        torchgmm.fit(x, [1, 2], means_init=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="criterion"):
        torchgmm.fit(x, [1, 2], criterion="hqc")
    with pytest.raises(ValueError, match="n_components"):
        torchgmm.fit(x, [0, 2])
