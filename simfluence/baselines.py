"""Trivial simulators that ignore the curriculum, to keep the evaluation honest.

- `constant`: L_t = L_0 of the run (nothing changes).
- `mean-trajectory`: L_t = L_0 + mean over fitting runs of (L_t - L_0) at step t, per test
  example. Runs of different length: step t averages over the fitting runs that reach t; steps
  beyond the longest fitting run hold the last value.

A simulator that does not beat the mean trajectory on all-steps MSE has learnt nothing about the
curriculum that the average shape of a run does not already say.

`simfluence fit --variant constant|mean-trajectory` writes a baseline to a file
(`save_baseline`; `fit_mean_trajectory`'s delta), which `simfluence.loader.load_any_simulator`
reads like any other simulator file.

References:
    Guu et al., "Simfluence", 2023. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from jaxtyping import ArrayLike, Float

__all__ = [
    "BASELINES",
    "BaselineSimulator",
    "constant",
    "fit_baseline",
    "fit_mean_trajectory",
    "load_baseline",
    "mean_trajectory",
    "rollout_baseline",
    "save_baseline",
]

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


# ----------------------------------------------------------------------------------------------
# Baseline files (`simfluence fit --variant constant|mean-trajectory`)
# ----------------------------------------------------------------------------------------------

_FILE_KEYS = ("variant", "delta", "n_train")


@dataclass(frozen=True)
class BaselineSimulator:
    """A curriculum-blind baseline as a simulator file holds it.

    Attributes:
        variant: "constant" or "mean-trajectory".
        delta: float32 [T_fit + 1, n_test], the mean change from L_0 at each step
            (`fit_mean_trajectory`); a single row of zeros for "constant".
        n_train: size of the training pool (curricula are checked against it).
    """

    variant: str
    delta: Float[np.ndarray, "time_fit n_test"] = field(repr=False)
    n_train: int

    @property
    def n_test(self) -> int:
        """Number of tracked test examples."""
        return int(self.delta.shape[1])


def fit_baseline(
    variant: str, losses: Sequence[Float[ArrayLike, "time_r n_test"]], n_train: int
) -> BaselineSimulator:
    """A baseline fitted on the fitting runs' losses.

    Args:
        variant: "constant" or "mean-trajectory".
        losses: the fitting runs' losses, float [T_r + 1, n_test] each.
        n_train: size of the training pool.

    Returns:
        A `BaselineSimulator` (for "constant", delta is zeros [1, n_test]).

    Raises:
        ValueError: unknown variant, no runs, or runs with different n_test.
    """
    if variant not in BASELINES:
        raise ValueError(f"unknown baseline {variant!r}; choose one of {', '.join(BASELINES)}")
    delta = fit_mean_trajectory(losses)
    if variant == "constant":
        delta = np.zeros((1, delta.shape[1]), np.float32)
    return BaselineSimulator(variant=variant, delta=delta, n_train=int(n_train))


def rollout_baseline(
    sim: BaselineSimulator, initial_losses: Float[ArrayLike, " n_test"], steps: int
) -> Float[np.ndarray, "time n_test"]:
    """Roll a baseline out for `steps` steps (the curriculum itself is ignored).

    Args:
        sim: the baseline.
        initial_losses: float [n_test] observed L_0.
        steps: number of steps T.

    Returns:
        float32 [T + 1, n_test]: `constant` or `mean_trajectory` of the stored delta.
    """
    if sim.variant == "constant":
        return constant(initial_losses, steps)
    return mean_trajectory(sim.delta, initial_losses, steps)


def save_baseline(path, sim: BaselineSimulator, *, origin: dict | None = None) -> None:
    """Writes a baseline to an .npz file atomically (as `simulators.save_simulator` does).

    Args:
        path: destination file.
        sim: the baseline.
        origin: optional JSON-able record of where it was fitted (read by
            `simulators.read_origin`).
    """
    import json

    from simfluence.runlog import atomic_savez

    extra = {} if origin is None else {"origin": np.asarray(json.dumps(origin, sort_keys=True))}
    atomic_savez(
        Path(path),
        variant=np.asarray(sim.variant),
        delta=np.asarray(sim.delta, np.float32),
        n_train=np.asarray(sim.n_train, np.int64),
        **extra,
    )


def load_baseline(path) -> BaselineSimulator:
    """Reads a baseline written by `save_baseline`.

    Args:
        path: the .npz file.

    Returns:
        The `BaselineSimulator`.

    Raises:
        ValueError: unreadable file, missing keys, unknown variant or bad shapes, naming the file.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _FILE_KEYS if k not in z.files]
            if missing:
                raise ValueError(
                    f"{path}: not a baseline file (missing {', '.join(missing)}); write one with "
                    "`simfluence fit --variant mean-trajectory`"
                )
            data = {k: z[k] for k in _FILE_KEYS}
    except ValueError:
        raise
    except Exception as e:  # OSError, zipfile errors: one line naming the file
        raise ValueError(f"{path}: cannot read simulator ({type(e).__name__}: {e})") from None
    variant, delta, n_train = str(data["variant"]), data["delta"], data["n_train"]
    if (
        variant not in BASELINES
        or delta.ndim != 2
        or 0 in delta.shape
        or not np.issubdtype(delta.dtype, np.floating)
        or n_train.shape != ()
        or not np.issubdtype(n_train.dtype, np.integer)
        or int(n_train) < 1
    ):
        raise ValueError(
            f"{path}: bad baseline file (variant {variant!r}, delta {delta.dtype} "
            f"{delta.shape}, n_train {n_train}); write it again with `simfluence fit`"
        )
    if not np.isfinite(delta).all():
        raise ValueError(f"{path}: delta contains NaN or inf; fit the baseline again")
    return BaselineSimulator(variant=variant, delta=delta.astype(np.float32), n_train=int(n_train))
