"""Files of series: read CSV / Parquet / ``.npy`` / ``.npz`` into a padded batch, write tables.

:func:`read_series` returns a :class:`SeriesData`: ``x (B, N, D)`` float64 with the series padded
to the longest one, ``sample_weight (B, N)`` (1 for a point, 0 for padding and omitted missing
values), the series names and the feature names. Layouts:

- **long**: one row per point, a series-id column (``series``, or ``series_column=``) and one value
  column (``value``) or several feature columns (``columns=``, default every other column but the
  time/index columns). Without a series column but with a ``value`` column (or with ``columns=``)
  the file is one series.
- **wide**: one column per (univariate) series, ``wide=True``, or detected when there is no series
  column, no ``value`` column and every column is numeric. Shorter series end in empty cells.
  A wide file is never read as one multi-dimensional series.
- **arrays**: ``.npy`` / ``.npz``: ``(N,)`` one series, ``(B, N)`` one univariate series per row,
  ``(B, N, D)``; NaN marks missing points / padding. An ``.npz`` holds ``X`` (or a single array)
  and optionally ``sample_weight`` and ``names``.

Columns named ``t``, ``time``, ``index``, ``timestamp``, ``date``, ``datetime`` (any case) or with
an empty name (a pandas index) are the time axis: never a feature, never a series. Points keep
the file's order. Every problem is a :class:`DataError` whose message is one line naming the
file, and the line (CSV) or row (Parquet) and column where it can.

:func:`write_table` writes a table (a dict of equally long columns) as CSV, TSV, Parquet or JSON
chosen by the extension, atomically (a temporary file renamed into place), or CSV to stdout.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .covariance import get_covariance

__all__ = [
    "DataError", "SeriesData", "read_series", "write_table", "atomic_path", "check_output_path",
    "full_covariances", "READ_SUFFIXES", "TABLE_SUFFIXES", "TIME_COLUMNS",
]

TIME_COLUMNS = ("t", "time", "index", "timestamp", "date", "datetime")
SERIES_COLUMN = "series"
VALUE_COLUMN = "value"
READ_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".npy", ".npz")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq", ".json")
_MISSING = {"", "nan", "na", "n/a", "null", "none"}
PARQUET_HINT = "pip install 'torchgmm[parquet]' (pyarrow)"


class DataError(ValueError):
    """A file that cannot be read (or written) as series; the message is one line naming the file."""


@dataclass
class SeriesData:
    """A batch of series read from a file (see the module docstring)."""

    x: torch.Tensor  # (B, N, D) float64, zeros where sample_weight is 0
    sample_weight: torch.Tensor  # (B, N) 1 = point, 0 = padding or omitted missing value
    names: list  # B series names (str)
    columns: list  # D feature names
    layout: str  # "long", "wide" or "array"
    path: str
    n_missing: int = 0  # missing values omitted (nan_policy="omit")
    detail: str = ""  # how the layout was chosen

    @property
    def n_series(self) -> int:
        return self.x.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Points per series, ``(B,)``."""
        return (self.sample_weight > 0).sum(-1)

    def describe(self) -> str:
        """One line: the layout used and how many series and points were read."""
        lengths = self.lengths
        n, b = int(lengths.sum()), self.n_series
        lo, hi = int(lengths.min()), int(lengths.max())
        per = "" if b == 1 else f" ({lo} per series)" if lo == hi else f" ({lo}-{hi} per series)"
        feats = ", ".join(self.columns[:6]) + (", ..." if len(self.columns) > 6 else "")
        text = (f"{self.path}: {self.layout} format{f' ({self.detail})' if self.detail else ''}: "
                f"{b} series, {n} points{per}, {len(self.columns)} feature(s): {feats}")
        if self.n_missing:
            text += f"; {self.n_missing} missing value(s) omitted"
        return text


# -- reading ------------------------------------------------------------------------------------


class _Column:
    """One column of a table: raw text cells (CSV) or numbers already typed (Parquet)."""

    def __init__(self, name: str, where: Callable[[int], str], cells: Optional[list] = None,
                 values: Optional[np.ndarray] = None, null: Optional[np.ndarray] = None):
        self.name, self.where = name, where
        self.cells, self.values, self.null = cells, values, null
        self._parsed = None

    def __len__(self) -> int:
        return len(self.cells) if self.cells is not None else len(self.values)

    def first_bad(self) -> Optional[tuple[int, str]]:
        """``(row, cell)`` of the first cell that is neither a number nor missing, else None."""
        if self.cells is None:
            return None
        for i, cell in enumerate(self.cells):
            c = cell.strip()
            if c.lower() in _MISSING:
                continue
            try:
                float(c)
            except ValueError:
                return i, cell
        return None

    def numeric(self, path) -> tuple[np.ndarray, np.ndarray]:
        """``(values, missing)``: float64 values (NaN where missing) and the missing mask."""
        if self._parsed is None:
            if self.cells is None:
                values, missing = self.values.astype(np.float64), self.null | np.isnan(self.values.astype(np.float64))
            else:
                stripped = [c.strip() for c in self.cells]
                missing = np.array([c.lower() in _MISSING for c in stripped], dtype=bool)
                try:
                    values = np.array([c if not m else "nan" for c, m in zip(stripped, missing)], dtype=np.float64)
                except ValueError:
                    row, cell = self.first_bad()
                    raise DataError(f"{path}: {self.where(row)}, column {self.name!r}: {cell!r} is not a number") from None
            values = np.where(missing, np.nan, values)
            inf = np.isinf(values)
            if inf.any():
                row = int(inf.argmax())
                raise DataError(f"{path}: {self.where(row)}, column {self.name!r}: {values[row]} is not a finite number")
            self._parsed = values, missing
        return self._parsed

    def labels(self, path) -> list:
        """The cells as series names (str); an empty id is an error."""
        if self.cells is not None:
            out = [c.strip() for c in self.cells]
        else:
            vals = self.values.tolist()
            out = ["" if n else (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
                   for v, n in zip(vals, self.null)]
        for i, name in enumerate(out):
            if name == "" or name.lower() == "nan":
                raise DataError(f"{path}: {self.where(i)}, column {self.name!r}: empty series id")
        return out


def _csv_columns(path: Path, delimiter: str) -> list:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty (expected a header line)")
            header = [h.strip() for h in header]
            width = len(header)
            cells: list = [[] for _ in header]
            lines: list = []
            for row in reader:
                if not row:
                    continue  # a blank line
                if len(row) != width:
                    raise DataError(f"{path}: line {reader.line_num}: {len(row)} cell(s), but the header "
                                    f"has {width} column(s) {header}")
                for j, cell in enumerate(row):
                    cells[j].append(cell)
                lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file (cannot decode it as UTF-8)") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a valid CSV file: {e}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from None
    if not lines:
        raise DataError(f"{path}: no data rows after the header {header}")
    _check_header(path, header)
    where = lambda i: f"line {lines[i]}"  # noqa: E731
    return [_Column(name, where, cells=c) for name, c in zip(header, cells)]


def _check_header(path, header: Sequence[str]) -> None:
    seen = set()
    for name in header:
        if name and name in seen:
            raise DataError(f"{path}: column {name!r} appears twice in the header {list(header)}")
        seen.add(name)


def _parquet_columns(path: Path) -> list:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow: {PARQUET_HINT}") from None
    try:
        table = pq.read_table(path)
    except OSError as e:  # FileNotFoundError, and pyarrow's ArrowIOError
        raise DataError(f"{path}: cannot read the file: {getattr(e, 'strerror', None) or e}") from None
    except Exception as e:  # pyarrow.ArrowInvalid and friends: not a Parquet file
        raise DataError(f"{path}: not a readable Parquet file: {str(e).splitlines()[0]}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows (columns {table.column_names})")
    _check_header(path, table.column_names)
    where = lambda i: f"row {i + 1}"  # noqa: E731
    columns = []
    for name in table.column_names:
        col = table.column(name)
        null = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(col.type):
            values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
            columns.append(_Column(name, where, values=np.where(null, np.nan, values), null=null))
        else:
            cells = ["" if v is None else str(v) for v in col.to_pylist()]
            columns.append(_Column(name, where, cells=cells))
    return columns


def _is_time(name: str) -> bool:
    return name == "" or name.lower() in TIME_COLUMNS


def _missing_error(path, column: _Column, row: int) -> DataError:
    return DataError(f"{path}: {column.where(row)}, column {column.name!r}: empty or missing value "
                     "(--nan-policy omit skips missing values)")


def _table_series(path, columns: list, *, series_column, feature_columns, wide, nan_policy) -> SeriesData:
    by_name = {c.name: c for c in columns}
    header = [c.name for c in columns]

    def need(name):
        if name not in by_name:
            raise DataError(f"{path}: no column {name!r}; the header is {header}")
        return by_name[name]

    detected = False
    if wide is None:
        if series_column is not None or feature_columns is not None:
            wide = False
        elif SERIES_COLUMN in by_name or VALUE_COLUMN in by_name:
            wide = False
        else:
            wide = True  # every column must then be numeric: checked below, with a hint
            detected = True
    if wide:
        if series_column is not None:
            raise DataError(f"{path}: a wide file (one column per series) has no series column; "
                            f"drop --wide or --series-column")
        names = feature_columns if feature_columns is not None else [c for c in header if not _is_time(c)]
        if not names:
            raise DataError(f"{path}: no series columns (only time/index columns) in the header {header}")
        cols = [need(n) for n in names]
        if detected:
            for c in cols:
                bad = c.first_bad()
                if bad is not None:
                    row, cell = bad
                    raise DataError(
                        f"{path}: {c.where(row)}, column {c.name!r}: {cell!r} is not a number (read as a wide "
                        f"file, one column per series, since there is no {SERIES_COLUMN!r} or {VALUE_COLUMN!r} "
                        "column; name the series column with --series-column)")
        return _wide(path, cols, nan_policy, detail="--wide" if not detected else
                     f"one column per series; no {SERIES_COLUMN!r} or {VALUE_COLUMN!r} column")

    sid = None
    if series_column is not None:
        sid = need(series_column)
    elif SERIES_COLUMN in by_name:
        sid = by_name[SERIES_COLUMN]
    if feature_columns is None:
        if VALUE_COLUMN in by_name:
            feature_columns = [VALUE_COLUMN]
        else:
            feature_columns = [c for c in header if not _is_time(c) and (sid is None or c != sid.name)]
            if not feature_columns:
                raise DataError(f"{path}: no value column besides the series column; the header is {header}")
    feats = [need(n) for n in feature_columns]
    parsed = [f.numeric(path) for f in feats]
    values = np.stack([v for v, _ in parsed], -1)  # (rows, D)
    missing = np.stack([m for _, m in parsed], -1).any(-1)
    if missing.any() and nan_policy != "omit":
        row = int(missing.argmax())
        col = next(f for f, (_, m) in zip(feats, parsed) if m[row])
        raise _missing_error(path, col, row)
    if sid is None:
        names = [Path(path).stem]
        gid = np.zeros(len(values), dtype=np.int64)
        detail = f"no {SERIES_COLUMN!r} column: one series"
    else:
        index: dict = {}
        gid = np.array([index.setdefault(s, len(index)) for s in sid.labels(path)], dtype=np.int64)
        names = list(index)
        detail = f"series column {sid.name!r}"
    b = len(names)
    counts = np.bincount(gid, minlength=b)
    order = np.argsort(gid, kind="stable")
    pos = np.empty_like(gid)
    pos[order] = np.arange(len(gid)) - np.repeat(np.cumsum(counts) - counts, counts)
    x = np.zeros((b, int(counts.max()), len(feats)))
    w = np.zeros((b, int(counts.max())))
    x[gid, pos] = np.where(missing[:, None], 0.0, values)
    w[gid, pos] = (~missing).astype(np.float64)
    return SeriesData(torch.from_numpy(x), torch.from_numpy(w), names, list(feature_columns), "long", str(path),
                      int(missing.sum()), detail)


def _wide(path, cols: list, nan_policy: str, detail: str) -> SeriesData:
    n = len(cols[0])
    x = np.zeros((len(cols), n, 1))
    w = np.zeros((len(cols), n))
    n_missing = 0
    for i, c in enumerate(cols):
        values, missing = c.numeric(path)
        present = np.flatnonzero(~missing)
        end = int(present[-1]) + 1 if len(present) else 0  # trailing missing cells are padding
        interior = missing[:end]
        if interior.any():
            if nan_policy != "omit":
                raise _missing_error(path, c, int(interior.argmax()))
            n_missing += int(interior.sum())
        x[i, :end, 0] = np.where(interior, 0.0, values[:end])
        w[i, :end] = (~interior).astype(np.float64)
    return SeriesData(torch.from_numpy(x), torch.from_numpy(w), [c.name for c in cols], [VALUE_COLUMN], "wide",
                      str(path), n_missing, detail)


def _array_series(path: Path, suffix: str, nan_policy: str) -> SeriesData:
    weight = names = None
    try:
        loaded = np.load(path, allow_pickle=False)
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from None
    except (ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable {suffix} file: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if suffix == ".npz":
        with loaded:
            keys = list(loaded.keys())
            key = next((k for k in ("X", "x") if k in keys), None)
            if key is None:
                data_keys = [k for k in keys if k not in ("sample_weight", "names")]
                if len(data_keys) != 1:
                    raise DataError(f"{path}: holds the arrays {keys}; name the data 'X' (optionally with "
                                    "'sample_weight' and 'names')")
                key = data_keys[0]
            try:
                array = loaded[key]
                weight = loaded["sample_weight"] if "sample_weight" in keys else None
                names = loaded["names"] if "names" in keys else None
            except ValueError as e:
                raise DataError(f"{path}: array {key!r} cannot be read without pickle: {e}") from None
        where = f"array {key!r}"
    else:
        array, where = loaded, "the array"
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
        raise DataError(f"{path}: {where} has dtype {array.dtype}; expected real numbers")
    if array.ndim == 1:
        array = array[None, :, None]
    elif array.ndim == 2:
        array = array[:, :, None]  # one univariate series per row
    elif array.ndim != 3:
        raise DataError(f"{path}: {where} has shape {array.shape}; expected (N,), (B, N) (one series per row) "
                        "or (B, N, D)")
    if array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
        raise DataError(f"{path}: {where} has shape {array.shape}: no data")
    x = np.asarray(array, dtype=np.float64)
    if np.isinf(x).any():
        b, n, _ = np.argwhere(np.isinf(x))[0]
        raise DataError(f"{path}: series {b}, point {n}: a value is not finite")
    if weight is not None:
        weight = np.asarray(weight, dtype=np.float64)
        if weight.ndim == 1 and x.shape[0] == 1:
            weight = weight[None]
        if weight.shape != x.shape[:2] or not np.isfinite(weight).all() or (weight < 0).any():
            raise DataError(f"{path}: 'sample_weight' must be finite, non-negative, shape {x.shape[:2]}; "
                            f"got shape {weight.shape}")
    else:
        weight = np.ones(x.shape[:2])
    missing = np.isnan(x).any(-1) & (weight > 0)
    if missing.any() and nan_policy != "omit":
        b, n = np.argwhere(missing)[0]
        raise DataError(f"{path}: series {b}, point {n}: NaN (--nan-policy omit skips missing values and padding)")
    weight = np.where(np.isnan(x).any(-1), 0.0, weight)
    x = np.where(np.isnan(x), 0.0, x)
    if names is not None:
        names = [str(n) for n in np.asarray(names).reshape(-1).tolist()]
        if len(names) != x.shape[0]:
            raise DataError(f"{path}: 'names' has {len(names)} entries for {x.shape[0]} series")
    else:
        names = [str(i) for i in range(x.shape[0])]
    columns = [VALUE_COLUMN] if x.shape[2] == 1 else [f"x{j}" for j in range(x.shape[2])]
    return SeriesData(torch.from_numpy(x), torch.from_numpy(weight), names, columns, "array", str(path),
                      int(missing.sum()), f"shape {tuple(array.shape)}")


def read_series(path, *, series_column: Optional[str] = None, columns: Optional[Sequence[str]] = None,
                wide: Optional[bool] = None, nan_policy: str = "raise") -> SeriesData:
    """Read a file of series (CSV, TSV, Parquet, ``.npy``, ``.npz``) into a padded batch.

    ``series_column`` names the series-id column (default ``series`` when present); ``columns``
    the feature columns (long format) or the series columns (wide format); ``wide`` forces
    (True) or forbids (False) the wide layout, None detects it. ``nan_policy="omit"`` turns
    missing values (empty cells, NaN) into zero-weight points; ``"raise"`` makes them an error.
    Raises :class:`DataError` (one line naming the file) or ImportError (Parquet without pyarrow).
    """
    if nan_policy not in ("raise", "omit"):
        raise ValueError(f"nan_policy must be 'raise' or 'omit', got {nan_policy!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in READ_SUFFIXES:
        raise DataError(f"{path}: unknown file type {path.suffix or '(no extension)'!r}; expected one of "
                        f"{', '.join(READ_SUFFIXES)}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a file")
    if suffix in (".npy", ".npz"):
        if series_column is not None or columns is not None or wide:
            raise DataError(f"{path}: --series-column, --columns and --wide apply to tables (CSV, Parquet), "
                            "not to arrays")
        return _array_series(path, suffix, nan_policy)
    if suffix in (".parquet", ".pq"):
        table = _parquet_columns(path)
    else:
        table = _csv_columns(path, "\t" if suffix == ".tsv" else ",")
    return _table_series(path, table, series_column=series_column,
                         feature_columns=list(columns) if columns is not None else None, wide=wide,
                         nan_policy=nan_policy)


# -- writing ------------------------------------------------------------------------------------


def check_output_path(path, suffixes: Sequence[str] = TABLE_SUFFIXES, what: str = "--out") -> Path:
    """Validate an output path before any work: a known extension, an existing directory."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise DataError(f"{path}: unknown output type {path.suffix or '(no extension)'!r} for {what}; "
                        f"expected one of {', '.join(suffixes)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DataError(f"{path}: the directory {str(parent)!r} does not exist")
    if path.is_dir():
        raise DataError(f"{path}: is a directory")
    return path


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same extension); rename it into place on success,
    remove it on failure: a reader never sees a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _write_csv(f, table: dict, delimiter: str = ",") -> None:
    writer = csv.writer(f, delimiter=delimiter, lineterminator="\n")
    names = list(table)
    writer.writerow(names)
    writer.writerows(zip(*(table[n] for n in names)))


def write_table(path, table: dict) -> None:
    """Write ``table`` (column name -> list, all of one length) to ``path`` by its extension
    (.csv, .tsv, .parquet/.pq, .json: a list of records, non-finite numbers as null), atomically;
    ``path`` None or ``"-"`` writes CSV to stdout."""
    if path is None or str(path) == "-":
        _write_csv(sys.stdout, table)
        sys.stdout.flush()
        return
    path = check_output_path(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: writing Parquet needs pyarrow: {PARQUET_HINT}") from None
    with atomic_path(path) as tmp:
        if suffix in (".parquet", ".pq"):
            pq.write_table(pa.table(table), tmp)
        elif suffix == ".json":
            names = list(table)
            records = [{n: _json_value(v) for n, v in zip(names, row)} for row in zip(*(table[n] for n in names))]
            tmp.write_text(json.dumps(records, indent=1, allow_nan=False) + "\n")
        else:
            with open(tmp, "w", newline="") as f:
                _write_csv(f, table, "\t" if suffix == ".tsv" else ",")


# -- fitted parameters ---------------------------------------------------------------------------


def full_covariances(model) -> torch.Tensor:
    """A fitted model's covariances as full matrices ``(*B, K, D, D)``, whatever its type (the
    registry's ``full_covariance``)."""
    k, d = model.means_.shape[-2:]
    return get_covariance(model.covariance_type).full_covariance(model.precisions_cholesky_, k, d)
