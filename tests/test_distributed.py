"""Data-parallel EM on torch.distributed: two CPU processes with gloo on the loopback.

Every rank must end with the model a single process fits on the union of the shards (to float64
round-off), and a rank that dies or hangs must make the other raise a clear error within the
process group's timeout instead of waiting for ever.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torchgmm
from torchgmm.distributed import shard
from torchgmm.stream import Chunks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")

WORLD = 2
TOL = 1e-10


# -- data (built identically in the parent and in the workers) -----------------------------------------
def _unbatched() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    centres = torch.tensor([[0.0, 0.0, 0.0], [2.5, 0.5, -1.0], [0.5, 2.5, 1.0]], dtype=torch.float64)
    labels = torch.randint(0, 3, (600,), generator=g)
    return (centres[labels] + torch.randn(600, 3, generator=g, dtype=torch.float64)) * 4.0 + 30.0


def _batched() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 400, 2, generator=g, dtype=torch.float64)
    x[..., 1::2, :] += 2.0
    w = torch.rand(2, 3, 400, generator=g, dtype=torch.float64)
    w[0, 2, 250:] = 0.0  # padding
    return x, w


SETTINGS = {
    "module": dict(covariance_type="full", n_init=2, random_state=0, tol=1e-8, max_iter=80),
    "batch": dict(covariance_type="diag", n_init=3, random_state=1, tol=1e-9, max_iter=60),
    "loader": dict(covariance_type="spherical", random_state=2, tol=1e-9, max_iter=60),
    "empty_shard": dict(covariance_type="tied", random_state=3, tol=1e-9, max_iter=60),
}


def _fits_on_rank(rank: int) -> dict:
    """What each rank fits: its shard of the same series, for every case."""
    x, (xb, wb) = _unbatched(), _batched()
    out = {}
    part = slice(0, 350) if rank == 0 else slice(350, 600)
    gm = torchgmm.GaussianMixture(3, process_group="world", **SETTINGS["module"]).fit(x[part])
    out["module"] = gm.result_
    part = slice(0, 120) if rank == 0 else slice(120, 400)
    out["batch"] = torchgmm.fit(shard(Chunks(xb[..., part, :], 50, sample_weight=wb[..., part]), "world"), 2,
                                **SETTINGS["batch"])
    # streaming and distributed together: a DataLoader with a DistributedSampler on each rank
    dataset = torch.utils.data.TensorDataset(x)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, sampler=sampler)
    out["loader"] = torchgmm.fit(shard(loader, "world"), 3, **SETTINGS["loader"])
    mine = x if rank == 0 else x[:0]  # rank 1 holds no point at all
    out["empty_shard"] = torchgmm.fit(shard(Chunks(mine, 100), "world"), 3, **SETTINGS["empty_shard"])
    return out


def _single_process_fits() -> dict:
    x, (xb, wb) = _unbatched(), _batched()
    return {
        "module": torchgmm.GaussianMixture(3, **SETTINGS["module"]).fit(x).result_,
        "batch": torchgmm.fit(xb, 2, sample_weight=wb, **SETTINGS["batch"]),
        # the union of the DistributedSampler's shards in rank order: even rows, then odd rows
        "loader": torchgmm.fit(torch.cat([x[0::2], x[1::2]]), 3, **SETTINGS["loader"]),
        "empty_shard": torchgmm.fit(x, 3, **SETTINGS["empty_shard"]),
    }


# -- the workers ---------------------------------------------------------------------------------------
def _init(rank: int, port: int, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _equality_worker(rank: int, port: int, out_dir: str) -> None:
    try:
        import warnings

        warnings.simplefilter("ignore", torchgmm.FitWarning)
        _init(rank, port, 20.0)
        start = time.perf_counter()
        fits = _fits_on_rank(rank)
        payload = {name: (tuple(r.params), r.lower_bound, r.n_iter, r.status) for name, r in fits.items()}
        payload["seconds"] = time.perf_counter() - start
        torch.save(payload, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _failure_worker(rank: int, port: int, out_dir: str, how: str) -> None:
    _init(rank, port, 3.0)
    if rank == 1:
        if how == "dies":
            os._exit(3)  # gone without a word
        time.sleep(60)  # hangs (the parent ends it)
        os._exit(0)
    x = _unbatched()
    start = time.perf_counter()
    try:
        torchgmm.fit(shard(x, "world"), 3, random_state=0, warn=False)
        message = "no error"
    except Exception as err:  # noqa: BLE001
        message = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, "rank0.txt"), "w") as f:
        f.write(f"{time.perf_counter() - start:.3f}\n{message}")
    os._exit(0)  # no teardown of a group whose peer is gone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(target, args, timeout: float, wait_for_all: bool = True) -> list:
    """Start the ranks; wait for all of them (or only rank 0), at most ``timeout`` seconds; kill
    what is left."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, *args)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs if wait_for_all else procs[:1]:
        p.join(max(0.1, deadline - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode)
    return codes


# -- the tests -------------------------------------------------------------------------------------------
def test_two_ranks_equal_the_single_process_fit(tmp_path):
    codes = _launch(_equality_worker, (_free_port(), str(tmp_path)), timeout=240)
    for rank in range(WORLD):
        err = tmp_path / f"rank{rank}.err"
        assert not err.exists(), err.read_text()
    assert codes == [0] * WORLD, codes
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        single = _single_process_fits()
    for name, ref in single.items():
        params0, lb0, n_iter0, status0 = ranks[0][name]
        params1, lb1, n_iter1, status1 = ranks[1][name]
        for a, b in zip(params0, params1):  # every rank holds the same model, bit for bit
            assert torch.equal(a, b), name
        assert torch.equal(n_iter0, ref.n_iter) and torch.equal(status0, ref.status), name
        for a, b in zip(params0, ref.params):
            torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(lb0, ref.lower_bound, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_raises_on_the_survivor(tmp_path, how):
    start = time.monotonic()
    _launch(_failure_worker, (_free_port(), str(tmp_path), how), timeout=60, wait_for_all=False)
    report = tmp_path / "rank0.txt"
    assert report.exists(), "rank 0 did not finish: it waited for ever"
    seconds, message = report.read_text().split("\n", 1)
    assert message.startswith("DistributedFitError"), message
    assert "rank 0 of 2" in message and "timeout" in message
    assert float(seconds) < 30.0 and time.monotonic() - start < 60.0


def test_process_group_needs_an_initialized_group():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        torchgmm.GaussianMixture(2, process_group="world").fit(torch.randn(50, 2))
    with pytest.raises(ValueError, match="partial_fit does not support process_group"):
        torchgmm.GaussianMixture(2, process_group="world").partial_fit(torch.randn(50, 2))
