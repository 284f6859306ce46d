"""Out-of-core exact EM (``fit`` of a stream of chunks) and online EM (``partial_fit``).

The streamed fit must equal the in-memory fit on the concatenated chunks to float64 round-off:
same initialization (the whole stream fits in the reservoir), same iterations, same parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm.stream import Chunks, Stream, is_stream
from conftest import blobs, quiet_fit, rel_err

TOL = 1e-10  # float64 round-off after tens of EM iterations (summation order differs)


def _close(streamed, in_memory, what=""):
    assert torch.equal(streamed.n_iter, in_memory.n_iter), f"{what}n_iter {streamed.n_iter} != {in_memory.n_iter}"
    assert torch.equal(streamed.status, in_memory.status), what
    for a, b in zip(streamed.params, in_memory.params):
        assert rel_err(a, b) < TOL, f"{what}{rel_err(a, b)}"
    finite = torch.isfinite(in_memory.lower_bound)
    assert rel_err(streamed.lower_bound[finite], in_memory.lower_bound[finite]) < TOL
    torch.testing.assert_close(streamed.lower_bounds, in_memory.lower_bounds, rtol=TOL, atol=TOL, equal_nan=True)


def _ragged_chunks(x: torch.Tensor, w=None, sizes=(97, 250, 13, 400)):
    """``x (*B, N, D)`` as a list of chunks of varying lengths (with weights: pairs)."""
    out, start, i = [], 0, 0
    n = x.shape[-2]
    while start < n:
        stop = min(n, start + sizes[i % len(sizes)])
        out.append(x[..., start:stop, :] if w is None else (x[..., start:stop, :], w[..., start:stop]))
        start, i = stop, i + 1
    return out


@pytest.fixture(scope="module")
def overlapping():
    return torch.tensor(blobs(3, n=600, d=3, k=3, spread=2.0) * 5.0 + 40.0)


def test_streamed_equals_in_memory(cov_type, overlapping):
    x = overlapping
    settings = dict(covariance_type=cov_type, random_state=1, n_init=2, tol=1e-8, max_iter=60)
    in_memory = quiet_fit(x, 3, **settings)
    streamed = quiet_fit(_ragged_chunks(x), 3, **settings)
    assert int(in_memory.n_iter) > 5  # a real EM path, not a two-step one
    _close(streamed, in_memory, f"{cov_type}: ")


def test_batch_of_series_with_weights_padding_and_an_empty_series():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 400, 2, generator=g, dtype=torch.float64)
    x[..., 200:, :] += 3.0
    x = x * torch.tensor([1.0, 1e3, 1e-2], dtype=torch.float64)[:, None, None]  # one scale per series
    w = torch.rand(2, 3, 400, generator=g, dtype=torch.float64)
    w[0, 1, 300:] = 0.0  # padding
    x[0, 1, 300:] = 1e9  # ... holding anything finite
    w[1, 2] = 0.0  # an empty series
    settings = dict(covariance_type="full", random_state=0, n_init=3, tol=1e-9, max_iter=50, sample_weight=None)
    in_memory = quiet_fit(x, 2, **{**settings, "sample_weight": w})
    streamed = quiet_fit(Chunks(x, 64, sample_weight=w), 2, **settings)
    assert int(in_memory.status[1, 2]) == int(torchgmm.FitStatus.EMPTY)
    _close(streamed, in_memory, "batch: ")


def test_dataloader_and_given_initial_parameters(overlapping):
    x = overlapping
    w = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, w), batch_size=128)
    assert is_stream(loader)
    start = quiet_fit(x, 3, covariance_type="diag", max_iter=0, random_state=5)
    given = dict(weights_init=start.weights, means_init=start.means, precisions_init=start.precisions)
    settings = dict(covariance_type="diag", tol=1e-9, max_iter=40, **given)
    _close(quiet_fit(loader, 3, **settings), quiet_fit(x, 3, sample_weight=w, **settings), "loader: ")


def test_squarem_and_prior_on_a_stream(overlapping):
    x = overlapping
    for settings in (dict(method="squarem"), dict(prior="default"), dict(prior={"shrinkage": 0.1, "scale": 2.0})):
        settings = dict(covariance_type="full", random_state=0, tol=1e-8, max_iter=40, **settings)
        _close(quiet_fit(Chunks(x, 100), 3, **settings), quiet_fit(x, 3, **settings), f"{settings}: ")


def test_one_pass_per_iteration_and_a_reservoir_smaller_than_the_stream(overlapping):
    x = overlapping

    class Counting:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(Chunks(x, 50))

    src = Counting()
    result = quiet_fit(src, 3, random_state=0, n_init=4, max_iter=7, tol=0.0)
    assert src.passes == 1 + 7  # the scan, then one pass per iteration serving all 4 restarts
    # a reservoir of 150 of the 600 points: another start, the same optimum
    small = quiet_fit(Stream(Chunks(x, 50), reservoir_size=150), 3, random_state=0, n_init=4, tol=1e-8)
    full = quiet_fit(x, 3, random_state=0, n_init=4, tol=1e-8)
    assert abs(float(small.lower_bound - full.lower_bound)) < 1e-3 * abs(float(full.lower_bound))
    assert result.n_iter == 7


def test_module_fit_nan_omit_and_float32():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 2, generator=g)
    x[250:] += 4.0
    x[::37, 1] = float("nan")
    settings = dict(random_state=0, nan_policy="omit", tol=1e-6)
    a = torchgmm.GaussianMixture(2, **settings).fit(list(torch.split(x, 64)))
    b = torchgmm.GaussianMixture(2, **settings).fit(x)
    assert a.means_.dtype == torch.float32
    assert rel_err(a.means_, b.means_) < 1e-4 and torch.equal(a.n_iter_, b.n_iter_)


def test_stream_errors():
    x = torch.randn(100, 2)
    with pytest.raises(TypeError, match="one-shot iterator"):
        torchgmm.fit((c for c in torch.split(x, 10)), 2)
    with pytest.raises(ValueError, match="batch shape"):
        torchgmm.fit([x[:50], x[50:].unsqueeze(0)], 2)
    with pytest.raises(ValueError, match=r"\(X, sample_weight\) pairs"):
        torchgmm.fit(list(torch.split(x, 10)), 2, sample_weight=torch.ones(100))
    with pytest.raises(ValueError, match="model selection"):
        torchgmm.fit(list(torch.split(x, 10)), [2, 3])
    with pytest.raises(ValueError, match="gradient"):
        torchgmm.fit(list(torch.split(x, 10)), 2, method="gradient")

    class Shrinking:
        n = 100

        def __iter__(self):
            self.n -= 10
            return iter(torch.split(x[: self.n], 30))

    with pytest.raises(ValueError, match="same data on every pass"):
        torchgmm.fit(Shrinking(), 2, max_iter=3)
    # nested lists of numbers, tuples, arrays stay data
    assert not is_stream([[1.0, 2.0], [3.0, 4.0]]) and not is_stream(np.zeros((3, 2))) and not is_stream(x)
    assert is_stream([x, (x, torch.ones(100))])


def test_online_em_reaches_the_batch_optimum_for_a_batch_of_series():
    g = torch.Generator().manual_seed(0)
    b, k, d = 3, 3, 2
    centres = torch.tensor([[-10.0, 0.0], [0.0, 8.0], [10.0, -3.0]], dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)[:, None, None]

    def chunk(n):
        labels = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), b * n, replacement=True, generator=g).reshape(b, n)
        return torch.gather(centres, 1, labels.unsqueeze(-1).expand(-1, -1, d)) + torch.randn(b, n, d, generator=g, dtype=torch.float64)

    chunks = [chunk(400) for _ in range(150)]
    online = torchgmm.GaussianMixture(k, random_state=0, n_init=3)
    for c in chunks:
        online.partial_fit(c)
    assert online.online_.t.tolist() == [150] * b
    batch = torchgmm.GaussianMixture(k, random_state=0, n_init=3).fit(torch.cat(chunks, -2))

    def ordered(m):
        o = m.means_[..., 0].argsort(-1)
        return (torch.gather(m.means_, 1, o.unsqueeze(-1).expand(-1, -1, d)), torch.gather(m.weights_, 1, o),
                torch.gather(m.covariances_, 1, o[..., None, None].expand(-1, -1, d, d)))

    (m1, w1, c1), (m2, w2, c2) = ordered(online), ordered(batch)
    assert (m1 - m2).abs().max() < 0.05  # unit-variance clusters, 60,000 points per series
    assert (w1 - w2).abs().max() < 0.02
    assert (c1 - c2).abs().max() < 0.1
    assert (online.lower_bound_ - batch.lower_bound_).abs().max() < 0.05
    # a fit() restarts the online state
    online.fit(chunks[0])
    online.partial_fit(chunks[1])
    assert online.online_.t.tolist() == [1] * b


def test_online_schedule_is_validated():
    from torchgmm.stream import OnlineEM, _check_schedule

    assert _check_schedule(1, 0) == (1.0, 0.0)
    for alpha in (0.5, 1.2, True):
        with pytest.raises(ValueError, match="alpha"):
            _check_schedule(alpha, 1.0)
    assert OnlineEM.__doc__ and "(t + t0) ** -alpha" in OnlineEM.__doc__


def test_fit_stream_takes_every_setting_of_fit():
    """fit hands a stream to fit_stream with all of its arguments: a new setting of fit must be
    added to fit_stream too (or refused there with a message)."""
    import inspect

    from torchgmm.fitting import fit
    from torchgmm.stream import fit_stream

    assert list(inspect.signature(fit).parameters) == list(inspect.signature(fit_stream).parameters)
