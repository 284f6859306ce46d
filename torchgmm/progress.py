"""Progress of a long fit: a tqdm bar on a terminal, or scikit-learn-style lines with ``verbose``.

A :class:`Progress` is the member loop's ``progress`` callback (``(iteration, n_active,
mean_objective)`` after every iteration). With ``verbose=0`` it shows a tqdm bar only when stderr
is a terminal, tqdm is installed (the ``progress`` extra) and the fit has already run for
:data:`BAR_AFTER_S` seconds (a short fit prints nothing). ``verbose=1`` prints the start and the
end of the fit, ``verbose=2`` also every ``verbose_interval`` iterations, to stdout as
scikit-learn does.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["Progress", "BAR_AFTER_S"]

#: A bar appears once a fit has run this long (on a terminal, verbose=0).
BAR_AFTER_S = 2.0


class Progress:
    """The loop's progress callback for one fit of at most ``max_iter`` iterations."""

    def __init__(self, max_iter: int, verbose: int = 0, verbose_interval: int = 10, stream=None):
        self.max_iter = max_iter
        self.verbose, self.verbose_interval = verbose, max(1, int(verbose_interval))
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self.bar = None
        self.last = (0, 0, float("nan"))
        if verbose > 0:
            print(f"Fitting (max_iter={max_iter})")

    @staticmethod
    def wanted(verbose: int, stream=None) -> bool:
        """Whether a fit should build one: verbose output, or a bar on a terminal."""
        stream = sys.stderr if stream is None else stream
        return bool(verbose) or (hasattr(stream, "isatty") and stream.isatty())

    def __call__(self, iteration: int, n_active: int, mean_objective: float) -> None:
        self.last = (iteration, n_active, mean_objective)
        elapsed = time.perf_counter() - self.start
        if self.verbose >= 2 and iteration % self.verbose_interval == 0:
            print(f"  Iteration {iteration}\t time lapse {elapsed:.5f}s\t active {n_active}\t mean lower bound {mean_objective:.6g}")
        if self.verbose or (self.bar is None and elapsed < BAR_AFTER_S):
            return
        if self.bar is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the bar is optional: pip install 'torchgmm[progress]'
                self.verbose = -1  # (silenced: never try again for this fit)
                return
            self.bar = tqdm(total=self.max_iter, initial=iteration - 1, unit="it", file=self.stream, leave=False)
        self.bar.update(1)
        self.bar.set_postfix(active=n_active, mean_ll=f"{mean_objective:.5g}")

    def close(self, summary: Optional[str] = None) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.verbose > 0:
            print(f"Fit done after {self.last[0]} iterations in {time.perf_counter() - self.start:.3f}s")
            if summary:
                print(summary)
