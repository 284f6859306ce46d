"""The command line: ``torchgmm demo | fit | plot | regimes | predict`` (also ``python -m torchgmm``).

``torchgmm`` with no arguments runs the demo (the bundled series, then a synthetic batch).
``fit FILE`` reads a file of series (CSV, TSV, Parquet, ``.npy``, ``.npz``; layouts in
:mod:`torchgmm.io`), fits one mixture per series in one batched call and writes one row per series
and component (CSV to stdout, or ``--out`` .csv/.tsv/.parquet/.json); ``--save`` keeps the fitted
batch for ``predict MODEL FILE``. ``plot FILE --out fig.png`` fits, then draws. ``regimes FILE``
fits one hidden Markov model per series and writes its Viterbi regimes (runs of one state; ``--plot``
draws them). Options may come
from ``--config FILE.yaml`` (keys are the long option names); the command line overrides it.

Bad input is one line on stderr naming the file (and the line/row and column where it can) and
exit status 1; usage errors are argparse's (status 2). Outputs are written to a temporary file
renamed into place, so a failed run leaves no partial file. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from . import FitStatus, GaussianHMM, GaussianMixture
from .covariance import get_covariance
from .hmm import HMMParams, pad_states, regime_runs
from .init import INIT_METHODS
from .datasets import REPEATED_VALUE, seed_series, synthetic_series
from .io import (DataError, SeriesData, TABLE_SUFFIXES, atomic_path, check_output_path, full_covariances,
                 read_series, write_table)

__all__ = ["main", "build_parser", "parse_k", "fit_table", "regimes_table", "regime_runs", "demo"]

PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


class CliError(Exception):
    """A one-line error for the user (printed as ``torchgmm: error: ...``, exit status 1)."""


def _describe_univariate(gm: GaussianMixture, index=()) -> str:
    order = gm.means_[index][:, 0].argsort()
    variances = full_covariances(gm)[index][:, 0, 0]
    rows = [
        f"    weight {float(gm.weights_[index][k]):.3f}  mean {float(gm.means_[index][k, 0]):8.4f}  "
        f"variance {float(variances[k]):.4g}"
        for k in order.tolist()
    ]
    return "\n".join(rows)


def demo(n_series: int = 1000) -> None:
    """Fit the bundled series (50 points on which a hand-written NumPy EM failed), then a batch of synthetic series, and say what happened."""
    torch.manual_seed(0)
    x = seed_series()
    print("== The bundled series (50 points on which a hand-written NumPy EM failed; K=3, default k-means initialization)")
    gm = GaussianMixture(3, random_state=0, tol=1e-6).fit(x)
    print(_describe_univariate(gm))
    print(f"    mean log-likelihood {float(gm.lower_bound_):.4f} per point; status {FitStatus(int(gm.status_)).name}")

    print("\n== The same series from 100 random data points (one call, n_init=100)")
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

    print("\n== Regimes over time: a 3-state Gaussian HMM on the same series (when did it switch?)")
    hmm = GaussianHMM(3, n_init=10, random_state=0).fit(x)
    runs = [f"{first}-{last}: {float(x[first:last + 1].mean()):.2f}" for _, first, last in regime_runs(hmm.predict(x).tolist())]
    print(f"    mean log-likelihood {float(hmm.lower_bound_):.4f} per step (the mixture: {float(gm.lower_bound_):.4f} per point); "
          "Viterbi regimes as steps: level")
    print("    " + ", ".join(runs))

    data = synthetic_series(n_series, 500, 3, seed=1)
    print(f"\n== {n_series} synthetic series x 500 points, K=3, n_init=10, float32: one call")
    gm = GaussianMixture(3, n_init=10, random_state=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(data.x)
    seconds = time.perf_counter() - start
    print(f"    {seconds:.2f} s ({1e3 * seconds / n_series:.2f} ms per series; the first fit of this process, everything included)")
    print("    " + gm.summary().splitlines()[0])
    fitted = gm.means_[..., 0].sort(-1).values
    truth = data.means.sort(-1).values
    print(f"    median |fitted mean - true mean|: {float((fitted - truth).abs().median()):.3f} "
          f"(true standard deviations 0.5-2; a few overlapping mixtures are not identifiable)")
    print(f"    mean log-likelihood per point: {float(gm.lower_bound_.mean()):.4f}")


# -- options ------------------------------------------------------------------------------------


def parse_k(text) -> "int | list[int]":
    """``"3"`` -> 3; ``"1-5"`` -> [1, 2, 3, 4, 5]; ``"1,2,4"`` (ranges allowed in a list) -> [1, 2, 4]."""
    ks: list = []
    for part in str(text).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not a K (3), a range (1-5) or a list (1,2,4)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise argparse.ArgumentTypeError(f"{text!r}: the range {part} is empty")
        ks.extend(range(lo, hi + 1))
    if min(ks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: K must be at least 1")
    ks = sorted(set(ks))
    return ks[0] if len(ks) == 1 else ks


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low`` (``what`` says so in the error)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
        return value

    return parse


_positive_int = _int_at_least(1, "at least 1")
_non_negative_int = _int_at_least(0, "non-negative")


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
    return value


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; descriptions keep their line breaks."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and the pointer to --help), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_read_options(p) -> None:
    g = p.add_argument_group("reading the file")
    g.add_argument("--series-column", default=None, metavar="NAME",
                   help="series-id column of a long file; unset: 'series' when present")
    g.add_argument("--columns", default=None, metavar="A,B",
                   help="comma-separated feature columns (long) or series columns (wide); unset: 'value', "
                        "else every column but the series and time/index columns")
    g.add_argument("--wide", action="store_true",
                   help="one column per series (also detected: no 'series' or 'value' column and every "
                        "column numeric)")
    g.add_argument("--nan-policy", default="raise", choices=["raise", "omit"],
                   help="missing values (empty cells, NaN): an error, or points skipped")


def _add_fit_options(p, states: bool = False) -> None:
    """The fitting options; ``states``: those of a hidden Markov model (K: the number of states;
    EM or gradient)."""
    g = p.add_argument_group("fitting")
    g.add_argument("-k", "--n-components", type=parse_k, default=3, metavar="K",
                   help=f"{'hidden states (regimes)' if states else 'components'}: a K (3), a range (1-5) or a list "
                        "(1,2,4); several: the best per series by --criterion")
    g.add_argument("--criterion", default="bic", choices=["bic", "aic"], help="how K is chosen from several")
    g.add_argument("--covariance-type", default="full", choices=["full", "tied", "diag", "spherical"],
                   help=f"covariance of the {'states' if states else 'components'} (the same for univariate data)")
    g.add_argument("--n-init", type=_positive_int, default=10, help="restarts per series (the best is kept)")
    g.add_argument("--max-iter", type=_non_negative_int, default=100, help="EM iterations at most")
    g.add_argument("--tol", type=_positive_float, default=1e-3,
                   help="convergence: change of the mean log-likelihood per point")
    g.add_argument("--reg-covar", type=float, default=1e-6, help="added to the covariance diagonals")
    g.add_argument("--init-params", default="kmeans",
                   choices=list(INIT_METHODS), help="initialization")
    g.add_argument("--method", default="em", choices=["em", "gradient"] if states else ["em", "squarem", "gradient"],
                   help="fitting method")
    g.add_argument("--prior", default="none", choices=["none", "default"],
                   help="'default': MAP estimation with the conjugate prior (no collapsed components)")
    g.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same CPU result)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="precision of the fit")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="torchgmm", formatter_class=_Formatter,
        description="Batched Gaussian mixtures in PyTorch: one mixture (or hidden Markov model) per series of a file, in one call.\n"
                    "Without a command: the demo. Details: docs/cli.md.")
    parser.add_argument("--version", action="version", version=f"torchgmm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,fit,plot,regimes,predict}", parser_class=_Parser)

    d = sub.add_parser("demo", formatter_class=_Formatter, help="fit the bundled series and a synthetic batch (the default)",
                       description="Fit the bundled series (torchgmm/data/seed_series.csv) and a batch of synthetic series.")
    d.add_argument("--n-series", type=_positive_int, default=1000, help="synthetic series in the batch")

    f = sub.add_parser(
        "fit", formatter_class=_Formatter, help="fit one mixture per series of a file",
        description="Fit one Gaussian mixture per series of FILE and write one row per series and component.",
        epilog="examples:\n  torchgmm fit series.csv -k 3 --out fits.csv\n"
               "  torchgmm fit wide.csv --wide -k 1-4 --criterion bic --save model.pt\n"
               "  torchgmm fit data.parquet --series-column id --columns x,y --covariance-type diag")
    f.add_argument("file", metavar="FILE", help="CSV, TSV, Parquet, .npy or .npz")
    _add_read_options(f)
    _add_fit_options(f)
    g = f.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="FILE",
                   help="parameters table: .csv, .tsv, .parquet or .json; unset: CSV on stdout")
    g.add_argument("--save", default=None, metavar="MODEL", help="save the fitted batch (for `torchgmm predict`)")
    _add_common(f)

    p = sub.add_parser(
        "plot", formatter_class=_Formatter, help="fit, then draw a series (or a grid of the first 16)",
        description="Fit FILE as `torchgmm fit` does, then draw one series (--series) or a grid of the first 16.",
        epilog="example:\n  torchgmm plot series.csv --series a --out a.png")
    p.add_argument("file", metavar="FILE", help="CSV, TSV, Parquet, .npy or .npz")
    g = p.add_argument_group("drawing")
    g.add_argument("--out", required=True, metavar="FIG", help="image file: .png, .pdf, .svg or .jpg")
    g.add_argument("--series", default=None, metavar="ID",
                   help="series name (or 0-based position) to draw; unset: a grid of the first 16")
    g.add_argument("--kind", default="auto", choices=["auto", "time"],
                   help="auto: histogram (1-D) or scatter (2-D) with the fitted density; time: the series "
                        "coloured by component")
    g.add_argument("--dpi", type=_positive_int, default=100, help="resolution of raster images")
    _add_read_options(p)
    _add_fit_options(p)
    _add_common(p)

    h = sub.add_parser(
        "regimes", formatter_class=_Formatter, help="when did each series switch: a hidden Markov model per series",
        description="Fit one Gaussian hidden Markov model per series of FILE (the points in the file's order "
                    "are its time steps) and write its regimes: the Viterbi path as runs of one state, one row "
                    "per run (--points: one row per point).",
        epilog="examples:\n  torchgmm regimes series.csv -k 3 --out runs.csv\n"
               "  torchgmm regimes series.csv -k 2 --points --plot regimes.png --series a")
    h.add_argument("file", metavar="FILE", help="CSV, TSV, Parquet, .npy or .npz")
    _add_read_options(h)
    _add_fit_options(h, states=True)
    g = h.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="FILE",
                   help="regimes table: .csv, .tsv, .parquet or .json; unset: CSV on stdout")
    g.add_argument("--points", action="store_true",
                   help="one row per point (its state and that state's posterior probability), not per run")
    g.add_argument("--save", default=None, metavar="MODEL",
                   help="save the fitted batch (for `torchgmm predict`: the states of new data)")
    g.add_argument("--plot", default=None, metavar="FIG",
                   help="also draw the series over time, coloured by state: .png, .pdf, .svg or .jpg")
    g.add_argument("--series", default=None, metavar="ID",
                   help="with --plot: the series name (or 0-based position) to draw; unset: a grid of the first 16")
    g.add_argument("--dpi", type=_positive_int, default=100, help="resolution of raster images")
    _add_common(h)

    r = sub.add_parser(
        "predict", formatter_class=_Formatter, help="label every point with a saved model",
        description="Load MODEL (saved by `torchgmm fit --save` or `torchgmm regimes --save`) and write, per "
                    "point of FILE, its series, index in the series and most likely component and log-density "
                    "(a mixture) or Viterbi state and its posterior probability (a hidden Markov model). Series "
                    "are matched by position (the model's series i is the file's series i).")
    r.add_argument("model", metavar="MODEL", help="a model saved by `torchgmm fit --save` or `regimes --save`")
    r.add_argument("file", metavar="FILE", help="CSV, TSV, Parquet, .npy or .npz")
    _add_read_options(r)
    g = r.add_argument_group("output")
    g.add_argument("--out", default=None, metavar="FILE",
                   help="labels table: .csv, .tsv, .parquet or .json; unset: CSV on stdout")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    _add_common(r)
    return parser


def _add_common(p) -> None:
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="options from a YAML file (keys: the long option names); the command line overrides it")
    p.add_argument("-q", "--quiet", action="store_true", help="nothing on stderr but errors")


# -- --config -------------------------------------------------------------------------------------


def _config_tokens(path: str, subparser: argparse.ArgumentParser) -> list:
    """The options of a YAML file as command-line tokens (placed before the real ones, which win)."""
    try:
        import yaml
    except ImportError:
        raise CliError(f"{path}: --config needs PyYAML: pip install pyyaml") from None
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as e:
        raise CliError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise CliError(f"{path}: invalid YAML: {where}{getattr(e, 'problem', None) or e}") from None
    if config is None:
        return []
    if not isinstance(config, dict):
        raise CliError(f"{path}: the config must be a mapping of option names to values, got {type(config).__name__}")
    options = {}
    for action in subparser._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        for s in action.option_strings:
            options[s.lstrip("-").replace("_", "-")] = (s, action)
    tokens = []
    for key, value in config.items():
        name = str(key).replace("_", "-")
        if name not in options:
            known = sorted({a.option_strings[-1].lstrip("-") for _, a in options.values()})
            raise CliError(f"{path}: unknown option {key!r} for `torchgmm {subparser.prog.split()[-1]}`; "
                           f"known: {', '.join(known)}")
        flag, action = options[name]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise CliError(f"{path}: option {key!r} is a switch: true or false, got {value!r}")
            if value:
                tokens.append(flag)
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif value is None:
            continue
        tokens.append(f"{action.option_strings[-1]}={value}")
    return tokens


def _parse(argv: list) -> argparse.Namespace:
    parser = build_parser()
    if argv and argv[0] in ("fit", "plot", "predict"):
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(argv[1:])
        if known.config is not None:
            subparser = parser._subparsers._group_actions[0].choices[argv[0]]
            argv = [argv[0], *_config_tokens(known.config, subparser), *argv[1:]]
    return parser.parse_args(argv)


# -- running ----------------------------------------------------------------------------------


def _log(args):
    if getattr(args, "quiet", False):
        return lambda msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def _check_device(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise CliError(f"--device {spec}: {str(e).splitlines()[0]}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise CliError(f"--device {spec}: CUDA is not available (torch {torch.__version__}, {build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {spec}: MPS is not available; use --device cpu")
    return device


def _make_model(args) -> GaussianMixture:
    kwargs = dict(
        covariance_type=args.covariance_type, n_init=args.n_init, max_iter=args.max_iter, tol=args.tol,
        reg_covar=args.reg_covar, init_params=args.init_params, method=args.method,
        prior=None if args.prior == "none" else args.prior, random_state=args.seed,
        nan_policy=args.nan_policy, device=args.device,
        dtype=torch.float32 if args.dtype == "float32" else torch.float64,
    )
    k = args.n_components
    if isinstance(k, list):  # model selection: each series' best K by the criterion
        kwargs["criterion"] = args.criterion
    return GaussianMixture(k, **kwargs)


def _fit(args, data: SeriesData, log) -> GaussianMixture:
    gm = _make_model(args)
    progress = not args.quiet and sys.stderr.isatty()
    k = args.n_components
    ks = f"K in {k}" if isinstance(k, list) else f"K={k}"
    if progress:
        log(f"fitting {data.n_series} series ({ks}, {args.covariance_type}, n_init={args.n_init}, "
            f"{args.method}) on {args.device} ...")
    start = time.perf_counter()
    _fit_logged(lambda: gm.fit(data.x, sample_weight=data.sample_weight), gm, data, log)
    if progress:
        log(f"fitted in {time.perf_counter() - start:.2f} s")
    return gm


def _fit_logged(fit, model, data: SeriesData, log, prefix: str = "") -> None:
    """``fit()``, its warnings relayed (see :func:`_relay_warnings`), then the model's summary
    (after ``prefix``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit()
    _relay_warnings(caught, log)
    log(prefix + model.summary(names=data.names))


def _relay_warnings(caught, log) -> None:
    """The fit's own warnings repeat its summary (printed anyway); others become one line each."""
    from .result import FitWarning

    seen = set()
    for w in caught:
        if issubclass(w.category, FitWarning):
            continue
        text = " ".join(str(w.message).split())
        if text not in seen:
            seen.add(text)
            log(f"torchgmm: warning: {w.category.__name__}: {text}")


def _cpu_list(t: torch.Tensor) -> list:
    return t.detach().cpu().tolist()


def fit_table(gm: GaussianMixture, data: SeriesData) -> dict:
    """One row per series and component (components of weight exactly 0 omitted):
    series, component, weight, mean (mean_<j>), variance (cov_<i>_<j>), n_components, status,
    log_likelihood (mean per point, ``model.score``), bic (``model.bic``), n_points, n_iter, degenerate."""
    b = data.n_series
    x = data.x.to(device=gm.loc.device, dtype=gm.loc.dtype)
    w = data.sample_weight.to(device=x.device, dtype=x.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = _cpu_list(gm.score(x, sample_weight=w).reshape(b))
        bic = _cpu_list(gm.bic(x, sample_weight=w).reshape(b))
    weights = gm.weights_.reshape(b, -1)
    k, d = gm.means_.shape[-2:]
    means = gm.means_.reshape(b, k, d)
    cov = full_covariances(gm).reshape(b, k, d, d)
    n_comp = getattr(gm, "n_components_", None)
    n_comp = _cpu_list(n_comp.reshape(b)) if isinstance(n_comp, torch.Tensor) else [int(gm.n_components)] * b
    result = getattr(gm, "result_", None)
    degenerate = result.degenerate_components.reshape(b, k) if result is not None else torch.zeros(b, k, dtype=torch.bool)
    status = [FitStatus(int(s)).name for s in _cpu_list(gm.status_.reshape(b))]
    n_iter = _cpu_list(gm.n_iter_.reshape(b))
    n_points = _cpu_list(data.lengths)
    weights_l, means_l, cov_l, deg_l = _cpu_list(weights), _cpu_list(means), _cpu_list(cov), _cpu_list(degenerate)

    names = ["series", "component", "weight"]
    names += ["mean"] if d == 1 else [f"mean_{j}" for j in range(d)]
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    names += ["variance"] if d == 1 else [f"cov_{i}_{j}" for i, j in pairs]
    names += ["n_components", "status", "log_likelihood", "bic", "n_points", "n_iter", "degenerate"]
    table = {n: [] for n in names}
    for s in range(b):
        for c in range(k):
            if weights_l[s][c] == 0.0:
                continue  # padding of a model chosen with fewer components
            row = [data.names[s], c, weights_l[s][c], *means_l[s][c], *(cov_l[s][c][i][j] for i, j in pairs),
                   n_comp[s], status[s], score[s], bic[s], n_points[s], n_iter[s], bool(deg_l[s][c])]
            for n, v in zip(names, row):
                table[n].append(v)
    return table


def _save_model(gm: "GaussianMixture | GaussianHMM", path: Path) -> None:
    if not hasattr(gm, "save"):
        raise CliError(f"{path}: --save needs GaussianMixture.save, which this version of torchgmm does not have")
    with atomic_path(path) as tmp:
        gm.save(tmp)
        if not tmp.exists():
            raise CliError(f"{path}: the model was not written")


def _read(args, log) -> SeriesData:
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    data = read_series(args.file, series_column=args.series_column, columns=columns,
                       wide=True if args.wide else None, nan_policy=args.nan_policy)
    log(data.describe())
    return data


def cmd_fit(args) -> int:
    log = _log(args)
    out = check_output_path(args.out, TABLE_SUFFIXES) if args.out is not None and args.out != "-" else None
    save = check_output_path(args.save, (), "--save") if args.save else None
    if save is not None and not hasattr(GaussianMixture, "save"):
        raise CliError(f"{save}: --save needs GaussianMixture.save, which this version of torchgmm does not have")
    _check_device(args.device)
    _make_model(args)  # option errors before reading the file
    data = _read(args, log)
    gm = _fit(args, data, log)
    _write_outputs(gm, fit_table(gm, data), data, out, save, log)
    return 0


def _write_outputs(model, table: dict, data: SeriesData, out: "Path | None", save: "Path | None", log) -> None:
    """The model to ``save`` (if given), then the table to ``out`` (None: CSV on stdout)."""
    if save is not None:
        _save_model(model, save)
        log(f"saved the model ({data.n_series} series) to {save}")
    write_table(out, table)
    if out is not None:
        log(f"wrote {len(table['series'])} rows ({data.n_series} series) to {out}")


def _save_figure(fig, path: Path, dpi: int, log) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lower().lstrip(".").replace("jpg", "jpeg"), dpi=dpi)
    log(f"wrote {path}")


def _resolve_series(spec, data: SeriesData) -> "int | None":
    if spec is None:
        return None
    if spec in data.names:
        return data.names.index(spec)
    if re.fullmatch(r"\d+", spec) and int(spec) < data.n_series:
        return int(spec)
    shown = ", ".join(data.names[:10]) + (", ..." if data.n_series > 10 else "")
    raise CliError(f"{data.path}: no series {spec!r}; the series are {shown}")


def cmd_plot(args) -> int:
    log = _log(args)
    from . import plot as plot_module

    plot_module.require_matplotlib()
    out = check_output_path(args.out, PLOT_SUFFIXES, "--out")
    _check_device(args.device)
    _make_model(args)
    data = _read(args, log)
    index = _resolve_series(args.series, data)
    gm = _fit(args, data, log)
    fig = plot_module.plot(gm, data.x, series=index, kind=args.kind, sample_weight=data.sample_weight,
                           names=data.names)
    _save_figure(fig, out, args.dpi, log)
    return 0


def _lengths_of(data: SeriesData) -> torch.Tensor:
    """Each series' number of time steps ``(B,)``: its points must come first, padding only at the
    end (a hidden Markov model's steps are consecutive: a point skipped inside a series is refused)."""
    valid = data.sample_weight > 0  # (B, N)
    lengths = valid.sum(-1)
    inside = valid != (torch.arange(valid.shape[-1]) < lengths.unsqueeze(-1))
    if bool(inside.any()):
        b = int(inside.any(-1).nonzero()[0])
        raise CliError(f"{data.path}: series {data.names[b]!r} has missing values inside it (--nan-policy omit); "
                       "a hidden Markov model needs consecutive time steps: impute them, or cut the series there")
    return lengths


def regimes_table(hmm: GaussianHMM, data: SeriesData, lengths: torch.Tensor, points: bool = False,
                  x: "torch.Tensor | None" = None, per_series: "dict | None" = None) -> dict:
    """The Viterbi regimes of every series: one row per run (series, run, state, first, last,
    n_points, the state's mean (mean_<j>) and the run's own mean of the data (level, level_<j>),
    status, log_likelihood per step, then the columns of ``per_series`` (name -> one value per
    series)) or, with ``points``, per point (series, index, state, probability: the smoothed
    posterior of that state). ``x``: the data as the model takes them (default: ``data.x`` on the
    model's device and dtype)."""
    b, d = data.n_series, data.x.shape[-1]
    x = data.x.to(device=hmm.loc.device, dtype=hmm.loc.dtype) if x is None else x
    lens = lengths.to(x.device)
    path = hmm.predict(x, lens).reshape(b, -1).cpu()
    if points:
        gamma = hmm.predict_proba(x, lens).reshape(b, path.shape[-1], -1).cpu()
        keep = path >= 0
        prob = gamma.gather(-1, path.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        series_idx, point_idx = keep.nonzero(as_tuple=True)
        return {"series": [data.names[i] for i in series_idx.tolist()], "index": point_idx.tolist(),
                "state": path[keep].tolist(), "probability": prob[keep].tolist()}
    means = _cpu_list(hmm.means_.reshape(b, -1, d))
    status = [FitStatus(int(s)).name for s in _cpu_list(hmm.status_.reshape(b))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = _cpu_list(hmm.score(x, lens).reshape(b))
    values = data.x.to(torch.float64).cpu()
    suffixes = [""] if d == 1 else [f"_{j}" for j in range(d)]
    per_series = per_series or {}
    names = ["series", "run", "state", "first", "last", "n_points", *(f"mean{s}" for s in suffixes),
             *(f"level{s}" for s in suffixes), "status", "log_likelihood", *per_series]
    table = {n: [] for n in names}
    for i in range(b):
        for r, (state, first, last) in enumerate(regime_runs(path[i].tolist())):
            level = values[i, first:last + 1].mean(0).tolist()
            row = [data.names[i], r, state, first, last, last - first + 1, *means[i][state], *level, status[i], score[i],
                   *(column[i] for column in per_series.values())]
            for n, v in zip(names, row):
                table[n].append(v)
    return table


def choose_states(models: dict, x: torch.Tensor, lengths: torch.Tensor, criterion: str) -> tuple:
    """Each series' best number of states: ``models`` maps K to a ``GaussianHMM`` fitted to the
    whole batch ``x (B, T, D)``; the lowest ``criterion`` (``"bic"`` or ``"aic"``) among the fits
    that did not fail and have at most as many states as the series has points (the smallest K
    where none qualifies). Returns ``(model, chosen K (B,), criterion (B,))``, the model being
    every series' best one as one ``GaussianHMM`` of the largest K (the smaller models padded with
    states never reached: :func:`torchgmm.hmm.pad_states`), with their status, iterations and
    lower bounds."""
    ks = sorted(models)
    if len(ks) == 1:  # nothing to choose: the fitted model itself, with its fit record
        model = models[ks[0]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            crit = getattr(model, criterion)(x, lengths)
        return model, torch.full_like(crit, ks[0], dtype=torch.long), crit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        crit = torch.stack([getattr(models[k], criterion)(x, lengths) for k in ks])  # (C, B)
    # a model that failed, or has more states than the series has points, is no candidate
    status = torch.stack([models[k].status_.reshape(-1) for k in ks])  # (C, B)
    usable = torch.isfinite(crit) & (status < FitStatus.DIVERGED)
    best = torch.where(usable, crit, torch.inf).argmin(0)  # (B,)
    rows = torch.arange(best.shape[0], device=best.device)

    def pick(tensors) -> torch.Tensor:
        return torch.stack(list(tensors))[best, rows]

    cov_type = models[ks[-1]].covariance_type
    params = [pad_states(models[k]._detached(), ks[-1], get_covariance(cov_type)) for k in ks]
    model = GaussianHMM(ks[-1], covariance_type=cov_type)
    model.set_params_(HMMParams(*(pick(ts) for ts in zip(*params))))
    for name in ("converged_", "n_iter_", "lower_bound_", "lower_bounds_", "status_"):
        setattr(model, name, pick(getattr(models[k], name) for k in ks))
    return model, torch.tensor(ks, device=best.device)[best], pick(crit)


def cmd_regimes(args) -> int:
    log = _log(args)
    out = check_output_path(args.out, TABLE_SUFFIXES) if args.out is not None and args.out != "-" else None
    fig_path = None
    if args.plot is not None:
        from . import plot as plot_module

        plot_module.require_matplotlib()
        fig_path = check_output_path(args.plot, PLOT_SUFFIXES, "--plot")
    if args.series is not None and fig_path is None:
        raise CliError("--series picks the series to draw: pass --plot FIG too")
    save = check_output_path(args.save, (), "--save") if args.save else None
    _check_device(args.device)
    ks = args.n_components if isinstance(args.n_components, list) else [args.n_components]
    models = {k: GaussianHMM(
        k, covariance_type=args.covariance_type, tol=args.tol, reg_covar=args.reg_covar, max_iter=args.max_iter,
        n_init=args.n_init, init_params=args.init_params, random_state=args.seed,
        prior=None if args.prior == "none" else args.prior, device=args.device, dtype=getattr(torch, args.dtype),
        method=args.method,
    ) for k in ks}
    data = _read(args, log)
    index = _resolve_series(args.series, data)
    lengths = _lengths_of(data)
    progress = not args.quiet and sys.stderr.isatty()
    for k, model in models.items():
        if progress:
            log(f"fitting {data.n_series} hidden Markov models (K={k}, {args.covariance_type}, "
                f"n_init={args.n_init}, {args.method}) on {args.device} ...")
        _fit_logged(lambda: model.fit(data.x, lengths), model, data, log, prefix=f"K={k}: " if len(ks) > 1 else "")
    x = data.x.to(device=models[ks[0]].loc.device, dtype=models[ks[0]].loc.dtype)
    lens = lengths.to(x.device)
    hmm, chosen, crit = choose_states(models, x, lens, args.criterion)
    if len(ks) > 1:
        counts = torch.bincount(chosen.cpu(), minlength=max(ks) + 1)
        log(f"chosen by {args.criterion}: " + ", ".join(f"K={k} for {int(counts[k])}" for k in ks if counts[k] > 0))
    per_series = {"n_states": _cpu_list(chosen), args.criterion: _cpu_list(crit)}
    _write_outputs(hmm, regimes_table(hmm, data, lengths, points=args.points, x=x, per_series=per_series), data,
                   out, save, log)
    if fig_path is not None:
        fig = plot_module.plot(hmm, data.x, series=index, kind="time", sample_weight=data.sample_weight,
                               names=data.names)
        _save_figure(fig, fig_path, args.dpi, log)
    return 0


def cmd_predict(args) -> int:
    import torchgmm

    log = _log(args)
    out = check_output_path(args.out, TABLE_SUFFIXES) if args.out is not None and args.out != "-" else None
    device = _check_device(args.device)
    load = getattr(torchgmm, "load", None)
    if load is None:
        raise CliError(f"{args.model}: predict needs torchgmm.load, which this version of torchgmm does not have")
    if not Path(args.model).is_file():
        raise CliError(f"{args.model}: no such model file")
    try:
        model = load(args.model)
    except Exception as e:
        raise CliError(f"{args.model}: cannot load the model: {' '.join(str(e).split()) or type(e).__name__}") from None
    model = model.to(device)
    data = _read(args, log)
    b_model = 1
    for s in model.batch_shape:
        b_model *= s
    if b_model not in (1, data.n_series):
        raise CliError(f"{data.path}: {data.n_series} series, but {args.model} holds {b_model} fitted series "
                       "(series are matched by position)")
    if data.x.shape[-1] != model.n_features_in_:
        raise CliError(f"{data.path}: {data.x.shape[-1]} feature(s) ({', '.join(data.columns)}), but "
                       f"{args.model} was fitted on {model.n_features_in_}")
    x = data.x.to(device=model.loc.device, dtype=model.loc.dtype)
    if b_model > 1 and len(model.batch_shape) != 1:
        x = x.reshape(*model.batch_shape, *x.shape[1:])
    if isinstance(model, GaussianHMM):  # the Viterbi state of every point, and its posterior
        lengths = _lengths_of(data).to(x.device)
        if b_model > 1 and len(model.batch_shape) != 1:
            lengths = lengths.reshape(model.batch_shape)
        table = regimes_table(model, data, lengths, points=True, x=x)
    else:
        labels = model.predict(x).reshape(data.n_series, -1)
        log_density = model.score_samples(x).reshape(data.n_series, -1)
        keep = (data.sample_weight > 0).cpu()
        series_idx, point_idx = keep.nonzero(as_tuple=True)
        table = {
            "series": [data.names[i] for i in series_idx.tolist()],
            "index": point_idx.tolist(),
            "component": labels.cpu()[keep].tolist(),
            "log_density": log_density.cpu()[keep].tolist(),
        }
    write_table(out, table)
    if out is not None:
        log(f"wrote {len(table['index'])} rows ({data.n_series} series) to {out}")
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
    except CliError as e:
        print(f"torchgmm: error: {_one_line(e)}", file=sys.stderr)
        return 1
    command = args.command or "demo"
    try:
        if command == "demo":
            demo(getattr(args, "n_series", 1000))
            return 0
        return {"fit": cmd_fit, "plot": cmd_plot, "regimes": cmd_regimes, "predict": cmd_predict}[command](args)
    except (CliError, DataError, ImportError) as e:
        print(f"torchgmm: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("torchgmm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `torchgmm fit ... | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as e:  # anything else: one line naming the input, never a traceback
        where = getattr(args, "file", None) or "torchgmm"
        print(f"torchgmm: error: {where}: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
