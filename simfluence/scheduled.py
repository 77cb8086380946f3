"""Schedule-aware Simfluence variants: each step's effect scales with its learning rate.

Simfluence-Linear's A and B are the same at every step, but a run's learning rate is not (a
warm-up ramp makes an example seen early move the loss several times less than one seen late).
The schedule-aware variants scale each step by the run's relative learning rate
``w_t = eta_t / eta_max``:

    L_t = L_{t-1} + w_t sum_{i in c_t} (a_i L_{t-1} + b_i),

with ``eta_t`` from the run's ``lr.npy`` and ``eta_max`` the largest rate of the fitting runs
(stored in the simulator, so a rollout scales a new curriculum's rates the same way). The model
is still linear in a and b, and is fitted by the same exact ridge solver as Simfluence-Linear
(`simfluence.simulators.fit`, structure-aware PCG) with every design row scaled by ``w_t``:

- ``linear-lr``: minimises sum_t (L_t - L_{t-1} - w_t sum (a_i L_{t-1} + b_i))^2
  + l2_a sum_i (a_i - (a0 - 1/batch))^2 + l2_b sum_i b_i^2;
- ``additive-lr``: a = 0 (only b and l2_b);
- ``linear-lr-tracin-prior``: as linear-lr, but b is shrunk towards the rescaled TracIn-CP
  change per slot, ``prior_i = -s eta_max / batch * mean_k dots[k, j, i]`` (s and the dots of
  `tracin.from_runs(..., variant="tracin-cp-rescaled")`, dots averaged over checkpoints). With
  few fitting runs the fit falls back to TracIn-CP; with many it learns what TracIn-CP misses.

A simulator of these variants stores ``A = 1/batch + a`` and ``B = b`` (per unit ``w_t``), so
plain Simfluence-Linear is the special case ``w_t = 1`` with the same A and B: a constant
schedule gives exactly the linear fit (same lambdas and a0). Rollouts need the curriculum's
learning rates (`simulators.simulate(..., lr=...)`).

This module holds the family's names, its run-level inputs (learning rates, the TracIn-CP
prior) and its rollout and removal kernels; fitting, lambda selection, rollout checks and
persistence are shared with the other variants in `simfluence.simulators`.

References:
    Guu et al., "Simfluence: Modeling the Influence of Individual Training Examples by
    Simulating Training Runs", 2023. https://arxiv.org/abs/2303.08114
    Pruthi et al., "Estimating Training Data Influence by Tracing Gradient Descent", 2020.
    https://arxiv.org/abs/2002.08484
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from simfluence import momentum, tracin
from simfluence.runlog import Run

__all__ = [
    "SCHEDULED_VARIANTS",
    "PRIOR_VARIANTS",
    "check_lrs",
    "run_lr",
    "run_lrs",
    "tracin_prior",
    "fit_inputs",
]

# linear-lr-momentum (`simfluence.momentum`) is schedule-aware too: it needs the runs' rates.
SCHEDULED_VARIANTS = (
    "linear-lr",
    "additive-lr",
    "linear-lr-tracin-prior",
    *momentum.LR_MOMENTUM_VARIANTS,
)
# Variants whose b is shrunk towards a per-coefficient prior (from TracIn-CP).
PRIOR_VARIANTS = ("linear-lr-tracin-prior",)


def check_lrs(
    lrs, steps: Sequence[int], variant: str, what: str = "fitting"
) -> list[Float[np.ndarray, " T"]]:
    """Validates one learning-rate array per run.

    Args:
        lrs: one float [T_r] array per run (None: not given).
        steps: T_r of each run.
        variant: the simulator variant (for the messages).
        what: which runs ("fitting", "validation").

    Returns:
        The learning rates as float32 arrays.

    Raises:
        ValueError: lrs missing, one per run not given, a wrong shape, or a negative or
            non-finite rate, naming the run.
    """
    if lrs is None:
        raise ValueError(
            f"{variant} scales every step by its learning rate: pass the {what} runs' rates "
            "(lrs=[one float [T_r] per run], each run's lr.npy)"
        )
    if getattr(lrs, "ndim", None) == 2:
        raise ValueError(
            f"{what} lrs is one 2-D array of shape {lrs.shape}; pass a list with one [T_r] "
            "array per run"
        )
    lrs = list(lrs)
    if len(lrs) != len(steps):
        raise ValueError(
            f"{what}: {len(lrs)} learning-rate arrays for {len(steps)} runs; pass one per run"
        )
    out = []
    for r, (lr, t) in enumerate(zip(lrs, steps, strict=True)):
        lr = np.asarray(lr)
        if lr.shape != (t,) or not np.issubdtype(lr.dtype, np.number):
            raise ValueError(
                f"{what} run {r}: learning rates have shape {lr.shape} ({lr.dtype}); expected "
                f"float [{t}], one per step"
            )
        lr = lr.astype(np.float32)
        bad = ~(np.isfinite(lr) & (lr >= 0))
        if bad.any():
            step = int(np.argmax(bad))
            raise ValueError(
                f"{what} run {r}: learning rate {lr[step]} at step {step + 1} is negative or "
                "not finite; pass the rates the run used"
            )
        out.append(lr)
    return out


def lr_max_of(lrs: Sequence[np.ndarray], variant: str) -> float:
    """The largest fitting-run learning rate (eta_max), which must be > 0."""
    value = max(float(np.max(lr)) for lr in lrs)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(
            f"{variant}: every fitting-run learning rate is 0, so no step moves the loss; "
            "pass the rates the runs used"
        )
    return value


def run_lr(variant: str, run: Run, fix: str) -> Float[np.ndarray, " T"] | None:
    """One run's lr.npy where ``variant`` needs it (the schedule-aware variants), else None.

    Args:
        variant: the simulator variant.
        run: a loaded run.
        fix: what to do instead, ending the message.

    Returns:
        ``run.lr`` for a schedule-aware variant, None for the others.

    Raises:
        ValueError: the variant needs the rates and the run has no lr.npy (names the run).
    """
    if variant not in SCHEDULED_VARIANTS:
        return None
    if run.lr is None:
        raise ValueError(f"{run.path}: no lr.npy, which the {variant} simulator needs; {fix}")
    return run.lr


def run_lrs(runs: Sequence[Run], variant: str) -> list[Float[np.ndarray, " T"]]:
    """The runs' learning rates (lr.npy), which the schedule-aware variants need.

    Args:
        runs: loaded runs.
        variant: the simulator variant (for the message).

    Returns:
        One float32 [T_r] array per run.

    Raises:
        ValueError: a run has no lr.npy, naming it and the fix.
    """
    for r in runs:
        if r.lr is None:
            raise ValueError(
                f"{r.path}: run {r.index} has no lr.npy, which {variant} needs (it scales each "
                "step by the run's learning rate); log the rates with the run "
                "(runlog.write_run(..., lr=...)) or use a variant without -lr"
            )
    return [r.lr for r in runs]


def tracin_prior(
    fit_runs: Sequence[Run], *, lr_max: float, batch: int
) -> tuple[Float[np.ndarray, "n_test n_train"], float]:
    """The rescaled TracIn-CP change per slot, the b prior of linear-lr-tracin-prior.

    TracIn-CP predicts that a slot of example i at step t changes test example j's loss by
    ``-s (eta_t / batch) dots[k(t), j, i]``; with the checkpoints' dots averaged, per unit of
    ``w_t = eta_t / eta_max`` that is ``prior[j, i] = -s eta_max / batch * mean_k dots[k, j, i]``.

    Args:
        fit_runs: the fitting runs (those with tracin.npz are averaged, see `tracin.from_runs`).
        lr_max: eta_max, the largest learning rate of the fitting runs.
        batch: the fitting runs' batch size.

    Returns:
        (prior f32 [n_test, n_train], s): the prior and the TracIn-CP scale.

    Raises:
        RunLogError: no fitting run has tracin.npz, or their settings differ (`tracin.from_runs`).

    References:
        Pruthi et al. 2020, TracIn. https://arxiv.org/abs/2002.08484
    """
    tsim = tracin.from_runs(fit_runs, variant="tracin-cp-rescaled")
    mean_dots = np.mean(tsim.dots, axis=0, dtype=np.float64)  # [n_test, n_train]
    prior = -tsim.scale * lr_max / batch * mean_dots
    return prior.astype(np.float32), float(tsim.scale)


def fit_inputs(fit_runs: Sequence[Run], variant: str) -> dict:
    """The extra `simulators.fit` / `select_lambdas` arguments of a variant, from its runs.

    Args:
        fit_runs: the fitting runs.
        variant: any simulator variant.

    Returns:
        {} for the schedule-free variants; {"lrs": [...]} for linear-lr and additive-lr, plus
        "b_prior" (f32 [n_test, n_train], see `tracin_prior`) for linear-lr-tracin-prior.

    Raises:
        ValueError: a fitting run has no lr.npy.
        RunLogError: the prior variant and no fitting run has tracin.npz.
    """
    if variant not in SCHEDULED_VARIANTS:
        return {}
    lrs = run_lrs(fit_runs, variant)
    out: dict = {"lrs": lrs}
    if variant in PRIOR_VARIANTS:
        lrs = check_lrs(lrs, [r.steps for r in fit_runs], variant)
        lr_max = lr_max_of(lrs, variant)
        out["b_prior"], _ = tracin_prior(fit_runs, lr_max=lr_max, batch=fit_runs[0].batch)
    return out


# ----------------------------------------------------------------------------------------------
# Rollout and removal kernels (checked inputs come from `simulators`)
# ----------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("additive",))
def rollout_runs(A, B, curricula, initial_losses, w, additive: bool):
    """Batched rollout: L_t = L_{t-1} + w_t sum_{i in c_t} ((A_i - 1/b) L_{t-1} + B_i).

    Args:
        A: f32 [n_test, n_train], 1/batch + a.
        B: f32 [n_test, n_train], b.
        curricula: int [R, T, b].
        initial_losses: f32 [R, n_test].
        w: f32 [R, T] relative learning rates eta_t / eta_max.
        additive: a = 0 (additive-lr): only B is gathered.

    Returns:
        f32 [R, T + 1, n_test].
    """
    A, B = A.astype(jnp.float32), B.astype(jnp.float32)
    n_test = A.shape[0]
    inv_b = jnp.float32(1.0 / curricula.shape[-1])
    # One row per training example (a and b for every test example): gathers stay in cache.
    table = B.T if additive else jnp.concatenate([(A - inv_b).T, B.T], axis=1)  # [n_train, ..]

    def step(loss, inp):  # loss: [R, n_test]
        ids, wt = inp  # [R, b], [R]
        g = table.at[ids].get(mode="promise_in_bounds").sum(axis=1)  # [R, (2) n_test]
        d = g if additive else g[:, :n_test] * loss + g[:, n_test:]
        loss = loss + wt.astype(jnp.float32)[:, None] * d
        return loss, loss

    l0 = initial_losses.astype(jnp.float32)
    xs = (jnp.swapaxes(curricula, 0, 1), jnp.swapaxes(w, 0, 1))  # [T, R, b], [T, R]
    _, traj = jax.lax.scan(step, l0, xs)  # [T, R, n_test]
    return jnp.swapaxes(jnp.concatenate([l0[None], traj], axis=0), 0, 1)


@partial(jax.jit, static_argnames=("additive",))
def removal(a, b, curriculum, mult, w, l0, additive: bool):
    """Final-loss change of one test example when each training example is removed.

    A removed slot contributes nothing (a = b = 0 in that slot): at a step where example i
    appears m times, alpha_t = 1 + w_t sum a loses m w_t a_i and beta_t = w_t sum b loses
    m w_t b_i. The differences are carried through one `lax.scan` (exact).

    Args:
        a: f32 [n_train], A - 1/batch of the test example (ignored when `additive`).
        b: f32 [n_train], its B.
        curriculum: int [T, batch].
        mult: f32 [T, batch], multiplicity of each slot's id within its batch.
        w: f32 [T] relative learning rates.
        l0: scalar, the observed L_0.
        additive: a = 0.

    Returns:
        f32 [n_train]: final loss without example i minus final loss with all.
    """

    def step(carry, inp):
        loss, diff = carry  # scalar, [n_train]
        ids, m, wt = inp  # [batch], [batch], scalar
        ai = jnp.zeros(ids.shape, jnp.float32) if additive else wt * a[ids]  # [batch]
        bi = wt * b[ids]
        alpha = 1.0 + ai.sum()
        alpha_i = alpha - m * ai
        new_i = alpha_i * diff[ids] - m * (ai * loss + bi)
        diff = (alpha * diff).at[ids].set(new_i)
        return (alpha * loss + bi.sum(), diff), None

    init = (l0.astype(jnp.float32), jnp.zeros_like(b))
    (_, diff), _ = jax.lax.scan(step, init, (curriculum, mult, w.astype(jnp.float32)))
    return diff


def relative_rates(lr: Float[ArrayLike, "*shape"], lr_max: float) -> Float[Array, "*shape"]:
    """w = lr / eta_max as f32 (jnp; usable under jit)."""
    return jnp.asarray(lr, jnp.float32) / jnp.float32(lr_max)
