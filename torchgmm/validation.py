"""Input checking and every user-facing error message.

Each error names the argument, shows the offending shape or value, and says what to do. The
numerical core never raises for data problems; it flags them per series (see ``result``).
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .covariance import COVARIANCE_TYPES, get_covariance

__all__ = [
    "check_settings",
    "as_data",
    "as_sample_weight",
    "batched_init",
    "check_random_state",
    "check_batch_shape",
    "check_layer_shape",
    "NotFittedError",
]

NAN_POLICIES = ("raise", "omit")
_OMIT = ("omit",)
METHODS = ("em", "squarem", "gradient")
OPTIMIZERS = ("lbfgs", "adam")


class NotFittedError(ValueError, AttributeError):
    """Raised when a method that needs fitted parameters is called before ``fit``."""


def _check_number(name, value, *, low, integer=False, low_inclusive=True):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an int" if integer else "a real number"
        raise TypeError(f"{name} must be {what}, got {value!r} of type {type(value).__name__}")
    if not (value >= low if low_inclusive else value > low) or value != value:
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"{name} must be {bound}, got {name}={value!r}")


def check_settings(
    *,
    n_components,
    covariance_type,
    tol,
    reg_covar,
    max_iter,
    n_init,
    init_params,
    nan_policy="raise",
    init_methods: Sequence[str] = (),
    method="em",
    optimizer="lbfgs",
    lr=None,
    prune_after=None,
) -> None:
    """Validate estimator settings (at fit time, as scikit-learn does)."""
    _check_number("n_components", n_components, low=1, integer=True)
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type={covariance_type!r} is not supported; choose one of {sorted(COVARIANCE_TYPES)}")
    _check_number("tol", tol, low=0.0)
    _check_number("reg_covar", reg_covar, low=0.0)
    _check_number("max_iter", max_iter, low=0, integer=True)
    _check_number("n_init", n_init, low=1, integer=True)
    names = list(init_params) if isinstance(init_params, (list, tuple)) else [init_params]  # a list: cycled over restarts
    if not names or any(not isinstance(name, str) or name not in init_methods for name in names):
        raise ValueError(
            f"init_params={init_params!r} is not supported; choose one of {list(init_methods)} "
            "(or a list of them, cycled over the restarts)"
        )
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; choose one of {list(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; choose one of {list(OPTIMIZERS)}")
    if lr is not None:
        _check_number("lr", lr, low=0.0, low_inclusive=False)
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy={nan_policy!r} is not supported; choose one of {list(NAN_POLICIES)}")
    if prune_after is not None:
        _check_number("prune_after", prune_after, low=1, integer=True)
        if method != "em":
            raise ValueError(
                f"prune_after={prune_after!r} applies to method='em' only (got method={method!r}); "
                "set prune_after=None or use method='em'"
            )


REFINE_OPTIONS = ("n_rounds", "n_merge", "n_delete", "n_split", "min_gain")


def check_refine(refine) -> Optional[dict]:
    """``refine`` (False, True, or a dict of ``torchgmm.refine.refine``'s options) as the dict of
    options to use, or None when off."""
    if refine is None or refine is False:
        return None
    if refine is True:
        return {}
    if not isinstance(refine, dict):
        raise TypeError(f"refine must be True, False or a dict of options {list(REFINE_OPTIONS)}, got {type(refine).__name__}")
    unknown = sorted(set(refine) - set(REFINE_OPTIONS))
    if unknown:
        raise ValueError(f"refine={refine!r}: unknown option(s) {unknown}; choose among {list(REFINE_OPTIONS)}")
    for name in ("n_rounds", "n_merge", "n_delete", "n_split"):
        if name in refine:
            _check_number(f"refine[{name!r}]", refine[name], low=0, integer=True)
    if refine.get("min_gain") is not None:
        _check_number("refine['min_gain']", refine["min_gain"], low=0.0)
    return dict(refine)


def to_tensor(value, name: str) -> Tensor:
    """``value`` as a tensor: itself if it is one, else a numpy copy (refusing strings, ragged
    lists, object and non-numeric arrays with the reason)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be numeric array-like, got a {type(value).__name__}")
    try:
        array = np.array(value)  # a copy: read-only and memory-mapped inputs are fine
    except ValueError as err:  # ragged nested lists
        raise TypeError(
            f"{name} could not be converted to an array ({err}); ragged series must be padded "
            "to one length and the padding given zero sample_weight"
        ) from None
    if array.dtype == object:
        raise TypeError(
            f"{name} has dtype object (ragged nested lists or mixed types?); pass a numeric array. "
            "Ragged series: pad them to one length and give the padding zero sample_weight"
        )
    if array.dtype.kind not in "biuf" or array.dtype.kind == "b":
        raise TypeError(f"{name} must be real numeric, got dtype {array.dtype}")
    return torch.from_numpy(array)


def _float_dtype(t: Tensor, name: str, dtype: Optional[torch.dtype]) -> torch.dtype:
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be real numeric, got dtype {t.dtype}; convert it first (e.g. {name}.float())")
    if dtype is not None:
        return dtype
    if t.dtype in (torch.float32, torch.float64):
        return t.dtype
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32  # Cholesky and the accumulations need float32 at least
    return torch.get_default_dtype()  # integers


def first_series(mask: Tensor) -> tuple:
    """The index of the first True entry of ``mask (*B)``, as a tuple (row-major order)."""
    return tuple(mask.nonzero()[0].tolist())


def _non_finite_message(name: str, bad_point: Tensor, kind: str, nan_policy: str, at_predict: bool = False) -> str:
    """"X contains NaN in 3 of 10 series (first: (7,)); ..." for ``bad_point (*B, N)``.

    ``at_predict``: the data are to be scored or predicted, where no policy applies (a NaN point
    has no log-likelihood and no label), so the hint is to remove or impute them."""
    if bad_point.dim() > 1:
        bad_series = bad_point.any(-1)
        where = f" in {int(bad_series.sum())} of {bad_series.numel()} series (first: {first_series(bad_series)})"
    else:
        first = int(bad_point.nonzero()[0, 0])
        where = f" at {int(bad_point.sum())} of {bad_point.numel()} samples (first: row {first})"
    if at_predict:
        hint = (f"points with {kind} cannot be scored or predicted (nan_policy applies to fit only): "
                "remove or impute them first")
        return f"{name} contains {kind}{where}; {hint}"
    hint = "remove or impute them"
    if nan_policy not in _OMIT and "NaN" in kind:
        hint += ", or pass nan_policy='omit' to treat NaN points as zero-weight padding"
    return f"{name} contains {kind}{where}; {hint}"


def as_data(
    X,
    *,
    name: str = "X",
    dtype: Optional[torch.dtype] = None,
    device=None,
    n_features: Optional[int] = None,
    nan_policy: str = "raise",
    min_samples: int = 1,
    at_predict: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """``X`` as a floating tensor ``(*B, N, D)`` (a 1-D ``(N,)`` is one univariate series).

    Returns ``(X, nan_rows)`` where ``nan_rows (*B, N)`` marks points with a NaN when
    ``nan_policy`` is ``"omit"`` (those points are then zeroed: give them
    zero weight), else None. Infinite values are an error under every policy. ``at_predict``:
    ``X`` is to be scored or predicted (``nan_policy`` must then be ``"raise"``); a non-finite
    value is an error whose hint says to remove or impute those points (not to pass a policy).
    """
    t = to_tensor(X, name)
    if device is not None:
        t = t.to(device)
    t = t.detach().to(_float_dtype(t, name, dtype))
    if t.dim() == 0:
        raise ValueError(f"{name} must have shape (N,), (N, D) or (*B, N, D); got a scalar")
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    n, d = t.shape[-2], t.shape[-1]
    if d == 0:
        raise ValueError(f"{name} has 0 feature(s) (shape={tuple(t.shape)}); a minimum of 1 is required")
    if n < min_samples or n == 0:
        raise ValueError(
            f"{name} has {n} sample(s) (shape={tuple(t.shape)}; n_samples={n}) while a minimum of "
            f"{max(min_samples, 1)} is required"
        )
    if n_features is not None and d != n_features:
        raise ValueError(
            f"{name} has {d} features, but the model is expecting {n_features} features "
            f"(shape={tuple(t.shape)}; the last dim is the feature dim)"
        )
    nan_rows = None
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        nan_point = torch.isnan(t).any(-1)  # (*B, N)
        inf_point = torch.isinf(t).any(-1)
        if nan_policy in _OMIT:
            nan_rows = nan_point
            bad_point, kinds = inf_point & ~nan_point, ["inf"]  # inf stays an error
        else:
            bad_point, kinds = nan_point | inf_point, [k for k, m in (("NaN", nan_point), ("inf", inf_point)) if bool(m.any())]
        if bool(bad_point.any()):
            raise ValueError(_non_finite_message(name, bad_point, " and ".join(kinds), nan_policy, at_predict))
        if nan_rows is not None:
            t = torch.where(nan_rows.unsqueeze(-1), torch.zeros((), dtype=t.dtype, device=t.device), t)
    return t, nan_rows


def as_sample_weight(sample_weight, x: Tensor, name: str = "sample_weight") -> Tensor:
    """Non-negative finite weights ``(*B, N)`` for ``x (*B, N, D)``; ones when None."""
    shape = x.shape[:-1]
    if sample_weight is None:
        return torch.ones(shape, dtype=x.dtype, device=x.device)
    w = to_tensor(sample_weight, name)
    if isinstance(sample_weight, Tensor) and w.device != x.device:
        raise ValueError(f"{name} is on {w.device} but X is on {x.device}; move one of them (e.g. {name}.to(X.device))")
    if w.dtype == torch.bool:
        raise TypeError(
            f"{name} must be real numeric (non-negative weights), got dtype {w.dtype}; for a "
            f"validity mask pass {name}.to(X.dtype) (True = weight 1, False = padding)"
        )
    if w.is_complex():
        raise TypeError(f"{name} must be real numeric (non-negative weights), got dtype {w.dtype}")
    w = w.detach().to(device=x.device, dtype=x.dtype)
    if w.shape != shape:
        try:
            w = torch.broadcast_to(w, shape)
        except RuntimeError:
            raise ValueError(
                f"{name} has shape {tuple(w.shape)} but X has shape {tuple(x.shape)}; "
                f"{name} must have shape {tuple(shape)} (one weight per point, batch dims in front)"
            ) from None
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or inf; weights must be finite and non-negative")
    if bool((w < 0).any()):
        raise ValueError(f"{name} contains negative values (min {float(w.min()):.3g}); weights must be non-negative")
    return w


_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range for non-negative seeds


def check_random_state(random_state, name: str = "random_state") -> None:
    """``random_state`` must be None (fresh entropy), an int in ``[0, 2**64 - 1]`` (a seed; numpy
    integers count) or a ``torch.Generator`` (used as is)."""
    if random_state is None or isinstance(random_state, torch.Generator):
        return
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise TypeError(
            f"{name} must be None, an int seed >= 0 or a torch.Generator, got {random_state!r} of type "
            f"{type(random_state).__name__}"
            + ("; convert a numeric string with int(...)" if isinstance(random_state, str) else "")
        )
    if not 0 <= int(random_state) <= _MAX_SEED:
        raise ValueError(
            f"{name} must be an int seed in [0, 2**64 - 1] (or None, or a torch.Generator), got {name}={int(random_state)}"
        )


def check_batch_shape(x: Tensor, batch_shape: Sequence[int], name: str = "X") -> None:
    """``x (*b, N, D)``'s batch shape ``b`` must equal the fitted ``batch_shape`` or broadcast with
    it (e.g. one ``(N, D)`` dataset scored against every mixture of the batch)."""
    b, batch = tuple(x.shape[:-2]), tuple(batch_shape)
    if b == batch:
        return
    for i, j in zip(reversed(b), reversed(batch)):
        if i != j and i != 1 and j != 1:
            per_mixture = "(" + ", ".join([*map(str, batch), "N", "D"]) + ")"
            raise ValueError(
                f"{name} has batch shape {b} (shape {tuple(x.shape)}), which does not broadcast against the "
                f"model's batch shape {batch}; pass {name} of shape {per_mixture} (one dataset per mixture) "
                "or (N, D) (one dataset scored by every mixture), or a shape that broadcasts to it"
            )


def check_layer_shape(n_components, n_features, batch_shape) -> tuple:
    """Validate the shape settings of a module whose parameters are created at construction:
    ``n_components`` and ``n_features`` ints >= 1, ``batch_shape`` a sequence of ints >= 0.
    Returns ``batch_shape`` as a tuple of ints."""
    _check_number("n_components", n_components, low=1, integer=True)
    _check_number("n_features", n_features, low=1, integer=True)
    if isinstance(batch_shape, (str, bytes)) or not isinstance(batch_shape, (Sequence, torch.Size)):
        raise TypeError(
            f"batch_shape must be a tuple of ints (e.g. () or (10,)), got {batch_shape!r} of type "
            f"{type(batch_shape).__name__}"
        )
    for size in batch_shape:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
            raise ValueError(f"batch_shape must hold ints >= 0, got batch_shape={tuple(batch_shape)!r}")
    return tuple(int(size) for size in batch_shape)


def batched_init(
    value, name: str, event_shape: tuple, batch_shape: torch.Size, dtype: torch.dtype, device
) -> Optional[Tensor]:
    """A user-given initial parameter with event shape ``event_shape`` (e.g. ``(K, D)``), with or
    without the batch dims, broadcast to ``batch_shape + event_shape``."""
    if value is None:
        return None
    t = to_tensor(value, name)
    if isinstance(value, Tensor) and t.device != torch.device(device):
        raise ValueError(
            f"{name} is on {t.device} but X is on {torch.device(device)}; move it (e.g. {name}.to(X.device)) "
            "or pass it as a numpy array"
        )
    t = t.detach().to(device=device, dtype=dtype)
    n_event = len(event_shape)
    if tuple(t.shape[t.dim() - n_event:]) != tuple(event_shape) or t.dim() < n_event:
        batched = f" or {tuple(batch_shape) + tuple(event_shape)} (batch dims in front)" if len(batch_shape) else ""
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(event_shape)}{batched}")
    try:
        return torch.broadcast_to(t, tuple(batch_shape) + tuple(event_shape))
    except RuntimeError:
        raise ValueError(
            f"{name} has batch shape {tuple(t.shape[:-n_event])}, which does not broadcast to the "
            f"data's batch shape {tuple(batch_shape)}"
        ) from None


def check_init_values(weights: Optional[Tensor], precisions: Optional[Tensor], covariance_type) -> None:
    """``weights_init`` must be a probability vector and ``precisions_init`` valid for the
    covariance type (the registry's ``valid_precision``: SPD for full/tied, positive otherwise)."""
    if weights is not None:
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError("weights_init must be finite and non-negative")
        total = weights.sum(-1)
        if not bool(torch.allclose(total, torch.ones_like(total), atol=1e-6 if weights.dtype == torch.float64 else 1e-4)):
            raise ValueError(f"weights_init must sum to 1 over the components, got sums in [{float(total.min()):.6g}, {float(total.max()):.6g}]")
    if precisions is not None:
        cov = get_covariance(covariance_type)
        if not cov.valid_precision(precisions):
            raise ValueError(f"precisions_init must be {cov.precision_constraint} for covariance_type={cov.name!r}")


#: Fewer features than this are never taken for the points of series passed as features.
SERIES_LIKE_MIN_FEATURES = 8


def features_look_like_series(shape: tuple, n_components: int) -> Optional[str]:
    """A short message when a 2-D ``X (N, D)`` has more features than a full covariance can be
    estimated from (``D > N``, or ``D(D+1)/2 >= N/K`` numbers per component from its share of the
    points): most often a matrix of univariate series passed without the feature dim. None when
    the shape is plausible."""
    if len(shape) != 2 or shape[1] < SERIES_LIKE_MIN_FEATURES:  # a few features are features
        return None
    n, d = shape
    per_component = COVARIANCE_TYPES["full"].n_cov_parameters(1, d)
    if d <= n and per_component < n / n_components:
        return None
    return (
        f"X has shape {tuple(shape)}: one dataset of {n} points in {d} dimensions; a full covariance needs "
        f"{per_component} numbers per component from about {n // n_components} points. If its rows are {n} "
        f"univariate series of {d} points, fit X[..., None] (shape {(n, d, 1)})"
    )
