"""What a fit returns: per-series status codes and the :class:`FitResult` record, and how the
members of the loop become one result per series (degenerate flags, the restart chosen, status)."""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass
from typing import Optional
import torch
from torch import Tensor

from .covariance import Covariance, get_covariance
from .density import GMMParams

__all__ = ["FitStatus", "FitResult", "FitWarning", "ConvergenceWarning", "DegenerateWarning", "DEGENERATE_FACTOR"]

# A component is degenerate when its smallest variance is within this factor of reg_covar.
DEGENERATE_FACTOR = 10.0


class FitWarning(UserWarning):
    """Base class of torchgmm's warnings about a fit."""


class ConvergenceWarning(FitWarning):
    """Some fits stopped at ``max_iter`` (or were interrupted) before converging."""


class DegenerateWarning(FitWarning):
    """Some fits are degenerate, empty, short of data, or failed numerically (see ``status_``)."""


class FitStatus(enum.IntEnum):
    """Outcome of one series' fit. When several apply, the highest value is reported."""

    OK = 0  #: converged, nothing unusual
    NOT_CONVERGED = 1  #: stopped at max_iter (or interrupted) before |change| < tol
    DEGENERATE = 2  #: a component collapsed: smallest variance within 10x reg_covar
    DIVERGED = 3  #: an M-step failed numerically; the last finite parameters are kept
    INSUFFICIENT_DATA = 4  #: fewer positive-weight points than components
    EMPTY = 5  #: no positive-weight point at all; lower bound -inf, placeholder parameters


# The codes of the flags FitResult.from_members stacks: not converged, degenerate, diverged,
# insufficient data, empty.
_STATUS_CODES = torch.tensor([FitStatus.NOT_CONVERGED, FitStatus.DEGENERATE, FitStatus.DIVERGED,
                              FitStatus.INSUFFICIENT_DATA, FitStatus.EMPTY], dtype=torch.long)


@dataclass
class FitResult:
    """Result of fitting a batch of mixtures. Batch shape ``(*B)`` in front of every tensor.

    ``params`` are in the data's units. ``lower_bound`` is the weighted mean log-likelihood per
    point of the chosen restart (as scikit-learn's ``lower_bound_``: the value before the last
    M-step); ``lower_bounds`` its per-iteration history, NaN-padded to ``max_iter``, with the data
    passes spent (``passes``) and the wall time of the whole batch (``elapsed``) alongside.
    """

    params: GMMParams
    covariance_type: str
    lower_bound: Tensor  # (*B,)
    lower_bounds: Tensor  # (*B, T)
    passes: Tensor  # (*B, T) cumulative data passes (density evaluations) at each iteration
    n_iter: Tensor  # (*B,) int64
    converged: Tensor  # (*B,) bool
    status: Tensor  # (*B,) int64, values of FitStatus
    degenerate_components: Tensor  # (*B, K) bool
    n_samples: Tensor  # (*B,) positive-weight points
    restart_lower_bounds: Tensor  # (*B, R)
    restart_degenerate: Tensor  # (*B, R) bool: a component of that restart collapsed
    best_restart: Tensor  # (*B,) int64
    elapsed: Tensor  # (T,) seconds since the start, at the end of each iteration (whole batch)
    interrupted: bool = False
    method: str = "em"
    n_components: Optional[Tensor] = None  # (*B,) the chosen K (model selection over K), else None
    criterion: Optional[Tensor] = None  # (*B, C) the criterion of each candidate's best restart
    component: str = "component"  # what a component is called: "state" for an HMM (no mixing weights)

    @property
    def batch_shape(self) -> torch.Size:
        return self.lower_bound.shape

    @classmethod
    def from_members(
        cls, run, *, n_restarts: int, cov: Covariance, scaling, reg: Tensor, n_valid: Tensor, empty: Tensor,
        insufficient: Tensor, batch_shape, method: str, score: Optional[Tensor] = None,
    ) -> "FitResult":
        """One result per series from a :class:`torchgmm.loop.MemberRun` of ``B`` series x ``R``
        restarts (``n_restarts``) in standardized units (``scaling``, ``reg (B,)``): flag degenerate members, keep
        per series the best non-degenerate, non-failed restart (the best finite one if there is
        none) by ``score (B, R)`` (default: the lower bound; higher is better), convert to data
        units, set the status, restore the batch shape. Components of weight exactly 0 (masked)
        are never degenerate."""
        n_series = n_valid.shape[0]
        params_m = run.params.map(lambda t: t.reshape(n_series, n_restarts, *t.shape[1:]))  # (B, R, ...)
        k, d = params_m.means.shape[-2:]
        lb = run.lower_bound.reshape(n_series, n_restarts)  # (B, R)
        failed = run.failed.reshape(n_series, n_restarts)
        # Collapsed: within DEGENERATE_FACTOR x reg_covar, or (float32) within what rounding the
        # component's own mean leaves of a variance, (100 eps (1 + |mu|))^2 in standardized units;
        # not a fixed 100 eps, which flagged narrow but sound float32 components (std < 0.35% of
        # the series' spread: two clusters 100 apart with std 0.1).
        rounding = (100 * torch.finfo(lb.dtype).eps * (1 + params_m.means.norm(dim=-1))).square()  # (B, R, K)
        floor = torch.maximum((DEGENERATE_FACTOR * reg).view(-1, 1, 1), rounding)
        # the smallest variances, exact for the members with a component the cheap bound does not clear
        min_var = cov.min_variance_bound(params_m.prec_chol, k)  # (B, R, K)
        near = (~(min_var > floor)).any(-1).reshape(-1)  # (B R,)
        if bool(near.any()):
            idx = near.nonzero().squeeze(-1)
            factors = params_m.prec_chol.reshape(n_series * n_restarts, *params_m.prec_chol.shape[2:])[idx]
            exact = cov.min_variance(cov.covariance_from_prec_chol(factors), k)  # (M, K)
            min_var = min_var.reshape(-1, k).index_copy(0, idx, exact).view(n_series, n_restarts, k)
        degenerate = (min_var <= floor) & ~torch.isneginf(params_m.log_weights)  # (B, R, K)
        score = lb if score is None else score

        def best_of(mask):
            return torch.where(mask, score, -torch.inf).argmax(-1)

        if n_restarts == 1:  # one restart: it is the choice (fewer small operations for small fits)
            best = torch.zeros(n_series, dtype=torch.long, device=lb.device)

            def pick(t):
                return t  # (M, ...) is (B, ...)
        else:
            finite = torch.isfinite(lb)
            clean = finite & ~degenerate.any(-1) & ~failed
            best = torch.where(clean.any(-1), best_of(clean), best_of(finite))  # (B,)
            rows = torch.arange(n_series, device=lb.device)

            def pick(t):
                return t.reshape(n_series, n_restarts, *t.shape[1:])[rows, best]

        params = scaling.to_data(GMMParams(*(pick(t) for t in run.params)), cov)
        converged, failed_best = pick(run.converged), pick(run.failed)
        present = (~empty).unsqueeze(-1)  # (B, 1)
        degenerate_best = pick(degenerate.reshape(n_series * n_restarts, k)) & present
        # the highest code that applies (codes grow with severity), in one pass
        flags = torch.stack([~converged, degenerate_best.any(-1), failed_best, insufficient, empty], -1)
        codes = _STATUS_CODES if _STATUS_CODES.device == lb.device else _STATUS_CODES.to(lb.device)
        status = (flags * codes).amax(-1)
        restart_lower_bounds = scaling.log_lik_to_data(lb, d)  # (B, R)
        lower_bound = torch.where(empty, -torch.inf, pick(restart_lower_bounds.reshape(-1)))
        history = torch.where(empty.unsqueeze(-1), torch.nan, scaling.log_lik_to_data(pick(run.history), d))

        def unflatten(t):
            return t.reshape(tuple(batch_shape) + tuple(t.shape[1:]))

        return cls(
            params=params.map(unflatten),
            covariance_type=cov.name,
            lower_bound=unflatten(lower_bound),
            lower_bounds=unflatten(history),
            passes=unflatten(pick(run.passes)),
            n_iter=unflatten(torch.where(empty, 0, pick(run.n_iter))),
            converged=unflatten(converged & ~failed_best & present.squeeze(-1)),
            status=unflatten(status),
            degenerate_components=unflatten(degenerate_best),
            n_samples=unflatten(n_valid),
            restart_lower_bounds=unflatten(restart_lower_bounds),
            restart_degenerate=unflatten(degenerate.any(-1) & present),
            best_restart=unflatten(best),
            elapsed=run.elapsed,
            interrupted=run.interrupted,
            method=method,
        )

    @property
    def weights(self) -> Tensor:
        return self.params.log_weights.exp()

    @property
    def means(self) -> Tensor:
        return self.params.means

    @property
    def precisions_cholesky(self) -> Tensor:
        return self.params.prec_chol

    @property
    def covariances(self) -> Tensor:
        return get_covariance(self.covariance_type).covariance_from_prec_chol(self.params.prec_chol)

    @property
    def precisions(self) -> Tensor:
        return get_covariance(self.covariance_type).precision_from_prec_chol(self.params.prec_chol)

    def status_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.status.reshape(-1).cpu(), minlength=len(FitStatus))
        return {s.name: int(counts[s]) for s in FitStatus if counts[s] > 0}

    def describe(self, index: tuple) -> str:
        """One line about the series at ``index`` (a tuple into the batch shape)."""
        status = FitStatus(int(self.status[index]))
        text = f"{status.name}, {int(self.n_iter[index])} iterations, lower bound {float(self.lower_bound[index]):.6g}"
        bad = self.degenerate_components[index].nonzero().flatten().tolist()
        if len(bad) > 3:  # never a wall of numbers: the count, then the first few
            text += f"; {len(bad)} {self.component}s collapsed, first:"
            bad = bad[:3]
        if bad:
            means = self.params.means[index]
            var = get_covariance(self.covariance_type).min_variance(self.covariances[index], means.shape[0])
            parts = []
            for k in bad:
                values = means[k].tolist()
                where = ", ".join(f"{v:.6g}" for v in values[:3]) + (f", ... ({len(values)} features)" if len(values) > 3 else "")
                weight = f" (weight {float(self.weights[index][k]):.3g})" if self.component == "component" else ""
                parts.append(f"{self.component} {k}{weight} on ({where}), variance {float(var[k]):.3g}")
            text += "; collapsed: " + "; ".join(parts)
        return text

    def summary(self, max_series: int = 5, names=None) -> str:
        """Readable summary: status counts, then the first flagged series, each explained.
        ``names``: the series' names in the batch's flat order (e.g. a file's series ids), used in
        place of their indices."""
        n = max(1, math.prod(self.batch_shape))
        if names is not None and len(names) != n:
            raise ValueError(f"names has {len(names)} entries for a batch of {n} series; pass one name per series")
        counts = ", ".join(f"{name} {c}" for name, c in self.status_counts().items())
        lines = [f"{n} fit(s), {self.method}, covariance_type={self.covariance_type!r}: {counts}"]
        flagged = self.status != FitStatus.OK
        indices = flagged.nonzero().tolist()  # row-major, as the flat positions below
        positions = flagged.reshape(-1).nonzero().flatten().tolist()
        for index, flat in zip(indices[:max_series], positions):
            index = tuple(index)
            label = ("fit" if not index else f"series {names[flat]!r}" if names is not None
                     else f"series {index}")
            lines.append(f"  {label}: {self.describe(index)}")
        if len(indices) > max_series:
            lines.append(f"  ... and {len(indices) - max_series} more flagged series (see status_)")
        return "\n".join(lines)

    def _few_points_hint(self) -> str:
        k, d = self.params.means.shape[-2:]
        needed = get_covariance(self.covariance_type).points_for_full_rank(k, d)
        if needed is not None and bool((self.n_samples < needed).any()):
            return (f" With fewer than {needed} points ({self.covariance_type} covariance, K={k}, D={d}) the "
                    "covariance estimate is singular (only reg_covar keeps it invertible): consider "
                    "covariance_type='diag'.")
        return ""

    def warn(self, stacklevel: int = 3, convergence: bool = True) -> None:
        """One summarized warning per category for the whole batch (never one per series)."""
        status = self.status.reshape(-1)
        n = status.numel()
        if n == 0 or int(status.amax()) == FitStatus.OK:  # (one synchronization when every fit is OK)
            return
        bad = status >= FitStatus.DEGENERATE
        if bool(bad.any()):
            first = tuple((self.status >= FitStatus.DEGENERATE).nonzero()[0].tolist())
            label = f"series {first}" if first else "the fit"
            warnings.warn(
                f"{int(bad.sum())} of {n} fit(s) are flagged ({self.status_counts()}); "
                f"{label}: {self.describe(first)}. Inspect status_ and "
                "summary(); for collapsed components increase reg_covar, use a prior (prior='default'), "
                "or reduce n_components." + self._few_points_hint(),
                DegenerateWarning,
                stacklevel=stacklevel,
            )
        unconverged = status == FitStatus.NOT_CONVERGED
        if convergence and bool(unconverged.any()):
            why = "the fit was interrupted" if self.interrupted else "max_iter was reached"
            warnings.warn(
                f"{int(unconverged.sum())} of {n} fit(s) did not converge ({why}). Try a larger "
                "max_iter or tol, other init parameters, or check for degenerate data.",
                ConvergenceWarning,
                stacklevel=stacklevel,
            )
