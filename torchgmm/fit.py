"""One fit, end to end: the functional entry point under the ``GaussianMixture`` module.

Data flow::

    validate X, weights (fold NaN rows / padding into zero weights)
      -> flatten the batch to (B, N, D); count positive-weight points per series
      -> standardize per series (shift, scale; reg_covar rescaled alike)
      -> initialize (B, R, ...) restarts   [init]
      -> run EM on all members            [em: E-step + statistics + M-step per iteration]
      -> flag degenerate members; choose the best restart per series
      -> back to data units; status per series; one summarized warning
      -> FitResult with the batch shape restored
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import validation
from ._compile import compiled, should_compile
from ._ops import even_slices
from .covariance import get_covariance
from .density import GMMParams
from .em import run_em
from .init import INIT_METHODS, initialize, make_generator
from .result import FitResult, FitStatus, FitWarning

__all__ = ["fit", "standardize", "DEFAULT_MEMORY_BUDGET"]

# Bytes the E-step's temporaries may use at once; the points are processed in chunks to stay below.
DEFAULT_MEMORY_BUDGET = 1 << 30

# Bytes of one block of working data ((K, N, D) per member): an iteration, and the initialization,
# run on blocks of members / chunks of points this size, so that the temporaries stay in cache.
# Measured on the 2-core CPU against one block: W1 (B=10,000) EM 2x faster compiled, 4x eager;
# W3 (N=1e6, D=16, K=16) full EM 4.5x faster compiled, diag 1.6x.
BLOCK_BYTES = 8 << 20
MIN_CHUNK = 256

# A component is degenerate when its smallest variance is within this factor of reg_covar.
DEGENERATE_FACTOR = 10.0


def standardize(x: Tensor, w: Tensor, reg_covar: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-series centring and scaling of ``x (B, N, D)`` with weights ``w (B, N)``.

    Returns ``(xs, shift (B, D), scale (B,), reg (B,))`` with ``xs = (x - shift) / scale`` (zero
    where ``w == 0``) and ``reg = reg_covar / scale**2``. ``scale`` is the root mean variance over
    features (one number, so every covariance type maps back exactly), floored at
    ``sqrt(reg_covar)`` so that a constant or tiny-scale series never divides by ~0.
    """
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    valid = w.unsqueeze(-1) > 0  # (B, N, 1); padding may hold anything finite, however large
    w_total = w.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)  # (B, 1)
    # Sums of values and squares are taken relative to the largest magnitude, so they cannot
    # overflow even where x**2 would (|x| > 1.8e19 in float32).
    big = torch.where(valid, x.abs(), zero).amax((-2, -1)).clamp_min(torch.finfo(x.dtype).tiny)  # (B,)
    shift = (w.unsqueeze(-1) * torch.where(valid, x / big[:, None, None], zero)).sum(-2) / w_total * big[:, None]  # (B, D)
    centred = torch.where(valid, x - shift.unsqueeze(-2), zero)
    spread = centred.abs().amax((-2, -1)).clamp_min(torch.finfo(x.dtype).tiny)  # (B,)
    var = (w.unsqueeze(-1) * (centred / spread[:, None, None]).square()).sum(-2) / w_total  # (B, D), in spread^2
    scale = var.mean(-1).sqrt() * spread
    scale = torch.maximum(scale, torch.full_like(scale, math.sqrt(reg_covar)))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    xs = centred / scale[:, None, None]
    return xs, shift, scale, reg_covar / scale.square()


def _first(mask: Tensor, batch_shape) -> str:
    """`` (first: series (i, j))`` for a flat mask over a batch, empty when unbatched."""
    if not batch_shape:
        return ""
    first = tuple(int(i) for i in torch.unravel_index(mask.nonzero()[0, 0], tuple(batch_shape)))
    return f" (first: series {first})"


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


def _check_memory(n_members: int, k: int, d: int, cov, x: Tensor) -> None:
    """Refuse, before allocating, a fit whose parameters and statistics cannot fit in memory."""
    per_member = k * (1 + 2 * d) + math.prod(cov.prec_chol_shape(k, d)) + k * d * d
    # initial, working, updated and output copies of the parameters, and the statistics
    needed = 6 * n_members * per_member * x.element_size()
    available = _available_bytes(x.device)
    if available is not None and needed > available:
        raise MemoryError(
            f"this fit needs about {needed / 2**30:.1f} GiB for the parameters and statistics of "
            f"{n_members} fits (series x n_init) with K={k}, D={d}, but {available / 2**30:.1f} GiB "
            f"are available on {x.device}; fit fewer series at a time, lower n_init, or use "
            "covariance_type='diag'"
        )


def _blocking(
    n_rows: int, n_restarts: int, k: int, n: int, d: int, itemsize: int, budget: int,
    chunk_size: Optional[int], device: torch.device, blocked: bool = True,
) -> tuple[Optional[int], int]:
    """``(chunk_size, block_members)``: points per chunk and members per block for ``n_rows``
    rows (series) of ``n_restarts`` members each.

    The working data of one member for one point is about ``K x (D + 2)`` numbers (``diff`` and
    ``(K,)`` temporaries). On the CPU (``blocked``) a block holds whole rows with all their points
    when a row fits ``min(BLOCK_BYTES, budget)`` (cache-sized), otherwise one row at a time with
    its points in chunks that fit (by default at least ``MIN_CHUNK``, bounding the per-chunk
    overhead; a smaller ``budget`` is obeyed). On CUDA, or unblocked, all rows form one block (large
    launches) and only ``budget`` bounds the chunks. Either way the temporaries are bounded
    whatever B and N. A given ``chunk_size`` is kept.
    """
    if device.type == "cuda" or not blocked:
        block_bytes, floor, n_restarts = budget, 1, n_rows * n_restarts
    else:
        block_bytes = min(BLOCK_BYTES, budget)
        floor = MIN_CHUNK if block_bytes == BLOCK_BYTES else 1
    per_point = n_restarts * k * (d + 2) * itemsize  # one block row, one point
    if chunk_size is None and per_point * n > block_bytes:
        chunk_size = max(floor, block_bytes // per_point)
    points = min(n, chunk_size or n)
    block_members = max(1, block_bytes // (k * (d + 2) * itemsize * points))
    return (None if chunk_size is None or chunk_size >= n else int(chunk_size)), block_members


def _initialize_in_blocks(xs, w, k, n_restarts, init_params, cov, reg, gen, block_series: int, **kwargs):
    """:func:`initialize` on blocks of ``block_series`` series, every block from the same generator
    state: the draws are shared by all series anyway (shaped ``(R, ...)``), so the result is the
    same as one call on the whole batch, with each block's temporaries in cache."""
    if xs.shape[0] <= block_series:
        return initialize(xs, w, k, n_restarts, init_params, cov, reg, gen, **kwargs)
    state, parts = gen.get_state(), []
    for part in even_slices(xs.shape[0], block_series):
        gen.set_state(state)
        parts.append(initialize(xs[part], w[part], k, n_restarts, init_params, cov, reg[part], gen, **kwargs))
    inits, distinct = zip(*parts)
    return GMMParams(*(torch.cat(ts) for ts in zip(*inits))), torch.cat(distinct)


def fit(
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
    chunk_size: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    n_features: Optional[int] = None,
    method: str = "em",
    optimizer: str = "lbfgs",
    lr: Optional[float] = None,
    prior=None,
    compile="auto",
    prune_after: Optional[int] = None,
    catch_interrupt: bool = True,
    warn: bool = True,
) -> FitResult:
    """Fit independent Gaussian mixtures to every dataset of ``X (*B, N, D)`` at once.

    ``X`` may be ``(N,)`` (one univariate series), ``(N, D)`` or ``(*B, N, D)``; a tensor, numpy
    array or nested list. ``sample_weight (*B, N)`` is non-negative; zero weight marks padding, so
    ragged series are one padded tensor. Settings mean what they mean in scikit-learn's
    ``GaussianMixture``; initial parameters may carry the batch dims or not (broadcast).
    ``warm_start`` (parameters in data units) replaces the initialization. Returns a
    :class:`FitResult` whose tensors have the batch shape ``(*B)`` in front.

    ``method``: ``"em"`` (default), ``"squarem"`` (accelerated EM) or ``"gradient"``
    (maximum likelihood by ``optimizer`` ``"lbfgs"`` or ``"adam"`` with step size ``lr``, on the
    same log-density and objective). ``prior``: None, or ``"default"`` for the conjugate prior of
    Fraley & Raftery (2007) (MAP estimation), or a prior specification accepted by
    ``torchgmm.prior.make_prior``. ``compile``: fuse the hot loops with ``torch.compile``
    (True/False; "auto" compiles when the expected work outweighs the one-off compile time).
    ``prune_after``: after that many EM iterations only each series' best restart goes on (a
    cheap restart strategy; None runs every restart to convergence, as scikit-learn).
    ``catch_interrupt``: Ctrl-C stops at an iteration boundary and returns the best-so-far
    result, flagged not converged, with a warning (False: the KeyboardInterrupt propagates).
    """
    validation.check_settings(
        n_components=n_components, covariance_type=covariance_type, tol=tol, reg_covar=reg_covar,
        max_iter=max_iter, n_init=n_init, init_params=init_params, nan_policy=nan_policy,
        init_methods=INIT_METHODS, method=method, optimizer=optimizer, lr=lr, prune_after=prune_after,
    )
    cov = get_covariance(covariance_type)
    x, nan_rows = validation.as_data(X, dtype=dtype, device=device, n_features=n_features, nan_policy=nan_policy, min_samples=2)
    w = validation.as_sample_weight(sample_weight, x)
    if nan_rows is not None:
        w = torch.where(nan_rows, torch.zeros((), dtype=w.dtype, device=w.device), w)
    batch_shape, (n, d), k = x.shape[:-2], x.shape[-2:], n_components
    x, w = x.reshape(-1, n, d), w.reshape(-1, n)
    n_series = x.shape[0]
    factory = dict(dtype=x.dtype, device=x.device)

    n_valid = (w > 0).sum(-1)  # (B,)
    empty = n_valid == 0
    insufficient = (n_valid < k) & ~empty
    if len(batch_shape) == 0 and bool(empty.any()):
        raise ValueError("sample_weight is zero everywhere; at least one point needs a positive weight")
    if len(batch_shape) == 0 and bool(insufficient.any()):
        raise ValueError(
            f"n_components={k} must be <= the number of positive-weight samples, n_samples={int(n_valid[0])}; "
            "reduce n_components or provide more data"
        )
    # Empty series are fitted on a harmless stand-in and reported EMPTY; the rest never notice.
    w = torch.where(empty.unsqueeze(-1), torch.ones((), **factory), w)
    x = torch.where(empty[:, None, None], torch.zeros((), **factory), x)
    w = w * (n_valid.clamp_min(1) / w.sum(-1)).unsqueeze(-1).to(x.dtype)  # weights in units of points

    use_compile = should_compile(compile, float(n_series) * n_init * n * k * d * max(max_iter, 1))
    xs, shift, scale, reg = (compiled(standardize) if use_compile else standardize)(x, w, reg_covar)
    too_big = scale.square() > torch.finfo(x.dtype).max / 16
    if bool(too_big.any()):
        first = tuple(int(i) for i in torch.unravel_index(too_big.nonzero()[0, 0], batch_shape))
        where = f" (first: series {first})" if batch_shape else ""
        raise ValueError(
            f"X has a spread of {float(scale.max()):.3g}{where}, whose variance overflows {x.dtype}; "
            "rescale the data" + (" or pass float64 (e.g. X.double())" if x.dtype != torch.float64 else "")
        )

    def to_standard(params: GMMParams) -> GMMParams:
        return GMMParams(
            params.log_weights,
            (params.means - shift.unsqueeze(-2)) / scale[:, None, None],
            cov.rescale(params.prec_chol, scale.reciprocal()),
        )

    floored = (scale <= math.sqrt(reg_covar)) & ~empty if reg_covar > 0 else torch.zeros_like(empty)
    if warn and bool(floored.any()):
        warnings.warn(
            f"reg_covar={reg_covar:g} is larger than the data variance of {int(floored.sum())} series"
            f"{_first(floored, batch_shape)}: their covariances will be about reg_covar, not the data's. "
            "Rescale the data or lower reg_covar",
            FitWarning,
            stacklevel=2,
        )
    _check_memory(n_series * n_init, k, d, cov, x)

    # -- initialization --------------------------------------------------------------------
    given = {}
    if warm_start is not None:
        start = to_standard(GMMParams(*(t.reshape(n_series, *t.shape[len(batch_shape):]).to(**factory) for t in warm_start)))
        init = start.map(lambda t: t.unsqueeze(1))
    else:
        weights0 = validation.batched_init(weights_init, "weights_init", (k,), batch_shape, **factory)
        means0 = validation.batched_init(means_init, "means_init", (k, d), batch_shape, **factory)
        prec0 = validation.batched_init(precisions_init, "precisions_init", cov.covariance_shape(k, d), batch_shape, **factory)
        validation.check_init_values(weights0, prec0, cov.name)
        if weights0 is not None:
            given["log_weights"] = torch.log(weights0.reshape(n_series, k))
        if means0 is not None:
            given["means"] = (means0.reshape(n_series, k, d) - shift.unsqueeze(-2)) / scale[:, None, None]
        if prec0 is not None:
            prec_chol = cov.prec_chol_from_precision(prec0.reshape(n_series, *prec0.shape[len(batch_shape):]))
            given["prec_chol"] = cov.rescale(prec_chol, scale.reciprocal())
        n_restarts = 1 if len(given) == 3 else n_init
        if len(given) == 3:
            init = GMMParams(**{name: t.unsqueeze(1) for name, t in given.items()})
        else:
            gen = make_generator(random_state)
            init_chunk, block = _blocking(n_series, n_restarts, k, n, d, x.element_size(), memory_budget, chunk_size, x.device)
            init, distinct_ok = _initialize_in_blocks(
                xs, w, k, n_restarts, init_params, cov, reg, gen, max(1, block // n_restarts),
                compile=use_compile, chunk_size=init_chunk,
            )
            short = ~distinct_ok.all(-1) & ~empty
            if warn and bool(short.any()):
                warnings.warn(
                    f"{int(short.sum())} series have fewer distinct points than n_components={k}"
                    f"{_first(short, batch_shape)}: some components start on the same point (n distinct < K); "
                    "reduce n_components or check for repeated values",
                    FitWarning,
                    stacklevel=2,
                )
            init = init._replace(**{name: t.unsqueeze(1).expand_as(getattr(init, name)) for name, t in given.items()})
    n_restarts = init.log_weights.shape[1]

    # -- EM ---------------------------------------------------------------------------------
    # The gradient mode works on all members at once (no blocks): its chunks share the budget.
    chunk_size, block_members = _blocking(
        n_series, n_restarts, k, n, d, x.element_size(), memory_budget, chunk_size, x.device, blocked=method != "gradient"
    )
    prior_s = None
    if prior is not None:
        from .prior import make_prior  # standardized units, per series

        prior_s = make_prior(prior, xs, w, k, cov, shift=shift, scale=scale)
    if method == "gradient":
        from .gradient import run_gradient

        run = run_gradient(
            xs, w, init, cov, reg, tol, max_iter, optimizer=optimizer, lr=lr, prior=prior_s,
            chunk_size=chunk_size, catch_interrupt=catch_interrupt,
        )
    else:
        if method == "squarem":
            from .squarem import run_squarem as runner
        else:
            runner = run_em
        with torch.no_grad():
            extra = {"prune_after": prune_after} if method == "em" else {}
            run = runner(
                xs, w, init, cov, reg, tol, max_iter, prior=prior_s, chunk_size=chunk_size,
                compile=use_compile, catch_interrupt=catch_interrupt,
                block_members=block_members, **extra,
            )

    # -- per member: degenerate? then the best restart per series -----------------------------
    members = run.params.map(lambda t: t.reshape(n_series, n_restarts, *t.shape[1:]))
    lb = run.lower_bound.reshape(n_series, n_restarts)
    failed = run.failed.reshape(n_series, n_restarts)
    min_var = cov.min_variance(cov.covariance_from_prec_chol(members.prec_chol), k)  # (B, R, K)
    floor = torch.clamp_min(DEGENERATE_FACTOR * reg, 100 * torch.finfo(x.dtype).eps)
    degenerate = min_var <= floor[:, None, None]  # (B, R, K)

    finite = torch.isfinite(lb)
    clean = finite & ~degenerate.any(-1) & ~failed

    def best_of(mask):
        return torch.where(mask, lb, -torch.inf).argmax(-1)

    best = torch.where(clean.any(-1), best_of(clean), best_of(finite))  # (B,)
    rows = torch.arange(n_series, device=x.device)

    def pick(t):
        return t.reshape(n_series, n_restarts, *t.shape[1:])[rows, best]

    params = GMMParams(*(pick(t) for t in run.params))
    log_scale = torch.log(scale)
    params = GMMParams(
        params.log_weights,
        shift.unsqueeze(-2) + scale[:, None, None] * params.means,
        cov.rescale(params.prec_chol, scale),
    )
    lower_bound = pick(run.lower_bound) - d * log_scale
    history = pick(run.history) - d * log_scale.unsqueeze(-1)
    passes = pick(run.passes)
    converged, failed_best = pick(run.converged), pick(run.failed)
    degenerate_best = degenerate[rows, best] & ~empty.unsqueeze(-1)

    status = torch.full((n_series,), int(FitStatus.OK), dtype=torch.long, device=x.device)
    for flag, code in (
        (~converged, FitStatus.NOT_CONVERGED),
        (degenerate_best.any(-1), FitStatus.DEGENERATE),
        (failed_best, FitStatus.DIVERGED),
        (insufficient, FitStatus.INSUFFICIENT_DATA),
        (empty, FitStatus.EMPTY),
    ):
        status = torch.where(flag, torch.full_like(status, int(code)), status)
    lower_bound = torch.where(empty, -torch.inf, lower_bound)
    history = torch.where(empty.unsqueeze(-1), torch.nan, history)
    n_iter = torch.where(empty, 0, pick(run.n_iter))
    converged = converged & ~empty & ~failed_best
    restart_lb = lb - d * log_scale.unsqueeze(-1)

    def unflatten(t):
        return t.reshape(tuple(batch_shape) + tuple(t.shape[1:]))

    result = FitResult(
        params=params.map(unflatten),
        covariance_type=cov.name,
        lower_bound=unflatten(lower_bound),
        lower_bounds=unflatten(history),
        passes=unflatten(passes),
        n_iter=unflatten(n_iter),
        converged=unflatten(converged),
        status=unflatten(status),
        degenerate_components=unflatten(degenerate_best),
        n_samples=unflatten(n_valid),
        restart_lower_bounds=unflatten(restart_lb),
        restart_degenerate=unflatten(degenerate.any(-1) & ~empty.unsqueeze(-1)),
        best_restart=unflatten(best),
        elapsed=run.elapsed,
        interrupted=run.interrupted,
        method=method,
    )
    if warn:
        result.warn(stacklevel=3, convergence=max_iter > 0)
    return result
