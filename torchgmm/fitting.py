"""One fit, end to end: the functional entry point under the ``GaussianMixture`` module.

``fit`` is orchestration only; each step lives where it belongs::

    validate X, weights, settings           [validation]   fold NaN rows / padding into zero weights
      -> flatten the batch to (B, N, D)      [prepare]       count positive-weight points per series
      -> plan chunks, blocks, compilation    [plan]
      -> standardize per series              [units]         shift, scale; reg_covar rescaled alike
      -> initialize (B, R, ...) restarts     [init]          or the given / warm-start parameters
      -> advance every member                [loop + the method's step rule: em, squarem, gradient]
      -> choose the best restart per series  [result]        degenerate flags, status, data units
      -> one summarized warning per category
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import validation
from ._compile import compiled
from ._ops import even_slices
from .covariance import Covariance, get_covariance
from .density import GMMParams
from .init import INIT_METHODS, block_series, initialize, make_generator
from .em import UnivariateEMRule
from .loop import Members, run_members
from .methods import EM, as_method, method_settings
from .plan import DEFAULT_MEMORY_BUDGET, Plan, check_memory, intra_op_threads, make_plan, threads, tune_allocator
from .result import FitResult, FitWarning
from .units import Scaling, standardize

__all__ = ["fit", "prepare", "DEFAULT_MEMORY_BUDGET"]


class _Data(NamedTuple):
    """Validated data, the batch flattened: ``x (B, N, D)``, ``w (B, N)`` in units of points."""

    x: Tensor
    w: Tensor
    batch_shape: torch.Size
    n_valid: Tensor  # (B,) positive-weight points
    empty: Tensor  # (B,) no positive weight: fitted on a stand-in, reported EMPTY
    insufficient: Tensor  # (B,) fewer points than components
    unit_weights: bool = False  # every weight is 1: no padding, no empty series


def _first(mask: Tensor, batch_shape) -> str:
    """`` (first: series (i, j))`` for a flat mask over a batch, empty when unbatched."""
    if not batch_shape:
        return ""
    # (the multi-index from the mask in the batch's shape: torch.unravel_index imports torch's
    # symbolic-shapes machinery on first use, 0.25 s)
    return f" (first: series {validation.first_series(mask.reshape(tuple(batch_shape)))})"


def _too_few_points(k: int, n_valid: int) -> ValueError:
    return ValueError(
        f"n_components={k} must be <= the number of positive-weight samples, n_samples={n_valid}; "
        "reduce n_components or provide more data"
    )


def prepare(X, sample_weight, k: int, nan_policy: str = "raise", dtype=None, device=None, n_features=None) -> _Data:
    """Validated data with the batch flattened, in units of points (see :class:`_Data`)."""
    x, nan_rows = validation.as_data(X, dtype=dtype, device=device, n_features=n_features, nan_policy=nan_policy, min_samples=2)
    if sample_weight is None and nan_rows is None:  # every point with weight 1: the counts need no pass
        batch_shape, (n, d) = x.shape[:-2], x.shape[-2:]
        if len(batch_shape) == 0 and n < k:
            raise _too_few_points(k, n)
        x = x.reshape(-1, n, d)
        factory = dict(device=x.device)
        return _Data(x, torch.ones(x.shape[:2], dtype=x.dtype, **factory), batch_shape,
                     torch.full((x.shape[0],), n, **factory), torch.zeros(x.shape[0], dtype=torch.bool, **factory),
                     torch.full((x.shape[0],), n < k, **factory), unit_weights=True)
    w = validation.as_sample_weight(sample_weight, x)
    if nan_rows is not None:
        w = torch.where(nan_rows, torch.zeros((), dtype=w.dtype, device=w.device), w)
    batch_shape, (n, d) = x.shape[:-2], x.shape[-2:]
    x, w = x.reshape(-1, n, d), w.reshape(-1, n)
    n_valid = (w > 0).sum(-1)  # (B,)
    empty = n_valid == 0
    insufficient = (n_valid < k) & ~empty
    if len(batch_shape) == 0 and bool(empty.any()):
        raise ValueError("sample_weight is zero everywhere; at least one point needs a positive weight")
    if len(batch_shape) == 0 and bool(insufficient.any()):
        raise _too_few_points(k, int(n_valid[0]))
    # Empty series are fitted on a harmless stand-in and reported EMPTY; the rest never notice.
    one, zero = torch.ones((), dtype=x.dtype, device=x.device), torch.zeros((), dtype=x.dtype, device=x.device)
    w = torch.where(empty.unsqueeze(-1), one, w)
    x = torch.where(empty[:, None, None], zero, x)
    w = w * (n_valid.clamp_min(1) / w.sum(-1)).unsqueeze(-1).to(x.dtype)  # weights in units of points
    return _Data(x, w, batch_shape, n_valid, empty, insufficient)


def _scale(data: _Data, reg_covar: float, use_compile: bool, warn: bool, stacklevel: int):
    """Standardize; refuse a spread whose variance overflows; warn where reg_covar dominates."""
    x = data.x
    xs, shift, scale, reg = (compiled(standardize) if use_compile else standardize)(x, data.w, reg_covar, data.unit_weights)
    too_big = scale.square() > torch.finfo(x.dtype).max / 16
    if reg_covar <= 0:
        floored = torch.zeros_like(data.empty)
    else:
        floored = scale <= math.sqrt(reg_covar)
        floored = floored if data.unit_weights else floored & ~data.empty
    if not bool((too_big | floored).any()):  # (one synchronization for both checks)
        return xs, Scaling(shift, scale), reg
    if bool(too_big.any()):
        raise ValueError(
            f"X has a spread of {float(scale.max()):.3g}{_first(too_big, data.batch_shape)}, whose variance overflows "
            f"{x.dtype}; rescale the data" + (" or pass float64 (e.g. X.double())" if x.dtype != torch.float64 else "")
        )
    if warn and bool(floored.any()):
        warnings.warn(
            f"reg_covar={reg_covar:g} is larger than the data variance of {int(floored.sum())} series"
            f"{_first(floored, data.batch_shape)}: their covariances will be about reg_covar, not the data's. "
            "Rescale the data or lower reg_covar",
            FitWarning,
            stacklevel=stacklevel + 1,
        )
    return xs, Scaling(shift, scale), reg


def _given_init(data: _Data, k: int, cov: Covariance, scaling: Scaling, weights_init, means_init, precisions_init) -> dict:
    """The user's initial parameters in standardized units, ``(B, ...)`` each, by name."""
    factory = dict(dtype=data.x.dtype, device=data.x.device)
    n_series, d, batch_shape = data.x.shape[0], data.x.shape[-1], data.batch_shape
    weights0 = validation.batched_init(weights_init, "weights_init", (k,), batch_shape, **factory)
    means0 = validation.batched_init(means_init, "means_init", (k, d), batch_shape, **factory)
    prec0 = validation.batched_init(precisions_init, "precisions_init", cov.covariance_shape(k, d), batch_shape, **factory)
    validation.check_init_values(weights0, prec0, cov)
    given = {}
    if weights0 is not None:
        given["log_weights"] = torch.log(weights0.reshape(n_series, k))
    if means0 is not None:
        given["means"] = (means0.reshape(n_series, k, d) - scaling.shift.unsqueeze(-2)) / scaling.scale[:, None, None]
    if prec0 is not None:
        prec_chol = cov.prec_chol_from_precision(prec0.reshape(n_series, *prec0.shape[len(batch_shape):]))
        given["prec_chol"] = cov.rescale(prec_chol, scaling.scale.reciprocal())
    return given


def _initialize(xs, data: _Data, k, n_init, init_params, cov, reg, random_state, given: dict, plan: Plan,
                warn: bool, stacklevel: int) -> GMMParams:
    """``(B, R, ...)`` starting parameters: k-means & co. on blocks of series (every block from the
    same generator state: the draws are shared by all series anyway, so a block gives what one
    call on the whole batch would), with the given parameters in place of the drawn ones."""
    gen = make_generator(random_state)
    block = block_series(plan.init_block_series, xs.shape[0], xs.shape[-2], xs.shape[-1], n_init, init_params)
    blocks = even_slices(xs.shape[0], block)
    if len(blocks) == 1:  # the whole batch at once: no state to rewind, nothing to join
        init, distinct = initialize(xs, data.w, k, n_init, init_params, cov, reg, gen, compile=plan.compile,
                                    chunk_size=plan.init_chunk)
    else:
        state, parts = gen.get_state(), []
        for part in blocks:
            gen.set_state(state)
            parts.append(initialize(xs[part], data.w[part], k, n_init, init_params, cov, reg[part], gen,
                                    compile=plan.compile, chunk_size=plan.init_chunk))
        inits, distincts = zip(*parts)
        init, distinct = GMMParams(*(torch.cat(ts) for ts in zip(*inits))), torch.cat(distincts)
    short = ~distinct.all(-1) if data.unit_weights else ~distinct.all(-1) & ~data.empty
    if warn and bool(short.any()):
        warnings.warn(
            f"{int(short.sum())} series have fewer distinct points than n_components={k}"
            f"{_first(short, data.batch_shape)}: some components start on the same point (n distinct < K); "
            "reduce n_components or check for repeated values",
            FitWarning,
            stacklevel=stacklevel + 1,
        )
    if not given:
        return init
    return init._replace(**{name: t.unsqueeze(1).expand_as(getattr(init, name)) for name, t in given.items()})


# Point-components (members x N x K) up to which univariate EM runs its lean rule
# (``em.UnivariateEMRule``): per-call overhead dominates there, and the temporaries stay in cache.
FUSED_MAX_WORK = 1 << 16


def _lean_univariate(d: int, work: float, method, prior) -> bool:
    """Whether plain EM on univariate data runs the lean rule (``em.UnivariateEMRule``): small
    problems without a prior (its statistics augmentation is the general rule's)."""
    return d == 1 and work <= FUSED_MAX_WORK and type(method) is EM and not method.penalized and prior is None


CRITERIA = ("bic", "aic")


def _candidates(n_components) -> Optional[tuple]:
    """The candidate numbers of components of a model selection (sorted, unique), or None for an
    int ``n_components``."""
    if isinstance(n_components, (int, torch.SymInt)) or not hasattr(n_components, "__iter__"):
        return None
    values = list(n_components)
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise ValueError(f"n_components={n_components!r} must be a positive int or a non-empty list of positive ints")
    return tuple(sorted(set(values)))


def _pad_components(params: GMMParams, k: int, cov: Covariance) -> GMMParams:
    """``params (B, R, ...)`` with components appended up to ``k``, masked: weight exactly 0 (log
    -inf), a copy of the first component's mean and precision factor (finite placeholders)."""
    extra = k - params.means.shape[-2]
    if extra == 0:
        return params

    def repeat_first(t, axis):
        return torch.cat([t, t.narrow(axis, 0, 1).expand(*t.shape[:t.dim() + axis], extra, *t.shape[t.dim() + axis + 1:])], axis)

    log_weights = torch.cat([params.log_weights, params.log_weights.new_full((*params.log_weights.shape[:-1], extra), -torch.inf)], -1)
    prec_chol = params.prec_chol if cov.component_axis is None else repeat_first(params.prec_chol, cov.component_axis)
    return GMMParams(log_weights, repeat_first(params.means, -2), prec_chol)


def _criterion(name: str, mean_log_lik: Tensor, n_points: Tensor, n_parameters: Tensor) -> Tensor:
    """BIC or AIC from mean log-likelihoods per point, the points and the free parameters."""
    deviance = -2 * mean_log_lik * n_points
    return deviance + n_parameters * (torch.log(n_points) if name == "bic" else 2.0)


def _candidate_criteria(run, xs, data: _Data, candidates, n_restarts, cov, scaling: Scaling, criterion: str,
                        plan: Plan) -> Tensor:
    """The criterion of every member's final parameters, ``(B, C, R)`` (+inf where a candidate has
    more components than the series has points, or where the member failed)."""
    from .em import log_likelihood

    n_series, d = xs.shape[0], xs.shape[-1]
    params = run.params.map(lambda t: t.reshape(n_series, n_restarts, *t.shape[1:]))
    with torch.no_grad():
        ll = log_likelihood(xs.unsqueeze(1), data.w.unsqueeze(1), data.w.sum(-1, keepdim=True), params, cov,
                            plan.chunk_size)  # (B, C*R), standardized units
    ll = scaling.log_lik_to_data(ll, d).reshape(n_series, len(candidates), -1)
    ks = torch.tensor(candidates, device=xs.device)
    n_params = torch.tensor([cov.n_parameters(c, d) for c in candidates], dtype=xs.dtype, device=xs.device)
    n_points = data.n_valid.to(xs.dtype)[:, None, None]
    crit = _criterion(criterion, ll, n_points, n_params[:, None])
    usable = (ks[:, None] <= data.n_valid[:, None, None]) & ~run.failed.reshape(ll.shape) & torch.isfinite(crit)
    return torch.where(usable, crit, torch.inf)


def fit(
    X,
    n_components=1,
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
    """Fit independent Gaussian mixtures to every dataset of ``X (*B, N, D)`` at once.

    ``X`` may be ``(N,)`` (one univariate series), ``(N, D)`` or ``(*B, N, D)``; a tensor, numpy
    array or nested list. ``sample_weight (*B, N)`` is non-negative; zero weight marks padding, so
    ragged series are one padded tensor. Settings mean what they mean in scikit-learn's
    ``GaussianMixture``; initial parameters may carry the batch dims or not (broadcast).
    ``warm_start`` (parameters in data units) replaces the initialization, and
    ``warm_start_lower_bound (*B,)`` (its lower bound, data units) is what the first iteration's
    change is measured against, as in scikit-learn. Returns a :class:`FitResult` whose tensors
    have the batch shape ``(*B)`` in front. ``n_features``: the number of features X must have
    (a model built for a known D checks it).

    ``method``: ``"em"`` (default), ``"squarem"`` (accelerated EM), ``"gradient"`` (maximum
    likelihood by ``optimizer`` ``"lbfgs"`` or ``"adam"`` with step size ``lr``, on the same
    log-density and objective), or a method object (``torchgmm.EM(prune_after=5)``,
    ``torchgmm.Gradient("adam", lr=0.01)``, ``torchgmm.SQUAREM()``). ``prior``: None, or
    ``"default"`` for the conjugate prior of Fraley & Raftery (2007) (MAP estimation), or a prior
    specification accepted by ``torchgmm.prior.make_prior``. ``compile``: fuse the hot loops with
    ``torch.compile`` (True/False; "auto" compiles when the expected work outweighs the one-off
    compile time). ``prune_after``: after that many EM iterations only each series' best restart
    goes on (None runs every restart to convergence, as scikit-learn). ``catch_interrupt``: Ctrl-C
    stops at an iteration boundary and returns the best-so-far result, flagged not converged, with
    a warning (False: the KeyboardInterrupt propagates). ``progress(iteration, n_active,
    mean_objective)`` is called after every iteration. ``refine``: after the restarts, try
    merge/delete-and-split moves per series and keep those that raise the lower bound
    (:func:`torchgmm.refine.refine`; True, or a dict of its options ``n_rounds``, ``n_merge``,
    ``n_delete``, ``n_split``, ``min_gain``): reaches the best optimum in more cases than more
    restarts in the same time, at ~3x the fit's time (docs/quality.md).
    """
    from . import stream as _stream  # X a re-iterable of chunks (or a shard of distributed data): torchgmm.stream
    if _stream.is_stream(X):
        return _stream.fit_stream(**{name: value for name, value in locals().items() if name != "_stream"})
    refine_options = validation.check_refine(refine)
    candidates = _candidates(n_components)
    if candidates is not None and refine_options is not None:
        raise ValueError("refine cannot be combined with a list of n_components (model selection): "
                         "fit the chosen K again with refine=True")
    if candidates is not None:
        n_components = max(candidates)
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r} is not supported; choose one of {list(CRITERIA)}")
        given = [name for name, v in (("weights_init", weights_init), ("means_init", means_init),
                                      ("precisions_init", precisions_init), ("warm_start", warm_start)) if v is not None]
        if given or not (method == "em" or isinstance(method, EM)):
            raise ValueError(
                f"a list of n_components (model selection) is fitted by EM from its own initializations; "
                f"{(given or ['method=' + repr(method)])[0]} cannot be combined with it: fit each K separately"
            )
    validation.check_settings(
        n_components=n_components, covariance_type=covariance_type, tol=tol, reg_covar=reg_covar,
        max_iter=max_iter, n_init=n_init, init_params=init_params, nan_policy=nan_policy, init_methods=INIT_METHODS,
        **method_settings(method, optimizer=optimizer, lr=lr, prune_after=prune_after),
    )
    method = as_method(method, optimizer=optimizer, lr=lr, prune_after=prune_after)
    cov, k = get_covariance(covariance_type), n_components
    n_restarts = 1 if warm_start is not None or (weights_init is not None and means_init is not None and precisions_init is not None) else n_init
    # The threads are chosen before the validation's passes over the data, which would otherwise
    # run on torch's setting (on a busy machine: two threads waiting for one core, 0.1 s on W2).
    X = validation.to_tensor(X, "X")
    target = torch.device(device) if device is not None else X.device  # where the fit runs
    tune_allocator(target)
    n_threads = intra_op_threads(float(X.numel()) * n_restarts * k, target)
    with threads(n_threads):
        data = prepare(X, sample_weight, min(candidates) if candidates else k, nan_policy, dtype, device, n_features)
    (n_series, n, d), itemsize, dev = data.x.shape, data.x.element_size(), data.x.device
    guard = validation.features_look_like_series(tuple(data.batch_shape) + (n, d), k)
    if warn and guard is not None:
        warnings.warn(guard, FitWarning, stacklevel=2)
    plan = make_plan(n_series, n_init, k, n, d, max_iter, itemsize, dev, compile=compile, chunk_size=chunk_size,
                     memory_budget=memory_budget, blocked=method.blocked, n_restarts=n_restarts)
    # EM and SQUAREM need no autograd: inference mode dispatches each operation faster (a 50-point
    # fit 4.5 -> 3.5 ms); the result leaves it as normal tensors (_outside_inference_mode).
    inference = method.name != "gradient"
    with threads(n_threads), \
            (torch.inference_mode() if inference else contextlib.nullcontext()):
        xs, scaling, reg = _scale(data, reg_covar, plan.compile, warn, stacklevel=2)
        check_memory(n_series * n_init, k, d, cov, itemsize, dev)

        if warm_start is not None:
            start = GMMParams(*(t.reshape(n_series, *t.shape[len(data.batch_shape):]).to(data.x) for t in warm_start))
            init = scaling.to_standard(start, cov).map(lambda t: t.unsqueeze(1))
        else:
            given = _given_init(data, k, cov, scaling, weights_init, means_init, precisions_init)
            if len(given) == 3:
                init = GMMParams(**{name: t.unsqueeze(1) for name, t in given.items()})
            elif candidates is not None:  # (B, C * R, ...): every candidate's restarts, padded to K
                starts = [_pad_components(_initialize(xs, data, c, n_init, init_params, cov, reg, random_state, {}, plan,
                                                      warn, stacklevel=2), k, cov) for c in candidates]
                init = GMMParams(*(torch.cat(ts, 1) for ts in zip(*starts)))
            else:
                init = _initialize(xs, data, k, n_init, init_params, cov, reg, random_state, given, plan, warn, stacklevel=2)
        reference = None
        if warm_start_lower_bound is not None:
            previous = warm_start_lower_bound.to(data.x).reshape(n_series)
            reference = scaling.log_lik_to_standard(previous, d).repeat_interleave(init.means.shape[1])

        prior_s = None
        if prior is not None:
            from .prior import make_prior  # standardized units, per series

            prior_s = make_prior(prior, xs, data.w, k, cov, shift=scaling.shift, scale=scaling.scale)
        members = Members(xs, data.w, reg, prior_s, init.means.shape[1])

        def general():
            return method.rule(cov, tol, chunk_size=plan.chunk_size, compile=plan.compile, block_members=plan.block_members)

        lean = _lean_univariate(d, n_series * init.means.shape[1] * n * k, method, prior_s)
        rule = UnivariateEMRule(cov) if lean else general()
        with torch.no_grad():
            run = run_members(members, init, rule, tol, max_iter, reference=reference, catch_interrupt=catch_interrupt,
                              progress=progress, **method.loop_options())
            if lean and rule.tripped():  # a guard fired: the general rule, which handles it, from the same start
                run = run_members(members, init, general(), tol, max_iter, reference=reference,
                                  catch_interrupt=catch_interrupt, progress=progress, **method.loop_options())
        n_restarts = init.means.shape[1]
        crit = None if candidates is None else _candidate_criteria(run, xs, data, candidates, n_restarts, cov, scaling,
                                                                   criterion, plan)  # (B, C, R)
        result = FitResult.from_members(
            run, n_restarts=n_restarts, cov=cov, scaling=scaling, reg=reg, n_valid=data.n_valid, empty=data.empty,
            insufficient=data.insufficient, batch_shape=data.batch_shape, method=method.name,
            score=None if crit is None else -crit.flatten(1),  # model selection: the lowest criterion wins
        )
        if refine_options is not None and k > 1:
            from .refine import refine as refine_fits  # the refits are plain fits of the moved starts

            result = refine_fits(X, result, tol=tol, reg_covar=reg_covar, max_iter=max_iter, sample_weight=sample_weight,
                                 nan_policy=nan_policy, dtype=dtype, device=device, method=method, prior=prior,
                                 compile=compile, chunk_size=chunk_size, memory_budget=memory_budget,
                                 catch_interrupt=catch_interrupt, **refine_options)
        if candidates is not None:
            result.criterion = crit.amin(-1).reshape(*data.batch_shape, len(candidates))  # each candidate's best
            k_best = torch.tensor(candidates, device=dev)[result.best_restart.reshape(-1) // n_init]
            result.n_components = k_best.reshape(data.batch_shape)
        if warn:
            result.warn(stacklevel=3, convergence=max_iter > 0)
        return _outside_inference_mode(result) if inference else result


def _outside_inference_mode(result: FitResult) -> FitResult:
    """``result`` with its tensors cloned outside inference mode: tensors made inside it refuse
    in-place updates and autograd afterwards, which users of a result (and the layer) may do."""

    def normal(value):
        if isinstance(value, Tensor):
            return value.clone()
        return value.map(lambda t: t.clone()) if isinstance(value, GMMParams) else value

    with torch.inference_mode(False):
        return FitResult(**{name: normal(value) for name, value in vars(result).items()})
