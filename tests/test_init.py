"""torchgmm.init: batched initialization (k-means, k-means++ seeds, random responsibilities, random
data points), per series independent of its batch neighbours and padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from torchgmm.init import INIT_METHODS, initialize, kmeans, make_generator
from torchgmm.units import standardize

from test_gradient import clusters


def start(x, method, k=3, n_init=2, seed=0, w=None):
    w = torch.ones(x.shape[:2], dtype=x.dtype) if w is None else w
    xs, _, _, reg = standardize(x, w, 1e-6)
    return initialize(xs, w, k, n_init, method, "full", reg, make_generator(seed)), xs, w


@pytest.mark.parametrize("method", INIT_METHODS)
def test_shapes_and_a_valid_mixture_per_restart(method):
    (params, distinct_ok), _, _ = start(clusters(4, n=60), method, k=3, n_init=5)
    assert params.log_weights.shape == (4, 5, 3) and params.means.shape == (4, 5, 3, 2)
    assert params.prec_chol.shape == (4, 5, 3, 2, 2) and distinct_ok.shape == (4, 5)
    torch.testing.assert_close(params.log_weights.exp().sum(-1), torch.ones(4, 5, dtype=torch.float64))
    assert all(bool(torch.isfinite(t).all()) for t in params)


@pytest.mark.parametrize("method", INIT_METHODS)
def test_a_series_starts_the_same_alone_as_in_a_batch(method):
    x = clusters(3, n=80, seed=2)
    (batched, _), _, _ = start(x, method)
    (alone, _), _, _ = start(x[1:2], method)
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a[1:2], b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["kmeans", "k-means++", "random_from_data"])
def test_padding_with_zero_weight_changes_no_start(method):
    x = clusters(1, n=80, seed=3)
    padded = torch.cat([x, torch.full((1, 20, 2), 1e6, dtype=x.dtype)], 1)
    w = torch.cat([torch.ones(1, 80), torch.zeros(1, 20)], 1).to(x.dtype)
    (plain, _), _, _ = start(x, method)
    (pad, _), _, _ = start(padded, method, w=w)
    for a, b in zip(plain, pad):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_fewer_distinct_points_than_components_is_reported():
    x = torch.tensor([[[0.0], [0.0], [1.0], [1.0]] * 5], dtype=torch.float64)  # two distinct values
    (_, distinct_ok), _, _ = start(x, "kmeans", k=3, n_init=4)
    assert not bool(distinct_ok.any())
    (_, ok2), _, _ = start(x, "kmeans", k=2, n_init=4)
    assert bool(ok2.all())


def test_lloyd_iterations_reach_scikit_learns_kmeans_partition_from_the_same_centers():
    x = clusters(1, n=300, spread=5.0, seed=7)
    w = torch.ones(1, 300, dtype=x.dtype)
    centers0 = x[:, [0, 100, 200]].unsqueeze(1)  # (B, R, K, D)
    labels, centers = kmeans(x, w, centers0, max_iter=100)
    ref = KMeans(3, init=centers0[0, 0].numpy(), n_init=1, max_iter=100, tol=0, algorithm="lloyd").fit(x[0].numpy())
    np.testing.assert_array_equal(labels[0, 0].numpy(), ref.labels_)
    np.testing.assert_allclose(centers[0, 0].numpy(), ref.cluster_centers_, rtol=1e-10, atol=1e-10)


def test_the_same_seed_gives_the_same_start_and_another_seed_another():
    x = clusters(2, n=60, seed=4)
    (a, _), _, _ = start(x, "k-means++", seed=1)
    (b, _), _, _ = start(x, "k-means++", seed=1)
    (c, _), _, _ = start(x, "k-means++", seed=2)
    torch.testing.assert_close(a.means, b.means, rtol=0, atol=0)
    assert not torch.equal(a.means, c.means)


# -- univariate Lloyd steps on the sorted series (init.SortedLine) ---------------------------------


def _line_case(seed, n=40, k=4, r=5, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # many ties: points at midpoints, repeated centers
        x = torch.randint(0, 5, (3, n, 1), generator=g).double()
        centers = torch.randint(0, 5, (3, r, k, 1), generator=g).double()
    else:
        x = torch.randn(3, n, 1, generator=g, dtype=torch.float64)
        centers = torch.randn(3, r, k, 1, generator=g, dtype=torch.float64)
    w = torch.rand(3, n, generator=g, dtype=torch.float64) * (torch.rand(3, n, generator=g) > 0.2)
    return x, w, centers


@pytest.mark.parametrize("seed", range(8))
def test_sorted_lloyd_steps_give_kmeans_partitions_and_centers(seed):
    from torchgmm.init import SortedLine

    x, w, centers = _line_case(seed, k=1 + seed % 5)
    line = SortedLine(x, w)
    for steps in (1, 3, 50):
        labels, expected = kmeans(x, w, centers, max_iter=steps)
        cells, moments, got = line.lloyd(centers, steps)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(line.labels(cells), labels)
        # the cells' moments are the partition's weighted sums
        onehot = (labels.unsqueeze(-2) == torch.arange(centers.shape[2]).unsqueeze(-1)).double() * w.unsqueeze(1).unsqueeze(2)
        xr = x[:, None, None, :, 0]  # (B, 1, 1, N)
        sums = torch.stack([onehot.sum(-1), (onehot * xr).sum(-1), (onehot * xr**2).sum(-1)], -1)  # (B, R, K, 3)
        torch.testing.assert_close(moments, sums, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_sorted_lloyd_breaks_ties_like_kmeans(seed):
    """Points at a midpoint, and points nearest to several equal centers, join the lowest index."""
    from torchgmm.init import SortedLine

    x, w, centers = _line_case(seed, k=5, integer=True)
    labels, expected = kmeans(x, w, centers, max_iter=1)
    cells, _, got = SortedLine(x, w).lloyd(centers, 1)
    assert torch.equal(SortedLine(x, w).labels(cells), labels)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d2_weighting", [True, False])
def test_seeds_on_the_sorted_line_are_the_draws_of_the_pass_over_the_points(d2_weighting):
    """On sorted data the inverse CDF visits the points in the same order, so every draw (and
    the greedy choice among candidates) is the same; ties and repeated values included."""
    from torchgmm.init import SortedLine, _seed_points

    g = torch.Generator().manual_seed(3)
    x = torch.sort(torch.randint(0, 12, (4, 60), generator=g).double() / 3, -1).values.unsqueeze(-1)
    w = torch.rand(4, 60, generator=g, dtype=torch.float64) * (torch.rand(4, 60, generator=g) > 0.1)
    u = torch.rand(4, 25, 3 if d2_weighting else 1, generator=g, dtype=torch.float64)  # (K, R, L)
    direct, ok_direct = _seed_points(x, w, 4, 25, None, d2_weighting=d2_weighting, u=u)
    line, ok_line = _seed_points(x, w, 4, 25, None, d2_weighting=d2_weighting, u=u, line=SortedLine(x, w))
    assert torch.equal(line, direct) and torch.equal(ok_line, ok_direct)


def test_seeds_on_the_sorted_line_of_shuffled_data_follow_the_same_distribution():
    from torchgmm.init import SortedLine, _seed_points

    x = torch.tensor([[5.0, 0.0, 9.0, 2.0, 0.0, 5.0, 1.0]], dtype=torch.float64).unsqueeze(-1)
    w = torch.tensor([[1.0, 1.0, 1.0, 2.0, 1.0, 0.5, 1.0]], dtype=torch.float64)
    u = torch.rand(3, 20000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sets = []
    for line in (None, SortedLine(x, w)):
        seeds, _ = _seed_points(x, w, 3, 20000, None, d2_weighting=True, u=u, line=line)
        key = torch.sort(seeds[0, :, :, 0], -1).values @ torch.tensor([100.0, 10.0, 1.0], dtype=torch.float64)
        sets.append(torch.unique(key, return_counts=True))
    assert torch.equal(sets[0][0], sets[1][0])  # the same seed sets occur
    np.testing.assert_allclose(sets[0][1] / 20000, sets[1][1] / 20000, atol=0.01)  # as often (3 sigma ~ 0.01)


@pytest.mark.parametrize("method", ["kmeans", "k-means++", "random_from_data"])
def test_a_univariate_series_starts_the_same_alone_as_in_a_batch_on_the_sorted_line(method):
    from torchgmm.init import LINE_MIN_POINTS

    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 300, 1, generator=g, dtype=torch.float64) + torch.tensor([0.0, 4.0, 9.0]).repeat(100)[:, None]
    assert 300 * 4 >= LINE_MIN_POINTS  # the sorted-line path
    (batched, _), _, _ = start(x, method, n_init=4)
    (alone, _), _, _ = start(x[3:4], method, n_init=4)
    for a, b in zip(batched, alone):
        torch.testing.assert_close(a[3:4], b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["kmeans", "k-means++", "random_from_data"])
def test_padding_with_zero_weight_changes_no_start_on_the_sorted_line(method):
    """Zero-weight points sort among the others (standardized to 0) but carry no mass: the same
    draws, cells and starts as the unpadded series."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 300, 1, generator=g, dtype=torch.float64) + torch.tensor([0.0, 5.0, 11.0]).repeat(100)[:, None]
    padded = torch.cat([x, torch.full((2, 60, 1), 1e6, dtype=x.dtype)], 1)
    w = torch.cat([torch.ones(2, 300), torch.zeros(2, 60)], 1).to(x.dtype)
    (plain, _), _, _ = start(x, method, n_init=4)  # 300 x 4 points x restarts: the sorted line
    (pad, _), _, _ = start(padded, method, n_init=4, w=w)
    for a, b in zip(plain, pad):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("n", [60, 1100])  # the pass over the points / the sorted line (both n_init)
def test_restart_zero_of_many_is_the_start_of_n_init_1(n):
    """The restarts of ``kmeans`` are seeded and refined together (one seeding call per kind, one
    Lloyd run per step count); restart 0 keeps the draws and the start of a single fit."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, n, 1, generator=g, dtype=torch.float64) + torch.tensor([0.0, 3.0, 7.0]).repeat(n)[:n, None]
    (one, _), _, _ = start(x, "kmeans", n_init=1)
    (many, ok), _, _ = start(x, "kmeans", n_init=10)
    for a, b in zip(one, many):
        torch.testing.assert_close(b[:, :1], a, rtol=1e-12, atol=1e-12)
    assert bool(ok.all()) and len({tuple(m) for m in many.means[0, :, :, 0].tolist()}) > 5  # the others differ


def test_the_fast_series_sort_is_torchs_stable_sort():
    """float32 rows on the CPU sort as packed integer keys: ties (by index), -0.0 == 0.0, extremes
    and subnormals in torch's order; other dtypes go to torch.sort."""
    from torchgmm.init import _sort_series

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (50, 200), generator=g).float() / 2
    x[:, ::9], x[:, 4::9] = 0.0, -0.0
    x[:, 1], x[:, 2] = -torch.finfo(torch.float32).max, torch.finfo(torch.float32).max
    x[:, 3], x[:, 5] = torch.finfo(torch.float32).tiny / 4, -torch.finfo(torch.float32).tiny / 4
    for t in (x, x.double(), torch.randn(7, 33, generator=g)):
        values, order = _sort_series(t)
        expected = torch.sort(t, dim=-1, stable=True)
        assert torch.equal(order, expected.indices) and torch.equal(values, expected.values)


@pytest.mark.parametrize("k", [5, 300])
def test_multivariate_kmeans_assignment_is_the_nearest_center_with_ties_to_the_first(k):
    """The restarts-sharing assignment (distances one product per series, the nearest by reductions
    over K, ranks as bytes; K >= 256 the plain argmin) against exact distances of integer points:
    ties (equal centers, points halfway) go to the lowest index, weights weigh the cells."""
    from torchgmm.init import kmeans_assign

    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (2, 1, 60, 3), generator=gen).double()
    w = torch.randint(0, 3, (2, 1, 60), generator=gen).double()
    centers = torch.randint(-3, 4, (2, 2, k, 3), generator=gen).double()
    centers[:, :, 1] = centers[:, :, 0]  # an equal pair: the second never gets a point
    labels, sums, counts = kmeans_assign(x, w, centers)
    exact = (x.unsqueeze(-3) - centers.unsqueeze(-2)).square().sum(-1)  # (2, 2, K, 60)
    first = exact.argmin(-2)  # torch's argmin: the first minimum
    assert torch.equal(labels, first) and bool((labels != 1).all())
    onehot = torch.nn.functional.one_hot(first, k).double().mT * w.unsqueeze(-2)  # (2, 2, K, 60)
    assert torch.equal(counts.squeeze(-1), onehot.sum(-1))
    torch.testing.assert_close(sums, onehot @ x, rtol=0, atol=1e-12)
    assert len(set(exact.amin(-2).flatten().tolist())) < 60  # ties were there to break
