"""GaussianHMM: parity with hmmlearn, batching, padding, regime recovery, gradients, bad input."""

import itertools
import warnings

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm import FitStatus, GaussianHMM
from torchgmm.forward_backward import log_likelihood as fb_log_likelihood, posteriors, viterbi

K, D = 3, 2
START = np.array([0.5, 0.3, 0.2])
TRANS = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
MEANS = np.array([[0.0, 0.0], [2.5, 2.5], [-1.5, 1.5]])
COVARS = {  # hmmlearn's covars_ shapes
    "full": np.stack([np.eye(D) + 0.2, 0.8 * np.eye(D), 1.5 * np.eye(D) - 0.3]),
    "tied": np.eye(D) + 0.3,
    "diag": np.array([[1.0, 1.2], [0.8, 0.7], [1.5, 1.1]]),
    "spherical": np.array([1.0, 0.8, 1.5]),
}


def _precisions(ct):
    c = COVARS[ct]
    return np.linalg.inv(c) if ct in ("full", "tied") else 1.0 / c


def _three_regimes(seed=0, n=40):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0, 1, (n, D)), rng.normal(3, 0.7, (n, D)), rng.normal([-2, 2], 1.2, (n, D))])


def _sticky_batch(n_series, n_steps, seed=0, stay=0.95, means=(-3.0, 0.0, 3.0), std=1.0):
    """Univariate sequences from a sticky 3-state HMM: ``(x (B, T, 1), states (B, T))``."""
    rng = np.random.default_rng(seed)
    k = len(means)
    trans = np.full((k, k), (1 - stay) / (k - 1))
    np.fill_diagonal(trans, stay)
    z = np.zeros((n_series, n_steps), dtype=np.int64)
    z[:, 0] = rng.integers(0, k, n_series)
    cum = trans.cumsum(-1)
    for t in range(1, n_steps):
        u = rng.random(n_series)[:, None]
        z[:, t] = (u > cum[z[:, t - 1]]).sum(-1)
    x = np.asarray(means)[z] + std * rng.normal(size=z.shape)
    return torch.tensor(x[..., None]), torch.tensor(z)


def _fit(x, lengths=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GaussianHMM(**kw).fit(x, lengths)


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- parity with hmmlearn ---------------------------------------------------------------------------
@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
def test_parity_with_hmmlearn(ct):
    hmm = pytest.importorskip("hmmlearn.hmm")
    x = _three_regimes()
    n_iter = 5
    # No prior: covars_prior=0 with covars_weight=1 and means_weight=0 make hmmlearn's M-step the
    # maximum-likelihood one; min_covar only enters hmmlearn's own initialization (unused here),
    # so reg_covar=0 on our side. tol=-inf: exactly n_iter iterations.
    ref = hmm.GaussianHMM(K, covariance_type=ct, n_iter=n_iter, tol=-np.inf, init_params="", params="stmc",
                          covars_prior=0.0, covars_weight=1.0, means_weight=0.0, min_covar=0.0)
    ref.startprob_, ref.transmat_, ref.means_, ref.covars_ = START, TRANS, MEANS, COVARS[ct]
    ref.fit(x)
    ours = _fit(torch.tensor(x), n_components=K, covariance_type=ct, tol=0.0, reg_covar=0.0, max_iter=n_iter,
                startprob_init=START, transmat_init=TRANS, means_init=MEANS, precisions_init=_precisions(ct))
    ref_covars = ref._covars_[:, 0] if ct == "spherical" else ref._covars_
    errors = {
        "startprob": _rel(ours.startprob_, ref.startprob_),
        "transmat": _rel(ours.transmat_, ref.transmat_),
        "means": _rel(ours.means_, ref.means_),
        "covars": _rel(ours.covariances_, ref_covars),
        "log_lik history": _rel(ours.lower_bounds_ * len(x), ref.monitor_.history),
        "score": _rel(ours.score(x) * len(x), ref.score(x)),
    }
    assert int(ours.n_iter_) == n_iter
    assert max(errors.values()) < 1e-6, errors
    # Decoding and smoothing of the fitted model agree too.
    np.testing.assert_array_equal(ours.predict(x).numpy(), ref.predict(x))
    np.testing.assert_allclose(ours.predict_proba(x).numpy(), ref.predict_proba(x), atol=1e-9)


def test_parity_with_hmmlearn_float32_standardized_is_close():
    hmm = pytest.importorskip("hmmlearn.hmm")
    x = _three_regimes() * 1000 + 5e4  # large offset and scale: standardization keeps float32 safe
    ref = hmm.GaussianHMM(K, covariance_type="diag", n_iter=5, tol=-np.inf, init_params="", params="stmc",
                          covars_prior=0.0, covars_weight=1.0, means_weight=0.0, min_covar=0.0)
    covs = COVARS["diag"] * 1e6
    ref.startprob_, ref.transmat_, ref.means_, ref.covars_ = START, TRANS, MEANS * 1000 + 5e4, covs
    ref.fit(x)
    ours = _fit(torch.tensor(x, dtype=torch.float32), n_components=K, covariance_type="diag", tol=0.0, reg_covar=0.0,
                max_iter=5, startprob_init=START, transmat_init=TRANS, means_init=MEANS * 1000 + 5e4,
                precisions_init=1 / covs)
    assert _rel(ours.means_, ref.means_) < 1e-5
    assert _rel(ours.covariances_, ref._covars_) < 1e-3
    assert _rel(ours.transmat_, ref.transmat_) < 1e-3


# -- batching and padding -------------------------------------------------------------------------------
@pytest.mark.parametrize("ct", ["full", "diag"])
def test_batched_equals_one_by_one(ct):
    xs = torch.stack([torch.tensor(_three_regimes(seed)) for seed in range(4)])  # (4, 120, 2)
    kw = dict(n_components=K, covariance_type=ct, random_state=0, n_init=2, max_iter=30)
    batched = _fit(xs, **kw)
    for b in range(len(xs)):
        alone = _fit(xs[b], **kw)
        for name in ("startprob_", "transmat_", "means_", "covariances_", "lower_bound_"):
            torch.testing.assert_close(getattr(batched, name)[b], getattr(alone, name), rtol=1e-9, atol=1e-9)
        assert int(batched.n_iter_[b]) == int(alone.n_iter_)


def test_ragged_equals_unpadded():
    seqs = [torch.tensor(_three_regimes(seed, n)) for seed, n in ((0, 40), (1, 25), (2, 33))]
    n_steps = max(len(s) for s in seqs)
    padded = torch.full((len(seqs), n_steps, D), float("nan"), dtype=torch.float64)  # padding may hold anything
    for b, s in enumerate(seqs):
        padded[b, : len(s)] = s
    lengths = torch.tensor([len(s) for s in seqs])
    kw = dict(n_components=K, covariance_type="full", random_state=0, max_iter=40)
    model = _fit(padded, lengths, **kw)
    for b, s in enumerate(seqs):
        alone = _fit(s, **kw)
        for name in ("startprob_", "transmat_", "means_", "covariances_", "lower_bound_"):
            torch.testing.assert_close(getattr(model, name)[b], getattr(alone, name), rtol=1e-8, atol=1e-8)
        n = len(s)
        torch.testing.assert_close(model.score(padded, lengths)[b], alone.score(s))
        path = model.predict(padded, lengths)[b]
        assert bool((path[n:] == -1).all())
        torch.testing.assert_close(path[:n], alone.predict(s))
        proba = model.predict_proba(padded, lengths)[b]
        torch.testing.assert_close(proba[:n], alone.predict_proba(s))
        assert bool((proba[n:] == 0).all())


# -- regime recovery ------------------------------------------------------------------------------------
def test_recovers_sticky_regimes():
    x, z = _sticky_batch(200, 200, seed=1)
    model = _fit(x, n_components=3, covariance_type="diag", random_state=0)
    path = model.predict(x)
    acc = torch.stack([(path == torch.tensor(p)[z]).double().mean(-1) for p in itertools.permutations(range(3))]).amax(0)
    print(f"Viterbi accuracy up to relabelling: mean {float(acc.mean()):.4f}, min {float(acc.min()):.4f}")
    assert float(acc.mean()) >= 0.9
    # The mixture on the same points, which ignores time, does worse.
    gm_path = torchgmm.GaussianMixture(3, covariance_type="diag", random_state=0).fit(x).predict(x)
    gm_acc = torch.stack([(gm_path == torch.tensor(p)[z]).double().mean(-1) for p in itertools.permutations(range(3))]).amax(0)
    assert float(acc.mean()) > float(gm_acc.mean())


# -- the layer: gradients ------------------------------------------------------------------------------
def test_forward_gradcheck():
    x = torch.tensor(_three_regimes(0, 4))[None].repeat(2, 1, 1)  # (2, 12, 2)
    model = _fit(x, n_components=2, covariance_type="full", random_state=0, max_iter=3)
    lengths = torch.tensor([12, 9])
    xin = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda xx: model(xx, lengths), (xin,))
    names = ("startprob_logits", "transmat_logits", "loc", "prec_chol_raw")

    def ll(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x, lengths))

    assert torch.autograd.gradcheck(ll, tuple(getattr(model, n).detach().clone().requires_grad_(True) for n in names))


def test_forward_matches_score_and_posteriors_sum_to_one():
    x, _ = _sticky_batch(5, 60, seed=2)
    model = _fit(x, n_components=3, covariance_type="spherical", random_state=0)
    torch.testing.assert_close(model(x).detach() / 60, model.score(x))
    torch.testing.assert_close(model.predict_proba(x).sum(-1), torch.ones(5, 60, dtype=torch.float64))


def test_viterbi_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    log_start = torch.log_softmax(torch.randn(2, generator=gen, dtype=torch.float64), -1)
    log_trans = torch.log_softmax(torch.randn(2, 2, generator=gen, dtype=torch.float64), -1)
    log_emit = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    best, best_path, total = -np.inf, None, []
    for path in itertools.product(range(2), repeat=6):
        lp = log_start[path[0]] + log_emit[0, path[0]] + sum(
            log_trans[path[t - 1], path[t]] + log_emit[t, path[t]] for t in range(1, 6))
        total.append(float(lp))
        if lp > best:
            best, best_path = float(lp), path
    states, log_p = viterbi(log_start, log_trans, log_emit)
    assert tuple(states.tolist()) == best_path
    assert abs(float(log_p) - best) < 1e-12
    post = posteriors(log_start, log_trans, log_emit)
    assert abs(float(post.log_lik) - float(np.logaddexp.reduce(total))) < 1e-12


# -- settings, initial values, restarts ---------------------------------------------------------------
def test_shapes_attributes_and_sample():
    x, _ = _sticky_batch(6, 50, seed=3)
    x = x.reshape(2, 3, 50, 1).float()
    model = _fit(x, n_components=3, covariance_type="full", random_state=0, n_init=3, max_iter=20)
    assert model.startprob_.shape == (2, 3, 3) and model.transmat_.shape == (2, 3, 3, 3)
    assert model.means_.shape == (2, 3, 3, 1) and model.covariances_.shape == (2, 3, 3, 1, 1)
    assert model.lower_bound_.shape == (2, 3) and model.lower_bounds_.shape == (2, 3, 20)
    assert model.status_.shape == model.converged_.shape == model.n_iter_.shape == (2, 3)
    assert model.means_.dtype == torch.float32
    torch.testing.assert_close(model.transmat_.sum(-1), torch.ones(2, 3, 3))
    xs, states = model.sample(15, random_state=0)
    assert xs.shape == (2, 3, 15, 1) and states.shape == (2, 3, 15)
    assert bool(((states >= 0) & (states < 3)).all())
    assert model.predict(x).shape == (2, 3, 50) and model.predict_proba(x).shape == (2, 3, 50, 3)


def test_max_iter_zero_returns_the_start_and_structural_zeros_stay():
    x = torch.tensor(_three_regimes())
    left_right = np.array([[0.9, 0.1, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 1.0]])
    m0 = _fit(x, n_components=3, max_iter=0, transmat_init=left_right, random_state=0)
    torch.testing.assert_close(m0.transmat_, torch.tensor(left_right))
    m = _fit(x, n_components=3, transmat_init=left_right, startprob_init=[1.0, 0.0, 0.0], random_state=0)
    assert bool((m.transmat_[torch.tensor(left_right) == 0] == 0).all())
    path = m.predict(x)
    assert bool((path.diff() >= 0).all())  # a left-right model never goes back


def test_default_transmat_is_sticky_and_tol_stops():
    x = torch.tensor(_three_regimes())
    m0 = _fit(x, n_components=3, max_iter=0, random_state=0)
    torch.testing.assert_close(m0.transmat_.diagonal(), torch.full((3,), 0.9, dtype=torch.float64))
    m = _fit(x, n_components=3, random_state=0, tol=1e-3)
    assert bool(m.converged_) and int(m.status_) == FitStatus.OK and int(m.n_iter_) < 100


def test_prior_keeps_a_repeated_run_from_collapsing():
    rng = np.random.default_rng(0)
    x = torch.tensor(np.concatenate([rng.normal(0, 1, 30), np.full(20, 5.0), rng.normal(10, 1, 30)]))
    start = dict(means_init=[[0.0], [5.0], [10.0]], precisions_init=np.ones((3, 1, 1)))  # independent of the seeding
    m = _fit(x, n_components=3, random_state=0, **start)
    assert int(m.status_) == FitStatus.DEGENERATE  # a state sits on the repeated value
    assert abs(float(m.means_[1, 0]) - 5.0) < 1e-6
    mp = _fit(x, n_components=3, random_state=0, prior="default", **start)
    assert int(mp.status_) in (FitStatus.OK, FitStatus.NOT_CONVERGED)


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_input():
    x = torch.tensor(_three_regimes())
    bad = x.clone()
    bad[5, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        GaussianHMM(3).fit(bad)
    with pytest.raises(ValueError, match="lengths must be between 1"):
        GaussianHMM(3).fit(x[None].repeat(2, 1, 1), lengths=[120, 121])
    with pytest.raises(ValueError, match="lengths must be between 1"):
        GaussianHMM(3).fit(x[None].repeat(2, 1, 1), lengths=[0, 5])
    with pytest.raises(ValueError, match="lengths has shape"):
        GaussianHMM(3).fit(x[None].repeat(2, 1, 1), lengths=[5, 6, 7])
    with pytest.raises(TypeError, match="integers"):
        GaussianHMM(3).fit(x[None].repeat(2, 1, 1), lengths=[5.5, 6])
    with pytest.raises(ValueError, match="n_components=3 must be <="):
        GaussianHMM(3).fit(x[:2])
    with pytest.raises(ValueError, match="transmat_init must sum to 1"):
        GaussianHMM(3, transmat_init=np.ones((3, 3))).fit(x)
    with pytest.raises(torchgmm.NotFittedError):
        GaussianHMM(3).predict(x)


def test_short_sequence_in_a_batch_is_flagged_not_fatal():
    seqs = torch.stack([torch.tensor(_three_regimes(s)) for s in range(3)])
    lengths = torch.tensor([120, 2, 120])  # K=3 > 2 valid steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = GaussianHMM(3, random_state=0).fit(seqs, lengths)
    assert any(issubclass(w.category, torchgmm.DegenerateWarning) for w in caught)
    assert int(model.status_[1]) == FitStatus.INSUFFICIENT_DATA
    alone = _fit(seqs[2], n_components=3, random_state=0)
    torch.testing.assert_close(model.means_[2], alone.means_)
    assert bool(torch.isfinite(model.means_).all())


# -- the scaled recursion and the univariate step ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scaled_forward_backward_equals_log_space(dtype):
    gen = torch.Generator().manual_seed(0)
    s, t, k = 40, 37, 3
    log_start = torch.log_softmax(torch.randn(s, k, generator=gen, dtype=dtype), -1)
    log_trans = torch.log_softmax(2 * torch.randn(s, k, k, generator=gen, dtype=dtype), -1)
    log_emit = 5 * torch.randn(s, t, k, generator=gen, dtype=dtype)
    valid = torch.arange(t) < torch.randint(1, t + 1, (s,), generator=gen)[:, None]
    padded = torch.where(valid[..., None], log_emit, torch.nan)  # padding may hold NaN
    tol = dict(rtol=0, atol=1e-11) if dtype == torch.float64 else dict(rtol=0, atol=2e-3)
    for mask, emit in ((None, log_emit), (valid, padded)):
        ref = posteriors(log_start, log_trans, emit, mask, log_space=True)
        new = posteriors(log_start, log_trans, emit, mask)
        for a, b in zip(new, ref):
            assert not bool(torch.isnan(a).any())
            torch.testing.assert_close(a, torch.nan_to_num(b), **tol)
        torch.testing.assert_close(fb_log_likelihood(log_start, log_trans, emit, mask), ref.log_lik, **tol)


def test_scaled_recursion_falls_back_to_log_space_near_underflow():
    # A left-right chain whose only reachable state explains step 10 with exp(-2000): the scaled
    # variables underflow there; the member is recomputed in log space, its neighbour is not.
    log_start = torch.log(torch.tensor([[1.0, 0.0, 0.0]] * 2, dtype=torch.float64))
    log_trans = torch.log(torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 1.0]], dtype=torch.float64)).expand(2, 3, 3)
    log_emit = torch.randn(2, 20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    log_emit[0, 1, :] = torch.tensor([-2000.0, -2000.0, 0.0])
    ref = posteriors(log_start, log_trans, log_emit, log_space=True)
    new = posteriors(log_start, log_trans, log_emit)
    assert bool(torch.isfinite(new.log_lik).all())
    for a, b in zip(new, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
def test_univariate_step_equals_the_general_step(ct):
    from torchgmm import hmm as hmm_module
    from torchgmm.covariance import get_covariance

    cov = get_covariance(ct)
    gen = torch.Generator().manual_seed(0)
    b, r, t, k = 4, 2, 50, 3
    x = torch.randn(b, 1, t, 1, generator=gen, dtype=torch.float64)
    valid = (torch.arange(t) < torch.tensor([50, 30, 50, 10])[:, None]).unsqueeze(1)
    var = torch.rand(b, r, 1 if ct == "tied" else k, generator=gen, dtype=torch.float64) + 0.5
    reg = torch.full((b, 1), 1e-6, dtype=torch.float64)
    prec_chol, _ = cov.prec_chol_from_covariance(var.reshape(b, r, *cov.covariance_shape(k, 1)), reg.expand(b, r))
    params = hmm_module.HMMParams(
        torch.log_softmax(torch.randn(b, r, k, generator=gen, dtype=torch.float64), -1),
        torch.log_softmax(torch.randn(b, r, k, k, generator=gen, dtype=torch.float64), -1),
        torch.randn(b, r, k, 1, generator=gen, dtype=torch.float64), prec_chol,
    )
    w_total = valid.sum(-1).double()
    fast = hmm_module._univariate_em_step(x, valid, w_total, params, cov, reg)
    # The general step's parts on the same input (em_step itself takes the fast path for D=1).
    joint, diff = hmm_module.joint_log_prob_and_diff(x, params.emission(), cov)
    post = posteriors(params.log_startprob, params.log_transmat, joint.transpose(-1, -2), valid, log_space=True)
    emission, ok = hmm_module.m_step(hmm_module.statistics(diff, post.gamma.transpose(-1, -2), cov), params.means, cov, reg)
    log_start, log_trans = hmm_module._transitions(post.gamma[..., 0, :], post.trans_counts, params.log_transmat)
    for a, b_ in zip(fast[0], (log_start, log_trans, emission.means, emission.prec_chol)):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[1], post.log_lik / w_total, rtol=1e-12, atol=1e-12)
    assert torch.equal(fast[2], ok)


# -- method="gradient" --------------------------------------------------------------------------------
def test_gradient_stays_at_the_em_solution_and_reaches_it_from_the_start():
    # (a batch where EM and L-BFGS from the k-means start meet for random_state 0-2; on others, e.g.
    # seed 4, L-BFGS from some starts ends in another optimum or a collapsed one)
    x = _sticky_batch(6, 150, seed=5)[0][:3]
    em = _fit(x, n_components=3, covariance_type="diag", random_state=0, tol=1e-10, max_iter=1000)
    at_em = dict(startprob_init=em.startprob_, transmat_init=em.transmat_, means_init=em.means_,
                 precisions_init=em.precisions_)  # batched initial values
    kept = _fit(x, n_components=3, covariance_type="diag", tol=1e-10, max_iter=50, method="gradient", **at_em)
    assert kept.result_.method == "gradient"
    assert bool((kept.score(x) >= em.score(x) - 1e-10).all())
    torch.testing.assert_close(kept.means_, em.means_, rtol=0, atol=1e-4)
    torch.testing.assert_close(kept.transmat_, em.transmat_, rtol=0, atol=1e-4)
    # From the default start (k-means emissions, sticky transitions) L-BFGS reaches EM's optimum.
    grad = _fit(x, n_components=3, covariance_type="diag", random_state=0, tol=1e-9, max_iter=300, method="gradient")
    assert (grad.status_ == FitStatus.OK).all()
    torch.testing.assert_close(grad.score(x), em.score(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad.means_, em.means_, rtol=0, atol=1e-3)
    # Adam moves up the same objective.
    adam = _fit(x, n_components=3, covariance_type="diag", random_state=0, tol=0.0, max_iter=30, method="adam")
    assert bool((adam.lower_bounds_[:, -1] > adam.lower_bounds_[:, 0]).all())
    with pytest.raises(ValueError, match="method must be one of"):
        GaussianHMM(3, method="newton").fit(x)
    with pytest.raises(ValueError, match="prior is only supported"):
        GaussianHMM(3, method="gradient", prior="default").fit(x)


# -- save / load ------------------------------------------------------------------------------------------
def test_save_load_round_trip_and_state_dict_into_an_unfitted_model(tmp_path):
    x, _ = _sticky_batch(4, 60, seed=5)
    x = x.reshape(2, 2, 60, 1)
    model = _fit(x, n_components=3, covariance_type="full", random_state=0, n_init=2, max_iter=15,
                 transmat_init=np.full((3, 3), 1 / 3), method="em")
    path = tmp_path / "hmm.pt"
    model.save(path)
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["format"] == "torchgmm.GaussianHMM"
    loaded = torchgmm.load(path)
    assert isinstance(loaded, GaussianHMM) and loaded.covariance_type == "full" and loaded.n_init == 2
    np.testing.assert_array_equal(loaded.transmat_init, model.transmat_init)
    for name in ("startprob_logits", "transmat_logits", "loc", "prec_chol_raw"):
        assert torch.equal(getattr(loaded, name), getattr(model, name)) and isinstance(getattr(loaded, name), torch.nn.Parameter)
    for name in ("converged_", "n_iter_", "lower_bound_", "status_"):
        assert torch.equal(getattr(loaded, name), getattr(model, name))
    assert torch.equal(loaded.predict(x), model.predict(x))
    assert torch.equal(loaded.score(x), model.score(x))
    assert torch.equal(loaded.predict_proba(x), model.predict_proba(x))
    # state_dict into an unfitted model of the same settings
    fresh = GaussianHMM(3, covariance_type="full")
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="does not fit GaussianHMM"):
        GaussianHMM(2, covariance_type="full").load_state_dict(model.state_dict())
    # an unfitted model saves and loads too; a mixture still loads as a mixture
    GaussianHMM(4, covariance_type="diag").save(tmp_path / "unfitted.pt")
    assert not torchgmm.load(tmp_path / "unfitted.pt").is_fitted
    torchgmm.GaussianMixture(2, max_iter=3, random_state=0).fit(x[0, 0]).save(tmp_path / "gmm.pt")
    assert isinstance(torchgmm.load(tmp_path / "gmm.pt"), torchgmm.GaussianMixture)


@pytest.mark.parametrize("padded", [False, True])
def test_associative_scan_equals_the_recursion_over_time(padded):
    """The O(log T) scans that long sequences take on a GPU give the loop's numbers (float64)."""
    from torchgmm import forward_backward as fb

    gen = torch.Generator().manual_seed(0)
    t, k, s = 45, 3, 6
    start = torch.log_softmax(torch.randn(k, s, dtype=torch.float64, generator=gen), 0)
    trans = torch.log_softmax(torch.randn(k, k, s, dtype=torch.float64, generator=gen), 1)
    e = torch.randn(t, k, s, dtype=torch.float64, generator=gen) * 4
    v = (torch.arange(t)[:, None, None] < torch.tensor([45, 30, 9, 1, 44, 2])[None, None, :]) if padded else None
    loop = fb._posteriors_log(start, trans, e, v)
    scan = fb._posteriors_log(start, trans, e, v, scan=True)
    for a, b in zip(loop, scan):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_a_fit_through_the_scan_equals_the_fit_through_the_loop(monkeypatch):
    from torchgmm import forward_backward as fb

    gen = torch.Generator().manual_seed(3)
    states = (torch.arange(300) // 60) % 2
    x = (states.double() * 4 + torch.randn(2, 300, dtype=torch.float64, generator=gen))[..., None]
    with pytest.warns(torchgmm.ConvergenceWarning):  # five iterations, tol=0: by design
        loop = torchgmm.GaussianHMM(2, covariance_type="diag", random_state=0, max_iter=5, tol=0.0).fit(x)
    monkeypatch.setattr(fb, "_use_scan", lambda e: True)  # as on CUDA for long sequences
    with pytest.warns(torchgmm.ConvergenceWarning):
        scan = torchgmm.GaussianHMM(2, covariance_type="diag", random_state=0, max_iter=5, tol=0.0).fit(x)
    torch.testing.assert_close(scan.transmat_, loop.transmat_, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(scan.means_, loop.means_, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(scan.score(x), loop.score(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padded", [False, True])
def test_viterbi_by_scans_equals_viterbi_over_time(padded, monkeypatch):
    """Viterbi without a loop over time (max-plus scan, back-pointers at once, composed maps) gives
    the loop's path and score."""
    from torchgmm import forward_backward as fb

    gen = torch.Generator().manual_seed(4)
    s, t, k = 8, 50, 3
    ls = torch.log_softmax(torch.randn(s, k, dtype=torch.float64, generator=gen), -1)
    lt = torch.log_softmax(torch.randn(s, k, k, dtype=torch.float64, generator=gen), -1)
    le = torch.randn(s, t, k, dtype=torch.float64, generator=gen) * 3
    valid = (torch.arange(t)[None, :] < torch.tensor([50, 31, 9, 1, 49, 2, 50, 17])[:, None]) if padded else None
    path, score = fb.viterbi(ls, lt, le, valid)
    monkeypatch.setattr(fb, "_use_scan", lambda e: True)
    path_scan, score_scan = fb.viterbi(ls, lt, le, valid)
    assert torch.equal(path, path_scan)
    torch.testing.assert_close(score, score_scan, rtol=1e-12, atol=1e-12)


def test_a_collapsed_state_is_described_as_a_state_without_mixing_weights():
    x = torch.cat([torch.full((30,), 3.0, dtype=torch.float64), torch.linspace(0, 1, 30, dtype=torch.float64)])
    with pytest.warns(torchgmm.DegenerateWarning, match=r"collapsed: state \d on \(3\), variance"):
        hmm = torchgmm.GaussianHMM(2, n_init=2, random_state=0).fit(x)
    assert "weight" not in hmm.summary() and "state" in hmm.summary()


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
def test_bic_and_aic_are_hmmlearns(ct):
    hmm = pytest.importorskip("hmmlearn.hmm")
    x = _three_regimes()
    ours = _fit(torch.tensor(x), n_components=K, covariance_type=ct, tol=0.0, reg_covar=0.0, max_iter=3,
                startprob_init=START, transmat_init=TRANS, means_init=MEANS, precisions_init=_precisions(ct))
    ref = hmm.GaussianHMM(K, covariance_type=ct, init_params="", params="")  # the same parameters, no fit
    ref.startprob_, ref.transmat_, ref.means_ = ours.startprob_.numpy(), ours.transmat_.numpy(), ours.means_.numpy()
    covs = ours.covariances_.numpy()
    ref.covars_ = covs
    ref.n_features = D
    assert ours.n_parameters() == ref._get_n_fit_scalars_per_param()["s"] + sum(
        ref._get_n_fit_scalars_per_param()[c] for c in "tmc")
    np.testing.assert_allclose(float(ours.bic(x)), ref.bic(x), rtol=1e-10)
    np.testing.assert_allclose(float(ours.aic(x)), ref.aic(x), rtol=1e-10)


def test_bic_prefers_the_true_number_of_regimes_per_ragged_sequence():
    x, _ = _sticky_batch(6, 300, seed=4)  # 3 regimes each
    lengths = torch.tensor([300, 250, 300, 200, 300, 280])
    bics = torch.stack([_fit(x, lengths, n_components=k, n_init=3, random_state=0).bic(x, lengths) for k in (1, 2, 3, 4)])
    assert bics.argmin(0).tolist() == [2] * 6  # K = 3 for every sequence
    padded = _fit(x, lengths, n_components=3, n_init=3, random_state=0)
    alone = _fit(x[1, :250], n_components=3, n_init=3, random_state=0)
    torch.testing.assert_close(padded.bic(x, lengths)[1], alone.bic(x[1, :250]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ct", ["full", "tied", "diag", "spherical"])
def test_padded_states_are_never_reached(ct):
    from torchgmm.covariance import get_covariance
    from torchgmm.hmm import pad_states

    x, _ = _sticky_batch(3, 80, seed=1)
    lengths = torch.tensor([80, 60, 70])
    small = _fit(x, lengths, n_components=2, covariance_type=ct, n_init=2, random_state=0)
    big = GaussianHMM(5, covariance_type=ct).set_params_(pad_states(small._detached(), 5, get_covariance(ct)))
    torch.testing.assert_close(big.score(x, lengths), small.score(x, lengths), rtol=1e-12, atol=1e-12)
    assert torch.equal(big.predict(x, lengths), small.predict(x, lengths))
    gamma = big.predict_proba(x, lengths)
    assert float(gamma[..., 2:].abs().max()) == 0.0
    torch.testing.assert_close(gamma[..., :2], small.predict_proba(x, lengths), rtol=1e-12, atol=1e-12)
    assert torch.allclose(big.transmat_.sum(-1), torch.ones(3, 5, dtype=torch.float64))
