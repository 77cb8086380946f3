"""Metrics for simulated loss trajectories (Simfluence's two plus honest extras).

Per held-out run (pred and true are [T + 1, n_test], row 0 the given initial loss):

- `all_steps_mse`: mean squared error over steps 1..T and all test examples.
- `final_step_mse`: mean squared error at step T over test examples.
- `final_step_spearman`: Spearman's rho across test examples at step T (ties get average
  ranks, exactly as `scipy.stats.spearmanr`); NaN when either side is constant or holds a NaN.

`metrics` and the three functions above are jittable float32 JAX code with extra leading batch
axes. `host_metrics` computes the same three in float64 numpy: a huge but finite float32 rollout
(|error| above ~1.8e19) squares past float32's range, so `evaluate` scores with `host_metrics`.

Across held-out runs:

- `across_run_spearman`: for each test example, Spearman's rho across runs between simulated and
  true final loss, averaged over test examples. This measures whether a simulator captures the
  effect of the curriculum, which the two per-run metrics do not (a simulator that ignores the
  curriculum can score well on both). Its standard error is a delete-one jackknife over the
  held-out runs (the test examples share those runs, so their rhos are not independent).
- `skill_score`: 1 - MSE / MSE_baseline (the mean-trajectory baseline in `evaluate`).
- `mean_stderr`: mean and standard error of the mean (for per-run metrics, over runs).

Shape annotations (jaxtyping) are documentation; nothing checks them at run time. `time` is the
T + 1 rows of a trajectory.

References:
    Guu et al., "Simfluence", 2023. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

__all__ = [
    "all_steps_mse",
    "final_step_mse",
    "final_step_spearman",
    "metrics",
    "host_metrics",
    "across_run_spearman",
    "across_run_spearman_difference",
    "ACROSS_RUN_STDERR_METHOD",
    "mean_stderr",
    "skill_score",
    "rankdata",
    "spearman",
]

# Spread across runs (max - min) at or below this fraction of the mean magnitude counts as
# constant: float32 rollouts that sum the same terms in a different order differ by rounding
# (~1e-7 per operation, ~1e-5 after a few hundred steps), and ranking rounding noise is meaningless.
CONSTANT_RTOL = 1e-5

# Recorded in the JSON beside the across-run rho's stderr, so a reader knows what it measures.
ACROSS_RUN_STDERR_METHOD = "jackknife over held-out runs (delete-one)"


@jax.jit
def rankdata(x: Float[ArrayLike, "*batch n"]) -> Float[Array, "*batch n"]:
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
def spearman(
    a: Float[ArrayLike, "*batch n"], b: Float[ArrayLike, "*batch n"]
) -> Float[Array, "*batch"]:
    """Spearman's rho along the last axis with scipy's average ranks for ties.

    Args:
        a: float [..., n].
        b: float [..., n].

    Returns:
        float32 [...]; NaN where either side is constant or holds a NaN.
    """
    return _pearson(rankdata(a), rankdata(b))


def _check_shapes(pred_shape: tuple[int, ...], true_shape: tuple[int, ...]) -> None:
    if pred_shape != true_shape:
        raise ValueError(f"pred shape {pred_shape} differs from true shape {true_shape}")
    if len(pred_shape) < 2 or pred_shape[-2] < 2:
        raise ValueError(
            f"expected [..., T+1, n_test] trajectories with T >= 1, got shape {pred_shape}"
        )


def _check_pair(pred, true):
    pred = jnp.asarray(pred, jnp.float32)
    true = jnp.asarray(true, jnp.float32)
    _check_shapes(pred.shape, true.shape)
    return pred, true


@jax.jit
def all_steps_mse(
    pred: Float[ArrayLike, "*batch time n_test"], true: Float[ArrayLike, "*batch time n_test"]
) -> Float[Array, "*batch"]:
    """Mean squared error over steps 1..T and test examples (step 0 is given, not scored).

    Args:
        pred: float32 [..., T + 1, n_test] simulated losses.
        true: float32 [..., T + 1, n_test] observed losses.

    Returns:
        float32 [...]; inf once the squared errors pass float32's range (use `host_metrics`).

    Raises:
        ValueError: shapes differ, or fewer than 2 rows.
    """
    pred, true = _check_pair(pred, true)
    return jnp.mean((pred[..., 1:, :] - true[..., 1:, :]) ** 2, axis=(-2, -1))


@jax.jit
def final_step_mse(
    pred: Float[ArrayLike, "*batch time n_test"], true: Float[ArrayLike, "*batch time n_test"]
) -> Float[Array, "*batch"]:
    """Mean squared error at the last step over test examples.

    Args:
        pred: float32 [..., T + 1, n_test].
        true: float32 [..., T + 1, n_test].

    Returns:
        float32 [...]; inf once the squared errors pass float32's range (use `host_metrics`).

    Raises:
        ValueError: shapes differ, or fewer than 2 rows.
    """
    pred, true = _check_pair(pred, true)
    return jnp.mean((pred[..., -1, :] - true[..., -1, :]) ** 2, axis=-1)


@jax.jit
def final_step_spearman(
    pred: Float[ArrayLike, "*batch time n_test"], true: Float[ArrayLike, "*batch time n_test"]
) -> Float[Array, "*batch"]:
    """Spearman's rho across test examples at the last step (ties averaged like scipy).

    Args:
        pred: float32 [..., T + 1, n_test].
        true: float32 [..., T + 1, n_test].

    Returns:
        float32 [...]; NaN where either side is constant across test examples (undefined).

    Raises:
        ValueError: shapes differ, or fewer than 2 rows.
    """
    pred, true = _check_pair(pred, true)
    return spearman(pred[..., -1, :], true[..., -1, :])


@jax.jit
def metrics(
    pred: Float[ArrayLike, "*batch time n_test"], true: Float[ArrayLike, "*batch time n_test"]
) -> dict[str, Float[Array, "*batch"]]:
    """All per-run metrics of one (or a batch of) simulated trajectory, in float32 JAX.

    Args:
        pred: float32 [..., T + 1, n_test] simulated losses (row 0 = the given initial loss).
        true: float32 [..., T + 1, n_test] observed losses.

    Returns:
        `{"all_steps_mse", "final_step_mse", "final_step_spearman"}`, each float32 [...]. The
        MSEs are inf once squared errors pass float32's range; `host_metrics` does not overflow.

    Raises:
        ValueError: shapes differ, or fewer than 2 rows.

    References:
        Guu et al., "Simfluence", 2023, section 4 (all-steps MSE, final-step Spearman).
        https://arxiv.org/abs/2303.08114
    """
    return {
        "all_steps_mse": all_steps_mse(pred, true),
        "final_step_mse": final_step_mse(pred, true),
        "final_step_spearman": final_step_spearman(pred, true),
    }


def _rankdata64(x: np.ndarray) -> np.ndarray:
    """float64 average ranks along the last axis (scipy's "average"); NaN rows -> NaN."""
    from scipy.stats import rankdata as scipy_rankdata  # host side: exact, no float32

    return scipy_rankdata(x, method="average", axis=-1, nan_policy="propagate").astype(np.float64)


def _spearman64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 Spearman's rho along the last axis; NaN where a side is constant or NaN."""
    ra, rb = _rankdata64(a), _rankdata64(b)
    ra = ra - ra.mean(axis=-1, keepdims=True)
    rb = rb - rb.mean(axis=-1, keepdims=True)
    den = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def host_metrics(
    pred: Float[ArrayLike, "*batch time n_test"], true: Float[ArrayLike, "*batch time n_test"]
) -> dict[str, Float[np.ndarray, "*batch"]]:
    """`metrics` in float64 numpy, for host arrays (what `evaluate` scores with).

    A float32 rollout can be finite but huge (a simulator that grows without diverging to inf);
    its squared errors overflow float32 but not float64 (float32's largest value squared is
    ~1.2e77), so every metric of finite float32 inputs is finite here, except a rho that is
    undefined.

    Args:
        pred: float [..., T + 1, n_test] simulated losses (row 0 = the given initial loss).
        true: float [..., T + 1, n_test] observed losses.

    Returns:
        `{"all_steps_mse", "final_step_mse", "final_step_spearman"}`, each float64 [...]
        (0-d arrays for one run); rho is NaN where either side is constant or holds a NaN.

    Raises:
        ValueError: shapes differ, or fewer than 2 rows.
    """
    pred = np.asarray(pred, np.float64)
    true = np.asarray(true, np.float64)
    _check_shapes(pred.shape, true.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        err = pred - true
        return {
            "all_steps_mse": np.mean(err[..., 1:, :] ** 2, axis=(-2, -1)),
            "final_step_mse": np.mean(err[..., -1, :] ** 2, axis=-1),
            "final_step_spearman": _spearman64(pred[..., -1, :], true[..., -1, :]),
        }


def mean_stderr(values: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """Mean and standard error of the mean (sample std with ddof=1, over sqrt(n)).

    The values are treated as independent draws: right for per-run metrics over held-out runs,
    wrong for per-test-example values that share runs (see `across_run_spearman`).

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
    """[..., R, n] -> bool [..., n]: spread across runs within rounding of the magnitude."""
    spread = x.max(axis=-2) - x.min(axis=-2)
    scale = np.abs(x).mean(axis=-2)
    return spread <= rtol * scale


def _across_run_stat(
    pred: Float[np.ndarray, "k runs n_test"],
    true: Float[np.ndarray, "k runs n_test"],
    rtol: float,
) -> tuple[
    Float[np.ndarray, " k"],
    Bool[np.ndarray, "k n_test"],
    Bool[np.ndarray, "k n_test"],
]:
    """The across-run rho of k sets of runs at once (the full set, or jackknife replicates).

    Returns:
        (mean [k], NaN where undefined; true_const [k, n_test]; pred_const [k, n_test]).
    """
    true_const = _constant_columns(true, rtol)
    pred_const = _constant_columns(pred, rtol)
    used = ~true_const
    # Ranks across runs: move the run axis last.
    rho = _spearman64(np.swapaxes(pred, -1, -2), np.swapaxes(true, -1, -2))  # [k, n_test]
    # A constant prediction carries no ordering information: rho = 0 (not dropped, which would
    # flatter the simulator), unless every used example is constant (then undefined).
    rho = np.where(pred_const, 0.0, rho)
    n_used = used.sum(-1)
    informative = (used & ~pred_const).sum(-1)
    total = np.where(used, rho, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(informative > 0, total / np.maximum(n_used, 1), np.nan)
    return mean, true_const, pred_const


def across_run_spearman(
    pred_final: Float[ArrayLike, "runs n_test"],
    true_final: Float[ArrayLike, "runs n_test"],
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

    Standard error: the per-example rhos all rank the same few runs, so they are strongly
    correlated, and a standard error over test examples (as if independent) is far too small.
    `stderr` is instead the delete-one jackknife over held-out runs: with theta_k the statistic
    recomputed (by the rules above) without run k, and theta_bar their mean,
    ``stderr = sqrt((R - 1) / R * sum_k (theta_k - theta_bar) ** 2)``. It is None (with
    `stderr_undefined_reason`) when R < 4 or a leave-one-out statistic is undefined. The point
    estimate `mean` is the statistic on all R runs.

    Args:
        pred_final: float [R, n_test] simulated final losses, one row per held-out run.
        true_final: float [R, n_test] observed final losses.
        rtol: relative spread at or below which a column counts as constant.

    Returns:
        dict with `mean` (float | None), `stderr` (float | None), `stderr_method`
        (`ACROSS_RUN_STDERR_METHOD`), `stderr_undefined_reason` (str | None), `n_runs` (int, R),
        `n_used` (int, examples averaged), `n_excluded` (int, constant true finals),
        `n_constant_prediction` (int), `undefined_reason` (str | None).

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
    n_runs = pred.shape[0]
    if n_runs < 2:
        raise ValueError(
            f"across_run_spearman needs at least 2 held-out runs, got {n_runs}; hold out more runs"
        )
    if not (np.isfinite(pred).all() and np.isfinite(true).all()):
        raise ValueError("across_run_spearman got non-finite final losses")
    mean, true_const, pred_const = _across_run_stat(pred[None], true[None], rtol)
    used = ~true_const[0]
    n_used = int(used.sum())
    result = {
        "mean": None,
        "stderr": None,
        "stderr_method": ACROSS_RUN_STDERR_METHOD,
        "stderr_undefined_reason": None,
        "n_runs": n_runs,
        "n_used": n_used,
        "n_excluded": int(true_const.sum()),
        "n_constant_prediction": int((pred_const[0] & used).sum()),
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
    result["mean"] = float(mean[0])
    result.update(_jackknife(pred, true, rtol))
    return result


_JACKKNIFE_MIN_RUNS = 4  # held-out runs for a jackknife stderr of the across-run rho


def _jackknife(pred: np.ndarray, true: np.ndarray, rtol: float) -> dict:
    """Delete-one jackknife stderr of the across-run rho over the R runs (rows)."""
    n_runs = pred.shape[0]
    if n_runs < _JACKKNIFE_MIN_RUNS:
        # Leaving one of 3 runs out leaves 2, whose rho is always +-1 (or 0): the replicates
        # then take 2-3 values and the "standard error" is often exactly 0.
        return {
            "stderr_undefined_reason": f"the jackknife over held-out runs needs at least "
            f"{_JACKKNIFE_MIN_RUNS} runs, got {n_runs} (each leave-one-out rho would rank only "
            f"{n_runs - 1} run{'s' if n_runs != 2 else ''}); hold out more runs"
        }
    keep = np.array([np.delete(np.arange(n_runs), k) for k in range(n_runs)])  # [R, R - 1]
    theta, _, _ = _across_run_stat(pred[keep], true[keep], rtol)  # [R]
    if not np.isfinite(theta).all():
        n_bad = int((~np.isfinite(theta)).sum())
        return {
            "stderr_undefined_reason": f"the jackknife is undefined: leaving out {n_bad} of "
            f"the {n_runs} held-out runs (one at a time) leaves no test example whose simulated "
            "and true final losses both vary across the other runs"
        }
    return {"stderr": float(np.sqrt((n_runs - 1) / n_runs * np.sum((theta - theta.mean()) ** 2)))}


def across_run_spearman_difference(
    pred_final: Float[ArrayLike, "runs n_test"],
    ref_final: Float[ArrayLike, "runs n_test"],
    true_final: Float[ArrayLike, "runs n_test"],
    *,
    rtol: float = CONSTANT_RTOL,
) -> dict:
    """The paired difference of two simulators' across-run rho on the same held-out runs.

    The two rhos rank the same runs, so their errors are strongly correlated and the stderr of
    their difference is far smaller than either stderr suggests. `mean` is
    ``across_run_spearman(pred).mean - across_run_spearman(ref).mean``; `stderr` is the
    delete-one jackknife over held-out runs of that difference: with d_k the difference
    recomputed (by `across_run_spearman`'s rules) without run k and d_bar their mean,
    ``stderr = sqrt((R - 1) / R * sum_k (d_k - d_bar) ** 2)``.

    Args:
        pred_final: float [R, n_test] final losses simulated by the variant.
        ref_final: float [R, n_test] final losses simulated by the reference variant.
        true_final: float [R, n_test] observed final losses.
        rtol: relative spread at or below which a column counts as constant.

    Returns:
        dict with `mean`, `stderr` (float | None), `stderr_method`, `stderr_undefined_reason`,
        `n_runs`, `undefined_reason` (str | None; then `mean` and `stderr` are None: either rho
        is undefined on all runs).

    Raises:
        ValueError: shapes differ, fewer than 2 runs, or non-finite values.
    """
    pred = np.asarray(pred_final, dtype=np.float64)
    ref = np.asarray(ref_final, dtype=np.float64)
    true = np.asarray(true_final, dtype=np.float64)
    if not pred.shape == ref.shape == true.shape or pred.ndim != 2:
        raise ValueError(
            f"across_run_spearman_difference expects three [runs, n_test] arrays, got "
            f"{pred.shape}, {ref.shape} and {true.shape}"
        )
    n_runs = pred.shape[0]
    if n_runs < 2:
        raise ValueError(f"across_run_spearman_difference needs at least 2 runs, got {n_runs}")
    if not (np.isfinite(pred).all() and np.isfinite(ref).all() and np.isfinite(true).all()):
        raise ValueError("across_run_spearman_difference got non-finite final losses")
    result = {
        "mean": None,
        "stderr": None,
        "stderr_method": ACROSS_RUN_STDERR_METHOD,
        "stderr_undefined_reason": None,
        "n_runs": n_runs,
        "undefined_reason": None,
    }
    both = np.stack([pred, ref])  # [2, R, n]
    full = _across_run_stat(both, np.stack([true, true]), rtol)[0]  # [2]
    if not np.isfinite(full).all():
        result["undefined_reason"] = (
            "the across-run rho of the variant or the reference is undefined"
        )
        return result
    result["mean"] = float(full[0] - full[1])
    if n_runs < _JACKKNIFE_MIN_RUNS:
        result["stderr_undefined_reason"] = (
            f"the jackknife over held-out runs needs at least {_JACKKNIFE_MIN_RUNS} runs, got "
            f"{n_runs}; hold out more runs"
        )
        return result
    keep = np.array([np.delete(np.arange(n_runs), k) for k in range(n_runs)])  # [R, R - 1]
    theta = [_across_run_stat(x[keep], true[keep], rtol)[0] for x in (pred, ref)]  # 2 x [R]
    d = theta[0] - theta[1]
    if not np.isfinite(d).all():
        result["stderr_undefined_reason"] = (
            "the jackknife is undefined: a leave-one-out rho of the variant or the reference is "
            "undefined"
        )
        return result
    result["stderr"] = float(np.sqrt((n_runs - 1) / n_runs * np.sum((d - d.mean()) ** 2)))
    return result


def skill_score(mse: float, baseline_mse: float) -> float | None:
    """Skill score 1 - mse / baseline_mse (positive: better than the baseline).

    Args:
        mse: a simulator's all-steps MSE.
        baseline_mse: the baseline's all-steps MSE (mean trajectory in `evaluate`).

    Returns:
        The score, or None when the baseline MSE is 0 (the score is undefined).

    Raises:
        ValueError: either MSE is not finite.
    """
    if not (math.isfinite(mse) and math.isfinite(baseline_mse)):
        raise ValueError(f"skill_score got non-finite MSE ({mse}, {baseline_mse})")
    if baseline_mse <= 0.0:
        return None
    return 1.0 - mse / baseline_mse
