"""Benchmark: Simfluence fit and rollout speed against a dense normal-equations baseline.

Generates a synthetic experiment from a known linear simulator (defaults: n_train = 1000,
n_test = 1000, 20 fitting runs of 2000 steps, batch 4), fits every variant for all test
examples (first call: compilation included; warm: the median of --warm-calls further calls),
times a dense per-test-example solve on a few test examples (median per example) and scales it
to all of them, compares the solutions, and times the rollout of all test examples over 10 runs.
Prints the device, the ratio and the process peak memory.

    python scripts/bench_fit.py                    # the issue's default sizes (CPU: ~2-4 min)
    python scripts/bench_fit.py --n-train 10000    # 20 runs x 20000 steps, no dense baseline

With --cli the experiment is written to disk (run-log format, `simfluence demo-data`'s
generator) and the whole `simfluence fit` command line is timed in a subprocess, with its peak
resident memory (VmHWM, read by the CLI process at exit) against the size of the loss logs; the
strong baseline, a dense Cholesky per test example of the normal equations assembled from a
sparse design (scipy), is timed on --dense-tests test examples in the same run and scaled to all
of them:

    python scripts/bench_fit.py --cli              # issue 16 part 3: n = m = 1000, 20 x 2000, b 4
    python scripts/bench_fit.py --cli --n-train 10000 --steps 10000 --batch 8 --dense-tests 1

GPU: the same command; nothing here imports `datasets` or torch.

References:
    Guu et al. 2023, Simfluence. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from simfluence import demo_data
from simfluence import simulators as S

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_args import nonneg_float, nonneg_int, positive_int  # noqa: E402


def _peak_gb() -> float:
    # ru_maxrss is the peak resident set of this whole process (KiB on Linux, bytes on macOS).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 30) if platform.system() == "Darwin" else rss / (1 << 20)


def _dense_fit_one(ids, x, y, n_train, l2_a, l2_b, a0, assemble):
    """One test example, linear variant, float64: normal equations as a dense 2n x 2n matrix.

    assemble="dense": build the dense design X [rows, 2n] and form X^T X with BLAS (the plain
    baseline of the issue). assemble="pairs": add the co-occurrence pairs of every row straight
    into the dense 2n x 2n matrix (a stronger, structure-aware dense baseline). Both finish
    with numpy.linalg.solve.
    """
    rows, b = ids.shape
    n = n_train
    if assemble == "dense":
        M = np.zeros((rows, n))  # [rows, n_train] counts
        np.add.at(M, (np.repeat(np.arange(rows), b), ids.ravel()), 1.0)
        X = np.concatenate([M * x[:, None], M], axis=1)  # [rows, 2n]
        G = X.T @ X
        rhs = X.T @ y
    else:
        ii = np.repeat(ids, b, axis=1).ravel()
        jj = np.tile(ids, (1, b)).ravel()
        xr = np.repeat(x, b * b)
        G = np.zeros((2 * n, 2 * n))
        np.add.at(G, (ii, jj), xr * xr)
        np.add.at(G, (ii, jj + n), xr)
        np.add.at(G, (ii + n, jj), xr)
        np.add.at(G, (ii + n, jj + n), 1.0)
        rhs = np.zeros(2 * n)
        np.add.at(rhs, ids.ravel(), np.repeat(x * y, b))
        np.add.at(rhs, ids.ravel() + n, np.repeat(y, b))
    G[np.arange(n), np.arange(n)] += l2_a
    G[np.arange(n, 2 * n), np.arange(n, 2 * n)] += l2_b
    rhs[:n] += l2_a * a0
    theta = np.linalg.solve(G, rhs)
    return theta[:n], theta[n:]


def _blocked_cholesky(G: np.ndarray, nb: int = 4096) -> np.ndarray:
    """Lower Cholesky factor of G, overwriting G: right-looking, LAPACK on nb x nb diagonal blocks,
    trailing updates as nb-wide matrix products.

    The same flops as one LAPACK call, which it is for 2 n_train <= nb. At n_train = 10^4 (a
    20000 x 20000 matrix) np.linalg.cholesky and scipy's cho_factor end in a segfault inside
    multithreaded OpenBLAS 0.3.31 on the 2-core CPU (so does a plain 20000 x 256 x 20000 matrix
    product; single-threaded they finish); products with nb-wide outputs do not.
    """
    import scipy.linalg

    n = G.shape[0]
    for k in range(0, n, nb):
        e = min(k + nb, n)
        G[k:e, k:e] = np.linalg.cholesky(G[k:e, k:e])  # reads the lower triangle only
        if e < n:
            G[e:, k:e] = scipy.linalg.solve_triangular(
                G[k:e, k:e], G[e:, k:e].T, lower=True, check_finite=False
            ).T
            L21 = G[e:, k:e]
            for j in range(e, n, nb):  # lower part of the trailing matrix, nb columns at a time
                j2 = min(j + nb, n)
                G[j:, j:j2] -= L21[j - e :] @ L21[j - e : j2 - e].T
        G[k:e, k:] = np.tril(G[k:e, k:])  # zero this block row's upper part, in place
    return G


def _cholesky_fit_one(ids, x, y, n_train, l2_a, l2_b, a0):
    """The strong baseline, one test example, float64: sparse design X [rows, 2n] (scipy),
    normal equations X^T X assembled sparse then made dense, Cholesky (scipy.linalg)."""
    import scipy.linalg
    import scipy.sparse

    rows, b = ids.shape
    r = np.repeat(np.arange(rows), b)
    M = scipy.sparse.csr_matrix(
        (np.ones(rows * b), (r, ids.ravel())), shape=(rows, n_train)
    )  # repeats summed
    X = scipy.sparse.hstack([M.multiply(x[:, None]), M]).tocsr()
    G = (X.T @ X).toarray()
    d = np.arange(2 * n_train)
    G[d, d] += np.repeat([l2_a, l2_b], n_train)
    rhs = X.T @ y
    rhs[:n_train] += l2_a * a0
    L = _blocked_cholesky(G)
    del G
    z = scipy.linalg.solve_triangular(L, rhs, lower=True, check_finite=False)
    theta = scipy.linalg.solve_triangular(L.T, z, lower=False, check_finite=False)
    return theta[:n_train], theta[n_train:]


# Runs the `simfluence` CLI and, at exit, writes its VmHWM (the peak resident set since exec) to
# the file named by $_BENCH_HWM_FILE. ru_maxrss of the child is no measure of the CLI: Linux keeps
# it across exec, so it starts at the size of the forked parent (this script, about 2.1 GiB right
# after writing the n_train = 10^4 experiment).
_CLI_WRAPPER = """
import atexit, os, sys

def _hwm():
    try:
        with open("/proc/self/status") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
        with open(os.environ["_BENCH_HWM_FILE"], "w") as fh:
            fh.write(str(kib * 1024))
    except (OSError, StopIteration, ValueError):
        pass

atexit.register(_hwm)
from simfluence.cli import main
sys.argv[0] = "simfluence"
sys.exit(main())
"""


def _run_cli(cmd_args: list[str]) -> tuple[float, int, object, int | None]:
    """Runs `simfluence CMD_ARGS` in a subprocess: (wall s, exit code, rusage, VmHWM bytes or None
    where /proc gives none)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench_fit_hwm_") as tmp:
        hwm_file = Path(tmp) / "hwm"
        env = {**os.environ, "_BENCH_HWM_FILE": str(hwm_file)}
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _CLI_WRAPPER, *cmd_args], env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        hwm = int(hwm_file.read_text()) if hwm_file.is_file() else None
    return wall, proc.returncode, usage, hwm


def _cli_bench(args, steps: int) -> None:
    """Times `simfluence fit` on an experiment on disk against the Cholesky baseline."""
    import shutil
    import tempfile

    from simfluence import runlog

    keep = args.exp_dir is not None
    exp = Path(args.exp_dir or tempfile.mkdtemp(prefix="bench_fit_")) / "exp"
    try:
        want = {"n_train": args.n_train, "n_test": args.n_test}
        reuse = (exp / "experiment.json").is_file() and all(
            runlog.read_experiment(exp).get(k) == v for k, v in want.items()
        )
        reuse = reuse and len(runlog.list_runs(exp)) == args.runs
        if not reuse:
            t0 = time.perf_counter()
            demo_data.make_demo_experiment(
                exp,
                n_runs=args.runs,
                n_train=args.n_train,
                n_test=args.n_test,
                batch=args.batch,
                steps=steps,
                seed=args.seed,
                overwrite=exp.exists(),
            )
            print(f"wrote {exp} in {time.perf_counter() - t0:.1f} s")
        logs = sum((p / "losses.npy").stat().st_size for _, p, _ in runlog.list_runs(exp))
        print(f"loss logs: {logs / 2**30:.3f} GiB ({args.runs} runs x {steps + 1} x {args.n_test})")
        out = exp.parent / "sim.npz"
        cmd = ["fit", str(exp), "--runs", f"0-{args.runs - 1}", "--l2-a", str(args.l2_a)]
        cmd += ["--l2-b", str(args.l2_b), "--out", str(out)]
        wall, status, usage, hwm = _run_cli(cmd)
        if status != 0:
            why = f"killed by signal {-status}" if status < 0 else f"exit code {status}"
            raise SystemExit(f"simfluence fit failed ({why})")
        if hwm is None:  # no /proc (macOS): ru_maxrss, which includes the forked parent's size
            peak = usage.ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
            what = "ru_maxrss, at least this script's own size"
        else:
            peak, what = hwm, "VmHWM"
        print(
            f"simfluence fit (whole CLI, subprocess): {wall:.2f} s wall, {usage.ru_utime:.1f} s "
            f"user + {usage.ru_stime:.1f} s sys CPU; peak memory ({what}) {peak / 2**30:.3f} "
            f"GiB = {peak / logs:.2f}x the loss logs; load average {os.getloadavg()[0]:.1f} now"
        )
        if args.dense_tests == 0:
            return
        sim = S.load_simulator(out)
        runs = runlog.load_runs(exp)
        ids = np.concatenate([r.curriculum for r in runs])
        a0 = 1.0 / args.batch
        tests = np.linspace(0, args.n_test - 1, args.dense_tests).astype(int)
        times, errs = [], []
        for j in tests:
            x = np.concatenate([r.losses[:-1, j] for r in runs]).astype(np.float64)
            y = np.concatenate([r.losses[1:, j] for r in runs]).astype(np.float64)
            t1 = time.perf_counter()
            dA, dB = _cholesky_fit_one(ids, x, y, args.n_train, args.l2_a, args.l2_b, a0)
            times.append(time.perf_counter() - t1)
            fA, fB = np.asarray(sim.A[j], np.float64), np.asarray(sim.B[j], np.float64)
            dev = np.concatenate([dA - a0, dB])
            got = np.concatenate([fA - a0, fB])
            errs.append(np.linalg.norm(got - dev) / np.linalg.norm(dev))
        per = statistics.median(times)
        total = per * args.n_test
        print(
            f"strong baseline (sparse design, assembled normal equations, dense Cholesky): "
            f"{per:.3f} s per test example (median of {len(tests)}) -> {total:.3g} s for "
            f"{args.n_test}; ratio vs the whole CLI: {total / wall:.3g}x"
        )
        print(
            f"largest relative difference of (A - a0, B) from the Cholesky solution over "
            f"{len(tests)} test examples: {max(errs):.2e}"
        )
    finally:
        if not keep:
            shutil.rmtree(exp.parent, ignore_errors=True)


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def _median_timed(n, fn, *args, **kw) -> float:
    """Median wall time of n calls (after the first, timed separately by the caller)."""
    return statistics.median(_timed(fn, *args, **kw)[1] for _ in range(n))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=positive_int, default=1000, help="training pool size")
    p.add_argument("--n-test", type=positive_int, default=1000, help="test examples tracked")
    p.add_argument("--runs", type=positive_int, default=20, help="fitting runs")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="steps per fitting run (default 2 * n_train: each example seen as often as at the "
        "default sizes)",
    )
    p.add_argument("--batch", type=positive_int, default=4, help="batch size")
    p.add_argument(
        "--variants", default="linear,additive,multiplicative", help="comma-separated variants"
    )
    p.add_argument("--l2-a", type=nonneg_float, default=S.DEFAULT_L2_A, help="ridge on A - a0")
    p.add_argument("--l2-b", type=nonneg_float, default=S.DEFAULT_L2_B, help="ridge on B")
    p.add_argument(
        "--dense-tests",
        type=nonneg_int,
        default=3,
        help="test examples timed with the dense baseline (0 skips it; skipped above 2000 "
        "training examples)",
    )
    p.add_argument(
        "--rollout-runs", type=nonneg_int, default=10, help="runs in the rollout benchmark"
    )
    p.add_argument("--rollout-steps", type=positive_int, default=2000, help="steps per rollout run")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic experiment")
    p.add_argument("--no-warm", action="store_true", help="skip the warm fit calls of each variant")
    p.add_argument(
        "--warm-calls",
        type=positive_int,
        default=3,
        help="warm calls per variant (and rollout); their median is reported",
    )
    p.add_argument(
        "--cli",
        action="store_true",
        help="write the experiment to disk and time the `simfluence fit` CLI in a subprocess "
        "(wall time, peak memory) against the Cholesky baseline",
    )
    p.add_argument(
        "--exp-dir",
        default=None,
        help="with --cli: keep the experiment in DIR/exp and reuse it when its sizes match "
        "(default: a temporary folder, removed afterwards)",
    )
    args = p.parse_args(argv)
    steps = args.steps if args.steps is not None else 2 * args.n_train
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in S.VARIANTS:
            p.error(f"unknown variant {v!r}; use {','.join(S.VARIANTS)}")

    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    )
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    print(
        f"experiment: n_train={args.n_train} n_test={args.n_test} runs={args.runs} "
        f"steps={steps} batch={args.batch} (rows={args.runs * steps}, "
        f"each example seen ~{args.runs * steps * args.batch / args.n_train:.0f} times)"
    )
    if args.cli:
        _cli_bench(args, steps)
        return
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    A_true, B_true = demo_data.synthetic_simulator(rng, args.n_train, args.n_test, args.batch)
    curs, losses = demo_data.synthetic_runs(rng, A_true, B_true, args.runs, steps, args.batch)
    print(f"generated in {time.perf_counter() - t0:.1f} s; process peak {_peak_gb():.2f} GB")

    sims, cold_times, warm_times = {}, {}, {}
    nw = args.warm_calls
    for v in variants:
        kw = dict(n_train=args.n_train, variant=v, l2_a=args.l2_a, l2_b=args.l2_b)
        sims[v], cold = _timed(S.fit, curs, losses, **kw)
        cold_times[v] = cold
        warm_txt = ""
        if not args.no_warm:
            warm_times[v] = _median_timed(nw, S.fit, curs, losses, **kw)
            warm_txt = f", warm {warm_times[v]:7.2f} s (median of {nw})"
        print(
            f"fit {v:15s} all {args.n_test} tests: first call {cold:7.2f} s "
            f"(compilation included){warm_txt}; process peak {_peak_gb():.2f} GB"
        )

    if args.dense_tests > 0 and args.n_train <= 2000 and "linear" in sims:
        ids = np.concatenate(curs)
        a0 = 1.0 / args.batch
        sim = sims["linear"]
        tests = np.linspace(0, args.n_test - 1, args.dense_tests).astype(int)
        times = {"dense": [], "pairs": []}
        errs = {"A": [], "B": [], "A-a0": []}
        for j in tests:
            x = np.concatenate([loss[:-1, j] for loss in losses]).astype(np.float64)
            y = np.concatenate([loss[1:, j] for loss in losses]).astype(np.float64)
            for how in ("dense", "pairs"):
                t1 = time.perf_counter()
                dA, dB = _dense_fit_one(ids, x, y, args.n_train, args.l2_a, args.l2_b, a0, how)
                times[how].append(time.perf_counter() - t1)
            fA, fB = np.asarray(sim.A[j], np.float64), np.asarray(sim.B[j], np.float64)
            errs["A"].append(np.linalg.norm(fA - dA) / np.linalg.norm(dA))
            errs["B"].append(np.linalg.norm(fB - dB) / np.linalg.norm(dB))
            errs["A-a0"].append(np.linalg.norm(fA - dA) / np.linalg.norm(dA - a0))
        print(
            f"peak after dense baseline: {_peak_gb():.2f} GB (the dense X alone is "
            f"{ids.shape[0] * 2 * args.n_train * 8 / 2**30:.2f} GB)"
        )
        ours = warm_times.get("linear")
        if ours is None:
            ours = _median_timed(
                nw,
                S.fit,
                curs,
                losses,
                n_train=args.n_train,
                variant="linear",
                l2_a=args.l2_a,
                l2_b=args.l2_b,
            )
        for how, label in (
            ("dense", "dense X, X^T X by BLAS, numpy solve (the issue's baseline)"),
            ("pairs", "normal equations assembled from rows, numpy solve (stronger)"),
        ):
            per = statistics.median(times[how])
            total = per * args.n_test
            print(
                f"baseline {label}: {per:.3f} s per test example (median of {len(tests)}) -> "
                f"{total:.0f} s for {args.n_test}; ratio vs our linear fit "
                f"(first call incl. compile {cold_times['linear']:.2f} s): "
                f"{total / cold_times['linear']:.0f}x, vs warm {ours:.2f} s (median of {nw}): "
                f"{total / ours:.0f}x"
            )
        print(
            "largest relative difference vs dense solution (L2 per test example, max over "
            f"{len(tests)}): A {max(errs['A']):.2e}, B {max(errs['B']):.2e}, "
            f"A - a0 {max(errs['A-a0']):.2e}"
        )

    if args.rollout_runs > 0:
        sim = sims.get("linear") or next(iter(sims.values()))
        cur = rng.integers(
            0, args.n_train, (args.rollout_runs, args.rollout_steps, args.batch), dtype=np.int32
        )
        l0 = jnp.asarray(rng.uniform(1.5, 3.0, (args.rollout_runs, args.n_test)), jnp.float32)
        _, cold = _timed(S.simulate_many, sim, cur, l0)
        warm = _median_timed(nw, S.simulate_many, sim, cur, l0)
        print(
            f"rollout {args.n_test} tests x {args.rollout_runs} runs x {args.rollout_steps} "
            f"steps: first call {cold:.2f} s (compilation included), warm {warm:.2f} s "
            f"(median of {nw})"
        )
    print(f"process peak memory (ru_maxrss, whole process): {_peak_gb():.2f} GB")


if __name__ == "__main__":
    main()
