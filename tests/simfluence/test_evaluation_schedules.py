"""evaluate on a hand-built experiment with a varying learning-rate schedule: its TracIn-CP
scores against a brute-force numpy rollout that uses each held-out run's own lr.npy."""

import numpy as np

from simfluence import runlog, scoring, simulators, tracin
from simfluence.evaluation import evaluate

TOL = dict(rtol=1e-5, atol=0.0)  # float32 rollout against a float64 loop; fixed before running
TOL_RHO = dict(rtol=1e-12, atol=1e-12)  # rhos of integer ranks in float64; fixed before running
N_TRAIN, N_TEST, STEPS, BATCH = 5, 3, 6, 2
CKPT = np.array([0, 3])


def _experiment(path, n_runs=6):
    """n_runs runs, each with its own decaying rate; the 2 fitting runs hold tracin.npz whose
    checkpoint rates are far from every run's per-step rate."""
    rng = np.random.default_rng(7)
    runlog.write_experiment(path, {"n_train": N_TRAIN, "n_test": N_TEST})
    dots_fit = []
    for r in range(n_runs):
        d = runlog.run_dir(path, r)
        cur = rng.integers(0, N_TRAIN, (STEPS, BATCH))
        losses = 2.0 + rng.normal(0, 0.1, (STEPS + 1, N_TEST)).cumsum(0)
        lr = np.float32(0.5 + r) * np.linspace(1.0, 0.1, STEPS, dtype=np.float32)
        runlog.write_run(d, cur, losses.astype(np.float32), meta={"run": r}, lr=lr)
        if r < 2:
            dots = rng.normal(0, 1, (len(CKPT), N_TEST, N_TRAIN)).astype(np.float32)
            dots_fit.append(dots)
            runlog.write_tracin(d, CKPT, np.float32([9.0, 7.0]), dots, "exact", 0, 0)
    return np.mean(dots_fit, axis=0, dtype=np.float64)


def _rollout(dots, cur, l0, lr):
    """TracIn-CP by a plain loop: step t (1-based) uses the latest checkpoint s <= t - 1."""
    out = [np.asarray(l0, np.float64)]
    for t in range(1, len(cur) + 1):
        k = max(i for i, s in enumerate(CKPT) if s <= t - 1)
        delta = sum(dots[k, :, i] for i in cur[t - 1]) * lr[t - 1] / len(cur[t - 1])
        out.append(out[-1] - delta)
    return np.stack(out)


def test_tracin_cp_rolls_out_each_held_out_run_with_its_own_learning_rates(tmp_path):
    dots = _experiment(tmp_path / "exp")
    res = evaluate(tmp_path / "exp", split=(2, 0, 4), variants=["tracin-cp"])
    entry = res["variants"]["tracin-cp"]
    assert entry["scale"] == 1.0 and entry["tracin_runs"] == [0, 1]
    assert res["split"]["test"] == [2, 3, 4, 5]
    expected_mse, expected_final = [], []
    for run in runlog.load_runs(tmp_path / "exp"):
        if run.index < 2:
            continue
        pred = _rollout(dots, run.curriculum, run.losses[0], run.lr)
        expected_mse.append(np.mean((pred[1:] - run.losses[1:]) ** 2))
        expected_final.append(np.mean((pred[-1] - run.losses[-1]) ** 2))
    np.testing.assert_allclose(entry["per_run"]["all_steps_mse"], expected_mse, **TOL)
    np.testing.assert_allclose(entry["per_run"]["final_step_mse"], expected_final, **TOL)


def _across_rho(pred, true):
    """Mean over test examples of Spearman across runs (no ties in these continuous data)."""

    def ranks(x):
        return np.argsort(np.argsort(x, axis=0), axis=0).astype(np.float64)

    rp, rt = ranks(pred), ranks(true)
    rp -= rp.mean(0)
    rt -= rt.mean(0)
    return float(np.mean((rp * rt).sum(0) / np.sqrt((rp**2).sum(0) * (rt**2).sum(0))))


def test_across_run_rho_versus_linear_is_a_paired_jackknife(tmp_path):
    _experiment(tmp_path / "exp", n_runs=10)
    variants = ["linear", "additive", "tracin-cp", "mean-trajectory"]
    res = evaluate(tmp_path / "exp", split=(2, 0, 8), variants=variants, l2_a=0.1, l2_b=0.1)
    # The final simulated losses of each variant, refitted through the public API.
    runs = runlog.load_runs(tmp_path / "exp")
    fit, test = runs[:2], runs[2:]
    true = np.stack([r.losses[-1] for r in test]).astype(np.float64)
    finals = {}
    for name in ("linear", "additive"):
        sim = simulators.fit(
            [r.curriculum for r in fit],
            [r.losses for r in fit],
            n_train=N_TRAIN,
            variant=name,
            l2_a=0.1,
            l2_b=0.1,
        )
        finals[name] = np.stack(
            [simulators.simulate(sim, r.curriculum, r.losses[0])[-1] for r in test]
        )
    tsim = tracin.from_runs(fit)
    finals["tracin-cp"] = np.stack(
        [tracin.simulate_tracin(tsim, r.curriculum, r.losses[0], r.lr)[-1] for r in test]
    )
    n = len(test)
    for name, pred in finals.items():
        got = res["variants"][name]["across_run_spearman_vs_linear"]
        d = [
            _across_rho(np.delete(pred, k, 0), np.delete(true, k, 0))
            - _across_rho(np.delete(finals["linear"], k, 0), np.delete(true, k, 0))
            for k in range(n)
        ]
        want_se = np.sqrt((n - 1) / n * np.sum((np.array(d) - np.mean(d)) ** 2))
        want = _across_rho(pred, true) - _across_rho(finals["linear"], true)
        assert got["reference"] == "linear" and got["n_runs"] == n
        np.testing.assert_allclose(got["mean"], want, **TOL_RHO)
        np.testing.assert_allclose(got["stderr"], want_se, **TOL_RHO)
        np.testing.assert_allclose(
            got["mean"],
            res["variants"][name]["across_run_spearman"]["mean"]
            - res["variants"]["linear"]["across_run_spearman"]["mean"],
            **TOL_RHO,
        )
    assert res["variants"]["linear"]["across_run_spearman_vs_linear"]["mean"] == 0.0
    # Mean-trajectory starts from each run's own L_0, which varies here: its rho is defined.
    blind = res["variants"]["mean-trajectory"]
    np.testing.assert_allclose(
        blind["across_run_spearman_vs_linear"]["mean"],
        blind["across_run_spearman"]["mean"]
        - res["variants"]["linear"]["across_run_spearman"]["mean"],
        **TOL_RHO,
    )


def test_difference_is_undefined_when_a_prediction_ignores_the_curriculum():
    rng = np.random.default_rng(3)
    true, ref = rng.normal(size=(2, 6, 4))
    flat = np.broadcast_to(rng.normal(size=4), (6, 4))  # the same in every run
    out = scoring.across_run_spearman_difference(flat, ref, true)
    assert out["mean"] is None and out["stderr"] is None and out["undefined_reason"]
    few = scoring.across_run_spearman_difference(ref[:3], true[:3] + 1, true[:3])
    assert few["mean"] is not None and few["stderr"] is None and few["stderr_undefined_reason"]
