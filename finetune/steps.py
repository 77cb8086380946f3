"""Pure training steps and optimizers over the trainable part of the T5 parameters.

Layer 3 of ``finetune`` (STYLE.md). The optimizer state is built from, and updates only, the
trainable tree of ``finetune.model.partition``; the frozen tree is an input that the step never
passes through the optimizer, so it stays bitwise unchanged. Callers ``jax.jit`` the step once,
outside the loop, donating ``trainable`` and ``opt_state``::

    step = jax.jit(make_train_step(loss_fn, opt), donate_argnums=(0, 1))
    trainable, opt_state, loss = step(trainable, opt_state, frozen, batch, rng)

Donation deletes the arrays passed in: ``partition`` shares its leaves with the full ``params``
(and the model they came from), so after the first donated step use the returned ``trainable``
(``combine(trainable, frozen)``), never the old ``params`` or model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import optax

from finetune.model import combine

__all__ = ["OPTIMIZERS", "make_optimizer", "make_train_step"]

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
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, loss

    return train_step
