"""torchgmm.refine: merge/delete-and-split moves after the restarts (issue 14, part 3)."""

from __future__ import annotations

import pytest
import torch

import torchgmm
from torchgmm import DegenerateWarning, FitStatus, GMMParams
from torchgmm.covariance import get_covariance
from torchgmm.refine import candidate_moves, move_scores, refine

COV_TYPES = ("full", "tied", "diag", "spherical")
CENTRES = torch.tensor([[0.0, 0.0], [6.0, 0.0], [6.0, 6.0]], dtype=torch.float64)


def three_clusters(seed=0, n=150):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.5 + c for c in CENTRES])


# the local optimum: two components share the cluster at (0, 0), one spans the other two
TRAPPED = torch.tensor([[-0.5, 0.0], [0.5, 0.0], [6.0, 3.0]], dtype=torch.float64)


@pytest.mark.parametrize("cov", COV_TYPES)
def test_refine_leaves_the_trap_for_the_best_optimum(cov):
    x = three_clusters()
    trapped = torchgmm.fit(x, 3, covariance_type=cov, means_init=TRAPPED, tol=1e-6, max_iter=500)
    best = torchgmm.fit(x, 3, covariance_type=cov, means_init=CENTRES, tol=1e-6, max_iter=500)
    assert float(best.lower_bound) > float(trapped.lower_bound) + 0.3  # the trap is real
    refined = refine(x, trapped, tol=1e-6, max_iter=500)
    assert float(refined.lower_bound) == pytest.approx(float(best.lower_bound), abs=1e-5)
    found = torch.cdist(CENTRES, refined.means).amin(-1)
    assert bool((found < 0.2).all()), refined.means
    assert int(refined.status) == FitStatus.OK
    # the restarts' record is the original fit's
    assert torch.equal(refined.restart_lower_bounds, trapped.restart_lower_bounds)


def test_refined_lower_bound_is_never_lower():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 120, 2, generator=g, dtype=torch.float64)
    x[:3, :40] += 4.0  # some series with structure, some without
    for cov in COV_TYPES:
        r = torchgmm.fit(x, 4, covariance_type=cov, n_init=2, random_state=0, tol=1e-5, max_iter=300)
        rr = refine(x, r, tol=1e-5, max_iter=300)
        assert bool((rr.lower_bound >= r.lower_bound).all())
        same = rr.lower_bound == r.lower_bound  # untouched series keep everything
        assert int((~same).sum()) >= 2  # the moves do find better optima here
        assert bool(torch.equal(rr.means[same], r.means[same]))
        assert bool((rr.status[~same] < FitStatus.DEGENERATE).all())


def collapsed_candidate(x, w, params, cov, reg, **_):
    """Every candidate puts component 1 on the repeated value (standardized units)."""
    xs = x[0, -1]  # (D,) the repeated point
    b = x.shape[0]
    means = params.means.clone()
    means[:, 1] = xs
    prec = params.prec_chol.clone()
    prec[:, 1] = 1e3  # spherical: a narrow component
    start = GMMParams(params.log_weights, means, prec).map(lambda t: t.unsqueeze(1))
    return start, torch.ones(b, 1, dtype=torch.bool)


def test_a_degenerate_candidate_is_refused():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(200, generator=g, dtype=torch.float64), torch.full((30,), 0.7, dtype=torch.float64)])
    # a clean fit (a few iterations: left alone, EM would find the collapse itself)
    r = torchgmm.fit(x, 2, covariance_type="spherical", means_init=[[-1.0], [1.0]], tol=1e-6, max_iter=3, warn=False)
    assert int(r.status) == FitStatus.NOT_CONVERGED
    # the candidate's refit collapses onto 0.7 with a far higher likelihood ...
    with pytest.warns(DegenerateWarning):
        collapsed = torchgmm.fit(x, 2, covariance_type="spherical", means_init=[[-0.1], [0.7]],
                                 precisions_init=[1.0, 1e6], tol=1e-6, max_iter=500)
    assert int(collapsed.status) == FitStatus.DEGENERATE
    assert float(collapsed.lower_bound) > float(r.lower_bound) + 0.3
    # ... and refine never takes it
    rr = refine(x, r, tol=1e-6, max_iter=500, moves=collapsed_candidate)
    assert float(rr.lower_bound) == float(r.lower_bound)
    assert torch.equal(rr.means, r.means)


def test_a_degenerate_fit_takes_a_clean_candidate():
    x = three_clusters(seed=2, n=60)
    x[:12] = x[0]  # a repeated value for the collapse
    with pytest.warns(DegenerateWarning):
        r = torchgmm.fit(x, 3, covariance_type="full", means_init=x[[0, 100, 150]], precisions_init=torch.stack(
            [torch.eye(2) * 1e6, torch.eye(2), torch.eye(2)]).double(), tol=1e-6, max_iter=500)
    assert int(r.status) == FitStatus.DEGENERATE
    rr = refine(x, r, tol=1e-6, max_iter=500)
    assert int(rr.status) < FitStatus.DEGENERATE


@pytest.mark.parametrize("cov", ["full", "diag"])
def test_batched_equals_per_series(cov):
    x = torch.stack([three_clusters(seed=s, n=80) for s in range(3)])
    x[1] = x[1] * 3.0 + 100.0  # other units: refinement works per series in standardized units
    means = torch.stack([TRAPPED, TRAPPED * 3.0 + 100.0, CENTRES])
    r = torchgmm.fit(x, 3, covariance_type=cov, means_init=means, tol=1e-6, max_iter=500)
    batched = refine(x, r, tol=1e-6, max_iter=500)
    assert bool((batched.lower_bound > r.lower_bound + 0.1)[:2].all())
    for i in range(3):
        alone = torchgmm.fit(x[i], 3, covariance_type=cov, means_init=means[i], tol=1e-6, max_iter=500)
        one = refine(x[i], alone, tol=1e-6, max_iter=500)
        assert float(one.lower_bound) == pytest.approx(float(batched.lower_bound[i]), abs=1e-9)
        torch.testing.assert_close(one.means, batched.means[i], atol=1e-6, rtol=0)
        assert int(one.n_iter) == int(batched.n_iter[i])


def test_padding_and_empty_series_are_left_alone():
    x = torch.stack([three_clusters(seed=4, n=60)] * 3)
    w = torch.ones(x.shape[:-1], dtype=torch.float64)
    w[1, 60:] = 0.0  # series 1: only the first cluster
    w[2] = 0.0  # series 2: empty
    r = torchgmm.fit(x, 3, means_init=TRAPPED, sample_weight=w, tol=1e-6, max_iter=500, warn=False)
    rr = refine(x, r, sample_weight=w, tol=1e-6, max_iter=500)
    assert int(rr.status[2]) == FitStatus.EMPTY and float(rr.lower_bound[2]) == -float("inf")
    assert bool((rr.lower_bound[:2] >= r.lower_bound[:2]).all())
    assert float(rr.lower_bound[0]) > float(r.lower_bound[0]) + 0.3


def test_params_input_and_one_component():
    x = three_clusters(seed=5, n=60)
    trapped = torchgmm.fit(x, 3, means_init=TRAPPED, tol=1e-6, max_iter=500)
    from_params = refine(x, trapped.params, covariance_type="full", tol=1e-6, max_iter=500)
    from_result = refine(x, trapped, tol=1e-6, max_iter=500)
    assert float(from_params.lower_bound) == pytest.approx(float(from_result.lower_bound), abs=1e-6)
    with pytest.raises(ValueError, match="covariance_type"):
        refine(x, trapped.params)
    one = torchgmm.fit(x, 1)
    assert refine(x, one) is one


def test_move_scores_and_candidates():
    x = three_clusters(seed=6, n=50)
    cov = get_covariance("full")
    r = torchgmm.fit(x, 3, means_init=TRAPPED, tol=1e-6, max_iter=500)
    params = r.params.map(lambda t: t.unsqueeze(0))
    _, merge, loss, split = move_scores(x.unsqueeze(0), torch.ones(1, x.shape[0], dtype=x.dtype), params, cov)
    near = torch.cdist(r.means, CENTRES).argmin(-1)  # which cluster each component sits on
    pair = divmod(int(merge.flatten().argmax()), 3)
    assert near[pair[0]] == near[pair[1]] == 0  # the two components sharing a cluster are the most alike
    spanning = int((near != 0).nonzero())
    assert int(split.argmax()) == spanning  # the component over two clusters fits worst
    start, valid = candidate_moves(x.unsqueeze(0), torch.ones(1, x.shape[0], dtype=x.dtype), params, cov,
                                   torch.full((1,), 1e-6, dtype=x.dtype))
    # K = 3: (3 pairs + 2 deletes) x 3 splits + 3 re-splits, less 5 splits of a freed slot and 3
    # crossed merges that split their merged slot (the re-splits)
    assert start.means.shape == (1, 10, 3, 2) and valid.shape == (1, 10)
    assert bool(valid.all())
    assert torch.allclose(start.log_weights.exp().sum(-1), torch.ones(1, 10, dtype=x.dtype))
    # every candidate moves components: none is the input
    moved = (start.means - r.means).abs().amax((-2, -1))
    assert bool((moved > 0.1).all())


def test_model_selection_padding_never_moves():
    g = torch.Generator().manual_seed(8)
    x = torch.stack([three_clusters(seed=7, n=60), torch.randn(180, 2, generator=g, dtype=torch.float64)])
    r = torchgmm.fit(x, [1, 2, 3], n_init=2, random_state=0, tol=1e-6, max_iter=300, warn=False)
    assert bool((r.weights == 0).any())  # a series chose fewer than 3: masked components
    rr = refine(x, r, tol=1e-6, max_iter=300)
    assert torch.equal(rr.weights == 0, r.weights == 0)
    assert bool((rr.lower_bound >= r.lower_bound).all())
    # a 2-component fit padded to 3: every candidate keeps the padding at weight exactly 0
    two = torchgmm.fit(x[0], 2, tol=1e-6, max_iter=300)
    padded = GMMParams(torch.cat([two.params.log_weights, torch.tensor([-float("inf")], dtype=x.dtype)]),
                       torch.cat([two.means, two.means[:1]]), torch.cat([two.precisions_cholesky, two.precisions_cholesky[:1]]))
    start, valid = candidate_moves(x[:1], torch.ones(1, x.shape[1], dtype=x.dtype), padded.map(lambda t: t.unsqueeze(0)),
                                   "full", torch.full((1,), 1e-6, dtype=x.dtype))
    assert bool(valid.any())
    assert bool(torch.isneginf(start.log_weights[..., 2]).all())
    assert torch.allclose(start.log_weights.exp().sum(-1), torch.ones_like(valid, dtype=x.dtype))


# -- the option of fit and GaussianMixture ------------------------------------------------------------
def test_fit_refine_option_is_refine_after_fit():
    x = torch.stack([three_clusters(seed=s) for s in range(3)])  # (3, 450, 2)
    settings = dict(covariance_type="full", means_init=TRAPPED, tol=1e-6, max_iter=500)
    trapped = torchgmm.fit(x, 3, **settings)
    by_hand = refine(x, trapped, tol=1e-6, max_iter=500)
    option = torchgmm.fit(x, 3, refine=True, **settings)
    torch.testing.assert_close(option.lower_bound, by_hand.lower_bound, rtol=0, atol=1e-5)
    torch.testing.assert_close(option.means, by_hand.means, rtol=0, atol=1e-4)
    assert bool((option.lower_bound > trapped.lower_bound + 0.3).all())
    # options reach refine: no rounds, nothing moves
    none = torchgmm.fit(x, 3, refine={"n_rounds": 0}, **settings)  # (threads follow the load: rounding may differ)
    torch.testing.assert_close(none.lower_bound, trapped.lower_bound, rtol=0, atol=1e-5)
    gm = torchgmm.GaussianMixture(3, refine=True, **settings).fit(x)
    torch.testing.assert_close(gm.lower_bound_, by_hand.lower_bound, rtol=0, atol=1e-5)


def test_refine_option_errors_name_the_problem():
    x = three_clusters(n=30)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rounds'\]"):
        torchgmm.fit(x, 3, refine={"rounds": 2})
    with pytest.raises(TypeError, match="refine must be True, False or a dict"):
        torchgmm.fit(x, 3, refine="yes")
    with pytest.raises(ValueError, match="refine\\['n_split'\\]"):
        torchgmm.fit(x, 3, refine={"n_split": -1})
    with pytest.raises(ValueError, match="refine cannot be combined with a list of n_components"):
        torchgmm.fit(x, [2, 3], refine=True)
    with pytest.raises(ValueError, match="refine needs the data in memory"):
        torchgmm.fit(torchgmm.stream.Stream([x[:40], x[40:]]), 3, refine=True)
