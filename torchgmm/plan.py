"""Resource planning, in one place: whether to compile, how many points per chunk, how many members
per block, how many threads, how the process's allocator keeps freed blocks, and whether the fit
fits in memory at all.

Arithmetic on shapes, reads of the free memory and the load, and one allocator setting per
process; no tensors are touched here.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import time
from typing import NamedTuple, Optional

import torch

from ._compile import should_compile
from .covariance import Covariance

__all__ = [
    "Plan", "make_plan", "blocking", "check_memory", "intra_op_threads", "threads", "tune_allocator", "DEFAULT_MEMORY_BUDGET",
    "BLOCK_BYTES", "CHUNK_BYTES", "MIN_CHUNK", "PARALLEL_WORK", "SERIAL_WORK",
]

# Bytes the E-step's temporaries may use at once; the points are processed in chunks to stay below.
DEFAULT_MEMORY_BUDGET = 1 << 30

# Bytes of one block of working data ((K, N, D) per member): an iteration, and the initialization,
# run on blocks of whole series (with their restarts) this size, so that the temporaries stay in
# cache; a series larger than CHUNK_BYTES runs alone, its points in chunks of that size.
# Measured on the 2-core CPU against one block: W1 (B=10,000) EM 2x faster compiled, 4x eager;
# W3 (N=1e6, D=16, K=16) full EM 4.5x faster compiled, diag 1.6x. Blocks of 16 MB instead of 8
# (alternated in one process, with the allocator tuned): W1 0.218 -> 0.199 s, W2 0.103 -> 0.096 s,
# GG 0.039 -> 0.038 s; W3's chunks stay at 8 MB (16: full 1.33 -> 1.37 s).
BLOCK_BYTES = 16 << 20
CHUNK_BYTES = 8 << 20
MIN_CHUNK = 256


class Plan(NamedTuple):
    """How one fit uses the machine."""

    compile: bool  # fuse the hot loops with torch.compile
    init_chunk: Optional[int]  # points per chunk during the initialization (None: all)
    init_block_series: int  # series per block during the initialization
    chunk_size: Optional[int]  # points per chunk during the iterations (None: all)
    block_members: Optional[int]  # members per block during the iterations (None: one block)


def blocking(
    n_rows: int, n_restarts: int, k: int, n: int, d: int, itemsize: int, budget: int,
    chunk_size: Optional[int], device: torch.device, blocked: bool = True,
) -> tuple[Optional[int], int]:
    """``(chunk_size, block_members)``: points per chunk and members per block for ``n_rows``
    rows (series) of ``n_restarts`` members each.

    The working data of one member for one point is about ``K x (D + 2)`` numbers (``diff`` and
    ``(K,)`` temporaries). On the CPU (``blocked``) a block holds as many whole rows with all
    their points as fit ``min(BLOCK_BYTES, budget)`` (cache-sized) when a row fits
    ``min(CHUNK_BYTES, budget)``, otherwise rows with their points in chunks of that size (by
    default at least ``MIN_CHUNK``, bounding the per-chunk overhead; a smaller ``budget`` is
    obeyed). On CUDA, or unblocked, all rows form one block (large launches) and only ``budget``
    bounds the chunks. Either way the temporaries are bounded whatever B and N. A given
    ``chunk_size`` is kept.
    """
    if device.type == "cuda" or not blocked:
        block_bytes = chunk_bytes = budget
        floor, n_restarts = 1, n_rows * n_restarts
    else:
        block_bytes, chunk_bytes = min(BLOCK_BYTES, budget), min(CHUNK_BYTES, budget)
        floor = MIN_CHUNK if chunk_bytes == CHUNK_BYTES else 1
    per_point = n_restarts * k * (d + 2) * itemsize  # one block row, one point
    if chunk_size is None and per_point * n > chunk_bytes:
        chunk_size = max(floor, chunk_bytes // per_point)
    points = min(n, chunk_size or n)
    block_members = max(1, block_bytes // (k * (d + 2) * itemsize * points))
    return (None if chunk_size is None or chunk_size >= n else int(chunk_size)), block_members


def make_plan(
    n_series: int, n_init: int, k: int, n: int, d: int, max_iter: int, itemsize: int, device: torch.device, *,
    compile="auto", chunk_size: Optional[int] = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
    blocked: bool = True, n_restarts: Optional[int] = None,
) -> Plan:
    """The plan for ``n_series`` series of ``n`` points in ``d`` features, ``k`` components,
    ``n_init`` initializations and ``n_restarts`` members per series during the iterations
    (default ``n_init``; 1 when every parameter was given). ``blocked=False``: one block (the
    gradient mode works on all members at once; its chunks share the budget)."""
    n_restarts = n_init if n_restarts is None else n_restarts
    use_compile = should_compile(compile, float(n_series) * n_init * n * k * d * max(max_iter, 1), n_features=d)
    init_chunk, init_block = blocking(n_series, n_init, k, n, d, itemsize, memory_budget, chunk_size, device)
    chunk, block = blocking(n_series, n_restarts, k, n, d, itemsize, memory_budget, chunk_size, device, blocked=blocked)
    return Plan(use_compile, init_chunk, max(1, init_block // n_init), chunk, block)


# Point-components (series x restarts x N x K x D) below which a fit runs on one intra-op thread:
# none of its kernels reaches torch's parallel grain (32768 elements), while a second thread still
# costs at every BLAS call and in some element-wise kernels (150 elements: bmm 1.0 -> 2.4 us, exp
# 0.9 -> 1.7 us with two threads).
SERIAL_WORK = 1 << 15

# Point-components (members x N x K x D) of one pass below which a fit leaves the thread setting
# alone (above SERIAL_WORK): its kernels are mostly below torch's grain size anyway.
PARALLEL_WORK = 1e6

# Samples of the runnable count (``intra_op_threads``) and the seconds between them: a window of
# 4 ms. Sampled every 0.5 ms for 5 s on the idle 2-core machine, other tasks were runnable in 38
# bursts, the longest 3.5 ms (kernel threads); one holding a core is runnable in every sample.
LOAD_SAMPLES, LOAD_SAMPLE_GAP = 5, 1e-3


def intra_op_threads(work: float, device: torch.device) -> int:
    """Intra-op threads for a fit whose pass touches ``work`` point-components: one below
    ``SERIAL_WORK``; else torch's setting, lowered (for fits of at least ``PARALLEL_WORK``) to the
    cores no other process held over a few milliseconds (the fewest other runnable tasks in
    ``LOAD_SAMPLES`` samples of ``/proc/loadavg``). Two threads on two cores of which another process holds
    one wait for the descheduled thread at every kernel's join: measured 3-20x slower than one
    thread on the W1 batch, while one thread slows only as much as scikit-learn's one thread.
    Never raises torch's setting (``torch.set_num_threads`` caps it)."""
    current = torch.get_num_threads()
    if device.type != "cpu" or current <= 1:
        return current
    if work < SERIAL_WORK:
        return 1
    if work < PARALLEL_WORK:
        return current
    # This process's own runnable threads (its caller, and OpenMP workers still spinning after the
    # last parallel region) are not competition: only the other processes' are. A single sample
    # catches passing tasks (kernel threads): W1 fell to one thread in about 1 fit of 10 on an
    # idle machine. A competitor holding a core is runnable in every sample, so the fewest others
    # over a few samples count.
    others = None
    for _ in range(LOAD_SAMPLES):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])  # runnable tasks now, ours included
        except (OSError, ValueError, IndexError):
            return current
        now = max(0, running - _own_running_threads())
        others = now if others is None else min(others, now)
        if others == 0:
            break
        time.sleep(LOAD_SAMPLE_GAP)
    free = (os.cpu_count() or current) - others
    return max(1, min(current, free))


def _own_running_threads() -> int:
    """Threads of this process in state R (at least 1: the caller), from ``/proc/self/task``."""
    count = 0
    try:
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    count += f.read().rsplit(")", 1)[1].split()[0] == "R"
            except (OSError, IndexError):
                continue
    except OSError:
        return 1
    return max(1, count)


# glibc's malloc as the first fit on the CPU leaves it (``tune_allocator``): blocks below
# MALLOC_MMAP_THRESHOLD come from the heap, and up to MALLOC_TRIM_THRESHOLD of free memory at its top
# stays there. With glibc's defaults an iteration's temporaries (a few MB each) were handed back to
# the system and faulted in again at the next one: W1 (B=1,000) took 14-15 thousand page faults
# per fit and 0.189-0.194 s; tuned, none and 0.177-0.180 s (same machine, alternated processes).
MALLOC_MMAP_THRESHOLD = 64 << 20
MALLOC_TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_allocator = {"tuned": None}  # None: not tried yet; then whether the settings were made


def tune_allocator(device: torch.device = torch.device("cpu")) -> bool:
    """For a fit on ``device``: set glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``
    (``MALLOC_MMAP_THRESHOLD``, ``MALLOC_TRIM_THRESHOLD``) once per process, on the CPU under Linux
    with glibc; whether they are set (nothing happens for another device). A
    process-wide setting, like glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
    environment variables: it is left alone when either of those is set, or when
    ``TORCHGMM_TUNE_MALLOC=0``. Its cost: up to ``MALLOC_TRIM_THRESHOLD`` of freed memory stays
    with the process instead of returning to the system."""
    if device.type != "cpu":
        return False
    if _allocator["tuned"] is not None:
        return _allocator["tuned"]
    _allocator["tuned"] = False
    if (sys.platform != "linux" or os.environ.get("TORCHGMM_TUNE_MALLOC", "1") == "0"
            or "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl's mallopt does nothing)
            return False
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    _allocator["tuned"] = ok
    return ok


@contextlib.contextmanager
def threads(n: int):
    """Run the body with ``n`` intra-op threads, restoring torch's setting after."""
    previous = torch.get_num_threads()
    if n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _available_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Bytes of parameters and statistics below which check_memory does not ask the system.
_ALWAYS_AVAILABLE = 1 << 24


def check_memory(n_members: int, k: int, d: int, cov: Covariance, itemsize: int, device: torch.device) -> None:
    """Refuse, before allocating, a fit whose parameters and statistics cannot fit in memory."""
    per_member = k * (1 + 2 * d) + math.prod(cov.prec_chol_shape(k, d)) + k * d * d
    # initial, working, updated and output copies of the parameters, and the statistics
    needed = 6 * n_members * per_member * itemsize
    if needed < _ALWAYS_AVAILABLE:  # (reading /proc/meminfo costs more than a small fit's EM)
        return
    available = _available_bytes(device)
    if available is not None and needed > available:
        raise MemoryError(
            f"this fit needs about {needed / 2**30:.1f} GiB for the parameters and statistics of "
            f"{n_members} fits (series x n_init) with K={k}, D={d}, but {available / 2**30:.1f} GiB "
            f"are available on {device}; fit fewer series at a time, lower n_init, or use "
            "covariance_type='diag'"
        )
