"""Batched preconditioned conjugate gradients for the Simfluence ridge regressions.

One design row per (run, step): for test example j the row holds ``m_{t,i} L_{t-1,j}`` in the
A-column and ``m_{t,i}`` in the B-column of every training example i in the batch (m counts
repeats), so only ``2 * batch`` entries are non-zero. X^T X differs per test example through
``L_{t-1,j}`` but its sparsity (which examples share a batch) does not, so the rows are kept as
``ids [rows, batch]`` and every test example is a column of dense ``[rows, n_test]`` arrays.
The normal-equation operator is applied with gathers (X v) and scatter-adds (X^T s); the
preconditioner inverts the exact 2x2 (A_i, B_i) diagonal block of every training example.

References:
    Guu et al. 2023, Simfluence. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Structure:
    """Sparsity of the design, shared by every test example."""

    ids: jax.Array  # int32 [rows, batch]
    mult: jax.Array  # f32 [rows, batch], multiplicity of ids[r, k] within row r
    n_train: int

    @staticmethod
    def build(ids: np.ndarray, n_train: int) -> Structure:
        ids = np.asarray(ids, np.int32)
        mult = (ids[:, :, None] == ids[:, None, :]).sum(-1).astype(np.float32)
        return Structure(jnp.asarray(ids), jnp.asarray(mult), int(n_train))


def _x64():
    """Context manager enabling float64 locally (jax >= 0.7: jax.enable_x64)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older jax

    return enable_x64()


def solve(
    structure: Structure,
    x,
    y,
    lam,
    prior,
    use_x: bool,
    use_one: bool,
    tol=1e-8,
    max_iter=1000,
    x0=None,
    *,
    inner_tol=1e-4,
    max_rounds=4,
):
    """Solves (X^T X + diag(lam)) theta = X^T y + lam * prior for every test column.

    This minimises ||y - X theta||^2 + sum_f lam_f ||theta_f - prior_f||^2. Mixed-precision
    iterative refinement: the residual is computed in float64 (enabled locally), the correction
    by float32 preconditioned CG to a relative residual of `inner_tol`; rounds stop once every
    test column's float64 relative residual is below `tol`.

    Args:
        structure: the shared design sparsity.
        x: f32 [rows, n] observed L_{t-1} per row and test example.
        y: f32 [rows, n] regression target per row and test example.
        lam: f32 [F] ridge strength per feature (F = use_x + use_one).
        prior: f32 [F] value each feature's coefficients are shrunk towards (and start from).
        use_x: whether the A feature (L_{t-1}) is fitted.
        use_one: whether the B feature (constant) is fitted.
        tol: float64 relative residual ||rhs - G theta|| / ||rhs|| at which a column is done.
        max_iter: iteration cap of each CG round.
        x0: optional warm start f32 [n, F, n_train].
        inner_tol: relative residual of each float32 CG round.
        max_rounds: cap on refinement rounds.

    Returns:
        (theta f32 [n, F, n_train], info dict: "iterations" (total CG iterations), "rounds",
        "rel_residual" f64 [n]).
    """
    n = x.shape[1]
    n_f = int(use_x) + int(use_one)
    lam = np.asarray(lam, np.float32)
    prior = np.asarray(prior, np.float32)
    if x0 is None:
        theta = jnp.broadcast_to(jnp.asarray(prior)[None, :, None], (structure.n_train, n_f, n))
    else:
        theta = jnp.transpose(jnp.asarray(x0, jnp.float32), (2, 1, 0))  # [n_train, F, n]
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    kw = dict(n_train=structure.n_train, use_x=use_x, use_one=use_one)
    precond_blocks = _blocks(structure.ids, structure.mult, x, **kw)
    iters, rounds = 0, 0
    rel = None
    for _ in range(max_rounds + 1):
        with _x64():
            r, rel = _residual64(structure.ids, x, y, lam, prior, theta, **kw)
            rel = np.asarray(rel)
            done = bool(np.all(rel <= tol))
            if not done:
                r32 = np.asarray(r, np.float32)
        if done or rounds == max_rounds:
            break
        d, it = _pcg(
            structure.ids, x, jnp.asarray(r32), jnp.asarray(lam), precond_blocks,
            jnp.float32(inner_tol), jnp.int32(max_iter), **kw,
        )
        theta = theta + d
        iters += int(it)
        rounds += 1
    info = {"iterations": iters, "rounds": rounds, "rel_residual": rel}
    return jnp.transpose(theta, (2, 1, 0)), info


def _forward(v, ids, x, use_x, use_one):
    # v: [n_train, F, n] -> X v: [rows, n]
    n_train, n_f, n = v.shape
    flat = v.reshape(n_train, n_f * n)  # [n_train, F * n]; one contiguous row per example
    g = sum(flat.at[ids[:, k]].get(mode="promise_in_bounds") for k in range(ids.shape[1]))
    g = g.reshape(-1, n_f, n)  # [rows, F, n]
    if use_x and use_one:
        return g[:, 0] * x + g[:, 1]
    return g[:, 0] * x if use_x else g[:, 0]


def _transpose(s, ids, x, n_train, use_x, use_one):
    # s: [rows, n] -> X^T s: [n_train, F, n]
    parts = []
    if use_x:
        parts.append(s * x)
    if use_one:
        parts.append(s)
    vals = jnp.concatenate(parts, axis=1)  # [rows, F * n]
    out = jnp.zeros((n_train, vals.shape[1]), vals.dtype)
    for k in range(ids.shape[1]):
        out = out.at[ids[:, k]].add(vals, mode="promise_in_bounds")
    return out.reshape(n_train, len(parts), -1)  # [n_train, F, n]


@partial(jax.jit, static_argnames=("n_train", "use_x", "use_one"))
def _blocks(ids, mult, x, *, n_train, use_x, use_one):
    """Diagonal 2x2 blocks of X^T X (without lambda): [n_train, 3, n] = (xx, x1, 11)."""
    vals = jnp.concatenate([x * x, x, jnp.ones_like(x)], axis=1)  # [rows, 3 n]
    out = jnp.zeros((n_train, vals.shape[1]), x.dtype)
    for k in range(ids.shape[1]):
        out = out.at[ids[:, k]].add(vals * mult[:, k, None], mode="promise_in_bounds")
    return out.reshape(n_train, 3, -1)


@partial(jax.jit, static_argnames=("n_train", "use_x", "use_one"))
def _residual64(ids, x, y, lam, prior, theta, *, n_train, use_x, use_one):
    """float64 r = X^T (y - X theta) - lam (theta - prior) and ||r|| / ||X^T y + lam prior||."""
    f64 = jnp.float64
    x, y, theta = x.astype(f64), y.astype(f64), theta.astype(f64)
    lam_b = lam.astype(f64)[None, :, None]
    prior_b = prior.astype(f64)[None, :, None]
    s = y - _forward(theta, ids, x, use_x, use_one)  # [rows, n]
    r = _transpose(s, ids, x, n_train, use_x, use_one) - lam_b * (theta - prior_b)
    rhs = _transpose(y, ids, x, n_train, use_x, use_one) + lam_b * prior_b
    rel = jnp.sqrt(jnp.sum(r * r, axis=(0, 1)) / jnp.maximum(jnp.sum(rhs * rhs, axis=(0, 1)), 1e-300))
    return r, rel


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
def _pcg(ids, x, rhs, lam, blocks, tol, max_iter, *, n_train, use_x, use_one):
    """float32 PCG from 0 for (X^T X + diag(lam)) d = rhs; rhs [n_train, F, n]."""
    lam_b = lam[None, :, None]  # [1, F, 1]

    def normal(v):
        s = _forward(v, ids, x, use_x, use_one)
        return _transpose(s, ids, x, n_train, use_x, use_one) + lam_b * v

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
