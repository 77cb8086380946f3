"""Model functions over T5 parameters: trainable masks, per-example losses, scores, gradients.

Layer 2 of ``finetune`` (see its package docstring): pure functions of ``(params, batch)``, where
``params`` is the ``nnx.State`` from ``graphdef, params = nnx.split(model)``. Callers ``jax.jit``
them.

Loss convention (pinned in the team contract): the per-example loss is the token cross-entropy
AVERAGED over the example's non-padding target tokens (EOS included), so losses of examples with
different target lengths are comparable; a training loss is the batch mean of it. Batches are
``{"inputs": int32 [b, L_in], "targets": int32 [b, L_tgt]}`` with pad id 0.

IA3 versus full tuning is one boolean mask over the parameter tree (``trainable_mask``); the
optimizer, the per-example gradients (TracIn) and the checkpoints all use the trainable part
that ``partition`` cuts with it. The frozen part keeps its structure with ``None`` leaves in place
of the trainable arrays (and vice versa), so ``combine`` restores the full tree exactly.

References:
    IA3: Liu et al. 2022, https://arxiv.org/abs/2205.05638.
    TracIn: Pruthi et al. 2020, https://arxiv.org/abs/2002.08484.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, ArrayLike, Float, Int

__all__ = [
    "METHODS",
    "trainable_mask",
    "partition",
    "combine",
    "make_per_example_loss",
    "make_score_choices",
    "per_example_grads",
    "token_losses",
]

METHODS = ("full", "ia3")

Params = Any  # nnx.State (a pytree of arrays inside nnx.Variable nodes)
Batch = dict[str, jax.Array]  # {"inputs": int32 [b, L_in], "targets": int32 [b, L_tgt]}
PerExampleLoss = Callable[..., Float[Array, " b"]]  # (params, batch [b, ...]) -> f32 [b]
CombineFn = Callable[[Params, Params], Params]  # (trainable, frozen) -> params


def _is_ia3_path(path) -> bool:
    for key in path:
        name = getattr(key, "key", getattr(key, "name", None))
        if isinstance(name, str) and name.startswith("ia3_"):
            return True
    return False


def trainable_mask(params: Params, method: str) -> Params:
    """Which parameters train: only the IA3 vectors (``"ia3"``) or all others (``"full"``).

    Args:
        params: the parameter tree (``nnx.State``) of a ``finetune.network.T5``.
        method: ``"full"`` (every non-IA3 parameter) or ``"ia3"`` (only the IA3 vectors).

    Returns:
        A tree with the structure of ``params`` and a Python bool at each leaf.

    Raises:
        ValueError: unknown method, or ``"ia3"`` on a model built without ``ia3=True``.

    References:
        IA3: https://arxiv.org/abs/2205.05638 (only the l_k, l_v, l_ff vectors train).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: _is_ia3_path(path) == (method == "ia3"), params
    )
    if method == "ia3" and not any(jax.tree.leaves(mask)):
        raise ValueError(
            "method='ia3' but the model has no IA3 vectors; build it with ia3=True "
            "(finetune.hf.load_pretrained(..., ia3=True) or init_random(..., ia3=True))"
        )
    return mask


def partition(params: Params, mask: Params) -> tuple[Params, Params]:
    """Split ``params`` into ``(trainable, frozen)`` trees with ``None`` at the other's leaves.

    Args:
        params: the full parameter tree.
        mask: bool tree from ``trainable_mask`` (same structure).

    Returns:
        ``(trainable, frozen)``; ``jax.tree.leaves`` of each holds only its own arrays.
    """
    trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def combine(trainable: Params, frozen: Params | None) -> Params:
    """Inverse of ``partition``: the full parameter tree.

    Args:
        trainable: the trainable part from ``partition`` (``None`` at the frozen leaves).
        frozen: the frozen part from ``partition`` (``None`` at the trainable leaves); None or
            empty (``{}``) when every parameter is in ``trainable``.

    Returns:
        The full parameter tree, each leaf taken from whichever part holds an array there.
    """
    if frozen is None or (isinstance(frozen, dict) and not frozen):
        return trainable
    return jax.tree.map(
        lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
    )


def token_losses(
    logits: Float[Array, "b L_tgt vocab"], targets: Int[Array, "b L_tgt"]
) -> Float[Array, " b"]:
    """Per-example mean token cross-entropy over non-padding targets.

    Args:
        logits: float32 [b, L_tgt, vocab].
        targets: int32 [b, L_tgt], pad id 0.

    Returns:
        float32 [b]; 0 for an example without any target token; NaN for a target id outside
        [0, vocab) (e.g. the ignore index -100: pad with 0 instead).
    """
    mask = (targets != 0).astype(jnp.float32)  # [b, L_tgt]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    nll = jnp.where((targets < 0) | (targets >= logits.shape[-1]), jnp.nan, nll)
    count = mask.sum(axis=-1)  # [b]
    return (nll * mask).sum(axis=-1) / jnp.maximum(count, 1.0)


def _check_ids(what: str, x, ndim: int, want: str) -> jax.Array:
    """``x`` as an array of integer ids with ``ndim`` axes, else a one-line ValueError."""
    x = jnp.asarray(x)
    if x.ndim != ndim or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{what} must be integer ids {want}; got {x.dtype} {tuple(x.shape)}")
    return x


def _check_batch(batch) -> tuple[jax.Array, jax.Array]:
    if not isinstance(batch, dict) or not {"inputs", "targets"} <= set(batch):
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f'batch must be a dict with "inputs" and "targets"; got {keys}')
    inputs = _check_ids('batch["inputs"]', batch["inputs"], 2, "[b, L_in]")
    targets = _check_ids('batch["targets"]', batch["targets"], 2, "[b, L_tgt]")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"batch inputs {inputs.shape} and targets {targets.shape} differ in b")
    return inputs, targets


def make_per_example_loss(graphdef) -> PerExampleLoss:
    """Build ``per_example_loss(params, batch, dropout_rng=None) -> float32 [b]``.

    Args:
        graphdef: the ``nnx.GraphDef`` from ``nnx.split(model)``.

    Returns:
        A pure function: ``params`` (full tree), ``batch`` {"inputs": int32 [b, L_in],
        "targets": int32 [b, L_tgt]}, ``dropout_rng`` (None: no dropout) -> the mean token
        cross-entropy of each example over its non-padding target tokens, float32 [b]. Pad id
        is 0; a target row that is all padding has loss 0 (and so lowers a batch mean: the
        run generator never builds one). Ids outside [0, vocab) give NaN.

    Raises:
        ValueError (when called): a batch that is not {"inputs", "targets"} of 2-D integer ids
            with the same number of rows.
    """

    def per_example_loss(
        params: Params, batch: Batch, dropout_rng: jax.Array | None = None
    ) -> Float[Array, " b"]:
        inputs, targets = _check_batch(batch)
        model = nnx.merge(graphdef, params)
        logits = model(
            inputs,
            targets,
            deterministic=dropout_rng is None,
            dropout_rng=dropout_rng,
        )  # [b, L_tgt, vocab] float32
        return token_losses(logits, targets)

    return per_example_loss


def make_score_choices(graphdef) -> Callable[..., Float[Array, "b C"]]:
    """Build ``score_choices(params, inputs, choices) -> float32 [b, C]`` (rank classification).

    The encoder runs once per example; each answer choice is decoded against it. The score is the
    per-example loss of the choice (lower is better; prediction = argmin). A choice slot that is
    all padding scores +inf, so tasks with fewer choices can pad the choice axis with zeros.

    Args:
        graphdef: the ``nnx.GraphDef`` from ``nnx.split(model)``.

    Returns:
        A pure function: ``params``, ``inputs`` int32 [b, L_in], ``choices`` int32
        [b, C, L_tgt] -> float32 [b, C].
    """

    def score_choices(
        params: Params, inputs: Int[ArrayLike, "b L_in"], choices: Int[ArrayLike, "b C L_tgt"]
    ) -> Float[Array, "b C"]:
        inputs = _check_ids("inputs", inputs, 2, "[b, L_in]")
        choices = _check_ids("choices", choices, 3, "[b, C, L_tgt]")
        model = nnx.merge(graphdef, params)
        b, c, lt = choices.shape
        encoded = model.encode(inputs)  # [b, L_in, d]
        enc = jnp.repeat(encoded, c, axis=0)  # [b*C, L_in, d]
        inp = jnp.repeat(inputs, c, axis=0)  # [b*C, L_in]
        tgt = choices.reshape(b * c, lt)  # [b*C, L_tgt]
        logits = model.decode(enc, inp, tgt)  # [b*C, L_tgt, vocab]
        losses = token_losses(logits, tgt).reshape(b, c)
        empty = (choices != 0).sum(axis=-1) == 0  # [b, C]
        return jnp.where(empty, jnp.inf, losses)

    return score_choices


def per_example_grads(
    loss_fn: PerExampleLoss,
    trainable: Params,
    frozen: Params,
    batch: Batch,
    *,
    combine: CombineFn = combine,
) -> Params:
    """Gradient of each example's loss with respect to the trainable parameters.

    ``vmap(grad)`` over the examples; the frozen part is closed over and never differentiated.
    The one per-example gradient of the package: TracIn-CP (``finetune.tracin``) calls it on each
    chunk of examples.

    Args:
        loss_fn: ``per_example_loss(params, batch) -> f32 [b]`` (from ``make_per_example_loss``).
        trainable: trainable part of ``partition``.
        frozen: frozen part of ``partition``.
        batch: dict of arrays with leading axis b (e.g. inputs int32 [b, L_in], targets int32
            [b, L_tgt]); each example is passed to ``loss_fn`` as a batch of one.
        combine: ``(trainable, frozen) -> params`` (default: this module's ``combine``).

    Returns:
        A tree like ``trainable`` whose arrays carry a leading [b] axis (the dtype of each leaf).

    References:
        TracIn: https://arxiv.org/abs/2002.08484.
    """

    def single(tr: Params, example: Batch) -> jax.Array:
        one = jax.tree.map(lambda x: x[None], example)  # [1, ...]
        return loss_fn(combine(tr, frozen), one)[0]

    return jax.vmap(jax.grad(single), in_axes=(None, 0))(trainable, batch)
