"""Batched preconditioned conjugate gradients for the Simfluence ridge regressions.

One design row per (run, step): for test example j the row holds ``m_{t,i} x_{t,j}`` in the
A-column and ``m_{t,i} w_t`` in the B-column of every training example i in the batch (m counts
repeats), so only ``2 * batch`` entries are non-zero. ``x`` is the teacher-forced
``L_{t-1,j}`` and ``w_t = 1`` for the schedule-free variants; the schedule-aware ones scale the
whole row by the step's relative learning rate (``x = w_t L_{t-1}``, row weight ``w_t``).
X^T X differs per test example through ``x`` but its sparsity (which examples share a batch)
does not, so the rows are kept as ``ids [rows, batch]`` and every test example is a column of
dense ``[rows, n_test]`` arrays.
The normal-equation operator is applied with gathers (X v) and scatter-adds (X^T s); the
preconditioner inverts the exact 2x2 (A_i, B_i) diagonal block of every training example.
CG runs in float32; mixed-precision iterative refinement (float64 residuals, enabled locally)
takes the solution to a float64 relative residual of `tol`, so ill-conditioned fits (examples
seen a few times, plain ridge) still match a float64 dense solve.

The solution is stored in float32, so a residual below the float32 rounding floor of the solution
(``u ||(|X|^T |X| + diag(lam)) |theta| || / ||rhs||``, u = 2^-24: what rounding every coefficient
to float32 can cost at worst) cannot be reached; `solve` reports that floor beside the residual so
callers can tell "stopped early" from "as exact as float32 coefficients can be".

References:
    Guu et al. 2023, Simfluence. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

# Unit roundoff of float32 (round to nearest): |fl(v) - v| <= U32 |v|.
U32 = 2.0**-24

# The CG solver's defaults, shared with its caller (`simfluence.simulators`) and the docs:
# float64 relative residual per test column, and CG iterations per refinement round.
DEFAULT_TOL = 1e-7
DEFAULT_MAX_ITER = 1000


@dataclasses.dataclass(frozen=True)
class Structure:
    """Sparsity of the design, shared by every test example."""

    ids: jax.Array  # int32 [rows, batch]
    count_sq: jax.Array  # f32 [n_train]: sum over rows of (multiplicity of i in the row)^2
    rep_rows: jax.Array  # int32 [n_rep]: rows of the slots whose id repeats within the row
    rep_ids: jax.Array  # int32 [n_rep]: the id in that slot
    rep_extra: jax.Array  # f32 [n_rep]: multiplicity - 1 of that id in that row
    n_train: int
    w: jax.Array | None = None  # f32 [rows, 1]: row weight (B-column value); None means 1

    @staticmethod
    def build(
        ids: Int[np.ndarray, "rows batch"],
        n_train: int,
        w: Float[np.ndarray, " rows"] | None = None,
    ) -> Structure:
        """Precomputes the design's sparsity from the fitting rows' training-pool ids.

        Args:
            ids: int [rows, batch], the ids of every (run, step) row, repeats allowed.
            n_train: size of the training pool (ids lie in 0..n_train-1).
            w: optional f32 [rows] row weights, the B-column value of each row (the
                schedule-aware variants' eta_t / eta_max); None means 1 for every row.

        Returns:
            The `Structure`: ids, the diagonal sums sum_rows m^2 w^2 per example, the slots
            whose id repeats within its row (for the preconditioner's exact diagonal) and w.
        """
        ids = np.asarray(ids, np.int32)
        mult = (ids[:, :, None] == ids[:, None, :]).sum(-1)  # [rows, batch]
        # Diagonal of X^T X: every slot of id i adds m (its multiplicity) times the row's
        # feature product, i.e. m^2 w^2 per row; most rows have no repeats (m = 1).
        weights = mult if w is None else mult * np.square(np.asarray(w, np.float64))[:, None]
        count_sq = np.bincount(ids.ravel(), weights=weights.ravel(), minlength=n_train)
        rep_r, rep_k = np.nonzero(mult > 1)
        return Structure(
            jnp.asarray(ids),
            jnp.asarray(count_sq, jnp.float32),
            jnp.asarray(rep_r, jnp.int32),
            jnp.asarray(ids[rep_r, rep_k], jnp.int32),
            jnp.asarray(mult[rep_r, rep_k] - 1, jnp.float32),
            int(n_train),
            None if w is None else jnp.asarray(np.asarray(w, np.float32)[:, None]),
        )


def _x64():
    """Context manager enabling float64 locally (jax >= 0.7: jax.enable_x64)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older jax

    return enable_x64()


def solve(
    structure: Structure,
    x: Float[np.ndarray | Array, "rows n"],
    y: Float[np.ndarray | Array, "rows n"],
    lam: Float[np.ndarray, " F"],
    prior: Float[np.ndarray, " F"] | Float[np.ndarray, "n F n_train"],
    use_x: bool,
    use_one: bool,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    x0: Float[np.ndarray | Array, "n F n_train"] | None = None,
    *,
    inner_tol: float = 1e-6,
    max_rounds: int = 4,
) -> tuple[Float[Array, "n F n_train"], dict]:
    """Solves (X^T X + diag(lam)) theta = X^T y + lam * prior for every test column.

    This minimises ||y - X theta||^2 + sum_f lam_f ||theta_f - prior_f||^2. Mixed-precision
    iterative refinement: the residual is computed in float64 (enabled locally), the correction
    by float32 preconditioned CG (asked for the remaining reduction, but at most `inner_tol`);
    rounds stop once every test column's float64 relative residual is below `tol`.

    Args:
        structure: the shared design sparsity.
        x: f32 [rows, n] A-column value per row and test example: the observed L_{t-1}, times
            the row weight `structure.w` when there is one.
        y: f32 [rows, n] regression target per row and test example.
        lam: f32 [F] ridge strength per feature (F = use_x + use_one).
        prior: value the coefficients are shrunk towards (and start from): f32 [F], one per
            feature, or f32 [n, F, n_train], one per coefficient.
        use_x: whether the A feature (L_{t-1}) is fitted.
        use_one: whether the B feature (constant) is fitted.
        tol: float64 relative residual ||rhs - G theta|| / ||rhs|| at which a column is done.
        max_iter: iteration cap of each CG round.
        x0: optional warm start f32 [n, F, n_train].
        inner_tol: smallest relative residual asked of a float32 CG round.
        max_rounds: cap on refinement rounds.

    Returns:
        (theta f32 [n, F, n_train], info dict: "iterations" (total CG iterations), "rounds",
        "rel_residual" f64 [n], "floor" f64 [n]). "floor" is the float32 rounding floor of each
        column's solution, u ||(|X|^T |X| + diag(lam)) |theta| || / ||rhs|| with u = 2^-24: the
        largest relative residual that rounding the exact solution to float32 can cause. A
        column with rel_residual above `tol` but within its floor is as exact as float32
        coefficients allow; refinement rounds cannot take it below.
    """
    n = x.shape[1]
    n_f = int(use_x) + int(use_one)
    lam = np.asarray(lam, np.float32)
    prior = np.asarray(prior, np.float32)
    per_coef = prior.ndim == 3
    if per_coef:
        prior_j = jnp.transpose(jnp.asarray(prior), (2, 1, 0))  # [n_train, F, n]
    else:
        prior_j = jnp.asarray(prior)[None, :, None]  # [1, F, 1]
    if x0 is None:
        theta = jnp.broadcast_to(prior_j, (structure.n_train, n_f, n))
    else:
        theta = jnp.transpose(jnp.asarray(x0, jnp.float32), (2, 1, 0))  # [n_train, F, n]
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    w = structure.w
    kw = dict(n_train=structure.n_train, use_x=use_x, use_one=use_one)
    precond_blocks = _blocks(
        structure.ids,
        structure.count_sq,
        structure.rep_rows,
        structure.rep_ids,
        structure.rep_extra,
        x,
        w,
        n_train=structure.n_train,
    )
    iters, rounds = 0, 0
    lam_j = jnp.asarray(lam)
    # ||rhs|| = ||X^T y + lam prior|| (the residual at theta = 0) normalises the residuals; the
    # first round starts from a float32 residual, later ones from float64 residuals.
    if x0 is None and not per_coef:
        r32, r_sq, rhs_sq = _start(structure.ids, x, w, y, lam_j, jnp.asarray(prior), **kw)
    else:
        zeros = jnp.zeros((structure.n_train, n_f, n), jnp.float32)
        _, rhs_sq = _residual(structure.ids, x, w, y, lam_j, prior_j, zeros, **kw)
        r32, r_sq = _residual(structure.ids, x, w, y, lam_j, prior_j, theta, **kw)
    rhs_norm = np.sqrt(np.maximum(np.asarray(rhs_sq, np.float64), 1e-300))
    rel = np.sqrt(np.asarray(r_sq, np.float64)) / rhs_norm
    worst = float(rel.max())
    while True:
        if rounds > 0 or worst <= tol:  # confirm convergence in float64
            with _x64():
                r, r_sq = _residual(structure.ids, x, w, y, lam_j, prior_j, theta, wide=True, **kw)
                rel = np.sqrt(np.asarray(r_sq)) / rhs_norm
                worst = float(rel.max())
                if worst > tol and rounds < max_rounds:
                    r32 = jnp.asarray(r, jnp.float32)
            if worst <= tol or rounds == max_rounds:
                break
        # Ask the float32 round for just the reduction still needed (it cannot go below about
        # 1e-6 usefully); the first round thus does most of the work, later ones a few steps.
        target = float(np.clip(0.3 * tol / worst, inner_tol, 0.5))
        d, it = _pcg(
            structure.ids,
            x,
            w,
            r32,
            lam_j,
            precond_blocks,
            jnp.float32(target),
            jnp.int32(max_iter),
            **kw,
        )
        theta = theta + d
        iters += int(it)
        rounds += 1
    with _x64():
        g_abs = _abs_normal_norm(structure.ids, x, w, lam_j, theta, **kw)
        floor = U32 * np.sqrt(np.asarray(g_abs, np.float64)) / rhs_norm
    info = {"iterations": iters, "rounds": rounds, "rel_residual": rel, "floor": floor}
    return jnp.transpose(theta, (2, 1, 0)), info


def _forward(v, ids, x, w, use_x, use_one):
    # v: [n_train, F, n] -> X v: [rows, n]; w: None (B-column 1) or [rows, 1]
    n_train, n_f, n = v.shape
    flat = v.reshape(n_train, n_f * n)  # [n_train, F * n]; one contiguous row per example
    g = sum(flat.at[ids[:, k]].get(mode="promise_in_bounds") for k in range(ids.shape[1]))
    g = g.reshape(-1, n_f, n)  # [rows, F, n]
    gb = g[:, -1] if w is None else g[:, -1] * w  # B-column part (when use_one)
    if use_x and use_one:
        return g[:, 0] * x + gb
    return g[:, 0] * x if use_x else gb


def _transpose(s, ids, x, w, n_train, use_x, use_one):
    # s: [rows, n] -> X^T s: [n_train, F, n]
    parts = []
    if use_x:
        parts.append(s * x)
    if use_one:
        parts.append(s if w is None else s * w)
    vals = jnp.concatenate(parts, axis=1)  # [rows, F * n]
    out = jnp.zeros((n_train, vals.shape[1]), vals.dtype)
    for k in range(ids.shape[1]):
        out = out.at[ids[:, k]].add(vals, mode="promise_in_bounds")
    return out.reshape(n_train, len(parts), -1)  # [n_train, F, n]


@partial(jax.jit, static_argnames=("n_train",))
def _blocks(ids, count_sq, rep_rows, rep_ids, rep_extra, x, w, *, n_train):
    """Diagonal 2x2 blocks of X^T X (without lambda): [n_train, 3, n] = (xx, xw, ww)."""
    vals = jnp.concatenate([x * x, x if w is None else x * w], axis=1)  # [rows, 2 n]
    out = jnp.zeros((n_train, vals.shape[1]), x.dtype)
    for k in range(ids.shape[1]):
        out = out.at[ids[:, k]].add(vals, mode="promise_in_bounds")
    # Repeated slots count m times each (m^2 per row): add the missing (m - 1) copies.
    out = out.at[rep_ids].add(vals[rep_rows] * rep_extra[:, None], mode="promise_in_bounds")
    n = x.shape[1]
    ones = jnp.broadcast_to(count_sq[:, None], (n_train, n))
    return jnp.stack([out[:, :n], out[:, n:], ones], axis=1)


@partial(jax.jit, static_argnames=("n_train", "use_x", "use_one"))
def _start(ids, x, w, y, lam, prior, *, n_train, use_x, use_one):
    """Residual at theta = prior (a constant per feature, [F]) and ||rhs||^2, in one pass.

    Every row has `batch` slots, so X theta for a constant theta is batch * (p_a x + p_b w):
    no gather needed. Returns (r [n_train, F, n], ||r||^2 [n], ||X^T y + lam prior||^2 [n]).
    """
    b = ids.shape[1]
    f = 0
    pred = jnp.zeros_like(x)
    if use_x:
        pred = pred + b * prior[0] * x
        f += 1
    if use_one:
        pred = pred + b * prior[f] * (1.0 if w is None else w)
    n = x.shape[1]
    both = _transpose(
        jnp.concatenate([y, y - pred], axis=1),
        ids,
        jnp.tile(x, (1, 2)),
        w,
        n_train,
        use_x,
        use_one,
    )  # [n_train, F, 2 n]
    rhs = both[:, :, :n] + lam[None, :, None] * prior[None, :, None]
    r = both[:, :, n:]
    return r, jnp.sum(r * r, axis=(0, 1)), jnp.sum(rhs * rhs, axis=(0, 1))


@partial(jax.jit, static_argnames=("n_train", "use_x", "use_one", "wide"))
def _residual(ids, x, w, y, lam, prior, theta, *, n_train, use_x, use_one, wide=False):
    """r = X^T (y - X theta) + lam (prior - theta) and ||r||^2 per test column.

    `prior` is [1, F, 1] (one value per feature) or [n_train, F, n] (one per coefficient).
    With `wide` the arithmetic is float64 (the caller enables x64) and r is float64.
    """
    dt = jnp.float64 if wide else jnp.float32
    x, y, theta = x.astype(dt), y.astype(dt), theta.astype(dt)
    w = None if w is None else w.astype(dt)
    lam_b = lam.astype(dt)[None, :, None]  # [1, F, 1]
    s = y - _forward(theta, ids, x, w, use_x, use_one)  # [rows, n]
    r = _transpose(s, ids, x, w, n_train, use_x, use_one) + lam_b * (prior.astype(dt) - theta)
    return r, jnp.sum(r * r, axis=(0, 1))


@partial(jax.jit, static_argnames=("n_train", "use_x", "use_one"))
def _abs_normal_norm(ids, x, w, lam, theta, *, n_train, use_x, use_one):
    """||(|X|^T |X| + diag(lam)) |theta| ||^2 per test column, in float64 (caller enables x64).

    Rounding theta to float32 moves each coefficient by at most u |theta_i|, so the residual
    moves by at most u times this norm (X's entries are m x and m w, m >= 0).
    """
    x = jnp.abs(x.astype(jnp.float64))
    w = None if w is None else jnp.abs(w.astype(jnp.float64))
    v = jnp.abs(theta.astype(jnp.float64))  # [n_train, F, n]
    s = _forward(v, ids, x, w, use_x, use_one)  # [rows, n]
    g = _transpose(s, ids, x, w, n_train, use_x, use_one)
    g = g + lam.astype(jnp.float64)[None, :, None] * v
    return jnp.sum(g * g, axis=(0, 1))


def _make_precond(blocks, lam, use_x, use_one):
    """Returns z = P r applying the inverse of each example's diagonal block."""
    xx, x1, one = blocks[:, 0], blocks[:, 1], blocks[:, 2]  # [n_train, n]
    if use_x and use_one:
        d00 = xx + lam[0]
        d11 = one + lam[1]
        det = d00 * d11 - x1 * x1
        ok = det > 1e-30 * jnp.maximum(d00 * d11, 1e-30)
        inv_det = jnp.where(ok, 1.0 / jnp.where(ok, det, 1.0), 0.0)
        i00, i11, i01 = d11 * inv_det, d00 * inv_det, -x1 * inv_det
        # Examples with a singular block (never seen, lambda = 0) are left alone.
        i00 = jnp.where(ok, i00, 1.0)
        i11 = jnp.where(ok, i11, 1.0)

        def apply(r):
            ra, rb = r[:, 0], r[:, 1]
            return jnp.stack([i00 * ra + i01 * rb, i01 * ra + i11 * rb], axis=1)

        return apply
    d = (xx if use_x else one) + lam[0]
    inv = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 1.0)

    def apply(r):
        return r * inv[:, None, :]

    return apply


@partial(jax.jit, static_argnames=("n_train", "use_x", "use_one"))
def _pcg(ids, x, w, rhs, lam, blocks, tol, max_iter, *, n_train, use_x, use_one):
    """float32 PCG from 0 for (X^T X + diag(lam)) d = rhs; rhs [n_train, F, n]."""
    lam_b = lam[None, :, None]  # [1, F, 1]

    def normal(v):
        s = _forward(v, ids, x, w, use_x, use_one)
        return _transpose(s, ids, x, w, n_train, use_x, use_one) + lam_b * v

    def dot(a, b):  # per test column: [n]
        return jnp.sum(a * b, axis=(0, 1))

    precond = _make_precond(blocks, lam, use_x, use_one)
    thresh = tol * jnp.sqrt(dot(rhs, rhs))
    r = rhs
    z = precond(r)
    p = z
    rz = dot(r, z)

    def cond(state):
        i, _, _, _, _, active = state
        return (i < max_iter) & jnp.any(active)

    def body(state):
        i, d, r, p, rz, active = state
        q = normal(p)
        pq = dot(p, q)
        step = jnp.where(active & (pq > 0), rz / jnp.where(pq > 0, pq, 1.0), 0.0)  # [n]
        d = d + step * p
        r = r - step * q
        z = precond(r)
        rz_new = dot(r, z)
        beta = jnp.where(active & (rz > 0), rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
        p = z + beta * p
        active = active & (step != 0) & (jnp.sqrt(dot(r, r)) > thresh)
        return i + 1, d, r, p, rz_new, active

    active0 = jnp.sqrt(dot(r, r)) > thresh
    state = (jnp.int32(0), jnp.zeros_like(rhs), r, p, rz, active0)
    i, d, _, _, _, _ = jax.lax.while_loop(cond, body, state)
    return d, i
