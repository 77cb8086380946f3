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

The whole solve, refinement included, is one compiled call: blocks of `block_width(rows)` test
columns are solved one after another by `lax.map` and split over every device of `mesh()` by
`shard_map` (test columns are independent). With fewer rows than unknowns a small residual does
not mean small coefficient errors; there each column must also reach the bound ``||r|| /
min(lam) <= COEF_TOL ||theta||`` (or its float32 floor). Notes and measurements: docs/solver.md.

References:
    Guu et al. 2023, Simfluence. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import dataclasses
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

# Unit roundoff of float32 (round to nearest): |fl(v) - v| <= U32 |v|.
U32 = 2.0**-24

# The CG solver's defaults, shared with its caller (`simfluence.simulators`) and the docs:
# float64 relative residual per test column, and CG iterations per refinement round.
DEFAULT_TOL = 1e-7
DEFAULT_MAX_ITER = 1000

# Underdetermined fits (fewer rows than unknowns) with every lambda > 0: each column must also
# reach the coefficient error bound ||theta - theta*|| <= ||r|| / min(lam) <= COEF_TOL ||theta||
# (theta: the deviation from the reference A = 1/batch, B = 0), or its float32 floor.
COEF_TOL = 1e-5


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

    The whole solve, refinement rounds included, is one compiled call: the test columns are cut
    into blocks of `block_width(rows)` (padded with zero columns), each block is solved to
    completion by a
    `lax.map` (so a block's working set stays small), and the blocks are split over every device
    of `mesh()` with `shard_map` (test columns are independent, so no device talks to another
    except to return the result). The result does not depend on the number of devices.

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
        (theta f32 [n, F, n_train], info dict: "iterations" (CG iterations of the slowest
        block, all rounds), "rounds" (refinement rounds of the slowest block), "rel_residual"
        f64 [n], "floor" f64 [n]). "floor" is the float32 rounding floor of each column's
        solution, u ||(|X|^T |X| + diag(lam)) |theta| || / ||rhs|| with u = 2^-24: the largest
        relative residual that rounding the exact solution to float32 can cause. A column with
        rel_residual above `tol` but within its floor is as exact as float32 coefficients allow;
        refinement rounds cannot take it below.
    """
    n = int(x.shape[1])
    n_f = int(use_x) + int(use_one)
    mesh_ = mesh()
    n_dev = mesh_.devices.size
    # No device gets only padding at small n.
    block = min(block_width(x.shape[0]), -(-n // n_dev))
    n_pad = -(-n // (block * n_dev)) * block * n_dev
    lam = np.asarray(lam, np.float32)
    prior = np.asarray(prior, np.float32)
    per_coef = prior.ndim == 3
    cols = NamedSharding(mesh_, P(None, "data"))  # [rows, n]: test columns split
    tests = NamedSharding(mesh_, P("data"))  # [n, ...]: test examples split
    x = _put(_pad_axis(x, 1, n_pad, np.float32), cols)
    y = _put(_pad_axis(y, 1, n_pad, np.float32), cols)
    if per_coef:
        prior_in = _put(_pad_axis(prior, 0, n_pad, np.float32), tests)  # [n, F, n_train]
    else:
        prior_in = _put(np.broadcast_to(prior[None, :, None], (1, n_f, 1)), _replicated(mesh_))
    if x0 is None:
        theta0 = None
    else:
        theta0 = _put(_pad_axis(x0, 0, n_pad, np.float32), tests)  # [n, F, n_train]
    # Fewer rows than unknowns: X^T X is singular, the smallest eigenvalue of the normal matrix
    # is min(lam), and a small residual no longer means small coefficient errors. There the
    # columns must also certify a coefficient error bound (see `COEF_TOL`).
    underdetermined = int(x.shape[0]) < n_f * structure.n_train
    coef_tol = COEF_TOL if underdetermined and float(lam.min()) > 0 else 0.0
    with _x64():
        theta, rel, floor, eff, iters, rounds = _solve_device(
            mesh_,
            structure,
            x,
            y,
            jnp.asarray(lam),
            prior_in,
            theta0,
            jnp.float64(tol),
            jnp.float64(coef_tol),
            jnp.float32(inner_tol),
            jnp.int32(max_iter),
            block=block,
            use_x=bool(use_x),
            use_one=bool(use_one),
            max_rounds=int(max_rounds),
            per_coef=per_coef,
        )
        rel, floor, eff = _host(rel)[:n], _host(floor)[:n], _host(eff)[:n]
        iters, rounds = _host(iters), _host(rounds)
    if jax.process_count() > 1:
        theta = _host(theta)
    info = {
        "iterations": int(iters.max()),
        "rounds": int(rounds.max()),
        "rel_residual": np.asarray(rel, np.float64),
        "floor": np.asarray(floor, np.float64),
        "tol": np.asarray(eff, np.float64),
    }
    return theta[:n], info


# Test columns per block of the compiled solve: each block runs its own CG to completion, so its
# [rows, block] arrays stay near the cache; wider blocks amortise the gathers' index work. The
# width is the widest of BLOCK_WIDTHS whose f32 [rows, block] array fits BLOCK_BYTES (the
# narrowest otherwise), see `block_width`. Measured on the 2-core CPU (docs/solver.md): at 40,000
# rows 16 columns per block were ~2x faster per column-iteration than one block of 800 (and 3-10%
# faster than 32); at 200,000 rows 8 columns were ~1.3x faster than 32, and the compiled solve's
# scratch memory for a 64-column chunk fell from 434 to 104 MiB (about 17 [rows, block] arrays).
BLOCK_WIDTHS = (32, 16, 8)
BLOCK_BYTES = 4 << 20


def block_width(rows: int) -> int:
    """Test columns per solver block for a design of `rows` rows (see `BLOCK_BYTES`)."""
    for width in BLOCK_WIDTHS:
        if 4 * width * max(int(rows), 1) <= BLOCK_BYTES:
            return width
    return BLOCK_WIDTHS[-1]


def initialize_distributed() -> bool:
    """Joins a multi-process JAX job when the environment describes one (else does nothing).

    The same variables as `finetune run` (simfluence does not import finetune):
    ``SIMFLUENCE_COORDINATOR`` (``HOST:PORT`` of process 0), ``SIMFLUENCE_NUM_PROCESSES`` and
    ``SIMFLUENCE_PROCESS_ID``, all three; or ``SIMFLUENCE_DISTRIBUTED=1`` for JAX's automatic
    cluster detection (Cloud TPU, Slurm, Open MPI). Call it before any other JAX call; every
    process then loads the same runs and `solve` splits the test columns over the devices of
    all processes. Returns whether the distributed runtime is on.

    Raises:
        ValueError: only some of the three variables are set, or one is malformed.
    """
    global _DISTRIBUTED
    if _DISTRIBUTED is not None:
        return _DISTRIBUTED
    env = os.environ
    names = ("SIMFLUENCE_COORDINATOR", "SIMFLUENCE_NUM_PROCESSES", "SIMFLUENCE_PROCESS_ID")
    given = [n for n in names if env.get(n)]
    auto = env.get("SIMFLUENCE_DISTRIBUTED", "").strip().lower() in ("1", "true", "yes", "on")
    if given and len(given) < 3:
        missing = ", ".join(n for n in names if n not in given)
        raise ValueError(f"{', '.join(given)} set but {missing} not; set all three or none")
    if given:
        try:
            count, index = int(env[names[1]]), int(env[names[2]])
        except ValueError:
            raise ValueError(
                f"{names[1]}={env[names[1]]!r} and {names[2]}={env[names[2]]!r} must be "
                "integers; set them to the process count and this process's index"
            ) from None
        if not (count >= 1 and 0 <= index < count):
            raise ValueError(
                f"{names[2]}={index} is outside 0..{count - 1} ({names[1]}={count}); fix them"
            )
        _DISTRIBUTED = count > 1
        if _DISTRIBUTED:
            jax.distributed.initialize(
                coordinator_address=env[names[0]], num_processes=count, process_id=index
            )
    elif auto:
        jax.distributed.initialize()
        _DISTRIBUTED = True
    else:
        _DISTRIBUTED = False
    return _DISTRIBUTED


_DISTRIBUTED: bool | None = None


def mesh() -> jax.sharding.Mesh:
    """The 1-D mesh ("data",) over every device of every process (test columns split over it)."""
    devices = jax.devices()
    key = tuple(d.id for d in devices)
    if key not in _MESHES:
        _MESHES[key] = jax.make_mesh(
            (len(devices),),
            ("data",),
            devices=devices,
            axis_types=(jax.sharding.AxisType.Auto,),
        )
    return _MESHES[key]


_MESHES: dict[tuple, jax.sharding.Mesh] = {}


def _replicated(mesh_: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh_, P())


def _pad_axis(a, axis: int, size: int, dtype) -> np.ndarray | jax.Array:
    """`a` as `dtype`, zero-padded along `axis` to `size` (no copy when nothing changes)."""
    if isinstance(a, jax.Array):
        a = a.astype(dtype)
        pad = size - a.shape[axis]
        if pad == 0:
            return a
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, pad)
        return jnp.pad(a, widths)
    a = np.asarray(a, dtype)
    pad = size - a.shape[axis]
    if pad == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, pad)
    return np.pad(a, widths)


def _put(a, sharding: NamedSharding) -> jax.Array:
    """A host array (identical on every process) or a device array, placed with `sharding`."""
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def _host(a) -> np.ndarray:
    """A (possibly multi-host sharded) array as one host numpy array."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


def _solve_device(
    mesh_, structure, x, y, lam, prior, theta0, tol, coef_tol, inner_tol, max_iter, **static
):
    """Runs `_solve_sharded` with the structure's arrays replicated on `mesh_`."""
    rep = _replicated(mesh_)
    args = [structure.ids, structure.count_sq, structure.rep_rows, structure.rep_ids]
    args += [structure.rep_extra, structure.w]
    args = [None if a is None else jax.device_put(a, rep) for a in args]
    return _solve_sharded(
        mesh_,
        *args,
        x,
        y,
        lam,
        prior,
        theta0,
        tol,
        coef_tol,
        inner_tol,
        max_iter,
        n_train=structure.n_train,
        **static,
    )


@partial(
    jax.jit,
    static_argnames=("mesh_", "n_train", "block", "use_x", "use_one", "max_rounds", "per_coef"),
)
def _solve_sharded(
    mesh_,
    ids,
    count_sq,
    rep_rows,
    rep_ids,
    rep_extra,
    w,
    x,
    y,
    lam,
    prior,
    theta0,
    tol,
    coef_tol,
    inner_tol,
    max_iter,
    *,
    n_train,
    block,
    use_x,
    use_one,
    max_rounds,
    per_coef,
):
    """The whole solve on every device: x, y [rows, n] split by columns over "data"."""
    rep, cols, tests = P(), P(None, "data"), P("data")

    tols = (tol, coef_tol)

    def local(ids, count_sq, rep_rows, rep_ids, rep_extra, w, x, y, lam, prior, theta0):
        rows, n = x.shape
        nb = n // block
        kw = dict(n_train=n_train, use_x=use_x, use_one=use_one)
        structure = (ids, count_sq, rep_rows, rep_ids, rep_extra, w)

        def to_blocks(a):  # [n, F, n_train] -> [nb, n_train, F, block]
            f = a.shape[1]
            return jnp.transpose(a.reshape(nb, block, f, n_train), (0, 3, 2, 1))

        # Each block's columns are sliced out when it runs (no second copy of the whole chunk).
        mapped = [jnp.arange(nb, dtype=jnp.int32)]
        mapped.append(to_blocks(prior) if per_coef else None)
        mapped.append(None if theta0 is None else to_blocks(theta0))

        def one(args):
            k, pk, tk = args
            xk = jax.lax.dynamic_slice_in_dim(x, k * block, block, axis=1)  # [rows, block]
            yk = jax.lax.dynamic_slice_in_dim(y, k * block, block, axis=1)
            pk = prior if pk is None else pk  # [1, F, 1] or [n_train, F, block]
            return _solve_block(
                structure, xk, yk, lam, pk, tk, *tols, inner_tol, max_iter, max_rounds, **kw
            )

        theta, rel, floor, eff, iters, rounds = jax.lax.map(one, mapped)
        theta = jnp.transpose(theta, (0, 3, 2, 1)).reshape(n, -1, n_train)  # [n, F, n_train]
        return theta, rel.reshape(n), floor.reshape(n), eff.reshape(n), iters, rounds

    specs = (rep, rep, rep, rep, rep, rep, cols, cols, rep, tests if per_coef else rep)
    specs += (tests,)
    return jax.shard_map(
        local,
        mesh=mesh_,
        in_specs=specs,
        out_specs=(tests, tests, tests, tests, tests, tests),
        check_vma=False,
    )(ids, count_sq, rep_rows, rep_ids, rep_extra, w, x, y, lam, prior, theta0)


def _solve_block(
    structure, x, y, lam, prior, theta0, tol, coef_tol, inner_tol, max_iter, max_rounds, **kw
):
    """Iterative refinement of one block of test columns, all on the device.

    x, y: f32 [rows, block]; prior: f32 [1, F, 1] or [n_train, F, block]; theta0: None (start
    from the prior) or f32 [n_train, F, block]. Returns (theta f32 [n_train, F, block], rel f64
    [block], floor f64 [block], CG iterations [1], rounds [1]).
    """
    ids, count_sq, rep_rows, rep_ids, rep_extra, w = structure
    n_train, use_x, use_one = kw["n_train"], kw["use_x"], kw["use_one"]
    n_f = int(use_x) + int(use_one)
    block = x.shape[1]
    if theta0 is None:
        theta0 = jnp.broadcast_to(prior, (n_train, n_f, block)).astype(jnp.float32)
    pblocks = _blocks_impl(ids, count_sq, rep_rows, rep_ids, rep_extra, x, w, n_train=n_train)
    # The starting residual and ||rhs|| = ||X^T y + lam prior|| (which normalises the residuals)
    # in one float32 pass; every later residual is float64. The first round always runs.
    r, rhs_sq = _start_impl(ids, x, w, y, lam, prior, theta0, **kw)
    rhs_norm = jnp.sqrt(jnp.maximum(rhs_sq.astype(jnp.float64), 1e-300))
    rel = jnp.full((block,), jnp.inf, jnp.float64)
    lam_min = jnp.min(lam).astype(jnp.float64)

    def column_tol(theta):
        # Underdetermined (coef_tol > 0): also ||theta - theta*|| <= ||r|| / lam_min <=
        # coef_tol ||theta||, i.e. rel <= coef_tol lam_min ||theta|| / ||rhs||.
        norm = jnp.sqrt(jnp.sum(jnp.square(theta.astype(jnp.float64)), axis=(0, 1)))
        bound = coef_tol * lam_min * norm / rhs_norm
        return jnp.where(coef_tol > 0, jnp.minimum(tol, bound), tol)

    def cond(state):
        rounds, _, _, rel, _, eff = state
        # A NaN residual is not converged (as on the host before): keep refining to the cap.
        return (rounds < max_rounds) & ~jnp.all(rel <= eff)

    def body(state):
        rounds, theta, r, rel, iters, eff = state
        # Ask the float32 round for just the reduction still needed (it cannot go below about
        # 1e-6 usefully); the first round thus does most of the work, later ones a few steps.
        need = jnp.min(eff / rel)
        target = jnp.clip(0.3 * need, inner_tol, 0.5).astype(jnp.float32)
        d, it = _pcg_impl(ids, x, w, r.astype(jnp.float32), lam, pblocks, target, max_iter, **kw)
        theta = theta + d
        r, r_sq = _residual_impl(ids, x, w, y, lam, prior, theta, wide=True, **kw)
        rel = jnp.sqrt(r_sq) / rhs_norm
        return rounds + 1, theta, r, rel, iters + it, column_tol(theta)

    eff0 = jnp.full((block,), tol, jnp.float64)
    state = (jnp.int32(0), theta0, r.astype(jnp.float64), rel, jnp.int32(0), eff0)
    rounds, theta, _, rel, iters, eff = jax.lax.while_loop(cond, body, state)
    g_abs = _abs_normal_norm_impl(ids, x, w, lam, theta, **kw)
    floor = U32 * jnp.sqrt(g_abs.astype(jnp.float64)) / rhs_norm
    return theta, rel, floor, eff, iters[None], rounds[None]


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


def _blocks_impl(ids, count_sq, rep_rows, rep_ids, rep_extra, x, w, *, n_train):
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


def _residual_impl(ids, x, w, y, lam, prior, theta, *, n_train, use_x, use_one, wide=False):
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


def _abs_normal_norm_impl(ids, x, w, lam, theta, *, n_train, use_x, use_one):
    """||(|X|^T |X| + diag(lam)) |theta| ||^2 per test column (float32: every term is >= 0, so
    there is no cancellation and the relative error stays near 1e-6, plenty for a bound).

    Rounding theta to float32 moves each coefficient by at most u |theta_i|, so the residual
    moves by at most u times this norm (X's entries are m x and m w, m >= 0).
    """
    x = jnp.abs(x.astype(jnp.float32))
    w = None if w is None else jnp.abs(w.astype(jnp.float32))
    v = jnp.abs(theta.astype(jnp.float32))  # [n_train, F, n]
    s = _forward(v, ids, x, w, use_x, use_one)  # [rows, n]
    g = _transpose(s, ids, x, w, n_train, use_x, use_one)
    g = g + lam.astype(jnp.float32)[None, :, None] * v
    return jnp.sum(g * g, axis=(0, 1))


def _start_impl(ids, x, w, y, lam, prior, theta, *, n_train, use_x, use_one):
    """float32 residual at `theta` and ||X^T y + lam prior||^2, in one transpose pass.

    Returns (r f32 [n_train, F, n], ||rhs||^2 f32 [n]); `prior` is [1, F, 1] or [n_train, F, n].
    """
    n = x.shape[1]
    s = y - _forward(theta, ids, x, w, use_x, use_one)  # [rows, n]
    both = _transpose(
        jnp.concatenate([y, s], axis=1), ids, jnp.tile(x, (1, 2)), w, n_train, use_x, use_one
    )  # [n_train, F, 2 n]
    lam_b = lam[None, :, None]
    rhs = both[:, :, :n] + lam_b * prior
    r = both[:, :, n:] + lam_b * (prior - theta)
    return r, jnp.sum(rhs * rhs, axis=(0, 1))


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


def _pcg_impl(ids, x, w, rhs, lam, blocks, tol, max_iter, *, n_train, use_x, use_one):
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
