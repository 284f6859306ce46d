"""The command line: files of series in, one row per series and component out; one-line errors."""

import csv
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm import cli
from torchgmm.cli import build_parser, main, parse_k
from torchgmm.datasets import seed_series, synthetic_series

FAST = ["--n-init", "2", "--max-iter", "30"]


def _write_long_csv(path, series):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["series", "t", "value"])
        for name, values in series.items():
            for t, v in enumerate(values):
                writer.writerow([name, t, v])
    return path


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _rows(text):
    return list(csv.DictReader(io.StringIO(text)))


def _two_series():
    rng = np.random.default_rng(0)
    return {
        "a": np.concatenate([rng.normal(-5, 1, 80), rng.normal(5, 1, 40)]),
        "b": np.concatenate([rng.normal(0, 0.5, 30), rng.normal(10, 2, 60)]),
    }


def test_fit_file_fits_each_ragged_series_like_a_solo_fit(tmp_path, capsys):
    series = _two_series()
    src, out = _write_long_csv(tmp_path / "in.csv", series), tmp_path / "out.csv"
    rc, stdout, err = _run(capsys, "fit", src, "-k", 2, *FAST, "--out", out)
    assert rc == 0 and stdout == ""
    assert "long format" in err and "2 series, 210 points" in err and "wrote 4 rows" in err
    rows = list(csv.DictReader(open(out)))
    assert [r["series"] for r in rows] == ["a", "a", "b", "b"]
    for name, values in series.items():
        mine = [r for r in rows if r["series"] == name]
        x = torch.tensor(values)
        solo = torchgmm.GaussianMixture(2, n_init=2, max_iter=30, random_state=0).fit(x)
        assert float(mine[0]["log_likelihood"]) == pytest.approx(float(solo.score(x)), abs=1e-9)
        assert float(mine[0]["bic"]) == pytest.approx(float(solo.bic(x)), abs=1e-7)
        assert sorted(float(r["mean"]) for r in mine) == pytest.approx(sorted(solo.means_.ravel().tolist()), abs=1e-9)
        assert sorted(float(r["variance"]) for r in mine) == pytest.approx(
            sorted(solo.covariances_.ravel().tolist()), abs=1e-9)
        assert {r["status"] for r in mine} == {"OK"} and {r["n_components"] for r in mine} == {"2"}
        assert mine[0]["n_points"] == str(len(values))
        assert sum(float(r["weight"]) for r in mine) == pytest.approx(1.0)


def test_default_output_is_csv_on_stdout_and_quiet_silences_stderr(tmp_path, capsys):
    src = _write_long_csv(tmp_path / "in.csv", _two_series())
    rc, stdout, err = _run(capsys, "fit", src, "-k", 1, "--quiet")
    assert rc == 0 and err == ""
    rows = _rows(stdout)
    assert list(rows[0])[:9] == ["series", "component", "weight", "mean", "variance", "n_components", "status",
                                 "log_likelihood", "bic"]
    assert len(rows) == 2


def test_the_bundled_series_fits_as_in_the_readme(capsys):
    from importlib import resources

    with resources.as_file(resources.files("torchgmm").joinpath("data/seed_series.csv")) as path:
        rc, stdout, err = _run(capsys, "fit", path, "-k", 3)
    assert rc == 0 and "1 series, 50 points" in err
    rows = _rows(stdout)
    assert sorted(round(float(r["mean"]), 2) for r in rows) == [24.57, 37.58, 44.34]
    assert float(rows[0]["log_likelihood"]) == pytest.approx(-2.1237, abs=1e-4)


def test_a_wide_csv_is_fitted_per_column(tmp_path, capsys):
    rng = np.random.default_rng(1)
    cols = {"x": rng.normal(0, 1, 40), "y": rng.normal(5, 2, 30)}
    lines = ["x,y"] + [f"{cols['x'][i]},{cols['y'][i] if i < 30 else ''}" for i in range(40)]
    (tmp_path / "wide.csv").write_text("\n".join(lines) + "\n")
    rc, stdout, err = _run(capsys, "fit", tmp_path / "wide.csv", "-k", 1, *FAST)
    assert rc == 0 and "wide format" in err
    rows = _rows(stdout)
    assert [r["series"] for r in rows] == ["x", "y"]  # two univariate series, not one 2-D series
    assert float(rows[1]["mean"]) == pytest.approx(cols["y"].mean(), abs=1e-9)
    assert rows[1]["n_points"] == "30"


def test_multivariate_columns_and_json_and_parquet_outputs(tmp_path, capsys):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 40, 2)) + np.array([[[0, 0]], [[5, -5]]])
    np.save(tmp_path / "d.npy", x)
    rc, stdout, _ = _run(capsys, "fit", tmp_path / "d.npy", "-k", 1, *FAST)
    rows = _rows(stdout)
    assert {"mean_0", "mean_1", "cov_0_0", "cov_0_1", "cov_1_1"} <= set(rows[0])
    solo = torchgmm.GaussianMixture(1).fit(torch.tensor(x[1]))
    assert float(rows[1]["cov_0_1"]) == pytest.approx(float(solo.covariances_[0, 0, 1]), abs=1e-9)
    assert float(rows[1]["mean_1"]) == pytest.approx(float(solo.means_[0, 1]), abs=1e-9)
    _run(capsys, "fit", tmp_path / "d.npy", "-k", 1, *FAST, "--out", tmp_path / "o.json")
    records = json.loads((tmp_path / "o.json").read_text())
    assert [r["series"] for r in records] == ["0", "1"] and records[1]["mean_1"] == pytest.approx(float(rows[1]["mean_1"]))
    pq = pytest.importorskip("pyarrow.parquet")
    _run(capsys, "fit", tmp_path / "d.npy", "-k", 1, *FAST, "--out", tmp_path / "o.parquet")
    table = pq.read_table(tmp_path / "o.parquet").to_pydict()
    assert table["cov_0_0"] == pytest.approx([float(r["cov_0_0"]) for r in rows])


def test_a_series_shorter_than_k_gets_its_status_not_an_error(tmp_path, capsys):
    src = _write_long_csv(tmp_path / "in.csv", {"long": np.linspace(0, 10, 30), "short": [1.0, 2.0]})
    rc, stdout, err = _run(capsys, "fit", src, "-k", 3, *FAST)
    assert rc == 0
    status = {r["series"]: r["status"] for r in _rows(stdout)}
    assert status["short"] == "INSUFFICIENT_DATA" and status["long"] != "INSUFFICIENT_DATA"
    assert "series 'short': INSUFFICIENT_DATA" in err  # the summary, naming the series by its id


@pytest.mark.parametrize("text, argv, match", [
    ("series,value\na,1\na,x7\n", [], r"in.csv: line 3, column 'value': 'x7' is not a number"),
    ("series,value\na,1\na,\n", [], r"in.csv: line 3, column 'value': empty or missing value"),
    ("series,value\na,1\n", ["--columns", "price"], r"in.csv: no column 'price'; the header is \['series', 'value'\]"),
    ("series,value\na,1\n", ["--device", "nonsense"], r"--device nonsense"),
])
def test_bad_input_is_one_line_naming_the_file_and_no_output(tmp_path, capsys, text, argv, match):
    (tmp_path / "in.csv").write_text(text)
    out = tmp_path / "out.csv"
    rc, stdout, err = _run(capsys, "fit", tmp_path / "in.csv", "-k", 1, "--out", out, *argv)
    assert rc == 1 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("torchgmm: error: ") and "Traceback" not in err
    assert re.search(match, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]  # no output, no temporary file


def test_unreadable_and_unknown_files(tmp_path, capsys):
    for name, match in [("nope.csv", "nope.csv: cannot read the file"), ("x.xlsx", "x.xlsx: unknown file type")]:
        rc, _, err = _run(capsys, "fit", tmp_path / name)
        assert rc == 1 and match in err and err.count("\n") == 1
    src = _write_long_csv(tmp_path / "in.csv", {"a": [1.0, 2.0]})
    rc, _, err = _run(capsys, "fit", src, "--out", tmp_path / "o.xlsx")
    assert rc == 1 and "unknown output type '.xlsx'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    src = _write_long_csv(tmp_path / "in.csv", {"a": [1.0, 2.0, 3.0]})
    rc, _, err = _run(capsys, "fit", src, "--device", "cuda")
    assert rc == 1 and err.count("\n") == 1 and "--device cuda: CUDA is not available" in err


def test_unexpected_failures_are_one_line_too(tmp_path, capsys, monkeypatch):
    src = _write_long_csv(tmp_path / "in.csv", {"a": [1.0, 2.0, 3.0]})

    def broken(*args, **kwargs):
        raise RuntimeError("something deep\nbroke")

    monkeypatch.setattr(torchgmm.GaussianMixture, "fit", broken)
    rc, _, err = _run(capsys, "fit", src, "-k", 1, "--out", tmp_path / "o.csv")
    assert rc == 1 and err.splitlines()[-1] == f"torchgmm: error: {src}: RuntimeError: something deep broke"
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize("text, expected", [("3", 3), ("1-5", [1, 2, 3, 4, 5]), ("1,2,4", [1, 2, 4]),
                                            ("4,1-2", [1, 2, 4]), ("2-2", 2)])
def test_parse_k(text, expected):
    assert parse_k(text) == expected


@pytest.mark.parametrize("text", ["abc", "0", "3-1", "1-", ""])
def test_parse_k_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_k(text)


def test_usage_errors_are_one_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "x.csv", "-k", "abc"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "'abc' is not a K" in err


def test_help_describes_every_option_with_its_default():
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    assert set(subparsers) == {"demo", "fit", "plot", "regimes", "predict"}
    for name, sub in subparsers.items():
        text = sub.format_help()
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            assert action.option_strings[-1] in text
        n_options = sum(1 for a in sub._actions if a.option_strings and a.dest != "help")
        assert " ".join(text.split()).count("(default:") == n_options, name


def test_config_file_gives_options_and_the_command_line_overrides_it(tmp_path, capsys):
    src = _write_long_csv(tmp_path / "in.csv", _two_series())
    config = tmp_path / "c.yaml"
    config.write_text("n_components: 2\ncovariance-type: spherical\nn_init: 1\nmax_iter: 20\nquiet: true\n")
    rc, stdout, err = _run(capsys, "fit", src, "--config", config)
    assert rc == 0 and err == "" and {r["n_components"] for r in _rows(stdout)} == {"2"}
    rc, stdout, _ = _run(capsys, "fit", src, "--config", config, "-k", "1")
    assert {r["n_components"] for r in _rows(stdout)} == {"1"}
    config.write_text("n_components: 2\nbogus: 1\n")
    rc, _, err = _run(capsys, "fit", src, "--config", config)
    assert rc == 1 and "c.yaml: unknown option 'bogus'" in err and err.count("\n") == 1
    config.write_text("k: [1, 2\n")
    rc, _, err = _run(capsys, "fit", src, "--config", config)
    assert rc == 1 and "c.yaml: invalid YAML" in err and err.count("\n") == 1


def test_progress_lines_when_stderr_is_a_terminal(tmp_path, capsys, monkeypatch):
    src = _write_long_csv(tmp_path / "in.csv", {"a": np.linspace(0, 1, 20)})
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    rc, _, err = _run(capsys, "fit", src, "-k", 1)
    assert rc == 0 and "fitting 1 series (K=1" in err and "fitted in " in err


def test_k_range_chooses_k_per_series(tmp_path, capsys):
    rng = np.random.default_rng(3)
    series = {"one": rng.normal(0, 1, 200), "two": np.concatenate([rng.normal(-8, 1, 100), rng.normal(8, 1, 100)])}
    src = _write_long_csv(tmp_path / "in.csv", series)
    rc, stdout, err = _run(capsys, "fit", src, "-k", "1-3", *FAST)
    assert rc == 0, err
    rows = _rows(stdout)
    chosen = {r["series"]: int(r["n_components"]) for r in rows}
    assert chosen == {"one": 1, "two": 2}
    assert sum(r["series"] == "two" for r in rows) == 2  # components of weight 0 are omitted


def test_save_then_predict_labels_every_point(tmp_path, capsys):
    series = _two_series()
    src, model = _write_long_csv(tmp_path / "in.csv", series), tmp_path / "m.pt"
    rc, _, err = _run(capsys, "fit", src, "-k", 2, *FAST, "--save", model, "--out", tmp_path / "fits.csv")
    assert rc == 0 and model.is_file(), err
    rc, stdout, err = _run(capsys, "predict", model, src)
    assert rc == 0, err
    rows = _rows(stdout)
    assert list(rows[0]) == ["series", "index", "component", "log_density"]
    assert len(rows) == sum(len(v) for v in series.values())
    gm = torchgmm.GaussianMixture(2, n_init=2, max_iter=30, random_state=0).fit(torch.tensor(series["b"]))
    labels = [int(r["component"]) for r in rows if r["series"] == "b"]
    assert labels == gm.predict(torch.tensor(series["b"])).tolist()
    assert [int(r["index"]) for r in rows if r["series"] == "b"] == list(range(len(series["b"])))
    other = _write_long_csv(tmp_path / "three.csv", {"a": [1.0], "b": [2.0], "c": [3.0]})
    rc, _, err = _run(capsys, "predict", model, other, "--quiet")
    assert rc == 1 and "3 series, but" in err and err.count("\n") == 1


def test_save_and_predict_fail_cleanly_without_a_model(tmp_path, capsys):
    src = _write_long_csv(tmp_path / "in.csv", {"a": [1.0, 2.0, 3.0]})
    rc, _, err = _run(capsys, "predict", tmp_path / "missing.pt", src)
    assert rc == 1 and "missing.pt" in err and err.count("\n") == 1


def test_no_arguments_runs_the_demo(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "demo", lambda n_series=1000: calls.append(n_series))
    assert main([]) == 0 and calls == [1000]
    assert main(["demo", "--n-series", "5"]) == 0 and calls == [1000, 5]


def test_demo_output_starts_as_the_readme_quotes_it(capsys):
    cli.demo(n_series=8)
    out = capsys.readouterr().out
    assert out.startswith("== The bundled series (50 points on which a hand-written NumPy EM failed; K=3, default k-means initialization)\n")
    assert "mean log-likelihood -2.1237 per point; status OK" in out


def test_python_dash_m_runs_without_a_traceback(tmp_path):
    (tmp_path / "in.csv").write_text("series,value\na,1\na,oops\n")
    proc = subprocess.run([sys.executable, "-m", "torchgmm", "fit", str(tmp_path / "in.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"torchgmm: error: {tmp_path / 'in.csv'}: line 3, column 'value': 'oops' is not a number\n"


def test_bundled_series_is_the_questions_series():
    x = seed_series()
    assert x.shape == (50,) and x.dtype == torch.float64
    assert int((x == 44.44571429).sum()) == 13  # the forward-filled value


def test_synthetic_series_follow_their_stated_parameters():
    data = synthetic_series(200, 2000, 3, seed=0, dtype=torch.float64)
    assert data.x.shape == (200, 2000, 1)
    torch.testing.assert_close(data.weights.sum(-1), torch.ones(200, dtype=torch.float64))
    # the pooled mean of each series matches the mixture mean within sampling error
    mixture_mean = (data.weights * data.means).sum(-1)
    assert float((data.x[..., 0].mean(-1) - mixture_mean).abs().max()) < 0.5


# -- regimes: a hidden Markov model per series ------------------------------------------------------
def _switching():
    """Two ragged series that switch level: a (-5 then 5 then -5), b (0 then 10)."""
    rng = np.random.default_rng(3)
    return {
        "a": np.concatenate([rng.normal(-5, 0.5, 30), rng.normal(5, 0.5, 25), rng.normal(-5, 0.5, 20)]),
        "b": np.concatenate([rng.normal(0, 0.5, 40), rng.normal(10, 0.5, 20)]),
    }


def test_regimes_are_the_viterbi_runs_of_each_series_alone(tmp_path, capsys):
    series = _switching()
    src = _write_long_csv(tmp_path / "in.csv", series)
    rc, stdout, err = _run(capsys, "regimes", src, "-k", 2, *FAST)
    assert rc == 0 and "2 fit(s), em" in err
    rows = _rows(stdout)
    runs = {name: [(int(r["first"]), int(r["last"])) for r in rows if r["series"] == name] for name in series}
    assert runs == {"a": [(0, 29), (30, 54), (55, 74)], "b": [(0, 39), (40, 59)]}  # the switches, exactly
    a = [r for r in rows if r["series"] == "a"]
    assert a[0]["state"] == a[2]["state"] != a[1]["state"]  # back to the first regime
    assert float(a[1]["level"]) == pytest.approx(series["a"][30:55].mean(), abs=1e-9)  # the run's own mean
    assert [int(r["n_points"]) for r in a] == [30, 25, 20] and all(r["status"] == "OK" for r in rows)
    # the ragged series b, padded in the file's batch, gives what b alone gives
    solo = torchgmm.GaussianHMM(2, n_init=2, max_iter=30, random_state=0).fit(torch.tensor(series["b"]))
    b = [r for r in rows if r["series"] == "b"]
    assert float(b[0]["log_likelihood"]) == pytest.approx(float(solo.lower_bound_), abs=1e-6)
    states = solo.predict(torch.tensor(series["b"])).tolist()
    assert [int(r["state"]) for r in b] == [states[0], states[-1]]
    for r in b:
        assert float(r["mean"]) == pytest.approx(float(solo.means_[int(r["state"]), 0]), abs=1e-6)


def test_regimes_points_give_each_points_state_and_its_posterior(tmp_path, capsys):
    src = _write_long_csv(tmp_path / "in.csv", _switching())
    rc, stdout, _ = _run(capsys, "regimes", src, "-k", 2, *FAST, "--points", "--out", tmp_path / "p.json")
    assert rc == 0 and stdout == ""
    records = json.loads((tmp_path / "p.json").read_text())
    assert len(records) == 75 + 60  # every point, none of the padding
    assert [r["index"] for r in records if r["series"] == "b"] == list(range(60))
    assert all(0.5 <= r["probability"] <= 1.0 for r in records)  # two states: the Viterbi state is the likelier here
    assert len({r["state"] for r in records if r["series"] == "a" and 30 <= r["index"] < 55}) == 1


@pytest.mark.parametrize("argv, match", [
    (["--nan-policy", "omit"], r"series 'a' has missing values inside it .* impute them"),
    (["--series", "a"], r"--series picks the series to draw: pass --plot FIG too"),
    (["--plot", "fig.gif"], r"unknown output type '.gif' for --plot"),
])
def test_regimes_refuses_what_a_hidden_markov_model_cannot_take(tmp_path, capsys, argv, match):
    src = tmp_path / "in.csv"
    src.write_text("series,value\na,1\na,\na,3\na,4\nb,2\nb,5\n")
    rc, stdout, err = _run(capsys, "regimes", src, "-k", 2, *FAST, "--quiet", *argv)
    assert rc == 1 and stdout == "" and err.count("\n") == 1 and re.search(match, err), err


def test_regimes_chooses_the_number_of_states_per_series(tmp_path, capsys):
    rng = np.random.default_rng(5)
    levels = {"one": [0.0], "two": [0.0, 6.0], "three": [0.0, 6.0, -6.0, 0.0]}  # regimes in turn, 40 steps each
    series = {name: np.concatenate([rng.normal(m, 0.7, 40) for m in means]) for name, means in levels.items()}
    src = _write_long_csv(tmp_path / "in.csv", series)
    rc, stdout, err = _run(capsys, "regimes", src, "-k", "1-4", "--n-init", "3", "--save", tmp_path / "m.pt")
    assert rc == 0 and "chosen by bic: K=1 for 1, K=2 for 1, K=3 for 1" in err
    rows = _rows(stdout)
    chosen = {r["series"]: int(r["n_states"]) for r in rows}
    assert chosen == {"one": 1, "two": 2, "three": 3}
    assert [(int(r["first"]), int(r["last"])) for r in rows if r["series"] == "three"] == [(0, 39), (40, 79), (80, 119), (120, 159)]
    # each series' bic is its chosen model's, as that K fitted alone gives it
    solo = torchgmm.GaussianHMM(2, n_init=3, random_state=0).fit(torch.tensor(series["two"]))
    two = [r for r in rows if r["series"] == "two"]
    assert float(two[0]["bic"]) == pytest.approx(float(solo.bic(torch.tensor(series["two"]))), rel=1e-6)
    # the saved batch holds every series' chosen model (smaller ones padded with unreachable states)
    rc, labelled, _ = _run(capsys, "predict", tmp_path / "m.pt", src, "--quiet")
    states = {}
    for r in _rows(labelled):
        states.setdefault(r["series"], set()).add(int(r["state"]))
    assert {name: len(s) for name, s in states.items()} == {"one": 1, "two": 2, "three": 3}


def test_a_saved_regimes_model_labels_new_data_as_points_do(tmp_path, capsys):
    src = _write_long_csv(tmp_path / "in.csv", _switching())
    rc, points, _ = _run(capsys, "regimes", src, "-k", 2, *FAST, "--points", "--save", tmp_path / "m.pt", "--quiet")
    assert rc == 0 and (tmp_path / "m.pt").is_file()
    rc, labelled, _ = _run(capsys, "predict", tmp_path / "m.pt", src, "--quiet")
    assert rc == 0 and labelled == points  # the same states and posteriors, row for row
    rc, _, err = _run(capsys, "predict", tmp_path / "m.pt", _write_long_csv(tmp_path / "three.csv", {
        "a": [1.0, 2.0], "b": [3.0, 4.0], "c": [5.0, 6.0]}), "--quiet")
    assert rc == 1 and "3 series, but" in err and "holds 2 fitted series" in err
