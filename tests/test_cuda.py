"""CUDA paths: the same answers on the GPU as on the CPU. Skipped without a CUDA device."""

import numpy as np
import pytest
import torch

import torchgmm

pytestmark = pytest.mark.cuda


def _batch(n_series=64, n=300, seed=0):
    rng = np.random.default_rng(seed)
    x = np.empty((n_series, n, 1))
    for b in range(n_series):
        mu, sd = rng.normal(0, 5, 3), rng.uniform(0.5, 2, 3)
        z = rng.choice(3, n)
        x[b, :, 0] = rng.normal(mu[z], sd[z])
    return torch.tensor(x)


@pytest.mark.parametrize("cov_type", ["full", "tied", "diag", "spherical"])
def test_cuda_float64_fit_equals_cpu_fit_from_the_same_start(cov_type):
    x = _batch()
    start = torchgmm.fit(x, 3, covariance_type=cov_type, max_iter=0, random_state=0, warn=False)
    kwargs = dict(covariance_type=cov_type, tol=1e-8, max_iter=300, weights_init=start.weights,
                  means_init=start.means, precisions_init=start.precisions, warn=False)
    cpu = torchgmm.fit(x, 3, **kwargs)
    gpu = torchgmm.fit(x.cuda(), 3, **{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
    assert gpu.means.device.type == "cuda"
    torch.testing.assert_close(gpu.lower_bound.cpu(), cpu.lower_bound, rtol=0, atol=1e-9)
    torch.testing.assert_close(gpu.means.cpu(), cpu.means, rtol=1e-7, atol=1e-7)
    assert torch.equal(gpu.status.cpu(), cpu.status)


def test_cuda_compiled_float32_fit_matches_eager_quality():
    x = _batch(256).float().cuda()
    eager = torchgmm.fit(x, 3, n_init=4, random_state=0, compile=False, warn=False)
    fused = torchgmm.fit(x, 3, n_init=4, random_state=0, compile=True, warn=False)
    assert torch.isfinite(fused.lower_bound).all()
    assert abs(float(fused.lower_bound.mean() - eager.lower_bound.mean())) < 1e-3


def test_cuda_module_methods_stay_on_device_and_state_dict_loads_on_cpu():
    x = _batch(8).float().cuda()
    gm = torchgmm.GaussianMixture(3, random_state=0).fit(x)
    assert gm.predict(x).device.type == "cuda" and gm.score(x).device.type == "cuda"
    sample, labels = gm.sample(50)
    assert sample.shape == (8, 50, 1) and sample.device.type == "cuda"
    fresh = torchgmm.GaussianMixture(3)
    fresh.load_state_dict({k: v.cpu() for k, v in gm.state_dict().items()})
    torch.testing.assert_close(fresh.score_samples(x.cpu()), gm.score_samples(x).cpu(), rtol=1e-5, atol=1e-5)
