"""Fits sharded over devices, memory-mapped loss logs, and underdetermined fits.

References: a dense float64 `np.linalg.solve` of each test example's normal equations.
"""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from simfluence import _solvers, cli, demo_data, runlog
from simfluence import simulators as S

ROOT = Path(__file__).resolve().parents[2]


def _dense_deviation(curs, ls, n_train, l2_a, l2_b):
    """Linear variant, float64: theta = (A - 1/batch, B) per test example, a0 = 1/batch."""
    ids = np.concatenate(curs)
    rows = ids.shape[0]
    M = np.zeros((rows, n_train))
    np.add.at(M, (np.arange(rows)[:, None], ids), 1.0)  # counts with repeats
    lam = np.concatenate([np.full(n_train, l2_a), np.full(n_train, l2_b)])
    out = []
    for j in range(ls[0].shape[1]):
        x = np.concatenate([loss[:-1, j] for loss in ls]).astype(np.float64)
        y = np.concatenate([loss[1:, j] - loss[:-1, j] for loss in ls]).astype(np.float64)
        X = np.concatenate([M * x[:, None], M], axis=1)
        out.append(np.linalg.solve(X.T @ X + np.diag(lam), X.T @ y))
    return np.asarray(out)  # [n_test, 2 n_train]


def _deviation(sim) -> np.ndarray:
    a = np.asarray(sim.A, np.float64) - 1.0 / sim.batch
    return np.concatenate([a, np.asarray(sim.B, np.float64)], axis=1)


def _rel_err(got, ref) -> np.ndarray:
    return np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)


def test_fit_cli_on_8_devices_equals_one_device_and_a_dense_solve(tmp_path):
    # 13 test examples over 8 devices: blocks of 2 columns, 3 of them padding. The tests run on
    # 8 fake CPU devices (tests/conftest.py); the one-device fit runs in a subprocess (and the
    # other way round where this process has one device).
    import jax

    here = len(jax.devices())
    there = 1 if here > 1 else 8
    exp = demo_data.make_demo_experiment(
        tmp_path / "exp", n_runs=6, n_train=20, n_test=13, batch=4, steps=60
    )
    args = ["fit", str(exp), "--runs", "0-5", "--l2-a", "0.01", "--l2-b", "0.01"]
    code = textwrap.dedent(
        f"""
        import jax
        from simfluence import _solvers, cli
        cli.main({args + ["--out", str(tmp_path / f"sim{there}.npz")]!r})
        print("devices", len(jax.devices()), _solvers.mesh().devices.size)
        """
    )
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={there}"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert f"devices {there} {there}" in out.stdout, out.stdout
    assert _solvers.mesh().devices.size == here and {here, there} == {1, 8}
    assert cli.main(args + ["--out", str(tmp_path / f"sim{here}.npz")]) == 0
    sim8 = S.load_simulator(tmp_path / "sim8.npz")
    sim1 = S.load_simulator(tmp_path / "sim1.npz")
    runs = runlog.load_runs(exp)
    ref = _dense_deviation([r.curriculum for r in runs], [r.losses for r in runs], 20, 0.01, 0.01)
    # Both stop at a float64 relative residual of 1e-7 (a well-posed fit: 360 rows for 40
    # unknowns), so they agree with each other and the dense solve far below 1e-5.
    assert _rel_err(_deviation(sim8), _deviation(sim1)).max() < 1e-5
    assert _rel_err(_deviation(sim8), ref).max() < 1e-5
    assert _rel_err(_deviation(sim1), ref).max() < 1e-5


def test_underdetermined_fit_matches_a_dense_solve():
    # The case: pool 200, 2 runs x 20 steps of batch 8 (40 rows for 400 unknowns),
    # lambda 1e-4. Stopping on the residual alone (tol 1e-7) left the coefficients 0.1-0.3 %
    # from the dense solve; the coefficient bound takes them to within 1e-4.
    rng = np.random.default_rng(0)
    A, B = demo_data.synthetic_simulator(rng, 200, 6, 8)
    curs, ls = demo_data.synthetic_runs(rng, A, B, 2, 20, 8)
    ref = _dense_deviation(curs, ls, 200, 1e-4, 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", S.ConvergenceWarning)
        sim = S.fit(curs, ls, n_train=200, l2_a=1e-4, l2_b=1e-4)
    assert _rel_err(_deviation(sim), ref).max() < 1e-4


def test_loss_logs_are_memory_mapped_and_still_validated(tmp_path):
    exp = demo_data.make_demo_experiment(
        tmp_path / "exp", n_runs=2, n_train=10, n_test=3, batch=2, steps=12
    )
    (run,) = runlog.load_runs(exp, [0])
    assert isinstance(run.losses, np.memmap) and not run.losses.flags.writeable
    before = np.array(run.losses)
    runlog.release_pages(run.losses)  # drops the pages; the data is read back on access
    np.testing.assert_array_equal(run.losses, before)
    # A NaN past the first block of rows the check reads at a time is still found.
    loss = np.load(runlog.run_dir(exp, 1) / "losses.npy")
    loss[11, 2] = np.nan
    np.save(runlog.run_dir(exp, 1) / "losses.npy", loss)
    assert runlog.first_non_finite(np.asarray(loss), rows=4) == (11, 2)
    with pytest.raises(runlog.RunLogError, match=r"non-finite loss nan at step 11, test example 2"):
        runlog.load_runs(exp, [1])
