"""TracIn-CP simulator variants against a plain numpy loop and the closed-form scale."""

import numpy as np
import pytest

from simfluence import runlog, tracin
from simfluence.runlog import RunLogError

N_TRAIN, N_TEST, B = 6, 3, 2


def _exp(tmp_path, n_runs=3, steps=9, with_lr=(0,), tracin_runs=(0, 1), ckpt=(2, 5)):
    rng = np.random.default_rng(0)
    exp = tmp_path / "exp"
    runlog.write_experiment(exp, {"n_train": N_TRAIN, "n_test": N_TEST})
    for r in range(n_runs):
        rd = runlog.run_dir(exp, r)
        cur = rng.integers(0, N_TRAIN, size=(steps, B)).astype(np.int32)
        cur[0] = [3, 3]  # a repeat in one batch
        losses = (2.0 + np.cumsum(rng.normal(0, 0.1, size=(steps + 1, N_TEST)), 0)).astype(
            np.float32
        )
        lr = rng.uniform(1e-3, 2e-3, steps).astype(np.float32) if r in with_lr else None
        runlog.write_run(rd, cur, losses, lr=lr)
        if r in tracin_runs:
            dots = rng.normal(size=(len(ckpt), N_TEST, N_TRAIN)).astype(np.float32) * 50
            runlog.write_tracin(rd, list(ckpt), [1e-3, 5e-4][: len(ckpt)], dots, "exact", 0, 0)
    return exp


def _numpy_rollout(dots, lrs, ckpt_steps, cur, l0, lr=None, scale=1.0):
    t_steps, b = cur.shape
    out = [np.asarray(l0, np.float64)]
    for t in range(1, t_steps + 1):
        k = 0
        for j, s in enumerate(ckpt_steps):
            if s <= t - 1:  # the checkpoint holds the parameters that step t starts from
                k = j
        eta = lr[t - 1] if lr is not None else lrs[k]
        change = np.zeros(dots.shape[1])
        for i in cur[t - 1]:
            change -= (eta / b) * dots[k, :, i]
        out.append(out[-1] + scale * change)
    return np.array(out)


def test_tracin_cp_matches_numpy_loop(tmp_path):
    exp = _exp(tmp_path)
    runs = runlog.load_runs(exp)
    fit_runs = runs[:2]
    sim = tracin.from_runs(fit_runs)
    t0, t1 = runlog.read_tracin(runs[0].path), runlog.read_tracin(runs[1].path)
    dots = (t0["dots"].astype(np.float64) + t1["dots"]) / 2
    lrs = (t0["learning_rates"].astype(np.float64) + t1["learning_rates"]) / 2
    assert sim.source_runs == (0, 1) and sim.scale == 1.0
    for run in runs:  # run 0 has lr.npy, the others use checkpoint learning rates
        got = tracin.simulate_tracin(sim, run.curriculum, run.losses[0], run.lr)
        want = _numpy_rollout(dots, lrs, [2, 5], run.curriculum, run.losses[0], run.lr)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rescaled_scale_is_closed_form(tmp_path):
    exp = _exp(tmp_path)
    runs = runlog.load_runs(exp)[:2]
    sim = tracin.from_runs(runs, variant="tracin-cp-rescaled")
    base = tracin.from_runs(runs)
    num = den = 0.0
    for run in runs:
        pred = np.diff(
            _numpy_rollout(
                base.dots, base.learning_rates, [2, 5], run.curriculum, np.zeros(N_TEST), run.lr
            ),
            axis=0,
        )
        obs = np.diff(run.losses.astype(np.float64), axis=0)
        num += (pred * obs).sum()
        den += (pred * pred).sum()
    assert sim.scale == pytest.approx(num / den, rel=1e-5)
    assert sim.variant == "tracin-cp-rescaled"

    # The fitted scale minimises the per-step squared error: nudging it only makes things worse.
    def sse(s):
        tot = 0.0
        for run in runs:
            pred = np.diff(
                tracin.simulate_tracin(base, run.curriculum, run.losses[0], run.lr), axis=0
            )
            tot += ((s * pred - np.diff(run.losses, axis=0)) ** 2).sum()
        return tot

    assert sse(sim.scale) <= min(sse(sim.scale * 1.01), sse(sim.scale * 0.99))


def test_errors(tmp_path):
    exp = _exp(tmp_path, tracin_runs=())
    runs = runlog.load_runs(exp)
    assert not tracin.has_tracin(runs)
    with pytest.raises(RunLogError, match="run_000, run_001, run_002"):
        tracin.from_runs(runs)
    exp2 = _exp(tmp_path / "b", tracin_runs=(0,))
    dots = np.zeros((1, N_TEST, N_TRAIN), np.float32)
    runlog.write_tracin(runlog.run_dir(exp2, 1), [3], [1e-3], dots, "exact", 0, 0)
    with pytest.raises(RunLogError, match="differ"):
        tracin.from_runs(runlog.load_runs(exp2))
    with pytest.raises(ValueError, match="unknown"):
        tracin.from_runs(runlog.load_runs(exp2), variant="tracin")


def test_fitting_runs_must_share_the_dot_settings(tmp_path):
    """Averaging exact with projected dots, or projections of other dimensions or seeds, would
    silently mix estimates of different random matrices: one-line error naming both files. Exact
    dots do not depend on the seed, so exact files of different seeds are averaged."""
    dots = np.ones((2, N_TEST, N_TRAIN), np.float32)
    cases = [
        (("exact", 0, 0), ("projected", 8, 0), "mode=exact vs projected"),
        (("projected", 8, 0), ("projected", 16, 0), "proj_dim=8 vs 16"),
        (("projected", 8, 0), ("projected", 8, 1), "seed=0 vs 1"),
        (("exact", 0, 0), ("exact", 0, 7), None),
    ]
    for j, (setting, other, differ) in enumerate(cases):
        exp = _exp(tmp_path / str(j), tracin_runs=())
        runlog.write_tracin(runlog.run_dir(exp, 0), [2, 5], [1e-3, 5e-4], dots, *setting)
        runlog.write_tracin(runlog.run_dir(exp, 1), [2, 5], [1e-3, 5e-4], 3 * dots, *other)
        runs = runlog.load_runs(exp)[:2]
        if differ is None:
            np.testing.assert_array_equal(tracin.from_runs(runs).dots, 2 * dots)
            continue
        with pytest.raises(RunLogError, match=differ) as e:
            tracin.from_runs(runs)
        message = str(e.value)
        assert "run_000/tracin.npz and " in message and "run_001/tracin.npz" in message
        assert "recompute with one mode" in message and "\n" not in message
