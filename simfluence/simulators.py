"""Simfluence simulators: fit per-example influence tables on logged runs and roll them out.

For one test example and a step that consumes the batch ``c_t`` (repeats counted), the
Simfluence-Linear simulator predicts

    L_t = alpha(c_t) * L_{t-1} + beta(c_t),  alpha(c_t) = sum_{i in c_t} A_i,
                                              beta(c_t)  = sum_{i in c_t} B_i,

with one row of ``A`` and ``B`` per test example (arrays ``[n_test, n_train]``). The ablations
fix one factor: additive (alpha == 1) and multiplicative (beta == 0). The schedule-aware
variants (``linear-lr``, ``additive-lr``, ``linear-lr-tracin-prior``, see `simfluence.scheduled`)
scale each step's change by the run's relative learning rate and are fitted by the same solver.

Fitting uses teacher forcing (the observed ``L_{t-1}`` on the right-hand side) over every step
of every fitting run and minimises, per test example,

    sum_t (L_t - alpha(c_t) L_{t-1} - beta(c_t))^2 + l2_a sum_i (A_i - a0)^2 + l2_b sum_i B_i^2,

a ridge regression whose design rows have only ``2 * batch`` non-zeros. It is solved for all
test examples at once by preconditioned conjugate gradients on the normal equations
(``_solvers``), with gathers and scatter-adds instead of dense matrices and an exact 2x2
block-Jacobi preconditioner per training example.

Shape annotations (jaxtyping) are documentation; nothing checks them at run time.

References:
    Guu et al., "Simfluence: Modeling the Influence of Individual Training Examples by
    Simulating Training Runs", 2023. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from simfluence import _solvers, momentum, scheduled
from simfluence.momentum import MOMENTUM_VARIANTS
from simfluence.runlog import atomic_savez, first_non_finite, release_pages
from simfluence.scheduled import PRIOR_VARIANTS, SCHEDULED_VARIANTS

# The schedule-free variants; SCHEDULED_VARIANTS (learning-rate aware) and MOMENTUM_VARIANTS
# (AdamW's first moment, `simfluence.momentum`) are fitted here too.
VARIANTS = ("linear", "additive", "multiplicative")
_ALL = tuple(dict.fromkeys(VARIANTS + SCHEDULED_VARIANTS + MOMENTUM_VARIANTS))

# Default ridge strengths; `select_lambdas` tunes them on validation runs.
DEFAULT_L2_A = 1e-2
DEFAULT_L2_B = 1e-2
# Default log grid for `select_lambdas` (both axes for linear, one axis for the ablations).
DEFAULT_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# Hard limits of the default grid's extension: while the best point lies on an edge of the
# searched grid, `select_lambdas` adds decades along that axis up to these values.
DEFAULT_GRID_CAPS = (1e-8, 1e6)
# Validation MSEs within this relative distance of the lowest one are ties (about what float32
# fits and rollouts resolve); `select_lambdas` breaks ties towards stronger regularisation.
_TIE_RTOL = 1e-4


class ConvergenceWarning(RuntimeWarning):
    """The fitter stopped before reaching its tolerance (the fit is usable but inexact)."""


@dataclasses.dataclass
class Simulator:
    """A fitted Simfluence simulator (one row of A and B per test example).

    Registered as a JAX pytree: ``A`` and ``B`` are leaves, the rest is static metadata, so a
    Simulator can be passed straight into ``jax.jit``-ed user code.

    Attributes:
        A: f32 [n_test, n_train], multiplicative influence A_i of training example i on each
            test example (for "additive" it holds 1/batch, and alpha is taken as exactly 1).
            For the schedule-aware variants A_i = 1/batch + a_i, the slope a_i per unit of
            w_t = eta_t / eta_max (1/batch, a = 0, for "additive-lr").
        B: f32 [n_test, n_train], additive influence B_i (zeros for "multiplicative"); b_i per
            unit of w_t for the schedule-aware variants.
        variant: one of ``VARIANTS`` or ``SCHEDULED_VARIANTS``.
        l2_a: ridge strength on A - a_prior.
        l2_b: ridge strength on B (on B - its prior for "linear-lr-tracin-prior").
        a_prior: the value A is shrunk towards (1/batch by default in `fit`).
        batch: the batch size of the fitting runs (None: unknown, e.g. an older file). A_i sit
            near 1/batch, so a curriculum of another batch size is refused, not simulated.
        lr_max: eta_max, the largest learning rate of the fitting runs (schedule-aware variants
            only; None for the others): a rollout's w_t is its rate over this.
        decay: the first-moment decay d in [0, 1) of the momentum variants (None for the
            others): each batch's change is spread over later steps with weights
            (1 - d) d^(t - s), see `simfluence.momentum`.
    """

    A: jax.Array | np.ndarray  # [n_test, n_train]
    B: jax.Array | np.ndarray  # [n_test, n_train]
    variant: str
    l2_a: float
    l2_b: float
    a_prior: float
    batch: int | None = None
    lr_max: float | None = None
    decay: float | None = None

    @property
    def n_test(self) -> int:
        """Number of tracked test examples (rows of A and B)."""
        return int(self.A.shape[0])

    @property
    def n_train(self) -> int:
        """Size of the training pool (columns of A and B)."""
        return int(self.A.shape[1])


jax.tree_util.register_dataclass(
    Simulator,
    data_fields=["A", "B"],
    meta_fields=["variant", "l2_a", "l2_b", "a_prior", "batch", "lr_max", "decay"],
)


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def _check_variant(variant: str) -> None:
    if variant not in _ALL:
        raise ValueError(f"unknown simulator variant {variant!r}; use one of {', '.join(_ALL)}")


def _check_lambda(name: str, value: float, *, positive: bool = False, hint: str = "") -> float:
    """``value`` as a finite float >= 0 (> 0 with ``positive``), else a one-line ValueError."""
    bound = "> 0" if positive else ">= 0"
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number; pass a float {bound}{hint}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}={value!r} must be finite and {bound}{hint}")
    return value


def _check_solver_args(tol, max_iter) -> tuple[float, int]:
    tol = _check_lambda("tol", tol, positive=True, hint=f" (default {_TOL})")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int | np.integer) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r} must be an int >= 1 (default {_MAX_ITER})")
    return tol, int(max_iter)


def _check_curriculum(cur, n_train: int, what: str) -> np.ndarray:
    arr = np.asarray(cur)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(
            f"{what}: curriculum has shape {arr.shape}; expected int [steps >= 1, batch >= 1]"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: curriculum dtype is {arr.dtype}; expected integer ids")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n_train:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{what}: curriculum id {bad} is outside 0..{n_train - 1} (n_train={n_train}); "
            "ids must be positions in the training pool"
        )
    return arr.astype(np.int32)


def _check_losses(loss, steps: int, n_test: int | None, what: str) -> np.ndarray:
    arr = np.asarray(loss)
    if (
        arr.ndim != 2
        or arr.shape[0] != steps + 1
        or (n_test is not None and arr.shape[1] != n_test)
    ):
        want = f"[{steps + 1}, {n_test if n_test is not None else 'n_test'}]"
        raise ValueError(
            f"{what}: losses have shape {arr.shape}; expected {want} "
            "(row 0 before the first step, row t after step t)"
        )
    arr = arr.astype(np.float32, copy=False)  # a float32 memory-mapped log stays mapped
    step, test = first_non_finite(arr)
    release_pages(arr)
    if step >= 0:
        raise ValueError(
            f"{what}: non-finite loss {arr[step, test]} at step {step}, test example {test}; "
            "drop or repair that run"
        )
    return arr


def _check_runs(curricula, losses, n_train: int, what: str):
    """Validates a set of runs; returns (curricula int32 list, losses f32 list, batch, n_test)."""
    if isinstance(n_train, bool) or not isinstance(n_train, int | np.integer) or n_train < 1:
        raise ValueError(f"n_train={n_train!r} must be a positive int")
    for name, arg, one in (("curricula", curricula, "curriculum"), ("losses", losses, "loss")):
        if getattr(arg, "ndim", None) == 2:
            raise ValueError(
                f"{what}: {name} is one 2-D array of shape {arg.shape}; pass a list with one "
                f"array per run (a single run: [{one}])"
            )
    curricula, losses = list(curricula), list(losses)
    if len(curricula) == 0:
        raise ValueError(f"{what}: no runs given; pass at least one (curriculum, losses) pair")
    if len(curricula) != len(losses):
        raise ValueError(
            f"{what}: {len(curricula)} curricula but {len(losses)} loss arrays; pass one per run"
        )
    curs, ls = [], []
    batch, n_test = None, None
    for r, (c, loss) in enumerate(zip(curricula, losses, strict=True)):
        c = _check_curriculum(c, n_train, f"{what} run {r}")
        if batch is None:
            batch = c.shape[1]
        elif c.shape[1] != batch:
            raise ValueError(
                f"{what} run {r}: batch size {c.shape[1]} differs from {batch} of run 0; "
                "all runs must share one batch size"
            )
        loss = _check_losses(loss, c.shape[0], n_test, f"{what} run {r}")
        n_test = loss.shape[1]
        curs.append(c)
        ls.append(loss)
    return curs, ls, int(batch), int(n_test)


def _resolve_prior(a_prior, batch: int) -> float:
    if a_prior is None:
        return 1.0 / batch
    try:
        value = float(a_prior)
    except (TypeError, ValueError):
        raise ValueError(f"a_prior={a_prior!r} is not a number; pass a float or None") from None
    if not math.isfinite(value):
        raise ValueError(f"a_prior={a_prior!r} must be finite (None means 1/batch)")
    return value


# ----------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------


def _features(variant: str) -> tuple[bool, bool]:
    """(uses L_{t-1} feature for A, uses constant feature for B)."""
    return {
        "linear": (True, True),
        "additive": (False, True),
        "multiplicative": (True, False),
        "linear-lr": (True, True),
        "additive-lr": (False, True),
        "linear-lr-tracin-prior": (True, True),
        "linear-momentum": (True, True),
        "linear-lr-momentum": (True, True),
    }[variant]


def _test_chunks(n_test: int, n_rows: int, budget_bytes: int = 1 << 26) -> list[tuple[int, int]]:
    """Splits the test axis so one f32 [rows, chunk] array stays under `budget_bytes`.

    Chunks are whole multiples of the solver's unit (`_solvers.block_width` test columns per
    device of the mesh) where the budget allows, so the solver pads nothing but the last chunk;
    every chunk has one padded width, so the solve compiles once. The loss logs are read
    (memory-mapped) once per chunk; the host and device copies of a chunk's rows are the fit's
    working memory.
    """
    unit = _solvers.block_width(n_rows) * _solvers.mesh().devices.size
    max_chunk = max(1, budget_bytes // (4 * max(n_rows, 1)))
    if max_chunk >= unit:
        max_chunk -= max_chunk % unit
    n_chunks = -(-n_test // max_chunk)
    size = -(-n_test // n_chunks)
    if n_chunks > 1 and size % unit and max_chunk >= unit:
        size = min(max_chunk, size + unit - size % unit)
    return [(j, min(j + size, n_test)) for j in range(0, n_test, size)]


_TOL, _MAX_ITER = _solvers.DEFAULT_TOL, _solvers.DEFAULT_MAX_ITER  # the CG solver's defaults


class _Problem:
    """Fitting runs flattened to rows, ready for the solver (host arrays)."""

    def __init__(
        self, curs, ls, n_train, variant, a_prior, batch, lrs=None, b_prior=None, decay=None
    ):
        self.n_train = n_train
        self.variant = variant
        self.batch = batch
        self.a_prior = a_prior
        self.ids = np.concatenate(curs, axis=0)  # [rows, batch]
        self.losses = ls
        self.n_rows = self.ids.shape[0]
        self.n_test = ls[0].shape[1]
        self.use_x, self.use_one = _features(variant)
        # Solve for deviations from the reference A = 1/batch, B = 0 (alpha = 1, the loss stays
        # put): the target becomes the loss change L_t - L_{t-1}, which keeps float32 round-off
        # at the scale of the deviations rather than of the losses. For the schedule-aware
        # variants the deviation is a itself (A = 1/batch + a) and every row is scaled by w_t.
        self.a_ref = 1.0 / batch
        self.lr_max, self.w = None, None
        if variant in SCHEDULED_VARIANTS:
            self.lr_max = scheduled.lr_max_of(lrs, variant)
            self.w = np.concatenate([lr / np.float32(self.lr_max) for lr in lrs])  # [rows]
        # Momentum variants: every row is scaled by 1 - d (times w_t for linear-lr-momentum) and
        # the target is D_t - d D_{t-1} (`momentum.targets`); d = 0 is exactly linear
        # (linear-lr).
        self.decay = decay
        if decay is not None:
            scale = np.float32(1.0 - decay)
            self.w = np.full(self.n_rows, scale) if self.w is None else scale * self.w  # [rows]
        self.b_prior = b_prior  # f32 [n_test, n_train] or None (B shrunk towards 0)
        self.chunks = _test_chunks(self.n_test, self.n_rows)
        self.chunk_size = max(j1 - j0 for j0, j1 in self.chunks)
        self.structure = _solvers.Structure.build(self.ids, n_train, self.w)

    def prior(self, j0: int, j1: int, l2_a: float, l2_b: float):
        """(lam [F], prior) for tests j0:j1: prior [F], or [chunk_size, F, n_train] (padded)
        when B has a per-coefficient prior."""
        lam, prior = _lams(self, l2_a, l2_b)
        if self.b_prior is None:
            return lam, prior
        full = np.zeros((self.chunk_size, len(prior), self.n_train), np.float32)
        full[:] = prior[None, :, None]
        full[: j1 - j0, -1] = self.b_prior[j0:j1]  # B is the last feature
        return lam, full

    def solve(
        self,
        x,
        y,
        l2_a,
        l2_b,
        *,
        tol=_TOL,
        max_iter=_MAX_ITER,
        start=None,
        report=None,
        span=None,
    ):
        """CG solve of one test chunk's rows (`rows`) at (l2_a, l2_b).

        A test example has converged when its float64 relative residual is at most `tol`, or at
        most its float32 rounding floor (see `_solvers.solve`: float32 coefficients cannot
        resolve a smaller residual, so further rounds cannot reach `tol` there).

        Args:
            x: f32 [rows, chunk_size] teacher-forced L_{t-1}.
            y: f32 [rows, chunk_size] targets L_t - L_{t-1}.
            l2_a: ridge strength on A - a0.
            l2_b: ridge strength on B.
            tol: float64 relative residual to reach, per test example.
            max_iter: iteration cap of each CG round.
            start: optional warm start f32 [chunk_size, F, n_train].
            report: None to warn (`ConvergenceWarning`) when a test example has not converged;
                a list to append `(worst relative residual, its floor)` to instead (the lambda
                search sums these up in one warning).
            span: (j0, j1), the chunk's tests (needed for a per-coefficient B prior).

        Returns:
            theta [chunk_size, F, n_train] (deviation from the reference), a device array.
        """
        j0, j1 = (0, self.n_test) if span is None else span
        lam, prior = self.prior(j0, j1, l2_a, l2_b)
        theta, info = _solvers.solve(
            self.structure, x, y, lam, prior, self.use_x, self.use_one, tol, max_iter, start
        )
        rel, floor = info["rel_residual"], info["floor"]
        # Per column: `tol`, or tighter where an underdetermined fit needs it to bound the
        # coefficient error (`_solvers.COEF_TOL`).
        col_tol = info.get("tol", tol)
        bad = ~(rel <= np.maximum(col_tol, floor))  # NaN counts as not converged
        if bad.any():
            k = int(np.argmax(np.where(bad, np.nan_to_num(rel, nan=np.inf), -1.0)))
            worst, at = float(rel[k]), float(floor[k])
            tol = float(np.broadcast_to(col_tol, rel.shape)[k])
            if report is not None:
                report.append((worst, at))
            else:
                warnings.warn(
                    f"{self.variant} fit at l2_a={l2_a:g}, l2_b={l2_b:g} stopped at relative "
                    f"residual {worst:.2e} > tol={tol:g} (float32 floor there {at:.2e}) after "
                    f"{info['rounds']} rounds of at most {max_iter} CG iterations; raise "
                    "max_iter or the lambdas",
                    ConvergenceWarning,
                    stacklevel=3,
                )
        return theta

    def rows(self, j0: int, j1: int) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced x = L_{t-1} (times w_t when scheduled) and target L_t - L_{t-1} for
        tests j0:j1, padded."""
        width = self.chunk_size
        x = np.zeros((self.n_rows, width), np.float32)  # [rows, chunk]
        y = np.zeros((self.n_rows, width), np.float32)  # [rows, chunk]
        r = 0
        for loss in self.losses:
            t = loss.shape[0] - 1
            prev = loss[:-1, j0:j1]
            x[r : r + t, : j1 - j0] = prev
            if self.decay is None:
                y[r : r + t, : j1 - j0] = loss[1:, j0:j1] - prev
            else:
                y[r : r + t, : j1 - j0] = momentum.targets(loss[:, j0:j1], self.decay)
            release_pages(loss)  # a memory-mapped log: read a run at a time
            r += t
        if self.w is not None:
            x *= self.w[:, None]
        return x, y

    def to_simulator(self, theta: np.ndarray, l2_a: float, l2_b: float) -> Simulator:
        """theta: f32 [n_test, F, n_train] deviations -> Simulator."""
        f = 0
        if self.use_x:
            A = np.float32(self.a_ref) + theta[:, f]
            f += 1
        else:
            A = np.full((self.n_test, self.n_train), 1.0 / self.batch, np.float32)
        if self.use_one:
            B = theta[:, f]
        else:
            B = np.zeros((self.n_test, self.n_train), np.float32)
        return Simulator(
            A=jnp.asarray(A, jnp.float32),
            B=jnp.asarray(B, jnp.float32),
            variant=self.variant,
            l2_a=float(l2_a),
            l2_b=float(l2_b),
            a_prior=float(self.a_prior),
            batch=int(self.batch),
            lr_max=self.lr_max,
            decay=self.decay,
        )


def _prepare(
    curricula,
    losses,
    n_train,
    variant,
    a_prior,
    what="fitting",
    *,
    lrs=None,
    b_prior=None,
    decay=None,
) -> _Problem:
    _check_variant(variant)
    curs, ls, batch, n_test = _check_runs(curricula, losses, n_train, what)
    _check_memory(int(n_train), n_test, curs, what)
    a0 = _resolve_prior(a_prior, batch)
    if variant in SCHEDULED_VARIANTS:
        lrs = scheduled.check_lrs(lrs, [c.shape[0] for c in curs], variant, what)
    if variant in PRIOR_VARIANTS:
        b_prior = _check_b_prior(b_prior, n_test, int(n_train), variant)
    elif b_prior is not None:
        raise ValueError(
            f"b_prior is only used by {', '.join(PRIOR_VARIANTS)}; leave it out for {variant}"
        )
    if variant in MOMENTUM_VARIANTS:
        if decay is None:
            raise ValueError(
                f"{variant} spreads each batch's change over later steps: pass decay=d in "
                f"[0, 1) (momentum.select chooses it on validation runs; AdamW's beta_1 is "
                f"{momentum.DEFAULT_DECAY})"
            )
        decay = momentum.check_decay(decay)
    elif decay is not None:
        raise ValueError(
            f"decay is only used by {', '.join(MOMENTUM_VARIANTS)}; leave it out for {variant}"
        )
    return _Problem(curs, ls, int(n_train), variant, a0, batch, lrs, b_prior, decay)


def _physical_memory() -> int | None:
    """Bytes of physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_memory(n_train: int, n_test: int, curs: list[np.ndarray], what: str) -> None:
    """Refuses a pool too large to fit before allocating (a wrong n_train in experiment.json
    otherwise ends in a MemoryError or a swapping machine)."""
    # A and B [n_test, n_train] f32 plus the solver's copies of the same size: 4 x 4 bytes.
    need, have = 16 * n_test * n_train, _physical_memory()
    if have is None or need <= have:
        return
    top = max((int(c.max()) for c in curs if c.size), default=-1)
    raise ValueError(
        f"{what}: n_train={n_train} with n_test={n_test} needs about {need / 2**30:.1f} GiB to "
        f"fit, more than this machine's {have / 2**30:.1f} GiB, and the curricula use training "
        f"ids up to {top} only; check n_train (experiment.json of the experiment)"
    )


def _check_b_prior(b_prior, n_test: int, n_train: int, variant: str) -> np.ndarray:
    if b_prior is None:
        raise ValueError(
            f"{variant} shrinks B towards a prior: pass b_prior=f32 [n_test, n_train] "
            "(scheduled.tracin_prior of the fitting runs)"
        )
    arr = np.asarray(b_prior, np.float32)
    if arr.shape != (n_test, n_train):
        raise ValueError(f"b_prior has shape {arr.shape}; expected [{n_test}, {n_train}]")
    if not np.isfinite(arr).all():
        raise ValueError("b_prior contains NaN or inf; rebuild it from finite TracIn-CP dots")
    return arr


def _lams(problem: _Problem, l2_a: float, l2_b: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge strengths [F] and the deviations [F] they shrink towards (a0 - 1/batch for A)."""
    lam, prior = [], []
    if problem.use_x:
        lam.append(l2_a)
        prior.append(problem.a_prior - problem.a_ref)
    if problem.use_one:
        lam.append(l2_b)
        prior.append(0.0)
    return np.asarray(lam, np.float32), np.asarray(prior, np.float32)


def fit(
    curricula: Sequence[Int[ArrayLike, "steps batch"]],
    losses: Sequence[Float[ArrayLike, "steps+1 n_test"]],
    *,
    n_train: int,
    variant: str = "linear",
    l2_a: float = DEFAULT_L2_A,
    l2_b: float = DEFAULT_L2_B,
    a_prior: float | None = None,
    tol: float = _TOL,
    max_iter: int = _MAX_ITER,
    lrs: Sequence[Float[ArrayLike, " steps"]] | None = None,
    b_prior: Float[ArrayLike, "n_test n_train"] | None = None,
    decay: float | None = None,
) -> Simulator:
    """Fits one simulator per test example on teacher-forced fitting runs.

    Minimises exactly, for every test example (all at once),

        sum_runs sum_t (L_t - alpha L_{t-1} - beta)^2
            + l2_a sum_i (A_i - a0)^2 + l2_b sum_i B_i^2

    with conjugate gradients in float32 (2x2 block-Jacobi preconditioned) and float64 residuals
    (mixed-precision iterative refinement) to a relative residual of `tol`. Additive fixes
    alpha == 1 (only B and l2_b matter); multiplicative fixes beta == 0 (only A and l2_a).

    The schedule-aware variants (`simfluence.scheduled`) minimise instead, with
    w_t = eta_t / eta_max (eta_max the largest of `lrs`) and a_i = A_i - 1/batch,

        sum_runs sum_t (L_t - L_{t-1} - w_t sum_{i in c_t} (a_i L_{t-1} + b_i))^2
            + l2_a sum_i (a_i - (a0 - 1/batch))^2 + l2_b sum_i (b_i - prior_i)^2

    (additive-lr: a = 0; prior = 0 except for linear-lr-tracin-prior, where it is `b_prior`).
    With w_t = 1 this is exactly the linear fit.

    Args:
        curricula: one int array [T_r, batch] per run, training-pool ids in 0..n_train-1
            (repeats allowed). Runs may differ in length but share one batch size.
        losses: one f32 array [T_r + 1, n_test] per run; row 0 before the first step.
        n_train: size of the training pool.
        variant: "linear", "additive" or "multiplicative".
        l2_a: ridge strength on A - a0 (ignored by "additive").
        l2_b: ridge strength on B (ignored by "multiplicative").
        a_prior: a0, the value A is shrunk towards; None means 1/batch (an example then leaves
            the loss unchanged), 0 gives plain ridge.
        tol: float64 relative residual ||G theta - rhs|| / ||rhs|| of the normal equations at
            which the solver stops, per test example (> 0). A test example whose residual is
            above `tol` but within the float32 rounding floor of its solution (the residual
            that rounding the exact solution to float32 can cause, see `_solvers.solve`) is
            as exact as float32 A and B can be and counts as converged.
        max_iter: iteration cap of each CG round (>= 1).
        lrs: one float [T_r] per run, the learning rate of every step (the runs' lr.npy);
            required by the schedule-aware variants, ignored by the others.
        b_prior: f32 [n_test, n_train], the value B is shrunk towards; required by
            linear-lr-tracin-prior (`scheduled.tracin_prior`), refused by the others.
        decay: the first-moment decay d in [0, 1); required by linear-momentum (which fits
            (1 - d) sum (a_i L_{t-1} + b_i) to D_t - d D_{t-1}, see `simfluence.momentum`),
            refused by the others.

    Returns:
        A `Simulator` with A, B f32 [n_test, n_train] (and `lr_max` for the schedule-aware
        variants, `decay` for the momentum ones).

    Raises:
        ValueError: unknown variant, ids out of range, mismatched shapes or batch sizes,
            non-finite losses, negative lambdas, tol <= 0 or max_iter < 1; missing, malformed
            or negative learning rates for a schedule-aware variant; a missing or malformed
            b_prior.

    Warns:
        ConvergenceWarning: a test example's residual is still above `tol` and above its
            float32 floor when the solver stops (its refinement rounds or `max_iter` ran out).

    References:
        Guu et al. 2023, Simfluence, section 3. https://arxiv.org/abs/2303.08114
    """
    l2_a = _check_lambda("l2_a", l2_a)
    l2_b = _check_lambda("l2_b", l2_b)
    tol, max_iter = _check_solver_args(tol, max_iter)
    problem = _prepare(
        curricula, losses, n_train, variant, a_prior, lrs=lrs, b_prior=b_prior, decay=decay
    )
    theta = _solve_all(problem, l2_a, l2_b, tol=tol, max_iter=max_iter)
    return problem.to_simulator(theta, l2_a, l2_b)


def _solve_all(
    problem: _Problem, l2_a, l2_b, *, tol=_TOL, max_iter=_MAX_ITER, x0=None
) -> np.ndarray:
    """Solves every test chunk; returns theta f32 [n_test, F, n_train] (deviation from prior)."""
    n_f = int(problem.use_x) + int(problem.use_one)  # features: A (x) and B (one)
    out = np.zeros((problem.n_test, n_f, problem.n_train), np.float32)
    for j0, j1 in problem.chunks:
        x, y = problem.rows(j0, j1)
        start = None if x0 is None else _pad_theta(x0[j0:j1], problem.chunk_size)
        theta = problem.solve(
            x, y, l2_a, l2_b, tol=tol, max_iter=max_iter, start=start, span=(j0, j1)
        )
        out[j0:j1] = np.asarray(theta)[: j1 - j0]
    return out


def _pad_theta(theta: np.ndarray, width: int) -> np.ndarray:
    pad = width - theta.shape[0]
    if pad:
        theta = np.concatenate([theta, np.zeros((pad,) + theta.shape[1:], theta.dtype)])
    return theta


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("additive",))
def _rollout_runs(A, B, curricula, initial_losses, additive: bool):
    # A, B: [n_test, n_train]; curricula: [R, T, b]; initial_losses: [R, n_test]
    A, B = A.astype(jnp.float32), B.astype(jnp.float32)  # float64 under x64: compute in f32
    n_test = A.shape[0]
    # One row per training example holding its A and B for every test example; gathering
    # b rows per step inside the scan keeps the table in cache (no [T, b, n_test] temporaries).
    table = B.T if additive else jnp.concatenate([A.T, B.T], axis=1)  # [n_train, (2) n_test]

    def step(loss, ids):  # loss: [R, n_test]; ids: [R, b]
        g = table.at[ids].get(mode="promise_in_bounds").sum(axis=1)  # [R, (2) n_test]
        loss = loss + g if additive else g[:, :n_test] * loss + g[:, n_test:]
        return loss, loss

    l0 = initial_losses.astype(jnp.float32)
    _, traj = jax.lax.scan(step, l0, jnp.swapaxes(curricula, 0, 1))  # [T, R, n_test]
    return jnp.swapaxes(jnp.concatenate([l0[None], traj], axis=0), 0, 1)  # [R, T + 1, n_test]


def _rollout(A, B, curriculum, initial_losses, additive: bool):
    """One run: curriculum [T, b], initial_losses [n_test] -> [T + 1, n_test]."""
    return _rollout_runs(A, B, curriculum[None], initial_losses[None], additive)[0]


def _check_sim(sim: Simulator) -> None:
    if not isinstance(sim, Simulator):
        raise ValueError(f"expected a Simulator, got {type(sim).__name__}; build one with fit()")
    _check_variant(sim.variant)
    a, b = jnp.shape(sim.A), jnp.shape(sim.B)
    if len(a) != 2 or a != b or 0 in a:
        raise ValueError(
            f"Simulator A has shape {a} and B {b}; both must be [n_test, n_train] with the "
            "same non-zero sizes"
        )
    if sim.batch is not None and (isinstance(sim.batch, bool) or not int(sim.batch) >= 1):
        raise ValueError(f"Simulator batch={sim.batch!r} must be an int >= 1 or None")
    if sim.variant in SCHEDULED_VARIANTS:
        lr_max = sim.lr_max
        if lr_max is None or not (math.isfinite(float(lr_max)) and float(lr_max) > 0):
            raise ValueError(
                f"{sim.variant} Simulator has lr_max={lr_max!r}; it must be the fitting runs' "
                "largest learning rate (> 0): refit it with fit()"
            )
    if sim.variant in MOMENTUM_VARIANTS:
        momentum.check_decay(sim.decay, f"{sim.variant} Simulator decay")


def _rates(sim: Simulator, lr, curriculum, batched: bool):
    """w = lr / sim.lr_max, f32 [R, T] (or [T]), for a schedule-aware simulator."""
    want = "[runs, steps]" if batched else "[steps]"
    if lr is None:
        raise ValueError(
            f"the {sim.variant} simulator scales every step by its learning rate: pass lr, "
            f"float {want} (the curriculum's learning rates, a run's lr.npy)"
        )
    if not hasattr(lr, "ndim"):
        lr = np.asarray(lr, np.float32)
    if tuple(lr.shape) != tuple(curriculum.shape[:-1]):
        raise ValueError(
            f"lr has shape {tuple(lr.shape)}; expected {want} = {tuple(curriculum.shape[:-1])}, "
            "one learning rate per step of the curriculum"
        )
    c = _concrete(lr)
    if c is not None and not (np.isfinite(c) & (c >= 0)).all():
        raise ValueError("lr contains a negative, NaN or inf learning rate; pass the rates used")
    return scheduled.relative_rates(lr, sim.lr_max)


def simulate(
    sim: Simulator,
    curriculum: Int[ArrayLike, "steps batch"],
    initial_losses: Float[ArrayLike, " n_test"],
    lr: Float[ArrayLike, " steps"] | None = None,
) -> Float[Array, "steps+1 n_test"]:
    """Rolls the simulator out along a curriculum from observed initial losses.

    Predictions are fed back (no teacher forcing), all test examples at once, with `lax.scan`.
    Usable inside `jax.jit` (the Simulator is a pytree); ids and learning rates are only
    range-checked for concrete (non-traced) inputs.

    Args:
        sim: a fitted `Simulator` (A, B [n_test, n_train]).
        curriculum: int [T, batch], training-pool ids.
        initial_losses: f32 [n_test], the observed L_0.
        lr: float [T], the learning rate of every step; required by the schedule-aware
            variants (each step is scaled by lr / sim.lr_max), ignored by the others.

    Returns:
        f32 [T + 1, n_test]; row 0 is `initial_losses`.

    Raises:
        ValueError: bad shapes, ids out of range, non-finite initial losses, or a missing,
            malformed or negative `lr` for a schedule-aware variant.

    References:
        Guu et al. 2023, Simfluence. https://arxiv.org/abs/2303.08114
    """
    _check_sim(sim)
    curriculum, initial_losses = _check_sim_inputs(sim, curriculum, initial_losses, batched=False)
    if sim.variant in MOMENTUM_VARIANTS:
        w = _rates(sim, lr, curriculum, batched=False) if sim.lr_max is not None else None
        return momentum.rollout_runs(
            sim.A,
            sim.B,
            curriculum[None],
            initial_losses[None],
            sim.decay,
            None if w is None else w[None],
        )[0]
    if sim.variant in SCHEDULED_VARIANTS:
        w = _rates(sim, lr, curriculum, batched=False)
        return scheduled.rollout_runs(
            sim.A, sim.B, curriculum[None], initial_losses[None], w[None], _additive(sim)
        )[0]
    return _rollout(sim.A, sim.B, curriculum, initial_losses, sim.variant == "additive")


def simulate_many(
    sim: Simulator,
    curricula: Int[ArrayLike, "runs steps batch"],
    initial_losses: Float[ArrayLike, "runs n_test"],
    lr: Float[ArrayLike, "runs steps"] | None = None,
) -> Float[Array, "runs steps+1 n_test"]:
    """`simulate` vmapped over runs that share a length.

    Args:
        sim: a fitted `Simulator`.
        curricula: int [R, T, batch].
        initial_losses: f32 [R, n_test].
        lr: float [R, T] learning rates, as in `simulate` (schedule-aware variants only).

    Returns:
        f32 [R, T + 1, n_test].

    Raises:
        ValueError: bad shapes, ids out of range, non-finite initial losses, or a bad `lr`.
    """
    _check_sim(sim)
    curricula, initial_losses = _check_sim_inputs(sim, curricula, initial_losses, batched=True)
    if sim.variant in MOMENTUM_VARIANTS:
        w = _rates(sim, lr, curricula, batched=True) if sim.lr_max is not None else None
        return momentum.rollout_runs(sim.A, sim.B, curricula, initial_losses, sim.decay, w)
    if sim.variant in SCHEDULED_VARIANTS:
        w = _rates(sim, lr, curricula, batched=True)
        return scheduled.rollout_runs(sim.A, sim.B, curricula, initial_losses, w, _additive(sim))
    return _rollout_runs(sim.A, sim.B, curricula, initial_losses, sim.variant == "additive")


def _additive(sim_or_variant) -> bool:
    """Whether the variant fixes a = 0 / alpha = 1 (additive, additive-lr)."""
    variant = getattr(sim_or_variant, "variant", sim_or_variant)
    return variant in ("additive", "additive-lr")


def _concrete(x) -> np.ndarray | None:
    """`x` as numpy, or None while tracing (inside the caller's jit)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def batch_mismatch(sim: Simulator, batch: int) -> str | None:
    """Why a curriculum of `batch` examples per step cannot be simulated, or None if it can.

    A_i sit near 1/batch of the fitting runs, so another batch size would scale alpha and is
    refused by `simulate`, `simulate_many` and `removal_influence`.

    Args:
        sim: a `Simulator` (its `batch` is None for older files: then any batch passes).
        batch: the curriculum's examples per step.

    Returns:
        None when `batch` matches the simulator's, else a one-line reason naming both sizes
        and the fix.
    """
    if sim.batch is None or int(batch) == int(sim.batch):
        return None
    return (
        f"curriculum has batch {batch} but the simulator was fitted on batch {sim.batch} "
        f"(its A_i sit near 1/{sim.batch}); simulate curricula of batch {sim.batch} or refit"
    )


def _check_sim_inputs(sim, curriculum, initial_losses, batched: bool):
    nd = 3 if batched else 2
    want_c = "[runs, steps, batch]" if batched else "[steps, batch]"
    want_l = f"[runs, {sim.n_test}]" if batched else f"[{sim.n_test}]"
    if not hasattr(curriculum, "ndim"):
        curriculum = np.asarray(curriculum)
    if curriculum.ndim != nd or 0 in curriculum.shape:
        raise ValueError(
            f"curriculum has shape {tuple(curriculum.shape)}; expected int {want_c}, sizes >= 1"
        )
    if not jnp.issubdtype(curriculum.dtype, jnp.integer):
        raise ValueError(f"curriculum dtype is {curriculum.dtype}; expected integer ids")
    if msg := batch_mismatch(sim, curriculum.shape[-1]):
        raise ValueError(msg)
    if not hasattr(initial_losses, "ndim"):
        initial_losses = np.asarray(initial_losses, np.float32)
    shape_ok = initial_losses.ndim == nd - 1 and initial_losses.shape[-1] == sim.n_test
    if batched and shape_ok:
        shape_ok = initial_losses.shape[0] == curriculum.shape[0]
    if not shape_ok:
        raise ValueError(
            f"initial_losses have shape {tuple(initial_losses.shape)}; expected {want_l} "
            f"(the simulator has n_test={sim.n_test})"
        )
    c = _concrete(curriculum)
    if c is not None:
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= sim.n_train:
            raise ValueError(
                f"curriculum id {lo if lo < 0 else hi} is outside 0..{sim.n_train - 1} "
                f"(the simulator has n_train={sim.n_train})"
            )
    l0 = _concrete(initial_losses)
    if l0 is not None:
        if not np.isfinite(l0).all():
            raise ValueError("initial_losses contain NaN or inf; pass the observed finite L_0")
    return jnp.asarray(curriculum, jnp.int32), jnp.asarray(initial_losses, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Lambda selection
# ----------------------------------------------------------------------------------------------


def _grid_points(variant: str, grid) -> list[tuple[float, float]]:
    values = DEFAULT_GRID if grid is None else grid
    arr = np.asarray(values, dtype=np.float64)
    use_a, use_b = _features(variant)
    if arr.ndim == 2 and arr.shape[1] == 2:
        pts = [(float(a), float(b)) for a, b in arr]
    elif arr.ndim == 1 and arr.size >= 1:
        vals = [float(v) for v in arr]
        if use_a and use_b:
            pts = [(a, b) for a in vals for b in vals]
        elif use_b:
            pts = [(0.0, b) for b in vals]
        else:
            pts = [(a, 0.0) for a in vals]
    else:
        raise ValueError(
            f"grid has shape {arr.shape}; pass a 1-D list of lambdas or an [G, 2] list of "
            "(l2_a, l2_b) pairs"
        )
    for a, b in pts:
        _check_lambda("grid l2_a", a)
        _check_lambda("grid l2_b", b)
    return pts


def _log_gap(p: tuple[float, float], q: tuple[float, float]) -> float:
    """Distance of two lambda points in decades (0, an unused axis, counts as 1e-30)."""
    return sum(
        abs(math.log10(max(u, 1e-30)) - math.log10(max(v, 1e-30)))
        for u, v in zip(p, q, strict=True)
    )


def _nan_high(x: float) -> float:
    """Sort key that ranks a NaN residual (a failed solve) above every number."""
    return float("inf") if np.isnan(x) else float(x)


class _ValidationScore:
    """Validation all-steps MSE of the fits at given lambda points.

    Each test chunk's CG solve is warm-started from the previous solve of that chunk, across
    calls too, so the extension rounds of the default search start near a solved point.
    Validation runs of equal length are rolled out together (one batched scan per length).
    Fits that stop above their tolerance are collected in `unconverged` rather than warned
    about one by one; `select_lambdas` sums them up in one warning.
    """

    def __init__(self, problem: _Problem, vcurs, vls, vlrs=None):
        self.problem = problem
        n_runs = len(vcurs)
        by_len: dict[int, list[int]] = {}
        for k, c in enumerate(vcurs):
            by_len.setdefault(c.shape[0], []).append(k)
        # One group per run length: curricula [R, T, b], L_0 [R, n_test], targets [R, T, n_test]
        # (float64), run weights [R] and, for the schedule-aware variants, w [R, T]. The score
        # is a mean over runs of per-run means, so each run's SSE is weighted by
        # 1 / (runs * T * n_test).
        self.groups = [
            (
                jnp.asarray(np.stack([vcurs[k] for k in ks])),
                np.stack([vls[k][0] for k in ks]),
                np.stack([vls[k][1:] for k in ks]).astype(np.float64),
                np.full(len(ks), 1.0 / (n_runs * t * problem.n_test)),
                None
                if problem.lr_max is None
                else scheduled.relative_rates(np.stack([vlrs[k] for k in ks]), problem.lr_max),
            )
            for t, ks in by_len.items()
        ]
        self.last: dict[int, tuple[tuple[float, float], jax.Array]] = {}  # chunk -> point, theta
        self.unconverged: dict[tuple[float, float], tuple[float, float]] = {}  # point -> worst

    def __call__(self, pts: Sequence[tuple[float, float]]) -> np.ndarray:
        """pts: (l2_a, l2_b) pairs -> f64 [len(pts)] validation MSEs."""
        problem = self.problem
        mse = np.zeros(len(pts), np.float64)
        additive = _additive(problem.variant)
        # Warm starts work best when consecutive points are close: visit in sorted order,
        # starting from the end nearer to the chunk's last solved point.
        order = sorted(range(len(pts)), key=lambda g: pts[g])
        for c, (j0, j1) in enumerate(problem.chunks):
            x, y = problem.rows(j0, j1)
            sub = _sub_problem(problem, j0, j1)
            groups = [
                (cur, jnp.asarray(l0[:, j0:j1]), true[:, :, j0:j1], weight, w)
                for cur, l0, true, weight, w in self.groups
            ]
            seq, start = order, None
            if c in self.last:
                point, start = self.last[c]
                if _log_gap(point, pts[order[-1]]) < _log_gap(point, pts[order[0]]):
                    seq = order[::-1]
            for g in seq:
                report: list[tuple[float, float]] = []
                theta = problem.solve(x, y, *pts[g], start=start, report=report, span=(j0, j1))
                if report:
                    prev = self.unconverged.get(pts[g])
                    rows = [*report] if prev is None else [prev, *report]
                    self.unconverged[pts[g]] = max(rows, key=lambda r: _nan_high(r[0]))
                start = theta
                sim = sub.to_simulator(np.asarray(theta)[: j1 - j0], *pts[g])
                for cur, l0, true, weight, w in groups:
                    if problem.decay is not None:
                        pred = momentum.rollout_runs(sim.A, sim.B, cur, l0, problem.decay, w)
                    elif w is None:
                        pred = _rollout_runs(sim.A, sim.B, cur, l0, additive)  # [R, T + 1, chunk]
                    else:
                        pred = scheduled.rollout_runs(sim.A, sim.B, cur, l0, w, additive)
                    err = np.asarray(pred[:, 1:], np.float64) - true  # [R, T, chunk]
                    mse[g] += float(weight @ np.sum(err * err, axis=(1, 2)))
            self.last[c] = (pts[seq[-1]], start)
        return mse


def _best(pts: Sequence[tuple[float, float]], mses: Sequence[float]) -> int:
    """Index of the chosen point: the strongest regularisation among the ties of the lowest MSE.

    MSEs within a relative `_TIE_RTOL` of the lowest finite one are ties; among them the point
    with the largest log10(l2_a) + log10(l2_b) wins (then the larger l2_a, then l2_b, then the
    first in `pts`). A diverged fit (non-finite MSE) never wins.

    Raises:
        ValueError: every MSE is non-finite (no lambda gives a usable fit).
    """
    finite = [g for g in range(len(mses)) if math.isfinite(mses[g])]
    if not finite:
        raise ValueError(
            f"the validation MSE is non-finite at all {len(mses)} lambda points searched: the "
            "fits diverge; check the runs' losses for inf/nan or pass lambdas explicitly"
        )
    low = min(mses[g] for g in finite)
    ties = [g for g in finite if mses[g] <= low + _TIE_RTOL * abs(low)]
    return max(ties, key=lambda g: (_log_strength(pts[g]), pts[g], -g))


def _log_strength(p: tuple[float, float]) -> float:
    """log10(l2_a) + log10(l2_b), with 0 (an unused axis) counted as 1e-30."""
    return sum(math.log10(max(v, 1e-30)) for v in p)


def _next_decade(value: float, up: bool) -> float:
    """`value` times (up) or divided by 10, within DEFAULT_GRID_CAPS, as a short decimal."""
    lo, hi = DEFAULT_GRID_CAPS
    nxt = float(f"{value * 10.0 if up else value / 10.0:.12g}")
    return min(nxt, hi) if up else max(nxt, lo)


def _extended_search(score, use_a: bool, use_b: bool):
    """Default-grid search that grows an axis by decades while the best point is on its edge.

    Starts from the product of ``DEFAULT_GRID`` over the used axes. While the best point (see
    `_best`) has the largest (smallest) value searched on a used axis, and that value is below
    (above) its cap in ``DEFAULT_GRID_CAPS``, that axis gets one more decade and the new points
    of the product grid are scored. The grid stays a product grid, so the final choice is the
    exhaustive choice over the extended grid, and it is interior or at a cap on every axis.

    Args:
        score: callable mapping a list of (l2_a, l2_b) points to their validation MSEs; it
            is called once per round, with only the points not scored before.
        use_a: whether the variant uses l2_a (else that axis holds 0).
        use_b: whether the variant uses l2_b (else that axis holds 0).

    Returns:
        (points, mses, rounds): every evaluated point in grid order (l2_a, then l2_b,
        ascending), its MSE, and the round that scored it (0 = the default grid, k = k-th
        extension).
    """
    lo, hi = DEFAULT_GRID_CAPS
    axes = [sorted(float(v) for v in DEFAULT_GRID) if use else [0.0] for use in (use_a, use_b)]
    found: dict[tuple[float, float], tuple[float, int]] = {}
    new = [(a, b) for a in axes[0] for b in axes[1]]
    rnd = 0
    while new:
        for p, m in zip(new, score(new), strict=True):
            found[p] = (float(m), rnd)
        pts = sorted(found)
        best = pts[_best(pts, [found[p][0] for p in pts])]
        for k, use in enumerate((use_a, use_b)):
            vals = axes[k]
            if not use:
                continue
            if best[k] == vals[-1] and vals[-1] < hi * (1 - 1e-9):
                vals.append(_next_decade(vals[-1], up=True))
            elif best[k] == vals[0] and vals[0] > lo * (1 + 1e-9):
                vals.insert(0, _next_decade(vals[0], up=False))
        rnd += 1
        new = [(a, b) for a in axes[0] for b in axes[1] if (a, b) not in found]
    pts = sorted(found)
    return pts, [found[p][0] for p in pts], [found[p][1] for p in pts]


def lambda_edges(table: Sequence[dict], variant: str, l2_a: float, l2_b: float) -> dict:
    """Used lambda axes whose chosen value is the largest or smallest one searched.

    Args:
        table: the search table of `select_lambdas` (rows with "l2_a", "l2_b").
        variant: the simulator variant (an ablation's unused axis is never an edge).
        l2_a: the chosen l2_a.
        l2_b: the chosen l2_b.

    Returns:
        {"l2_a": "upper" | "lower", "l2_b": ...} for the axes at an edge (axes searched at a
        single value are never at an edge); empty when the choice is interior.
    """
    use_a, use_b = _features(variant)
    out = {}
    for name, use, value in (("l2_a", use_a, l2_a), ("l2_b", use_b, l2_b)):
        vals = {float(row[name]) for row in table}
        if not use or len(vals) < 2:
            continue
        if value == max(vals):
            out[name] = "upper"
        elif value == min(vals):
            out[name] = "lower"
    return out


def select_lambdas(
    fit_curricula: Sequence[Int[ArrayLike, "steps batch"]],
    fit_losses: Sequence[Float[ArrayLike, "steps+1 n_test"]],
    valid_curricula: Sequence[Int[ArrayLike, "steps batch"]],
    valid_losses: Sequence[Float[ArrayLike, "steps+1 n_test"]],
    *,
    n_train: int,
    variant: str,
    a_prior: float | None = None,
    grid=None,
    lrs: Sequence[Float[ArrayLike, " steps"]] | None = None,
    valid_lrs: Sequence[Float[ArrayLike, " steps"]] | None = None,
    b_prior: Float[ArrayLike, "n_test n_train"] | None = None,
    decay: float | None = None,
) -> tuple[float, float, list[dict]]:
    """Chooses (l2_a, l2_b) on a log grid by all-steps MSE of rollouts on validation runs.

    For each grid point the simulator is fitted on the fitting runs (CG warm-started from the
    previously fitted point) and rolled out from each validation run's observed L_0; the score
    is the mean over validation runs of the mean squared error over steps 1..T and test
    examples.

    With the default grid the search does not stop at the grid's edge: while the best point
    has the largest (smallest) value searched on a lambda axis the variant uses, that axis is
    extended by one more decade, up to ``DEFAULT_GRID_CAPS`` (1e-8..1e6), and the new points
    of the product grid are scored. The choice is then the exhaustive choice over the extended
    product grid, interior or at a cap on every axis; at a cap a one-line `UserWarning` says so
    (the validation MSE may improve beyond it). A grid given by the caller is searched exactly
    as given.

    Validation MSEs within a relative 1e-4 of the lowest one count as ties (float32 fits and
    rollouts resolve no finer), and ties go to the strongest regularisation (largest
    log10(l2_a) + log10(l2_b)): on a plateau, where a lambda no longer matters, the search
    neither chases round-off towards the lower cap nor picks a needlessly weak ridge.

    Args:
        fit_curricula: fitting runs' curricula, as in `fit`.
        fit_losses: fitting runs' losses, as in `fit`.
        valid_curricula: validation runs' curricula, int [T_r, batch] each.
        valid_losses: validation runs' losses, f32 [T_r + 1, n_test] each (same n_test).
        n_train: size of the training pool.
        variant: one of `VARIANTS` or `SCHEDULED_VARIANTS`.
        a_prior: as in `fit`.
        grid: None for the default log grid ``DEFAULT_GRID`` (1e-4..1e2, extended at its
            edges as above; product grid for the linear variants, l2_b only for the additive
            ones, l2_a only for multiplicative), a 1-D list of values used the same way but
            never extended, or an [G, 2] list of explicit (l2_a, l2_b) pairs.
        lrs: the fitting runs' learning rates, as in `fit` (schedule-aware variants).
        valid_lrs: the validation runs' learning rates, one float [T_r] per run
            (schedule-aware variants: their rollouts are scaled by valid_lr / eta_max of the
            fitting runs).
        b_prior: as in `fit` (linear-lr-tracin-prior).
        decay: as in `fit` (linear-momentum; `momentum.select` searches it too).

    Returns:
        (l2_a, l2_b, table): the chosen pair (lowest finite validation MSE, ties broken as
        above) and one dict {"l2_a", "l2_b", "valid_mse", "round"} per evaluated
        point: in grid order (l2_a, then l2_b, ascending) for the default search, where
        "round" is 0 for the default grid and k for the k-th extension; in the given order
        (all "round" 0) for a given grid. The unused lambda of an ablation is reported as 0.

    Raises:
        ValueError: as `fit`, for either set of runs, or a malformed grid.

    Warns:
        ConvergenceWarning: once for the whole search, when fits at some points stopped above
            both `tol` and their float32 floor (as in `fit`): how many points, and the worst
            residual and where.
        UserWarning: the default search chose a lambda at a cap (see above).

    References:
        Guu et al. 2023, Simfluence. https://arxiv.org/abs/2303.08114
    """
    problem = _prepare(
        fit_curricula,
        fit_losses,
        n_train,
        variant,
        a_prior,
        lrs=lrs,
        b_prior=b_prior,
        decay=decay,
    )
    vcurs, vls, _, vn_test = _check_runs(valid_curricula, valid_losses, n_train, "validation")
    if vn_test != problem.n_test:
        raise ValueError(
            f"validation runs have n_test={vn_test} but fitting runs have {problem.n_test}"
        )
    vlrs = None
    if variant in SCHEDULED_VARIANTS:
        vlrs = scheduled.check_lrs(valid_lrs, [c.shape[0] for c in vcurs], variant, "validation")
    score = _ValidationScore(problem, vcurs, vls, vlrs)
    if grid is None:
        pts, mses, rounds = _extended_search(score, problem.use_x, problem.use_one)
    else:
        pts = _grid_points(variant, grid)
        mses, rounds = [float(m) for m in score(pts)], [0] * len(pts)
    if score.unconverged:
        (a, b), (worst, floor) = max(score.unconverged.items(), key=lambda kv: _nan_high(kv[1][0]))
        warnings.warn(
            f"{variant} simulator: while choosing lambdas, the fit stopped above tol={_TOL:g} "
            f"(and above the float32 floor) at {len(score.unconverged)} of {len(set(pts))} "
            f"points; worst relative residual {worst:.2e} (floor {floor:.2e}) at l2_a={a:g}, "
            f"l2_b={b:g}; those points' validation MSEs come from inexact fits",
            ConvergenceWarning,
            stacklevel=2,
        )
    table = [
        {"l2_a": float(a), "l2_b": float(b), "valid_mse": float(m), "round": int(r)}
        for (a, b), m, r in zip(pts, mses, rounds, strict=True)
    ]
    l2_a, l2_b = pts[_best(pts, mses)]
    edges = lambda_edges(table, variant, l2_a, l2_b)
    if grid is None and edges:
        chosen = {"l2_a": l2_a, "l2_b": l2_b}
        at = ", ".join(f"{k}={chosen[k]:g} ({side} cap)" for k, side in edges.items())
        lo, hi = DEFAULT_GRID_CAPS
        warnings.warn(
            f"{variant} simulator: the lambdas chosen on the validation runs are at a cap of "
            f"the lambda search {lo:g}..{hi:g}: {at}; the validation MSE may still improve "
            "beyond it (pass a wider grid to search further)",
            UserWarning,
            stacklevel=2,
        )
    return l2_a, l2_b, table


def _sub_problem(problem: _Problem, j0: int, j1: int):
    """A shallow view of `problem` whose `to_simulator` builds tests j0:j1 only."""
    view = object.__new__(_Problem)
    view.__dict__.update(problem.__dict__)
    view.n_test = j1 - j0
    return view


# ----------------------------------------------------------------------------------------------
# Removal influence
# ----------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("additive",))
def _removal(a, b, curriculum, mult, l0, additive: bool):
    # a, b: [n_train] for one test example; curriculum, mult: [T, batch]; l0: scalar
    def step(carry, cm):
        loss, diff = carry  # scalar, [n_train]
        ids, m = cm  # [batch], [batch] (m = multiplicity of ids[k] within the batch)
        ai, bi = a[ids], b[ids]  # [batch]
        alpha = jnp.float32(1.0) if additive else ai.sum()
        beta = bi.sum()
        if additive:
            alpha_i = alpha
            new_i = diff[ids] - m * bi
        else:
            # The removed slots become neutral: A = 1/batch, B = 0 (see removal_influence).
            excess = ai - jnp.float32(1.0 / curriculum.shape[1])
            alpha_i = alpha - m * excess
            new_i = alpha_i * diff[ids] - m * (excess * loss + bi)
        diff = (alpha * diff).at[ids].set(new_i)
        return (alpha * loss + beta, diff), None

    init = (l0.astype(jnp.float32), jnp.zeros_like(a))
    (_, diff), _ = jax.lax.scan(step, init, (curriculum, mult))
    return diff


def removal_influence(
    sim: Simulator,
    curriculum: Int[ArrayLike, "steps batch"],
    initial_losses: Float[ArrayLike, " n_test"],
    test_index: int,
    lr: Float[ArrayLike, " steps"] | None = None,
) -> Float[Array, " n_train"]:
    """Exact change of one test example's simulated final loss when each example is removed.

    Removing training example i drops its slots from the curriculum. The simulator was fitted at
    one batch size, where A_i is about 1/batch, so a batch that merely lost a slot would lose about
    1/batch of the loss through alpha: an artefact of the batch shrinking, not an effect of the
    example. A removed slot is therefore treated as a neutral slot, one that leaves the loss
    unchanged (A = 1/batch, B = 0): at every step where example i appears m times, alpha loses
    m (A_i - 1/batch) and beta loses m B_i (for "additive" alpha stays 1).
    The rollout with all examples and the n_train rollouts with one example removed are run
    together in one `lax.scan` that carries the differences directly (exact, O(T (n_train +
    batch)), no gradient approximation). For the schedule-aware variants a removed slot is
    likewise neutral (a = b = 0 there): alpha_t = 1 + w_t sum a loses m w_t a_i and beta_t loses
    m w_t b_i.

    Args:
        sim: a fitted `Simulator`.
        curriculum: int [T, batch].
        initial_losses: f32 [n_test], the observed L_0 (only `test_index` is used).
        test_index: which test example, 0..n_test-1.
        lr: float [T] learning rates, as in `simulate` (schedule-aware variants only).

    Returns:
        f32 [n_train]: final loss without example i minus final loss with all (0 for examples
        absent from the curriculum).

    Raises:
        ValueError: bad shapes, ids or test index.

    References:
        Guu et al. 2023, Simfluence. https://arxiv.org/abs/2303.08114
    """
    _check_sim(sim)
    cur, l0 = _check_sim_inputs(sim, curriculum, initial_losses, batched=False)
    if isinstance(test_index, bool) or not isinstance(test_index, int | np.integer):
        raise ValueError(f"test_index={test_index!r} must be an int in 0..{sim.n_test - 1}")
    if not 0 <= int(test_index) < sim.n_test:
        raise ValueError(f"test_index={test_index} is outside 0..{sim.n_test - 1}")
    c = np.asarray(cur)
    mult = (c[:, :, None] == c[:, None, :]).sum(-1).astype(np.float32)  # [T, batch]
    j = int(test_index)
    if sim.variant in MOMENTUM_VARIANTS:
        w = _rates(sim, lr, cur, batched=False) if sim.lr_max is not None else None
        a = jnp.asarray(sim.A, jnp.float32)[j] - jnp.float32(1.0 / c.shape[1])
        return momentum.removal(
            a, jnp.asarray(sim.B, jnp.float32)[j], cur, jnp.asarray(mult), l0[j], sim.decay, w
        )
    if sim.variant in SCHEDULED_VARIANTS:
        w = _rates(sim, lr, cur, batched=False)
        a = jnp.asarray(sim.A, jnp.float32)[j] - jnp.float32(1.0 / c.shape[1])
        return scheduled.removal(
            a, jnp.asarray(sim.B, jnp.float32)[j], cur, jnp.asarray(mult), w, l0[j], _additive(sim)
        )
    return _removal(
        jnp.asarray(sim.A)[j],
        jnp.asarray(sim.B)[j],
        cur,
        jnp.asarray(mult),
        l0[j],
        sim.variant == "additive",
    )


# ----------------------------------------------------------------------------------------------
# Persistence
# ----------------------------------------------------------------------------------------------


def save_simulator(
    path, sim: Simulator, *, origin: dict | None = None, provenance: dict | None = None
) -> None:
    """Writes a simulator to an .npz file atomically (temporary name, then rename).

    Args:
        path: destination file (its folder is created if needed; no suffix is appended).
        sim: the `Simulator` to save (A, B, variant, l2_a, l2_b, a_prior, batch, lr_max,
            decay).
        origin: optional JSON-able record of where it was fitted (`simfluence fit` stores
            ``{"experiment_sha256", "fit_runs", "valid_runs"}``); read back by `read_origin`.
        provenance: what made the file (`simfluence.runlog.provenance`; None: this process's),
            stored as a JSON string entry ``provenance``; read back by `read_provenance`. ``{}``
            records none (the synthetic truth of `simfluence demo-data`, a function of its seed,
            whose bytes stay the same from run to run).

    Raises:
        ValueError: `sim` is not a valid Simulator.
    """
    _check_sim(sim)
    atomic_savez(
        Path(path),
        **_origin_arrays(origin),
        **provenance_arrays(provenance),
        A=np.asarray(sim.A, np.float32),
        B=np.asarray(sim.B, np.float32),
        variant=np.asarray(sim.variant),
        l2_a=np.asarray(sim.l2_a, np.float64),
        l2_b=np.asarray(sim.l2_b, np.float64),
        a_prior=np.asarray(sim.a_prior, np.float64),
        **({} if sim.batch is None else {"batch": np.asarray(sim.batch, np.int64)}),
        **({} if sim.lr_max is None else {"lr_max": np.asarray(sim.lr_max, np.float64)}),
        **({} if sim.decay is None else {"decay": np.asarray(sim.decay, np.float64)}),
    )


def load_simulator(path) -> Simulator:
    """Reads a simulator written by `save_simulator`.

    Args:
        path: the .npz file.

    Returns:
        The `Simulator` (A, B as f32 jax arrays).

    Raises:
        ValueError: missing file, missing keys, unknown variant or bad shapes, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"simulator file {path} does not exist; write one with `simfluence fit`")
    keys = ("A", "B", "variant", "l2_a", "l2_b", "a_prior")
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError:
        # Neither .npy nor .npz (JSON, text, a pickle): np.load falls back to unpickling, which
        # allow_pickle=False refuses with advice that does not apply here.
        raise ValueError(
            f"{path}: not a simulator file (not an .npz archive); write one with `simfluence fit`"
        ) from None
    except Exception as e:  # OSError, EOFError, ...: one line naming the file
        raise ValueError(f"{path}: cannot read simulator ({type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path}: not a simulator file (one array, not an .npz archive); "
            "write one with `simfluence fit`"
        )
    with z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise ValueError(
                f"{path}: not a simulator file (missing {', '.join(missing)}); "
                "write one with `simfluence fit`"
            )
        try:
            data = {k: z[k] for k in keys}
            batch = z["batch"] if "batch" in z.files else None  # older files: unknown
            lr_max = z["lr_max"] if "lr_max" in z.files else None  # schedule-aware only
            decay = z["decay"] if "decay" in z.files else None  # momentum only
        except Exception as e:  # zipfile errors, object arrays: one line naming the file
            raise ValueError(f"{path}: cannot read simulator ({type(e).__name__}: {e})") from None
    batch = None if batch is None else int(_file_scalar(path, "batch", batch, integer=True))
    lr_max = None if lr_max is None else _file_scalar(path, "lr_max", lr_max)
    decay = None if decay is None else _file_scalar(path, "decay", decay)
    variant = str(data["variant"])
    if variant not in _ALL:
        raise ValueError(f"{path}: unknown simulator variant {variant!r}; use one of {_ALL}")
    if variant in SCHEDULED_VARIANTS and not (
        lr_max is not None and math.isfinite(lr_max) and lr_max > 0
    ):
        raise ValueError(
            f"{path}: {variant} simulator without a valid lr_max ({lr_max}); refit it with "
            "`simfluence fit`"
        )
    if variant in MOMENTUM_VARIANTS:
        if decay is None:
            raise ValueError(
                f"{path}: {variant} simulator without its decay; refit it with `simfluence fit`"
            )
        momentum.check_decay(decay, f"{path}: decay")
    A, B = data["A"], data["B"]
    for name, arr in (("A", A), ("B", B)):
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"{path}: {name} holds {arr.dtype}, not numbers; write the simulator again with "
                "`simfluence fit`"
            )
    if A.ndim != 2 or A.shape != B.shape:
        raise ValueError(f"{path}: A {A.shape} and B {B.shape} must both be [n_test, n_train]")
    if not (np.isfinite(A).all() and np.isfinite(B).all()):
        raise ValueError(f"{path}: A or B contains NaN or inf; refit the simulator")
    return Simulator(
        A=jnp.asarray(A, jnp.float32),
        B=jnp.asarray(B, jnp.float32),
        variant=variant,
        l2_a=_file_scalar(path, "l2_a", data["l2_a"]),
        l2_b=_file_scalar(path, "l2_b", data["l2_b"]),
        a_prior=_file_scalar(path, "a_prior", data["a_prior"]),
        batch=batch,
        lr_max=lr_max if variant in SCHEDULED_VARIANTS else None,
        decay=decay if variant in MOMENTUM_VARIANTS else None,
    )


def _file_scalar(path: Path, name: str, value: np.ndarray, *, integer: bool = False) -> float:
    """One number of a simulator file (0-d int or float array), or a ValueError naming it."""
    kinds = (np.integer,) if integer else (np.integer, np.floating)
    if value.shape != () or not any(np.issubdtype(value.dtype, k) for k in kinds):
        what = "an integer" if integer else "a number"
        raise ValueError(
            f"{path}: {name} must be {what}, got {value.dtype} {value.shape}; write the "
            "simulator again with `simfluence fit`"
        )
    return float(value)


def _origin_arrays(origin: dict | None) -> dict:
    import json

    return {} if origin is None else {"origin": np.asarray(json.dumps(origin, sort_keys=True))}


def provenance_arrays(provenance: dict | None = None) -> dict:
    """The ``provenance`` entry of a simulator file: `runlog.provenance` (None: this process's)
    as a 0-d JSON string array; no entry for ``{}``."""
    import json

    from simfluence.runlog import provenance as _provenance

    prov = _provenance() if provenance is None else provenance
    return {"provenance": np.asarray(json.dumps(prov, sort_keys=True))} if prov else {}


def read_provenance(path) -> dict | None:
    """The provenance recorded in a simulator file (Simfluence or TracIn-CP).

    Args:
        path: the .npz file.

    Returns:
        The ``provenance`` dict (see `simfluence.runlog.provenance`), or None when the file
        records none (written before provenance was recorded) or it is not a JSON object.

    Raises:
        ValueError: the file cannot be read.
    """
    import json

    try:
        with open(path, "rb") as fh:
            z = np.load(fh, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile) or "provenance" not in z.files:
                return None
            text = str(z["provenance"])
    except Exception as e:
        raise ValueError(f"{path}: cannot read simulator ({type(e).__name__}: {e})") from None
    try:
        prov = json.loads(text)
    except json.JSONDecodeError:
        return None
    return prov if isinstance(prov, dict) else None


def read_origin(path) -> dict | None:
    """Where a saved simulator (Simfluence or TracIn-CP) was fitted, as `save_simulator` got it.

    Args:
        path: a simulator .npz file.

    Returns:
        The ``origin`` dict, or None when the file records none (written without one, or by an
        older version).

    Raises:
        ValueError: the file cannot be read, or its origin is not a JSON object.
    """
    import json

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile) or "origin" not in z.files:
                return None
            text = str(z["origin"])
    except AttributeError:  # a plain .npy has no `files`
        return None
    except Exception as e:  # OSError, zipfile errors: one line naming the file
        raise ValueError(f"{path}: cannot read simulator ({type(e).__name__}: {e})") from None
    try:
        origin = json.loads(text)
    except json.JSONDecodeError:
        origin = None
    if not isinstance(origin, dict):
        raise ValueError(f"{path}: its 'origin' is not a JSON object; refit the simulator")
    return origin
