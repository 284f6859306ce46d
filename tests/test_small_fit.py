"""The shortcuts that keep a small fit (one short univariate series) cheap give what the general
paths give: unit weights without a weight pass, one member per series on the series themselves
(flat), the member loop's unmasked iterations and its ending without a write-back, the univariate
k-means assignment's ties, one intra-op thread for tiny problems."""

from __future__ import annotations

import sys

import pytest
import torch

import torchgmm
import torchgmm.datasets
from torchgmm.covariance import get_covariance
from torchgmm.density import GMMParams
from torchgmm.em import UnivariateEMRule
from torchgmm.fitting import prepare
from torchgmm.init import _kmeans_assign_univariate, initialize, make_generator
from torchgmm.loop import Members, Start, Step, run_members
from torchgmm.units import standardize


@pytest.mark.parametrize("shape", [(50,), (50, 1), (3, 40, 2), (2, 2, 30, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unit_weights_prepare_and_standardize_as_explicit_ones(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 7 + 40).to(dtype)
    fast = prepare(x, None, 3)
    ones = torch.ones(x.shape[:-1] if x.dim() > 1 else x.shape, dtype=dtype)
    slow = prepare(x, ones, 3)
    assert fast.unit_weights and not slow.unit_weights
    for a, b in zip(fast[:6], slow[:6]):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b)
        else:
            assert a == b
    for a, b in zip(standardize(fast.x, fast.w, 1e-6, unit_weights=True), standardize(slow.x, slow.w, 1e-6)):
        assert torch.equal(a, b)


def test_unit_weights_still_refuse_fewer_points_than_components():
    with pytest.raises(ValueError, match="n_components=5 must be <= the number of positive-weight samples, n_samples=4"):
        prepare(torch.arange(4.0), None, 5)
    assert prepare(torch.zeros(2, 4, 1), None, 5).insufficient.tolist() == [True, True]  # batched: flagged


def test_one_member_per_series_runs_flat_and_as_each_series_alone():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 60, 1, generator=gen, dtype=torch.float64)
    x[:, :20] += 4.0
    w = torch.ones(4, 60, dtype=torch.float64)
    xs, _, _, reg = standardize(x, w, 1e-6)
    init, _ = initialize(xs, w, 3, 1, "kmeans", "full", reg, make_generator(0))
    members = Members(xs, w, reg, None, 1)
    assert members.batch().lead == (4,) and members.batch().x is xs  # the series themselves
    together = run_members(members, init, UnivariateEMRule("full"), 1e-8, 200)
    for b in range(4):
        one = GMMParams(*(t[b:b + 1] for t in init))
        alone = run_members(Members(xs[b:b + 1], w[b:b + 1], reg[b:b + 1], None, 1), one, UnivariateEMRule("full"), 1e-8, 200)
        assert int(alone.n_iter[0]) == int(together.n_iter[b])
        torch.testing.assert_close(alone.lower_bound[0], together.lower_bound[b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(alone.history[0], together.history[b], rtol=1e-12, atol=1e-12, equal_nan=True)


class _Shrink:
    """Toy rule: ``means <- means / 2``, value ``-|means|^2`` before the step; ``fail_at``: the step
    (1-based) at which every member fails; ``never``: the start already fails."""

    def __init__(self, fail_at=None, never=False):
        self.fail_at, self.never, self.calls = fail_at, never, 0

    def start(self, batch, params):
        return Start(params, ok=torch.zeros(params.means.shape[0], dtype=torch.bool) if self.never else None)

    def step(self, batch, state, active):
        self.calls += 1
        value = -state.means.square().flatten(1).sum(-1)
        ok = torch.full_like(value, self.calls != self.fail_at, dtype=torch.bool)
        return Step(state._replace(means=state.means / 2), value, ok)

    def params(self, state):
        return state

    def objective(self, batch, params):
        return -params.means.square().flatten(1).sum(-1)


def _toy(starts):
    b = len(starts)
    init = GMMParams(torch.zeros(b, 1, 1, dtype=torch.float64),
                     torch.tensor(starts, dtype=torch.float64).reshape(b, 1, 1, 1), torch.ones(b, 1, 1, dtype=torch.float64))
    members = Members(torch.zeros(b, 3, 1, dtype=torch.float64), torch.ones(b, 3, dtype=torch.float64),
                      torch.zeros(b, dtype=torch.float64), None, 1)
    return members, init


@pytest.mark.parametrize("starts", [[8.0], [8.0, 64.0]])
def test_unmasked_iterations_then_a_failure_keep_the_last_good_state(starts):
    members, init = _toy(starts)
    out = run_members(members, init, _Shrink(fail_at=4), 1e-12, 100)
    assert out.failed.all() and not out.converged.any() and out.n_iter.tolist() == [4] * len(starts)
    assert out.params.means.reshape(-1).tolist() == [s / 8 for s in starts]  # three halvings, the fourth refused
    assert out.passes[:, :4].tolist() == [[1.0, 2.0, 3.0, 4.0]] * len(starts)
    assert bool(out.history[:, 4:].isnan().all())


@pytest.mark.parametrize("rule", [_Shrink(fail_at=1), _Shrink(never=True)])
def test_a_run_without_a_good_step_returns_copies_of_the_start(rule):
    members, init = _toy([3.0, 5.0])
    out = run_members(members, init, rule, 1e-12, 100)
    torch.testing.assert_close(out.params.means, init.means.reshape(2, 1, 1))
    for o, i in zip(out.params, init):
        assert o.data_ptr() != i.data_ptr()  # never the caller's tensors
    out.params.means.add_(1.0)
    assert init.means.reshape(-1).tolist() == [3.0, 5.0]


def test_univariate_kmeans_assignment_breaks_ties_to_the_first_center():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64).reshape(1, 1, 4, 1)
    w = torch.ones(1, 1, 4, dtype=torch.float64)
    centers = torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64).reshape(1, 1, 3, 1)  # 1.0 halfway; two equal
    labels, sums, counts = _kmeans_assign_univariate(x, w, centers)
    assert labels.tolist() == [[[0, 0, 1, 1]]]
    assert counts.reshape(-1).tolist() == [2.0, 2.0, 0.0] and sums.reshape(-1).tolist() == [1.0, 5.0, 0.0]


def test_a_tiny_fit_runs_on_one_thread_and_restores_the_setting(monkeypatch):
    seen = []
    real = UnivariateEMRule.step

    def step(self, *args):
        seen.append(torch.get_num_threads())
        return real(self, *args)

    monkeypatch.setattr(UnivariateEMRule, "step", step)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torchgmm.fit(torch.as_tensor(torchgmm.datasets.seed_series()), 3, random_state=0)
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_full_univariate_factor_and_unconstrained_form_as_the_general_forms():
    cov = get_covariance("full")
    var = torch.tensor([[0.5, 2.0, 1e-3]], dtype=torch.float64).reshape(1, 3, 1, 1)
    prec_chol, ok = cov.prec_chol_from_covariance(var, torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(prec_chol, var.rsqrt(), rtol=1e-15, atol=0)
    assert ok.tolist() == [True]
    _, bad = cov.prec_chol_from_covariance(-var, torch.zeros(1, dtype=torch.float64))
    assert bad.tolist() == [False]
    torch.testing.assert_close(cov.precision_from_prec_chol(prec_chol), prec_chol @ prec_chol.mT, rtol=1e-15, atol=0)
    assert torch.equal(cov.from_unconstrained(cov.to_unconstrained(prec_chol)), prec_chol.log().exp())
    assert torch.equal(cov.to_unconstrained(prec_chol), prec_chol.log())


def test_the_validation_passes_run_on_the_fits_thread_count(monkeypatch):
    """The threads are chosen from the data's size before prepare's passes over it (on a busy
    machine those passes on torch's setting waited for a core at every kernel)."""
    import torchgmm.fitting as fitting

    seen = []
    real_prepare = fitting.prepare

    def prepare(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(fitting, "prepare", prepare)
    monkeypatch.setattr(fitting, "intra_op_threads", lambda work, device: 1 if work >= 1e6 else 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(200, 500, 1, generator=torch.Generator().manual_seed(0))
        fitting.fit(x, 3, n_init=4, max_iter=2, random_state=0, warn=False)  # 200 x 500 x 4 x 3 >= 1e6
        fitting.fit(x[:2, :50], 3, n_init=1, max_iter=2, random_state=0, warn=False)
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_thread_rule_one_thread_for_tiny_fits_else_torchs_setting_below_the_parallel_work():
    from torchgmm.plan import PARALLEL_WORK, SERIAL_WORK, intra_op_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cpu = torch.device("cpu")
        assert intra_op_threads(SERIAL_WORK - 1, cpu) == 1
        assert intra_op_threads(SERIAL_WORK, cpu) == 2 and intra_op_threads(PARALLEL_WORK - 1, cpu) == 2
        assert intra_op_threads(10, torch.device("meta")) == 2  # not the CPU: torch's setting
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("runnable,expected", [([3, 1, 3, 3], 2), ([3, 3, 3, 3], 1), ([1], 2)])
def test_thread_rule_counts_the_fewest_other_processes_over_a_few_samples(monkeypatch, runnable, expected):
    """A task that is runnable in one sample of /proc/loadavg only (passing) does not cost a
    thread; one runnable in every sample (a competitor holding a core) does."""
    import io

    import torchgmm.plan as plan

    samples = iter(runnable + [runnable[-1]] * plan.LOAD_SAMPLES)  # the last one persists
    monkeypatch.setattr(plan, "open", lambda path: io.StringIO(f"0.5 0.5 0.5 {next(samples)}/80 1\n"), raising=False)
    monkeypatch.setattr(plan, "_own_running_threads", lambda: 1)
    monkeypatch.setattr(plan.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert plan.intra_op_threads(plan.PARALLEL_WORK, torch.device("cpu")) == expected
    finally:
        torch.set_num_threads(before)


def _page_faults_of(allocate) -> int:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    allocate()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_tuned_allocator_keeps_freed_blocks_instead_of_faulting_them_in_again(monkeypatch):
    """A 40 MB block is above glibc's largest automatic mmap threshold (32 MB): untuned, every
    allocation maps fresh pages (about 10,000 faults); tuned, the second one reuses the heap."""
    from torchgmm import plan

    monkeypatch.delenv("TORCHGMM_TUNE_MALLOC", raising=False)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(plan._allocator, "tuned", None)
    if not plan.tune_allocator():
        pytest.skip("not glibc")
    assert plan.tune_allocator()  # once: the answer is kept
    torch.empty(10 << 20).fill_(1.0)  # 40 MB onto the heap
    assert _page_faults_of(lambda: torch.empty(10 << 20).fill_(1.0)) < 1000


@pytest.mark.parametrize("env", [{"TORCHGMM_TUNE_MALLOC": "0"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"}])
def test_the_allocator_is_left_alone_when_asked_or_set_by_the_user(monkeypatch, env):
    import ctypes

    from torchgmm import plan

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(plan._allocator, "tuned", None)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: pytest.fail("mallopt was called"))
    assert plan.tune_allocator() is False
