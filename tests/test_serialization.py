"""``GaussianMixture.save(path)`` and ``torchgmm.load(path)``: one ``weights_only``-safe file with
the settings, the parameters and the fitted state; the loaded model predicts bit for bit as the
saved one; files that are not torchgmm models are refused with a clear ValueError."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm import GaussianMixture
from torchgmm.serialization import FORMAT, FORMAT_VERSION
from conftest import blobs


def quiet(model: GaussianMixture, x, **kwargs) -> GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        return model.fit(x, **kwargs)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """``(2, 3, 80, 2)``."""
    return torch.stack([torch.tensor(blobs(seed, n=80, d=2, overlap=0.6)) for seed in range(6)]).reshape(2, 3, 80, 2)


def assert_same_predictions(a: GaussianMixture, b: GaussianMixture, x: torch.Tensor) -> None:
    assert torch.equal(a.predict_proba(x), b.predict_proba(x))
    assert torch.equal(a.score_samples(x), b.score_samples(x))
    assert torch.equal(a.predict(x), b.predict(x))


def plain(value) -> bool:
    """Only tensors, dicts, lists, tuples, str, int, float, bool and None."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or type(value) in (torch.Tensor, str, int, float, bool)


def test_a_loaded_model_predicts_bit_for_bit_as_the_saved_one(batch, cov_type, tmp_path):
    model = quiet(GaussianMixture(3, covariance_type=cov_type, n_init=2, max_iter=20, random_state=0), batch)
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = torchgmm.load(path)

    assert isinstance(loaded, GaussianMixture) and loaded.covariance_type == cov_type
    assert_same_predictions(model, loaded, batch)
    for name in ("weight_logits", "loc", "prec_chol_raw"):
        assert torch.equal(getattr(model, name), getattr(loaded, name)), name
        assert isinstance(getattr(loaded, name), torch.nn.Parameter)
    for name in ("converged_", "n_iter_", "lower_bound_", "status_"):
        assert torch.equal(getattr(model, name), getattr(loaded, name)), name
    torch.testing.assert_close(loaded.lower_bounds_, model.lower_bounds_, rtol=0, atol=0, equal_nan=True)
    assert loaded.status_names_.tolist() == model.status_names_.tolist()


def test_the_file_holds_only_plain_data_and_reads_with_weights_only(batch, tmp_path):
    model = quiet(GaussianMixture(2, max_iter=5, random_state=0), batch)
    model.save(tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)

    assert raw["format"] == FORMAT and raw["format_version"] == FORMAT_VERSION == 1
    assert raw["torchgmm_version"] == torchgmm.__version__
    assert set(raw["parameters"]) == {"weight_logits", "loc", "prec_chol_raw"}
    assert {"converged_", "n_iter_", "lower_bound_", "lower_bounds_", "status_"} <= set(raw["buffers"])
    assert plain(raw)


def test_settings_are_restored(batch, tmp_path):
    init_means = np.array([[-1.0, 0.0], [1.0, 0.5]])
    model = GaussianMixture(
        2, covariance_type="diag", tol=1e-5, reg_covar=1e-4, max_iter=7, n_init=1, init_params="random",
        means_init=init_means, weights_init=[0.4, 0.6], random_state=12, warm_start=True, dtype=torch.float32,
        nan_policy="omit", chunk_size=64, method="squarem", prior={"shrinkage": 0.02, "dof": 5.0}, compile=False,
    )
    quiet(model, batch)
    model.save(tmp_path / "m.pt")
    loaded = torchgmm.load(tmp_path / "m.pt")

    for name, value in model._settings().items():
        restored = getattr(loaded, name) if name != "batch_shape" else loaded._settings()["batch_shape"]
        if isinstance(value, np.ndarray):
            assert isinstance(restored, np.ndarray) and np.array_equal(restored, value), name
        else:
            assert restored == value and type(restored) is type(value), name
    assert loaded.loc.dtype == torch.float32
    assert_same_predictions(model, loaded, batch.float())


def test_a_generator_random_state_is_saved_as_none(tmp_path, batch):
    model = quiet(GaussianMixture(2, max_iter=5, random_state=torch.Generator().manual_seed(0)), batch)
    model.save(tmp_path / "m.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["settings"]["random_state"] is None
    assert torchgmm.load(tmp_path / "m.pt").random_state is None


def test_an_unsavable_setting_is_a_type_error_naming_it(tmp_path):
    model = GaussianMixture(2, prior=object())
    with pytest.raises(TypeError, match=r"cannot save the setting prior=<object .*> of type object"):
        model.save(tmp_path / "m.pt")


def test_an_unfitted_model_round_trips_unfitted(tmp_path):
    GaussianMixture(4, covariance_type="tied").save(tmp_path / "m.pt")
    loaded = torchgmm.load(tmp_path / "m.pt")
    assert not loaded.is_fitted and loaded.n_components == 4 and loaded.covariance_type == "tied"


def test_a_trained_layer_round_trips(tmp_path):
    x = torch.tensor(blobs(3, n=200), dtype=torch.float32)
    layer = GaussianMixture(3, n_features=2, batch_shape=(2,))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        (-layer(x).mean()).backward()
        optimizer.step()
    layer.save(tmp_path / "layer.pt")
    loaded = torchgmm.load(tmp_path / "layer.pt")

    assert loaded.n_features == 2 and loaded._settings()["batch_shape"] == (2,)
    assert torch.equal(loaded(x), layer(x).detach())
    assert loaded.status_ is None  # trained, not fitted: no fit state


def test_a_file_object_works(tmp_path, batch):
    import io

    model = quiet(GaussianMixture(2, max_iter=5, random_state=0), batch)
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    assert_same_predictions(model, torchgmm.load(buffer), batch)


def test_extra_buffers_are_saved_and_restored_generically(tmp_path, batch, monkeypatch):
    import torchgmm.mixture

    monkeypatch.setattr(torchgmm.mixture, "_BUFFERS", torchgmm.mixture._BUFFERS + ("criterion_",))
    model = quiet(GaussianMixture(2, max_iter=5, random_state=0), batch)
    model.criterion_ = torch.arange(6.0).reshape(2, 3)
    model.save(tmp_path / "m.pt")
    loaded = torchgmm.load(tmp_path / "m.pt")
    assert torch.equal(loaded.criterion_, model.criterion_)
    assert "criterion_" in dict(loaded.named_buffers())


def test_load_device_argument_places_the_tensors(tmp_path, batch):
    model = quiet(GaussianMixture(2, max_iter=5, random_state=0), batch)
    model.save(tmp_path / "m.pt")
    loaded = torchgmm.load(tmp_path / "m.pt", device="cpu")
    assert loaded.loc.device.type == "cpu" and loaded.status_.device.type == "cpu"
    assert loaded.device == "cpu"  # the setting follows, so a refit runs there


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: p.write_bytes(b"this is not a torch file"), r"is not a torchgmm model file \(torch.load"),
        (lambda p: torch.save({"weights": torch.ones(3)}, p), r"is not a torchgmm model file \(it holds a dict with keys \['weights'\]"),
        (lambda p: torch.save(torch.ones(3), p), r"is not a torchgmm model file \(it holds a Tensor"),
        (lambda p: torch.save(GaussianMixture(2).state_dict(), p), r"is not a torchgmm model file"),
        (lambda p: torch.save({"format": FORMAT, "format_version": 1, "settings": {}, "parameters": {"loc": 3},
                               "buffers": {}}, p), r"its entry 'loc' is a int, not a tensor"),
    ],
    ids=["bytes", "other-dict", "tensor", "state-dict", "bad-entry"],
)
def test_a_file_that_is_not_a_torchgmm_model_is_a_clear_value_error(tmp_path, write, message):
    path = tmp_path / "other.pt"
    write(path)
    with pytest.raises(ValueError, match=message):
        torchgmm.load(path)


def test_a_file_of_a_newer_format_asks_to_upgrade(tmp_path):
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION + 1, "torchgmm_version": "9.0",
                "settings": {}, "parameters": {}, "buffers": {}}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match=r"format version 2 \(torchgmm 9.0\).*reads versions up to 1: upgrade torchgmm"):
        torchgmm.load(tmp_path / "new.pt")


def test_a_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        torchgmm.load(tmp_path / "absent.pt")


@pytest.mark.cuda
def test_a_model_fitted_on_the_gpu_loads_on_the_cpu(tmp_path, batch):
    model = quiet(GaussianMixture(2, max_iter=10, random_state=0, device="cuda"), batch)
    assert model.loc.device.type == "cuda"
    model.save(tmp_path / "gpu.pt")
    loaded = torchgmm.load(tmp_path / "gpu.pt")  # map_location="cpu" by default

    assert loaded.loc.device.type == "cpu" and loaded.status_.device.type == "cpu"
    for name in ("weight_logits", "loc", "prec_chol_raw", "converged_", "n_iter_", "status_"):
        assert torch.equal(getattr(loaded, name), getattr(model, name).cpu()), name
    torch.testing.assert_close(loaded.predict_proba(batch), model.predict_proba(batch.cuda()).cpu())
    back = torchgmm.load(tmp_path / "gpu.pt", device="cuda")
    assert back.loc.device.type == "cuda"
    assert torch.equal(back.predict_proba(batch.cuda()), model.predict_proba(batch.cuda()))
