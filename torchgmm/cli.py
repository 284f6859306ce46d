"""Command line: ``torchgmm demo`` (the default: the bundled data) and ``torchgmm fit FILE.csv``.

``fit`` reads a CSV in long form: an optional series column (``--series-column``, default
``series`` when present) and one or more feature columns (``--columns``, default ``value`` or every
other numeric column). Series of different lengths are padded and given zero weight. It writes one
row per series: status, iterations, mean log-likelihood and the fitted weights, means and
variances (univariate) or a JSON file with every parameter (multivariate).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import FitStatus, GaussianMixture
from .datasets import REPEATED_VALUE, seed_series, synthetic_series

__all__ = ["main"]


def _describe_univariate(gm: GaussianMixture, index=()) -> str:
    order = gm.means_[index][:, 0].argsort()
    rows = [
        f"    weight {float(gm.weights_[index][k]):.3f}  mean {float(gm.means_[index][k, 0]):8.4f}  "
        f"variance {float(gm.covariances_[index].reshape(-1)[k] if gm.covariance_type != 'tied' else gm.covariances_[index].reshape(-1)[0]):.4g}"
        for k in order.tolist()
    ]
    return "\n".join(rows)


def demo(n_series: int = 1000) -> None:
    """Fit the question's series, then a batch of synthetic series, and say what happened."""
    torch.manual_seed(0)
    x = seed_series()
    print("== The question's series (50 points, K=3, default k-means initialization)")
    gm = GaussianMixture(3, random_state=0, tol=1e-6).fit(x)
    print(_describe_univariate(gm))
    print(f"    mean log-likelihood {float(gm.lower_bound_):.4f} per point; status {FitStatus(int(gm.status_)).name}")

    print(f"\n== The same series from 100 random data points (one call, n_init=100)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rnd = GaussianMixture(3, init_params="random_from_data", n_init=100, random_state=0, tol=1e-6).fit(x)
    result = rnd.result_
    collapsed = result.restart_degenerate
    print(f"    {int(collapsed.sum())} of 100 restarts end with a component collapsed onto repeated values (such as "
          f"{REPEATED_VALUE}),\n    some reaching a 'better' likelihood of up to "
          f"{float(result.restart_lower_bounds[collapsed].max()):.2f} that is an artefact of reg_covar; "
          "each is flagged (result_.restart_degenerate).")
    print(f"    chosen: the best non-degenerate restart, mean log-likelihood {float(rnd.lower_bound_):.4f}, "
          f"status {FitStatus(int(rnd.status_)).name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = GaussianMixture(3, init_params="random_from_data", random_state=3, tol=1e-6).fit(x)
    print("    a single unlucky start, as the summary reports it:\n      " + single.summary().replace("\n", "\n      "))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prior = GaussianMixture(3, init_params="random_from_data", random_state=3, prior="default").fit(x)
    print(f"    the same start with prior='default' (MAP): status {FitStatus(int(prior.status_)).name}")
    print(_describe_univariate(prior))

    data = synthetic_series(n_series, 500, 3, seed=1)
    print(f"\n== {n_series} synthetic series x 500 points, K=3, n_init=10, float32: one call")
    gm = GaussianMixture(3, n_init=10, random_state=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(data.x)
    seconds = time.perf_counter() - start
    print(f"    {seconds:.2f} s ({1e3 * seconds / n_series:.2f} ms per series, compilation included)")
    print("    " + gm.summary().splitlines()[0])
    fitted = gm.means_[..., 0].sort(-1).values
    truth = data.means.sort(-1).values
    print(f"    median |fitted mean - true mean|: {float((fitted - truth).abs().median()):.3f} "
          f"(true standard deviations 0.5-2; a few overlapping mixtures are not identifiable)")
    print(f"    mean log-likelihood per point: {float(gm.lower_bound_.mean()):.4f}")


def _read_long_csv(path: Path, series_column, columns):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    header = list(rows[0])
    if series_column is None and "series" in header:
        series_column = "series"
    if columns is None:
        columns = ["value"] if "value" in header else [c for c in header if c not in (series_column, "t", "time", "index")]
    missing = [c for c in columns + ([series_column] if series_column else []) if c not in header]
    if missing:
        raise SystemExit(f"{path}: no column(s) {missing}; the header is {header}")
    keys = [r[series_column] for r in rows] if series_column else ["0"] * len(rows)
    names = list(dict.fromkeys(keys))
    values = np.array([[float(r[c]) for c in columns] for r in rows])
    index = {name: i for i, name in enumerate(names)}
    groups = [[] for _ in names]
    for key, value in zip(keys, values):
        groups[index[key]].append(value)
    n = max(len(g) for g in groups)
    x = np.zeros((len(names), n, len(columns)))
    w = np.zeros((len(names), n))
    for i, g in enumerate(groups):
        x[i, : len(g)] = g
        w[i, : len(g)] = 1.0
    return names, columns, torch.tensor(x), torch.tensor(w)


def fit_file(args) -> None:
    names, columns, x, w = _read_long_csv(Path(args.file), args.series_column, args.columns.split(",") if args.columns else None)
    gm = GaussianMixture(
        args.n_components, covariance_type=args.covariance_type, n_init=args.n_init, tol=args.tol,
        max_iter=args.max_iter, init_params=args.init_params, random_state=args.seed,
        prior="default" if args.prior else None, dtype=torch.float32 if args.float32 else None,
        device=args.device,
    )
    gm.fit(x, sample_weight=w)
    print(gm.summary(), file=sys.stderr)
    out = Path(args.out)
    if len(columns) == 1 and args.covariance_type != "tied" and out.suffix != ".json":
        k = args.n_components
        var = gm.covariances_.reshape(len(names), k, -1)[..., 0]
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["series", "status", "n_iter", "mean_log_likelihood"]
                            + [f"{p}_{j}" for p in ("weight", "mean", "variance") for j in range(k)])
            for i, name in enumerate(names):
                order = gm.means_[i, :, 0].argsort()
                writer.writerow([name, FitStatus(int(gm.status_[i])).name, int(gm.n_iter_[i]), float(gm.lower_bound_[i])]
                                + gm.weights_[i][order].tolist() + gm.means_[i, :, 0][order].tolist() + var[i][order].tolist())
    else:
        payload = [
            {"series": name, "status": FitStatus(int(gm.status_[i])).name, "n_iter": int(gm.n_iter_[i]),
             "mean_log_likelihood": float(gm.lower_bound_[i]), "weights": gm.weights_[i].tolist(),
             "means": gm.means_[i].tolist(), "covariances": gm.covariances_[i].tolist()}
            for i, name in enumerate(names)
        ]
        out.write_text(json.dumps({"columns": columns, "covariance_type": args.covariance_type, "fits": payload}, indent=1))
    print(f"wrote {len(names)} fit(s) to {out}", file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="torchgmm", description="Batched Gaussian mixtures in PyTorch.")
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="fit the bundled series and a synthetic batch (the default)")
    d.add_argument("--n-series", type=int, default=1000)
    f = sub.add_parser("fit", help="fit every series of a long-form CSV file")
    f.add_argument("file")
    f.add_argument("-k", "--n-components", type=int, default=3)
    f.add_argument("--covariance-type", default="full", choices=["full", "tied", "diag", "spherical"])
    f.add_argument("--n-init", type=int, default=10)
    f.add_argument("--tol", type=float, default=1e-3)
    f.add_argument("--max-iter", type=int, default=100)
    f.add_argument("--init-params", default="kmeans")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--prior", action="store_true", help="MAP with the default conjugate prior")
    f.add_argument("--float32", action="store_true")
    f.add_argument("--device", default=None)
    f.add_argument("--series-column", default=None)
    f.add_argument("--columns", default=None, help="comma-separated feature columns")
    f.add_argument("--out", default="torchgmm_fits.csv", help=".csv (univariate) or .json")
    args = parser.parse_args(argv)
    if args.command == "fit":
        fit_file(args)
    else:
        demo(getattr(args, "n_series", 1000))


if __name__ == "__main__":
    main()
