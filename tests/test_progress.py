"""Progress of long fits (torchgmm.progress) and short, bounded messages for high-dimensional data."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import torchgmm
from torchgmm import progress as progress_module
from torchgmm.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def data(n_series=20, n=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_series, n, 1, dtype=torch.float64, generator=gen)
    x[:, : n // 2] += 5
    return x


def test_verbose_2_prints_scikit_learn_style_lines_every_interval(capsys):
    gm = torchgmm.GaussianMixture(2, verbose=2, verbose_interval=2, tol=0.0, max_iter=6, random_state=0)
    with pytest.warns(torchgmm.ConvergenceWarning):
        gm.fit(data())
    out = capsys.readouterr().out.splitlines()
    iterations = [line for line in out if line.startswith("  Iteration")]
    assert [line.split()[1] for line in iterations] == ["2", "4", "6"]
    assert "active 20" in iterations[0] and "mean lower bound" in iterations[0]
    assert out[0].startswith("Fitting") and any(line.startswith("Fit done after 6 iterations") for line in out)
    assert any("NOT_CONVERGED 20" in line for line in out)  # the summary


def test_verbose_0_prints_nothing_off_a_terminal(capsys):
    torchgmm.GaussianMixture(2, random_state=0).fit(data())
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_a_bar_appears_on_a_terminal_only_for_a_long_fit(monkeypatch):
    pytest.importorskip("tqdm")
    term = Terminal()
    quick = Progress(50, stream=term)
    for it in range(1, 4):
        quick(it, 10, -1.0)
    quick.close()
    assert term.getvalue() == ""  # under BAR_AFTER_S: nothing
    monkeypatch.setattr(progress_module, "BAR_AFTER_S", 0.0)
    slow = Progress(50, stream=term)
    for it in range(1, 4):
        slow(it, 7, -1.25)
    slow.close()
    text = term.getvalue()
    assert "active=7" in text and "mean_ll=-1.25" in text


def test_the_loop_reports_every_iteration_through_fit():
    seen = []
    result = torchgmm.fit(data(), 2, random_state=0, progress=lambda it, n, v: seen.append((it, n, v)))
    assert [it for it, _, _ in seen] == list(range(1, int(result.n_iter.max()) + 1))
    assert seen[-1][1] == 0 and seen[0][1] == 20


def test_a_matrix_of_series_passed_as_features_gets_one_short_warning():
    x = torch.randn(500, 60)
    with pytest.warns(torchgmm.FitWarning, match=r"fit X\[\.\.\., None\]") as record:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torchgmm.ConvergenceWarning)
            torchgmm.GaussianMixture(3, covariance_type="diag", max_iter=3, random_state=0).fit(x)
    messages = [str(w.message) for w in record if "X[..., None]" in str(w.message)]
    assert len(messages) == 1 and len(messages[0]) < 300 and "(500, 60, 1)" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchgmm.FitWarning)
        torchgmm.GaussianMixture(3, covariance_type="diag", random_state=0).fit(torch.randn(2000, 3))  # plausible


def test_summary_never_prints_a_whole_parameter_vector():
    x = torch.zeros(2, 40, 50, dtype=torch.float64)
    x[:, :20] = 1.0  # two repeated points in 50-D: every component collapses
    with pytest.warns(torchgmm.FitWarning):
        result = torchgmm.fit(x, 2, covariance_type="diag", random_state=0)
    text = result.summary()
    assert "(50 features)" in text and max(len(line) for line in text.splitlines()) < 400
