"""Featurized Simfluence: the bilinear fit against dense references, and its reductions."""

import numpy as np
import pytest

from simfluence import featurized, simulators

# Fixed up front: float64 dense solves agree to round-off; the per-pair CG fit is solved to a
# float64 relative residual of 1e-7 and stored in float32.
DENSE_RTOL = 1e-7
CG_RTOL, CG_ATOL = 1e-4, 1e-5


def _runs(rng, n_runs, steps, batch, n_train, n_test):
    curs = [rng.integers(0, n_train, (steps, batch)) for _ in range(n_runs)]
    losses = [rng.uniform(0.5, 2.0, (steps + 1, n_test)) for _ in range(n_runs)]
    return curs, losses


def _dense_design(curs, losses, phi, psi, additive=False):
    """One explicit row per (run, step, test): kron(Phi_t, psi_j) (times L_{t-1} for A)."""
    rows, ys = [], []
    for c, loss in zip(curs, losses, strict=True):
        for t in range(c.shape[0]):
            big_phi = sum(phi[i] for i in c[t])
            for j in range(psi.shape[0]):
                k = np.kron(big_phi, psi[j])
                rows.append(k if additive else np.concatenate([loss[t, j] * k, k]))
                ys.append(loss[t + 1, j] - loss[t, j])
    return np.array(rows), np.array(ys)


@pytest.mark.parametrize("variant", featurized.FEAT_VARIANTS)
def test_bilinear_fit_matches_dense_ridge(variant):
    rng = np.random.default_rng(0)
    curs, losses = _runs(rng, 3, 6, 2, 7, 4)
    phi, psi = rng.normal(size=(7, 3)), rng.normal(size=(4, 2))
    la, lb = 0.3, 2.0
    fsim = featurized.fit(curs, losses, phi, psi, variant=variant, l2_a=la, l2_b=lb)
    additive = variant == "additive-feat"
    X, y = _dense_design(curs, losses, phi, psi, additive)
    d1 = 3 * 2
    lam = np.full(d1, lb) if additive else np.r_[np.full(d1, la), np.full(d1, lb)]
    aug_x = np.vstack([X, np.diag(np.sqrt(lam))])
    aug_y = np.r_[y, np.zeros(len(lam))]
    theta = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0]
    got = fsim.W_B.ravel() if additive else np.r_[fsim.W_A.ravel(), fsim.W_B.ravel()]
    np.testing.assert_allclose(got, theta, rtol=DENSE_RTOL, atol=1e-12)
    # The tables: A = 1/batch + phi W_A psi, B = phi W_B psi, per (test, train).
    sim = fsim.tables(phi, psi)
    np.testing.assert_allclose(np.asarray(sim.B), psi @ fsim.W_B.T @ phi.T, rtol=1e-5, atol=1e-6)
    assert sim.variant == ("additive" if additive else "linear")


@pytest.mark.parametrize(
    ("variant", "per_pair"),
    [("linear-feat", "linear"), ("additive-feat", "additive-lr")],
)
def test_identity_features_reduce_to_per_pair_simfluence(variant, per_pair):
    """phi = I, psi = I: W[i, j] is a free per-pair coefficient and ||W||^2 the per-pair ridge
    with A shrunk towards 1/batch, i.e. Simfluence-Linear (additive) with a_prior = 1/batch;
    with learning rates, the schedule-aware linear-lr (additive-lr)."""
    rng = np.random.default_rng(1)
    n_train, n_test = 9, 3
    curs, losses = _runs(rng, 4, 8, 2, n_train, n_test)
    lrs = [rng.uniform(0.1, 1.0, 8) for _ in curs] if per_pair.endswith("-lr") else None
    la, lb = 0.05, 0.2
    fsim = featurized.fit(
        curs, losses, np.eye(n_train), np.eye(n_test), variant=variant, l2_a=la, l2_b=lb, lrs=lrs
    )
    feat = fsim.tables(np.eye(n_train), np.eye(n_test))
    assert feat.variant == per_pair
    kw = {} if lrs is None else {"lrs": lrs}
    ref = simulators.fit(curs, losses, n_train=n_train, variant=per_pair, l2_a=la, l2_b=lb, **kw)
    if lrs is not None:
        assert feat.lr_max == pytest.approx(ref.lr_max)
    np.testing.assert_allclose(np.asarray(feat.A), np.asarray(ref.A), rtol=CG_RTOL, atol=CG_ATOL)
    np.testing.assert_allclose(np.asarray(feat.B), np.asarray(ref.B), rtol=CG_RTOL, atol=CG_ATOL)


def test_residual_is_per_pair_ridge_centred_on_the_featurized_tables():
    rng = np.random.default_rng(2)
    n_train, n_test, batch = 9, 3, 2  # the identity test's sizes: the solver compiles once
    curs, losses = _runs(rng, 4, 8, batch, n_train, n_test)
    phi, psi = rng.normal(size=(n_train, 2)), rng.normal(size=(n_test, 2))
    fsim = featurized.fit(curs, losses, phi, psi, l2_a=1.0, l2_b=1.0)
    lr = 0.7
    sim = featurized.with_residual(fsim, curs, losses, phi, psi, lr)
    base = fsim.tables(phi, psi)
    for j in range(n_test):  # dense per-test solve: theta = (X^T X + l I)^-1 (X^T y + l prior)
        rows, ys = [], []
        for c, loss in zip(curs, losses, strict=True):
            for t in range(c.shape[0]):
                m = np.bincount(c[t], minlength=n_train).astype(float)
                rows.append(np.r_[loss[t, j] * m, m])
                ys.append(loss[t + 1, j] - loss[t, j])
        X, y = np.array(rows), np.array(ys)
        prior = np.r_[np.asarray(base.A[j], float) - 1 / batch, np.asarray(base.B[j], float)]
        theta = np.linalg.solve(X.T @ X + lr * np.eye(2 * n_train), X.T @ y + lr * prior)
        np.testing.assert_allclose(
            np.asarray(sim.A[j]) - 1 / batch, theta[:n_train], rtol=CG_RTOL, atol=CG_ATOL
        )
        np.testing.assert_allclose(
            np.asarray(sim.B[j]), theta[n_train:], rtol=CG_RTOL, atol=CG_ATOL
        )
    assert featurized.with_residual(fsim, curs, losses, phi, psi, np.inf) is not None


def test_unseen_examples_recovered_from_a_bilinear_truth():
    """Losses generated by a true bilinear simulator: fitted on some tests and a part of the
    pool, the fit predicts rollouts of unseen test examples over unseen training examples."""
    rng = np.random.default_rng(3)
    n_train, n_test, batch, d = 30, 12, 3, 3
    phi = np.c_[rng.normal(size=(n_train, d)), np.ones(n_train)]
    psi = np.c_[rng.normal(size=(n_test, d)), np.ones(n_test)]
    true = featurized.FeatSimulator(
        W_A=0.01 * rng.normal(size=(d + 1, d + 1)),
        W_B=0.02 * rng.normal(size=(d + 1, d + 1)),
        variant="linear-feat",
        l2_a=0.0,
        l2_b=0.0,
        batch=batch,
    )
    table = true.tables(phi, psi)
    seen_train, seen_test = np.arange(20), np.arange(8)
    curs = [rng.choice(seen_train, (15, batch)) for _ in range(6)]
    l0 = rng.uniform(0.5, 1.5, n_test)
    losses = [np.asarray(simulators.simulate(table, c, l0), np.float64) for c in curs]
    fsim = featurized.fit(
        curs, [x[:, seen_test] for x in losses], phi, psi[seen_test], l2_a=1e-9, l2_b=1e-9
    )
    held = rng.choice(np.arange(20, 30), (15, batch))  # only unseen training examples
    want = np.asarray(simulators.simulate(table, held, l0))[:, 8:]
    got = np.asarray(simulators.simulate(fsim.tables(phi, psi[8:]), held, l0[8:]))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("variant", ["linear", "additive", "linear-lr", "additive-lr"])
def test_validation_rollout_matches_simulate(variant):
    """The numpy rollout of the validation search against `simulators.simulate` (float32)."""
    rng = np.random.default_rng(6)
    b, n_train, n_test = 3, 8, 4
    A = 1 / b + 0.05 * rng.normal(size=(n_test, n_train))
    if variant.startswith("additive"):
        A = np.full_like(A, 1 / b)
    sim = simulators.Simulator(
        A=A.astype(np.float32),
        B=(0.02 * rng.normal(size=(n_test, n_train))).astype(np.float32),
        variant=variant,
        l2_a=0.0,
        l2_b=0.0,
        a_prior=1 / b,
        batch=b,
        lr_max=2.0 if variant.endswith("-lr") else None,
    )
    cur = rng.integers(0, n_train, (9, b)).astype(np.int32)
    lr = rng.uniform(0.5, 2.0, 9).astype(np.float32) if variant.endswith("-lr") else None
    l0 = rng.uniform(0.5, 1.5, n_test).astype(np.float32)
    want = np.asarray(simulators.simulate(sim, cur, l0, lr))
    np.testing.assert_allclose(featurized._rollout_np(sim, cur, l0, lr), want, rtol=1e-5)


def test_basis_is_centred_whitened_with_a_constant():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    b = featurized.Basis.fit(x, 3)
    z = b(x)
    assert z.shape == (40, 4)
    np.testing.assert_allclose(z[:, -1], 1.0)
    np.testing.assert_allclose(z[:, :3].mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(np.cov(z[:, :3].T), np.eye(3), atol=1e-10)


def test_bad_inputs_are_one_line_errors():
    rng = np.random.default_rng(5)
    curs, losses = _runs(rng, 2, 3, 2, 5, 2)
    with pytest.raises(featurized.FeaturizedError, match="psi has shape"):
        featurized.fit(curs, losses, np.eye(5), np.eye(3)[:, :2][None])
    with pytest.raises(featurized.FeaturizedError, match="expected \\[T, batch\\]"):
        featurized.fit(curs, losses, np.eye(5), np.eye(3))
    with pytest.raises(featurized.FeaturizedError, match="unknown featurized variant"):
        featurized.fit(curs, losses, np.eye(5), np.eye(2), variant="linear")
    with pytest.raises(featurized.FeaturizedError, match="ids outside"):
        featurized.fit(curs, losses, np.eye(4), np.eye(2))
