"""Metrics for simulated loss trajectories (Simfluence's two plus honest extras).

Per held-out run (pred and true are [T + 1, n_test], row 0 the given initial loss):

- `all_steps_mse`: mean squared error over steps 1..T and all test examples.
- `final_step_mse`: mean squared error at step T over test examples.
- `final_step_spearman`: Spearman's rho across test examples at step T (ties get average
  ranks, exactly as `scipy.stats.spearmanr`); NaN when either side is constant or holds a NaN.

Across held-out runs:

- `across_run_spearman`: for each test example, Spearman's rho across runs between simulated and
  true final loss, averaged over test examples. This measures whether a simulator captures the
  effect of the curriculum, which the two per-run metrics do not (a simulator that ignores the
  curriculum can score well on both).
- `skill_score`: 1 - MSE / MSE_baseline (the mean-trajectory baseline in `evaluate`).
- `mean_stderr`: mean and standard error of the mean.

The array functions are jittable and accept extra leading batch axes.

References:
    Guu et al., "Simfluence", 2023. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "all_steps_mse",
    "final_step_mse",
    "final_step_spearman",
    "metrics",
    "across_run_spearman",
    "mean_stderr",
    "skill_score",
    "rankdata",
    "spearman",
]

# Spread across runs (max - min) at or below this fraction of the mean magnitude counts as
# constant: float32 rollouts that sum the same terms in a different order differ by rounding
# (~1e-7 per operation, ~1e-5 after a few hundred steps), and ranking rounding noise is meaningless.
CONSTANT_RTOL = 1e-5


@jax.jit
def rankdata(x: jax.Array) -> jax.Array:
    """Average ranks (1-based, ties share the mean rank) along the last axis, like scipy.

    Args:
        x: float [..., n].

    Returns:
        float32 [..., n] ranks; `scipy.stats.rankdata(x, method="average", axis=-1)`. A row
        holding a NaN gets NaN ranks throughout (scipy's default ``nan_policy="propagate"``),
        so a diverged rollout yields NaN rho, never a plausible one.
    """
    x = jnp.asarray(x)
    sorted_x = jnp.sort(x, axis=-1)

    def _ranks(sx, v):  # [n], [n]
        lo = jnp.searchsorted(sx, v, side="left")  # count of values < v
        hi = jnp.searchsorted(sx, v, side="right")  # count of values <= v
        return (lo + hi + 1) / 2.0

    fn = _ranks
    for _ in range(x.ndim - 1):
        fn = jax.vmap(fn)
    ranks = fn(sorted_x, x).astype(jnp.float32)
    return jnp.where(jnp.isnan(x).any(axis=-1, keepdims=True), jnp.nan, ranks)


def _pearson(a: jax.Array, b: jax.Array) -> jax.Array:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    den = jnp.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    # NaN (not 0) when a side is constant: rho is undefined there, as in scipy.
    return jnp.where(den > 0, (a * b).sum(-1) / jnp.where(den > 0, den, 1.0), jnp.nan)


@jax.jit
def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
    """Spearman's rho along the last axis with scipy's average ranks for ties.

    Args:
        a: float [..., n].
        b: float [..., n].

    Returns:
        float32 [...]; NaN where either side is constant or holds a NaN.
    """
    return _pearson(rankdata(a), rankdata(b))


def _check_pair(pred, true):
    pred = jnp.asarray(pred, jnp.float32)
    true = jnp.asarray(true, jnp.float32)
    if pred.shape != true.shape:
        raise ValueError(f"pred shape {pred.shape} differs from true shape {true.shape}")
    if pred.ndim < 2 or pred.shape[-2] < 2:
        raise ValueError(
            f"expected [..., T+1, n_test] trajectories with T >= 1, got shape {pred.shape}"
        )
    return pred, true


@jax.jit
def all_steps_mse(pred: jax.Array, true: jax.Array) -> jax.Array:
    """Mean squared error over steps 1..T and test examples (step 0 is given, not scored).

    Args:
        pred: float32 [..., T + 1, n_test] simulated losses.
        true: float32 [..., T + 1, n_test] observed losses.

    Returns:
        float32 [...].
    """
    pred, true = _check_pair(pred, true)
    return jnp.mean((pred[..., 1:, :] - true[..., 1:, :]) ** 2, axis=(-2, -1))


@jax.jit
def final_step_mse(pred: jax.Array, true: jax.Array) -> jax.Array:
    """Mean squared error at the last step over test examples.

    Args:
        pred: float32 [..., T + 1, n_test].
        true: float32 [..., T + 1, n_test].

    Returns:
        float32 [...].
    """
    pred, true = _check_pair(pred, true)
    return jnp.mean((pred[..., -1, :] - true[..., -1, :]) ** 2, axis=-1)


@jax.jit
def final_step_spearman(pred: jax.Array, true: jax.Array) -> jax.Array:
    """Spearman's rho across test examples at the last step (ties averaged like scipy).

    Args:
        pred: float32 [..., T + 1, n_test].
        true: float32 [..., T + 1, n_test].

    Returns:
        float32 [...]; NaN where either side is constant across test examples (undefined).
    """
    pred, true = _check_pair(pred, true)
    return spearman(pred[..., -1, :], true[..., -1, :])


@jax.jit
def metrics(pred: jax.Array, true: jax.Array) -> dict[str, jax.Array]:
    """All per-run metrics of one (or a batch of) simulated trajectory.

    Args:
        pred: float32 [..., T + 1, n_test] simulated losses (row 0 = the given initial loss).
        true: float32 [..., T + 1, n_test] observed losses.

    Returns:
        `{"all_steps_mse", "final_step_mse", "final_step_spearman"}`, each float32 [...].

    References:
        Guu et al., "Simfluence", 2023, section 4 (all-steps MSE, final-step Spearman).
        https://arxiv.org/abs/2303.08114
    """
    return {
        "all_steps_mse": all_steps_mse(pred, true),
        "final_step_mse": final_step_mse(pred, true),
        "final_step_spearman": final_step_spearman(pred, true),
    }


def mean_stderr(values: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """Mean and standard error of the mean (sample std with ddof=1, over sqrt(n)).

    Args:
        values: finite numbers, at least one.

    Returns:
        `{"mean": float, "stderr": float | None}`; stderr is None for a single value.

    Raises:
        ValueError: no values, or a non-finite value.
    """
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("mean_stderr needs at least one value")
    if not np.isfinite(arr).all():
        raise ValueError(f"mean_stderr got non-finite values {arr[~np.isfinite(arr)][:3]}")
    mean = float(arr.mean())
    stderr = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else None
    return {"mean": mean, "stderr": stderr}


def _constant_columns(x: np.ndarray, rtol: float) -> np.ndarray:
    """[R, n] -> bool [n]: spread across runs within rounding of the values' magnitude."""
    spread = x.max(axis=0) - x.min(axis=0)
    scale = np.abs(x).mean(axis=0)
    return spread <= rtol * scale


def across_run_spearman(
    pred_final: jax.Array | np.ndarray,
    true_final: jax.Array | np.ndarray,
    *,
    rtol: float = CONSTANT_RTOL,
) -> dict:
    """Per test example, Spearman's rho across runs between simulated and true final losses.

    This is the curriculum-sensitivity metric: it asks whether the simulator orders the held-out
    runs (curricula) correctly for each test example. Rules:

    - A test example whose TRUE final losses are constant across runs (spread <= rtol * mean
      magnitude) has nothing to rank; it is left out and counted in `n_excluded`.
    - A test example whose PREDICTED final losses are constant across runs has an undefined rho.
      If that holds for every used example (the simulator ignores the curriculum, e.g. the
      constant or mean-trajectory baseline), the metric is undefined: `mean` and `stderr` are
      None and `undefined_reason` says why. If only some examples are constant, they count as
      rho = 0 (a constant prediction carries no ordering information; dropping them would
      flatter the simulator) and `n_constant_prediction` says how many.

    Args:
        pred_final: float [R, n_test] simulated final losses, one row per held-out run.
        true_final: float [R, n_test] observed final losses.
        rtol: relative spread at or below which a column counts as constant.

    Returns:
        dict with `mean` (float | None), `stderr` (float | None), `n_used` (int, examples
        averaged), `n_excluded` (int, constant true finals), `n_constant_prediction` (int),
        `undefined_reason` (str | None).

    Raises:
        ValueError: shapes differ, fewer than 2 runs, or non-finite values.
    """
    pred = np.asarray(pred_final, dtype=np.float64)
    true = np.asarray(true_final, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2:
        raise ValueError(
            f"across_run_spearman expects pred and true of shape [runs, n_test], got "
            f"{pred.shape} and {true.shape}"
        )
    if pred.shape[0] < 2:
        raise ValueError(
            f"across_run_spearman needs at least 2 held-out runs, got {pred.shape[0]}; "
            "hold out more runs"
        )
    if not (np.isfinite(pred).all() and np.isfinite(true).all()):
        raise ValueError("across_run_spearman got non-finite final losses")
    true_const = _constant_columns(true, rtol)
    pred_const = _constant_columns(pred, rtol)
    used = ~true_const
    n_used = int(used.sum())
    result = {
        "mean": None,
        "stderr": None,
        "n_used": n_used,
        "n_excluded": int(true_const.sum()),
        "n_constant_prediction": int((pred_const & used).sum()),
        "undefined_reason": None,
    }
    if n_used == 0:
        result["undefined_reason"] = (
            "the true final losses do not vary across the held-out runs for any test example"
        )
        return result
    if result["n_constant_prediction"] == n_used:
        result["undefined_reason"] = (
            "the simulated final losses do not vary across the held-out runs for any test "
            "example (the prediction ignores the curriculum)"
        )
        return result
    # Ranks across runs: transpose to [n_test, R] so the rank axis is last.
    rho = np.asarray(spearman(jnp.asarray(pred.T[used]), jnp.asarray(true.T[used])), np.float64)
    rho = np.where(pred_const[used], 0.0, rho)
    result.update(mean_stderr(rho))
    return result


def skill_score(mse: float, baseline_mse: float) -> float | None:
    """Skill score 1 - mse / baseline_mse (positive: better than the baseline).

    Args:
        mse: a simulator's all-steps MSE.
        baseline_mse: the baseline's all-steps MSE (mean trajectory in `evaluate`).

    Returns:
        The score, or None when the baseline MSE is 0 (the score is undefined).
    """
    if not (math.isfinite(mse) and math.isfinite(baseline_mse)):
        raise ValueError(f"skill_score got non-finite MSE ({mse}, {baseline_mse})")
    if baseline_mse <= 0.0:
        return None
    return 1.0 - mse / baseline_mse
