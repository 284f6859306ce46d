"""The member loop: many independent fits ("members": series x restarts) advanced in lock-step.

Every fitting method (EM, SQUAREM, L-BFGS, Adam, and whatever comes next) is a *step rule*: a small
object that knows how to advance the state of a set of members by one iteration. This loop owns
everything else, once:

- the working set of members and their data (:class:`Members`, :class:`Batch`): first every member
  in order, its parameters ``(B, R, ...)`` against the data broadcast as ``(B, 1, N, D)`` (a view,
  no copy per restart; with one member per series, flat ``(B, ...)`` against the series); once at
  most ``compact_below`` of them are still active, only the active ones, with their series' rows
  gathered (at least two rows, so that a compiled step is not recompiled for a batch of one);
- per-member convergence (``|change of the objective| < tol`` between consecutive accepted
  values, scikit-learn's rule) and failure (the rule says ``ok=False``: the member keeps its last
  state, is marked failed, and never touches its neighbours); an iteration after which every
  working member goes on needs no masks (the common case: one synchronization per iteration);
- write-back of finished members, the histories (objective, data passes, elapsed time),
  ``max_iter == 0`` (the objective of the start), pruning of restarts (``prune_after``), a
  progress callback, and Ctrl-C at an iteration boundary.

A step rule (see :class:`StepRule`) works on flat member states ``(S, ...)``; :meth:`Batch.shaped`
gives its parameters the batch's leading dims when it evaluates them against the data.

Data arrive standardized (see ``fit``); no validation and no messages here.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple, Optional, Protocol

import torch
from torch import Tensor

from .density import GMMParams

__all__ = [
    "Batch", "Members", "Start", "Step", "StepRule", "MemberRun", "run_members",
    "run", "tree_map", "tree_where", "all_finite",
]


# -- small helpers on trees of tensors (NamedTuples of tensors, nested) ----------------------------
def tree_map(fn: Callable, tree, *others):
    """``fn`` over the tensors of ``tree`` (NamedTuples/tuples of tensors, nested); other leaves
    (None, numbers) are kept as they are in ``tree``."""
    if isinstance(tree, Tensor):
        return fn(tree, *others)
    if isinstance(tree, tuple):
        items = [tree_map(fn, *parts) for parts in zip(tree, *others)]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return tree


def tree_where(mask: Tensor, a, b):
    """Per member: ``a`` where ``mask (S,)``, else ``b``; for trees with the member dim first."""
    return tree_map(lambda x, y: torch.where(mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim())), x, y), a, b)


def _where(mask: Optional[Tensor], a, b):
    """``torch.where(mask, a, b)``, where a mask of None selects ``a`` everywhere."""
    return a if mask is None else torch.where(mask, a, b)


def _both(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """``a & b`` of masks where None means all True (None when both are)."""
    return b if a is None else a if b is None else a & b


def all_finite(params: GMMParams, n_lead: int = 1) -> Tensor:
    """Whether every number of each member's parameters is finite (a log-weight may be -inf: a
    masked component), shape of the leading dims."""
    ok = None
    for name, t in zip(params._fields, params):
        finite = torch.isfinite(t) | torch.isneginf(t) if name == "log_weights" else torch.isfinite(t)
        fin = finite.flatten(n_lead).all(-1) if t.dim() > n_lead else finite
        ok = fin if ok is None else ok & fin
    return ok


# -- the data side -----------------------------------------------------------------------------------
class Batch(NamedTuple):
    """The data of a set of members, broadcast against their parameters' leading dims ``lead``:
    ``(B, R)`` for every member in order with restarts (``x (B, 1, N, D)``, a view), else ``(S,)``
    (``x (S, N, D)``: the series themselves when each has one member, or the members' series
    gathered)."""

    lead: tuple
    x: Tensor  # (*lead', N, D)
    w: Tensor  # (*lead', N)
    w_total: Tensor  # (*lead')
    reg: Tensor  # (*lead')   reg_covar per series, standardized units
    prior: Any  # None, or a NamedTuple of (*lead', ...) tensors

    @property
    def size(self) -> int:
        return math.prod(self.lead)

    def shaped(self, tree):
        """Flat member tensors ``(S, ...)`` -> ``(*lead, ...)`` (a view; the tree itself when flat)."""
        if len(self.lead) == 1:
            return tree
        return tree_map(lambda t: t.reshape(*self.lead, *t.shape[1:]), tree)

    def subset(self, sel: Tensor) -> "Batch":
        """The flat batch ``(len(sel),)`` of the members at positions ``sel`` of this one."""
        if len(self.lead) == 2:  # (B, R) against data broadcast as (B, 1, ...): gather series rows
            rows = torch.div(sel, self.lead[1], rounding_mode="floor")
            pick = lambda t: t.select(1, 0)[rows]  # noqa: E731
        else:
            pick = lambda t: t[sel]  # noqa: E731
        return Batch((len(sel),), pick(self.x), pick(self.w), pick(self.w_total), pick(self.reg), tree_map(pick, self.prior))

    def flat(self, tree):
        """``(*lead, ...)`` -> flat ``(S, ...)`` (the tree itself when flat)."""
        n = len(self.lead)
        if n == 1:
            return tree
        size = self.size
        return tree_map(lambda t: t.reshape(size, *t.shape[n:]), tree)


class Members:
    """Standardized data of ``B`` series, each fitted by ``n_init`` members (series-major ids
    ``m = b * n_init + r``). ``x (B, N, D)``, ``w (B, N)``, ``reg (B,)``, ``prior`` a NamedTuple of
    ``(B, ...)`` tensors or None."""

    def __init__(self, x: Tensor, w: Tensor, reg: Tensor, prior=None, n_init: int = 1):
        self.x, self.w, self.reg, self.prior = x, w, reg, prior
        self.w_total = w.sum(-1)  # (B,)
        self.n_series, self.n_init = x.shape[0], n_init
        self.m = self.n_series * n_init
        self.series_of = torch.arange(self.m, device=x.device) // n_init  # (M,)

    def batch(self, members: Optional[Tensor] = None) -> Batch:
        """The :class:`Batch` of every member in order (``members=None``: the data broadcast
        against ``(B, R)`` parameters, no copy; with one member per series the series themselves,
        flat ``(B,)``), or of the flat ids ``members (S,)`` (their series' rows gathered; ids may
        repeat)."""
        if members is None and self.n_init == 1:
            return Batch((self.n_series,), self.x, self.w, self.w_total, self.reg, self.prior)
        if members is None:
            return Batch(
                (self.n_series, self.n_init), self.x.unsqueeze(1), self.w.unsqueeze(1),
                self.w_total.unsqueeze(1), self.reg.unsqueeze(1), tree_map(lambda t: t.unsqueeze(1), self.prior),
            )
        rows = self.series_of[members]
        return Batch(
            (len(members),), self.x[rows], self.w[rows], self.w_total[rows], self.reg[rows],
            tree_map(lambda t: t[rows], self.prior),
        )


# -- the step-rule protocol ------------------------------------------------------------------------
class Start(NamedTuple):
    """What a rule returns when it starts: its state ``(S, ...)`` and, if it evaluated the start,
    the objective there (which convergence is then measured against), whether the start is usable,
    and the data passes it spent (each ``(S,)`` or None)."""

    state: Any
    value: Optional[Tensor] = None
    ok: Optional[Tensor] = None
    passes: Optional[Tensor] = None


class Step(NamedTuple):
    """One iteration of a rule for the working members (each ``(S,)``).

    ``value``: the objective this iteration evaluated (recorded in the history; EM: the
    log-likelihood of the parameters before the update, as scikit-learn). ``ok``: False where the
    step failed (the member keeps its previous state and is marked failed). ``accepted``: the value
    is a new point on the member's path (convergence compares it with the previous accepted one;
    True unless the rule rejected a trial). ``passes``: data passes spent (default 1).
    ``converged``: the rule's own convergence test, replacing the loop's ``|change| < tol``."""

    state: Any
    value: Tensor
    ok: Tensor
    accepted: Optional[Tensor] = None
    passes: Optional[Tensor] = None
    converged: Optional[Tensor] = None


class StepRule(Protocol):
    """A fitting method, as the loop sees it. States are trees of ``(S, ...)`` tensors."""

    def start(self, batch: Batch, params: GMMParams) -> Start:
        """Initial state of members whose start parameters are ``params (S, ...)``."""

    def step(self, batch: Batch, state, active: Tensor) -> Step:
        """Advance every member (``active (S,)``: the loop discards what inactive members do)."""

    def params(self, state) -> GMMParams:
        """The mixture parameters ``(S, ...)`` held in ``state``."""

    def objective(self, batch: Batch, params: GMMParams) -> Tensor:
        """The objective of ``params (S, ...)`` (for ``max_iter == 0``), ``(S,)``."""


class MemberRun(NamedTuple):
    """Outcome of every member, flattened to ``M = B * R`` (series-major)."""

    params: GMMParams  # (M, ...)
    lower_bound: Tensor  # (M,) the last objective value of each member (EM: of its final params' predecessor)
    n_iter: Tensor  # (M,) int64
    converged: Tensor  # (M,) bool
    failed: Tensor  # (M,) bool
    history: Tensor  # (M, T) objective per iteration, NaN after the member stopped
    passes: Tensor  # (M, T) data passes spent so far, NaN after the stop
    elapsed: Tensor  # (T,) seconds since the start, at the end of each iteration
    interrupted: bool


class _Track(NamedTuple):
    """Per working member bookkeeping, ``(S,)`` each."""

    lower_bound: Tensor
    reference: Tensor  # the last accepted objective value (convergence is measured against it)
    n_iter: Tensor
    converged: Tensor
    failed: Tensor
    spent: Tensor  # data passes so far


# (iteration, number of active members, their mean objective) -> None
ProgressFn = Callable[[int, int, float], None]


def run_members(
    members: Members,
    init: GMMParams,
    rule: StepRule,
    tol: float,
    max_iter: int,
    *,
    reference: Optional[Tensor] = None,
    prune_after: Optional[int] = None,
    compact_below: float = 0.5,
    catch_interrupt: bool = True,
    progress: Optional[ProgressFn] = None,
) -> MemberRun:
    """Advance every member from ``init (B, R, ...)`` with ``rule`` until
    it converges, fails, or ``max_iter`` iterations are spent.

    ``reference (M,)``: the objective value convergence is first measured against (default
    ``-inf``; a warm start passes its previous lower bound, as scikit-learn does; a rule that
    evaluates its start replaces it). ``prune_after``: after that many iterations only the best
    member of each series (highest objective so far, failed ones last) goes on; the others stop
    where they are, not converged. ``progress`` is called after every iteration.
    """
    m = members.m
    x = members.x
    device, dtype = x.device, x.dtype
    start_params = init.map(lambda t: t.reshape(m, *t.shape[2:]))  # (M, ...), views of `init`
    initial = _Track(
        torch.full((m,), -torch.inf, dtype=dtype, device=device),
        (torch.full((m,), -torch.inf, dtype=dtype, device=device) if reference is None
         else reference.to(device=device, dtype=dtype).reshape(m).clone()),
        torch.zeros(m, dtype=torch.long, device=device),
        torch.zeros(m, dtype=torch.bool, device=device),
        torch.zeros(m, dtype=torch.bool, device=device),
        torch.zeros(m, dtype=dtype, device=device),
    )
    history = torch.full((m, max_iter), torch.nan, dtype=dtype, device=device)
    passes = torch.full((m, max_iter), torch.nan, dtype=dtype, device=device)
    elapsed: list = []  # seconds at the end of each iteration (a tensor at the end)

    def elapsed_tensor() -> Tensor:
        return torch.tensor(elapsed + [torch.nan] * (max_iter - len(elapsed)), dtype=torch.float64)

    idx = torch.arange(m, device=device)  # the working members
    n_working = m  # len(idx)
    batch = members.batch()
    if max_iter == 0:
        lower_bound = rule.objective(batch, start_params)
        return MemberRun(start_params.map(torch.clone), lower_bound, *initial[2:5], history, passes, elapsed_tensor(), False)

    start = rule.start(batch, start_params)
    state, track = start.state, initial
    if start.value is not None:
        usable = torch.isfinite(start.value)
        track = track._replace(
            lower_bound=torch.where(usable, start.value, track.lower_bound),
            reference=torch.where(usable, start.value, track.reference),
        )
    if start.ok is not None:
        track = track._replace(failed=track.failed | ~start.ok)
    if start.passes is not None:
        track = track._replace(spent=track.spent + start.passes)
    active = ~track.failed if start.ok is not None else torch.ones(m, dtype=torch.bool, device=device)

    # Histories of the working members since the last write-back: (iteration, values, passes), each
    # masked by activity; written into `history` / `passes` in one go (not one scatter per iteration).
    pending: list = []
    # Every member's outcome (M, ...), made at the first write-back (compaction, pruning); a run
    # without one ends with the working members themselves: every member in order.
    out: Optional[GMMParams] = None
    out_track = initial

    def pending_columns() -> tuple[Tensor, Tensor]:
        """The pending histories as columns, ``(values, passes)``, each ``(working members, len(pending))``."""
        return torch.stack([v for _, v, _ in pending], -1), torch.stack([p for _, _, p in pending], -1)

    def write_back():
        nonlocal out
        if out is None:
            out = start_params.map(torch.clone)
        if len(idx) == 0:  # an empty batch: nothing to write (and empty tensors may alias)
            return
        for o, p in zip(out, rule.params(state)):
            o[idx] = p
        for o, t in zip(out_track, track):
            if t is not o:  # (a field no iteration changed is still the out tensor itself)
                o[idx] = t
        if pending:
            its = torch.tensor([it for it, _, _ in pending], device=device)
            rows, cols = idx.unsqueeze(-1), its.unsqueeze(0)
            history[rows, cols], passes[rows, cols] = pending_columns()
            pending.clear()

    def finish():
        """The working members are every member in order: they are the outcome (the parameters
        copied only where they are still the start's), their histories the first columns."""
        nonlocal out, out_track
        params = rule.params(state)
        out = type(params)(*(p.clone() if p.data_ptr() == q.data_ptr() else p for p, q in zip(params, start_params)))
        out_track = track
        if pending:
            history[:, :len(pending)], passes[:, :len(pending)] = pending_columns()

    interrupted = False
    clock = time.perf_counter()
    n_active = int(active.sum()) if start.ok is not None else m
    try:
        for it in range(max_iter if n_active else 0):
            s = rule.step(batch, state, active)
            everyone = n_active == n_working  # every working member was active: `active` masks nothing
            good = s.ok if everyone else active & s.ok
            if s.converged is None:  # converges where good, accepted and |change| < tol
                close = (s.value - track.reference).abs() < tol
                converges = close if s.accepted is None else close & s.accepted
            else:
                converges = s.converged
            still = good & ~converges  # active after this iteration
            # (one synchronization: whether every member goes on, else how many)
            nobody_stopped = everyone and bool(still if n_working == 1 else still.all())
            n_still = n_active if nobody_stopped else int(still.sum())
            # Nobody stopped (every member was good and goes on: no failure, no convergence): the
            # new states as they are and the bookkeeping without masks (None); else masked.
            act, took = (None, None) if nobody_stopped else (active, good)
            accepted = _both(took, s.accepted)
            spent = track.spent + (1.0 if s.passes is None else _where(act, s.passes, 0.0))
            record = (it, _where(act, s.value, torch.nan), _where(act, spent, torch.nan))
            # One assignment, so that an interrupt leaves a consistent state.
            state, track, active, n_active, _ = (
                s.state if took is None else tree_where(took, s.state, state),
                _Track(
                    torch.where(_both(act, torch.isfinite(s.value)), s.value, track.lower_bound),
                    _where(accepted, s.value, track.reference),
                    track.n_iter + 1 if act is None else torch.where(act, it + 1, track.n_iter),  # (all active: n_iter == it)
                    track.converged if took is None else track.converged | (took & converges),
                    track.failed if act is None else track.failed | (act & ~s.ok),
                    spent,
                ),
                still,
                n_still,
                pending.append(record),
            )
            elapsed.append(time.perf_counter() - clock)
            if progress is not None:
                progress(it + 1, int(active.sum()), float(s.value[active].mean()) if bool(active.any()) else float("nan"))
            if prune_after is not None and it + 1 == prune_after and members.n_init > 1:
                write_back()
                score = torch.where(out_track.failed, -torch.inf, out_track.lower_bound).reshape(-1, members.n_init)
                keep = torch.zeros_like(score, dtype=torch.bool)
                keep[torch.arange(score.shape[0], device=device), score.argmax(-1)] = True
                active = active & keep.reshape(-1)[idx]
                n_active = int(active.sum())
            if n_active == 0:
                break
            if n_active <= compact_below * n_working:
                write_back()
                keep = active.nonzero().squeeze(-1)
                if len(keep) == 1:  # keep >= 2 rows: a batch of 1 would recompile a fused step
                    keep = keep.repeat(2)  # (the twin rows compute and write back identical values)
                idx, n_working = idx[keep], len(keep)
                state = tree_map(lambda t: t[keep], state)
                track = tree_map(lambda t: t[keep], track)
                active = torch.ones(n_working, dtype=torch.bool, device=device)
                batch = members.batch(idx)
    except KeyboardInterrupt:
        if not catch_interrupt:
            raise
        interrupted = True
    if out is None:
        finish()
    else:
        write_back()
    return MemberRun(out, out_track.lower_bound, out_track.n_iter, out_track.converged, out_track.failed,
                     history, passes, elapsed_tensor(), interrupted)


def run(rule: StepRule, x: Tensor, w: Tensor, reg: Tensor, init: GMMParams, tol: float, max_iter: int, *,
        prior=None, **options) -> MemberRun:
    """:func:`run_members` for standardized ``x (B, N, D)``, ``w (B, N)``, ``reg (B,)`` and
    ``init (B, R, ...)``: the short form for tests and experiments."""
    return run_members(Members(x, w, reg, prior, init.means.shape[1]), init, rule, tol, max_iter, **options)
