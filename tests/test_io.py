"""Reading files of series (long, wide, arrays; CSV, Parquet, npy/npz) and writing tables."""

import csv
import json
import sys

import numpy as np
import pytest
import torch

from torchgmm.io import DataError, atomic_path, read_series, write_table


def _write(path, text):
    path.write_text(text)
    return path


def test_long_csv_ragged_series_are_padded_with_zero_weight(tmp_path):
    src = _write(tmp_path / "in.csv", "series,t,value\nb,0,1.5\nb,1,2.5\na,0,-1\nb,2,3.5\n")
    data = read_series(src)
    assert data.layout == "long" and data.names == ["b", "a"]  # order of first appearance
    assert data.x.shape == (2, 3, 1) and data.x.dtype == torch.float64
    torch.testing.assert_close(data.x[0, :, 0], torch.tensor([1.5, 2.5, 3.5], dtype=torch.float64))
    torch.testing.assert_close(data.sample_weight, torch.tensor([[1.0, 1, 1], [1, 0, 0]], dtype=torch.float64))
    assert data.lengths.tolist() == [3, 1]
    assert "long format" in data.describe() and "2 series, 4 points" in data.describe()


def test_long_csv_with_several_feature_columns(tmp_path):
    src = _write(tmp_path / "in.csv", "time,series,x,y\n0,a,1,2\n1,a,3,4\n0,b,5,6\n")
    data = read_series(src)  # every column but the series and time columns is a feature
    assert data.columns == ["x", "y"] and data.x.shape == (2, 2, 2)
    assert data.x[1, 0].tolist() == [5.0, 6.0]
    only_y = read_series(src, columns=["y"])
    assert only_y.x.shape == (2, 2, 1)


def test_wide_csv_is_one_series_per_column_never_one_multivariate_series(tmp_path):
    src = _write(tmp_path / "wide.csv", "t,x,y,z\n0,1,2,3\n1,4,5,6\n2,7,,9\n3,10,,\n")
    data = read_series(src)
    assert data.layout == "wide" and data.names == ["x", "y", "z"]
    assert data.x.shape == (3, 4, 1)
    assert data.lengths.tolist() == [4, 2, 3]  # trailing empty cells are padding
    assert read_series(src, wide=True).names == ["x", "y", "z"]


def test_a_value_column_without_series_column_is_one_series(tmp_path):
    from importlib import resources

    with resources.as_file(resources.files("torchgmm").joinpath("data/seed_series.csv")) as path:
        data = read_series(path)
    assert data.names == ["seed_series"] and data.x.shape == (1, 50, 1) and data.layout == "long"


def test_missing_values_are_an_error_or_omitted(tmp_path):
    src = _write(tmp_path / "in.csv", "series,value\na,1\na,\na,NaN\na,4\n")
    with pytest.raises(DataError, match=r"in.csv: line 3, column 'value': empty or missing"):
        read_series(src)
    data = read_series(src, nan_policy="omit")
    assert data.sample_weight.tolist() == [[1.0, 0.0, 0.0, 1.0]] and data.n_missing == 2
    assert torch.isfinite(data.x).all()
    wide = _write(tmp_path / "w.csv", "x,y\n1,2\n,3\n4,\n")
    with pytest.raises(DataError, match=r"line 3, column 'x'"):
        read_series(wide)  # an interior empty cell is missing, a trailing one is padding
    assert read_series(wide, nan_policy="omit").sample_weight.tolist() == [[1, 0, 1], [1, 1, 0]]


@pytest.mark.parametrize("text, match", [
    ("series,value\na,1\na,abc\n", r"bad.csv: line 3, column 'value': 'abc' is not a number"),
    ("series,value\na,1\na,inf\n", r"bad.csv: line 3, column 'value': inf is not a finite number"),
    ("series,value\na,1,2\n", r"bad.csv: line 2: 3 cell\(s\), but the header has 2 column"),
    ("", r"bad.csv: the file is empty"),
    ("series,value\n", r"bad.csv: no data rows"),
    ("series,value\n,1\n", r"bad.csv: line 2, column 'series': empty series id"),
    ("name,price\na,1\n", r"bad.csv: line 2, column 'name': 'a' is not a number \(read as a wide file"),
    ("a,a\n1,2\n", r"bad.csv: column 'a' appears twice"),
])
def test_bad_csv_cells_are_named_by_line_and_column(tmp_path, text, match):
    src = _write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError, match=match) as info:
        read_series(src)
    assert "\n" not in str(info.value)


def test_missing_column_names_the_header(tmp_path):
    src = _write(tmp_path / "in.csv", "series,value\na,1\n")
    with pytest.raises(DataError, match=r"no column 'price'; the header is \['series', 'value'\]"):
        read_series(src, columns=["price"])
    with pytest.raises(DataError, match=r"no column 'id'"):
        read_series(src, series_column="id")


def test_unknown_extension_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"x.xlsx: unknown file type '.xlsx'"):
        read_series(tmp_path / "x.xlsx")
    with pytest.raises(DataError, match=r"nope.csv: cannot read the file"):
        read_series(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"junk.npy: not a readable .npy file"):
        read_series(_write(tmp_path / "junk.npy", "not numpy"))
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81\x00")
    with pytest.raises(DataError, match=r"bin.csv: not a text CSV file"):
        read_series(tmp_path / "bin.csv")


def test_npy_rows_are_series_and_3d_arrays_are_batches(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "b.npy", rng.normal(size=(3, 20)))
    data = read_series(tmp_path / "b.npy")
    assert data.x.shape == (3, 20, 1) and data.names == ["0", "1", "2"] and data.layout == "array"
    np.save(tmp_path / "one.npy", rng.normal(size=7))
    assert read_series(tmp_path / "one.npy").x.shape == (1, 7, 1)
    ragged = rng.normal(size=(2, 5, 2))
    ragged[1, 3:] = np.nan  # NaN padding of a shorter series
    np.save(tmp_path / "r.npy", ragged)
    with pytest.raises(DataError, match=r"r.npy: series 1, point 3: NaN"):
        read_series(tmp_path / "r.npy")
    data = read_series(tmp_path / "r.npy", nan_policy="omit")
    assert data.x.shape == (2, 5, 2) and data.lengths.tolist() == [5, 3] and data.columns == ["x0", "x1"]
    np.save(tmp_path / "four.npy", np.zeros((1, 2, 3, 4)))
    with pytest.raises(DataError, match=r"shape \(1, 2, 3, 4\); expected"):
        read_series(tmp_path / "four.npy")


def test_npz_with_names_and_sample_weight(tmp_path):
    x = np.arange(12.0).reshape(2, 6)
    w = np.ones((2, 6))
    w[0, 4:] = 0
    np.savez(tmp_path / "d.npz", X=x, sample_weight=w, names=np.array(["u", "v"]))
    data = read_series(tmp_path / "d.npz")
    assert data.names == ["u", "v"] and data.lengths.tolist() == [4, 6]
    np.savez(tmp_path / "two.npz", a=x, b=x)
    with pytest.raises(DataError, match=r"holds the arrays \['a', 'b'\]"):
        read_series(tmp_path / "two.npz")


def test_parquet_reads_like_the_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"series": [7, 7, 8], "value": [1.0, None, 3.0]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet: row 2, column 'value': empty or missing"):
        read_series(tmp_path / "d.parquet")
    data = read_series(tmp_path / "d.parquet", nan_policy="omit")
    assert data.names == ["7", "8"] and data.sample_weight.tolist() == [[1, 0], [1, 0]]
    _write(tmp_path / "fake.parquet", "series,value\n")
    with pytest.raises(DataError, match=r"fake.parquet: not a readable Parquet file"):
        read_series(tmp_path / "fake.parquet")


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"torchgmm\[parquet\]"):
        read_series(tmp_path / "d.parquet")
    with pytest.raises(ImportError, match=r"torchgmm\[parquet\]"):
        write_table(tmp_path / "o.parquet", {"a": [1]})
    assert not (tmp_path / "o.parquet").exists()


def test_write_table_formats_round_trip(tmp_path):
    table = {"series": ["a", "b"], "k": [0, 1], "bic": [1.5, float("nan")], "flag": [True, False]}
    write_table(tmp_path / "o.csv", table)
    rows = list(csv.DictReader(open(tmp_path / "o.csv")))
    assert rows[0] == {"series": "a", "k": "0", "bic": "1.5", "flag": "True"}
    write_table(tmp_path / "o.json", table)
    records = json.loads((tmp_path / "o.json").read_text())
    assert records[1] == {"series": "b", "k": 1, "bic": None, "flag": False}  # NaN -> null: valid JSON
    write_table(tmp_path / "o.tsv", table)
    assert (tmp_path / "o.tsv").read_text().splitlines()[0] == "series\tk\tbic\tflag"
    with pytest.raises(DataError, match=r"unknown output type '.xlsx'"):
        write_table(tmp_path / "o.xlsx", table)


def test_write_table_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    table = {"series": ["a", "b"], "k": [0, 1], "bic": [1.5, float("nan")], "flag": [True, False]}
    write_table(tmp_path / "o.parquet", table)
    back = pq.read_table(tmp_path / "o.parquet").to_pydict()
    assert back["series"] == ["a", "b"] and back["k"] == [0, 1] and back["flag"] == [True, False]


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]
