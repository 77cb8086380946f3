"""TracIn-CP read as a simulator (an additive simulator with gradient-predicted loss changes).

For test example z and step t consuming batch c_t (repeats counted)::

    L_t(z) = L_{t-1}(z) - s * sum_{i in c_t} (eta_t / b) * dots[k(t), z, i]

where dots[k, z, i] = grad L(z; theta_k) . grad L(z_i; theta_k) at checkpoint k (from
`tracin.npz`), k(t) is the latest checkpoint at a step s <= t - 1 (a checkpoint at step s holds
the parameters after s steps, which step s + 1 starts from; steps before the first checkpoint
use the first), eta_t is the run's learning rate at step t (`lr.npy`) when present,
else the checkpoint's learning rate, b the batch size (the training loss is a batch mean), and

- `tracin-cp`: s = 1 (first-order Taylor step of SGD);
- `tracin-cp-rescaled`: one scalar s fitted by least squares to the observed per-step loss
  changes of the fitting runs, s = sum(pred_delta * obs_delta) / sum(pred_delta ** 2) over
  all steps, test examples and fitting runs;
- `tracin-cp-momentum`: each step's predicted change spread over later steps with AdamW's
  first-moment weights, D_t = d D_{t-1} + (1 - d) s delta_t (`simfluence.momentum`), s fitted
  as for the rescaled variant to the spread predictions; d = 0 is tracin-cp-rescaled.

Design choice: the dot products belong to the checkpoints of a particular run, but a held-out
(or hypothetical) curriculum has no checkpoints of its own. We therefore simulate every run with
the dots (and checkpoint learning rates) averaged over the FITTING runs that have `tracin.npz`;
those must share the checkpoint `steps` and the dot-product setting (mode, and for projected
dots the projection dimension and seed). The same averaged dots are used to fit s.

References:
    Pruthi et al., "Estimating Training Data Influence by Tracing Gradient Descent", 2020.
    https://arxiv.org/abs/2002.08484
    Guu et al., "Simfluence", 2023 (TracIn-CP as a special case of Simfluence).
    https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, Int

from simfluence import momentum
from simfluence.runlog import Run, RunLogError, atomic_savez, read_tracin

__all__ = [
    "TRACIN_VARIANTS",
    "TracInSimulator",
    "has_tracin",
    "from_runs",
    "with_decay",
    "fit_scale",
    "predicted_deltas",
    "removal_influence",
    "simulate_tracin",
    "save_tracin_simulator",
    "load_tracin_simulator",
]

TRACIN_VARIANTS = ("tracin-cp", "tracin-cp-rescaled", momentum.TRACIN_MOMENTUM)


@dataclass(frozen=True)
class TracInSimulator:
    """Averaged TracIn-CP dot products of the fitting runs, plus a scale.

    Attributes:
        steps: int32 [K] checkpoint steps, strictly increasing.
        learning_rates: float32 [K] learning rate at each checkpoint (mean over source runs).
        dots: float32 [K, n_test, n_train] mean dot products over source runs.
        scale: s (1.0 for plain TracIn-CP).
        variant: one of `TRACIN_VARIANTS`.
        source_runs: indices of the runs whose tracin.npz were averaged.
        decay: first-moment decay d in [0, 1) spreading each step's change (tracin-cp-momentum;
            0 for the others).
    """

    steps: Int[np.ndarray, " K"] = field(repr=False)
    learning_rates: Float[np.ndarray, " K"] = field(repr=False)
    dots: Float[np.ndarray, "K n_test n_train"] = field(repr=False)
    scale: float = 1.0
    variant: str = "tracin-cp"
    source_runs: tuple[int, ...] = ()
    decay: float = 0.0


def has_tracin(runs: Sequence[Run]) -> bool:
    """Whether any of `runs` has a tracin.npz.

    Args:
        runs: loaded runs.

    Returns:
        True when at least one run folder holds tracin.npz (its contents are not read).
    """
    return any((r.path / "tracin.npz").is_file() for r in runs)


def from_runs(
    runs: Sequence[Run], *, variant: str = "tracin-cp", decay: float | None = None
) -> TracInSimulator:
    """Build a TracIn-CP simulator from the fitting runs' tracin.npz (averaged).

    Args:
        runs: the fitting runs; those with tracin.npz are averaged, the others are ignored.
        variant: "tracin-cp" (s = 1), "tracin-cp-rescaled" (s fitted on `runs`) or
            "tracin-cp-momentum" (changes spread with decay d, s fitted on `runs`).
        decay: d in [0, 1), required by tracin-cp-momentum (`momentum.tracin_from_runs`
            chooses it on validation runs), refused by the others.

    Returns:
        A `TracInSimulator`.

    Raises:
        RunLogError: no fitting run has tracin.npz, or their checkpoint steps or dot-product
            settings (mode; proj_dim and seed for projected dots) differ.
        ValueError: unknown variant.
    """
    if variant not in TRACIN_VARIANTS:
        raise ValueError(f"unknown TracIn variant {variant!r}; choose one of {TRACIN_VARIANTS}")
    if (decay is None) == (variant == momentum.TRACIN_MOMENTUM):
        raise ValueError(
            f"decay is required by {momentum.TRACIN_MOMENTUM} and refused by the other TracIn "
            f"variants (got variant {variant!r}, decay {decay!r})"
        )
    loaded = [(r, read_tracin(r.path)) for r in runs]
    loaded = [(r, t) for r, t in loaded if t is not None]
    if not loaded:
        names = ", ".join(r.path.name for r in runs) or "none"
        raise RunLogError(
            f"no fitting run has tracin.npz (fitting runs: {names}); run `finetune tracin EXP` "
            "first or leave out the tracin-cp variants"
        )
    r0, t0 = loaded[0]
    for r, t in loaded[1:]:
        if not np.array_equal(t["steps"], t0["steps"]):
            raise RunLogError(
                f"{r.path / 'tracin.npz'}: checkpoint steps {t['steps'].tolist()} differ from "
                f"{r0.path.name}'s {t0['steps'].tolist()}; TracIn-CP averages dots over fitting "
                "runs, which needs the same checkpoint steps"
            )
        a, b = _settings(t0), _settings(t)
        differ = [f"{k}={a[k]} vs {b[k]}" for k in a if k in b and a[k] != b[k]]
        if differ:
            raise RunLogError(
                f"{r0.path / 'tracin.npz'} and {r.path / 'tracin.npz'} hold dot products of "
                f"different settings ({', '.join(differ)}); averaging them mixes estimates: "
                "delete the fitting runs' tracin.npz and recompute with one mode "
                "(`finetune tracin EXP` with one --mode, --proj-dim and --seed)"
            )
    dots = np.mean([t["dots"] for _, t in loaded], axis=0, dtype=np.float64).astype(np.float32)
    lrs = np.mean([t["learning_rates"] for _, t in loaded], axis=0).astype(np.float32)
    sim = TracInSimulator(
        steps=t0["steps"],
        learning_rates=lrs,
        dots=dots,
        scale=1.0,
        variant="tracin-cp",
        source_runs=tuple(r.index for r, _ in loaded),
    )
    if variant == "tracin-cp-rescaled":
        sim = replace(sim, scale=fit_scale(sim, runs), variant=variant)
    elif variant == momentum.TRACIN_MOMENTUM:
        sim = with_decay(sim, runs, decay)
    return sim


def with_decay(sim: TracInSimulator, runs: Sequence[Run], decay: float) -> TracInSimulator:
    """The tracin-cp-momentum simulator of ``sim``'s dots: decay d, scale refitted on ``runs``.

    Args:
        sim: a TracIn-CP simulator (its dots and checkpoint rates are kept).
        runs: the fitting runs the scale is fitted on.
        decay: d in [0, 1).

    Returns:
        A `TracInSimulator` with variant tracin-cp-momentum.

    Raises:
        ValueError: d outside [0, 1), or every predicted change is zero.
    """
    d = momentum.check_decay(decay)
    spread = replace(sim, scale=1.0, variant=momentum.TRACIN_MOMENTUM, decay=d)
    return replace(spread, scale=fit_scale(spread, runs))


def _settings(t: dict) -> dict:
    """The settings that define a tracin.npz's dots (`read_tracin` output); exact dots do not
    depend on the projection seed, so it is left out for them."""
    names = ("mode", "proj_dim", "seed") if t["mode"] == "projected" else ("mode", "proj_dim")
    return {k: t[k] for k in names}


@jax.jit
def _deltas(dots, ckpt, etas, curriculum):
    # dots [K, n_test, n_train]; ckpt int [T]; etas [T]; curriculum int [T, b]
    b = curriculum.shape[1]
    gathered = dots[ckpt[:, None], :, curriculum]  # [T, b, n_test]
    return -(etas / b)[:, None] * gathered.sum(axis=1)  # [T, n_test]


def _checkpoint_index(ckpt_steps: np.ndarray, n_steps: int) -> np.ndarray:
    """k(t) for t = 1..T: the latest checkpoint whose parameters step t starts from.

    A checkpoint at step s holds the parameters after s steps (finetune's convention), and step t
    updates the parameters after t - 1 steps, so k(t) is the latest checkpoint with s <= t - 1
    ("at or before step t" when a checkpoint is named by the step it feeds). Steps before the
    first checkpoint use the first one.
    """
    t = np.arange(1, n_steps + 1)
    k = np.searchsorted(ckpt_steps, t - 1, side="right") - 1
    return np.maximum(k, 0).astype(np.int32)


def predicted_deltas(
    sim: TracInSimulator,
    curriculum: Int[ArrayLike, "T b"],
    lr: Float[ArrayLike, " T"] | None = None,
) -> Float[np.ndarray, "T n_test"]:
    """Unscaled per-step loss changes predicted by TracIn-CP.

    Args:
        sim: the simulator (its `scale` is not applied here).
        curriculum: int [T, b] training-pool positions.
        lr: optional float [T] learning rate per step; else the checkpoints' learning rates.

    Returns:
        float32 [T, n_test]: -sum_{i in c_t} (eta_t / b) dots[k(t), :, i].

    Raises:
        ValueError: the curriculum is not int [T, b] or holds ids outside 0..n_train-1, or
            `lr` is not [T].
    """
    cur, ckpt, etas = _inputs(sim, curriculum, lr)
    return np.asarray(
        _deltas(jnp.asarray(sim.dots), jnp.asarray(ckpt), jnp.asarray(etas), jnp.asarray(cur))
    )


def _inputs(sim: TracInSimulator, curriculum, lr):
    """Checked curriculum int [T, b], checkpoint index k(t) [T] and learning rates f32 [T]."""
    cur = np.asarray(curriculum)
    if cur.ndim != 2 or not np.issubdtype(cur.dtype, np.integer):
        raise ValueError(f"curriculum must be int [steps, batch], got {cur.dtype} {cur.shape}")
    n_train = sim.dots.shape[2]
    if cur.size and (cur.min() < 0 or cur.max() >= n_train):
        raise ValueError(f"curriculum ids must lie in 0..{n_train - 1}")
    ckpt = _checkpoint_index(sim.steps, cur.shape[0])
    if lr is None:
        etas = sim.learning_rates[ckpt]
    else:
        etas = np.asarray(lr, np.float32)
        if etas.shape != (cur.shape[0],):
            raise ValueError(f"lr must be [{cur.shape[0]}], got shape {etas.shape}")
    return cur, ckpt, etas


def simulate_tracin(
    sim: TracInSimulator,
    curriculum: Int[ArrayLike, "T b"],
    initial_losses: Float[ArrayLike, " n_test"],
    lr: Float[ArrayLike, " T"] | None = None,
) -> Float[np.ndarray, "T+1 n_test"]:
    """Roll out TracIn-CP along a curriculum.

    Args:
        sim: the simulator.
        curriculum: int [T, b].
        initial_losses: float [n_test] observed L_0.
        lr: optional float [T] learning rates of the run (its lr.npy).

    Returns:
        float32 [T + 1, n_test]: L_0, then L_0 + s * cumulative predicted changes.

    Raises:
        ValueError: `initial_losses` is not [n_test], or a bad curriculum or `lr` (see
            `predicted_deltas`).
    """
    l0 = np.asarray(initial_losses, np.float32)
    if l0.shape != (sim.dots.shape[1],):
        raise ValueError(f"initial_losses must be [{sim.dots.shape[1]}], got {l0.shape}")
    d = predicted_deltas(sim, curriculum, lr) * np.float32(sim.scale)
    if sim.decay:  # tracin-cp-momentum: D_t = d D_{t-1} + (1 - d) s delta_t
        d = momentum.spread(d, sim.decay)
    out = np.empty((d.shape[0] + 1, l0.shape[0]), np.float32)
    out[0] = l0
    out[1:] = l0 + np.cumsum(d, axis=0, dtype=np.float64)
    return out


def removal_influence(
    sim: TracInSimulator,
    curriculum: Int[ArrayLike, "T b"],
    lr: Float[ArrayLike, " T"] | None = None,
) -> Float[np.ndarray, "n_test n_train"]:
    """Change of every test example's final loss when each training example is removed.

    TracIn-CP's rollout is a sum of per-slot changes, so removing example i (its slots become
    neutral, as in `simulators.removal_influence`) takes back exactly its slots' terms:
    ``s * sum_{t, slots of i at t} (eta_t / b) dots[k(t), :, i]``.

    Args:
        sim: the simulator (its `scale` is applied).
        curriculum: int [T, b] training-pool positions.
        lr: optional float [T] learning rate per step; else the checkpoints' learning rates.

    Returns:
        float32 [n_test, n_train]: final loss without example i minus with all (0 for
        examples absent from the curriculum).

    Raises:
        ValueError: as `predicted_deltas`.

    References:
        Pruthi et al. 2020, TracIn. https://arxiv.org/abs/2002.08484
    """
    cur, ckpt, etas = _inputs(sim, curriculum, lr)
    out = _removal(
        jnp.asarray(sim.dots),
        jnp.asarray(ckpt),
        jnp.asarray(etas, jnp.float32),
        jnp.asarray(cur, jnp.int32),
        sim.dots.shape[2],
    )
    return (np.asarray(out, np.float64) * sim.scale).astype(np.float32).T.copy()


@partial(jax.jit, static_argnames=("n_train",))
def _removal(dots, ckpt, etas, curriculum, n_train: int):
    # dots [K, n_test, n_train]; ckpt int [T]; etas [T]; curriculum int [T, b]
    b = curriculum.shape[1]
    gathered = dots[ckpt[:, None], :, curriculum]  # [T, b, n_test]: each slot's dots
    terms = (etas / b)[:, None, None] * gathered  # [T, b, n_test]
    total = jnp.zeros((n_train, dots.shape[1]), jnp.float32)  # [n_train, n_test]
    return total.at[curriculum.reshape(-1)].add(terms.reshape(-1, dots.shape[1]))


def fit_scale(sim: TracInSimulator, runs: Sequence[Run]) -> float:
    """Least-squares scale s of the predicted per-step loss changes on the fitting runs.

    Minimises sum over runs, steps, test examples of (s * pred_delta - obs_delta)^2, whose
    solution is s = sum(pred_delta * obs_delta) / sum(pred_delta^2). For tracin-cp-momentum
    pred_delta is the spread change (`momentum.spread` with the simulator's decay).

    Args:
        sim: the TracIn-CP simulator (averaged dots).
        runs: fitting runs (each with curriculum, losses and optional lr).

    Returns:
        s as a float.

    Raises:
        ValueError: every predicted change is zero (s undefined).
    """
    num = 0.0
    den = 0.0
    for r in runs:
        pred = momentum.spread(predicted_deltas(sim, r.curriculum, r.lr), sim.decay)
        obs = np.diff(r.losses.astype(np.float64), axis=0)
        num += float((pred * obs).sum())
        den += float((pred * pred).sum())
    if den <= 0.0:
        raise ValueError(
            f"{sim.variant}: every predicted loss change is zero on the fitting runs "
            "(all dots are 0?); the scale is undefined"
        )
    return num / den


_FILE_KEYS = ("steps", "learning_rates", "dots", "scale", "variant", "source_runs")


def save_tracin_simulator(path, sim: TracInSimulator, *, origin: dict | None = None) -> None:
    """Writes a TracIn-CP simulator (averaged dots, scale) to an .npz file atomically.

    Args:
        path: destination file (no suffix is appended).
        sim: the `TracInSimulator`.
        origin: optional JSON-able record of where it was built (as in
            `simfluence.simulators.save_simulator`; read back by `simulators.read_origin`).
    """
    extra = {} if origin is None else {"origin": np.asarray(json.dumps(origin, sort_keys=True))}
    atomic_savez(
        Path(path),
        steps=np.asarray(sim.steps, np.int32),
        learning_rates=np.asarray(sim.learning_rates, np.float32),
        dots=np.asarray(sim.dots, np.float32),
        scale=np.asarray(sim.scale, np.float64),
        variant=np.asarray(sim.variant),
        source_runs=np.asarray(sim.source_runs, np.int64),
        decay=np.asarray(sim.decay, np.float64),
        **extra,
    )


def load_tracin_simulator(path) -> TracInSimulator:
    """Reads a TracIn-CP simulator written by `save_tracin_simulator`.

    Args:
        path: the .npz file.

    Returns:
        The `TracInSimulator`.

    Raises:
        ValueError: missing or unreadable file, missing keys or bad shapes, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"simulator file {path} does not exist; write one with `simfluence fit`")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _FILE_KEYS if k not in z.files]
            if missing:
                raise ValueError(
                    f"{path}: not a TracIn-CP simulator file (missing {', '.join(missing)}); "
                    "write one with `simfluence fit --variant tracin-cp-rescaled`"
                )
            data = {k: z[k] for k in _FILE_KEYS}
            decay = z["decay"] if "decay" in z.files else None  # older files: none (0)
    except ValueError:
        raise
    except Exception as e:  # OSError, zipfile errors: one line naming the file
        raise ValueError(f"{path}: cannot read simulator ({type(e).__name__}: {e})") from None
    variant = str(data["variant"])
    dots = data["dots"]
    k = data["steps"].shape
    if variant not in TRACIN_VARIANTS or dots.ndim != 3 or k != (dots.shape[0],):
        raise ValueError(
            f"{path}: bad TracIn-CP simulator (variant {variant!r}, steps {k}, dots "
            f"{dots.shape}); write it again with `simfluence fit`"
        )
    if not (np.isfinite(dots).all() and np.isfinite(data["scale"])):
        raise ValueError(f"{path}: dots or scale contain NaN or inf; build it again")
    if variant == momentum.TRACIN_MOMENTUM and decay is None:
        raise ValueError(f"{path}: {variant} simulator without its decay; build it again")
    if decay is not None and (decay.shape != () or not np.issubdtype(decay.dtype, np.number)):
        raise ValueError(f"{path}: decay must be a number, got {decay.dtype} {decay.shape}")
    d = 0.0 if decay is None else momentum.check_decay(float(decay), f"{path}: decay")
    if d and variant != momentum.TRACIN_MOMENTUM:
        raise ValueError(f"{path}: a {variant} simulator with decay {d}; build it again")
    return TracInSimulator(
        steps=data["steps"].astype(np.int32),
        learning_rates=data["learning_rates"].astype(np.float32),
        dots=dots.astype(np.float32),
        scale=float(data["scale"]),
        variant=variant,
        source_runs=tuple(int(i) for i in data["source_runs"]),
        decay=d,
    )
