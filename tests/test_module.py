"""The ``GaussianMixture`` module's basic promises: scikit-learn's method contracts, dtypes,
sampling, ``max_iter=0`` and ``tol=0``, and one warning per call."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm import ConvergenceWarning, GaussianMixture
from conftest import blobs, sklearn_init


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.tensor(blobs(2, n=300, d=2, overlap=0.6))


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """``(2, 3, 150, 2)``."""
    return torch.stack([torch.tensor(blobs(seed, n=150, d=2, overlap=0.6)) for seed in range(6)]).reshape(2, 3, 150, 2)


def quiet(model: GaussianMixture, x, **kwargs) -> GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        return model.fit(x, **kwargs)


def test_fit_returns_self(data):
    model = GaussianMixture(3, random_state=0)
    assert quiet(model, data) is model


def test_fit_predict_equals_fit_then_predict(data, cov_type):
    # few iterations and several restarts: the labels of the last E-step are not yet final
    settings = dict(covariance_type=cov_type, n_init=3, max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        labels = GaussianMixture(3, **settings).fit_predict(data)
        model = GaussianMixture(3, **settings).fit(data)
    assert torch.equal(labels, model.predict(data))


def test_fit_predict_equals_fit_then_predict_in_a_batch(batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        labels = GaussianMixture(3, max_iter=4, random_state=1).fit_predict(batch)
        model = GaussianMixture(3, max_iter=4, random_state=1).fit(batch)
    assert labels.shape == (2, 3, 150)
    assert torch.equal(labels, model.predict(batch))


def test_predict_proba_rows_sum_to_one_and_argmax_is_predict(batch, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), batch)
    proba = model.predict_proba(batch)

    assert proba.shape == (2, 3, 150, 3)
    torch.testing.assert_close(proba.sum(-1), torch.ones(2, 3, 150, dtype=torch.float64))
    assert bool((proba >= 0).all())
    assert torch.equal(proba.argmax(-1), model.predict(batch))


def test_score_is_the_mean_of_score_samples(batch, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), batch)
    per_sample = model.score_samples(batch)

    assert per_sample.shape == (2, 3, 150)
    torch.testing.assert_close(model.score(batch), per_sample.mean(-1))
    torch.testing.assert_close(model(batch), per_sample)  # forward is the same log-density
    weights = torch.rand(2, 3, 150, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.score(batch, sample_weight=weights), (per_sample * weights).sum(-1) / weights.sum(-1))


def test_score_samples_is_the_log_density_of_the_fitted_mixture(data, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), data)
    reference = model.to_distribution().log_prob(data)  # torch.distributions' own density

    torch.testing.assert_close(model.score_samples(data), reference)


@pytest.mark.parametrize("n", [1, 5])
def test_sample_shapes(batch, n):
    model = quiet(GaussianMixture(3, random_state=0), batch)
    x, labels = model.sample(n)

    assert x.shape == (2, 3, n, 2)
    assert labels.shape == (2, 3, n)
    assert x.dtype == torch.float64
    assert bool(((labels >= 0) & (labels < 3)).all())


def test_sample_moments_approach_the_fitted_mixture(data, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), data)
    n = 200_000
    x, labels = model.sample(n, random_state=0)

    weights, means = model.weights_, model.means_
    covs = torchgmm.get_covariance(cov_type).full_covariance(model.precisions_cholesky_, 3, 2)
    freq = torch.bincount(labels, minlength=3).double() / n
    torch.testing.assert_close(freq, weights, rtol=0, atol=5 * (0.25 / n) ** 0.5)
    for k in range(3):
        xk = x[labels == k]
        se = (covs[k].diagonal() / len(xk)).sqrt()
        assert bool(((xk.mean(0) - means[k]).abs() < 5 * se).all()), f"component {k} mean"
        torch.testing.assert_close(torch.cov(xk.T), covs[k], rtol=0.05, atol=0.05 * float(covs[k].diagonal().max()))
    # and the mixture's overall moments
    overall_mean = (weights[:, None] * means).sum(0)
    torch.testing.assert_close(x.mean(0), overall_mean, rtol=0, atol=0.05)


def test_sample_with_the_same_random_state_is_reproducible(data):
    model = quiet(GaussianMixture(2, random_state=0), data)
    a, la = model.sample(50, random_state=3)
    b, lb = model.sample(50, random_state=3)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_float64_in_gives_float64_out(data, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), data)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "lower_bound_", "lower_bounds_"):
        assert getattr(model, name).dtype == torch.float64, name
    for out in (model.score_samples(data), model.predict_proba(data), model.score(data), model.bic(data)):
        assert out.dtype == torch.float64


def offset_tight_float32(d: int, seed: int = 0) -> torch.Tensor:
    """Three clusters of unit-scale spread, shrunk to scale 1e-2 and shifted by 1e4, in float32
    (whose spacing at 1e4 is ~1e-3: a tenth of the spread)."""
    rng = np.random.default_rng(seed)
    z = np.concatenate([rng.normal(c, s, (n, d)) for c, s, n in ((-6, 1.0, 100), (0, 1.5, 120), (6, 0.8, 80))])
    return (1e4 + 1e-2 * torch.tensor(z[rng.permutation(len(z))])).float()


def test_float32_on_offset_tightly_scaled_data_matches_float64(cov_type):
    x32 = offset_tight_float32(d=1)
    x64 = x32.double()  # the very same values
    settings = dict(covariance_type=cov_type, random_state=0, tol=1e-6, max_iter=300)
    fit32 = quiet(GaussianMixture(3, **settings), x32)
    fit64 = quiet(GaussianMixture(3, **settings), x64)

    assert fit32.means_.dtype == torch.float32
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        assert torch.isfinite(getattr(fit32, name)).all(), name
    ll32 = float(fit32.score(x32))
    assert np.isfinite(ll32)
    assert abs(ll32 - float(fit64.score(x64))) < 1e-3


def test_float32_fit_loses_only_the_rounding_of_its_means(cov_type):
    """In float32 the means themselves are rounded to ~1e-3 at 1e4, which costs up to ~1e-3 of
    mean log-likelihood per feature on this data; the fit must lose nothing beyond that (no
    E[xx] - mu mu^T cancellation): it scores like the float64 optimum with float32 means."""
    x32 = offset_tight_float32(d=2, seed=1)
    x64 = x32.double()
    settings = dict(covariance_type=cov_type, random_state=0, tol=1e-6, max_iter=300)
    fit32 = quiet(GaussianMixture(3, **settings), x32)
    best = quiet(GaussianMixture(3, **settings), x64).mixture_params().map(lambda t: t.detach())
    rounded = best._replace(means=best.means.float().double())

    ll_rounded = float(torchgmm.log_prob(x64, rounded, cov_type).mean())
    assert abs(float(fit32.score(x32)) - ll_rounded) < 1e-4


def test_max_iter_zero_returns_the_given_init_without_convergence_warning(data, cov_type):
    init = sklearn_init(data.numpy(), 3, cov_type)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = GaussianMixture(3, covariance_type=cov_type, max_iter=0, **init).fit(data)

    assert int(model.n_iter_) == 0
    assert not bool(model.converged_)
    assert model.lower_bounds_.shape == (0,)
    torch.testing.assert_close(model.weights_, torch.tensor(init["weights_init"]))
    torch.testing.assert_close(model.means_, torch.tensor(init["means_init"]))
    torch.testing.assert_close(model.precisions_, torch.tensor(init["precisions_init"]))
    # lower_bound_ is the mean log-likelihood of those initial parameters
    torch.testing.assert_close(model.lower_bound_, model.score(data))


def test_max_iter_zero_matches_sklearn_initialization(data, cov_type):
    """sklearn's ``max_iter=0`` fit returns its k-means initialization; from the same partition
    (given as means) torchgmm's ``max_iter=0`` returns the same parameters."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    sk = SkGaussianMixture(3, covariance_type=cov_type, max_iter=0, random_state=0).fit(data.numpy())
    model = GaussianMixture(
        3, covariance_type=cov_type, max_iter=0,
        weights_init=sk.weights_, means_init=sk.means_, precisions_init=sk.precisions_,
    ).fit(data)
    np.testing.assert_allclose(model.precisions_cholesky_.numpy(), sk.precisions_cholesky_, rtol=1e-10)
    np.testing.assert_allclose(model.score_samples(data).numpy(), sk.score_samples(data.numpy()), rtol=1e-10)


def test_tol_zero_runs_to_max_iter_and_warns_once_per_call():
    x = torch.stack([torch.tensor(blobs(seed, n=60, d=1, k=2)) for seed in range(50)])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = GaussianMixture(2, tol=0.0, max_iter=7, random_state=0).fit(x)

    assert bool((model.n_iter_ == 7).all())
    assert not bool(model.converged_.any())
    assert bool((model.status_ == torchgmm.FitStatus.NOT_CONVERGED).all())
    convergence = [w for w in record if issubclass(w.category, ConvergenceWarning)]
    assert len(convergence) == 1, [str(w.message) for w in convergence]
    assert "50 of 50" in str(convergence[0].message)


def test_converged_fit_does_not_warn(data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchgmm.FitWarning)
        model = GaussianMixture(3, random_state=0).fit(data)
    assert bool(model.converged_)


def test_refit_gives_the_same_predictions(data):
    model = quiet(GaussianMixture(3, random_state=0), data)
    first = model.predict(data)
    assert torch.equal(quiet(model, data).predict(data), first)


def test_bic_and_aic_count_free_parameters(data, cov_type):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, random_state=0), data)
    n, d, k = len(data), 2, 3
    cov_params = {"full": k * d * (d + 1) // 2, "tied": d * (d + 1) // 2, "diag": k * d, "spherical": k}[cov_type]
    n_params = cov_params + k * d + k - 1
    log_lik = model.score(data) * n
    torch.testing.assert_close(model.bic(data), -2 * log_lik + n_params * np.log(n))
    torch.testing.assert_close(model.aic(data), -2 * log_lik + 2 * n_params)


# -- refits keep the parameter objects (optimizers built before keep working) -------------------
def test_refit_updates_the_parameters_in_place_so_an_optimizer_built_before_still_steps(data):
    model = quiet(GaussianMixture(3, random_state=0), data)
    before = [p for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    quiet(model, torch.flip(data, [0]))  # same shape: new values, same objects

    assert all(a is b for a, b in zip(model.parameters(), before))
    fitted = model.loc.detach().clone()
    optimizer.zero_grad()
    (-model(data).mean()).backward()
    optimizer.step()
    assert not torch.equal(model.loc.detach(), fitted)  # the step moved the model's own means


def test_refit_on_another_batch_shape_replaces_the_parameters(data, batch):
    model = quiet(GaussianMixture(3, random_state=0), data)
    old = model.loc
    quiet(model, batch)

    assert model.loc is not old  # documented: optimizers built before must be rebuilt
    assert model.loc.shape == (2, 3, 3, 2) and isinstance(model.loc, torch.nn.Parameter)
    assert model.predict(batch).shape == (2, 3, 150)


# -- a layer whose shape is known up front -----------------------------------------------------
def test_n_features_creates_a_standard_start_at_construction(cov_type):
    model = GaussianMixture(3, n_features=2, covariance_type=cov_type)
    again = GaussianMixture(3, n_features=2, covariance_type=cov_type)

    assert model.is_fitted and len(list(model.parameters())) == 3
    torch.testing.assert_close(model.weights_, torch.full((3,), 1 / 3))
    eye = torchgmm.get_covariance(cov_type).full_covariance(model.precisions_cholesky_, 3, 2)
    torch.testing.assert_close(eye, torch.eye(2).expand(3, 2, 2))
    assert torch.equal(model.means_, again.means_)  # deterministic
    assert torch.cdist(model.means_, model.means_).add(torch.eye(3)).min() > 0.1  # spread out
    assert model.forward(torch.randn(10, 2)).shape == (10,)
    assert model.status_ is None and model.status_names_ is None


def test_n_features_with_a_batch_shape_and_dtype():
    model = GaussianMixture(2, n_features=3, batch_shape=(4, 5), dtype=torch.float64)
    assert model.loc.shape == (4, 5, 2, 3) and model.loc.dtype == torch.float64
    assert model.weight_logits.shape == (4, 5, 2) and model.prec_chol_raw.shape == (4, 5, 2, 3, 3)
    assert model(torch.randn(7, 3, dtype=torch.float64)).shape == (4, 5, 7)


def test_a_layer_built_with_n_features_trains_from_scratch(data):
    x = data.float()
    model = GaussianMixture(3, n_features=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    start = float(-model(x).detach().mean())
    for _ in range(200):
        optimizer.zero_grad()
        loss = -model(x).mean()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < start - 1.0


def test_fit_on_a_module_built_with_n_features_equals_a_fresh_fit(data):
    layer = quiet(GaussianMixture(3, n_features=2, dtype=torch.float64, random_state=0), data)
    fresh = quiet(GaussianMixture(3, random_state=0), data)
    torch.testing.assert_close(layer.means_, fresh.means_, rtol=0, atol=0)
    assert bool(layer.converged_)


def test_fit_on_a_module_built_with_n_features_checks_the_features(data):
    with pytest.raises(ValueError, match=r"X has 2 features, but the model is expecting 3"):
        GaussianMixture(3, n_features=3).fit(data)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n_features=0), ValueError, r"n_features must be >= 1, got n_features=0"),
        (dict(n_features=2.0), TypeError, r"n_features must be an int"),
        (dict(n_features=2, batch_shape=5), TypeError, r"batch_shape must be a tuple of ints"),
        (dict(n_features=2, batch_shape=(2, -1)), ValueError, r"batch_shape must hold ints >= 0, got batch_shape=\(2, -1\)"),
        (dict(n_features=2, covariance_type="bad"), ValueError, r"covariance_type='bad'"),
    ],
)
def test_invalid_layer_shape_raises_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        GaussianMixture(2, **kwargs)


# -- warnings point at the caller's line -------------------------------------------------------
def test_convergence_warning_points_at_the_callers_line(data):
    with pytest.warns(ConvergenceWarning) as record:
        GaussianMixture(3, max_iter=1, tol=0.0, random_state=0).fit(data)
    assert record[0].filename == __file__


def test_warnings_of_fit_predict_point_at_the_callers_line(data):
    with pytest.warns(ConvergenceWarning) as record:
        GaussianMixture(3, max_iter=1, tol=0.0, random_state=0).fit_predict(data)
    assert record[0].filename == __file__


def test_degenerate_warning_points_at_the_callers_line():
    x = torch.cat([torch.full((30,), 5.0), torch.linspace(0, 10, 30)]).double()
    with pytest.warns(torchgmm.DegenerateWarning) as record:
        GaussianMixture(3, reg_covar=1e-9, n_init=3, random_state=0).fit(x)
    assert all(w.filename == __file__ for w in record)


def test_data_warnings_raised_inside_fit_point_at_the_callers_line():
    tiny = torch.linspace(0, 1e-5, 40, dtype=torch.float64)  # variance far below reg_covar
    repeated = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0], dtype=torch.float64)  # 2 distinct values, K = 3
    for model, x, message in [
        (GaussianMixture(2, reg_covar=1e-3, random_state=0), tiny, "is larger than the data variance"),
        (GaussianMixture(3, random_state=0), repeated, "fewer distinct points than n_components=3"),
    ]:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model.fit(x)
        assert any(message in str(w.message) for w in record), [str(w.message) for w in record]
        assert all(issubclass(w.category, torchgmm.FitWarning) for w in record)
        assert [w.filename for w in record] == [__file__] * len(record)


def test_fit_still_raises_when_errors_follow_warnings(data):
    with pytest.raises(ValueError, match="reg_covar must be >= 0"):
        GaussianMixture(3, reg_covar=-1.0).fit(data)


# -- the module documents itself ------------------------------------------------------------------
def test_class_docstring_documents_every_setting_and_the_attributes():
    import inspect

    doc = GaussianMixture.__doc__
    parameters, attributes = doc.split("Parameters\n    ----------")[1].split("Attributes\n    ----------")
    for name in list(inspect.signature(GaussianMixture.__init__).parameters)[1:]:
        assert f"\n    {name} :" in parameters or f" {name}," in parameters or f", {name} :" in parameters, name
    for name in ("weights_", "means_", "covariances_", "converged_", "n_iter_", "lower_bound_", "lower_bounds_",
                 "status_", "status_names_", "n_features_in_"):
        assert name in attributes, name
    assert "FitStatus" in attributes.split("status_ :")[1].split("status_names_")[0]


def test_status_names_give_the_fit_status_of_every_series():
    x = torch.stack([torch.tensor(blobs(seed, n=60, d=1, k=2)) for seed in range(4)]).reshape(2, 2, 60, 1)
    model = quiet(GaussianMixture(2, max_iter=1, tol=0.0, random_state=0), x)

    names = model.status_names_
    assert isinstance(names, np.ndarray) and names.shape == (2, 2)
    expected = [[torchgmm.FitStatus(int(c)).name for c in row] for row in model.status_.tolist()]
    assert names.tolist() == expected and names[0, 0] == "NOT_CONVERGED"


def test_warm_start_one_step_refits_converge_as_scikit_learns_do():
    """Defect: with warm_start=True, max_iter=1, refitting until converged_ never converged (the
    first change was measured against -inf). Now it is measured against the previous lower_bound_,
    as scikit-learn does: both converge on the same refit."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, dtype=torch.float64, generator=gen)
    x[:150] += 4
    ours = torchgmm.GaussianMixture(2, warm_start=True, max_iter=1, random_state=0)
    theirs = SkGaussianMixture(2, warm_start=True, max_iter=1, random_state=0)
    refits = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model, done in (("ours", ours, lambda: bool(ours.converged_)), ("theirs", theirs, lambda: theirs.converged_)):
            for i in range(1, 30):
                model.fit(x if name == "ours" else x.numpy())
                if done():
                    refits[name] = i
                    break
    assert refits.get("ours") == refits.get("theirs") == 2
