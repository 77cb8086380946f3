"""Random curricula: which pool examples each training step sees.

A curriculum is int32 [steps, batch] of positions in the training pool (0..n_train-1). Each run
draws its own from the seed (curriculum_seed, run_index), so a run's curriculum does not depend
on how many runs the experiment has or which ones were trained together.

References:
    Simfluence: Guu et al. 2023, https://arxiv.org/abs/2303.08114 (section 5: random curricula)
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Int

KINDS = ("epochs", "uniform", "subset")


def _epochs(rng: np.random.Generator, ids: np.ndarray, steps: int, batch: int) -> np.ndarray:
    """Shuffled passes over ``ids``, concatenated and cut into ``steps`` batches."""
    need = steps * batch
    passes = -(-need // len(ids))
    order = np.concatenate([rng.permutation(ids) for _ in range(passes)])
    return order[:need].reshape(steps, batch)


def make_curriculum(
    kind: str,
    *,
    n_train: int,
    steps: int,
    batch_size: int,
    seed: int,
    run_index: int,
    subset_size: int | None = None,
) -> Int[np.ndarray, "steps batch"]:
    """Draws the curriculum of one run.

    Args:
        kind: "epochs" (shuffled passes over the pool, a new order each pass), "uniform" (every
            slot drawn uniformly with replacement), or "subset" (a random ``subset_size`` examples
            of the pool, then shuffled passes over them).
        n_train: pool size.
        steps: optimizer steps.
        batch_size: examples per step.
        seed: the experiment's curriculum seed.
        run_index: the run; the generator is seeded with (seed, run_index).
        subset_size: examples per run for "subset".

    Returns:
        int32 [steps, batch_size], values in [0, n_train).

    Raises:
        ValueError: unknown kind, bad sizes.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown curriculum kind {kind!r}; choose one of {', '.join(KINDS)}")
    if min(n_train, steps, batch_size) < 1:
        raise ValueError(f"n_train={n_train}, steps={steps}, batch_size={batch_size} must be >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(run_index)]))
    ids = np.arange(n_train)
    if kind == "uniform":
        out = rng.integers(0, n_train, size=(steps, batch_size))
    elif kind == "epochs":
        if batch_size > n_train:
            raise ValueError(f"batch_size={batch_size} exceeds the pool (n_train={n_train})")
        out = _epochs(rng, ids, steps, batch_size)
    else:
        if subset_size is None or not batch_size <= subset_size <= n_train:
            raise ValueError(
                f"subset_size={subset_size} must be in [batch_size={batch_size}, n_train={n_train}]"
            )
        subset = np.sort(rng.choice(n_train, size=subset_size, replace=False))
        out = _epochs(rng, subset, steps, batch_size)
    return out.astype(np.int32)
