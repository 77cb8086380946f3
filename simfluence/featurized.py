"""Featurized Simfluence: influence tables from example features, for examples never seen.

Simfluence-Linear learns a free A_i and B_i for every (test example, training example) pair, so
it cannot say anything about a training example no fitting run contains, nor about a test
example it was not fitted on. The featurized variants replace the free table by a bilinear form
of fixed example features, phi(i) for training example i and psi(z) for test example z:

    A(i, z) = a0 + phi(i)^T W_A psi(z),    B(i, z) = phi(i)^T W_B psi(z),

with a0 = 1/batch (an example then leaves the loss unchanged) and W_A, W_B [d_phi, d_psi]
shared by every test example. ``linear-feat`` fits both; ``additive-feat`` fixes alpha = 1
(W_A = 0). The rollout is Simfluence's: the tables A, B [n_test, n_train] built from the
features are ordinary `simulators.Simulator` tables, so any curriculum over examples with
features, and any test example with features, can be simulated.

Fitting (teacher forcing, as in `simulators.fit`) minimises, over every fitting row (run r,
step t) and fitted test example j, with Phi_t = sum_{i in c_t} phi(i) (repeats counted),

    sum_{r,t,j} (L_t - L_{t-1} - Phi_t^T W_A psi_j L_{t-1} - Phi_t^T W_B psi_j)^2
        + l2_a ||W_A||_F^2 + l2_b ||W_B||_F^2.

This is linear least squares in theta = [vec W_A; vec W_B] (2 d_phi d_psi unknowns). Its
normal equations are formed in float64 with einsums over rows and test examples,

    G_AA = sum_j M_xx[j] (x) psi_j psi_j^T,  M_xx[j] = sum_rows L_{t-1,j}^2 Phi_t Phi_t^T

(and alike for the AB and BB blocks), and solved by a dense Cholesky factorisation. With the
dimensions the validation search allows (d <= 12 plus a constant, so at most 2 * 13 * 13 =
338 unknowns) a dense solve is exact and takes well under a second; the per-pair CG solver of
`simfluence._solvers` is built for the opposite shape (few features, n_test * n_train pairs).

Optionally a free per-pair residual regularised towards 0 (strength ``l2_r``) is added for the
seen test examples: `with_residual` fits Simfluence-Linear's per-pair tables with the ridge
centred on the featurized tables (the exact solver of `simfluence._solvers`, per-coefficient
prior). This is a two-stage fit (W first, then the residual given W), not the joint minimum.

Features are reduced (`Basis`: centre, PCA to ``dim`` components, unit variance, and a
constant 1 appended so W holds intercepts and main effects) to a dimension chosen on validation
runs together with the lambdas (`select`).

References:
    Guu et al. 2023, Simfluence, section 6 (featurized simulators as future work).
    https://arxiv.org/abs/2303.08114
    Chai et al. 2024, GPTfluence. https://arxiv.org/abs/2404.07840
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from jaxtyping import ArrayLike, Float, Int

from simfluence import _solvers, simulators

FEAT_VARIANTS = ("linear-feat", "additive-feat")
# Validation grid defaults: the reduced feature dimension and one log grid for the lambdas.
DEFAULT_DIMS = (1, 2, 4, 8, 12)
DEFAULT_GRID = (1e-4, 1e-2, 1.0, 100.0, 1e4, 1e6)
# Residual strengths searched by `select_residual` (inf: no residual).
DEFAULT_RESIDUAL_GRID = (1e-2, 1e-1, 1.0, 10.0, 100.0, math.inf)
MAX_UNKNOWNS = 2 * 65 * 65  # dense normal equations beyond this are refused (memory, time)


class FeaturizedError(ValueError):
    """Bad input to a featurized fit (shapes, non-finite values, unknown variant)."""


@dataclasses.dataclass(frozen=True)
class Basis:
    """A feature reduction: centre, project on principal axes, scale to unit variance, add 1.

    Attributes:
        mean: f64 [d_raw] the centre.
        components: f64 [d_raw, k] principal axes (columns), k <= dim.
        scale: f64 [k] standard deviation of each component on the data it was fitted on.
    """

    mean: np.ndarray
    components: np.ndarray
    scale: np.ndarray

    @property
    def dim(self) -> int:
        """Output dimension: the components plus the constant."""
        return int(self.components.shape[1]) + 1

    @staticmethod
    def fit(feats: Float[ArrayLike, "n d_raw"], dim: int, _svd=None) -> Basis:
        """Principal axes of `feats` (unsupervised: features only, no losses).

        Args:
            feats: f32 [n, d_raw] raw features.
            dim: number of components kept (capped at min(n - 1, d_raw)); 0 keeps only the
                constant.

        Returns:
            The `Basis`.
        """
        x = np.asarray(feats, np.float64)
        if x.ndim != 2 or not np.isfinite(x).all():
            raise FeaturizedError(
                f"features have shape {x.shape} or non-finite values; expected finite [n, d]"
            )
        mean = x.mean(0)
        k = max(0, min(int(dim), x.shape[0] - 1, x.shape[1]))
        if k == 0:
            return Basis(mean, np.zeros((x.shape[1], 0)), np.zeros(0))
        _, s, vt = _svd if _svd is not None else np.linalg.svd(x - mean, full_matrices=False)
        keep = s[:k] > 1e-10 * max(s[0], 1e-300)
        comp = vt[:k][keep].T
        scale = s[:k][keep] / math.sqrt(max(x.shape[0] - 1, 1))
        # A deterministic sign per axis (largest |loading| positive): SVD signs are arbitrary.
        sign = np.sign(comp[np.abs(comp).argmax(0), np.arange(comp.shape[1])])
        return Basis(mean, comp * np.where(sign == 0, 1.0, sign), scale)

    def __call__(self, feats: Float[ArrayLike, "n d_raw"]) -> Float[np.ndarray, "n k+1"]:
        """Reduced features [n, k + 1] (last column the constant 1)."""
        z = (np.asarray(feats, np.float64) - self.mean) @ self.components / self.scale
        return np.concatenate([z, np.ones((z.shape[0], 1))], axis=1)


@dataclasses.dataclass(frozen=True)
class FeatSimulator:
    """A fitted featurized simulator.

    Attributes:
        W_A: f64 [d_phi, d_psi] (zeros for additive-feat).
        W_B: f64 [d_phi, d_psi].
        variant: "linear-feat" or "additive-feat".
        l2_a: ridge strength on W_A (None for additive-feat).
        l2_b: ridge strength on W_B.
        batch: batch size of the fitting runs (A sits near 1/batch).
        lr_max: None (schedule-free), or eta_max of the fitting runs: the schedule-aware fit
            scales every step's change by w_t = eta_t / eta_max (as `simfluence.scheduled`),
            and its tables are "linear-lr" / "additive-lr" simulators.
    """

    W_A: np.ndarray
    W_B: np.ndarray
    variant: str
    l2_a: float | None
    l2_b: float
    batch: int
    lr_max: float | None = None

    def tables(
        self, phi: Float[ArrayLike, "n_train d_phi"], psi: Float[ArrayLike, "n_test d_psi"]
    ) -> simulators.Simulator:
        """The Simfluence tables of these examples, as a `simulators.Simulator`.

        Args:
            phi: f [n_train, d_phi] features of the training examples (any, seen or not).
            psi: f [n_test, d_psi] features of the test examples (any, fitted or not).

        Returns:
            A `simulators.Simulator` (variant "linear" or "additive"; "linear-lr" or
            "additive-lr" when schedule-aware) with A, B f32 [n_test, n_train]; roll it out
            with `simulators.simulate` / `simulate_many` (with the run's lr when
            schedule-aware).
        """
        phi = _check_feats(phi, "phi", self.W_B.shape[0])
        psi = _check_feats(psi, "psi", self.W_B.shape[1])
        a0 = 1.0 / self.batch
        B = psi @ self.W_B.T @ phi.T  # [n_test, n_train]
        if self.variant == "additive-feat":
            A = np.full(B.shape, a0)
        else:
            A = a0 + psi @ self.W_A.T @ phi.T
        return simulators.Simulator(
            A=np.asarray(A, np.float32),
            B=np.asarray(B, np.float32),
            variant=_per_pair(self.variant, self.lr_max is not None),
            l2_a=float(self.l2_a or 0.0),
            l2_b=float(self.l2_b),
            a_prior=a0,
            batch=self.batch,
            lr_max=self.lr_max,
        )


def _per_pair(variant: str, scheduled: bool) -> str:
    """The per-pair simulator variant whose tables a featurized variant fills."""
    base = "additive" if variant == "additive-feat" else "linear"
    return f"{base}-lr" if scheduled else base


def _check_feats(x, name: str, dim: int | None = None) -> np.ndarray:
    arr = np.asarray(x, np.float64)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        want = f"[n, {dim}]" if dim is not None else "[n, d]"
        raise FeaturizedError(f"{name} has shape {arr.shape}; expected {want}")
    if not np.isfinite(arr).all():
        raise FeaturizedError(f"{name} contains NaN or inf; recompute the features")
    return arr


def _check_variant(variant: str) -> None:
    if variant not in FEAT_VARIANTS:
        raise FeaturizedError(
            f"unknown featurized variant {variant!r}; use one of {', '.join(FEAT_VARIANTS)}"
        )


def _rows(curricula, losses, phi, lrs=None, lr_max=None):
    """Teacher-forced rows: x = L_{t-1} [rows, n], y = L_t - L_{t-1} [rows, n],
    Phi [rows, d_phi] (sum of the batch's phi, repeats counted; times w_t = lr_t / lr_max
    when schedule-aware)."""
    xs, ys, ps = [], [], []
    for r, (c, loss) in enumerate(zip(curricula, losses, strict=True)):
        loss = np.asarray(loss, np.float64)
        c = np.asarray(c)
        xs.append(loss[:-1])
        ys.append(loss[1:] - loss[:-1])
        big_phi = phi[c].sum(axis=1)  # [T, d_phi]
        if lrs is not None:
            big_phi = big_phi * (np.asarray(lrs[r], np.float64) / lr_max)[:, None]
        ps.append(big_phi)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ps)


def normal_equations(
    curricula: Sequence[Int[ArrayLike, "steps batch"]],
    losses: Sequence[Float[ArrayLike, "steps+1 n_test"]],
    phi: Float[ArrayLike, "n_train d_phi"],
    psi: Float[ArrayLike, "n_test d_psi"],
    variant: str = "linear-feat",
    lrs: Sequence[Float[ArrayLike, " steps"]] | None = None,
    lr_max: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """X^T X and X^T y of the featurized regression, in float64, without lambdas.

    Args:
        curricula: one int [T_r, batch] per fitting run (training-pool ids).
        losses: one f [T_r + 1, n_test] per fitting run.
        phi: f [n_train, d_phi] training features.
        psi: f [n_test, d_psi] features of the test examples in `losses`' columns.
        variant: "linear-feat" (unknowns [vec W_A; vec W_B]) or "additive-feat" (vec W_B).
        lrs: None, or one float [T_r] per run (schedule-aware: each row times lr_t / lr_max).
        lr_max: eta_max (required with lrs).

    Returns:
        (G f64 [D, D], rhs f64 [D]) with D = 2 d_phi d_psi (linear) or d_phi d_psi; vec is
        row-major (W[p, q] at p * d_psi + q).
    """
    _check_variant(variant)
    phi = _check_feats(phi, "phi")
    psi = _check_feats(psi, "psi")
    if lrs is not None and lr_max is None:
        lr_max = _lr_max(lrs, curricula)
    x, y, P = _rows(curricula, losses, phi, lrs, lr_max)
    if x.shape[1] != psi.shape[0]:
        raise FeaturizedError(
            f"losses track {x.shape[1]} test examples but psi has {psi.shape[0]} rows"
        )
    dp, dq = phi.shape[1], psi.shape[1]
    d1 = dp * dq

    def block(wt):  # wt [rows, n] row weights per test -> [d1, d1]
        m = np.einsum("rj,rp,rq->jpq", wt, P, P, optimize=True)  # [n, dp, dp]
        return np.einsum("jpq,ja,jb->paqb", m, psi, psi, optimize=True).reshape(d1, d1)

    rhs_b = np.einsum("rj,rp,ja->pa", y, P, psi, optimize=True).reshape(d1)
    g_bb = np.kron(P.T @ P, psi.T @ psi)  # the B rows do not depend on the loss
    if variant == "additive-feat":
        return g_bb, rhs_b
    g_aa = block(x * x)
    g_ab = block(x)
    rhs_a = np.einsum("rj,rp,ja->pa", x * y, P, psi, optimize=True).reshape(d1)
    g = np.block([[g_aa, g_ab], [g_ab.T, g_bb]])
    return g, np.concatenate([rhs_a, rhs_b])


def _solve(g, rhs, lam):
    """(G + diag(lam)) theta = rhs by Cholesky (lstsq when G + diag(lam) is singular)."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve

    m = g + np.diag(lam)
    try:
        return cho_solve(cho_factor(m, check_finite=False), rhs, check_finite=False)
    except (LinAlgError, np.linalg.LinAlgError):
        return np.linalg.lstsq(m, rhs, rcond=None)[0]


def _batch_of(curricula) -> int:
    batches = {int(np.asarray(c).shape[1]) for c in curricula}
    if len(batches) != 1:
        raise FeaturizedError(f"fitting runs have batch sizes {sorted(batches)}; use one")
    return batches.pop()


def _lam_vector(variant, d1, l2_a, l2_b) -> np.ndarray:
    if variant == "additive-feat":
        return np.full(d1, l2_b)
    return np.concatenate([np.full(d1, l2_a), np.full(d1, l2_b)])


def fit(
    curricula: Sequence[Int[ArrayLike, "steps batch"]],
    losses: Sequence[Float[ArrayLike, "steps+1 n_test"]],
    phi: Float[ArrayLike, "n_train d_phi"],
    psi: Float[ArrayLike, "n_test d_psi"],
    *,
    variant: str = "linear-feat",
    l2_a: float = 1.0,
    l2_b: float = 1.0,
    lrs: Sequence[Float[ArrayLike, " steps"]] | None = None,
    _normal: tuple[np.ndarray, np.ndarray] | None = None,
) -> FeatSimulator:
    """Fits W_A, W_B exactly (dense normal equations) on teacher-forced fitting runs.

    Minimises sum (L_t - L_{t-1} - Phi_t^T W_A psi_j L_{t-1} - Phi_t^T W_B psi_j)^2
    + l2_a ||W_A||^2 + l2_b ||W_B||^2 over every step of every fitting run and every test
    example (column of `losses`), i.e. A(i, z) - 1/batch = phi(i)^T W_A psi(z).

    Args:
        curricula: one int [T_r, batch] per fitting run, ids into the rows of `phi`.
        losses: one f [T_r + 1, n_test] per fitting run.
        phi: f [n_train, d_phi] training-example features (include a constant column for
            intercepts; `Basis` does).
        psi: f [n_test, d_psi] features of the test examples in the columns of `losses`.
        variant: "linear-feat" or "additive-feat" (W_A = 0, l2_a ignored).
        l2_a: ridge strength on W_A (>= 0).
        l2_b: ridge strength on W_B (>= 0).
        lrs: None (schedule-free), or one float [T_r] per run (the runs' lr.npy): the
            schedule-aware fit, every step's predicted change times w_t = lr_t / max lr (as
            `simfluence.scheduled`'s linear-lr; the features then give a and b per unit w).

    Returns:
        A `FeatSimulator`.

    Raises:
        FeaturizedError: bad shapes, non-finite inputs, negative lambdas, too many unknowns.

    References:
        Guu et al. 2023, Simfluence. https://arxiv.org/abs/2303.08114
    """
    _check_variant(variant)
    for name, v in (("l2_a", l2_a), ("l2_b", l2_b)):
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise FeaturizedError(f"{name}={v!r} must be a finite number >= 0")
    phi = _check_feats(phi, "phi")
    psi = _check_feats(psi, "psi")
    curricula, losses = list(curricula), list(losses)
    if not curricula or len(curricula) != len(losses):
        raise FeaturizedError(
            f"{len(curricula)} curricula and {len(losses)} loss arrays; pass one of each per run"
        )
    for r, (c, loss) in enumerate(zip(curricula, losses, strict=True)):
        c, loss = np.asarray(c), np.asarray(loss)
        if c.ndim != 2 or loss.shape != (c.shape[0] + 1, psi.shape[0]):
            raise FeaturizedError(
                f"fitting run {r}: curriculum {c.shape} and losses {loss.shape}; expected "
                f"[T, batch] and [T + 1, {psi.shape[0]}]"
            )
        if c.size and (c.min() < 0 or c.max() >= phi.shape[0]):
            raise FeaturizedError(
                f"fitting run {r}: ids outside 0..{phi.shape[0] - 1} (rows of phi)"
            )
        if not np.isfinite(loss).all():
            raise FeaturizedError(f"fitting run {r}: non-finite losses; drop or repair it")
    d1 = phi.shape[1] * psi.shape[1]
    n_unknown = d1 * (1 if variant == "additive-feat" else 2)
    if n_unknown > MAX_UNKNOWNS:
        raise FeaturizedError(
            f"{n_unknown} unknowns (d_phi={phi.shape[1]}, d_psi={psi.shape[1]}) exceed "
            f"{MAX_UNKNOWNS}; reduce the features (Basis.fit with a smaller dim)"
        )
    batch = _batch_of(curricula)
    lr_max = _lr_max(lrs, curricula)
    g, rhs = (
        _normal
        if _normal is not None
        else normal_equations(curricula, losses, phi, psi, variant, lrs, lr_max)
    )
    theta = _solve(g, rhs, _lam_vector(variant, d1, float(l2_a), float(l2_b)))
    shape = (phi.shape[1], psi.shape[1])
    if variant == "additive-feat":
        W_A, W_B = np.zeros(shape), theta.reshape(shape)
    else:
        W_A, W_B = theta[:d1].reshape(shape), theta[d1:].reshape(shape)
    return FeatSimulator(
        W_A=W_A,
        W_B=W_B,
        variant=variant,
        l2_a=None if variant == "additive-feat" else float(l2_a),
        l2_b=float(l2_b),
        batch=batch,
        lr_max=lr_max,
    )


def _lr_max(lrs, curricula) -> float | None:
    if lrs is None:
        return None
    from simfluence import scheduled

    lrs = scheduled.check_lrs(lrs, [np.asarray(c).shape[0] for c in curricula], "featurized")
    return scheduled.lr_max_of(lrs, "featurized")


def with_residual(
    fsim: FeatSimulator,
    curricula: Sequence[Int[ArrayLike, "steps batch"]],
    losses: Sequence[Float[ArrayLike, "steps+1 n_test"]],
    phi: Float[ArrayLike, "n_train d_phi"],
    psi: Float[ArrayLike, "n_test d_psi"],
    l2_r: float,
    lrs: Sequence[Float[ArrayLike, " steps"]] | None = None,
) -> simulators.Simulator:
    """Adds a free per-pair residual, ridge-regularised towards 0, for the fitted test examples.

    Given W, minimises over the per-pair tables A, B [n_test, n_train]
    sum (L_t - alpha L_{t-1} - beta)^2 + l2_r (||A - A_feat||^2 + ||B - B_feat||^2), i.e.
    Simfluence-Linear with its ridge centred on the featurized tables (for additive-feat, only
    B). Pairs no fitting run contains keep the featurized value.

    Args:
        fsim: the fitted featurized simulator.
        curricula, losses: the fitting runs (as in `fit`).
        phi: training features; psi: features of the test examples of `losses`.
        l2_r: residual ridge strength (> 0; math.inf returns the featurized tables).
        lrs: the fitting runs' learning rates; required when `fsim` is schedule-aware.

    Returns:
        A `simulators.Simulator` for these test examples.
    """
    base = fsim.tables(phi, psi)
    if math.isinf(l2_r):
        return base
    if not (math.isfinite(l2_r) and l2_r > 0):
        raise FeaturizedError(f"l2_r={l2_r!r} must be > 0 (inf: no residual)")
    additive = fsim.variant == "additive-feat"
    variant = _per_pair(fsim.variant, fsim.lr_max is not None)
    if (lrs is None) != (fsim.lr_max is None):
        raise FeaturizedError("pass lrs exactly when the featurized fit was schedule-aware")
    problem = simulators._prepare(curricula, losses, phi.shape[0], variant, None, lrs=lrs)
    a_ref = np.float32(problem.a_ref)
    parts = [] if additive else [np.asarray(base.A) - a_ref]
    parts.append(np.asarray(base.B))
    prior_all = np.stack(parts, axis=1).astype(np.float32)  # [n_test, F, n_train]
    lam = np.full(len(parts), l2_r, np.float32)
    out = np.zeros_like(prior_all)
    for j0, j1 in problem.chunks:
        x, y = problem.rows(j0, j1)
        prior = simulators._pad_theta(prior_all[j0:j1], problem.chunk_size)
        theta, _ = _solvers.solve(
            problem.structure, x, y, lam, prior, problem.use_x, problem.use_one
        )
        out[j0:j1] = np.asarray(theta)[: j1 - j0]
    return problem.to_simulator(out, l2_r, l2_r)


def _rollout_np(sim: simulators.Simulator, curriculum, l0, lr=None) -> np.ndarray:
    """`simulators.simulate` in float64 numpy (validation search: no dispatch per candidate).

    L_t = L_{t-1} + w_t sum_{i in c_t} ((A_i - 1/b) L_{t-1} + B_i), with w_t = 1 for the
    schedule-free variants (then 1 + sum (A_i - 1/b) = sum A_i) and lr_t / lr_max otherwise;
    the additive variants have A = 1/b. Returns f64 [T + 1, n_test].
    """
    cur = np.asarray(curriculum)
    b = cur.shape[1]
    a = np.asarray(sim.A, np.float64) - 1.0 / b  # [n_test, n_train]
    bb = np.asarray(sim.B, np.float64)
    scheduled = sim.variant.endswith("-lr")
    w = np.asarray(lr, np.float64) / sim.lr_max if scheduled else np.ones(cur.shape[0])
    additive = sim.variant.startswith("additive")
    sa = a[:, cur].sum(-1)  # [n_test, T]
    sb = bb[:, cur].sum(-1)  # [n_test, T]
    out = np.empty((cur.shape[0] + 1, a.shape[0]))
    out[0] = np.asarray(l0, np.float64)
    for t in range(cur.shape[0]):  # T sequential affine steps of [n_test] vectors
        d = sb[:, t] if additive else sa[:, t] * out[t] + sb[:, t]
        out[t + 1] = out[t] + w[t] * d
    return out


def _valid_mse(sim: simulators.Simulator, curricula, losses, lrs=None) -> float:
    """Mean over runs of the all-steps MSE (steps 1..T, every test) of rollouts."""
    errs = []
    for r, (c, loss) in enumerate(zip(curricula, losses, strict=True)):
        loss = np.asarray(loss, np.float64)
        lr = None if lrs is None else lrs[r]
        pred = _rollout_np(sim, c, loss[0], lr)
        errs.append(float(np.mean((pred[1:] - loss[1:]) ** 2)))
    out = float(np.mean(errs))
    return out if math.isfinite(out) else math.inf


def select(
    fit_curricula: Sequence[Int[ArrayLike, "steps batch"]],
    fit_losses: Sequence[Float[ArrayLike, "steps+1 n_fit_test"]],
    valid_curricula: Sequence[Int[ArrayLike, "steps batch"]],
    valid_losses: Sequence[Float[ArrayLike, "steps+1 n_valid_test"]],
    train_feats: Float[ArrayLike, "n_train d_raw"],
    fit_test_feats: Float[ArrayLike, "n_fit_test d_raw2"],
    valid_test_feats: Float[ArrayLike, "n_valid_test d_raw2"] | None = None,
    *,
    variant: str = "linear-feat",
    dims: Sequence[int] = DEFAULT_DIMS,
    grid: Sequence[float] = DEFAULT_GRID,
    basis_train: Float[ArrayLike, "n d_raw"] | None = None,
    basis_test: Float[ArrayLike, "m d_raw2"] | None = None,
    fit_lrs: Sequence[Float[ArrayLike, " steps"]] | None = None,
    valid_lrs: Sequence[Float[ArrayLike, " steps"]] | None = None,
) -> tuple[dict, list[dict]]:
    """Chooses the feature dimension and the lambdas by all-steps MSE on validation runs.

    For each dim, phi = Basis(dim) of the training features and psi = Basis(dim) of the test
    features; the normal equations are formed once per dim and solved for every lambda pair
    (product grid; l2_b only for additive-feat). Every candidate is rolled out on the
    validation runs. With `valid_test_feats` the validation runs' losses are of other test
    examples than the fitting ones (choosing for unseen test examples); else of the same.

    Args:
        fit_curricula, fit_losses: fitting runs (losses of the fitted test examples).
        valid_curricula, valid_losses: validation runs.
        train_feats: f [n_train, d_raw] raw training features (rows = pool ids).
        fit_test_feats: f [n_fit_test, d] raw features of the fitted test examples.
        valid_test_feats: raw features of the validation losses' test examples (None: same
            as the fitted ones).
        variant: "linear-feat" or "additive-feat".
        dims: reduced dimensions to try.
        grid: lambda values (one log grid for each lambda).
        basis_train, basis_test: the features the PCA bases are fitted on (default: the
            training and the fitted test features). Unsupervised: no losses are used.
        fit_lrs, valid_lrs: the runs' learning rates for the schedule-aware fit (both or
            neither).

    Returns:
        (best, table): best = {"dim", "l2_a", "l2_b", "valid_mse"}, table = every candidate.
    """
    _check_variant(variant)
    train_feats = _check_feats(train_feats, "training features")
    fit_test_feats = _check_feats(fit_test_feats, "test features")
    vt = fit_test_feats if valid_test_feats is None else _check_feats(valid_test_feats, "psi")
    bt = train_feats if basis_train is None else basis_train
    bs = fit_test_feats if basis_test is None else basis_test
    table = []
    # One SVD per side; each dim keeps its leading axes.
    svd_t = np.linalg.svd(np.asarray(bt, np.float64) - np.mean(bt, 0), full_matrices=False)
    svd_s = np.linalg.svd(np.asarray(bs, np.float64) - np.mean(bs, 0), full_matrices=False)
    for dim in sorted(set(int(d) for d in dims)):
        bphi, bpsi = Basis.fit(bt, dim, svd_t), Basis.fit(bs, dim, svd_s)
        phi, psi, psi_v = bphi(train_feats), bpsi(fit_test_feats), bpsi(vt)
        lr_max = _lr_max(fit_lrs, fit_curricula)
        normal = normal_equations(fit_curricula, fit_losses, phi, psi, variant, fit_lrs, lr_max)
        pairs = (
            [(None, b) for b in grid]
            if variant == "additive-feat"
            else [(a, b) for a in grid for b in grid]
        )
        for la, lb in pairs:
            fsim = fit(
                fit_curricula,
                fit_losses,
                phi,
                psi,
                variant=variant,
                l2_a=la or 0.0,
                l2_b=lb,
                lrs=fit_lrs,
                _normal=normal,
            )
            mse = _valid_mse(fsim.tables(phi, psi_v), valid_curricula, valid_losses, valid_lrs)
            table.append({"dim": dim, "l2_a": la, "l2_b": lb, "valid_mse": mse})
    best = min(table, key=lambda e: (e["valid_mse"], -e["l2_b"], -(e["l2_a"] or 0), e["dim"]))
    return dict(best), table


def fit_runs(
    fit_runs: Sequence,
    valid_runs: Sequence,
    feats: dict,
    *,
    variant: str = "linear-feat",
    dims: Sequence[int] = DEFAULT_DIMS,
    grid: Sequence[float] = DEFAULT_GRID,
) -> tuple[simulators.Simulator, dict]:
    """Chooses dim and lambdas on validation runs and fits on every tracked test example.

    Schedule-aware when every run has its learning rates (`runlog.Run.lr`). The tables cover
    the whole pool, examples no fitting run contains included (their features decide).

    Args:
        fit_runs: the fitting runs (`runlog.Run`).
        valid_runs: the validation runs (at least one).
        feats: `runlog.read_features` output (pool and test features).
        variant: "linear-feat" or "additive-feat".
        dims, grid: the validation search.

    Returns:
        (the per-pair `simulators.Simulator` of the tables, the selection dict).
    """
    _check_variant(variant)
    if not valid_runs:
        raise FeaturizedError(
            f"{variant} chooses its feature size and lambdas on validation runs; give some"
        )
    every = [*fit_runs, *valid_runs]
    aware = all(r.lr is not None for r in every)
    flr = [r.lr for r in fit_runs] if aware else None
    vlr = [r.lr for r in valid_runs] if aware else None
    fc, fl = [r.curriculum for r in fit_runs], [r.losses for r in fit_runs]
    best, table = select(
        fc,
        fl,
        [r.curriculum for r in valid_runs],
        [r.losses for r in valid_runs],
        feats["pool"],
        feats["test"],
        variant=variant,
        dims=dims,
        grid=grid,
        fit_lrs=flr,
        valid_lrs=vlr,
    )
    bphi, bpsi = Basis.fit(feats["pool"], best["dim"]), Basis.fit(feats["test"], best["dim"])
    phi, psi = bphi(feats["pool"]), bpsi(feats["test"])
    fsim = fit(
        fc, fl, phi, psi, variant=variant, l2_a=best["l2_a"] or 0.0, l2_b=best["l2_b"], lrs=flr
    )
    return fsim.tables(phi, psi), {**best, "schedule_aware": aware, "search_points": len(table)}
