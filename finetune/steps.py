"""Pure training steps and optimizers over the trainable part of the T5 parameters.

Layer 3 of ``finetune`` (see its package docstring). The optimizer state is built from, and updates
only, the trainable tree of ``finetune.model.partition``; the frozen tree is an input that the step
never passes through the optimizer, so it stays bitwise unchanged. Callers ``jax.jit`` the step
once, outside the loop, donating ``trainable`` and ``opt_state``::

    step = jax.jit(make_train_step(loss_fn, opt), donate_argnums=(0, 1))
    trainable, opt_state, loss = step(trainable, opt_state, frozen, batch, rng)

Donation deletes the arrays passed in: ``partition`` shares its leaves with the full ``params``
(and the model they came from), so after the first donated step use the returned ``trainable``
(``combine(trainable, frozen)``), never the old ``params`` or model.

The runs of an experiment differ only in their curriculum, so R of them train together:
`make_programs` builds the jitted programs of such a group (the step ``vmap``-ed over a run
axis of the trainable state, the optimizer state and the batches, the frozen weights shared;
or, for IA3, `make_flat_train_step` over the R x b examples in length groups) and the
tracked-set logging. `broadcast_runs`, `stack_runs` and `take_run` build and split the host
trees with that leading run axis.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from finetune.model import combine

__all__ = [
    "OPTIMIZERS",
    "broadcast_runs",
    "make_flat_train_step",
    "make_optimizer",
    "make_programs",
    "make_train_step",
    "stack_runs",
    "take_run",
]

OPTIMIZERS = ("adamw", "adafactor")


def make_optimizer(
    name: str,
    learning_rate: float | optax.Schedule,
    *,
    grad_clip_norm: float | None = None,
    **kw: Any,
) -> optax.GradientTransformation:
    """AdamW or Adafactor (optax), optionally after global-norm gradient clipping.

    Initialise and apply it on the trainable tree only (``finetune.model.partition``).

    Args:
        name: ``"adamw"`` or ``"adafactor"``.
        learning_rate: a float or an optax schedule of the step.
        grad_clip_norm: clip gradients to this global norm first (T-Few IA3 uses 1.0); None: off.
        **kw: passed to ``optax.adamw`` (b1, b2, eps, weight_decay; default weight_decay 0.0)
            or ``optax.adafactor`` (e.g. multiply_by_parameter_scale, decay_rate).

    Returns:
        An ``optax.GradientTransformation``.

    Raises:
        ValueError: unknown optimizer name or a bad keyword for it.
    """
    if name == "adamw":
        kw.setdefault("weight_decay", 0.0)
        make = optax.adamw
    elif name == "adafactor":
        make = optax.adafactor
    else:
        raise ValueError(f"optimizer name={name!r} is not one of {OPTIMIZERS}")
    try:
        opt = make(learning_rate, **kw)
    except TypeError as err:
        raise ValueError(f"bad option for optimizer {name!r}: {err}") from err
    if grad_clip_norm is not None:
        if not grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm={grad_clip_norm!r} must be > 0 (or None for off)")
        opt = optax.chain(optax.clip_by_global_norm(grad_clip_norm), opt)
    return opt


def make_train_step(
    per_example_loss: Callable[..., jax.Array], optimizer: optax.GradientTransformation
) -> Callable:
    """Build ``train_step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, l)``.

    Args:
        per_example_loss: ``(params, batch, dropout_rng=None) -> float32 [b]``
            (``finetune.model.make_per_example_loss``).
        optimizer: from ``make_optimizer``, with ``opt_state = optimizer.init(trainable)``.

    Returns:
        A pure function. ``rng``: a PRNG key for dropout, or None for no dropout. ``l`` is the
        batch mean of the per-example losses before the update (float32 scalar).

    Warns:
        UserWarning (when traced): a trainable leaf stored in bfloat16 or float16. Updates of
        about the learning rate (1e-3) fall below bf16's spacing near 1 (2^-7) and round away,
        so IA3 vectors would never move; keep the trainable tree in float32.
    """

    def train_step(trainable, opt_state, frozen, batch, rng):
        low = sorted({str(x.dtype) for x in jax.tree.leaves(trainable)} & {"bfloat16", "float16"})
        if low:
            warnings.warn(
                f"trainable parameters stored in {', '.join(low)}: small updates round away "
                "(IA3 vectors near 1 may never move); build the model with "
                "param_dtype=float32 and keep bf16 as the compute dtype",
                UserWarning,
                stacklevel=2,
            )

        def mean_loss(tr):
            return per_example_loss(combine(tr, frozen), batch, dropout_rng=rng).mean()

        loss, grads = jax.value_and_grad(mean_loss)(trainable)
        trainable, opt_state = _apply_gradients(optimizer, grads, opt_state, trainable)
        return trainable, opt_state, loss

    return train_step


def _apply_gradients(optimizer: optax.GradientTransformation, grads, opt_state, trainable):
    """One optimizer update of ``trainable``; returns (trainable, opt_state)."""
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state


def make_flat_train_step(
    per_example_loss: Callable[..., jax.Array], optimizer: optax.GradientTransformation
) -> Callable:
    """Build ``flat_step(trainable_R, opt_R, frozen, groups) -> (trainable_R, opt_R, l_R)``:
    the step of R runs with the examples of all runs flattened into length groups.

    Each example runs the model with its own run's trainable (IA3) parameters, gathered by its
    run index, so examples of different runs share a padded length. The gradient of the sum of
    the runs' mean losses with respect to the stacked parameters is each run's own gradient (the
    runs do not interact); the optimizer then updates each run: the update of ``vmap`` of
    `make_train_step`'s step over the runs (without dropout), up to float32 reassociation.
    Meant for IA3-sized trainable trees: every example gathers a copy of its run's trainable
    parameters.

    Unlike `make_train_step`'s step, it does not warn about a bf16 trainable tree.

    Args:
        per_example_loss: ``(params, batch) -> float32 [b]``
            (``finetune.model.make_per_example_loss``).
        optimizer: from ``make_optimizer``; ``opt_R`` stacks ``optimizer.init`` of each run.

    Returns:
        A pure function. ``trainable_R`` and ``opt_R``: trees with a leading run axis R.
        ``groups``: a tuple of {"inputs": int32 [n_g, L_g], "targets": int32 [n_g, T],
        "run": int32 [n_g]} (``finetune.data.gather_flat``), every run present. ``l_R``:
        float32 [R], each run's batch mean of the per-example losses before the update.

    References:
        IA3 / T-Few: Liu et al. 2022, https://arxiv.org/abs/2205.05638
    """

    def flat_step(trainable_r, opt_r, frozen, groups):
        n_runs = jax.tree.leaves(trainable_r)[0].shape[0]

        def one(tr, inputs, targets):  # a single example, its run's parameters
            params = combine(tr, frozen)
            return per_example_loss(params, {"inputs": inputs[None], "targets": targets[None]})[0]

        def objective(tr_r):
            total = jnp.zeros((n_runs,), jnp.float32)
            count = jnp.zeros((n_runs,), jnp.float32)
            for g in groups:
                tr_i = jax.tree.map(lambda x, g=g: x[g["run"]], tr_r)  # [n_g, ...]
                losses = jax.vmap(one)(tr_i, g["inputs"], g["targets"])  # [n_g]
                total = total + jax.ops.segment_sum(losses, g["run"], n_runs)
                count = count + jax.ops.segment_sum(jnp.ones_like(losses), g["run"], n_runs)
            loss_r = total / count  # [R] each run's batch mean
            return loss_r.sum(), loss_r

        (_, loss_r), grads_r = jax.value_and_grad(objective, has_aux=True)(trainable_r)
        trainable_r, opt_r = jax.vmap(functools.partial(_apply_gradients, optimizer))(
            grads_r, opt_r, trainable_r
        )
        return trainable_r, opt_r, loss_r

    return flat_step


def make_programs(
    per_example_loss: Callable,
    score_choices: Callable,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    broadcast_tracked: bool = False,
) -> dict[str, Callable]:
    """The jitted programs of a group of R runs trained together, and their logging.

    ``broadcast_tracked``: give the tracked buckets an explicit run axis before the vmap over
    runs (instead of closing over them unbatched). Needed by the fused cuDNN attention, whose
    batching rule requires every per-example operand (the key lengths) to carry the run axis.

    Args:
        per_example_loss: ``(params, batch, dropout_rng=None) -> float32 [b]``
            (``finetune.model.make_per_example_loss``).
        score_choices: ``(params, inputs, choices) -> float32 [b, C]``
            (``finetune.model.make_score_choices``).
        optimizer: from ``make_optimizer``.
        mesh: the device mesh (``finetune.distributed.make_mesh``); losses and scores come
            back replicated on it.
        broadcast_tracked: see above.

    Returns:
        dict with
        ``advance(trainable_R, opt_R, frozen, batch_R) -> (trainable_R, opt_R, train_loss
        f32 [R])`` (jitted; donates the states; `make_train_step` vmapped over the runs),
        ``step(trainable_R, opt_R, frozen, batch_R, buckets) -> (trainable_R, opt_R,
        train_loss f32 [R], test_loss f32 [R, rows, C])``: ``advance`` then ``test_losses``,
        ``step_nolog(...)`` the same without the test losses (test_loss is an empty [R, 0, 0]),
        ``advance_flat`` / ``step_flat(trainable_R, opt_R, frozen, groups, buckets)`` the same
        step with the R x b examples in length groups (`make_flat_train_step`,
        ``finetune.data.gather_flat``; IA3-sized trainable trees only: every example gathers
        its run's trainable parameters),
        ``test_losses(trainable_R, frozen, buckets) -> f32 [R, rows, C]``: the loss of every
        answer choice of every tracked row (``score_choices``; the gold choice's column is the
        tracked test loss),
        ``scores(trainable_R, frozen, buckets) -> f32 [R, rows, C]``.
    """
    train_step = make_train_step(per_example_loss, optimizer)
    flat_step = make_flat_train_step(per_example_loss, optimizer)
    replicated = NamedSharding(mesh, P())

    def test_losses_one(trainable, frozen, buckets):
        # Every answer choice's loss (rank classification's scores); the gold choice's column
        # is the logged test loss, so losses.npy and choice_losses.npy come from one forward.
        params = combine(trainable, frozen)
        return jnp.concatenate(
            [score_choices(params, b["inputs"], b["choices"]) for b in buckets]
        )  # [rows, C]

    def scores_one(trainable, frozen, buckets):
        params = combine(trainable, frozen)
        return jnp.concatenate(
            [score_choices(params, b["inputs"], b["choices"]) for b in buckets]
        )  # [rows, C]

    def over_runs(fn, trainable_r, frozen, buckets):
        if not broadcast_tracked:
            return jax.vmap(fn, in_axes=(0, None, None))(trainable_r, frozen, buckets)
        r = jax.tree.leaves(trainable_r)[0].shape[0]
        buckets_r = jax.tree.map(lambda x: jnp.broadcast_to(x, (r,) + x.shape), buckets)
        return jax.vmap(fn, in_axes=(0, None, 0))(trainable_r, frozen, buckets_r)

    def test_losses(trainable_r, frozen, buckets):
        out = over_runs(test_losses_one, trainable_r, frozen, buckets)  # [R, rows, C]
        return jax.lax.with_sharding_constraint(out, replicated)

    def scores(trainable_r, frozen, buckets):
        out = over_runs(scores_one, trainable_r, frozen, buckets)  # [R, rows, C]
        return jax.lax.with_sharding_constraint(out, replicated)

    def advance(trainable_r, opt_r, frozen, batch_r):
        trainable_r, opt_r, loss_r = jax.vmap(train_step, in_axes=(0, 0, None, 0, None))(
            trainable_r, opt_r, frozen, batch_r, None
        )
        return trainable_r, opt_r, jax.lax.with_sharding_constraint(loss_r, replicated)

    def advance_flat(trainable_r, opt_r, frozen, groups):
        trainable_r, opt_r, loss_r = flat_step(trainable_r, opt_r, frozen, groups)
        return trainable_r, opt_r, jax.lax.with_sharding_constraint(loss_r, replicated)

    # The training step and the tracked-set logging are two programs, not one: the step is
    # compiled once per padded batch length, the logging (one traced forward per tracked
    # bucket) once per experiment. Fused, every new batch length recompiled the logging too.
    advance_jit = jax.jit(advance, donate_argnums=(0, 1))
    test_losses_jit = jax.jit(test_losses)

    def step(trainable_r, opt_r, frozen, batch_r, buckets):
        trainable_r, opt_r, loss_r = advance_jit(trainable_r, opt_r, frozen, batch_r)
        return trainable_r, opt_r, loss_r, test_losses_jit(trainable_r, frozen, buckets)

    def step_nolog(trainable_r, opt_r, frozen, batch_r, buckets):
        trainable_r, opt_r, loss_r = advance_jit(trainable_r, opt_r, frozen, batch_r)
        return trainable_r, opt_r, loss_r, jnp.zeros((loss_r.shape[0], 0, 0), jnp.float32)

    advance_flat_jit = jax.jit(advance_flat, donate_argnums=(0, 1))

    def step_flat(trainable_r, opt_r, frozen, groups, buckets):
        trainable_r, opt_r, loss_r = advance_flat_jit(trainable_r, opt_r, frozen, groups)
        return trainable_r, opt_r, loss_r, test_losses_jit(trainable_r, frozen, buckets)

    return {
        "advance": advance_jit,
        "step": step,
        "step_nolog": step_nolog,
        "advance_flat": advance_flat_jit,
        "step_flat": step_flat,
        "test_losses": test_losses_jit,
        "scores": jax.jit(scores),
    }


# ----------------------------------------------------------------------------------------------
# Host trees with a leading run axis (the state of a group of runs)


def broadcast_runs(tree: Any, r: int) -> Any:
    """``r`` copies of a host tree along a new leading run axis (read-only numpy views)."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (r,) + np.shape(x)), tree)


def stack_runs(trees: Sequence) -> Any:
    """The host trees of several runs stacked along a new leading run axis."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def take_run(tree: Any, r: int) -> Any:
    """Run ``r`` of a tree with a leading run axis."""
    return jax.tree.map(lambda x: x[r], tree)
