"""Momentum Simfluence variants: each batch's effect is spread over later steps, as AdamW's
first moment spreads its gradient.

AdamW's update at step t is (up to the second-moment scaling) the first moment
``m_t = sum_{s <= t} (1 - d) d^(t - s) g_s`` with ``d = beta_1``: the gradient of batch s keeps
moving the parameters for about ``1 / (1 - d)`` steps. A simulator whose step t depends on batch
t alone cannot express that. ``linear-momentum`` spreads each batch's simulated change with the
same weights:

    u_s   = sum_{i in c_s} (a_i L_{s-1} + b_i)           (batch s's change, as in linear)
    D_t   = sum_{s <= t} (1 - d) d^(t - s) u_s           (the change of step t)
          = d D_{t-1} + (1 - d) u_t,   D_0 = 0
    L_t   = L_{t-1} + D_t,

with ``a_i = A_i - 1/batch`` and ``b_i = B_i`` as in Simfluence-Linear (so A sits near 1/batch and
``d = 0`` is exactly Simfluence-Linear). Each batch's change is taken at the loss when the batch
was consumed (``L_{s-1}``), as Adam's first moment holds gradients taken at the parameters of
their own step. The sum over s is the exact infinite sum (no truncation K), computed by the
recursion. Under teacher forcing (observed ``D_{t-1} = L_{t-1} - L_{t-2}``) one step reads

    L_t - L_{t-1} - d (L_{t-1} - L_{t-2}) = (1 - d) sum_{i in c_t} (a_i L_{t-1} + b_i),

the linear model's design row (batch c_t, feature L_{t-1}) with every row scaled by
``1 - d`` and the target ``D_t - d D_{t-1}``: still linear in a and b, fitted by the exact
structure-aware ridge solver of Simfluence-Linear (`simfluence._solvers`, through
`simulators.fit(..., decay=d)`) with the row weight ``w_t = 1 - d`` of the schedule-aware
variants. The ridge penalties are those of linear, so ``d = 0`` gives the linear fit.

``linear-lr-momentum`` also scales each batch's change by its relative learning rate, as
``linear-lr`` does: ``D_t = d D_{t-1} + (1 - d) w_t u_t`` with ``w_t = eta_t / eta_max``
(row weight ``(1 - d) w_t``; ``d = 0`` is exactly linear-lr). Adam multiplies the whole first
moment by the rate of step t; spreading each batch's own rate instead keeps the fit linear and
exact (the two differ only where the rate changes within the ~1/(1 - d) steps of the memory).

``tracin-cp-momentum`` spreads TracIn-CP's per-step predicted change the same way,
``D_t = d D_{t-1} + (1 - d) s delta_t`` (`tracin.simulate_tracin` with a ``decay``); its scale s
is fitted by least squares to the spread predictions on the fitting runs (with ``d = 0`` it is
tracin-cp-rescaled, and with s = 1 tracin-cp).

The decay d of both is chosen on the validation runs from `DECAY_GRID` (together with the
lambdas for linear-momentum), never on held-out runs; without validation runs it is
`DEFAULT_DECAY`, AdamW's default beta_1 (finetune uses optax's default and does not record it).

References:
    Guu et al., "Simfluence: Modeling the Influence of Individual Training Examples by
    Simulating Training Runs", 2023. https://arxiv.org/abs/2303.08114
    Kingma and Ba, "Adam: A Method for Stochastic Optimization", 2015.
    https://arxiv.org/abs/1412.6980
    Pruthi et al., "Estimating Training Data Influence by Tracing Gradient Descent", 2020.
    https://arxiv.org/abs/2002.08484
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from simfluence.runlog import Run

__all__ = [
    "MOMENTUM_VARIANTS",
    "LR_MOMENTUM_VARIANTS",
    "TRACIN_MOMENTUM",
    "DECAY_GRID",
    "DEFAULT_DECAY",
    "check_decay",
    "targets",
    "spread",
    "select",
    "tracin_from_runs",
]

MOMENTUM_VARIANTS = ("linear-momentum", "linear-lr-momentum")
# The momentum variants that also scale each batch's change by its relative learning rate
# (they are schedule-aware too: `scheduled.SCHEDULED_VARIANTS` lists them, they need lr.npy).
LR_MOMENTUM_VARIANTS = ("linear-lr-momentum",)
TRACIN_MOMENTUM = "tracin-cp-momentum"
# Decays searched on the validation runs (0 = no memory, 0.9 = AdamW's default beta_1).
DECAY_GRID = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9)
# The decay without validation runs: AdamW's default beta_1 (optax.adamw b1, finetune's).
DEFAULT_DECAY = 0.9
# Validation MSEs within this relative distance of the lowest are ties; ties go to the smaller
# decay (the simpler model; d = 0 is the memoryless one). Same tolerance as the lambda search.
_TIE_RTOL = 1e-4


def check_decay(decay, what: str = "decay") -> float:
    """``decay`` as a float in [0, 1), else a one-line ValueError naming it.

    Args:
        decay: the first-moment decay d.
        what: where it came from (for the message: "decay", "--decay", a file name).

    Returns:
        d as a float.

    Raises:
        ValueError: not a number, not finite, or outside [0, 1).
    """
    try:
        value = float(decay)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={decay!r} is not a number; pass a decay in [0, 1)") from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(
            f"{what}={decay!r} must be in [0, 1) (0: no memory; AdamW's beta_1 is {DEFAULT_DECAY})"
        )
    return value


def targets(loss: Float[np.ndarray, "steps+1 n"], decay: float) -> Float[np.ndarray, "steps n"]:
    """Teacher-forced regression targets ``D_t - d D_{t-1}`` (``D_t = L_t - L_{t-1}``, D_0 = 0).

    Args:
        loss: f32 [T + 1, n] one run's observed losses.
        decay: d in [0, 1).

    Returns:
        f32 [T, n] (computed in float64).
    """
    delta = np.diff(np.asarray(loss, np.float64), axis=0)  # [T, n]
    out = delta.copy()
    out[1:] -= decay * delta[:-1]
    return out.astype(np.float32)


def spread(deltas: Float[np.ndarray, "steps n"], decay: float) -> Float[np.ndarray, "steps n"]:
    """Each step's change spread with the first-moment weights: ``D_t = d D_{t-1} + (1-d) x_t``.

    Args:
        deltas: float [T, n] per-step changes x_t.
        decay: d in [0, 1) (0 returns the changes unchanged).

    Returns:
        float64 [T, n]: ``D_t = sum_{s <= t} (1 - d) d^(t - s) x_s``.
    """
    x = np.asarray(deltas, np.float64)
    if decay == 0.0:
        return x.copy()
    out = np.empty_like(x)
    vel = np.zeros(x.shape[1:], np.float64)
    for t in range(x.shape[0]):  # T is small (tens to thousands of steps); O(T n)
        vel = decay * vel + (1.0 - decay) * x[t]
        out[t] = vel
    return out


# ----------------------------------------------------------------------------------------------
# Rollout and removal kernels (checked inputs come from `simulators`)
# ----------------------------------------------------------------------------------------------


@jax.jit
def rollout_runs(
    A: Float[Array, "n_test n_train"],
    B: Float[Array, "n_test n_train"],
    curricula: Int[Array, "R T b"],
    initial_losses: Float[Array, "R n_test"],
    decay: Float[ArrayLike, ""],
    w: Float[Array, "R T"] | None = None,
) -> Float[Array, "R T+1 n_test"]:
    """Batched rollout: D_t = d D_{t-1} + (1 - d) w_t sum_{i in c_t} ((A_i - 1/b) L_{t-1} + B_i).

    Args:
        A: f32 [n_test, n_train], 1/batch + a.
        B: f32 [n_test, n_train], b.
        curricula: int [R, T, b].
        initial_losses: f32 [R, n_test].
        decay: scalar d (traced: one compile for every d).
        w: f32 [R, T] relative learning rates eta_t / eta_max (linear-lr-momentum); None: 1.

    Returns:
        f32 [R, T + 1, n_test].
    """
    A, B = A.astype(jnp.float32), B.astype(jnp.float32)
    n_test = A.shape[0]
    d = jnp.asarray(decay, jnp.float32)
    inv_b = jnp.float32(1.0 / curricula.shape[-1])
    table = jnp.concatenate([(A - inv_b).T, B.T], axis=1)  # [n_train, 2 n_test]

    def step(carry, inp):  # loss, vel: [R, n_test]; ids: [R, b]; wt: [R]
        loss, vel = carry
        ids, wt = inp
        g = table.at[ids].get(mode="promise_in_bounds").sum(axis=1)  # [R, 2 n_test]
        u = g[:, :n_test] * loss + g[:, n_test:]
        vel = d * vel + (1.0 - d) * (u if wt is None else wt.astype(jnp.float32)[:, None] * u)
        loss = loss + vel
        return (loss, vel), loss

    l0 = initial_losses.astype(jnp.float32)
    xs = (jnp.swapaxes(curricula, 0, 1), None if w is None else jnp.swapaxes(w, 0, 1))
    _, traj = jax.lax.scan(step, (l0, jnp.zeros_like(l0)), xs)
    return jnp.swapaxes(jnp.concatenate([l0[None], traj], axis=0), 0, 1)


@jax.jit
def removal(
    a: Float[Array, " n_train"],
    b: Float[Array, " n_train"],
    curriculum: Int[Array, "T batch"],
    mult: Float[Array, "T batch"],
    l0: Float[ArrayLike, ""],
    decay: Float[ArrayLike, ""],
    w: Float[Array, " T"] | None = None,
) -> Float[Array, " n_train"]:
    """Final-loss change of one test example when each training example is removed.

    A removed slot is neutral (a = b = 0), as for linear: at a step where example i appears m
    times, batch s's change u_s loses m (a_i L_{s-1} + b_i). The differences of the loss and of
    the momentum D are carried through one `lax.scan` for all examples at once (exact).

    Args:
        a: f32 [n_train], A - 1/batch of the test example.
        b: f32 [n_train], its B.
        curriculum: int [T, batch].
        mult: f32 [T, batch], multiplicity of each slot's id within its batch.
        l0: scalar, the observed L_0.
        decay: scalar d.
        w: f32 [T] relative learning rates (linear-lr-momentum); None: 1.

    Returns:
        f32 [n_train]: final loss without example i minus final loss with all.
    """
    d = jnp.asarray(decay, jnp.float32)
    w = jnp.ones(curriculum.shape[0], jnp.float32) if w is None else w.astype(jnp.float32)

    def step(carry, inp):
        loss, vel, dl, dv = carry  # scalars; [n_train] differences of loss and momentum
        ids, m, wt = inp  # [batch], [batch], scalar
        ai, bi = wt * a[ids], wt * b[ids]
        a_sum = ai.sum()
        u = a_sum * loss + bi.sum()
        # Without example i: u_i - u = sum(a) dl_i - m (a_i (L + dl_i) + b_i) (only for ids).
        du = (a_sum * dl).at[ids].set(a_sum * dl[ids] - m * (ai * (loss + dl[ids]) + bi))
        dv = d * dv + (1.0 - d) * du
        vel = d * vel + (1.0 - d) * u
        return (loss + vel, vel, dl + dv, dv), None

    zero = jnp.zeros_like(b)
    l0 = jnp.asarray(l0, jnp.float32)
    init = (l0, jnp.float32(0.0), zero, zero)
    (_, _, dl, _), _ = jax.lax.scan(step, init, (curriculum, mult, w))
    return dl


def rollout64(
    A: Float[np.ndarray, "n_test n_train"],
    B: Float[np.ndarray, "n_test n_train"],
    curricula: Int[np.ndarray, "P T b"],
    initial_losses: Float[np.ndarray, "P n_test"],
    decay: float,
    w: Float[np.ndarray, "P T"] | None = None,
) -> Float[np.ndarray, "P n_test"]:
    """Final losses of a linear-momentum simulator, rolled out in float64 numpy (for scoring
    small predicted changes without float32 rounding noise, see `counterfactual`).

    Args:
        A: [n_test, n_train].
        B: [n_test, n_train].
        curricula: int [P, T, b].
        initial_losses: [P, n_test].
        decay: d.
        w: [P, T] relative learning rates (linear-lr-momentum); None: 1.

    Returns:
        float64 [P, n_test].
    """
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    loss = np.asarray(initial_losses, np.float64).copy()  # [P, n_test]
    vel = np.zeros_like(loss)
    for t in range(curricula.shape[1]):
        ids = curricula[:, t]  # [P, b]
        a_sum = A[:, ids].sum(-1).T - 1.0  # [P, n_test]: sum over b slots of (A_i - 1/b)
        b_sum = B[:, ids].sum(-1).T
        wt = 1.0 if w is None else np.asarray(w, np.float64)[:, t, None]  # [P, 1]
        vel = decay * vel + (1.0 - decay) * wt * (a_sum * loss + b_sum)
        loss = loss + vel
    return loss


# ----------------------------------------------------------------------------------------------
# Choosing the decay on validation runs
# ----------------------------------------------------------------------------------------------


def _best_decay(decays: Sequence[float], mses: Sequence[float]) -> int:
    """Index of the lowest finite MSE; ties (relative `_TIE_RTOL`) go to the smallest decay."""
    finite = [k for k in range(len(mses)) if math.isfinite(mses[k])]
    if not finite:
        raise ValueError(
            f"the validation MSE is non-finite at every decay searched {list(decays)}: the "
            "simulator diverges; check the runs' losses or pass --decay"
        )
    low = min(mses[k] for k in finite)
    ties = [k for k in finite if mses[k] <= low + _TIE_RTOL * abs(low)]
    return min(ties, key=lambda k: (decays[k], k))


def _check_grid(decays) -> list[float]:
    vals = [check_decay(d, "decay grid value") for d in decays]
    if not vals:
        raise ValueError("the decay grid is empty; pass at least one decay in [0, 1)")
    return vals


def select(
    fit_curricula: Sequence[Int[ArrayLike, "steps batch"]],
    fit_losses: Sequence[Float[ArrayLike, "steps+1 n_test"]],
    valid_curricula: Sequence[Int[ArrayLike, "steps batch"]],
    valid_losses: Sequence[Float[ArrayLike, "steps+1 n_test"]],
    *,
    n_train: int,
    variant: str = "linear-momentum",
    a_prior: float | None = None,
    grid=None,
    decays: Sequence[float] = DECAY_GRID,
    lrs=None,
    valid_lrs=None,
) -> tuple[float, float, float, list[dict]]:
    """Chooses the decay d and the lambdas of linear-momentum on validation runs.

    For every d in ``decays`` the lambdas are chosen by `simulators.select_lambdas` (same
    grid, search and tie rule as the other variants); the (d, l2_a, l2_b) with the lowest
    validation all-steps MSE wins, ties (relative 1e-4) going to the smaller d.

    Args:
        fit_curricula: fitting runs' curricula, as in `simulators.fit`.
        fit_losses: fitting runs' losses.
        valid_curricula: validation runs' curricula (never held-out runs).
        valid_losses: validation runs' losses.
        n_train: size of the training pool.
        variant: a momentum variant.
        a_prior: as in `simulators.fit`.
        grid: the lambda grid of `select_lambdas` (None: its default, extended at its edges).
        decays: the decays to search, each in [0, 1).
        lrs: the fitting runs' learning rates (linear-lr-momentum), as in `simulators.fit`.
        valid_lrs: the validation runs' learning rates (linear-lr-momentum).

    Returns:
        (decay, l2_a, l2_b, table): the choice and every evaluated point, one dict
        {"decay", "l2_a", "l2_b", "valid_mse", "round"} each.

    Raises:
        ValueError: a decay outside [0, 1), or as `select_lambdas`.
    """
    from simfluence import simulators

    decays = _check_grid(decays)
    table: list[dict] = []
    chosen: list[tuple[float, float, float]] = []
    mses: list[float] = []
    caught: list[list[warnings.WarningMessage]] = []
    for d in decays:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            la, lb, rows = simulators.select_lambdas(
                fit_curricula,
                fit_losses,
                valid_curricula,
                valid_losses,
                n_train=n_train,
                variant=variant,
                a_prior=a_prior,
                grid=grid,
                decay=d,
                **({} if lrs is None else {"lrs": lrs, "valid_lrs": valid_lrs}),
            )
        caught.append(got)
        table += [{"decay": d, **row} for row in rows]
        best = [r["valid_mse"] for r in rows if r["l2_a"] == la and r["l2_b"] == lb][0]
        chosen.append((d, la, lb))
        mses.append(float(best))
    k = _best_decay(decays, mses)
    # Re-issue the search's warnings: inexact fits at any decay (they bear on the choice), but
    # a lambda at a cap of the search only for the chosen decay (the others are not used).
    for j, got in enumerate(caught):
        for w in got:
            if j == k or issubclass(w.category, simulators.ConvergenceWarning):
                prefix = "" if j == k else f"(decay {decays[j]:g}) "
                warnings.warn(prefix + str(w.message), w.category, stacklevel=2)
    d, la, lb = chosen[k]
    return d, la, lb, table


def tracin_from_runs(
    fit_runs: Sequence[Run],
    valid_runs: Sequence[Run] = (),
    *,
    decay: float | None = None,
    decays: Sequence[float] = DECAY_GRID,
):
    """The tracin-cp-momentum simulator of the fitting runs, its decay chosen on validation runs.

    Args:
        fit_runs: the fitting runs (their tracin.npz averaged, the scale fitted on them).
        valid_runs: validation runs to choose d on (rolled out from their L_0 with their
            lr.npy where present; all-steps MSE). Empty: d is `DEFAULT_DECAY`.
        decay: a fixed d (then `valid_runs` are not used).
        decays: the decays searched.

    Returns:
        (sim, search): the `tracin.TracInSimulator` and a list of {"decay", "scale",
        "valid_mse"} per searched d (empty when d was not searched).

    Raises:
        RunLogError: no fitting run has tracin.npz (see `tracin.from_runs`).
        ValueError: a decay outside [0, 1).
    """
    from simfluence import tracin

    if decay is not None or not valid_runs:
        d = DEFAULT_DECAY if decay is None else check_decay(decay)
        return tracin.from_runs(fit_runs, variant=TRACIN_MOMENTUM, decay=d), []
    decays = _check_grid(decays)
    base = tracin.from_runs(fit_runs, variant="tracin-cp")
    search, sims = [], []
    for d in decays:
        sim = tracin.with_decay(base, fit_runs, d)
        se, n = 0.0, 0
        for r in valid_runs:
            pred = tracin.simulate_tracin(sim, r.curriculum, r.losses[0], r.lr)
            err = pred[1:].astype(np.float64) - r.losses[1:]
            se += float(np.mean(err * err))
            n += 1
        search.append({"decay": d, "scale": float(sim.scale), "valid_mse": se / n})
        sims.append(sim)
    k = _best_decay(decays, [row["valid_mse"] for row in search])
    return sims[k], search
