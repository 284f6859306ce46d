"""``GaussianMixture``: the stateful shell, an ``nn.Module`` with scikit-learn's names.

It holds the fitted parameters as ``nn.Parameter``s in unconstrained form (``weight_logits``,
``loc``, ``prec_chol_raw``: a log-diagonal precision Cholesky factor), which EM writes under
``no_grad`` and gradient-based training optimizes; ``weights_``, ``means_``, ``covariances_``,
``precisions_`` and ``precisions_cholesky_`` are derived from them. Every method goes through the
one log-density in ``density``.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import validation
from .covariance import Covariance, get_covariance
from .density import GMMParams, joint_log_prob, log_prob, log_responsibilities
from .fitting import DEFAULT_MEMORY_BUDGET, fit as fit_mixture
from .init import make_generator
from .progress import Progress
from .result import FitResult, FitStatus
from .validation import NotFittedError

__all__ = ["GaussianMixture", "GaussianAttributes"]

_PARAMETERS = ("weight_logits", "loc", "prec_chol_raw")
# Fitted state saved and restored with the parameters (state_dict, save / load): tensors or None.
_BUFFERS = ("converged_", "n_iter_", "lower_bound_", "lower_bounds_", "status_", "n_components_", "criterion_")

# Seed of the standard start of a module built with ``n_features`` (means drawn from N(0, I)).
_LAYER_SEED = 0

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _in_package(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PACKAGE_DIR)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` with which a ``warnings.warn`` in the function calling this one points at
    the first frame outside the torchgmm package (the user's line, whatever the call path:
    ``fit``, ``fit_predict``, the scikit-learn estimator)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _in_package(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def _reemit(caught: Sequence[warnings.WarningMessage]) -> None:
    """Re-issue recorded warnings: those raised inside torchgmm at the caller's line (outside the
    package), any other (e.g. torch's own) at its original location."""
    level = _caller_stacklevel()
    for w in caught:
        if _in_package(w.filename):
            warnings.warn(w.message, w.category, stacklevel=level)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


class GaussianAttributes:
    """scikit-learn's attributes of Gaussian components, derived from ``self._detached()`` (with
    ``means`` and ``prec_chol``), the location parameter ``self.loc`` (None before a fit) and the
    covariance registry entry of ``self.covariance_type``: shared by the mixture and the hidden
    Markov model."""

    @property
    def is_fitted(self) -> bool:
        return self.loc is not None

    @property
    def _cov(self) -> Covariance:
        return get_covariance(self.covariance_type)

    def _saved_components(self, state_dict, prefix: str, parameters: tuple, buffers: tuple):
        """Before loading ``state_dict``: an unfitted model has no parameter tensors yet, so the
        ``parameters`` and ``buffers`` it holds are created with the saved shapes. Returns the saved
        ``(loc, prec_chol_raw, expected shape of prec_chol_raw for loc)``, or None without them."""
        for name in parameters + buffers:
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                value = torch.empty_like(state_dict[key])
                setattr(self, name, nn.Parameter(value) if name in parameters else value)
        loc, raw = state_dict.get(prefix + "loc"), state_dict.get(prefix + "prec_chol_raw")
        if loc is None or raw is None:
            return None
        return loc, raw, tuple(loc.shape[:-2]) + self._cov.prec_chol_shape(*loc.shape[-2:])

    @property
    def batch_shape(self) -> torch.Size:
        self._check_fitted()
        return self.loc.shape[:-2]

    @property
    def n_features_in_(self) -> int:
        self._check_fitted()
        return self.loc.shape[-1]

    @property
    def status_names_(self) -> Optional[np.ndarray]:
        """``status_`` as :class:`FitStatus` names, a numpy array of str ``(*B,)``; None before a fit."""
        if self.status_ is None:
            return None
        return np.array([s.name for s in FitStatus])[self.status_.cpu().numpy()]

    @property
    def means_(self) -> Tensor:
        return self._detached().means

    @property
    def precisions_cholesky_(self) -> Tensor:
        return self._detached().prec_chol

    @property
    def covariances_(self) -> Tensor:
        return self._cov.covariance_from_prec_chol(self.precisions_cholesky_)

    @property
    def precisions_(self) -> Tensor:
        return self._cov.precision_from_prec_chol(self.precisions_cholesky_)

    def _sampling_generator(self, n: int, name: str, random_state) -> torch.Generator:
        """The generator of ``sample`` (checked: fitted, ``n`` a positive int, a valid seed)."""
        self._check_fitted()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
        random_state = self.random_state if random_state is None else random_state
        validation.check_random_state(random_state)
        return make_generator(random_state)

    def _emit(self, params, labels: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Gaussian draws for component/state ``labels (B, n)`` (flattened batch, on the generator's
        device), the noise from ``gen`` after the labels: ``(X (*B, n, D), labels (*B, n))``."""
        k, d = params.means.shape[-2:]
        batch, n = params.means.shape[:-2], labels.shape[-1]
        noise = torch.randn(labels.shape[0], n, d, generator=gen, device=gen.device, dtype=torch.float64)
        labels = labels.to(params.means.device)
        noise = noise.to(device=params.means.device, dtype=params.means.dtype)
        scale_tril = torch.linalg.cholesky(self._cov.full_covariance(params.prec_chol, k, d)).reshape(-1, k, d, d)
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(-1)
        means = params.means.reshape(-1, k, d)[rows, labels]  # (B, n, D)
        x = means + (scale_tril[rows, labels] @ noise.unsqueeze(-1)).squeeze(-1)
        return x.reshape(*batch, n, d), labels.reshape(*batch, n)


class GaussianMixture(GaussianAttributes, nn.Module):
    """A batch of Gaussian mixture models, fitted by batched EM; an ``nn.Module``.

    Settings and attributes mean what they mean in ``sklearn.mixture.GaussianMixture``, with the
    batch dims ``(*B)`` in front. Data ``X`` is ``(N,)`` (one univariate series), ``(N, D)`` or
    ``(*B, N, D)`` (a batch of independent datasets, each fitted separately). Settings are stored
    as given and checked at ``fit`` (as scikit-learn does).

    Parameters
    ----------
    n_components : int or list of int, default 1
        Number of mixture components ``K``; or a list of candidates (e.g. ``[1, 2, 3, 4, 5]``):
        every candidate of every series is fitted in one batched run and each series keeps the
        one with the lowest ``criterion`` (``n_components_``); the parameters are padded to the
        largest candidate with components of weight exactly 0, which are never predicted.
    covariance_type : {"full", "tied", "diag", "spherical"}, default "full"
        Form of the covariances: one ``(D, D)`` matrix per component, one shared by all
        components, one diagonal per component, one variance per component.
    tol : float, default 1e-3
        Convergence threshold: a series stops when its lower bound (mean log-likelihood per
        point) changes by less than ``tol``.
    reg_covar : float, default 1e-6
        Non-negative number added to the diagonal of every covariance.
    max_iter : int, default 100
        Iterations per restart; 0 returns the initialization.
    n_init : int, default 1
        Restarts per series; the best (non-degenerate) one is kept.
    init_params : {"kmeans", "k-means++", "random", "random_from_data", "hierarchical"} or a list, default "kmeans"
        How restarts are initialized. With ``n_init > 1`` the restarts differ: restart 0 is the
        method's deterministic start, the others cycle through fresh k-means++ / distinct-point
        seeds with short Lloyd runs (see docs/quality.md); a list of methods is cycled over the
        restarts. "hierarchical" is mclust's model-based agglomerative start (slow beyond a few
        thousand points, which it subsamples).
    weights_init, means_init, precisions_init : array-like, optional
        Initial weights ``(K,)``, means ``(K, D)`` and precisions (the covariance type's shape),
        each with or without the batch dims ``(*B)`` in front (broadcast).
    random_state : int, None or torch.Generator, default None
        Seed (an int >= 0) of the initialization and of ``sample``; None draws fresh entropy; a
        Generator is used as is. The same seed gives the same CPU result.
    warm_start : bool, default False
        Start ``fit`` from the current parameters (one start) instead of initializing.
    verbose : int, default 0
        0: silent, but a progress bar (tqdm, the ``progress`` extra) appears on a terminal when a
        fit runs longer than 2 s; 1: print the start, the end and the fit's summary; 2: also a
        line every ``verbose_interval`` iterations (active members, mean lower bound), as
        scikit-learn.
    verbose_interval : int, default 10
        Iterations between the lines of ``verbose=2``.
    device : torch.device or str, optional
        Where to fit; default: where ``X`` is.
    dtype : torch.dtype, optional
        Precision of the fit; default: ``X``'s (float64 stays float64; integers become the
        default dtype; half precision becomes float32).
    nan_policy : {"raise", "omit"}, default "raise"
        At fit: "omit" turns points with a NaN into zero-weight padding.
        Prediction and scoring never accept NaN.
    chunk_size : int, optional
        Points per E-step chunk; default: sized from ``memory_budget``.
    memory_budget : int, default 2**30
        Bytes the E-step's temporaries may use at once.
    method : {"em", "squarem", "gradient"}, default "em"
        EM, accelerated EM (SQUAREM), or maximum likelihood by ``optimizer``.
    optimizer : {"lbfgs", "adam"}, default "lbfgs"
        Optimizer of ``method="gradient"``.
    lr : float, optional
        Step size of ``method="gradient"``; default: the optimizer's own.
    prior : None, "default" or dict, default None
        "default": MAP estimation with the Fraley & Raftery (2007) conjugate prior (mclust's);
        a dict overrides its ``shrinkage``, ``dof``, ``mean``, ``scale``.
    catch_interrupt : bool, default True
        Ctrl-C during a fit returns the best-so-far model, flagged not converged (False: the
        KeyboardInterrupt propagates).
    compile : {"auto", True, False}, default "auto"
        Fuse the hot loops with ``torch.compile`` ("auto": when the work outweighs compiling).
    prune_after : int, optional
        After that many EM iterations only each series' best restart goes on.
    criterion : {"bic", "aic"}, default "bic"
        How a list of ``n_components`` candidates is decided per series (lower is better).
    refine : bool or dict, default False
        After the restarts, try merge/delete-and-split moves per series and keep those that raise
        the lower bound (``torchgmm.refine.refine``; a dict sets its ``n_rounds``, ``n_merge``,
        ``n_delete``, ``n_split``, ``min_gain``). More often the best optimum than more restarts
        in the same time, at about 3x the fit's time.
    process_group : None, "world" or torch.distributed.ProcessGroup, default None
        Data-parallel EM: ``X`` is this rank's shard of the points of the same series; every
        iteration all-reduces the statistics over the group, so every rank gets the fit of the
        union (see ``torchgmm.distributed``). The user initializes the group; every rank calls
        ``fit`` with the same settings.
    n_features : int, optional
        Number of features ``D``, when known before any fit: the parameters are created at
        construction, at a standard start (equal weights, means drawn from N(0, I) with a fixed
        seed, identity precisions), so that the module can be trained as a layer from scratch;
        ``fit`` then requires ``X`` with ``n_features`` features.
    batch_shape : tuple of int, default ()
        Batch shape ``(*B)`` of the parameters created with ``n_features`` (ignored without it);
        a ``fit`` on a batch of another shape replaces them.

    Attributes
    ----------
    weights_ : Tensor (*B, K)
    means_ : Tensor (*B, K, D)
    covariances_, precisions_, precisions_cholesky_ : Tensor
        In scikit-learn's per-type shapes: full ``(*B, K, D, D)``, tied ``(*B, D, D)``, diag
        ``(*B, K, D)``, spherical ``(*B, K)``. Derived from the parameters below.
    converged_ : Tensor (*B,) bool
    n_iter_ : Tensor (*B,) int64
        Iterations run by the chosen restart.
    lower_bound_ : Tensor (*B,)
        Mean log-likelihood per point (scikit-learn's ``lower_bound_``) of the chosen restart.
    lower_bounds_ : Tensor (*B, max_iter)
        Its per-iteration history, NaN-padded.
    n_components_ : Tensor (*B,) int64
        The number of components of each series' model (its chosen K with a list of candidates).
    criterion_ : Tensor (*B, C), or None
        With a list of ``n_components``: the criterion of each candidate's best restart.
    status_ : Tensor (*B,) int64
        The outcome of each series' fit as :class:`torchgmm.FitStatus` codes (0 ``OK``,
        1 ``NOT_CONVERGED``, 2 ``DEGENERATE``, 3 ``DIVERGED``, 4 ``INSUFFICIENT_DATA``,
        5 ``EMPTY``): compare with the enum (``status_ == FitStatus.DEGENERATE``), name one code
        with ``FitStatus(int(code)).name``, or read all names from ``status_names_``.
    status_names_ : numpy.ndarray (*B,) of str
        ``status_`` as names (``"OK"``, ``"DEGENERATE"``, ...); None before a fit.
    n_features_in_ : int
    batch_shape : torch.Size
    result_ : FitResult or None
        The record of the last ``fit`` (restarts, timings, summary); None when the parameters
        were set otherwise (constructed with ``n_features``, loaded, trained).
    weight_logits, loc, prec_chol_raw : nn.Parameter
        The parameters in unconstrained form (softmax logits ``(*B, K)``, means ``(*B, K, D)``,
        the precision Cholesky factor with a log diagonal, in the covariance type's shape).
        ``converged_`` to ``status_`` are buffers; all of them are in ``state_dict``.

    ``save(path)`` writes the model (settings, parameters, fitted state) to one file that
    ``torchgmm.load(path)`` restores.
    """

    def __init__(
        self,
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
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
        device=None,
        dtype: Optional[torch.dtype] = None,
        nan_policy: str = "raise",
        chunk_size: Optional[int] = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        method: str = "em",
        optimizer: str = "lbfgs",
        lr: Optional[float] = None,
        prior=None,
        catch_interrupt: bool = True,
        compile="auto",
        prune_after: Optional[int] = None,
        criterion: str = "bic",
        refine=False,
        process_group=None,
        n_features: Optional[int] = None,
        batch_shape: Sequence[int] = (),
    ):
        """See the class docstring for the settings."""
        settings = {name: value for name, value in locals().items() if name not in ("self", "__class__", "batch_shape")}
        super().__init__()
        # The settings as plain attributes in one update: nn.Module.__setattr__ per setting costs
        # microseconds each (it registers Parameters, Modules and Buffers; tensors and modules
        # still go through it).
        special = {name for name, value in settings.items() if isinstance(value, (Tensor, nn.Module))}
        self.__dict__.update({name: value for name, value in settings.items() if name not in special})
        for name in special:
            setattr(self, name, settings[name])
        self._init_batch_shape = batch_shape  # ``batch_shape`` is the property of the current parameters
        self.result_: Optional[FitResult] = None
        for name in _PARAMETERS:
            self.register_parameter(name, None)
        for name in _BUFFERS:
            self.register_buffer(name, None)
        if n_features is not None:
            self.set_params_(self._standard_start(validation.check_layer_shape(n_components, n_features, batch_shape)))

    def _settings(self) -> dict:
        """The constructor's settings by name, as given (``save`` writes them)."""
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        return {name: self._init_batch_shape if name == "batch_shape" else getattr(self, name) for name in names}

    def _standard_start(self, batch_shape: tuple) -> GMMParams:
        """Equal weights, means drawn from N(0, I) (fixed seed), identity precisions."""
        k, d = self.n_components, self.n_features
        cov = self._cov  # raises for an unknown covariance_type
        factory = dict(dtype=self.dtype or torch.get_default_dtype(), device=self.device)
        gen = torch.Generator().manual_seed(_LAYER_SEED)
        means = torch.randn(batch_shape + (k, d), generator=gen, dtype=torch.float64).to(**factory)
        shape = batch_shape + tuple(cov.prec_chol_shape(k, d))
        if cov.name in ("full", "tied"):
            prec_chol = torch.eye(d, **factory).expand(shape).clone()
        else:
            prec_chol = torch.ones(shape, **factory)
        log_weights = torch.full(batch_shape + (k,), -float(np.log(k)), **factory)
        return GMMParams(log_weights, means, prec_chol)
    # -- state ---------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet; call fit(X) first "
                "(or load_state_dict from a fitted model)"
            )

    def mixture_params(self) -> GMMParams:
        """The parameters as a differentiable :class:`GMMParams` (log-weights, means, prec_chol)."""
        self._check_fitted()
        return GMMParams(
            torch.log_softmax(self.weight_logits, dim=-1),
            self.loc,
            self._cov.from_unconstrained(self.prec_chol_raw),
        )

    def set_params_(self, params: GMMParams) -> "GaussianMixture":
        """Overwrite the parameters from a :class:`GMMParams` (data units), under no_grad.

        A parameter whose shape, dtype and device are unchanged is updated in place: the same
        ``nn.Parameter`` object, so optimizers built before keep working (their state, e.g.
        Adam's moments, is kept as well). One whose shape, dtype or device changes (another batch
        shape, number of features or precision) is replaced by a new ``nn.Parameter``: optimizers
        built before no longer see it and must be rebuilt."""
        with torch.no_grad():
            values = (params.log_weights, params.means, self._cov.to_unconstrained(params.prec_chol))
            for name, value in zip(_PARAMETERS, values):
                current, value = getattr(self, name), value.detach()
                if (
                    current is not None and current.shape == value.shape
                    and current.dtype == value.dtype and current.device == value.device
                ):
                    current.copy_(value)
                else:
                    setattr(self, name, nn.Parameter(value.clone()))
        return self

    def _detached(self) -> GMMParams:
        return self.mixture_params().map(lambda t: t.detach())

    @property
    def weights_(self) -> Tensor:
        return self._detached().log_weights.exp()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        saved = self._saved_components(state_dict, prefix, _PARAMETERS, _BUFFERS)
        if saved is not None:
            loc, raw, expected = saved
            k, d = loc.shape[-2:]
            k_model = max(self.n_components) if isinstance(self.n_components, (list, tuple, range)) else self.n_components
            if k != k_model or tuple(raw.shape) != expected:
                raise ValueError(
                    f"state_dict holds {k} components of dimension {d} with precision factor shape "
                    f"{tuple(raw.shape)}, which does not fit GaussianMixture(n_components={self.n_components}, "
                    f"covariance_type={self.covariance_type!r}) (expected shape {expected})"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, X, y=None, sample_weight=None) -> "GaussianMixture":
        """Fit every dataset in ``X (*B, N, D)``; ``sample_weight (*B, N)`` (0 = padding).

        The fitted parameters are written into the existing ``nn.Parameter`` objects when their
        shape, dtype and device are unchanged (a refit on data of the same shape), so optimizers
        built before keep working; otherwise new parameters replace them and optimizers built
        before must be rebuilt (see :meth:`set_params_`). Warnings about the fit
        (:class:`torchgmm.FitWarning` and its subclasses) point at the caller's line.
        """
        validation.check_random_state(self.random_state)
        warm = self._detached() if (self.warm_start and self.is_fitted) else None
        caught: list = []
        progress = Progress(self.max_iter, self.verbose, self.verbose_interval) if Progress.wanted(self.verbose) else None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = self._fit_result(X, sample_weight, warm, progress)
        finally:
            _reemit(caught)
        self._set_result(result)
        if progress is not None:
            progress.close(result.summary())
        return self

    def _fit_result(self, X, sample_weight, warm: Optional[GMMParams], progress=None) -> FitResult:
        if self.process_group is not None:  # X is this rank's shard: torchgmm.distributed
            from .distributed import shard

            X = shard(X, self.process_group)
        return fit_mixture(
            X,
            self.n_components,
            covariance_type=self.covariance_type,
            tol=self.tol,
            reg_covar=self.reg_covar,
            max_iter=self.max_iter,
            n_init=self.n_init,
            init_params=self.init_params,
            weights_init=self.weights_init,
            means_init=self.means_init,
            precisions_init=self.precisions_init,
            random_state=self.random_state,
            sample_weight=sample_weight,
            nan_policy=self.nan_policy,
            dtype=self.dtype,
            device=self.device,
            warm_start=warm,
            # scikit-learn measures a warm start's first change against the previous lower bound
            warm_start_lower_bound=self.lower_bound_ if warm is not None and self.lower_bound_ is not None else None,
            chunk_size=self.chunk_size,
            memory_budget=self.memory_budget,
            method=self.method,
            optimizer=self.optimizer,
            lr=self.lr,
            prior=self.prior,
            catch_interrupt=self.catch_interrupt,
            compile=self.compile,
            prune_after=self.prune_after,
            criterion=self.criterion,
            refine=self.refine,
            progress=progress,
            n_features=self.n_features,
            warn=True,
        )

    def _set_result(self, result: FitResult) -> None:
        self.result_ = result
        self.set_params_(result.params)
        k = result.params.means.shape[-2]
        fitted = dict(
            converged_=result.converged, n_iter_=result.n_iter, lower_bound_=result.lower_bound,
            lower_bounds_=result.lower_bounds, status_=result.status,
            n_components_=(torch.full_like(result.n_iter, k) if result.n_components is None
                           else result.n_components),  # (*B,) the chosen K of each series
            criterion_=result.criterion,  # (*B, n_candidates) with a list of n_components, else None
        )
        for name, value in fitted.items():  # what assigning a registered (persistent) buffer calls,
            self.register_buffer(name, value)  # without nn.Module.__setattr__'s dispatch (~2 us each)

    def partial_fit(self, X, sample_weight=None) -> "GaussianMixture":
        """Online EM on one chunk ``X (*B, n, D)`` seen once: stepwise EM (Cappe & Moulines 2009)
        with step sizes ``eta_t = (t + t0) ** -alpha`` (defaults ``alpha=0.7``, ``t0=1``; see
        ``torchgmm.stream.OnlineEM``), every series of the batch at once. The first call (and the
        first after ``fit``) fits its chunk as ``fit`` does and starts the running statistics;
        later calls make one update each. ``lower_bound_`` is then the running average of the
        chunks' mean log-likelihood; the state is ``online_`` (not saved by ``save``)."""
        from .stream import partial_fit

        return partial_fit(self, X, sample_weight)

    def fit_predict(self, X, y=None, sample_weight=None) -> Tensor:
        """``fit(X)`` then ``predict(X)``: labels ``(*B, N)``."""
        return self.fit(X, sample_weight=sample_weight).predict(X)

    def summary(self, names=None) -> str:
        """A readable account of the last fit (status counts, flagged series explained);
        ``names``: the series' names (flat batch order) in place of their indices."""
        if self.result_ is None:
            self._check_fitted()
            return (f"GaussianMixture with batch shape {tuple(self.batch_shape)} (parameters set without fit(): "
                    "constructed with n_features, loaded or trained; no fit record)")
        return self.result_.summary(names=names)

    # -- the layer -------------------------------------------------------------------------
    @staticmethod
    def _as_input(X: Tensor) -> Tensor:
        return X.unsqueeze(-1) if X.dim() == 1 else X

    def forward(self, X: Tensor) -> Tensor:
        """Per-sample log-density ``log p(x)``, ``(*B, N)``; differentiable in X and parameters.

        ``X (..., N, D)`` broadcasts against the batch shape (e.g. one ``(N, D)`` against all)."""
        return log_prob(self._as_input(X), self.mixture_params(), self._cov)

    def log_responsibilities(self, X: Tensor) -> Tensor:
        """``log p(k | x)``, ``(*B, N, K)``; differentiable."""
        return log_responsibilities(self._as_input(X), self.mixture_params(), self._cov)

    def component_log_prob(self, X: Tensor) -> Tensor:
        """``log w_k + log N(x | k)``, ``(*B, N, K)``; differentiable."""
        return joint_log_prob(self._as_input(X), self.mixture_params(), self._cov).transpose(-1, -2)

    # -- scikit-learn's methods (validated input, detached output) --------------------------
    def _validated(self, X) -> Tensor:
        self._check_fitted()
        x, _ = validation.as_data(
            X, dtype=self.loc.dtype, device=self.loc.device, n_features=self.n_features_in_, at_predict=True
        )
        validation.check_batch_shape(x, self.batch_shape)
        return x

    def score_samples(self, X) -> Tensor:
        """Per-sample log-likelihood ``(*B, N)``."""
        with torch.no_grad():
            return log_prob(self._validated(X), self._detached(), self._cov)

    def score(self, X, y=None, sample_weight=None) -> Tensor:
        """(Weighted) mean log-likelihood per sample, ``(*B,)``."""
        x = self._validated(X)
        ll = self.score_samples(x)
        w = validation.as_sample_weight(sample_weight, x)
        return (ll * w).sum(-1) / w.sum(-1)

    def predict_proba(self, X) -> Tensor:
        """Responsibilities ``(*B, N, K)``."""
        with torch.no_grad():
            return log_responsibilities(self._validated(X), self._detached(), self._cov).exp()

    def predict(self, X) -> Tensor:
        """Most likely component per sample, ``(*B, N)``."""
        with torch.no_grad():
            return joint_log_prob(self._validated(X), self._detached(), self._cov).argmax(-2)

    def _n_parameters(self):
        """Free parameters: an int, or ``(*B,)`` per series' chosen K after a model selection."""
        k, d = self.loc.shape[-2:]
        chosen = self.n_components_
        if chosen is None or bool((chosen == k).all()):
            return self._cov.n_parameters(k, d)
        counts = torch.tensor([self._cov.n_parameters(max(j, 1), d) for j in range(k + 1)], dtype=self.loc.dtype,
                              device=self.loc.device)
        return counts[chosen]

    def _fit_and_count(self, X, sample_weight) -> tuple[Tensor, Tensor]:
        """``(-2 * total log-likelihood, positive-weight points)`` per dataset, for BIC and AIC."""
        x = self._validated(X)
        n = validation.as_sample_weight(sample_weight, x).gt(0).sum(-1).to(x.dtype)
        return -2 * self.score(x, sample_weight=sample_weight) * n, n

    def bic(self, X, sample_weight=None) -> Tensor:
        """Bayesian information criterion per dataset, ``(*B,)`` (lower is better)."""
        deviance, n = self._fit_and_count(X, sample_weight)
        return deviance + self._n_parameters() * torch.log(n)

    def aic(self, X, sample_weight=None) -> Tensor:
        """Akaike information criterion per dataset, ``(*B,)`` (lower is better)."""
        deviance, _ = self._fit_and_count(X, sample_weight)
        return deviance + 2 * self._n_parameters()

    def sample(self, n_samples: int = 1, random_state=None) -> tuple[Tensor, Tensor]:
        """Draw ``n_samples`` points per dataset: ``(X (*B, n, D), labels (*B, n))``."""
        gen = self._sampling_generator(n_samples, "n_samples", random_state)
        params = self._detached()
        k = params.means.shape[-2]
        weights = params.log_weights.exp().reshape(-1, k).to(device=gen.device, dtype=torch.float64)
        labels = torch.multinomial(weights, n_samples, replacement=True, generator=gen)  # (B, n)
        return self._emit(params, labels, gen)

    def save(self, path) -> None:
        """Write the model to one file (``torch.save`` of plain tensors, dicts and numbers, so
        ``torch.load(path, weights_only=True)`` reads it): settings, parameters and fitted state.
        ``torchgmm.load(path)`` restores it; see :mod:`torchgmm.serialization`."""
        from .serialization import save

        save(self, path)

    def to_distribution(self) -> torch.distributions.MixtureSameFamily:
        """The mixture as ``torch.distributions.MixtureSameFamily`` (batch ``(*B)``, event ``(D,)``)."""
        params = self.mixture_params()
        k, d = params.means.shape[-2:]
        scale_tril = torch.linalg.cholesky(self._cov.full_covariance(params.prec_chol, k, d))
        return torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(logits=params.log_weights),
            torch.distributions.MultivariateNormal(params.means, scale_tril=scale_tril),
        )

    def extra_repr(self) -> str:
        shape = f", batch_shape={tuple(self.loc.shape[:-2])}" if self.is_fitted else ""
        return f"n_components={self.n_components}, covariance_type={self.covariance_type!r}{shape}"
