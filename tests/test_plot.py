"""Pictures: rendered to PNG with Agg into tmp_path and checked to be real, non-blank images."""

import sys
import warnings

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm.cli import main
from torchgmm.datasets import seed_series

pytest.importorskip("matplotlib")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
from matplotlib.image import imread  # noqa: E402

import torchgmm.plot as gmmplot  # noqa: E402


def _check_png(path, min_kb=8):
    assert path.stat().st_size > min_kb * 1024
    pixels = imread(path)
    assert pixels.ndim == 3 and float(pixels[..., :3].var()) > 1e-3  # not a blank image


def _fit(x, k, **kw):
    kw = {"random_state": 0, "max_iter": 50, **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchgmm.GaussianMixture(k, **kw).fit(x)


@pytest.fixture(scope="module")
def batch2d():
    rng = np.random.default_rng(0)
    x = torch.tensor(np.concatenate([rng.normal(0, 1, (3, 60, 2)), rng.normal(4, 0.5, (3, 40, 2))], 1))
    return x, _fit(x, 2)


def test_univariate_histogram_with_density_and_degenerate_component_marked(tmp_path):
    x = seed_series()
    # the README's unlucky start: a component collapses onto the repeated value
    gm = _fit(x, 3, init_params="random_from_data", random_state=3, tol=1e-6, max_iter=100)
    assert gm.result_.degenerate_components.tolist() == [False, True, False]
    fig = gmmplot.plot(gm, x)
    ax = fig.axes[0]
    red = [line for line in ax.get_lines() if matplotlib.colors.to_hex(line.get_color()) == "#d62728"]
    assert len(red) == 2  # the line at its mean and the x above it
    assert [t.get_text() for t in ax.get_legend().get_texts()][1].startswith("1: degenerate")
    assert ax.get_title() == "fit, DEGENERATE"
    fig.savefig(tmp_path / "hist.png")
    _check_png(tmp_path / "hist.png")


def test_scatter_of_a_bivariate_series(tmp_path, batch2d):
    x, gm = batch2d
    fig = gmmplot.plot(gm, x, series=1)
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "series 1"
    assert len(fig.axes[0].patches) == 2  # one ellipse per component
    fig.savefig(tmp_path / "scatter.png")
    _check_png(tmp_path / "scatter.png")


def test_batch_grid_with_the_distribution_of_chosen_k(tmp_path, batch2d):
    x, gm = batch2d
    fig = gmmplot.plot(gm, x)
    assert sum(ax.get_visible() for ax in fig.axes) == 3
    selected = torchgmm.GaussianMixture([1, 2], random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        selected.fit(x)
    fig = gmmplot.plot(selected, x)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 4 and visible[-1].get_title() == "chosen K (3 series)"
    fig.savefig(tmp_path / "grid.png")
    _check_png(tmp_path / "grid.png")


def test_time_view_coloured_by_component_and_drawn_into_a_given_axes(tmp_path):
    from matplotlib.figure import Figure

    x = torch.cat([torch.randn(40, generator=torch.Generator().manual_seed(0)), 8 + torch.randn(40)])
    gm = _fit(x, 2)
    fig = Figure()
    ax = fig.add_subplot()
    assert gmmplot.plot(gm, x, kind="time", ax=ax) is fig
    assert len(ax.collections) == 2  # one scatter per component
    fig.savefig(tmp_path / "time.png")
    _check_png(tmp_path / "time.png")


def test_the_module_is_callable_and_checks_its_arguments(batch2d):
    x, gm = batch2d
    assert torchgmm.plot is gmmplot and callable(torchgmm.plot) and gmmplot.plot is not gmmplot
    assert gmmplot(gm, x, series=0) is not None  # torchgmm.plot(model, X, ...) after `import torchgmm.plot`
    with pytest.raises(ValueError, match="kind must be one of"):
        gmmplot.plot(gm, x, kind="pie")
    with pytest.raises(IndexError):
        gmmplot.plot(gm, x, series=7)
    with pytest.raises(ValueError, match="expected"):
        gmmplot.plot(gm, x[:2], series=0)
    with pytest.raises(ValueError, match="pass series="):
        from matplotlib.figure import Figure

        gmmplot.plot(gm, x, ax=Figure().add_subplot())


def test_without_matplotlib_the_error_says_how_to_install_it(monkeypatch, batch2d):
    x, gm = batch2d
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'torchgmm\[plot\]'"):
        gmmplot.plot(gm, x)


def test_plot_command_fits_then_draws(tmp_path, capsys):
    rng = np.random.default_rng(1)
    lines = ["series,value"] + [f"a,{v}" for v in rng.normal(0, 1, 60)] + [f"b,{v}" for v in rng.normal(3, 1, 50)]
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    rc = main(["plot", str(tmp_path / "in.csv"), "--series", "b", "-k", "1", "--n-init", "1",
               "--out", str(tmp_path / "b.png")])
    err = capsys.readouterr().err
    assert rc == 0 and "wrote" in err
    _check_png(tmp_path / "b.png")
    rc = main(["plot", str(tmp_path / "in.csv"), "--series", "zzz", "--out", str(tmp_path / "z.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "no series 'zzz'; the series are a, b" in err and not (tmp_path / "z.png").exists()


def test_a_hidden_markov_model_is_drawn_over_time_with_its_regimes_shaded(tmp_path):
    x = seed_series()
    hmm = torchgmm.GaussianHMM(3, n_init=10, random_state=0).fit(x)
    path = hmm.predict(x)
    fig = gmmplot.plot(hmm, x)  # kind "auto" is time for an HMM
    ax = fig.axes[0]
    runs = 1 + int((path[1:] != path[:-1]).sum())
    assert len(ax.patches) == runs  # one shaded span per regime
    assert len(ax.collections) == 3  # one scatter per state
    assert [t.get_text().split(":")[0] for t in ax.get_legend().get_texts()] == ["state 0", "state 1", "state 2"]
    fig.savefig(tmp_path / "regimes.png")
    _check_png(tmp_path / "regimes.png")


def test_regimes_command_draws_a_grid_of_ragged_series(tmp_path, capsys):
    rng = np.random.default_rng(2)
    lines = ["series,value"] + [f"a,{v}" for v in np.r_[rng.normal(0, 1, 40), rng.normal(6, 1, 30)]]
    lines += [f"b,{v}" for v in np.r_[rng.normal(6, 1, 25), rng.normal(0, 1, 20)]]
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    rc = main(["regimes", str(tmp_path / "in.csv"), "-k", "2", "--n-init", "2", "--plot", str(tmp_path / "g.png"),
               "--out", str(tmp_path / "runs.csv")])
    err = capsys.readouterr().err
    assert rc == 0 and f"wrote {tmp_path / 'g.png'}" in err and "wrote 4 rows (2 series)" in err
    _check_png(tmp_path / "g.png")
