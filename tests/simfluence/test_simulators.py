"""Simfluence simulators against independent references: dense solves and numpy loops."""

import numpy as np
import pytest

from simfluence import demo_data
from simfluence import simulators as S

# Tolerances, fixed up front.
FIT_RTOL = 1e-4  # CG (float32) vs dense float64 solve, relative to the largest |A|, |B|
DEV_RTOL = 1e-3  # A - a0 (the fitted deviation itself) relative to its largest magnitude
ROLL_RTOL = 1e-5  # float32 scan vs float64 numpy loop

# One set of sizes for every fit in this file, so the jitted solver compiles once per variant:
# 1600 design rows (8 runs of different lengths, or 8 x 200 in the recovery test).
N_TRAIN, N_TEST, BATCH = 20, 8, 3
LENGTHS = (300, 180, 220, 200, 200, 150, 170, 180)


def _runs(seed=0, lengths=LENGTHS, unseen=1):
    """Runs of different lengths with repeats inside batches; the last `unseen` ids never used."""
    rng = np.random.default_rng(seed)
    A, B = demo_data.synthetic_simulator(rng, N_TRAIN, N_TEST, BATCH)
    curs, ls = [], []
    for t_r in lengths:
        c = rng.integers(0, N_TRAIN - unseen, (t_r, BATCH)).astype(np.int32)
        c[::4, 1] = c[::4, 0]  # a repeat in every fourth batch
        loss = np.empty((t_r + 1, N_TEST))
        loss[0] = rng.uniform(1.5, 3.0, N_TEST)
        for t in range(t_r):  # the known linear simulator plus process noise
            alpha, beta = A[:, c[t]].sum(1), B[:, c[t]].sum(1)
            loss[t + 1] = alpha * loss[t] + beta + rng.normal(0, 0.01, N_TEST)
        curs.append(c)
        ls.append(loss.astype(np.float32))
    return A, B, curs, ls


def _numpy_rollout(A, B, cur, l0, additive=False):
    """Plain float64 loop; `cur` may be a list of ragged batches."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    loss = np.asarray(l0, np.float64).copy()
    out = [loss.copy()]
    for batch in cur:
        alpha = np.ones(A.shape[0]) if additive else np.zeros(A.shape[0])
        beta = np.zeros(A.shape[0])
        for i in batch:
            if not additive:
                alpha += A[:, i]
            beta += B[:, i]
        loss = alpha * loss + beta
        out.append(loss.copy())
    return np.stack(out)


def _dense_fit(curs, ls, n, variant, l2_a, l2_b, a0):
    """Per test example: dense design X, normal equations with the prior, np.linalg.solve."""
    b = curs[0].shape[1]
    ids = np.concatenate(curs)
    M = np.zeros((ids.shape[0], n))  # [rows, n_train] counts with repeats
    for r in range(ids.shape[0]):
        for k in range(b):
            M[r, ids[r, k]] += 1
    n_test = ls[0].shape[1]
    A = np.zeros((n_test, n))
    B = np.zeros((n_test, n))
    for j in range(n_test):
        x = np.concatenate([loss[:-1, j] for loss in ls]).astype(np.float64)
        y = np.concatenate([loss[1:, j] for loss in ls]).astype(np.float64)
        if variant == "linear":
            X = np.concatenate([M * x[:, None], M], axis=1)
            reg = np.diag(np.concatenate([np.full(n, l2_a), np.full(n, l2_b)]))
            rhs = X.T @ y + np.concatenate([np.full(n, l2_a * a0), np.zeros(n)])
            theta = np.linalg.solve(X.T @ X + reg, rhs)
            A[j], B[j] = theta[:n], theta[n:]
        elif variant == "additive":  # alpha == 1: regress L_t - L_{t-1} on counts
            B[j] = np.linalg.solve(M.T @ M + l2_b * np.eye(n), M.T @ (y - x))
            A[j] = 1.0 / b
        else:  # beta == 0
            X = M * x[:, None]
            A[j] = np.linalg.solve(X.T @ X + l2_a * np.eye(n), X.T @ y + l2_a * a0)
    return A, B


@pytest.mark.parametrize("variant", S.VARIANTS)
@pytest.mark.parametrize("a_prior", [None, 0.0])
def test_fit_matches_dense_solve(variant, a_prior):
    _, _, curs, ls = _runs()
    l2_a, l2_b = 0.3, 0.05
    sim = S.fit(curs, ls, n_train=N_TRAIN, variant=variant, l2_a=l2_a, l2_b=l2_b, a_prior=a_prior)
    a0 = 1.0 / BATCH if a_prior is None else a_prior
    dA, dB = _dense_fit(curs, ls, N_TRAIN, variant, l2_a, l2_b, a0)
    A, B = np.asarray(sim.A), np.asarray(sim.B)
    assert A.shape == B.shape == (N_TEST, N_TRAIN) and A.dtype == np.float32
    scale = max(np.abs(dA).max(), np.abs(dB).max())
    np.testing.assert_allclose(A, dA, rtol=0, atol=FIT_RTOL * scale)
    np.testing.assert_allclose(B, dB, rtol=0, atol=FIT_RTOL * scale)
    if variant != "additive":
        dev = dA - a0
        np.testing.assert_allclose(A - a0, dev, rtol=0, atol=DEV_RTOL * np.abs(dev).max())
    if variant != "multiplicative":
        np.testing.assert_allclose(B, dB, rtol=0, atol=DEV_RTOL * np.abs(dB).max())
    # The never-seen example sits exactly at the prior.
    if variant != "additive":
        np.testing.assert_allclose(A[:, -1], a0, atol=1e-7)
    np.testing.assert_allclose(B[:, -1], 0.0, atol=1e-7)
    assert (sim.variant, sim.l2_a, sim.l2_b, sim.a_prior) == (variant, l2_a, l2_b, a0)


def _all_steps_mse(pred, true):
    return float(np.mean((np.asarray(pred)[1:] - true[1:]) ** 2))


def test_recovery_of_a_known_linear_simulator():
    rng = np.random.default_rng(3)
    n_train, n_test, batch = N_TRAIN, N_TEST, BATCH
    A, B = demo_data.synthetic_simulator(rng, n_train, n_test, batch)
    curs, ls = demo_data.synthetic_runs(rng, A, B, 12, 200, batch, noise=0.01)
    fit_c, fit_l, held_c, held_l = curs[:8], ls[:8], curs[8:], ls[8:]
    truth = S.Simulator(A=A, B=B, variant="linear", l2_a=0.0, l2_b=0.0, a_prior=1 / batch)
    mse = {}
    for variant in S.VARIANTS:
        sim = S.fit(fit_c, fit_l, n_train=n_train, variant=variant, l2_a=1e-3, l2_b=1e-3)
        mse[variant] = np.mean(
            [
                _all_steps_mse(S.simulate(sim, c, lo[0]), lo)
                for c, lo in zip(held_c, held_l, strict=True)
            ]
        )
    true_mse = np.mean(
        [
            _all_steps_mse(S.simulate(truth, c, lo[0]), lo)
            for c, lo in zip(held_c, held_l, strict=True)
        ]
    )
    assert mse["linear"] < 0.5 * mse["additive"], mse
    assert mse["linear"] < 0.5 * mse["multiplicative"], mse
    assert mse["linear"] < 1.5 * true_mse, (mse, true_mse)


@pytest.mark.parametrize("variant", S.VARIANTS)
def test_rollout_matches_numpy_loop(variant):
    rng = np.random.default_rng(1)
    # alpha within a few percent of 1 keeps the losses O(1), where a relative tolerance applies.
    A = rng.uniform(0.32, 0.345, (N_TEST, N_TRAIN)).astype(np.float32)
    B = rng.normal(0, 0.02, (N_TEST, N_TRAIN)).astype(np.float32)
    if variant == "multiplicative":
        B[:] = 0
    sim = S.Simulator(A=A, B=B, variant=variant, l2_a=0.0, l2_b=0.0, a_prior=1 / BATCH)
    curs = rng.integers(0, N_TRAIN, (3, 40, BATCH)).astype(np.int32)
    curs[:, ::5, 2] = curs[:, ::5, 0]  # repeats count twice
    l0 = rng.uniform(1, 3, (3, N_TEST)).astype(np.float32)
    many = np.asarray(S.simulate_many(sim, curs, l0))
    assert many.shape == (3, 41, N_TEST) and many.dtype == np.float32
    for r in range(3):
        one = np.asarray(S.simulate(sim, curs[r], l0[r]))
        ref = _numpy_rollout(A, B, curs[r], l0[r], additive=variant == "additive")
        np.testing.assert_allclose(one, ref, rtol=ROLL_RTOL, atol=0)
        np.testing.assert_allclose(many[r], one, rtol=1e-6, atol=0)


def test_simulate_is_usable_inside_jit_and_compiles_once():
    import jax

    rng = np.random.default_rng(2)
    A = rng.uniform(0.3, 0.35, (N_TEST, N_TRAIN)).astype(np.float32)
    B = rng.normal(0, 0.01, (N_TEST, N_TRAIN)).astype(np.float32)
    sim = S.Simulator(A=A, B=B, variant="linear", l2_a=0.0, l2_b=0.0, a_prior=1 / 3)
    cur = rng.integers(0, N_TRAIN, (25, 3)).astype(np.int32)
    l0 = np.ones(N_TEST, np.float32)

    @jax.jit
    def final(s, c, l0):
        return S.simulate(s, c, l0)[-1]

    ref = _numpy_rollout(A, B, cur, l0)[-1]
    np.testing.assert_allclose(final(sim, cur, l0), ref, rtol=ROLL_RTOL)
    before = S._rollout_runs._cache_size()
    S.simulate(sim, cur, l0)
    S.simulate(sim, cur + 0, l0 * 2)
    assert S._rollout_runs._cache_size() == before + 1  # second call with the same shapes reuses it


@pytest.mark.parametrize("variant", S.VARIANTS)
def test_removal_influence_matches_brute_force(variant):
    rng = np.random.default_rng(4)
    A = rng.uniform(0.3, 0.36, (N_TEST, N_TRAIN)).astype(np.float32)
    B = rng.normal(0, 0.02, (N_TEST, N_TRAIN)).astype(np.float32)
    if variant == "multiplicative":
        B[:] = 0
    sim = S.Simulator(A=A, B=B, variant=variant, l2_a=0.0, l2_b=0.0, a_prior=1 / 3)
    cur = rng.integers(0, N_TRAIN - 1, (30, BATCH)).astype(np.int32)  # id N_TRAIN-1 absent
    cur[3] = [2, 2, 5]  # a repeated slot
    l0 = rng.uniform(1, 2, N_TEST).astype(np.float32)
    j = 3
    infl = np.asarray(S.removal_influence(sim, cur, l0, j))
    assert infl.shape == (N_TRAIN,) and infl.dtype == np.float32
    additive = variant == "additive"
    full = _numpy_rollout(A, B, cur, l0, additive)[-1, j]
    # A removed slot becomes a neutral example (A = 1/batch, B = 0): column N_TRAIN here.
    A_n = np.concatenate([A, np.full((N_TEST, 1), 1 / BATCH, np.float32)], axis=1)
    B_n = np.concatenate([B, np.zeros((N_TEST, 1), np.float32)], axis=1)
    for i in [2, 5, 7, N_TRAIN - 1]:
        neutral = np.where(cur == i, N_TRAIN, cur)
        brute = _numpy_rollout(A_n, B_n, neutral, l0, additive)[-1, j] - full
        assert infl[i] == pytest.approx(brute, abs=1e-5 * max(1.0, abs(full)))
    assert infl[N_TRAIN - 1] == 0.0


def test_select_lambdas_picks_the_lowest_validation_mse():
    _, _, curs, ls = _runs(seed=5, lengths=LENGTHS + (150, 150))
    fit_c, fit_l, val_c, val_l = curs[:-2], ls[:-2], curs[-2:], ls[-2:]
    grid = [1e-2, 1e2]
    l2_a, l2_b, table = S.select_lambdas(
        fit_c, fit_l, val_c, val_l, n_train=N_TRAIN, variant="linear", grid=grid
    )
    pts = [(a, b) for a in grid for b in grid]
    assert [(row["l2_a"], row["l2_b"]) for row in table] == pts
    brute = []
    for a, b in pts:
        sim = S.fit(fit_c, fit_l, n_train=N_TRAIN, variant="linear", l2_a=a, l2_b=b)
        brute.append(
            np.mean(
                [
                    _all_steps_mse(S.simulate(sim, c, lo[0]), lo)
                    for c, lo in zip(val_c, val_l, strict=True)
                ]
            )
        )
    np.testing.assert_allclose([row["valid_mse"] for row in table], brute, rtol=1e-3)
    assert (l2_a, l2_b) == pts[int(np.argmin(brute))]
    # Ablations search one axis only.
    a, b, table = S.select_lambdas(
        fit_c, fit_l, val_c, val_l, n_train=N_TRAIN, variant="additive", grid=grid
    )
    assert [row["l2_b"] for row in table] == grid and a == 0.0 and b in grid


def test_save_load_round_trip(tmp_path):
    _, _, curs, ls = _runs()
    sim = S.fit(curs, ls, n_train=N_TRAIN, variant="linear", l2_a=0.3, l2_b=0.05)
    path = tmp_path / "sim.npz"
    S.save_simulator(path, sim)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sim.npz"]  # no temporary left
    back = S.load_simulator(path)
    np.testing.assert_array_equal(np.asarray(back.A), np.asarray(sim.A))
    np.testing.assert_array_equal(np.asarray(back.B), np.asarray(sim.B))
    assert (back.variant, back.l2_a, back.l2_b, back.a_prior, back.batch) == (
        sim.variant,
        sim.l2_a,
        sim.l2_b,
        sim.a_prior,
        BATCH,
    )
    # A file from before `batch` was recorded loads with batch unknown (no batch check).
    with np.load(path) as z:
        np.savez(tmp_path / "old.npz", **{k: z[k] for k in z.files if k != "batch"})
    assert S.load_simulator(tmp_path / "old.npz").batch is None


def test_bad_inputs_raise_one_line_errors(tmp_path):
    _, _, curs, ls = _runs()

    def raises(match, fn, *a, **k):
        with pytest.raises(ValueError, match=match) as info:
            fn(*a, **k)
        assert "\n" not in str(info.value)

    raises("unknown simulator variant 'cubic'", S.fit, curs, ls, n_train=N_TRAIN, variant="cubic")
    bad = [c.copy() for c in curs]
    bad[1][0, 0] = N_TRAIN
    raises(f"run 1: curriculum id {N_TRAIN} is outside", S.fit, bad, ls, n_train=N_TRAIN)
    raises("run 0: losses have shape", S.fit, curs, [ls[0][:-1]] + ls[1:], n_train=N_TRAIN)
    raises("losses have shape", S.fit, curs[:3], [ls[0], ls[1][:, :2], ls[2]], n_train=N_TRAIN)
    nan = [loss.copy() for loss in ls]
    nan[2][4, 1] = np.nan
    raises(
        "run 2: non-finite loss nan at step 4, test example 1", S.fit, curs, nan, n_train=N_TRAIN
    )
    raises("batch size 2 differs", S.fit, [curs[0], curs[1][:, :2]], ls[:2], n_train=N_TRAIN)
    raises("2 curricula but 3 loss arrays", S.fit, curs[:2], ls[:3], n_train=N_TRAIN)
    raises("l2_a=-1.0", S.fit, curs, ls, n_train=N_TRAIN, l2_a=-1.0)
    raises("tol=-1.0 must be finite and > 0", S.fit, curs, ls, n_train=N_TRAIN, tol=-1.0)
    raises("max_iter=0 must be an int >= 1", S.fit, curs, ls, n_train=N_TRAIN, max_iter=0)
    raises(
        r"curricula is one 2-D array .* \(a single run: \[curriculum\]\)",
        S.fit,
        curs[0],
        ls[0],
        n_train=N_TRAIN,
    )
    sim = S.fit(curs, ls, n_train=N_TRAIN)
    raises("curriculum id -1 is outside", S.simulate, sim, np.full((3, 3), -1), ls[0][0])
    raises("initial_losses have shape", S.simulate, sim, curs[0], np.ones(N_TEST + 1))
    raises("initial_losses contain NaN", S.simulate, sim, curs[0], np.full(N_TEST, np.inf))
    raises("test_index=9 is outside", S.removal_influence, sim, curs[0], ls[0][0], 9)
    wide = np.concatenate([curs[0], curs[0]], axis=1)  # batch 6, fitted on 3
    for fn, args in ((S.simulate, ()), (S.removal_influence, (0,))):
        raises(
            "curriculum has batch 6 but the simulator was fitted on batch 3",
            fn,
            sim,
            wide,
            ls[0][0],
            *args,
        )
    raises(
        r"curriculum has shape \(5, 0\); expected int \[steps, batch\], sizes >= 1",
        S.simulate,
        sim,
        np.zeros((5, 0), np.int32),
        ls[0][0],
    )
    raises(
        r"curriculum has shape \(0, 5, 3\)",
        S.simulate_many,
        sim,
        np.zeros((0, 5, 3), np.int32),
        np.zeros((0, N_TEST), np.float32),
    )
    # A hand-built simulator whose A and B disagree (removal_influence used to read past B).
    mismatched = S.Simulator(
        A=sim.A, B=sim.B[:, :-2], variant="linear", l2_a=0.0, l2_b=0.0, a_prior=0.0
    )
    for fn in (S.simulate, S.removal_influence):
        args = (mismatched, curs[0], ls[0][0]) + ((0,) if fn is S.removal_influence else ())
        raises(r"Simulator A has shape \(8, 20\) and B \(8, 18\)", fn, *args)
    raises("Simulator A has shape", S.save_simulator, tmp_path / "bad.npz", mismatched)
    assert not (tmp_path / "bad.npz").exists()
    raises("does not exist", S.load_simulator, tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", A=np.zeros((2, 2)))
    raises("missing B, variant", S.load_simulator, tmp_path / "other.npz")
    raises(
        "grid has shape",
        S.select_lambdas,
        curs,
        ls,
        curs,
        ls,
        n_train=N_TRAIN,
        variant="linear",
        grid=[[1.0, 2.0, 3.0]],
    )


# ----------------------------------------------------------------------------------------------
# Lambda search beyond the default grid
# ----------------------------------------------------------------------------------------------

# Validation MSE of the search (float32 fits and rollouts) vs the float64 dense reference:
# relative MSE_RTOL, plus the error LOSS_ATOL of one float32-rolled-out loss (|L| <= 3, <= 300
# steps) propagated into the MSE, which dominates when the MSE itself is tiny.
MSE_RTOL = 1e-4
LOSS_ATOL = 1e-5
# The reference search's decisions must be unambiguous: at every round, the runner-up MSE is at
# least this much (relative) above the best one, more than the ties' 1e-4 plus twice the
# relative MSE error allowed above (about 2e-4 at the MSEs of these runs).
PATH_MARGIN = 1e-3
CAP_EXPONENTS = (-8, 6)  # the default search's caps 1e-8 and 1e6, as powers of ten


def _mse_close(mse: float, ref: float) -> bool:
    return abs(mse - ref) <= MSE_RTOL * ref + 2 * np.sqrt(ref) * LOSS_ATOL + LOSS_ATOL**2


def _dense_validation_mse(fit_c, fit_l, val_c, val_l, variant, a0):
    """float64 reference for one lambda point: dense ridge fits, numpy rollouts, mean MSE.

    The per-test Gram matrices are built once (dense counts, as in `_dense_fit`); each call
    solves them at (l2_a, l2_b) and rolls every validation run out from its L_0.
    """
    n = N_TRAIN
    ids = np.concatenate(fit_c)
    M = np.zeros((ids.shape[0], n))  # [rows, n_train] counts with repeats
    np.add.at(M, (np.arange(ids.shape[0])[:, None], ids), 1.0)
    x = np.concatenate([loss[:-1] for loss in fit_l]).astype(np.float64)  # [rows, n_test]
    y = np.concatenate([loss[1:] for loss in fit_l]).astype(np.float64)
    grams = []
    for j in range(x.shape[1]):
        if variant == "additive":  # alpha == 1: regress L_t - L_{t-1} on counts
            grams.append((M.T @ M, M.T @ (y[:, j] - x[:, j])))
        else:
            X = M * x[:, j : j + 1]
            if variant == "linear":
                X = np.concatenate([X, M], axis=1)
            grams.append((X.T @ X, X.T @ y[:, j]))
    counts = []
    for c in val_c:
        C = np.zeros((c.shape[0], n))  # [T, n_train]
        np.add.at(C, (np.arange(c.shape[0])[:, None], c), 1.0)
        counts.append(C)
    cache = {}

    def mse(l2_a, l2_b):
        if (l2_a, l2_b) in cache:
            return cache[l2_a, l2_b]
        A = np.full((x.shape[1], n), 1.0 / BATCH)
        B = np.zeros((x.shape[1], n))
        for j, (G, r) in enumerate(grams):
            if variant == "linear":
                lam = np.concatenate([np.full(n, l2_a), np.full(n, l2_b)])
                prior = np.concatenate([np.full(n, a0), np.zeros(n)])
                theta = np.linalg.solve(G + np.diag(lam), r + lam * prior)
                A[j], B[j] = theta[:n], theta[n:]
            elif variant == "additive":
                B[j] = np.linalg.solve(G + l2_b * np.eye(n), r)
            else:
                A[j] = np.linalg.solve(G + l2_a * np.eye(n), r + l2_a * a0)
        per_run = []
        for C, loss in zip(counts, val_l, strict=True):
            alpha = np.ones((C.shape[0], x.shape[1])) if variant == "additive" else C @ A.T
            beta = C @ B.T  # [T, n_test]
            pred = loss[0].astype(np.float64)
            sse = 0.0
            for t in range(C.shape[0]):
                pred = alpha[t] * pred + beta[t]
                sse += np.sum((pred - loss[t + 1]) ** 2)
            per_run.append(sse / (C.shape[0] * x.shape[1]))
        cache[l2_a, l2_b] = float(np.mean(per_run))
        return cache[l2_a, l2_b]

    return mse


def _decade(k: int) -> float:
    return float(f"1e{k}")


def _reference_search(mse, use_a: bool, use_b: bool):
    """The extension rule on reference MSEs, by powers of ten; returns (points, best point).

    Start from 1e-4..1e2 on every used axis; while the exhaustive best point of the current
    product grid has an axis at the largest (smallest) exponent and that exponent is below
    (above) its cap, add one decade there. Asserts that every round's best point is unique by
    PATH_MARGIN, so ties (and their tie-break) play no part.
    """
    span = [[-4, 2] if use else None for use in (use_a, use_b)]
    while True:
        axes = [[_decade(k) for k in range(s[0], s[1] + 1)] if s else [0.0] for s in span]
        pts = [(a, b) for a in axes[0] for b in axes[1]]
        vals = np.array([mse(*p) for p in pts])
        order = np.argsort(vals)
        assert vals[order[1]] > (1 + PATH_MARGIN) * vals[order[0]], "ambiguous reference path"
        best = pts[order[0]]
        grown = False
        for k, s in enumerate(span):
            if s is None:
                continue
            if best[k] == _decade(s[1]) and s[1] < CAP_EXPONENTS[1]:
                s[1] += 1
                grown = True
            elif best[k] == _decade(s[0]) and s[0] > CAP_EXPONENTS[0]:
                s[0] -= 1
                grown = True
        if not grown:
            return pts, best


def _weak_runs(seed: int):
    """Runs whose per-example effects are small against the noise: strong ridge wins."""
    rng = np.random.default_rng(seed)
    rate = rng.uniform(0.0, 1e-3, (N_TEST, N_TRAIN))
    floor = rng.uniform(0.2, 1.0, (N_TEST, 1))
    push = rng.normal(0.0, 5e-4, (N_TEST, N_TRAIN))
    A, B = (1.0 - rate) / BATCH, (rate * floor + push) / BATCH
    curs, ls = [], []
    for t_r in LENGTHS + (150, 150):
        c = rng.integers(0, N_TRAIN, (t_r, BATCH)).astype(np.int32)
        loss = np.empty((t_r + 1, N_TEST))
        loss[0] = rng.uniform(1.5, 3.0, N_TEST)
        for t in range(t_r):
            loss[t + 1] = A[:, c[t]].sum(1) * loss[t] + B[:, c[t]].sum(1)
            loss[t + 1] += rng.normal(0.0, 0.02, N_TEST)
        curs.append(c)
        ls.append(loss.astype(np.float32))
    return curs[:-2], ls[:-2], curs[-2:], ls[-2:]


def _flat_validation_runs(seed: int):
    """Fitting runs that are pure noise, validation runs whose losses never move.

    Any learned deviation from the prior then hurts on validation: the validation MSE keeps
    falling as the ridge grows, so the search must run into the upper caps.
    """
    rng = np.random.default_rng(seed)
    curs, ls = [], []
    for k, t_r in enumerate(LENGTHS + (150, 150)):
        curs.append(rng.integers(0, N_TRAIN, (t_r, BATCH)).astype(np.int32))
        loss = np.repeat(rng.uniform(1.5, 3.0, (1, N_TEST)), t_r + 1, axis=0)
        if k < len(LENGTHS):
            loss[1:] += np.cumsum(rng.normal(0.0, 0.01, (t_r, N_TEST)), axis=0)
        ls.append(loss.astype(np.float32))
    return curs[:-2], ls[:-2], curs[-2:], ls[-2:]


def _search(runs, variant, grid=None):
    """select_lambdas, returning also the cap warnings it raised."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        l2_a, l2_b, table = S.select_lambdas(*runs, n_train=N_TRAIN, variant=variant, grid=grid)
    msgs = [str(w.message) for w in caught if "lambda search" in str(w.message)]
    return l2_a, l2_b, table, msgs


def _check_against_reference(table, mse):
    pts = [(row["l2_a"], row["l2_b"]) for row in table]
    assert pts == sorted(set(pts)), "each point once, in grid order"
    for row, p in zip(table, pts, strict=True):
        assert _mse_close(row["valid_mse"], mse(*p)), (p, row["valid_mse"], mse(*p))
    return pts


def test_extended_search_runs_into_the_caps_like_an_exhaustive_search():
    runs = _flat_validation_runs(seed=0)
    mse = _dense_validation_mse(*runs, "linear", 1 / BATCH)
    l2_a, l2_b, table, msgs = _search(runs, "linear")
    ref_pts, ref_best = _reference_search(mse, True, True)
    assert ref_best == (1e6, 1e6)  # the scenario: both lambdas want to grow past the caps
    pts = _check_against_reference(table, mse)
    assert set(pts) == set(ref_pts)  # exactly the extended product grid, nothing else
    assert (l2_a, l2_b) == ref_best
    default = {(a, b) for a in S.DEFAULT_GRID for b in S.DEFAULT_GRID}
    assert {p for p, row in zip(pts, table, strict=True) if row["round"] == 0} == default
    assert S.lambda_edges(table, "linear", l2_a, l2_b) == {"l2_a": "upper", "l2_b": "upper"}
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert "l2_a=1e+06 (upper cap), l2_b=1e+06 (upper cap)" in msgs[0]


@pytest.mark.parametrize("variant", ["additive", "multiplicative"])
def test_extended_search_finds_an_optimum_beyond_the_default_grid(variant):
    runs = _weak_runs(seed=1)
    mse = _dense_validation_mse(*runs, variant, 1 / BATCH)
    l2_a, l2_b, table, msgs = _search(runs, variant)
    use_a = variant == "multiplicative"
    ref_pts, ref_best = _reference_search(mse, use_a, not use_a)
    pts = _check_against_reference(table, mse)
    assert set(pts) == set(ref_pts) and (l2_a, l2_b) == ref_best
    chosen = l2_a if use_a else l2_b
    assert max(S.DEFAULT_GRID) < chosen < _decade(CAP_EXPONENTS[1])  # beyond 1e2, interior
    # Exhaustive over every decade up to the caps: the same point, by a clear margin.
    axis = [_decade(k) for k in range(CAP_EXPONENTS[0], CAP_EXPONENTS[1] + 1)]
    full = sorted((mse(*((v, 0.0) if use_a else (0.0, v))), v) for v in axis)
    assert full[0][1] == chosen and full[1][0] > (1 + PATH_MARGIN) * full[0][0]
    assert S.lambda_edges(table, variant, l2_a, l2_b) == {} and msgs == []


def test_a_given_grid_is_searched_exactly_as_given():
    runs = _weak_runs(seed=1)
    mse = _dense_validation_mse(*runs, "additive", 1 / BATCH)
    grid = [1e-2, 1e-1, 1.0, 10.0, 100.0]
    l2_a, l2_b, table, msgs = _search(runs, "additive", grid=grid)
    assert [(row["l2_a"], row["l2_b"], row["round"]) for row in table] == [
        (0.0, g, 0) for g in grid
    ]
    ref = sorted((mse(0.0, g), g) for g in grid)
    assert ref[1][0] > (1 + PATH_MARGIN) * ref[0][0]
    assert (l2_a, l2_b) == (0.0, ref[0][1])
    for row in table:
        assert _mse_close(row["valid_mse"], mse(0.0, row["l2_b"]))
    # The optimum lies beyond this grid: flagged as an edge, but a given grid never warns.
    assert l2_b == max(grid)
    assert S.lambda_edges(table, "additive", l2_a, l2_b) == {"l2_b": "upper"}
    assert msgs == []


def test_extension_rule_and_ties_on_analytic_scores():
    def bowl(a_opt, b_opt):
        def score(pts):
            calls.append(list(pts))
            return [
                (np.log10(a) - np.log10(a_opt)) ** 2 + (np.log10(b) - np.log10(b_opt)) ** 2
                for a, b in pts
            ]

        return score

    exps = range(CAP_EXPONENTS[0], CAP_EXPONENTS[1] + 1)
    for a_opt, b_opt in [(2e3, 7e-7), (1e9, 1e-12), (0.5, 3.0)]:
        calls = []
        pts, mses, rounds = S._extended_search(bowl(a_opt, b_opt), True, True)
        flat = [p for call in calls for p in call]
        assert len(flat) == len(set(flat)) == len(pts) and set(flat) == set(pts)
        # Exhaustive over the capped decades, worked out independently per axis (separable).
        want = tuple(_decade(min(exps, key=lambda k: abs(k - np.log10(v)))) for v in (a_opt, b_opt))
        assert pts[S._best(pts, mses)] == want
        # The grid grew exactly one decade past the optimum (or to the cap), never further.
        for k in range(2):
            vals = sorted({p[k] for p in pts})
            e = round(np.log10(want[k]))
            assert vals[0] == _decade(min(-4, max(e - 1, CAP_EXPONENTS[0])))
            assert vals[-1] == _decade(max(2, min(e + 1, CAP_EXPONENTS[1])))
        default = {(a, b) for a in S.DEFAULT_GRID for b in S.DEFAULT_GRID}
        assert {p for p, r in zip(pts, rounds, strict=True) if r == 0} == default

    def plateau(pts):  # up to 1e0 better towards small a by far less than the ties' 1e-4
        return [1.0 + 1e-6 * np.log10(a) + max(0.0, np.log10(a)) ** 2 for a, _ in pts]

    pts, mses, _ = S._extended_search(plateau, True, False)
    assert pts[S._best(pts, mses)] == (1.0, 0.0)  # strongest ridge among the ties
    assert min(p[0] for p in pts) == 1e-4  # ties at the lower edge do not extend the grid

    def rising_then_flat(pts):
        return [max(1.0, 3.0 - np.log10(a)) for a, _ in pts]

    pts, mses, _ = S._extended_search(rising_then_flat, True, False)
    assert pts[S._best(pts, mses)] == (1e6, 0.0)  # flat from 1e2 upwards: up to the cap
    # A diverged fit never wins; 1e0 and 1e2 then tie, and the stronger ridge wins.
    nan = [np.nan if a == 1e1 else abs(np.log10(a) - 1.0) for a, _ in pts]
    assert pts[S._best(pts, nan)] == (1e2, 0.0)


def test_all_diverged_lambda_points_are_an_error():
    with pytest.raises(ValueError, match="non-finite at all 2 lambda points"):
        S._best([(1.0, 1.0), (10.0, 10.0)], [float("nan"), float("inf")])


def test_an_unconverged_fit_warns_and_a_converged_one_does_not():
    _, _, curs, ls = _runs()
    with pytest.warns(S.ConvergenceWarning, match=r"relative residual .* > tol=1e-07"):
        S.fit(curs, ls, n_train=N_TRAIN, l2_a=0.0, l2_b=0.0, max_iter=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", S.ConvergenceWarning)
        S.fit(curs, ls, n_train=N_TRAIN, l2_a=0.0, l2_b=0.0)


def test_a_float64_simulator_rolls_out_in_float32_like_its_float32_self():
    import jax
    import jax.numpy as jnp

    _, _, curs, ls = _runs()
    sim = S.fit(curs, ls, n_train=N_TRAIN)
    want = np.asarray(S.simulate(sim, curs[0], ls[0][0]))
    with jax.enable_x64(True) if hasattr(jax, "enable_x64") else _x64_old():
        wide = S.Simulator(
            A=jnp.asarray(sim.A, jnp.float64),
            B=jnp.asarray(sim.B, jnp.float64),
            variant=sim.variant,
            l2_a=sim.l2_a,
            l2_b=sim.l2_b,
            a_prior=sim.a_prior,
        )
        got = S.simulate(wide, curs[0], ls[0][0])
        assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)


def _x64_old():
    from jax.experimental import enable_x64

    return enable_x64()


def _small_demo(tmp_path):
    """The small experiment of `simfluence demo-data --runs 8 --n-train 12 --n-test 5 --batch 2
    --steps 20`: runs 0-4 fit, run 5 validates (as `evaluate --split 5,1,2`)."""
    from simfluence import runlog
    from simfluence.demo_data import make_demo_experiment

    exp = make_demo_experiment(tmp_path / "exp", n_runs=8, n_train=12, n_test=5, batch=2, steps=20)
    runs = runlog.load_runs(exp)
    curs, ls = [r.curriculum for r in runs], [r.losses for r in runs]
    return curs[:5], ls[:5], curs[5:6], ls[5:6]


def test_tol_below_the_float32_floor_is_not_a_convergence_failure(tmp_path):
    import warnings

    from simfluence import _solvers

    fit_c, fit_l, _, _ = _small_demo(tmp_path)
    problem = S._prepare(fit_c, fit_l, 12, "linear", None)
    x, y = problem.rows(0, problem.n_test)
    lam, prior = S._lams(problem, 1e-4, 1e-4)
    _, info = _solvers.solve(
        problem.structure, x, y, lam, prior, True, True, S._TOL, S._MAX_ITER, None
    )
    # Dense float64 reference in the solver's coordinates (deviation from A = 1/batch).
    ids, n = problem.ids, 12
    M = np.zeros((ids.shape[0], n))  # [rows, n_train] counts with repeats
    np.add.at(M, (np.arange(ids.shape[0])[:, None], ids), 1.0)
    lam64 = np.repeat(lam.astype(np.float64), n)
    rounded = []
    for j in range(problem.n_test):
        X = np.concatenate([M * x[:, j : j + 1].astype(np.float64), M], axis=1)
        G = X.T @ X + np.diag(lam64)
        rhs = X.T @ y[:, j].astype(np.float64) + lam64 * np.repeat(prior.astype(np.float64), n)
        exact32 = np.linalg.solve(G, rhs).astype(np.float32).astype(np.float64)
        rounded.append(np.linalg.norm(G @ exact32 - rhs) / np.linalg.norm(rhs))
    rounded = np.asarray(rounded)
    # The situation: even the exact solution rounded to float32 misses tol = 1e-7 ...
    assert rounded.max() > S._TOL
    # ... the reported floor bounds what that rounding costs, and the solver reaches it.
    assert (rounded <= info["floor"]).all()
    assert (info["rel_residual"] <= np.maximum(S._TOL, info["floor"])).all()
    assert info["rel_residual"].max() > S._TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error", S.ConvergenceWarning)
        S.fit(fit_c, fit_l, n_train=12, l2_a=1e-4, l2_b=1e-4)


def test_lambda_search_on_a_small_experiment_warns_about_convergence_at_most_once(tmp_path):
    import warnings

    runs = _small_demo(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S.select_lambdas(*runs, n_train=12, variant="linear")
    conv = [w for w in caught if issubclass(w.category, S.ConvergenceWarning)]
    assert len(conv) <= 1, [str(w.message) for w in conv]


def test_unconverged_search_points_are_summed_up_in_one_warning(monkeypatch):
    import warnings

    from simfluence import _solvers

    solve = _solvers.solve

    def one_iteration(*args, **kw):  # (structure, x, y, lam, prior, use_x, use_one, tol, max_iter)
        return solve(*args[:8], 1, *args[9:], **kw)

    monkeypatch.setattr(_solvers, "solve", one_iteration)
    _, _, curs, ls = _runs(seed=5, lengths=LENGTHS + (150, 150))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S.select_lambdas(
            curs[:-2], ls[:-2], curs[-2:], ls[-2:], n_train=N_TRAIN, variant="linear", grid=[0.0]
        )
        S.select_lambdas(
            curs[:-2],
            ls[:-2],
            curs[-2:],
            ls[-2:],
            n_train=N_TRAIN,
            variant="additive",
            grid=[1e-3, 1e-2],
        )
    conv = [str(w.message) for w in caught if issubclass(w.category, S.ConvergenceWarning)]
    assert len(conv) == 2, conv  # one per search
    assert "linear simulator: while choosing lambdas" in conv[0] and "at 1 of 1 points" in conv[0]
    assert "additive simulator" in conv[1] and "at 2 of 2 points" in conv[1]
    assert all("\n" not in m and "worst relative residual" in m for m in conv)


def test_a_nan_residual_is_the_worst_in_the_search_warning(monkeypatch):
    # A failed solve (NaN residual) must be reported as such, not lose to a placeholder.
    import warnings

    from simfluence import _solvers

    solve = _solvers.solve

    def nan_residual(*args, **kw):
        theta, info = solve(*args, **kw)
        return theta, {**info, "rel_residual": np.full_like(info["rel_residual"], np.nan)}

    monkeypatch.setattr(_solvers, "solve", nan_residual)
    _, _, curs, ls = _runs(seed=5, lengths=LENGTHS + (150, 150))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        S.select_lambdas(
            curs[:-2], ls[:-2], curs[-2:], ls[-2:], n_train=N_TRAIN, variant="linear", grid=[0.0]
        )
    (msg,) = [str(w.message) for w in caught if issubclass(w.category, S.ConvergenceWarning)]
    assert "worst relative residual nan" in msg, msg


def test_validation_runs_of_one_length_are_rolled_out_together(monkeypatch):
    """One batched rollout per (point, test chunk, run length), equal to per-run rollouts."""
    _, _, curs, ls = _runs(seed=3, lengths=LENGTHS + (150, 120, 150))
    fit_c, fit_l, val_c, val_l = curs[:-3], ls[:-3], curs[-3:], ls[-3:]
    problem = S._prepare(fit_c, fit_l, N_TRAIN, "linear", None)
    problem.chunks, problem.chunk_size = [(0, 5), (5, 8)], 5  # two test chunks
    score = S._ValidationScore(problem, val_c, val_l)
    calls = []
    rollout = S._rollout_runs

    def recording(A, B, cur, l0, additive):
        out = rollout(A, B, cur, l0, additive)
        calls.append((np.asarray(A), np.asarray(B), np.asarray(cur), np.asarray(l0), out))
        return out

    monkeypatch.setattr(S, "_rollout_runs", recording)
    for point in [(1e-2, 1e-1), (1.0, 10.0)]:
        calls.clear()
        (mse,) = score([point])
        assert [c[2].shape[0] for c in calls] == [2, 1, 2, 1]  # runs of 150 steps, then 120
        want = 0.0
        for k, (A, B, cur, l0, out) in enumerate(list(calls)):  # (S._rollout records too)
            j0, j1 = problem.chunks[k // 2]
            members = [0, 2] if k % 2 == 0 else [1]
            for r, m in enumerate(members):
                np.testing.assert_array_equal(cur[r], val_c[m])
                # The old per-run path, and the numpy loop.
                single = np.asarray(S._rollout(A, B, cur[r], l0[r], False))
                np.testing.assert_allclose(np.asarray(out[r]), single, rtol=1e-6, atol=1e-7)
                ref = _numpy_rollout(A, B, cur[r], val_l[m][0, j0:j1])
                np.testing.assert_allclose(np.asarray(out[r]), ref, rtol=ROLL_RTOL)
                err = single[1:].astype(np.float64) - val_l[m][1:, j0:j1]
                want += np.sum(err * err) / (3 * cur.shape[1] * N_TEST)
        assert mse == pytest.approx(want, rel=1e-6)
