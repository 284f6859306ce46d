"""The command line: files of ragged series in, one row of fitted parameters per series out."""

import csv

import numpy as np
import pytest
import torch

import torchgmm
from torchgmm.cli import main
from torchgmm.datasets import seed_series, synthetic_series


def _write_long_csv(path, series):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["series", "t", "value"])
        for name, values in series.items():
            for t, v in enumerate(values):
                writer.writerow([name, t, v])


def test_fit_file_fits_each_ragged_series_like_a_solo_fit(tmp_path):
    rng = np.random.default_rng(0)
    series = {
        "a": np.concatenate([rng.normal(-5, 1, 80), rng.normal(5, 1, 40)]),
        "b": np.concatenate([rng.normal(0, 0.5, 30), rng.normal(10, 2, 60)]),
    }
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    _write_long_csv(src, series)
    main(["fit", str(src), "-k", "2", "--n-init", "2", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert [r["series"] for r in rows] == ["a", "b"]
    for row, values in zip(rows, series.values()):
        solo = torchgmm.GaussianMixture(2, n_init=2, random_state=0).fit(torch.tensor(values))
        assert float(row["mean_log_likelihood"]) == pytest.approx(float(solo.lower_bound_), abs=1e-9)
        fitted = sorted([float(row["mean_0"]), float(row["mean_1"])])
        assert fitted == pytest.approx(sorted(solo.means_.ravel().tolist()), abs=1e-9)
        assert row["status"] == "OK"


def test_fit_file_names_a_missing_column(tmp_path):
    src = tmp_path / "in.csv"
    _write_long_csv(src, {"a": [1.0, 2.0, 3.0]})
    with pytest.raises(SystemExit, match="no column"):
        main(["fit", str(src), "--columns", "price", "--out", str(tmp_path / "o.csv")])


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
