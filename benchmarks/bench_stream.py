"""Streaming and data-parallel EM: equality, peak memory and timings (the numbers of docs/scale.md).

    python benchmarks/bench_stream.py                      # everything below, a few minutes on 2 cores
    python benchmarks/bench_stream.py --only equality      # streamed vs in-memory, every covariance type
    python benchmarks/bench_stream.py --only memory --points 10000000 --chunks 10000 100000 1000000
    python benchmarks/bench_stream.py --only distributed --points 2000000

- equality: the largest relative difference of the parameters and lower bound between the streamed
  fit (chunks of varying length) and the in-memory fit of the concatenated data (float64, same
  seed), per covariance type, for one dataset and for a batch of series.
- memory: a fit of ``--points`` points (K=3, D=2, full, float64, a fixed number of iterations)
  whose chunks are generated on the fly (the data never exist in memory at once), one process per
  chunk size: the growth of the peak resident set size (VmHWM) over the resident size just before
  the fit, and the time per data pass; the in-memory fit of the same data for reference.
- distributed: the same kind of stream split over 2 gloo processes on the loopback (chunks dealt
  round-robin) against one process streaming all of it: time, and the largest difference of the
  parameters (every rank's model equals the single-process one).

One torch thread per process. The time includes generating the chunks (about as costly as a
K=3 E-step in D=2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torchgmm  # noqa: E402
import torchgmm.distributed  # noqa: E402,F401
from torchgmm.stream import Chunks  # noqa: E402

CENTRES = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
SETTINGS = dict(covariance_type="full", random_state=0, tol=0.0, warn=False)
# the distributed comparison starts both fits here (the reservoirs' keys differ between one and two processes)
START = dict(weights_init=torch.full((3,), 1 / 3, dtype=torch.float64), means_init=CENTRES + 0.5,
             precisions_init=torch.eye(2, dtype=torch.float64).expand(3, 2, 2))


BLOCK = 10_000  # points made from one seed: the data do not depend on the chunk size


def _block(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    labels = torch.randint(0, 3, (BLOCK,), generator=g)
    return CENTRES[labels] + torch.randn(BLOCK, 2, generator=g, dtype=torch.float64)


class Synthetic:
    """``n_points`` points of a 3-component mixture in 2-D (blocks of :data:`BLOCK` points from
    seeds 0, 1, ...), served in chunks of ``chunk`` points (a multiple of BLOCK): a re-iterable
    stream that never holds more than one chunk. ``ranks``: only the chunks ``i`` with ``i %
    world`` in ``ranks`` (a shard; ``(0, 1)`` of 2 in that order: the union in rank order)."""

    def __init__(self, n_points: int, chunk: int, ranks=(0,), world: int = 1):
        assert n_points % BLOCK == 0 and chunk % BLOCK == 0
        self.n_points, self.chunk, self.ranks, self.world = n_points, chunk, tuple(ranks), world

    def __iter__(self):
        per = self.chunk // BLOCK
        starts = range(0, self.n_points // BLOCK, per)
        for rank in self.ranks:
            for i, first in enumerate(starts):
                if i % self.world == rank:
                    yield torch.cat([_block(b) for b in range(first, min(first + per, self.n_points // BLOCK))])


def machine_line() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"machine: {cpu}, {os.cpu_count()} cores (load avg {os.getloadavg()[0]:.1f} at start), "
            f"python {platform.python_version()}, torch {torch.__version__}, one torch thread per process")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


# -- equality ----------------------------------------------------------------------------------------
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    floor = 1e-6 * float(b.abs().max())
    return float(((a - b).abs() / b.abs().clamp_min(floor)).max())


def equality() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (3000,), generator=g)
    x = (torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.5, -1.0], [0.5, 2.0, 1.0]], dtype=torch.float64)[labels]
         + torch.randn(3000, 3, generator=g, dtype=torch.float64)) * 7.0 + 100.0
    xb = torch.randn(4, 5, 2000, 2, generator=g, dtype=torch.float64)
    xb[..., ::3, :] += 2.5
    wb = torch.rand(4, 5, 2000, generator=g, dtype=torch.float64)
    rows = []
    for cov in torchgmm.COVARIANCE_TYPES:
        for label, data, chunks, kw in (
            ("one dataset (3000, 3), K=3", x, [x[s:s + n] for s, n in zip(range(0, 3000, 700), (700,) * 5)], {}),
            ("batch (4, 5, 2000, 2), K=2, weights", xb, Chunks(xb, 333, sample_weight=wb), {"sample_weight": wb}),
        ):
            k = 3 if data.dim() == 2 else 2
            settings = dict(covariance_type=cov, random_state=0, n_init=2, tol=1e-10, max_iter=200, warn=False)
            a = torchgmm.fit(data, k, **settings, **kw)
            b = torchgmm.fit(chunks, k, **settings)
            err = max(max(rel(p, q) for p, q in zip(b.params, a.params)), rel(b.lower_bound, a.lower_bound))
            rows.append(dict(cov=cov, data=label, n_iter=int(a.n_iter.max()), same_iterations=bool(torch.equal(a.n_iter, b.n_iter)),
                             max_rel_err=err))
    return rows


# -- memory -----------------------------------------------------------------------------------------------
def child_memory(points: int, chunk: int, max_iter: int, in_memory: bool) -> dict:
    torch.set_num_threads(1)
    torchgmm.fit(list(Synthetic(20_000, 10_000)), 3, max_iter=2, **SETTINGS)  # warm-up: every code path loaded
    data = torch.cat(list(Synthetic(points, 1_000_000))) if in_memory else Synthetic(points, chunk)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    start = time.perf_counter()
    result = torchgmm.fit(data, 3, max_iter=max_iter, **SETTINGS)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return dict(chunk="in memory" if in_memory else chunk, points=points, rss_before_mb=before / 1024,
                peak_growth_mb=(peak - before) / 1024, seconds=seconds, passes=int(result.n_iter) + (0 if in_memory else 1),
                s_per_pass=seconds / (int(result.n_iter) + (0 if in_memory else 1)),
                lower_bound=float(result.lower_bound))


def memory(points: int, chunks: list[int], max_iter: int, with_in_memory: bool) -> list[dict]:
    rows = []
    configs = [(c, False) for c in chunks] + ([(0, True)] if with_in_memory else [])
    for chunk, in_mem in configs:
        cmd = [sys.executable, __file__, "--child-memory", str(points), str(chunk), str(max_iter), str(int(in_mem))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


# -- distributed --------------------------------------------------------------------------------------
def _rank(rank: int, port: int, points: int, chunk: int, max_iter: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    torchgmm.fit(torchgmm.distributed.shard(list(Synthetic(20_000, 10_000, (rank,), 2)), "world"), 3, max_iter=2, **SETTINGS)
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    result = torchgmm.fit(torchgmm.distributed.shard(Synthetic(points, chunk, (rank,), 2), "world"), 3,
                          max_iter=max_iter, **START, **SETTINGS)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    torch.save({"params": tuple(result.params), "seconds": seconds, "cpu": cpu, "n_iter": int(result.n_iter)}, f"{out}.{rank}")
    dist.destroy_process_group()


def distributed(points: int, chunk: int, max_iter: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    torchgmm.fit(list(Synthetic(20_000, 10_000)), 3, max_iter=2, **SETTINGS)
    start, cpu = time.perf_counter(), time.process_time()
    single = torchgmm.fit(Synthetic(points, chunk, (0, 1), 2), 3, max_iter=max_iter, **START, **SETTINGS)
    single_s, single_cpu = time.perf_counter() - start, time.process_time() - cpu
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        mp.spawn(_rank, args=(port, points, chunk, max_iter, out), nprocs=2)
        ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    same = all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    err = max(rel(a, b) for a, b in zip(ranks[0]["params"], single.params))
    row = dict(points=points, chunk=chunk, passes=int(single.n_iter) + 1, one_process_s=single_s, one_process_cpu_s=single_cpu,
               two_ranks_s=max(r["seconds"] for r in ranks), cpu_s_per_rank=[r["cpu"] for r in ranks],
               load_avg=os.getloadavg()[0], ranks_identical=same, max_rel_err_vs_one_process=err,
               per_iteration_numbers=3 * (1 + 2 + 4) + 1)
    print(row, flush=True)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-memory":
        points, chunk, max_iter, in_mem = (int(v) for v in sys.argv[2:6])
        print(json.dumps(child_memory(points, chunk, max_iter, bool(in_mem))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["equality", "memory", "distributed"])
    parser.add_argument("--points", type=int, default=None, help="points of the memory (10M) / distributed (2M) runs")
    parser.add_argument("--chunks", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--max-iter", type=int, default=10)
    parser.add_argument("--no-in-memory", action="store_true", help="skip the in-memory reference of the memory run")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print(machine_line(), flush=True)
    if args.only in (None, "equality"):
        for row in equality():
            print(row, flush=True)
    if args.only in (None, "memory"):
        memory(args.points or 10_000_000, args.chunks, args.max_iter, not args.no_in_memory)
    if args.only in (None, "distributed"):
        distributed(args.points or 2_000_000, 100_000, args.max_iter)


if __name__ == "__main__":
    main()
