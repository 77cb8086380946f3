"""Momentum variants (linear-momentum, tracin-cp-momentum) against independent numpy references."""

import numpy as np
import pytest

from simfluence import momentum, runlog, tracin
from simfluence import simulators as S
from simfluence.cli import main
from simfluence.counterfactual import predicted_changes
from simfluence.demo_data import make_demo_experiment

# Tolerances, fixed up front.
FIT_RTOL = 1e-4  # CG (float32) vs dense float64 least squares: max error / largest |coefficient|
EQ_RTOL = 1e-5  # two float32 fits of the same system (linear vs linear-momentum at d = 0)
ROLL_RTOL = 1e-5  # float32 scan vs float64 numpy loop
RECOVER_RTOL = 1e-3  # noise-free momentum data, ridge 1e-9: the generating a, b come back
REMOVAL_TOL = 1e-4  # removal kernel (float32 scan) vs brute force: times max(|final loss|, 1)

N_TRAIN, N_TEST, BATCH = 12, 4, 3
LENGTHS = (40, 30, 50, 36)


def _true(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 0.02, (N_TEST, N_TRAIN)), rng.normal(-0.02, 0.03, (N_TEST, N_TRAIN))


def _ramp(t_r, r):
    return (np.minimum(np.arange(1, t_r + 1) / 20.0, 1.0) * 1e-3 * (1 + 0.3 * r)).astype(np.float32)


def _runs(seed=0, decay=0.6, noise=0.005, lr=False):
    """Runs of the momentum model (unrolled sum form) plus noise, with in-batch repeats; with
    ``lr`` each batch's change is scaled by a warm-up ramp's relative rate (returns the rates)."""
    rng = np.random.default_rng(seed)
    a, b = _true(seed)
    curs, ls, lrs = [], [], []
    lr_max = max(float(_ramp(t, r).max()) for r, t in enumerate(LENGTHS))
    for r, t_r in enumerate(LENGTHS):
        c = rng.integers(0, N_TRAIN, (t_r, BATCH)).astype(np.int32)
        c[::5, 1] = c[::5, 0]
        w = _ramp(t_r, r) / lr_max if lr else np.ones(t_r)
        loss = np.empty((t_r + 1, N_TEST))
        loss[0] = rng.uniform(1.5, 3.0, N_TEST)
        u = []  # each batch's change, taken at the loss it met
        for t in range(t_r):
            u.append(w[t] * (a[:, c[t]].sum(1) * loss[t] + b[:, c[t]].sum(1)))
            k = [(1 - decay) * decay ** (t - s) for s in range(t + 1)]
            loss[t + 1] = loss[t] + sum(ki * ui for ki, ui in zip(k, u, strict=True))
            loss[t + 1] += rng.normal(0, noise, N_TEST)
        curs.append(c)
        ls.append(loss.astype(np.float32))
        lrs.append(_ramp(t_r, r))
    return (curs, ls, lrs) if lr else (curs, ls)


def _counts(cur):
    m = np.zeros((cur.shape[0], N_TRAIN))
    for t, batch in enumerate(cur):
        for i in batch:
            m[t, i] += 1
    return m


def _dense_fit(curs, ls, decay, l2_a, l2_b, lrs=None):
    """float64 least squares (np.linalg.lstsq on the ridge-augmented system), per test example,
    of sum_t (D_t - d D_{t-1} - (1 - d) w_t sum_{c_t} (a_i L_{t-1} + b_i))^2 + ridge."""
    a_out = np.zeros((N_TEST, N_TRAIN))
    b_out = np.zeros((N_TEST, N_TRAIN))
    ws = [np.ones(c.shape[0]) for c in curs]
    if lrs is not None:
        lr_max = max(float(lr.max()) for lr in lrs)
        ws = [lr.astype(np.float64) / lr_max for lr in lrs]
    M = np.concatenate([_counts(c) * w[:, None] for c, w in zip(curs, ws, strict=True)])
    M *= 1 - decay
    for j in range(N_TEST):
        x = np.concatenate([loss[:-1, j] for loss in ls]).astype(np.float64)
        ys = []
        for loss in ls:
            dl = np.diff(loss[:, j].astype(np.float64))
            ys.append(dl - decay * np.concatenate([[0.0], dl[:-1]]))
        X = np.concatenate([M * x[:, None], M], axis=1)
        ridge = np.diag(np.sqrt(np.r_[np.full(N_TRAIN, l2_a), np.full(N_TRAIN, l2_b)]))
        theta = np.linalg.lstsq(
            np.vstack([X, ridge]), np.r_[np.concatenate(ys), np.zeros(2 * N_TRAIN)], rcond=None
        )[0]
        a_out[j], b_out[j] = theta[:N_TRAIN], theta[N_TRAIN:]
    return a_out, b_out


def _numpy_rollout(A, B, cur, l0, decay, w=None):
    """The unrolled sum: L_t = L_{t-1} + sum_{s<=t} (1-d) d^(t-s) w_s u_s (no recursion)."""
    a = np.asarray(A, np.float64) - 1.0 / cur.shape[1]
    B = np.asarray(B, np.float64)
    w = np.ones(cur.shape[0]) if w is None else np.asarray(w, np.float64)
    loss = [np.asarray(l0, np.float64)]
    u = []
    for t, ids in enumerate(cur):
        u.append(w[t] * sum(a[:, i] * loss[t] + B[:, i] for i in ids))
        loss.append(loss[t] + sum((1 - decay) * decay ** (t - s) * u[s] for s in range(t + 1)))
    return np.stack(loss)


def _close(got, want, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1e-30)
    assert np.abs(got - want).max() <= rtol * scale, np.abs(got - want).max() / scale


def test_zero_decay_is_the_linear_fit_rollout_and_removal():
    curs, ls = _runs(seed=1, decay=0.0)
    kw = dict(n_train=N_TRAIN, l2_a=1e-2, l2_b=1e-3)
    lin = S.fit(curs, ls, variant="linear", **kw)
    mom = S.fit(curs, ls, variant="linear-momentum", decay=0.0, **kw)
    assert mom.decay == 0.0 and lin.decay is None
    _close(mom.A, lin.A, EQ_RTOL)
    _close(mom.B, lin.B, EQ_RTOL)
    cur, l0 = curs[0], ls[0][0]
    _close(S.simulate(mom, cur, l0), S.simulate(lin, cur, l0), ROLL_RTOL)
    for j in (0, 3):
        lin_removal = S.removal_influence(lin, cur, l0, j)
        _close(S.removal_influence(mom, cur, l0, j), lin_removal, REMOVAL_TOL)


def test_fit_matches_dense_least_squares_and_recovers_the_model():
    curs, ls = _runs(seed=2, decay=0.6)
    sim = S.fit(
        curs, ls, n_train=N_TRAIN, variant="linear-momentum", decay=0.6, l2_a=1e-2, l2_b=1e-3
    )
    a, b = _dense_fit(curs, ls, 0.6, 1e-2, 1e-3)
    _close(np.asarray(sim.A, np.float64) - 1.0 / BATCH, a, FIT_RTOL)
    _close(sim.B, b, FIT_RTOL)
    # Noise-free data of the unrolled model: the fit returns the generating coefficients.
    curs, ls = _runs(seed=3, decay=0.6, noise=0.0)
    sim = S.fit(
        curs, ls, n_train=N_TRAIN, variant="linear-momentum", decay=0.6, l2_a=1e-9, l2_b=1e-9
    )
    a_true, b_true = _true(3)
    _close(np.asarray(sim.A, np.float64) - 1.0 / BATCH, a_true, RECOVER_RTOL)
    _close(sim.B, b_true, RECOVER_RTOL)


def test_rollout_removal_and_float64_scorer_match_numpy_loops(tmp_path):
    curs, ls = _runs(seed=4, decay=0.8)
    sim = S.fit(
        curs, ls, n_train=N_TRAIN, variant="linear-momentum", decay=0.8, l2_a=1e-2, l2_b=1e-3
    )
    cur, l0 = curs[0], ls[0][0]  # the shapes of the test above: no new compiles
    want = _numpy_rollout(sim.A, sim.B, cur, l0, 0.8)
    _close(S.simulate(sim, cur, l0), want, ROLL_RTOL)
    _close(
        S.simulate(sim, cur[::-1], l0), _numpy_rollout(sim.A, sim.B, cur[::-1], l0, 0.8), ROLL_RTOL
    )
    # Removal: brute force, the example's slots made neutral (A = 1/batch, B = 0).
    j = 2
    got = np.asarray(S.removal_influence(sim, cur, l0, j))
    for i in range(N_TRAIN):
        A, B = np.array(sim.A, np.float64), np.array(sim.B, np.float64)
        A[:, i], B[:, i] = 1.0 / BATCH, 0.0
        brute = _numpy_rollout(A, B, cur, l0, 0.8)[-1, j] - want[-1, j]
        assert abs(got[i] - brute) <= REMOVAL_TOL * max(abs(want[-1, j]), 1.0), (i, got[i], brute)
    # The counterfactual scorer's float64 rollout, and the file round trip with its decay.
    ch = predicted_changes(sim, cur[::-1][None], cur[None], l0[None])
    _close(ch[0], _numpy_rollout(sim.A, sim.B, cur[::-1], l0, 0.8)[-1] - want[-1], 1e-6)
    S.save_simulator(tmp_path / "m.npz", sim)
    back = S.load_simulator(tmp_path / "m.npz")
    assert back.variant == "linear-momentum" and back.decay == 0.8
    with np.load(tmp_path / "m.npz") as z:
        np.savez(tmp_path / "bad.npz", **{k: z[k] for k in z.files if k != "decay"})
    with pytest.raises(ValueError, match="without its decay"):
        S.load_simulator(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="pass decay"):
        S.fit(curs, ls, n_train=N_TRAIN, variant="linear-momentum")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        S.fit(curs, ls, n_train=N_TRAIN, variant="linear-momentum", decay=1.0)


def test_tracin_spread_zero_decay_and_scale(tmp_path):
    exp = tmp_path / "exp"
    make_demo_experiment(exp, n_runs=4, n_train=10, n_test=3, batch=2, steps=12, tracin=True)
    runs = runlog.load_runs(exp)
    plain = tracin.from_runs(runs[:2])
    rescaled = tracin.from_runs(runs[:2], variant="tracin-cp-rescaled")
    zero = tracin.from_runs(runs[:2], variant="tracin-cp-momentum", decay=0.0)
    assert zero.scale == pytest.approx(rescaled.scale, rel=1e-9)
    r = runs[3]
    one = tracin.with_decay(plain, runs[:2], 0.0)
    import dataclasses

    one = dataclasses.replace(one, scale=1.0)  # d = 0 and s = 1: tracin-cp itself
    np.testing.assert_array_equal(
        tracin.simulate_tracin(one, r.curriculum, r.losses[0], r.lr),
        tracin.simulate_tracin(plain, r.curriculum, r.losses[0], r.lr),
    )
    # d = 0.7: the unrolled weights on the scaled per-step changes, scale by least squares.
    sim = tracin.from_runs(runs[:2], variant="tracin-cp-momentum", decay=0.7)
    delta = tracin.predicted_deltas(plain, r.curriculum, r.lr).astype(np.float64)
    T = delta.shape[0]
    W = np.array([[0.3 * 0.7 ** (t - s) if s <= t else 0.0 for s in range(T)] for t in range(T)])
    want = r.losses[0] + np.cumsum(sim.scale * (W @ delta), axis=0)
    _close(tracin.simulate_tracin(sim, r.curriculum, r.losses[0], r.lr)[1:], want, ROLL_RTOL)
    num = den = 0.0
    for f in runs[:2]:
        p = W[: f.steps, : f.steps] @ tracin.predicted_deltas(plain, f.curriculum, f.lr)
        num += float((p * np.diff(f.losses.astype(np.float64), axis=0)).sum())
        den += float((p * p).sum())
    assert sim.scale == pytest.approx(num / den, rel=1e-5)
    tracin.save_tracin_simulator(tmp_path / "t.npz", sim)
    assert tracin.load_tracin_simulator(tmp_path / "t.npz").decay == 0.7


def test_decay_is_chosen_on_validation_runs_only(tmp_path, monkeypatch):
    """evaluate and fit choose d (and the lambdas) on the validation runs: the curricula the
    search sees are the validation runs', and scrambling the held-out runs changes nothing."""
    exp = tmp_path / "exp"
    make_demo_experiment(exp, n_runs=7, n_train=10, n_test=3, batch=2, steps=16, tracin=True)
    from simfluence.evaluation import evaluate

    seen = []
    real = S.select_lambdas

    def spy(fit_c, fit_l, valid_c, valid_l, **kw):
        seen.append([np.asarray(c).copy() for c in valid_c])
        return real(fit_c, fit_l, valid_c, valid_l, **kw)

    monkeypatch.setattr(S, "select_lambdas", spy)
    variants = ["linear-momentum", "tracin-cp-momentum"]
    saved = tmp_path / "sims"
    res = evaluate(exp, split=(4, 1, 2), variants=variants, grid=(1e-2, 1.0), save_dir=saved)
    runs = runlog.load_runs(exp)
    assert res["split"]["valid"] == [4]
    assert len(seen) == len(momentum.DECAY_GRID)
    assert all(len(v) == 1 and np.array_equal(v[0], runs[4].curriculum) for v in seen)
    e, t = res["variants"]["linear-momentum"], res["variants"]["tracin-cp-momentum"]
    assert e["decay_source"] == "validation" and e["decay"] in momentum.DECAY_GRID
    assert {row["decay"] for row in e["lambda_search"]} == set(momentum.DECAY_GRID)
    best = min(e["lambda_search"], key=lambda row: row["valid_mse"])
    assert (best["decay"], best["l2_a"], best["l2_b"]) == (e["decay"], e["l2_a"], e["l2_b"])
    assert t["decay"] == min(t["decay_search"], key=lambda row: row["valid_mse"])["decay"]
    # Held-out runs 5 and 6 scrambled: TracIn-CP's choice of d stays (its search has no spy).
    for r in runs[5:]:
        np.save(r.path / "losses.npy", r.losses[::-1].copy())
    again = evaluate(exp, split=(4, 1, 2), variants=["tracin-cp-momentum"])
    assert again["variants"]["tracin-cp-momentum"]["decay_search"] == t["decay_search"]
    # The CLI records d in the simulator file: chosen on --valid-runs (TracIn-CP, cheap) or
    # given (--decay; the linear-momentum search is the one evaluate ran above).
    out = tmp_path / "t.npz"
    argv = ["fit", str(exp), "--runs", "0-3", "--valid-runs", "4", "--variant"]
    assert main([*argv, "tracin-cp-momentum", "--out", str(out)]) == 0
    assert tracin.load_tracin_simulator(out).decay == t["decay"]
    with np.load(out) as want, np.load(saved / "sim_tracin-cp-momentum.npz") as got:
        assert sorted(got.files) == sorted(want.files)  # evaluate saves what fit writes
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert S.load_simulator(saved / "sim_linear-momentum.npz").decay == e["decay"]
    out = tmp_path / "m.npz"
    argv = ["fit", str(exp), "--runs", "0-3", "--variant", "linear-momentum", "--decay", "0.5"]
    assert main([*argv, "--l2-a", "1", "--l2-b", "1", "--out", str(out)]) == 0
    assert S.load_simulator(out).decay == 0.5
    with pytest.raises(SystemExit) as e:
        main([*argv[:-3], "linear", "--decay", "0.5", "--out", str(out)])
    assert e.value.code == 2


def test_lr_momentum_matches_dense_numpy_and_zero_decay_is_linear_lr():
    curs, ls, lrs = _runs(seed=5, decay=0.7, lr=True)
    kw = dict(n_train=N_TRAIN, variant="linear-lr-momentum", l2_a=1e-2, l2_b=1e-3, lrs=lrs)
    sim = S.fit(curs, ls, decay=0.7, **kw)
    a, b = _dense_fit(curs, ls, 0.7, 1e-2, 1e-3, lrs)
    _close(np.asarray(sim.A, np.float64) - 1.0 / BATCH, a, FIT_RTOL)
    _close(sim.B, b, FIT_RTOL)
    lr_max = max(float(lr.max()) for lr in lrs)
    assert sim.lr_max == pytest.approx(lr_max) and sim.decay == 0.7
    cur, l0, lr = curs[0], ls[0][0], lrs[0]
    want = _numpy_rollout(sim.A, sim.B, cur, l0, 0.7, lr / lr_max)
    _close(S.simulate(sim, cur, l0, lr=lr), want, ROLL_RTOL)
    with pytest.raises(ValueError, match="pass lr"):
        S.simulate(sim, cur, l0)
    got = np.asarray(S.removal_influence(sim, cur, l0, 1, lr=lr))
    for i in (0, 5, 11):
        A, B = np.array(sim.A, np.float64), np.array(sim.B, np.float64)
        A[:, i], B[:, i] = 1.0 / BATCH, 0.0
        brute = _numpy_rollout(A, B, cur, l0, 0.7, lr / lr_max)[-1, 1] - want[-1, 1]
        assert abs(got[i] - brute) <= REMOVAL_TOL * max(abs(want[-1, 1]), 1.0), (i, got[i], brute)
    ch = predicted_changes(sim, cur[::-1][None], cur[None], l0[None], lr[None])
    rev = _numpy_rollout(sim.A, sim.B, cur[::-1], l0, 0.7, lr / lr_max)[-1]
    _close(ch[0], rev - want[-1], 1e-6)
    lin = S.fit(curs, ls, **{**kw, "variant": "linear-lr"})
    zero = S.fit(curs, ls, decay=0.0, **kw)
    _close(zero.A, lin.A, EQ_RTOL)
    _close(zero.B, lin.B, EQ_RTOL)
