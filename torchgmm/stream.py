"""Data that do not fit in memory at once: out-of-core exact EM over a stream of chunks, and
online (stepwise) EM for data that arrive once.

Both run on the statistics and the M-step of the in-memory fit (``torchgmm.stats``): EM's
sufficient statistics are additive, so a pass over a stream of chunks sums them chunk by chunk
(and, with a process group, over ranks: ``torchgmm.distributed``), then one M-step turns the sum
into parameters. There is no second implementation of the E-step or the M-step here.

**Out-of-core exact EM** (``fit`` / ``GaussianMixture.fit`` of a stream). A stream is a
*re-iterable* source of chunks: a ``torch.utils.data.DataLoader``, a list whose items are tensors
or ``(X, sample_weight)`` pairs, :class:`Chunks` (an in-memory or memory-mapped array read in
chunks of points), or any object whose ``__iter__`` starts a new pass. A chunk is ``(n,)`` (one
univariate series), ``(n, D)`` (one dataset) or ``(*B, n, D)`` (a batch of series, chunked along
the points); chunks may differ in ``n`` but not in ``(*B)`` or ``D``. The fit makes

1. one *scan*: per-series weighted means and variances (Chan's merge of chunk moments, float64),
   the number of positive-weight points, and a reservoir sample of :data:`RESERVOIR_SIZE` points
   per series (a seeded bottom-``m`` sample of uniform keys: uniform among positive-weight points,
   their weights kept, put back in stream order);
2. the initialization: the in-memory initialization (``init_params``, ``n_init``) run on the
   reservoir sample, in the standardized units of the whole stream; or the given parameters;
3. per EM iteration one pass over the stream (every restart at once: parameters ``(B, R, ...)``
   against chunk data ``(B, 1, n, D)``), then one M-step. :class:`StreamEMRule` is that step for
   the member loop (``torchgmm.loop``), so convergence, restarts, failure flags, ``prune_after``,
   SQUAREM and the result are those of the in-memory fit.

Memory is bounded by the chunk size (and the reservoir), whatever the stream's length. When every
series' positive-weight points fit in the reservoir, the streamed fit starts where the in-memory
fit on the concatenated chunks starts, and ends where it ends, to float64 round-off.

**Online EM** (``GaussianMixture.partial_fit``): :class:`OnlineEM`, stepwise EM (Cappe & Moulines
2009) for chunks seen once; see its docstring for the step-size schedule.
"""

from __future__ import annotations

import collections.abc
import math
import numbers
import warnings
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from . import validation
from .covariance import Covariance, get_covariance
from .density import GMMParams
from .init import INIT_METHODS, make_generator
from .em import EMRule
from .loop import Batch, Members, all_finite, run_members, tree_map
from .methods import as_method, method_settings
from .objective import penalized_params
from .plan import DEFAULT_MEMORY_BUDGET, blocking, check_memory, make_plan
from .result import FitResult, FitWarning
from .stats import Stats, chunked_sum, e_step_statistics, m_step
from .units import Scaling, standardize

__all__ = [
    "Stream", "Chunks", "is_stream", "fit_stream", "StreamEMRule", "OnlineEM",
    "RESERVOIR_SIZE", "RESERVOIR_BYTES", "ONLINE_ALPHA", "ONLINE_T0",
]

# Points per series kept by the scan for the initialization (k-means++ and Lloyd on this sample).
RESERVOIR_SIZE = 100_000
# ... and at most this many bytes of sampled points over the whole batch (fewer points per series
# for a large batch; never fewer than 1,000 per series).
RESERVOIR_BYTES = 256 << 20
_RESERVOIR_FLOOR = 1_000

# Online EM's step sizes eta_t = (t + t0) ** -alpha (t = 1, 2, ... updates after the first chunk).
ONLINE_ALPHA = 0.7
ONLINE_T0 = 1.0


# -- what counts as a stream ---------------------------------------------------------------------
def _is_chunk_item(item) -> bool:
    """A list item that makes the list a stream: a tensor, or an ``(X, sample_weight)`` pair (a
    tuple or list of two) whose X is a tensor."""
    if isinstance(item, Tensor):
        return True
    return isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Tensor)


def is_stream(X) -> bool:
    """Whether ``fit`` reads ``X`` as a stream of chunks rather than as one array.

    Streams: :class:`Stream` (and what ``torchgmm.distributed.shard`` returns), a
    ``torch.utils.data.DataLoader``, a non-empty list whose items are all tensors or ``(X,
    sample_weight)`` pairs with a tensor X (chunks may differ in length), and any other iterable
    that is not array-like (an ``IterableDataset``, a generator: a one-shot iterator is refused at
    ``fit`` with a message). Arrays, tensors, data frames, tuples and nested lists of numbers stay
    data."""
    if isinstance(X, Stream):
        return True
    if X is None or isinstance(X, (Tensor, np.ndarray, str, bytes, dict, tuple, range, numbers.Number)):
        return False
    if isinstance(X, torch.utils.data.DataLoader):
        return True
    if isinstance(X, list):
        return len(X) > 0 and all(_is_chunk_item(item) for item in X)
    if hasattr(X, "__array__") or hasattr(X, "__array_interface__") or hasattr(X, "__dataframe__"):
        return False
    if isinstance(X, collections.abc.Sequence):
        return False
    return isinstance(X, collections.abc.Iterable)


class Stream:
    """A re-iterable source of chunks and how to read it.

    ``source``: a ``DataLoader``, a list of tensors or ``(X, sample_weight)`` pairs, a
    :class:`Chunks`, any re-iterable of those, or one in-memory array (one chunk).
    ``reservoir_size``: points per series sampled for the initialization (default
    :data:`RESERVOIR_SIZE`, capped by :data:`RESERVOIR_BYTES` over the batch). ``process_group``:
    the data are this rank's shard of data spread over the ranks of that group (see
    ``torchgmm.distributed``; None: one process)."""

    def __init__(self, source, *, reservoir_size: Optional[int] = None, process_group=None):
        if isinstance(source, Stream):
            reservoir_size = source.reservoir_size if reservoir_size is None else reservoir_size
            process_group = source.process_group if process_group is None else process_group
            source, self.single = source.source, source.single
        else:
            self.single = not is_stream(source)  # one in-memory array: a stream of one chunk
        if not self.single and isinstance(source, collections.abc.Iterator):
            raise TypeError(
                f"X is a one-shot iterator ({type(source).__name__}): exact EM reads the data once per "
                "iteration. Pass a re-iterable source instead (a list of chunks, a DataLoader, "
                "torchgmm.stream.Chunks(array, chunk_size), or an object whose __iter__ starts a new pass), "
                "or use GaussianMixture.partial_fit for data that arrive once"
            )
        if reservoir_size is not None and (isinstance(reservoir_size, bool) or not isinstance(reservoir_size, int) or reservoir_size < 1):
            raise ValueError(f"reservoir_size must be a positive int, got {reservoir_size!r}")
        self.source, self.reservoir_size, self.process_group = source, reservoir_size, process_group

    def __iter__(self):
        return iter([self.source]) if self.single else iter(self.source)

    def with_sample_weight(self, sample_weight) -> "Stream":
        """The weights of a one-array stream; other streams carry them in their chunks."""
        if not self.single:
            raise ValueError(
                "sample_weight cannot be given separately for a stream of chunks: give each chunk's "
                "weights with it, as (X, sample_weight) pairs (e.g. a TensorDataset(X, w) in a DataLoader)"
            )
        return Stream([(self.source, sample_weight)], reservoir_size=self.reservoir_size, process_group=self.process_group)


def _points_axis_len(x) -> int:
    shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
    return shape[0] if len(shape) == 1 else (shape[-2] if len(shape) >= 2 else 1)


class Chunks:
    """``X`` (a tensor, a numpy array, a ``np.memmap`` / ``np.load(path, mmap_mode="r")``) read in
    chunks of ``chunk_size`` points along its point axis (``(N,)``: axis 0; ``(*B, N, D)``: axis
    -2), with ``sample_weight (*B, N)`` alongside: a re-iterable stream. Only one chunk of a
    memory-mapped array is in memory at a time."""

    def __init__(self, X, chunk_size: int = 65_536, sample_weight=None):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.X, self.chunk_size, self.sample_weight = X, chunk_size, sample_weight

    def __len__(self) -> int:
        return math.ceil(_points_axis_len(self.X) / self.chunk_size)

    @staticmethod
    def _tensor(part) -> Tensor:
        return part if isinstance(part, Tensor) else torch.from_numpy(np.array(part))

    def __iter__(self):
        n, one_d = _points_axis_len(self.X), np.ndim(self.X) == 1 if not isinstance(self.X, Tensor) else self.X.dim() == 1
        for start in range(0, n, self.chunk_size):
            part = slice(start, start + self.chunk_size)
            x = self._tensor(self.X[part] if one_d else self.X[..., part, :])
            if self.sample_weight is None:
                yield x
            else:
                yield x, self._tensor(self.sample_weight[..., part])


def _split_item(item):
    """``(X, sample_weight or None)`` of one chunk."""
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], (Tensor, np.ndarray)):
        if len(item) == 1:
            return item[0], None
        if len(item) == 2:
            return item[0], item[1]
        raise ValueError(
            f"a chunk is X or an (X, sample_weight) pair; got a {type(item).__name__} of {len(item)} items"
        )
    return item, None


# -- the scan: moments, counts, the reservoir -----------------------------------------------------
class _Moments(NamedTuple):
    """Weighted moments of each series, float64: total weight, mean, and the centred second
    moment (``(B, D)`` diagonal; ``(B, D, D)`` when the full comoment is wanted)."""

    w: Tensor
    mean: Tensor
    m2: Tensor

    @staticmethod
    def of(x: Tensor, w: Tensor, full: bool) -> "_Moments":
        valid = (w > 0).unsqueeze(-1)
        x64 = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).double()
        w64 = w.double()
        total = w64.sum(-1)
        mean = (w64.unsqueeze(-1) * x64).sum(-2) / total.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-1)
        c = torch.where(valid, x64 - mean.unsqueeze(-2), torch.zeros((), dtype=torch.float64, device=x.device))
        m2 = (c * w64.unsqueeze(-1)).mT @ c if full else (w64.unsqueeze(-1) * c.square()).sum(-2)
        return _Moments(total, mean, m2)

    def __add__(self, other: "_Moments") -> "_Moments":  # type: ignore[override]
        """Chan, Golub & LeVeque's merge of two sets of moments."""
        total = self.w + other.w
        safe = total.clamp_min(torch.finfo(torch.float64).tiny)
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.w / safe).unsqueeze(-1)
        c = self.w * other.w / safe
        if self.m2.dim() == delta.dim() + 1:
            extra = c[:, None, None] * delta.unsqueeze(-1) * delta.unsqueeze(-2)
        else:
            extra = c.unsqueeze(-1) * delta.square()
        return _Moments(total, mean, self.m2 + other.m2 + extra)


class _Reservoir:
    """A uniform sample of at most ``size`` positive-weight points per series (the points with the
    smallest uniform keys; keys are shared by the series of a chunk, so a series is sampled alike
    alone or in a batch). Bottom-``m`` samples merge exactly (ranks of ``torchgmm.distributed``)."""

    def __init__(self, size: int, gen: torch.Generator):
        self.size, self.gen = size, gen
        self.x = self.w = self.key = self.pos = None

    def add(self, x: Tensor, w: Tensor, offset: int) -> None:
        n = x.shape[-2]
        u = torch.rand(n, generator=self.gen, device=self.gen.device, dtype=torch.float64).to(x.device)
        key = torch.where(w > 0, u, torch.inf)  # (B, n): padding is never sampled
        pos = (offset + torch.arange(n, device=x.device)).expand_as(key)
        parts = (x, w, key, pos) if self.x is None else (
            torch.cat([self.x, x], -2), torch.cat([self.w, w], -1), torch.cat([self.key, key], -1),
            torch.cat([self.pos, pos], -1),
        )
        self.x, self.w, self.key, self.pos = self._keep(*parts, self.size)

    @staticmethod
    def _keep(x, w, key, pos, size):
        if key.shape[-1] <= size:
            return x, w, key, pos
        idx = key.topk(size, dim=-1, largest=False, sorted=False).indices  # (B, size)
        return (torch.gather(x, -2, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])), torch.gather(w, -1, idx),
                torch.gather(key, -1, idx), torch.gather(pos, -1, idx))

    def in_order(self) -> tuple[Tensor, Tensor]:
        """The sample ``(x (B, m, D), w (B, m))`` in stream order (zero-weight slots hold no point)."""
        order = self.pos.argsort(-1)
        x = torch.gather(self.x, -2, order.unsqueeze(-1).expand(-1, -1, self.x.shape[-1]))
        w = torch.gather(torch.where(torch.isfinite(self.key), self.w, 0.0), -1, order)
        return x, w


class _Source:
    """A stream, validated chunk by chunk, and (after :meth:`scan`) its standardization."""

    def __init__(self, stream: Stream, *, dtype, device, n_features, nan_policy):
        self.stream, self.dtype, self.device = stream, dtype, device
        self.n_features, self.nan_policy = n_features, nan_policy
        self.batch_shape = None
        self.n_points = None  # points per series in one pass (the scan's count)
        self.passes = 0

    def chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass: validated chunks ``(x (B, n, D), w (B, n))``, raw weights (NaN rows omitted)."""
        count = 0
        for item in self.stream:
            x, w = _split_item(item)
            if _points_axis_len(x) == 0:
                continue
            t, nan_rows = validation.as_data(
                x, name="X (a chunk of the stream)", dtype=self.dtype, device=self.device,
                n_features=self.n_features, nan_policy=self.nan_policy,
            )
            if self.dtype is None:
                self.dtype, self.device = t.dtype, t.device
            if self.n_features is None:
                self.n_features = t.shape[-1]
            if self.batch_shape is None:
                self.batch_shape = t.shape[:-2]
            elif t.shape[:-2] != self.batch_shape:
                raise ValueError(
                    f"a chunk of the stream has batch shape {tuple(t.shape[:-2])} (shape {tuple(t.shape)}), but the "
                    f"first chunk had {tuple(self.batch_shape)}: every chunk must hold the same series, "
                    "chunked along the points (axis -2)"
                )
            wt = validation.as_sample_weight(w, t, name="sample_weight (of a chunk of the stream)")
            if nan_rows is not None:
                wt = torch.where(nan_rows, torch.zeros((), dtype=wt.dtype, device=wt.device), wt)
            n, d = t.shape[-2:]
            count += n
            yield t.reshape(-1, n, d), wt.reshape(-1, n)
        if self.n_points is not None and count != self.n_points:
            raise ValueError(
                f"the stream yielded {count} points per series on pass {self.passes + 1}, but {self.n_points} on "
                "the first pass: a stream must yield the same data on every pass (EM reads it once per iteration)"
            )
        self.passes += 1

    def scan(self, *, full_moments: bool, reservoir_size: int, key_gen: torch.Generator, comm=None) -> None:
        """Pass 0: moments, counts and the reservoir (merged over the ranks of ``comm``)."""
        moments, n_valid, n_points, reservoir = None, None, 0, None
        for x, w in self.chunks():
            m = _Moments.of(x, w, full_moments)
            moments = m if moments is None else moments + m
            valid = (w > 0).sum(-1)
            n_valid = valid if n_valid is None else n_valid + valid
            if reservoir is None:
                budget = max(_RESERVOIR_FLOOR, RESERVOIR_BYTES // max(1, x.shape[0] * x.shape[-1] * x.element_size()))
                reservoir = _Reservoir(min(reservoir_size, budget), key_gen)
            reservoir.add(x, w, n_points)
            n_points += x.shape[-2]
        self.n_points = n_points  # this process's points per series in one pass
        if comm is not None:  # every rank: the moments, counts and sample of the union of the shards
            moments, n_valid, n_points, reservoir = comm.merge_scan(self, moments, n_valid, n_points, reservoir, full_moments)
        if moments is None:
            raise ValueError("the stream yielded no data: it must yield at least one chunk with at least one point")
        self.moments, self.n_valid, self.n_total = moments, n_valid, n_points
        self.reservoir = reservoir

    def standardize(self, reg_covar: float, warn: bool, stacklevel: int) -> None:
        """The per-series standardization of the whole stream (as ``units.standardize`` does in
        memory: ``scale`` the root mean variance over features, floored at ``sqrt(reg_covar)``)."""
        dtype, mom = self.dtype, self.moments
        var = (torch.diagonal(mom.m2, dim1=-2, dim2=-1) if mom.m2.dim() == 3 else mom.m2) / mom.w.clamp_min(
            torch.finfo(torch.float64).tiny).unsqueeze(-1)
        scale = var.mean(-1).sqrt()
        scale = torch.maximum(scale, torch.full_like(scale, math.sqrt(reg_covar)))
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.empty = self.n_valid == 0
        self.insufficient = None  # set by fit_stream (needs K)
        too_big = scale.square() > torch.finfo(dtype).max / 16
        if bool(too_big.any()):
            raise ValueError(
                f"X has a spread of {float(scale.max()):.3g}, whose variance overflows {dtype}; rescale the data"
                + (" or pass float64 (dtype=torch.float64)" if dtype != torch.float64 else "")
            )
        self.shift, self.scale = mom.mean.to(dtype), scale.to(dtype)
        # weights in units of points (as in memory); an empty series is a stand-in of zeros, weight 1/N
        total = torch.where(self.empty, torch.full_like(mom.w, float(self.n_total)), mom.w)
        self.factor = (self.n_valid.clamp_min(1).double() / total).to(dtype)
        self.w_total = self.n_valid.clamp_min(1).to(dtype)
        self.reg = reg_covar / self.scale.square()
        floored = (scale <= math.sqrt(reg_covar)) & ~self.empty if reg_covar > 0 else torch.zeros_like(self.empty)
        if warn and bool(floored.any()):
            warnings.warn(
                f"reg_covar={reg_covar:g} is larger than the data variance of {int(floored.sum())} series: their "
                "covariances will be about reg_covar, not the data's. Rescale the data or lower reg_covar",
                FitWarning, stacklevel=stacklevel + 1,
            )

    def to_standard(self, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """Raw ``(x (B, n, D), w (B, n))`` in standardized units and weights in units of points."""
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        xs = torch.where((w > 0).unsqueeze(-1), x - self.shift.unsqueeze(-2), zero) / self.scale[:, None, None]
        w = w * self.factor.unsqueeze(-1)
        if bool(self.empty.any()):
            xs = torch.where(self.empty[:, None, None], zero, xs)
            w = torch.where(self.empty.unsqueeze(-1), self.factor.unsqueeze(-1), w)
        return xs, w

    def standardized(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over the stream in standardized units."""
        for x, w in self.chunks():
            yield self.to_standard(x, w)

    def empty_chunk(self) -> tuple[Tensor, Tensor]:
        b, d = self.shift.shape
        return (torch.zeros(b, 0, d, dtype=self.dtype, device=self.device),
                torch.zeros(b, 0, dtype=self.dtype, device=self.device))


# -- the member loop on a stream --------------------------------------------------------------------
class _StreamMembers(Members):
    """The loop's members when the data are a stream: no data tensor; :meth:`batch` returns a
    :class:`Batch` whose ``x`` holds, for each leading position, the row (series) of the stream's
    chunks it reads (``(B, 1)`` for every member in order, ``(S,)`` once compacted); ``w`` is a
    placeholder (``w_total``). ``self.x`` is an empty tensor giving the dtype and device."""

    def __init__(self, w_total: Tensor, reg: Tensor, prior, n_init: int):
        self.x = torch.zeros(w_total.shape[0], 0, 1, dtype=w_total.dtype, device=w_total.device)
        self.w, self.w_total, self.reg, self.prior = w_total.unsqueeze(-1), w_total, reg, prior
        self.n_series, self.n_init = w_total.shape[0], n_init
        self.m = self.n_series * n_init
        self.series_of = torch.arange(self.m, device=w_total.device) // n_init

    def batch(self, members: Optional[Tensor] = None) -> Batch:
        if members is None:
            rows = torch.arange(self.n_series, device=self.w_total.device).unsqueeze(1)
            wt = self.w_total.unsqueeze(1)
            return Batch((self.n_series, self.n_init), rows, wt, wt, self.reg.unsqueeze(1),
                         tree_map(lambda t: t.unsqueeze(1), self.prior))
        rows = self.series_of[members]
        return Batch((len(members),), rows, self.w_total[rows], self.w_total[rows], self.reg[rows],
                     tree_map(lambda t: t[rows], self.prior))


class StreamEMRule(EMRule):
    """EM over a stream, as a step rule of the member loop: each :meth:`step` makes one pass over
    the source, summing the statistics of every chunk (about the current means), adds them over
    the ranks (``reduce``, see ``torchgmm.distributed``), and makes one M-step. Same state, value
    and rule methods as :class:`torchgmm.em.EMRule` (only :meth:`apply`, the EM map, differs), so
    SQUAREM runs on it unchanged.

    The :class:`Batch` it receives (from :class:`_StreamMembers`) carries ``w_total``, ``reg`` and
    the prior; its ``x`` names the chunk rows of the members. Each chunk is processed in blocks of
    rows and sub-chunks of points whose temporaries fit ``memory_budget`` (cache-sized on the CPU),
    as in memory (``plan.blocking``)."""

    def __init__(self, source: _Source, covariance_type: str | Covariance, *, chunk_size: Optional[int] = None,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, compile: bool = False, penalized: bool = False,
                 reduce=None):
        from ._compile import compiled

        self.source, self.cov = source, get_covariance(covariance_type)
        self.chunk_size, self.memory_budget, self.penalized, self.reduce = chunk_size, memory_budget, penalized, reduce
        self.stats_fn = compiled(e_step_statistics) if compile else e_step_statistics

    def _chunk_stats(self, x: Tensor, w: Tensor, params: GMMParams) -> Stats:
        """Statistics of one chunk ``x (L0, L1?, n, D)`` for ``params (L0, ...)``, in blocks."""
        rows, per_row = params.log_weights.shape[0], params.log_weights.shape[1:-1].numel()
        k, (n, d) = params.means.shape[-2], x.shape[-2:]
        if n == 0:  # an empty shard's zeros
            return self.stats_fn(x, w, params, self.cov)
        inner, block_members = blocking(rows, per_row, k, n, d, x.element_size(), self.memory_budget,
                                        self.chunk_size, x.device)
        block_rows = max(1, block_members // per_row)
        parts = []
        for start in range(0, rows, block_rows):
            part = slice(start, start + block_rows)
            p = params.map(lambda t: t[part])
            parts.append(chunked_sum(lambda xc, wc: self.stats_fn(xc, wc, p, self.cov), x[part], w[part], inner))
        return parts[0] if len(parts) == 1 else Stats(*(torch.cat(ts) for ts in zip(*parts)))

    def statistics(self, batch: Batch, params: GMMParams) -> Stats:
        """One pass: the summed statistics of the members ``params (*lead, ...)`` (shaped)."""
        rows = None if len(batch.lead) == 2 else batch.x
        total = None
        chunks = self.source.standardized()
        for xs, w in chunks:
            xc, wc = (xs.unsqueeze(1), w.unsqueeze(1)) if rows is None else (xs[rows], w[rows])
            s = self._chunk_stats(xc, wc, params)
            total = s if total is None else total + s
        if total is None:  # a rank whose shard is empty contributes zeros
            xs, w = self.source.empty_chunk()
            xc, wc = (xs.unsqueeze(1), w.unsqueeze(1)) if rows is None else (xs[rows], w[rows])
            total = self._chunk_stats(xc, wc, params)
        return total if self.reduce is None else self.reduce(total)

    def apply(self, batch: Batch, params: GMMParams) -> tuple[GMMParams, Tensor, Tensor]:
        """The EM map of flat ``params (S, ...)``: ``(new, value (S,), ok (S,))`` (see EMRule)."""
        shaped = batch.shaped(params)
        e_params = penalized_params(shaped, self.cov, batch.reg) if self.penalized else shaped
        stats = self.statistics(batch, e_params)
        new, ok = m_step(stats, shaped.means, self.cov, batch.reg, batch.prior)
        new, value, ok = batch.flat(new), (stats.log_lik / batch.w_total).reshape(-1), ok.reshape(-1)
        return new, value, ok & torch.isfinite(value) & all_finite(new)


# -- one streamed fit ---------------------------------------------------------------------------------
def _key_generator(random_state, rank: int) -> torch.Generator:
    """The reservoir's keys: their own stream of draws (never the initialization's), one per rank."""
    if isinstance(random_state, torch.Generator) or random_state is None:
        return make_generator(random_state)
    return make_generator((int(random_state) * 1_000_003 + 7_919 * (rank + 1)) % (2**63))


def _pseudo_points(source: _Source) -> tuple[Tensor, Tensor]:
    """``2D`` weighted points per series with the stream's weighted mean, total weight and
    centred scatter, in standardized units: what ``prior.make_prior`` reads of the data."""
    mom, dtype = source.moments, source.dtype
    d = mom.mean.shape[-1]
    w_total = (mom.w * source.factor.double())  # in units of points
    m2 = mom.m2 * source.factor.double()[:, None, None] / source.scale.double()[:, None, None].square()
    evals, evecs = torch.linalg.eigh(m2 / w_total.clamp_min(1e-300)[:, None, None])
    root = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2) * math.sqrt(d)  # columns: sqrt(D) L e_j
    centre = ((mom.mean - source.shift.double()) / source.scale.double()[:, None]).unsqueeze(-2)
    pts = torch.cat([centre + root.mT, centre - root.mT], -2)  # (B, 2D, D)
    w = (w_total / (2 * d)).unsqueeze(-1).expand(-1, 2 * d)
    return pts.to(dtype), w.to(dtype)


def fit_stream(
    X,
    n_components: int = 1,
    *,
    covariance_type: str = "full",
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    n_init: int = 1,
    init_params: str = "kmeans",
    weights_init=None,
    means_init=None,
    precisions_init=None,
    random_state=None,
    sample_weight=None,
    nan_policy: str = "raise",
    dtype: Optional[torch.dtype] = None,
    device=None,
    warm_start: Optional[GMMParams] = None,
    warm_start_lower_bound: Optional[Tensor] = None,
    n_features: Optional[int] = None,
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    method="em",
    optimizer: str = "lbfgs",
    lr: Optional[float] = None,
    prior=None,
    compile="auto",
    prune_after: Optional[int] = None,
    catch_interrupt: bool = True,
    progress=None,
    criterion: str = "bic",
    refine=False,
    warn: bool = True,
) -> FitResult:
    """``torchgmm.fit`` of a stream ``X`` (see the module docstring; ``fit`` calls this for a
    stream). The settings mean what they mean in ``fit``; ``chunk_size`` and ``memory_budget``
    bound the work on each chunk; ``compile="auto"`` stays eager (chunk lengths vary), True
    compiles the E-step. ``method`` is EM or SQUAREM (the gradient mode needs the data in memory).
    A ``Stream`` with a ``process_group`` is one shard of data spread over ranks: every rank calls
    this with the same settings (``torchgmm.distributed``). A list of ``n_components`` (model
    selection by ``criterion``) is not supported for streams: fit each K."""
    if not isinstance(n_components, numbers.Integral) and hasattr(n_components, "__iter__"):
        raise ValueError(
            f"n_components={n_components!r}: model selection over several K is not supported for a stream "
            "(each K would need its own passes); fit each K separately and compare their bic/aic"
        )
    if validation.check_refine(refine) is not None:
        raise ValueError("refine needs the data in memory (its candidates are refitted on all points); "
                         "refine=True is not supported for a stream")
    validation.check_settings(
        n_components=n_components, covariance_type=covariance_type, tol=tol, reg_covar=reg_covar,
        max_iter=max_iter, n_init=n_init, init_params=init_params, nan_policy=nan_policy, init_methods=INIT_METHODS,
        **method_settings(method, optimizer=optimizer, lr=lr, prune_after=prune_after),
    )
    method = as_method(method, optimizer=optimizer, lr=lr, prune_after=prune_after)
    if method.name == "gradient":
        raise ValueError("a stream is fitted by EM or SQUAREM (method='em' or 'squarem'); the gradient mode needs the data in memory")
    stream = Stream(X)
    if sample_weight is not None:
        stream = stream.with_sample_weight(sample_weight)
    comm = None
    if stream.process_group is not None:
        from .distributed import Comm

        comm = Comm(stream.process_group)
    rank = 0 if comm is None else comm.rank
    cov, k = get_covariance(covariance_type), n_components

    source = _Source(stream, dtype=dtype, device=device, n_features=n_features, nan_policy=nan_policy)
    source.scan(full_moments=prior is not None, reservoir_size=stream.reservoir_size or RESERVOIR_SIZE,
                key_gen=_key_generator(random_state, rank), comm=comm)
    batch_shape, n_valid = source.batch_shape, source.n_valid
    if len(batch_shape) == 0 and bool(n_valid[0] == 0):
        raise ValueError("sample_weight is zero everywhere; at least one point needs a positive weight")
    if len(batch_shape) == 0 and int(n_valid[0]) < k:
        raise ValueError(
            f"n_components={k} must be <= the number of positive-weight samples, n_samples={int(n_valid[0])}; "
            "reduce n_components or provide more data"
        )
    source.standardize(reg_covar, warn and rank == 0, stacklevel=3)
    empty, insufficient = source.empty, (n_valid < k) & (n_valid > 0)
    scaling = Scaling(source.shift, source.scale)
    n_series, d, dt, dev = n_valid.shape[0], source.n_features, source.dtype, source.device
    itemsize = torch.empty((), dtype=dt).element_size()
    check_memory(n_series * n_init, k, d, cov, itemsize, dev)

    from .fitting import _Data, _given_init, _initialize  # the in-memory fit's own steps

    res_x, res_w = source.reservoir.in_order() if source.reservoir is not None else source.empty_chunk()
    res_xs, res_w = source.to_standard(res_x, res_w)
    sample = _Data(res_xs, res_w, batch_shape, n_valid, empty, insufficient)
    all_given = weights_init is not None and means_init is not None and precisions_init is not None
    n_restarts = 1 if warm_start is not None or all_given else n_init
    if warm_start is not None:
        start = GMMParams(*(t.reshape(n_series, *t.shape[len(batch_shape):]).to(dtype=dt, device=dev) for t in warm_start))
        init = scaling.to_standard(start, cov).map(lambda t: t.unsqueeze(1))
    else:
        given = _given_init(sample, k, cov, scaling, weights_init, means_init, precisions_init)
        if len(given) == 3:
            init = GMMParams(**{name: t.unsqueeze(1) for name, t in given.items()})
        elif rank == 0:
            plan = make_plan(n_series, n_init, k, res_xs.shape[-2], d, max_iter, itemsize, dev,
                             compile=compile is True, chunk_size=chunk_size, memory_budget=memory_budget)
            init = _initialize(res_xs, sample, k, n_init, init_params, cov, source.reg, random_state, given, plan,
                               warn, stacklevel=3)
        else:
            init = None
    if comm is not None:  # rank 0's initialization, everywhere
        init = comm.broadcast_params(init, (n_series, n_restarts), k, d, cov, dt, dev)
    reference = None
    if warm_start_lower_bound is not None:
        previous = warm_start_lower_bound.to(dtype=dt, device=dev).reshape(n_series)
        reference = scaling.log_lik_to_standard(previous, d).repeat_interleave(n_restarts)

    prior_s = None
    if prior is not None:
        from .prior import make_prior

        pts, pw = _pseudo_points(source)
        prior_s = make_prior(prior, pts, pw, k, cov, shift=scaling.shift, scale=scaling.scale)
    rule = StreamEMRule(source, cov, chunk_size=chunk_size, memory_budget=memory_budget, compile=compile is True,
                        penalized=method.penalized, reduce=None if comm is None else comm.reduce_stats)
    if method.name == "squarem":
        from .squarem import SquaremRule

        rule = SquaremRule(rule)
    with torch.no_grad():
        run = run_members(
            _StreamMembers(source.w_total, source.reg, prior_s, n_restarts), init, rule, tol, max_iter,
            reference=reference, catch_interrupt=catch_interrupt, progress=progress, **method.loop_options(),
        )
    result = FitResult.from_members(
        run, n_restarts=n_restarts, cov=cov, scaling=scaling, reg=source.reg, n_valid=n_valid, empty=empty,
        insufficient=insufficient, batch_shape=batch_shape, method=method.name,
    )
    if warn and rank == 0:
        result.warn(stacklevel=4, convergence=max_iter > 0)
    return result


# -- online (stepwise) EM -----------------------------------------------------------------------------
def _recentre(stats: Stats, delta: Tensor) -> Stats:
    """Statistics about ``ref`` -> about ``ref + delta (*B, K, D)`` (exact: no raw moments)."""
    nk, sd, scatter = stats.nk, stats.sum_diff, stats.scatter
    if scatter.shape == sd.shape:  # per-feature scatter (diag, spherical)
        scatter = scatter - 2 * delta * sd + nk.unsqueeze(-1) * delta.square()
    else:  # (K, D, D) scatter (full, tied)
        outer = delta.unsqueeze(-1) * sd.unsqueeze(-2)
        scatter = scatter - outer - outer.mT + nk[..., None, None] * delta.unsqueeze(-1) * delta.unsqueeze(-2)
    return Stats(nk, sd - nk.unsqueeze(-1) * delta, scatter, stats.log_lik)


class OnlineEM:
    """Stepwise EM (Cappe & Moulines 2009, "On-line expectation-maximization algorithm for latent
    data models") for a batch of series whose chunks arrive once.

    The state is the running average ``s`` of the per-point sufficient statistics (nk, sum_diff,
    scatter, log-likelihood; kept about the current means, in the standardized units fixed by the
    first chunk), per series. A chunk with (normalized) statistics ``c`` under the current
    parameters moves it by ``s <- s + eta_t (c - s)``, then one M-step gives the parameters, with
    ``eta_t = (t + t0) ** -alpha`` for the ``t``-th update of that series (``t = 1, 2, ...``; a
    series whose chunk has no positive weight is not updated). ``alpha`` in ``(0.5, 1]``
    (Robbins-Monro: the steps sum to infinity, their squares do not); defaults
    ``alpha = 0.7`` (:data:`ONLINE_ALPHA`), ``t0 = 1`` (:data:`ONLINE_T0`). ``alpha = 1, t0 = 1``
    weighs every chunk alike (the running mean); a smaller ``alpha`` forgets old chunks faster.
    With a prior the averaged statistics are scaled to the weight seen so far before the M-step.
    """

    def __init__(self, params: GMMParams, x: Tensor, w: Tensor, covariance_type, reg_covar: float, prior=None,
                 alpha: float = ONLINE_ALPHA, t0: float = ONLINE_T0):
        """Start from ``params (B, ...)`` (data units) fitted to the first chunk ``x (B, n, D)``,
        ``w (B, n)``: its standardization is kept, its statistics are the first average."""
        self.cov = get_covariance(covariance_type)
        self.alpha, self.t0 = _check_schedule(alpha, t0)
        self.k = params.means.shape[-2]
        _, shift, scale, reg = standardize(x, w, reg_covar)
        self.scaling, self.reg = Scaling(shift, scale), reg
        xs = self._standard(x)
        self.prior = None
        if prior is not None:
            from .prior import make_prior

            self.prior = make_prior(prior, xs, w, self.k, self.cov, shift=shift, scale=scale)
        self.params = self.scaling.to_standard(params, self.cov)
        with torch.no_grad():
            chunk = e_step_statistics(xs, w, self.params, self.cov)
        wc = w.sum(-1)
        seen = wc > 0
        self.stats = tree_map(lambda t: torch.where(_expand(seen, t), t / _expand(wc.clamp_min(1e-300), t), 0.0), chunk)
        self.t = seen.to(torch.long)  # updates absorbed per series (the first chunk counts as one)
        self.n_seen = wc.clone()

    def _standard(self, x: Tensor) -> Tensor:
        return (x - self.scaling.shift.unsqueeze(-2)) / self.scaling.scale[:, None, None]

    def update(self, x: Tensor, w: Tensor) -> None:
        """One stepwise-EM update from the chunk ``x (B, n, D)``, ``w (B, n)``."""
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        xs = torch.where((w > 0).unsqueeze(-1), self._standard(x), zero)
        with torch.no_grad():
            chunk = e_step_statistics(xs, w, self.params, self.cov)
            wc = w.sum(-1)
            seen = wc > 0
            # the update after t chunks (the first chunk counts as one): eta = (t + t0) ** -alpha
            eta = torch.where(self.t == 0, 1.0, (self.t.to(x.dtype) + self.t0) ** -self.alpha)
            eta = torch.where(seen, eta.to(x.dtype), zero)
            self.stats = tree_map(
                lambda s, c: s + _expand(eta, s) * (c / _expand(wc.clamp_min(1e-300), c) - s), self.stats, chunk)
            self.n_seen = self.n_seen + wc
            self.t = self.t + seen.to(torch.long)
            scaled = self.stats if self.prior is None else tree_map(
                lambda s: s * _expand(self.n_seen.clamp_min(1e-300), s), self.stats)
            new, ok = m_step(scaled, self.params.means, self.cov, self.reg, self.prior)
            keep = seen & ok & all_finite(new)
            new = GMMParams(*(torch.where(_expand(keep, a), a, b) for a, b in zip(new, self.params)))
            self.stats = _recentre(self.stats, new.means - self.params.means)
            self.params = new

    @property
    def params_data(self) -> GMMParams:
        """The current parameters in data units ``(B, ...)``."""
        return self.scaling.to_data(self.params, self.cov)

    @property
    def lower_bound(self) -> Tensor:
        """The running average of the chunks' mean log-likelihood (data units), ``(B,)``."""
        return self.scaling.log_lik_to_data(self.stats.log_lik, self.params.means.shape[-1])


def _expand(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


def _check_schedule(alpha, t0) -> tuple[float, float]:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.5 < alpha <= 1:
        raise ValueError(f"alpha must be in (0.5, 1] (stepwise EM's step sizes (t + t0) ** -alpha), got {alpha!r}")
    if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not t0 >= 0:
        raise ValueError(f"t0 must be a number >= 0, got {t0!r}")
    return float(alpha), float(t0)


def _online_chunk(model, X, sample_weight) -> tuple[Tensor, Tensor]:
    """One validated chunk for ``model`` (its dtype, device, features and batch shape), flattened
    to ``(B, n, D)`` and ``(B, n)``; NaN points omitted under ``nan_policy="omit"``."""
    x, nan_rows = validation.as_data(X, dtype=model.loc.dtype, device=model.loc.device,
                                     n_features=model.n_features_in_, nan_policy=model.nan_policy)
    if x.shape[:-2] != model.batch_shape:
        raise ValueError(
            f"X has batch shape {tuple(x.shape[:-2])} (shape {tuple(x.shape)}), but the model was started on "
            f"series of batch shape {tuple(model.batch_shape)}: every chunk of partial_fit holds the same series"
        )
    w = validation.as_sample_weight(sample_weight, x)
    if nan_rows is not None:
        w = torch.where(nan_rows, torch.zeros((), dtype=w.dtype, device=w.device), w)
    n, d = x.shape[-2:]
    return x.reshape(-1, n, d), w.reshape(-1, n)


def partial_fit(model, X, sample_weight=None, *, alpha: float = ONLINE_ALPHA, t0: float = ONLINE_T0):
    """``GaussianMixture.partial_fit``: start :class:`OnlineEM` with a ``fit`` of the first chunk
    (or the first after a ``fit``), else one stepwise update; the model's parameters follow."""
    if model.process_group is not None:
        raise ValueError("partial_fit does not support process_group (online EM runs in one process); "
                         "use fit for data-parallel EM")
    online = getattr(model, "online_", None)
    if online is None or online.after is not model.result_:
        model.fit(X, sample_weight=sample_weight)
        x, w = _online_chunk(model, X, sample_weight)
        params = model._detached().map(lambda t: t.reshape(x.shape[0], *t.shape[len(model.batch_shape):]))
        model.online_ = OnlineEM(params, x, w, model.covariance_type, model.reg_covar, model.prior, alpha, t0)
        model.online_.after = model.result_
        return model
    x, w = _online_chunk(model, X, sample_weight)
    online.update(x, w)
    batch = tuple(model.batch_shape)
    model.set_params_(online.params_data.map(lambda t: t.reshape(batch + t.shape[1:])))
    model.lower_bound_ = online.lower_bound.reshape(batch)
    return model
