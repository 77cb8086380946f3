"""Trivial simulators that ignore the curriculum, to keep the evaluation honest.

- `constant`: L_t = L_0 of the run (nothing changes).
- `mean-trajectory`: L_t = L_0 + mean over fitting runs of (L_t - L_0) at step t, per test
  example. Runs of different length: step t averages over the fitting runs that reach t; steps
  beyond the longest fitting run hold the last value.

A simulator that does not beat the mean trajectory on all-steps MSE has learnt nothing about the
curriculum that the average shape of a run does not already say.

References:
    Guu et al., "Simfluence", 2023. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import ArrayLike, Float

__all__ = ["BASELINES", "constant", "fit_mean_trajectory", "mean_trajectory"]

BASELINES = ("constant", "mean-trajectory")


def _initial(initial_losses, steps: int) -> np.ndarray:
    l0 = np.asarray(initial_losses, dtype=np.float32)
    if l0.ndim != 1:
        raise ValueError(f"initial_losses must be [n_test], got shape {l0.shape}")
    if int(steps) < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    return l0


def constant(
    initial_losses: Float[ArrayLike, " n_test"], steps: int
) -> Float[np.ndarray, "time n_test"]:
    """The constant baseline: every step keeps the initial loss.

    Args:
        initial_losses: float [n_test] observed L_0 of the run.
        steps: number of steps T.

    Returns:
        float32 [T + 1, n_test] (time = T + 1 rows).

    Raises:
        ValueError: `initial_losses` is not 1-d, or `steps` < 0.
    """
    l0 = _initial(initial_losses, steps)
    return np.broadcast_to(l0, (int(steps) + 1, l0.shape[0])).copy()


def fit_mean_trajectory(
    losses: Sequence[Float[ArrayLike, "time_r n_test"]],
) -> Float[np.ndarray, "time_max n_test"]:
    """Mean change from the initial loss at each step over fitting runs.

    Args:
        losses: fitting runs' losses, each float [T_r + 1, n_test] (lengths may differ).

    Returns:
        float32 [T_max + 1, n_test] `delta`, delta[0] = 0, delta[t] = mean over runs with
        T_r >= t of (L_t - L_0).

    Raises:
        ValueError: no runs, or runs with different n_test.
    """
    if len(losses) == 0:
        raise ValueError("fit_mean_trajectory needs at least one fitting run")
    arrays = [np.asarray(x, dtype=np.float64) for x in losses]
    n_test = arrays[0].shape[1]
    t_max = max(a.shape[0] for a in arrays) - 1
    total = np.zeros((t_max + 1, n_test))
    count = np.zeros((t_max + 1, 1))
    for a in arrays:
        if a.ndim != 2 or a.shape[1] != n_test:
            raise ValueError(f"fitting runs disagree on n_test: {a.shape} vs [*, {n_test}]")
        total[: a.shape[0]] += a - a[0]
        count[: a.shape[0]] += 1
    return (total / count).astype(np.float32)


def mean_trajectory(
    delta: Float[ArrayLike, "time_fit n_test"],
    initial_losses: Float[ArrayLike, " n_test"],
    steps: int,
) -> Float[np.ndarray, "time n_test"]:
    """Roll out the mean-trajectory baseline.

    Args:
        delta: float [T_fit + 1, n_test] from `fit_mean_trajectory`.
        initial_losses: float [n_test] observed L_0 of the run.
        steps: number of steps T of the run (may exceed T_fit: the last value is held).

    Returns:
        float32 [T + 1, n_test], L_t = L_0 + delta[min(t, T_fit)].

    Raises:
        ValueError: `initial_losses` is not 1-d, `steps` < 0, or `delta` has another n_test.
    """
    l0 = _initial(initial_losses, steps)
    delta = np.asarray(delta, dtype=np.float32)
    if delta.ndim != 2 or delta.shape[1] != l0.shape[0]:
        raise ValueError(
            f"delta has shape {delta.shape} but initial_losses has {l0.shape[0]} test examples"
        )
    idx = np.minimum(np.arange(int(steps) + 1), delta.shape[0] - 1)
    return (l0[None, :] + delta[idx]).astype(np.float32)
