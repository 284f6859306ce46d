"""torchgmm.compare: EM against gradient MLE from one start, reported in the data's units."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchgmm
from torchgmm.compare import compare

from test_gradient import clusters


def test_final_values_are_in_the_data_units_of_lower_bound():
    """Defect: `final` was in standardized units; now it is the mean log-likelihood per point of
    the data, as `lower_bound_` (here: scaled data, whose standardized value differs by D log 100)."""
    x = clusters(2, spread=3.0, seed=2) * 100.0 + 7.0
    comp = compare(x, 3, methods=("em",), max_iter=500, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        fitted = torchgmm.fit(x, 3, tol=1e-12, max_iter=500, random_state=0)
    finals = torch.tensor([row["final"] for row in comp.rows], dtype=torch.float64)
    # the shared objective differs from the log-likelihood by the reg_covar penalty only
    torch.testing.assert_close(finals, fitted.lower_bound, rtol=0, atol=1e-4)


def test_sample_weight_padding_gives_the_unpadded_comparison():
    x = clusters(1, n=120, spread=3.0, seed=5)
    padded = torch.cat([x, torch.full((1, 30, 2), 1e3, dtype=x.dtype)], 1)
    w = torch.cat([torch.ones(1, 120), torch.zeros(1, 30)], 1).to(x.dtype)
    plain = compare(x, 3, methods=("em", "lbfgs"), max_iter=200)
    weighted = compare(padded, 3, methods=("em", "lbfgs"), max_iter=200, sample_weight=w)
    for a, b in zip(plain.rows, weighted.rows):
        assert a["method"] == b["method"]
        assert abs(a["final"] - b["final"]) < 1e-9


def test_n_init_starts_every_method_from_the_best_initialization():
    x = clusters(3, spread=1.5, seed=6)
    one = compare(x, 3, methods=("em",), max_iter=0, n_init=1, random_state=1)
    many = compare(x, 3, methods=("em",), max_iter=0, n_init=8, random_state=1)
    start_one, start_many = one.curves["em"][0][:, 0], many.curves["em"][0][:, 0]
    assert bool((start_many >= start_one - 1e-12).all()) and bool((start_many > start_one + 1e-6).any())


def test_gap_curve_takes_a_list_and_names_bad_arguments():
    comp = compare(clusters(2, spread=2.0, seed=9), 3, methods=("em", "lbfgs"), max_iter=100)
    as_list = comp.gap_curve("em", [1, 2, 5, 10])
    torch.testing.assert_close(as_list, comp.gap_curve("em", torch.tensor([1.0, 2.0, 5.0, 10.0])))
    with pytest.raises(ValueError, match="adam"):
        comp.gap_curve("adam", [1, 2])
    with pytest.raises(ValueError, match="axis"):
        comp.gap_curve("em", [1, 2], axis="seconds")
