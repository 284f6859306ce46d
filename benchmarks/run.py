"""Benchmark torchgmm against scikit-learn and peer libraries in one run.

    python benchmarks/run.py configs/bench_w1.yaml [--quick] [--device cpu|cuda] [--threads N]
                             [--out benchmarks/results/NAME.json] [--markdown FILE]

Every (workload, method, dtype) cell runs in a fresh worker process (this file with --worker), so a
peer that crashes, hangs (timeout) or is missing only costs its own row, and peak memory is that
process's alone. See benchmarks/README.md for the columns.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import importlib.util
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.special import logsumexp

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # benchmarks/ and the repo root (torchgmm without install)

import peers  # noqa: E402
import workloads  # noqa: E402

EXPANDED = ("covariance_type", "init_params")  # workload keys that may be lists: one row group per value
TORCH_METHODS = ("torchgmm", "gmm_gpu", "pomegranate")  # these follow --device; the others run on the CPU


# ---------------------------------------------------------------------------------------------
# the one quality evaluator


def mean_loglik(X: np.ndarray, weights, means, covs) -> np.ndarray:
    """Mean log-likelihood per sample of each dataset, float64: logsumexp over components of
    log w_k + log N(x | mu_k, Sigma_k). X (B, N, D), weights (B, K), means (B, K, D),
    covs (B, K, D, D). NaN for a dataset whose parameters are non-finite or not positive definite."""
    X, w, mu, S = (np.asarray(a, dtype=np.float64) for a in (X, weights, means, covs))
    B, N, D = X.shape
    ok = np.isfinite(w).all(1) & np.isfinite(mu).all((1, 2)) & np.isfinite(S).all((1, 2, 3))
    S = np.where(ok[:, None, None, None], S, np.eye(D))
    ok &= (np.linalg.eigvalsh(S).min(-1) > 0).all(1)
    S = np.where(ok[:, None, None, None], S, np.eye(D))
    mu = np.where(ok[:, None, None], mu, 0.0)
    Linv = np.linalg.inv(np.linalg.cholesky(S))                        # (B, K, D, D)
    logdet = -np.log(np.diagonal(Linv, axis1=-2, axis2=-1)).sum(-1)    # 0.5 log|Sigma|
    with np.errstate(divide="ignore"):
        logw = np.log(np.where(ok[:, None], w, 1.0))
    lp = np.empty((B, w.shape[1], N))
    for k in range(w.shape[1]):
        z = np.einsum("bde,bne->bnd", Linv[:, k], X - mu[:, k, None])
        lp[:, k] = logw[:, k, None] - 0.5 * (D * np.log(2 * np.pi) + (z**2).sum(-1)) - logdet[:, k, None]
    ll = logsumexp(lp, axis=1).mean(-1)
    return np.where(ok & np.isfinite(ll), ll, np.nan)


def min_variance(covs: np.ndarray) -> np.ndarray:
    """Smallest component variance (eigenvalue) per dataset, for the collapse test."""
    c = np.nan_to_num(np.asarray(covs, dtype=np.float64), nan=0.0)
    return np.linalg.eigvalsh(c).min((-2, -1))


# ---------------------------------------------------------------------------------------------
# worker: one (workload, method, dtype) cell in its own process


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: resets VmHWM (peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(spec: dict) -> dict:
    p, m = spec["params"], spec["method"]
    X = workloads.make(spec["kind"], p)[: spec["n_series"]]
    task = peers.Task(K=p["K"], covariance_type=p["covariance_type"], n_init=p["n_init"],
                      max_iter=p["max_iter"], tol=p["tol"], reg_covar=p["reg_covar"],
                      init_params=p["init_params"], seed=p["seed"], dtype=spec["dtype"],
                      device=spec["device"], seed_per_series=p["seed_per_series"],
                      options=spec.get("options"))
    fit = peers.ADAPTERS[m].fit
    task.device = spec["device"] if m in TORCH_METHODS else "cpu"
    cuda = task.device.startswith("cuda")
    if cuda:
        import torch
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        hwm_reset, base = reset_peak_rss(), rss_mb("VmRSS")
    first = fit(X, task).seconds if p["warmup"] else None  # includes any JIT compilation
    outs = [fit(X, task) for _ in range(p["repeats"])]
    if cuda:
        mem, mem_kind = (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda"
    else:
        mem, mem_kind = rss_mb("VmHWM") - base, "rss" if hwm_reset else "rss*"
    o = outs[-1]
    return dict(seconds=[r.seconds for r in outs], first_seconds=first, ll=mean_loglik(X, o.weights, o.means, o.covariances).tolist(),
                min_var=min_variance(o.covariances).tolist(), mem_mb=mem, mem_kind=mem_kind)


# ---------------------------------------------------------------------------------------------
# config -> cells


def variants(cfg: dict, quick: bool):
    """Yield (label, kind, params) for every workload entry and every value of a list-valued key."""
    for entry in cfg["workloads"]:
        kind = entry["workload"]
        p = {**workloads.COMMON, **workloads.DEFAULTS[kind], **entry}
        if quick:
            p["B"] = max(1 if p["B"] == 1 else 10, p["B"] // 10)
            if "N" in p:
                p["N"] = max(50, p["N"] // 10)
            p["repeats"] = 1
        lists = [k for k in EXPANDED if isinstance(p[k], list)]
        for values in itertools.product(*(p[k] for k in lists)):
            q = {**p, **dict(zip(lists, values))}
            label = " ".join([kind.upper(), f"B={q['B']}"] + [str(v) for v in values])
            yield label, kind, q


def cells(cfg: dict, quick: bool, threads: int | None = None):
    """Yield one dict per (workload variant, method, dtype): the row, with `skip` set when it cannot run."""
    for label, kind, p in variants(cfg, quick):
        for name, mcfg in cfg["methods"].items():
            mcfg = mcfg or {}
            if not mcfg.get("enabled", True) or name not in p.get("methods", [name]):
                continue
            a = peers.ADAPTERS[name]
            dtypes = mcfg.get("dtype", a.dtypes[0])
            options = mcfg.get("variants", [None])  # torchgmm only: one row per dict of extra settings
            for dtype, opts in itertools.product(dtypes if isinstance(dtypes, list) else [dtypes], options):
                task = peers.Task(K=p["K"], covariance_type=p["covariance_type"],
                                  init_params=p["init_params"], dtype=dtype)
                if importlib.util.find_spec(a.module) is None:
                    skip = f"not installed (import {a.module} failed)"
                else:
                    skip = peers.unsupported(name, task)
                yield dict(label=label, kind=kind, params=p, method=name, dtype=dtype, options=opts,
                           n=min(p["B"], mcfg.get("max_series", p["B"])), threads=threads or mcfg.get("threads"),
                           **({"skip": skip} if skip else {}))


def run_cell(cell: dict, device: str, timeout: float) -> dict:
    """Run one cell in a fresh worker; `threads` caps OpenMP/BLAS threads (torch, numpy, scikit-learn)."""
    spec = dict(kind=cell["kind"], params=cell["params"], method=cell["method"], dtype=cell["dtype"],
                n_series=cell["n"], device=device)
    if cell.get("options"):
        spec["options"] = cell["options"]
    env = dict(os.environ)
    if cell["threads"]:
        env.update({v: str(cell["threads"]) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.json"
        path.write_text(json.dumps(spec))
        try:
            r = subprocess.run([sys.executable, __file__, "--worker", str(path)], capture_output=True,
                               text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return dict(skip=f"timed out after {timeout} s")
        out = Path(d) / "out.json"
        if r.returncode != 0 or not out.exists():
            lines = [s for s in (r.stderr or r.stdout).strip().splitlines() if s.strip()]
            return dict(skip=f"failed (rc={r.returncode}): {lines[-1][:160] if lines else 'no output'}")
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# machine line, table, output


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes spent busy, CPU seconds of our finished workers): their difference
    over a cell is what other processes took from the machine while it was timed."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), r.ru_utime + r.ru_stime


def machine(device: str) -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), load=" ".join(f"{x:.1f}" for x in os.getloadavg()),
                python=platform.python_version())
    for pkg in ("torch", "numpy", "scikit-learn", "pomegranate", "gmm-gpu", "gmmx", "jax"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    info["device"] = "cpu"
    if device.startswith("cuda"):
        import torch
        info["device"] = f"{device} ({torch.cuda.get_device_name()})"
    return info


def summarize(rows: list[dict]) -> None:
    """Add per-series time, ratio and ll difference vs scikit-learn (on the series both fitted)."""
    ref = {r["label"]: r for r in rows if r["method"] == "sklearn" and "seconds" in r}
    for r in rows:
        if "seconds" not in r:
            continue
        ll = np.array(r["ll"], dtype=float)
        p, sk = r["params"], ref.get(r["label"])
        k = min(len(ll), len(sk["ll"])) if sk else len(ll)  # the series compared with scikit-learn
        r["s_per_series"] = float(np.median(r["seconds"])) / r["n"]
        r["mean_ll"], r["mean_ll_all"] = (float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")
                                          for a in (ll[:k], ll))
        r["failed"] = int((~np.isfinite(ll)).sum())
        if sk is not None:
            r["vs_sklearn"] = sk["s_per_series"] / r["s_per_series"]
            if r.get("first_seconds"):  # the first fit of a fresh process, everything included (compilation)
                r["first_vs_sklearn"] = sk["s_per_series"] / (r["first_seconds"] / r["n"])
            d = ll[:k] - np.array(sk["ll"], dtype=float)[:k]
            r["dll_vs_sklearn"] = float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")
        notes = []
        collapsed = np.array(r["min_var"]) <= 10 * p["reg_covar"]
        if r["kind"] == "seed":
            hit = ~collapsed & (ll >= p["best_ll"] - p["best_tol"])
            notes.append(f"best {hit.mean():.0%}, collapsed {collapsed.mean():.0%}")
        elif collapsed.any():
            notes.append(f"{collapsed.sum()} series collapsed")
        if r["failed"]:
            notes.append(f"{r['failed']} series NaN/non-PD")
        first = r.get("first_seconds")
        if first is not None and first > 2 * np.median(r["seconds"]) + 0.5:
            notes.append(f"first call {first:.3g} s (JIT compile)")
        if r["other_load"] > 0.25:
            notes.append(f"busy: other processes used {r['other_load']:.1f} cores")
        r["note"] = "; ".join(notes)


HEAD = ["workload", "method", "dtype", "series", "s/series", "vs sklearn", "1st call vs sk", "mean ll", "Δll vs sk",
        "peak MB", "note"]


def fmt_rows(rows: list[dict]) -> list[list[str]]:
    def f(v, spec):
        return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)
    out = []
    for r in rows:
        method = r["method"] + (f" ({r['threads']} thr)" if r.get("threads") else "")
        method += "".join(f" {k}={v}" for k, v in (r.get("options") or {}).items())
        if "seconds" not in r:
            out.append([r["label"], method, r["dtype"], "", "", "", "", "", "", "", "skipped: " + r["skip"]])
            continue
        out.append([r["label"], method, r["dtype"], str(r["n"]), f(r["s_per_series"], ".3g"),
                    f(r.get("vs_sklearn"), ".2f") + ("x" if "vs_sklearn" in r else ""),
                    f(r.get("first_vs_sklearn"), ".2f") + ("x" if "first_vs_sklearn" in r else ""),
                    f(r["mean_ll"], ".4f"), f(r.get("dll_vs_sklearn"), "+.1e"),
                    f(r["mem_mb"], ".0f") + ("" if r["mem_kind"] == "rss" else " " + r["mem_kind"]),
                    r.get("note", "")])
    return out


def footnotes(info: dict) -> list[str]:
    return [
        "s/series: median over `repeats` timed fits (after one warm-up fit) of the fit time divided by the "
        "series timed; fit only (data already converted/on device; CUDA synchronized). A method with fewer "
        "series than B timed a subsample (the first `max_series`).",
        "1st call vs sk: the same ratio for the worker's first fit (a fresh process: imports done, any JIT "
        "compilation and cache warm-up included).",
        "vs sklearn: scikit-learn s/series / method s/series (>1 = faster). Methods use all cores unless "
        "marked '(n thr)' (OpenMP/BLAS threads capped by the config's `threads`). torchgmm key=value: its "
        "settings for that row (compile=True: torch.compile'd E-step/statistics and k-means steps; default "
        "'auto' compiles only when the work bound outweighs a cold compile; prune_after=n: after n EM "
        "iterations only each series' best restart goes on).",
        "mean ll: mean log-likelihood per sample from the returned parameters, one float64 evaluator for all "
        "methods, averaged over the series scikit-learn also fitted (all series: mean_ll_all in the JSON); "
        "Δll vs sk: method minus scikit-learn on those series (NaN fits excluded, counted in note).",
        "peak MB: growth of the worker process's peak RSS (VmHWM, reset just before the warm-up; includes the "
        "method's copy of the input and JIT caches); 'cuda' = torch.cuda.max_memory_allocated growth; "
        "'rss*' = VmHWM could not be reset (lifetime peak).",
        "note: SEED share of seeds reaching the best non-degenerate optimum / share collapsed "
        "(a component variance <= 10*reg_covar; other workloads: count of such series, whose higher ll is "
        "degenerate); series whose parameters were NaN or not positive definite; 'first call': the warm-up fit's time when it was much longer than the median (JIT compilation; torch's on-disk cache makes later processes faster); 'busy' = CPU time other processes took while the cell ran (timings then inflated).",
    ]


def machine_line(info: dict) -> str:
    vers = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("cpu", "cores", "load", "device", "busy"))
    return (f"machine: {info['cpu']}, {info['cores']} cores (load avg {info['load']} at start"
            + (f"; {info['busy']}" if "busy" in info else "") + "), "
            f"device {info['device']}; {vers}")


def render_text(table: list[list[str]]) -> str:
    w = [max(len(r[i]) for r in [HEAD] + table) for i in range(len(HEAD))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i < 3 or i == len(HEAD) - 1 else c.rjust(w[i])  # noqa: E731
                               for i, c in enumerate(r)).rstrip()
    return "\n".join([line(HEAD), "  ".join("-" * x for x in w)] + [line(r) for r in table])


def render_markdown(info: dict, table: list[list[str]]) -> str:
    rows = [HEAD, ["---"] * len(HEAD)] + table
    body = "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
    notes = "\n".join(f"{i + 1}. {n}" for i, n in enumerate(footnotes(info)))
    return f"{machine_line(info)}\n\n{body}\n\n{notes}\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?")
    ap.add_argument("--quick", action="store_true", help="shrink every workload (B/10, N/10, 1 repeat)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] for the torch-based methods")
    ap.add_argument("--threads", type=int, help="cap OpenMP/BLAS threads of every method (busy machines)")
    ap.add_argument("--busy", type=int, default=0,
                    help="run this many busy-loop processes beside every cell (a competing load)")
    ap.add_argument("--out", help="JSON results (default benchmarks/results/<config>[-quick].json)")
    ap.add_argument("--markdown", help="also write the table as markdown to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        (Path(args.worker).parent / "out.json").write_text(json.dumps(worker(spec)))
        return
    if not args.config:
        ap.error("a config file is required")

    import yaml
    cfg = yaml.safe_load(Path(args.config).read_text())
    info = machine(args.device)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    if busy:
        info["busy"] = f"{args.busy} busy-loop process(es) beside every cell"
    print(machine_line(info), flush=True)
    rows = []
    try:
        run_cells(cfg, args, rows)
    finally:
        for p in busy:  # only the processes started here, by their handle
            p.kill()
            p.wait()
    finish(cfg, args, info, rows)


def run_cells(cfg: dict, args, rows: list) -> None:
    for row in cells(cfg, args.quick, args.threads):
        if "skip" not in row:
            print(f"  {row['label']}: {row['method']} {row['dtype']} on {row['n']} series ...", end=" ", flush=True)
            t0, busy0 = time.perf_counter(), cpu_seconds()
            res = run_cell(row, args.device, cfg.get("timeout_s", 1800))
            wall, busy1 = time.perf_counter() - t0, cpu_seconds()
            res["other_load"] = max(0.0, (busy1[0] - busy0[0]) - (busy1[1] - busy0[1])) / wall
            done = res["skip"] if "skip" in res else f"{np.median(res['seconds']):.3g} s/fit"
            print(f"{done} (worker {wall:.1f} s, other processes {res['other_load']:.1f} cores)", flush=True)
            row.update(res)
        rows.append(row)


def finish(cfg: dict, args, info: dict, rows: list) -> None:
    summarize(rows)
    table = fmt_rows(rows)
    print()
    print(machine_line(info))
    print(render_text(table))
    for i, n in enumerate(footnotes(info)):
        print(f"  [{i + 1}] {n}")

    stem = Path(args.config).stem + ("-quick" if args.quick else "")
    out = Path(args.out or HERE / "results" / f"{stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k not in ("ll", "min_var")} for r in rows]
    out.write_text(json.dumps(dict(machine=info, config=copy.deepcopy(cfg), quick=args.quick,
                                   device=args.device, rows=slim), indent=1))
    print(f"saved {out}")
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(info, table))
        print(f"saved {args.markdown}")


if __name__ == "__main__":
    main()
