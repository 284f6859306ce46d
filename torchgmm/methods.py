"""The fitting methods a user names: small settings objects that build their step rule.

``method="em"`` (or ``EM()``), ``"squarem"`` (``SQUAREM()``) and ``"gradient"`` (``Gradient()``)
are interchangeable in ``fit``, ``GaussianMixture`` and ``compare``; a method's own options travel
with it (``EM(prune_after=5)``, ``Gradient("adam", lr=0.01)``) instead of widening every
signature. A new method is a new step rule (``torchgmm.loop.StepRule``) and one small class here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .covariance import Covariance
from .em import EMRule
from .gradient import AdamRule, LBFGSRule
from .squarem import SquaremRule

__all__ = ["EM", "SQUAREM", "Gradient", "Method", "as_method", "method_settings", "METHOD_NAMES"]


@dataclass(frozen=True)
class EM:
    """Expectation-maximization (scikit-learn's iteration). ``prune_after``: after that many
    iterations only each series' best restart goes on (a cheap restart strategy; None runs every
    restart to convergence). ``penalized``: the exact EM of the shared objective (see
    ``torchgmm.objective``; what ``compare`` runs)."""

    prune_after: Optional[int] = None
    penalized: bool = False
    name = "em"
    blocked = True  # the step is per member: it runs on cache-sized blocks of members

    def rule(self, cov: Covariance, tol: float, *, chunk_size=None, compile=False, block_members=None):
        return EMRule(cov, chunk_size=chunk_size, compile=compile, block_members=block_members, penalized=self.penalized)

    def loop_options(self) -> dict:
        return {"prune_after": self.prune_after}


@dataclass(frozen=True)
class SQUAREM:
    """EM accelerated by squared extrapolation (SqS3, monotone by its safeguard)."""

    penalized: bool = False
    name = "squarem"
    blocked = True

    def rule(self, cov: Covariance, tol: float, *, chunk_size=None, compile=False, block_members=None):
        em = EMRule(cov, chunk_size=chunk_size, compile=compile, block_members=block_members, penalized=self.penalized)
        return SquaremRule(em)

    def loop_options(self) -> dict:
        return {}


@dataclass(frozen=True)
class Gradient:
    """Gradient-based maximum likelihood on the shared objective: ``optimizer`` ``"lbfgs"``
    (per-member L-BFGS, ``lr`` scales its first trial step, default 1) or ``"adam"`` (``lr``
    its learning rate, default 0.05)."""

    optimizer: str = "lbfgs"
    lr: Optional[float] = None
    name = "gradient"
    blocked = False  # works on all members at once; its line search selects members itself

    def rule(self, cov: Covariance, tol: float, *, chunk_size=None, compile=False, block_members=None):
        rule = LBFGSRule if self.optimizer == "lbfgs" else AdamRule
        return rule(cov, tol, self.lr, chunk_size)

    def loop_options(self) -> dict:
        return {}


Method = Union[EM, SQUAREM, Gradient]
METHOD_NAMES = ("em", "squarem", "gradient")


def as_method(method, *, optimizer: str = "lbfgs", lr: Optional[float] = None, prune_after: Optional[int] = None) -> Method:
    """A method object from a name and the flat keyword settings (kept for compatibility), or a
    method object as it is (then the flat settings must be left at their defaults)."""
    if isinstance(method, (EM, SQUAREM, Gradient)):
        flat = {"optimizer": optimizer != "lbfgs", "lr": lr is not None, "prune_after": prune_after is not None}
        given = [name for name, set_ in flat.items() if set_]
        if given:
            raise ValueError(
                f"{given[0]}= was given besides method={method!r}; put the method's options in the "
                f"method object (e.g. EM(prune_after=5), Gradient('adam', lr=0.01))"
            )
        return method
    if method == "em":
        return EM(prune_after=prune_after)
    if method == "squarem":
        return SQUAREM()
    if method == "gradient":
        return Gradient(optimizer, lr)
    raise ValueError(f"method={method!r} is not supported; choose one of {list(METHOD_NAMES)} or a method object (EM(), SQUAREM(), Gradient())")


def method_settings(method, *, optimizer: str = "lbfgs", lr: Optional[float] = None, prune_after: Optional[int] = None) -> dict:
    """The method's settings as the flat names ``validation.check_settings`` checks."""
    if isinstance(method, (EM, SQUAREM, Gradient)):
        return {"method": method.name, "optimizer": getattr(method, "optimizer", optimizer),
                "lr": getattr(method, "lr", lr), "prune_after": getattr(method, "prune_after", prune_after)}
    return {"method": method, "optimizer": optimizer, "lr": lr, "prune_after": prune_after}
