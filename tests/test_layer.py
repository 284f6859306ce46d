"""The GMM as a torch layer: differentiable forward / log_responsibilities / component_log_prob,
the functional API on raw parameter tensors, torch.distributions, state_dict, devices, dtypes and
torch.compile."""

from __future__ import annotations

import io
import time

import pytest
import torch
from torch.func import functional_call

import torchgmm
from torchgmm import GaussianMixture, GMMParams

from test_gradient import COV_TYPES, clusters

PARAMS = ("weight_logits", "loc", "prec_chol_raw")


def fitted(cov_type: str, n_series: int = 0, k: int = 3, dtype=torch.float64) -> GaussianMixture:
    x = clusters(max(n_series, 1), n=120, spread=3.0).to(dtype)
    x = x[0] if n_series == 0 else x
    return GaussianMixture(k, covariance_type=cov_type, random_state=0, max_iter=30).fit(x)


def points(n: int = 7, d: int = 2, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype) * 2.0


@pytest.mark.parametrize("cov_type", COV_TYPES)
@pytest.mark.parametrize("output", ["forward", "log_responsibilities", "component_log_prob"])
def test_layer_outputs_pass_gradcheck(cov_type, output):
    model = fitted(cov_type)
    x = points()
    names = PARAMS

    def fn(x, *values):
        return getattr(functional_call_module(model, dict(zip(names, values))), output)(x)

    inputs = (x.requires_grad_(True),) + tuple(getattr(model, n).detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def functional_call_module(model: GaussianMixture, values: dict) -> GaussianMixture:
    """A copy of ``model`` whose parameters are the given (differentiable) tensors."""
    clone = GaussianMixture(model.n_components, covariance_type=model.covariance_type)
    for name, value in values.items():
        delattr(clone, name)
        setattr(clone, name, value)  # plain tensors: gradients flow to the caller's leaves
    return clone


def test_functional_call_of_forward_matches_the_functional_api():
    model = fitted("tied")
    x = points()
    values = {name: getattr(model, name).detach() * 1.01 for name in PARAMS}
    out = functional_call(model, values, (x,))
    cov = torchgmm.get_covariance("tied")
    params = GMMParams(torch.log_softmax(values["weight_logits"], -1), values["loc"], cov.from_unconstrained(values["prec_chol_raw"]))
    torch.testing.assert_close(out, torchgmm.log_prob(x, params, cov))


def test_batched_forward_broadcasts_one_input_against_all_series():
    model = fitted("diag", n_series=3)
    x = points()
    out = model(x)
    assert out.shape == (3, 7)
    for b in range(3):
        params = model.mixture_params().map(lambda t: t[b])
        torch.testing.assert_close(out[b], torchgmm.log_prob(x, params, "diag"))


def test_gradients_reach_inputs_and_parameters():
    model = fitted("full")
    x = points().requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    for name in PARAMS:
        grad = getattr(model, name).grad
        assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_functional_api_trains_a_mixture_density_network():
    """Parameter tensors produced by a network, fed straight to torchgmm.log_prob (conditional
    density p(y | c) with K=2 diagonal components)."""
    torch.manual_seed(0)
    n, k, d = 256, 2, 1
    c = torch.rand(n, 1) * 2 - 1
    branch = (torch.rand(n, 1) < 0.5).float()
    y = torch.where(branch > 0, 2 * c, -2 * c) + 0.1 * torch.randn(n, 1)  # two arms: y = +-2c
    cov = torchgmm.get_covariance("diag")
    net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, k + k * d + k * d))
    opt = torch.optim.Adam(net.parameters(), lr=0.02)

    def loss_fn():
        out = net(c)
        logits, means, raw = out.split([k, k * d, k * d], -1)
        params = GMMParams(torch.log_softmax(logits, -1), means.reshape(n, k, d), cov.from_unconstrained(raw.reshape(n, k, d)))
        return -torchgmm.log_prob(y.unsqueeze(-2), params, cov).mean()  # (n, 1) -> one point per condition

    first = float(loss_fn().detach())
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first - 1.0


def test_to_distribution_log_prob_equals_forward():
    for cov_type in COV_TYPES:
        model = fitted(cov_type, n_series=2)
        x = points().unsqueeze(-2)  # (7, 1, D): sample shape (7,) against batch (2,)
        dist = model.to_distribution()
        assert isinstance(dist, torch.distributions.MixtureSameFamily)
        torch.testing.assert_close(dist.log_prob(x), model(points()).mT, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cov_type", COV_TYPES)
def test_state_dict_round_trips_into_a_fresh_model(cov_type):
    model = fitted(cov_type, n_series=2)
    x = points()
    fresh = GaussianMixture(3, covariance_type=cov_type)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded = GaussianMixture(3, covariance_type=cov_type)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.means_, model.means_)
    assert torch.equal(loaded.status_, model.status_)


def test_dtype_and_device_moves():
    model = fitted("full")
    x = points()
    expected = model(x)
    model32 = model.to(torch.float32)
    out32 = model32(x.float())
    assert out32.dtype == torch.float32 and model32.loc.dtype == torch.float32
    torch.testing.assert_close(out32, expected.float(), rtol=1e-4, atol=1e-4)
    cpu = model32.to("cpu")
    assert cpu.loc.device.type == "cpu"


@pytest.mark.cuda
def test_cuda_forward_matches_cpu():
    model = fitted("full")
    x = points()
    expected = model(x)
    moved = model.to("cuda")
    out = moved(x.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-9, atol=1e-9)
    out.sum().backward()
    assert moved.loc.grad is not None and moved.loc.grad.device.type == "cuda"


def test_torch_compile_forward_matches_eager():
    model = fitted("full", n_series=2)
    x = points(64)
    eager = model(x)
    compiled = torch.compile(model)
    start = time.perf_counter()
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-10, atol=1e-10)
    assert time.perf_counter() - start < 120
