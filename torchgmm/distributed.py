"""Data-parallel EM on ``torch.distributed``: each rank holds a shard of the points of the same
series; every EM iteration all-reduces the statistics, so every rank ends with the same model,
the one a single process fits on the union of the shards.

The user starts the processes (``torchrun``) and initializes the process group
(``torch.distributed.init_process_group("gloo" | "nccl", timeout=...)``); the library never creates
one. Then, on every rank, with the same settings::

    gm = torchgmm.GaussianMixture(3, process_group="world").fit(X_local)   # or a ProcessGroup
    torchgmm.fit(torchgmm.distributed.shard(loader, "world"), 3)           # a DataLoader per rank

What travels, all through the group's own collectives (no other transport):

- the scan: per series the total weight, weighted mean and second moments, counts (an
  all-reduce of ``B (2 + 2D)`` numbers, ``D^2`` with a prior), the shard headers (an all-gather
  of a few Python objects, to check that the ranks agree) and each rank's reservoir sample
  (an all-gather of ``B x m x (D + 3)`` numbers, once);
- the initialization: computed on rank 0 and broadcast (``B R K (1 + D + |prec_chol|)`` numbers);
- every EM iteration: one all-reduce of the summed statistics, ``B R K (1 + D + D^2)`` numbers
  for full and tied covariances (``B R K (1 + 2D)`` for diag and spherical) plus ``B R``
  log-likelihood sums: tiny next to the pass over the data.

Every wait is bounded by the process group's timeout: a rank that dies or hangs makes the others
raise :class:`DistributedFitError` (naming the step) instead of waiting for ever.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .covariance import Covariance
from .density import GMMParams
from .stats import Stats

__all__ = ["shard", "resolve_group", "Comm", "DistributedFitError"]


class DistributedFitError(RuntimeError):
    """A collective of a data-parallel fit failed (another rank died, hung past the process
    group's timeout, or is doing something else)."""


def resolve_group(process_group):
    """``"world"`` -> the default group; a ``ProcessGroup`` as it is. The group must exist."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group(...) first on every rank (e.g. under torchrun); "
            "torchgmm never creates a process group"
        )
    if isinstance(process_group, str):
        if process_group != "world":
            raise ValueError(f"process_group must be 'world' or a torch.distributed ProcessGroup, got {process_group!r}")
        return dist.group.WORLD
    if isinstance(process_group, dist.ProcessGroup):
        return process_group
    raise TypeError(
        f"process_group must be 'world' or a torch.distributed ProcessGroup, got {type(process_group).__name__}"
    )


def shard(X, process_group="world"):
    """Mark ``X`` (an array, tensor or stream of chunks: this rank's part of the data) as one shard
    of data spread over the ranks of ``process_group``; ``fit`` then fits the union. What
    ``GaussianMixture(process_group=...)`` does to the data it is given."""
    from .stream import Stream

    if process_group is None:
        raise ValueError("shard needs a process group: 'world' or a torch.distributed ProcessGroup")
    return Stream(X, process_group=process_group)


class Comm:
    """The collectives of one data-parallel fit, each failure turned into a clear error."""

    def __init__(self, process_group):
        self.group = resolve_group(process_group)
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.root = dist.get_global_rank(self.group, 0)  # the group's rank 0, as a global rank

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, group=self.group, **kwargs)
        except Exception as err:  # gloo / nccl raise RuntimeError (DistBackendError) subclasses
            raise DistributedFitError(
                f"rank {self.rank} of {self.world}: the {what} failed ({type(err).__name__}: {err}). Another rank "
                "died, hung past the process group's timeout (init_process_group(timeout=...)), or is not "
                "running the same fit: every rank must call fit with the same settings and series"
            ) from err

    # -- primitives -------------------------------------------------------------------------------
    def all_reduce(self, tensors: list, what: str, op=dist.ReduceOp.SUM) -> list:
        """``tensors`` (one dtype and device) reduced over the ranks, in one collective."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self._call(what, dist.all_reduce, flat, op=op)
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].reshape(t.shape))
            start += t.numel()
        return out

    def all_gather(self, t: Tensor, what: str) -> list:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self._call(what, dist.all_gather, parts, t.contiguous())
        return parts

    def all_gather_object(self, obj, what: str) -> list:
        out = [None] * self.world
        self._call(what, dist.all_gather_object, out, obj)
        return out

    def broadcast(self, tensors: list, what: str) -> list:
        out = []
        for t in tensors:
            t = t.contiguous()
            self._call(what, dist.broadcast, t, src=self.root)
            out.append(t)
        return out

    # -- the steps of a fit -----------------------------------------------------------------------
    def reduce_stats(self, stats: Stats) -> Stats:
        """The statistics summed over the ranks (one all-reduce per EM iteration)."""
        return Stats(*self.all_reduce(list(stats), "all-reduce of the EM statistics"))

    def _agree(self, source) -> None:
        """Every rank learns the series' shape, the features and the dtype (from a rank that
        has data); ranks that disagree all raise the same error."""
        mine = None if source.batch_shape is None else (
            tuple(source.batch_shape), int(source.n_features), str(source.dtype).removeprefix("torch."))
        headers = self.all_gather_object(mine, "exchange of the shard headers")
        known = [h for h in headers if h is not None]
        if not known:
            raise ValueError("the stream yielded no data on any rank: at least one rank needs a chunk with a point")
        if any(h != known[0] for h in known):
            listed = "; ".join(f"rank {r}: batch shape {h[0]}, {h[1]} features, {h[2]}" for r, h in enumerate(headers) if h)
            raise ValueError(f"the ranks' shards disagree ({listed}): every rank must hold points of the same series")
        if mine is None:  # this rank's shard is empty: it still takes part, with zeros
            source.batch_shape, source.n_features = torch.Size(known[0][0]), known[0][1]
            source.dtype = getattr(torch, known[0][2])
            if source.device is None:
                source.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else torch.device("cpu")

    def merge_scan(self, source, moments, n_valid, n_points: int, reservoir, full_moments: bool):
        """The scan of the union of the shards, on every rank: moments (Chan's merge written as two
        all-reduces), counts, and the union's reservoir (bottom-``m`` samples merge exactly; the
        positions follow the rank order, so the union is the shards concatenated in rank order)."""
        from .stream import _Moments, _Reservoir

        self._agree(source)
        n_series = int(torch.Size(source.batch_shape).numel())
        d, dev, f64 = source.n_features, source.device, torch.float64
        if moments is None:
            shape2 = (n_series, d, d) if full_moments else (n_series, d)
            moments = _Moments(torch.zeros(n_series, dtype=f64, device=dev), torch.zeros(n_series, d, dtype=f64, device=dev),
                               torch.zeros(shape2, dtype=f64, device=dev))
            n_valid = torch.zeros(n_series, dtype=torch.long, device=dev)
        counts = torch.cat([n_valid.to(f64), torch.tensor([float(n_points)], dtype=f64, device=dev)])
        w, wmean, counts = self.all_reduce([moments.w, moments.w.unsqueeze(-1) * moments.mean, counts], "all-reduce of the scan")
        mean = wmean / w.clamp_min(torch.finfo(f64).tiny).unsqueeze(-1)
        delta = moments.mean - mean
        if full_moments:
            extra = moments.w[:, None, None] * delta.unsqueeze(-1) * delta.unsqueeze(-2)
        else:
            extra = moments.w.unsqueeze(-1) * delta.square()
        (m2,) = self.all_reduce([moments.m2 + extra], "all-reduce of the scan")  # sum_r M2_r + W_r (mean_r - mean)^2
        merged = _Moments(w, mean, m2)
        n_valid, n_total = counts[:-1].round().to(torch.long), int(counts[-1].round())

        # the reservoir: every rank's sample, padded to one size, positions offset by rank
        points = self.all_gather_object(n_points, "exchange of the shard sizes")
        offset = sum(points[: self.rank])
        size = reservoir.size if reservoir is not None else None
        sizes = self.all_gather_object(None if reservoir is None else (size, reservoir.key.shape[-1]), "exchange of the samples' sizes")
        cap = max(s[0] for s in sizes if s is not None)
        held = max(s[1] for s in sizes if s is not None)
        dtype = source.dtype
        x = torch.zeros(n_series, held, d, dtype=dtype, device=dev)
        wr = torch.zeros(n_series, held, dtype=dtype, device=dev)
        key = torch.full((n_series, held), torch.inf, dtype=f64, device=dev)
        pos = torch.full((n_series, held), 2**62, dtype=torch.long, device=dev)
        if reservoir is not None and reservoir.key is not None:
            m = reservoir.key.shape[-1]
            x[:, :m], wr[:, :m], key[:, :m], pos[:, :m] = reservoir.x, reservoir.w, reservoir.key, reservoir.pos + offset
        gathered = [self.all_gather(t, "all-gather of the reservoir samples") for t in (x, wr, key, pos)]
        union = _Reservoir(cap, None)
        union.x, union.w, union.key, union.pos = _Reservoir._keep(*(torch.cat(parts, dim=-1 if t.dim() == 2 else -2)
                                                                    for parts, t in zip(gathered, (x, wr, key, pos))), cap)
        return merged, n_valid, n_total, union

    def broadcast_params(self, init: Optional[GMMParams], lead: tuple, k: int, d: int, cov: Covariance, dtype, device) -> GMMParams:
        """Rank 0's initial parameters ``(B, R, ...)`` on every rank."""
        if init is None:
            shapes = [lead + (k,), lead + (k, d), lead + tuple(cov.prec_chol_shape(k, d))]
            init = GMMParams(*(torch.empty(s, dtype=dtype, device=device) for s in shapes))
        return GMMParams(*self.broadcast(list(init), "broadcast of the initialization"))
