"""Schedule-aware Simfluence variants against independent numpy references."""

import jax
import numpy as np
import pytest

from simfluence import runlog, scheduled, tracin
from simfluence import simulators as S
from simfluence.cli import main
from simfluence.counterfactual import predicted_changes
from simfluence.demo_data import make_demo_experiment

# Tolerances, fixed up front.
FIT_RTOL = 1e-4  # CG (float32) vs dense float64 solve: max error / largest |coefficient|
EQ_RTOL = 1e-5  # two float32 fits of the same system (linear vs linear-lr at w = 1)
ROLL_RTOL = 1e-5  # float32 scan vs float64 numpy loop
PRIOR_RTOL = 1e-4  # B vs its prior at l2_b = 1e9

N_TRAIN, N_TEST, BATCH = 12, 4, 3
LENGTHS = (40, 30, 50, 36)


def _runs(seed=0, schedule="ramp", lengths=LENGTHS):
    """Runs of the schedule-aware model plus noise; rates vary within and across runs."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 0.02, (N_TEST, N_TRAIN))
    b = rng.normal(-0.02, 0.03, (N_TEST, N_TRAIN))
    curs, ls, lrs = [], [], []
    for r, t_r in enumerate(lengths):
        c = rng.integers(0, N_TRAIN, (t_r, BATCH)).astype(np.int32)
        c[::5, 1] = c[::5, 0]  # repeats inside batches
        if schedule == "ramp":  # linear warm-up to a per-run peak, then flat
            lr = np.minimum(np.arange(1, t_r + 1) / 20.0, 1.0) * (1e-3 * (1 + 0.3 * r))
        else:
            lr = np.full(t_r, 3e-4)
        lr = lr.astype(np.float32)
        w = lr / 1.9e-3  # any scale: the model only sees relative rates
        loss = np.empty((t_r + 1, N_TEST))
        loss[0] = rng.uniform(1.5, 3.0, N_TEST)
        for t in range(t_r):
            step = a[:, c[t]].sum(1) * loss[t] + b[:, c[t]].sum(1)
            loss[t + 1] = loss[t] + w[t] * step + rng.normal(0, 0.005, N_TEST)
        curs.append(c)
        ls.append(loss.astype(np.float32))
        lrs.append(lr)
    return curs, ls, lrs


def _counts(cur, n):
    """[T, n] multiplicity of every training example in every batch."""
    m = np.zeros((cur.shape[0], n))
    for t, batch in enumerate(cur):
        for i in batch:
            m[t, i] += 1
    return m


def _dense_lr_fit(curs, ls, lrs, l2_a, l2_b, use_a=True, a_prior=0.0, b_prior=None):
    """float64 normal equations of the ridge objective, per test example: (a, b) [n_test, n]."""
    lr_max = max(float(lr.max()) for lr in lrs)
    M = np.concatenate(
        [_counts(c, N_TRAIN) * (lr[:, None] / lr_max) for c, lr in zip(curs, lrs, strict=True)]
    )
    a_out = np.zeros((N_TEST, N_TRAIN))
    b_out = np.zeros((N_TEST, N_TRAIN))
    for j in range(N_TEST):
        x = np.concatenate([loss[:-1, j] for loss in ls]).astype(np.float64)
        y = np.concatenate([loss[1:, j] - loss[:-1, j] for loss in ls]).astype(np.float64)
        pb = np.zeros(N_TRAIN) if b_prior is None else b_prior[j].astype(np.float64)
        if use_a:
            X = np.concatenate([M * x[:, None], M], axis=1)
            lam = np.concatenate([np.full(N_TRAIN, l2_a), np.full(N_TRAIN, l2_b)])
            prior = np.concatenate([np.full(N_TRAIN, a_prior), pb])
            theta = np.linalg.solve(X.T @ X + np.diag(lam), X.T @ y + lam * prior)
            a_out[j], b_out[j] = theta[:N_TRAIN], theta[N_TRAIN:]
        else:
            b_out[j] = np.linalg.solve(M.T @ M + l2_b * np.eye(N_TRAIN), M.T @ y + l2_b * pb)
    return a_out, b_out


def _numpy_lr_rollout(A, B, cur, l0, lr, lr_max, batch):
    a = np.asarray(A, np.float64) - 1.0 / batch
    B = np.asarray(B, np.float64)
    loss = np.asarray(l0, np.float64).copy()
    out = [loss.copy()]
    for t, ids in enumerate(cur):
        w = float(lr[t]) / lr_max
        step = np.zeros_like(loss)
        for i in ids:
            step += a[:, i] * loss + B[:, i]
        loss = loss + w * step
        out.append(loss.copy())
    return np.stack(out)


def _close(got, want, rtol):
    """max |got - want| <= rtol * max |want| (per array)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1e-30)
    assert np.abs(got - want).max() <= rtol * scale, np.abs(got - want).max() / scale


def test_linear_lr_fit_matches_a_dense_float64_solve():
    curs, ls, lrs = _runs()
    sim = S.fit(curs, ls, n_train=N_TRAIN, variant="linear-lr", l2_a=1e-2, l2_b=1e-3, lrs=lrs)
    a, b = _dense_lr_fit(curs, ls, lrs, 1e-2, 1e-3)
    _close(np.asarray(sim.A, np.float64) - 1.0 / BATCH, a, FIT_RTOL)
    _close(sim.B, b, FIT_RTOL)
    assert sim.lr_max == pytest.approx(max(float(lr.max()) for lr in lrs))
    assert sim.variant == "linear-lr" and sim.batch == BATCH


def test_additive_lr_fit_matches_a_dense_float64_solve():
    curs, ls, lrs = _runs(seed=1)
    sim = S.fit(curs, ls, n_train=N_TRAIN, variant="additive-lr", l2_a=5.0, l2_b=1e-2, lrs=lrs)
    _, b = _dense_lr_fit(curs, ls, lrs, 0.0, 1e-2, use_a=False)
    _close(sim.B, b, FIT_RTOL)
    np.testing.assert_array_equal(np.asarray(sim.A), np.float32(1.0 / BATCH))  # a = 0


def test_prior_fit_matches_a_dense_solve_and_a_huge_l2_b_returns_the_prior():
    curs, ls, lrs = _runs(seed=2)
    prior = np.random.default_rng(9).normal(0.0, 0.05, (N_TEST, N_TRAIN)).astype(np.float32)
    kw = dict(n_train=N_TRAIN, variant="linear-lr-tracin-prior", lrs=lrs, b_prior=prior)
    sim = S.fit(curs, ls, l2_a=1e-2, l2_b=1e-1, **kw)
    a, b = _dense_lr_fit(curs, ls, lrs, 1e-2, 1e-1, b_prior=prior)
    _close(np.asarray(sim.A, np.float64) - 1.0 / BATCH, a, FIT_RTOL)
    _close(sim.B, b, FIT_RTOL)
    _close(S.fit(curs, ls, l2_a=1e-2, l2_b=1e9, **kw).B, prior, PRIOR_RTOL)


def test_constant_schedule_is_the_linear_fit():
    """w_t = 1: a = A - 1/batch, the same lambdas, and a0 maps to a0 - 1/batch."""
    curs, ls, lrs = _runs(seed=3, schedule="constant")
    for a_prior in (None, 0.4):
        kw = dict(n_train=N_TRAIN, l2_a=1e-2, l2_b=1e-3, a_prior=a_prior)
        lin = S.fit(curs, ls, variant="linear", **kw)
        lr_sim = S.fit(curs, ls, variant="linear-lr", lrs=lrs, **kw)
        _close(lr_sim.A, lin.A, EQ_RTOL)
        _close(lr_sim.B, lin.B, EQ_RTOL)
        assert lr_sim.a_prior == lin.a_prior
    # Only relative rates matter: scaling every rate leaves the fit unchanged.
    scaled = S.fit(curs, ls, n_train=N_TRAIN, variant="linear-lr", lrs=[7 * x for x in lrs])
    plain = S.fit(curs, ls, n_train=N_TRAIN, variant="linear-lr", lrs=lrs)
    _close(scaled.A, plain.A, EQ_RTOL)
    _close(scaled.B, plain.B, EQ_RTOL)
    pred_lin = S.simulate(lin, curs[0], ls[0][0])
    pred_lr = S.simulate(lr_sim, curs[0], ls[0][0], lrs[0])
    _close(pred_lr, pred_lin, ROLL_RTOL)


def test_rollouts_and_removal_match_numpy_loops_and_jit():
    curs, ls, lrs = _runs(seed=4, lengths=(30, 30))
    rng = np.random.default_rng(0)
    for variant in ("linear-lr", "additive-lr"):
        A = 1.0 / BATCH + (
            0 if variant == "additive-lr" else rng.normal(0, 0.02, (N_TEST, N_TRAIN))
        )
        A = np.broadcast_to(A, (N_TEST, N_TRAIN)).astype(np.float32)
        B = rng.normal(0, 0.05, (N_TEST, N_TRAIN)).astype(np.float32)
        sim = S.Simulator(A, B, variant, 0.1, 0.1, 1.0 / BATCH, BATCH, lr_max=2e-3)
        want = [
            _numpy_lr_rollout(A, B, c, x[0], lr, 2e-3, BATCH)
            for c, x, lr in zip(curs, ls, lrs, strict=True)
        ]
        _close(S.simulate(sim, curs[0], ls[0][0], lrs[0]), want[0], ROLL_RTOL)
        many = S.simulate_many(sim, np.stack(curs), np.stack([x[0] for x in ls]), np.stack(lrs))
        _close(many, np.stack(want), ROLL_RTOL)
        jitted = jax.jit(S.simulate)(sim, curs[1], ls[1][0], lrs[1])  # lr traced
        _close(jitted, want[1], ROLL_RTOL)
        before = scheduled.rollout_runs._cache_size()
        S.simulate(sim, curs[1], ls[1][0], lrs[1])
        S.simulate(sim, curs[0], ls[0][0], lrs[0])
        assert scheduled.rollout_runs._cache_size() <= before + 1  # same shapes: one compile
        # Removal: the example's slots contribute nothing (a = b = 0 there), by brute force.
        inf = np.asarray(S.removal_influence(sim, curs[0], ls[0][0], 2, lrs[0]))
        for i in range(N_TRAIN):
            A_i, B_i = A.astype(np.float64).copy(), B.astype(np.float64).copy()
            A_i[:, i], B_i[:, i] = 1.0 / BATCH, 0.0
            brute = _numpy_lr_rollout(A_i, B_i, curs[0], ls[0][0], lrs[0], 2e-3, BATCH)[-1, 2]
            assert inf[i] == pytest.approx(brute - want[0][-1, 2], abs=1e-5)


def test_select_lambdas_rolls_validation_runs_out_with_their_rates():
    curs, ls, lrs = _runs(seed=5, lengths=(40, 30, 50, 36, 40))
    grid = [(1e-2, 1e-3), (1.0, 1.0)]
    _, _, table = S.select_lambdas(
        curs[:4],
        ls[:4],
        curs[4:],
        ls[4:],
        n_train=N_TRAIN,
        variant="linear-lr",
        grid=grid,
        lrs=lrs[:4],
        valid_lrs=lrs[4:],
    )
    for row in table:
        sim = S.fit(
            curs[:4],
            ls[:4],
            n_train=N_TRAIN,
            variant="linear-lr",
            lrs=lrs[:4],
            l2_a=row["l2_a"],
            l2_b=row["l2_b"],
        )
        pred = _numpy_lr_rollout(sim.A, sim.B, curs[4], ls[4][0], lrs[4], sim.lr_max, BATCH)
        want = np.mean((pred[1:] - ls[4][1:]) ** 2)
        assert row["valid_mse"] == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="pass the validation runs' rates"):
        S.select_lambdas(
            curs[:4],
            ls[:4],
            curs[4:],
            ls[4:],
            n_train=N_TRAIN,
            variant="linear-lr",
            grid=grid,
            lrs=lrs[:4],
        )


def test_missing_learning_rates_are_one_line_errors(tmp_path):
    curs, ls, lrs = _runs(seed=6)
    for variant in scheduled.SCHEDULED_VARIANTS:
        with pytest.raises(ValueError, match=f"{variant} scales every step by its learning rate"):
            S.fit(curs, ls, n_train=N_TRAIN, variant=variant)
    sim = S.fit(curs, ls, n_train=N_TRAIN, variant="linear-lr", lrs=lrs)
    with pytest.raises(ValueError, match="pass lr, float"):
        S.simulate(sim, curs[0], ls[0][0])
    with pytest.raises(ValueError, match="lr has shape"):
        S.simulate(sim, curs[0], ls[0][0], lrs[1])
    with pytest.raises(ValueError, match="b_prior is only used"):
        S.fit(curs, ls, n_train=N_TRAIN, variant="linear-lr", lrs=lrs, b_prior=np.zeros((4, 12)))
    with pytest.raises(ValueError, match="learning rate -1.0 at step 3"):
        bad = [lr.copy() for lr in lrs]
        bad[1][2] = -1.0
        S.fit(curs, ls, n_train=N_TRAIN, variant="linear-lr", lrs=bad)
    # Runs on disk without lr.npy: one line naming the run and the fix.
    exp = make_demo_experiment(tmp_path / "e", n_runs=4, n_train=6, n_test=2, batch=2, steps=5)
    runs = runlog.load_runs(exp)
    with pytest.raises(ValueError, match=r"run_000: run 0 has no lr\.npy, which linear-lr needs"):
        scheduled.fit_inputs(runs, "linear-lr")
    from simfluence.evaluation import default_variants, evaluate

    assert "linear-lr" not in default_variants(runs)
    with pytest.raises(ValueError, match="has no lr.npy") as e:
        evaluate(exp, split=(2, 0, 2), variants=["additive-lr"], l2_a=1.0, l2_b=1.0)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def ramp_exp(tmp_path_factory):
    """A demo experiment with tracin.npz, whose lr.npy is replaced by a per-run warm-up ramp."""
    exp = tmp_path_factory.mktemp("lr") / "exp"
    make_demo_experiment(exp, n_runs=7, n_train=10, n_test=3, batch=2, steps=16, tracin=True)
    for r in runlog.load_runs(exp):
        ramp = np.minimum(np.arange(1, 17) / 10.0, 1.0) * 1e-3 * (1 + 0.1 * r.index)
        np.save(r.path / "lr.npy", ramp.astype(np.float32))
    return exp


def test_tracin_prior_is_the_rescaled_checkpoint_mean(ramp_exp):
    runs = runlog.load_runs(ramp_exp, [0, 1, 2, 3])
    lr_max = max(float(r.lr.max()) for r in runs)
    prior, s = scheduled.tracin_prior(runs, lr_max=lr_max, batch=2)
    dots = np.mean([runlog.read_tracin(r.path)["dots"] for r in runs], axis=0, dtype=np.float64)
    scale = tracin.fit_scale(tracin.from_runs(runs), runs)
    assert s == pytest.approx(scale, rel=1e-6)
    _close(prior, -scale * lr_max / 2 * dots.mean(axis=0), 1e-6)
    inputs = scheduled.fit_inputs(runs, "linear-lr-tracin-prior")
    _close(inputs["b_prior"], prior, 0.0)
    assert set(scheduled.fit_inputs(runs, "additive-lr")) == {"lrs"}
    assert scheduled.fit_inputs(runs, "linear") == {}


def test_evaluate_cli_save_load_and_counterfactual(ramp_exp, tmp_path):
    from simfluence.evaluation import evaluate

    res = evaluate(ramp_exp, split=(4, 1, 2), grid=(1e-2, 1.0))
    for name in scheduled.SCHEDULED_VARIANTS:
        e = res["variants"][name]
        assert e["lambda_source"] == "validation" and np.isfinite(e["all_steps_mse"]["mean"])
        assert e["lr_max"] == pytest.approx(1.3e-3, rel=1e-6)  # run 3's peak
    assert res["variants"]["additive-lr"]["l2_a"] is None
    # The held-out score is the numpy rollout of the refitted simulator with each run's rates.
    runs = runlog.load_runs(ramp_exp)
    e = res["variants"]["linear-lr"]
    sim = S.fit(
        [r.curriculum for r in runs[:4]],
        [r.losses for r in runs[:4]],
        n_train=10,
        variant="linear-lr",
        l2_a=e["l2_a"],
        l2_b=e["l2_b"],
        lrs=[r.lr for r in runs[:4]],
    )
    per = [
        np.mean(
            (
                _numpy_lr_rollout(sim.A, sim.B, r.curriculum, r.losses[0], r.lr, sim.lr_max, 2)
                - r.losses
            )[1:]
            ** 2
        )
        for r in runs[5:7]
    ]
    assert e["all_steps_mse"]["mean"] == pytest.approx(np.mean(per), rel=1e-4)

    # fit --variant writes a file that loads back with lr_max and the fit origin.
    for variant in scheduled.SCHEDULED_VARIANTS:
        out = tmp_path / f"{variant}.npz"
        argv = ["fit", str(ramp_exp), "--runs", "0-3", "--valid-runs", "4", "--variant", variant]
        assert main([*argv, "--out", str(out)]) == 0
        loaded = S.load_simulator(out)
        assert loaded.variant == variant and loaded.lr_max == pytest.approx(1.3e-3, rel=1e-6)
        assert S.read_origin(out)["fit_runs"] == [0, 1, 2, 3]
        S.save_simulator(tmp_path / "again.npz", loaded)
        again = S.load_simulator(tmp_path / "again.npz")
        np.testing.assert_array_equal(np.asarray(again.A), np.asarray(loaded.A))
        assert again.lr_max == loaded.lr_max
    with np.load(out) as z:  # a -lr file without its lr_max cannot be rolled out: refused
        np.savez(tmp_path / "no_lr_max.npz", **{k: z[k] for k in z.files if k != "lr_max"})
    with pytest.raises(ValueError, match="without a valid lr_max"):
        S.load_simulator(tmp_path / "no_lr_max.npz")

    # Counterfactual predictions roll the -lr variants out with the base runs' rates.
    base = runs[5]
    cf = base.curriculum[::-1][None].copy()
    got = predicted_changes(sim, cf, base.curriculum[None], base.losses[0][None], base.lr[None])
    new = _numpy_lr_rollout(sim.A, sim.B, cf[0], base.losses[0], base.lr, sim.lr_max, 2)[-1]
    old = _numpy_lr_rollout(sim.A, sim.B, base.curriculum, base.losses[0], base.lr, sim.lr_max, 2)
    np.testing.assert_allclose(got[0], new - old[-1], atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*at a cap of the lambda search:UserWarning")
def test_evaluate_saves_the_files_fit_writes(ramp_exp, tmp_path):
    """`evaluate --save-simulators DIR` (what `make simulate` runs) saves every fitted variant,
    and each file holds the same arrays and origin as `simfluence fit` on the same runs."""
    out = tmp_path / "sims"
    fitted = ["linear", "linear-lr-tracin-prior", "tracin-cp-rescaled", "mean-trajectory"]
    argv = ["evaluate", str(ramp_exp), "--split", "4,1,2", "--variants", ",".join(fitted)]
    assert main([*argv, "--save-simulators", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"sim_{v}.npz" for v in fitted)
    for variant in fitted:
        ref = tmp_path / f"fit_{variant}.npz"
        no_lambdas = variant.startswith("tracin") or variant == "mean-trajectory"
        flags = [] if no_lambdas else ["--valid-runs", "4"]
        argv = ["fit", str(ramp_exp), "--runs", "0-3", *flags, "--variant", variant]
        assert main([*argv, "--out", str(ref)]) == 0
        with np.load(out / f"sim_{variant}.npz") as got, np.load(ref) as want:
            assert sorted(got.files) == sorted(want.files), variant
            for key in want.files:
                if key == "provenance":  # the call that wrote it (command line, time): differs
                    continue
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{variant}: {key}")
