"""``GaussianMixture``: the stateful shell, an ``nn.Module`` with scikit-learn's names.

It holds the fitted parameters as ``nn.Parameter``s in unconstrained form (``weight_logits``,
``loc``, ``prec_chol_raw``: a log-diagonal precision Cholesky factor), which EM writes under
``no_grad`` and gradient-based training optimizes; ``weights_``, ``means_``, ``covariances_``,
``precisions_`` and ``precisions_cholesky_`` are derived from them. Every method goes through the
one log-density in ``density``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import validation
from .covariance import get_covariance
from .density import GMMParams, joint_log_prob, log_prob, log_responsibilities
from .fit import DEFAULT_MEMORY_BUDGET, fit as fit_mixture
from .init import make_generator
from .result import FitResult
from .validation import NotFittedError

__all__ = ["GaussianMixture"]

_PARAMETERS = ("weight_logits", "loc", "prec_chol_raw")
_BUFFERS = ("converged_", "n_iter_", "lower_bound_", "lower_bounds_", "status_")


class GaussianMixture(nn.Module):
    """A batch of Gaussian mixture models, fitted by batched EM.

    Parameters mean what they mean in ``sklearn.mixture.GaussianMixture``. Data ``X`` is ``(N,)``,
    ``(N, D)`` or ``(*B, N, D)`` (a batch of independent datasets, each fitted separately), and
    every fitted attribute carries the batch shape ``(*B)`` in front: ``weights_ (*B, K)``,
    ``means_ (*B, K, D)``, ``covariances_`` / ``precisions_`` / ``precisions_cholesky_`` in
    scikit-learn's per-type shapes, ``converged_``, ``n_iter_``, ``lower_bound_``, ``status_``
    ``(*B,)``, and ``lower_bounds_ (*B, max_iter)`` (NaN-padded history of the chosen restart).

    Extra settings: ``device`` / ``dtype`` (where and in which precision to fit; default: X's),
    ``nan_policy`` ("raise", or "omit": NaN points become zero-weight padding), ``chunk_size`` /
    ``memory_budget`` (points per E-step chunk; by default sized from the budget in bytes).
    ``random_state`` is an int or a ``torch.Generator``; the same seed gives the same CPU result.
    ``method`` is ``"em"``, ``"squarem"`` (accelerated EM) or ``"gradient"`` (``optimizer``
    ``"lbfgs"`` or ``"adam"``, step size ``lr``); ``prior="default"`` turns on MAP estimation
    with the Fraley & Raftery (2007) conjugate prior. ``compile`` ("auto", True, False) fuses the
    hot loops with ``torch.compile``; ``prune_after=n`` lets only each series' best restart go on
    after n EM iterations (a cheap restart strategy); ``catch_interrupt`` turns Ctrl-C during a fit into a
    best-so-far model flagged not converged (False: re-raise).
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
    ):
        super().__init__()
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.device = device
        self.dtype = dtype
        self.nan_policy = nan_policy
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.method = method
        self.optimizer = optimizer
        self.lr = lr
        self.prior = prior
        self.catch_interrupt = catch_interrupt
        self.compile = compile
        self.prune_after = prune_after
        self.result_: Optional[FitResult] = None
        for name in _PARAMETERS:
            self.register_parameter(name, None)
        for name in _BUFFERS:
            self.register_buffer(name, None)

    # -- state ---------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.loc is not None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet; call fit(X) first "
                "(or load_state_dict from a fitted model)"
            )

    @property
    def _cov(self):
        return get_covariance(self.covariance_type)

    def mixture_params(self) -> GMMParams:
        """The parameters as a differentiable :class:`GMMParams` (log-weights, means, prec_chol)."""
        self._check_fitted()
        return GMMParams(
            torch.log_softmax(self.weight_logits, dim=-1),
            self.loc,
            self._cov.from_unconstrained(self.prec_chol_raw),
        )

    def set_params_(self, params: GMMParams) -> "GaussianMixture":
        """Overwrite the parameters (new shapes allowed) from a :class:`GMMParams`, under no_grad."""
        with torch.no_grad():
            values = (params.log_weights, params.means, self._cov.to_unconstrained(params.prec_chol))
            for name, value in zip(_PARAMETERS, values):
                setattr(self, name, nn.Parameter(value.detach().clone()))
        return self

    @property
    def batch_shape(self) -> torch.Size:
        self._check_fitted()
        return self.loc.shape[:-2]

    @property
    def n_features_in_(self) -> int:
        self._check_fitted()
        return self.loc.shape[-1]

    def _detached(self) -> GMMParams:
        return self.mixture_params().map(lambda t: t.detach())

    @property
    def weights_(self) -> Tensor:
        return self._detached().log_weights.exp()

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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # An unfitted model has no parameter tensors yet: create them with the saved shapes.
        for name in _PARAMETERS + _BUFFERS:
            key = prefix + name
            if key in state_dict and getattr(self, name) is None:
                value = torch.empty_like(state_dict[key])
                setattr(self, name, nn.Parameter(value) if name in _PARAMETERS else value)
        loc, raw = state_dict.get(prefix + "loc"), state_dict.get(prefix + "prec_chol_raw")
        if loc is not None and raw is not None:
            k, d = loc.shape[-2:]
            expected = tuple(loc.shape[:-2]) + self._cov.prec_chol_shape(k, d)
            if k != self.n_components or tuple(raw.shape) != expected:
                raise ValueError(
                    f"state_dict holds {k} components of dimension {d} with precision factor shape "
                    f"{tuple(raw.shape)}, which does not fit GaussianMixture(n_components={self.n_components}, "
                    f"covariance_type={self.covariance_type!r}) (expected shape {expected})"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, X, y=None, sample_weight=None) -> "GaussianMixture":
        """Fit every dataset in ``X (*B, N, D)``; ``sample_weight (*B, N)`` (0 = padding)."""
        warm = self._detached() if (self.warm_start and self.is_fitted) else None
        result = fit_mixture(
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
            chunk_size=self.chunk_size,
            memory_budget=self.memory_budget,
            method=self.method,
            optimizer=self.optimizer,
            lr=self.lr,
            prior=self.prior,
            catch_interrupt=self.catch_interrupt,
            compile=self.compile,
            prune_after=self.prune_after,
            warn=True,
        )
        self._set_result(result)
        if self.verbose:
            print(result.summary())
        return self

    def _set_result(self, result: FitResult) -> None:
        self.result_ = result
        self.set_params_(result.params)
        self.converged_ = result.converged
        self.n_iter_ = result.n_iter
        self.lower_bound_ = result.lower_bound
        self.lower_bounds_ = result.lower_bounds
        self.status_ = result.status

    def fit_predict(self, X, y=None, sample_weight=None) -> Tensor:
        """``fit(X)`` then ``predict(X)``: labels ``(*B, N)``."""
        return self.fit(X, sample_weight=sample_weight).predict(X)

    def summary(self) -> str:
        """A readable account of the last fit (status counts, flagged series explained)."""
        if self.result_ is None:
            self._check_fitted()
            return f"GaussianMixture with batch shape {tuple(self.batch_shape)} (loaded; no fit record)"
        return self.result_.summary()

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
        x, _ = validation.as_data(X, dtype=self.loc.dtype, device=self.loc.device, n_features=self.n_features_in_)
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

    def _n_parameters(self) -> int:
        k, d = self.loc.shape[-2:]
        return self._cov.n_parameters(k, d)

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
        self._check_fitted()
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        gen = make_generator(self.random_state if random_state is None else random_state)
        params = self._detached()
        k, d = params.means.shape[-2:]
        batch = params.means.shape[:-2]
        weights = params.log_weights.exp().reshape(-1, k).to(device=gen.device, dtype=torch.float64)
        labels = torch.multinomial(weights, n_samples, replacement=True, generator=gen)  # (B, n)
        noise = torch.randn(weights.shape[0], n_samples, d, generator=gen, device=gen.device, dtype=torch.float64)
        labels = labels.to(params.means.device)
        noise = noise.to(device=params.means.device, dtype=params.means.dtype)
        scale_tril = torch.linalg.cholesky(self._cov.full_covariance(params.prec_chol, k, d)).reshape(-1, k, d, d)
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(-1)
        means = params.means.reshape(-1, k, d)[rows, labels]  # (B, n, D)
        x = means + (scale_tril[rows, labels] @ noise.unsqueeze(-1)).squeeze(-1)
        return x.reshape(*batch, n_samples, d), labels.reshape(*batch, n_samples)

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
