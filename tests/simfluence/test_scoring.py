"""Metrics against scipy and numpy references (ties included)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

# The module, even if the package re-exports the function `metrics` under the same name.
M = importlib.import_module("simfluence.scoring")

# Tolerances, fixed up front: float64 paths against float64 references.
ATOL64 = 1e-10


def _across_ref(pred, true, rtol=M.CONSTANT_RTOL):
    """Independent across-run rho: a scipy loop over test examples (None when undefined)."""
    rhos, informative = [], 0
    for j in range(pred.shape[1]):
        p, y = pred[:, j].astype(np.float64), true[:, j].astype(np.float64)
        if np.ptp(y) <= rtol * np.abs(y).mean():
            continue  # constant truth: left out
        if np.ptp(p) <= rtol * np.abs(p).mean():
            rhos.append(0.0)  # constant prediction: rho = 0
        else:
            rhos.append(stats.spearmanr(p, y).statistic)
            informative += 1
    return float(np.mean(rhos)) if informative else None


def _jackknife_ref(pred, true):
    """Delete-one jackknife over runs (rows) of `_across_ref`, by a plain loop."""
    r = pred.shape[0]
    theta = np.array([_across_ref(np.delete(pred, k, 0), np.delete(true, k, 0)) for k in range(r)])
    return float(np.sqrt((r - 1) / r * np.sum((theta - theta.mean()) ** 2)))


def _traj(rng, t=6, n=9, ties=False):
    pred = rng.normal(size=(t + 1, n)).astype(np.float32)
    true = rng.normal(size=(t + 1, n)).astype(np.float32)
    if ties:
        pred = np.round(pred * 2) / 2  # many ties
        true = np.round(true)
    return pred, true


@pytest.mark.parametrize("ties", [False, True])
def test_rankdata_and_spearman_match_scipy(ties):
    rng = np.random.default_rng(1)
    for _ in range(5):
        pred, true = _traj(rng, ties=ties)
        np.testing.assert_allclose(
            M.rankdata(pred), stats.rankdata(pred, method="average", axis=-1), rtol=0, atol=1e-6
        )
        got = float(M.final_step_spearman(pred, true))
        want = stats.spearmanr(pred[-1], true[-1]).statistic
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_per_run_metrics_match_numpy():
    rng = np.random.default_rng(2)
    pred, true = _traj(rng, t=11, n=5)
    m = M.metrics(pred, true)
    np.testing.assert_allclose(m["all_steps_mse"], np.mean((pred[1:] - true[1:]) ** 2), rtol=1e-6)
    np.testing.assert_allclose(m["final_step_mse"], np.mean((pred[-1] - true[-1]) ** 2), rtol=1e-6)
    # Step 0 is given, never scored.
    pred2 = pred.copy()
    pred2[0] += 100.0
    assert float(M.all_steps_mse(pred2, true)) == pytest.approx(float(m["all_steps_mse"]))
    # Batched over runs (leading axis) equals per-run calls, and works under jit.
    pb, tb = np.stack([pred, pred[::-1]]), np.stack([true, true])
    batched = jax.jit(M.metrics)(jnp.asarray(pb), jnp.asarray(tb))
    for r in range(2):
        single = M.metrics(pb[r], tb[r])
        for k in single:
            np.testing.assert_allclose(batched[k][r], single[k], rtol=1e-6, atol=1e-7)


def test_a_nan_propagates_through_ranks_and_rho_like_scipy():
    x = np.array([[1.0, np.nan, 3.0], [3.0, 1.0, 2.0]], np.float32)
    want = np.stack([stats.rankdata(row, method="average") for row in x])  # nan_policy propagate
    np.testing.assert_array_equal(np.asarray(M.rankdata(x)), want)
    pred = np.array([[1.0, 1.0, 1.0], [1.0, np.nan, 3.0]], np.float32)
    true = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]], np.float32)
    assert np.isnan(stats.spearmanr(pred[-1], true[-1]).statistic)
    assert np.isnan(float(M.final_step_spearman(pred, true)))


def test_final_step_spearman_constant_is_nan():
    pred = np.ones((3, 4), np.float32)
    true = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.isnan(float(M.final_step_spearman(pred, true)))


def test_mean_stderr():
    v = [1.0, 2.0, 4.0, 7.0]
    out = M.mean_stderr(v)
    assert out["mean"] == pytest.approx(np.mean(v))
    assert out["stderr"] == pytest.approx(stats.sem(v))
    assert M.mean_stderr([3.0]) == {"mean": 3.0, "stderr": None}
    with pytest.raises(ValueError):
        M.mean_stderr([1.0, float("nan")])
    with pytest.raises(ValueError):
        M.mean_stderr([])


def test_across_run_spearman_matches_scipy_with_exclusions():
    rng = np.random.default_rng(3)
    r, n = 6, 8
    true = rng.normal(size=(r, n)).astype(np.float32)
    pred = (true + 0.7 * rng.normal(size=(r, n))).astype(np.float32)
    pred[:, 1] = np.round(pred[:, 1])  # ties in predictions
    true[:, 2] = 0.5  # constant truth: excluded
    pred[:, 5] = 1.25  # constant prediction: counts as rho = 0
    out = M.across_run_spearman(pred, true)
    want = []
    for j in range(n):
        if j == 2:
            continue
        want.append(0.0 if j == 5 else stats.spearmanr(pred[:, j], true[:, j]).statistic)
    assert out["n_used"] == n - 1 and out["n_excluded"] == 1
    assert out["n_constant_prediction"] == 1 and out["undefined_reason"] is None
    assert out["mean"] == pytest.approx(np.mean(want), abs=1e-5)
    # The stderr is the delete-one jackknife over runs, not a stderr over test examples.
    assert out["stderr"] == pytest.approx(_jackknife_ref(pred, true), abs=ATOL64)
    assert out["stderr_method"] == "jackknife over held-out runs (delete-one)"
    assert out["n_runs"] == r and out["stderr_undefined_reason"] is None


def test_across_run_spearman_known_ranks():
    true = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    pred = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]])  # example 0 perfect, example 1 reversed
    out = M.across_run_spearman(pred, true)
    assert out["mean"] == pytest.approx(0.0) and out["n_used"] == 2
    # Three runs: each leave-one-out rho ranks 2 runs (always +-1), so the jackknife would say
    # 0 here; it needs 4 runs. Two runs: leaving one out leaves nothing to rank.
    assert out["stderr"] is None and "at least 4 runs, got 3" in out["stderr_undefined_reason"]
    two = M.across_run_spearman(pred[:2], true[:2])
    assert two["mean"] == pytest.approx(0.0) and two["stderr"] is None
    assert "at least 4 runs, got 2" in two["stderr_undefined_reason"]
    # Four runs: defined, and equal to the reference jackknife.
    true4 = np.array([[1.0, 3.0], [2.0, 2.5], [3.0, 1.0], [4.0, 0.5]])
    pred4 = np.array([[0.1, 0.3], [0.2, 0.1], [0.3, 0.2], [0.4, 0.05]])
    four = M.across_run_spearman(pred4, true4)
    assert four["stderr"] == pytest.approx(_jackknife_ref(pred4, true4), abs=ATOL64)
    assert four["stderr"] > 0


def test_across_run_stderr_is_a_jackknife_over_runs_not_examples():
    # Test examples that share runs are correlated. In the extreme, 20 copies of one example
    # give 20 equal rhos: a stderr over examples is 0, while the estimate rests on 8 runs.
    rng = np.random.default_rng(5)
    true1 = rng.normal(size=(8, 1))
    pred1 = true1 + rng.normal(size=(8, 1))
    true, pred = np.repeat(true1, 20, axis=1), np.repeat(pred1, 20, axis=1)
    out = M.across_run_spearman(pred, true)
    assert out["mean"] == pytest.approx(stats.spearmanr(pred1[:, 0], true1[:, 0]).statistic)
    want = _jackknife_ref(pred1, true1)
    assert want > 0.05
    assert out["stderr"] == pytest.approx(want, abs=ATOL64)
    # A leave-one-out set where an example's truth ties (constant over the runs left) drops it
    # there, exactly as the reference loop does.
    rng = np.random.default_rng(6)
    true = rng.normal(size=(5, 6))
    true[:, 0] = [1.0, 1.0, 2.0, 1.0, 1.0]  # constant without run 2
    pred = true + 0.5 * rng.normal(size=(5, 6))
    out = M.across_run_spearman(pred, true)
    assert out["mean"] == pytest.approx(_across_ref(pred, true), abs=ATOL64)
    assert out["stderr"] == pytest.approx(_jackknife_ref(pred, true), abs=ATOL64)


def test_host_metrics_float64_against_numpy_and_scipy():
    rng = np.random.default_rng(7)
    pred, true = _traj(rng, t=8, n=7, ties=True)
    pb, tb = np.stack([pred, pred[::-1], pred]), np.stack([true, true, true[::-1]])
    m = M.host_metrics(pb, tb)
    for r in range(3):
        p, y = pb[r].astype(np.float64), tb[r].astype(np.float64)
        assert m["all_steps_mse"][r] == pytest.approx(np.mean((p[1:] - y[1:]) ** 2), abs=ATOL64)
        assert m["final_step_mse"][r] == pytest.approx(np.mean((p[-1] - y[-1]) ** 2), abs=ATOL64)
        want = stats.spearmanr(p[-1], y[-1]).statistic
        assert m["final_step_spearman"][r] == pytest.approx(want, abs=ATOL64)
    # Average ranks with ties, batched, against scipy.
    x = np.round(rng.normal(size=(4, 3, 9)))
    np.testing.assert_allclose(
        M._rankdata64(x), stats.rankdata(x, method="average", axis=-1), rtol=0, atol=0
    )
    # A huge but finite float32 rollout: float32 squares overflow, float64 ones do not.
    huge = pred.copy()
    huge[1:] = 4.6e21
    assert np.isfinite(huge).all() and not np.isfinite(float(M.all_steps_mse(huge, true)))
    m = M.host_metrics(huge, true)
    want = np.mean((huge[1:].astype(np.float64) - true[1:]) ** 2)
    assert np.isfinite(m["all_steps_mse"]) and m["all_steps_mse"] == pytest.approx(want, rel=1e-12)
    # Constant or NaN final rows: rho NaN, like scipy.
    const = pred.copy()
    const[-1] = 1.0
    assert np.isnan(M.host_metrics(const, true)["final_step_spearman"])
    const[-1, 0] = np.nan
    assert np.isnan(M.host_metrics(const, true)["final_step_spearman"])
    with pytest.raises(ValueError, match="differs"):
        M.host_metrics(pred, true[:, :3])


def test_across_run_spearman_constant_prediction_is_undefined():
    rng = np.random.default_rng(4)
    true = rng.normal(size=(5, 4))
    # A curriculum-blind prediction: the same in every run, up to float32 rounding noise.
    base = rng.normal(size=4).astype(np.float32)
    pred = np.stack([base * (1 + 1e-7 * k) for k in range(5)])
    out = M.across_run_spearman(pred, true)
    assert out["mean"] is None and out["stderr"] is None
    assert "do not vary" in out["undefined_reason"]
    out2 = M.across_run_spearman(true, np.ones((5, 4)))
    assert out2["mean"] is None and out2["n_excluded"] == 4 and "true" in out2["undefined_reason"]
    with pytest.raises(ValueError, match="at least 2"):
        M.across_run_spearman(true[:1], true[:1])


def test_skill_score():
    assert M.skill_score(0.5, 2.0) == pytest.approx(0.75)
    assert M.skill_score(3.0, 2.0) == pytest.approx(-0.5)
    assert M.skill_score(1.0, 0.0) is None
