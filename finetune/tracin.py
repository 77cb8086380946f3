"""TracIn-CP: per-example gradient dot products at saved checkpoints.

TracIn-CP (Pruthi et al. 2020) scores the influence of training example z_i on test example z as
``sum_k eta_k * grad L(z_i; theta_k) . grad L(z; theta_k)`` over saved checkpoints theta_k. This
module computes the dot products ``grad L(z_i; theta_k) . grad L(z; theta_k)`` of every pool
example against every tracked test example at every checkpoint of every run, and writes them as
``run_XXX/tracin.npz`` (read by the ``tracin-cp`` simulators of ``simfluence``).

Two modes:

- ``exact``: per-example gradients are computed chunk by chunk (``vmap(grad)``) and flattened;
  one ``lax.scan`` holds the gradients of one chunk of test examples ``[c, P]`` and streams the
  pool past it in chunks, then moves to the next test chunk. Memory: two chunks of gradients
  (``2 c P`` floats) besides the parameters, never ``[n_test, P]`` or ``[n_train, P]``; compute:
  the pool's gradients are recomputed once per test chunk (``ceil(n_test / c) n_train + n_test``
  per-example gradients). It runs for any model whose chunk of gradients fits; ``projected`` is
  far cheaper for full tuning of a large model.
- ``projected``: each per-example gradient is multiplied by a seeded Gaussian matrix with
  N(0, 1/d) entries, generated block by block over the parameter tree (one block per leaf, or
  per group of rows of a large leaf, from ``fold_in(key, leaf_index)``), so that a
  ``[parameters, d]`` matrix never exists. Dot products of projections are unbiased estimates
  of the exact ones with standard deviation ``sqrt((|g1|^2 |g2|^2 + (g1.g2)^2) / d)``
  (Johnson-Lindenstrauss).

Checkpoint and learning-rate convention (shared with ``simfluence``'s ``tracin-cp``):
a checkpoint "at step s" is the trainable state after ``s`` optimizer steps (``s = 0`` is the
initial state). Its learning rate ``eta_k`` is the learning rate of the step that FOLLOWS it,
step ``s + 1`` (``lr.npy[s]``): the first-order prediction of the loss change at step ``s + 1``
is ``-(eta / batch) * sum_{i in c_{s+1}} dots[k, :, i]``, since that step's gradient is taken at
theta_s. So a simulator pairs step t with the latest checkpoint at or before step ``t - 1``, and
no step uses a checkpoint at the run's last step ``T``: ``run_tracin`` skips it (and says so).

Checkpoints with identical contents (step 0 of runs that share their start state) are computed
once per ``run_tracin`` call and reused.

References:
    Pruthi et al. 2020, Estimating Training Data Influence by Tracing Gradient Descent,
    https://arxiv.org/abs/2002.08484.
    Guu et al. 2023, Simfluence: Modeling the Influence of Individual Training Examples by
    Simulating Training Runs, https://arxiv.org/abs/2303.08114.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from finetune.model import combine as _model_combine
from finetune.model import partition, per_example_grads

__all__ = [
    "MODES",
    "TracinMemoryError",
    "check_config_memory",
    "check_memory",
    "compute_dots",
    "count_params",
    "device_memory",
    "estimate_memory",
    "param_counts",
    "projected_gradients",
    "run_tracin",
]

_LOG = logging.getLogger(__name__)

MODES = ("exact", "projected")
# Largest Gaussian block generated at once in projected mode (elements; 2^24 f32 = 64 MiB).
# Part of the definition of the projection: changing it changes the random matrix.
_PROJ_BLOCK_ELEMS = 1 << 24
_DEFAULT_CHUNK = 32

PyTree = Any
Batch = dict[str, Any]  # {"inputs": int32 [n, L_in], "targets": int32 [n, L_tgt]}
LossFn = Callable[[PyTree, Batch], Float[Array, " b"]]  # (params, batch [b, ...]) -> f32 [b]
CombineFn = Callable[[PyTree, PyTree], PyTree]  # (trainable, frozen) -> params


def count_params(trainable: PyTree) -> int:
    """Number of scalar parameters in a pytree (``None`` leaves count zero).

    Args:
        trainable: a pytree of arrays (e.g. the trainable part of ``partition``).

    Returns:
        The total number of entries P of its leaves (the width of an exact-mode gradient).
    """
    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(trainable)))


def _check_mode(mode: str, proj_dim: int, chunk_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}; pass --mode exact or projected")
    if mode == "projected" and (not isinstance(proj_dim, int | np.integer) or proj_dim < 1):
        raise ValueError(f"proj_dim={proj_dim!r} must be a positive integer (e.g. 4096)")
    if not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer (e.g. 32)")


def _batch_size(batch: Batch, name: str) -> int:
    sizes = {k: int(np.shape(v)[0]) for k, v in batch.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"{name}: arrays must share one leading (example) axis, got {sizes}")
    n = next(iter(sizes.values()))
    if n < 1:
        raise ValueError(f"{name} is empty; TracIn needs at least one example")
    return n


def _flatten(tree: PyTree, n: int) -> jax.Array:
    """Per-example pytree with leaves [n, ...] -> f32 [n, P] (leaves in jax.tree order)."""
    return jnp.concatenate([x.reshape(n, -1).astype(jnp.float32) for x in jax.tree.leaves(tree)], 1)


def _project(tree: PyTree, n: int, key: jax.Array, dim: int) -> jax.Array:
    """Per-example pytree with leaves [n, ...] -> f32 [n, dim]: ``flat(g) @ R``, R ~ N(0, 1/dim).

    R is generated leaf by leaf, and for leaves with more than ``_PROJ_BLOCK_ELEMS / dim``
    entries in row blocks of that many entries, each block from ``fold_in(fold_in(key, leaf),
    block)``, so it is the same matrix for every chunk, checkpoint and run with this seed.
    """
    rows_per_block = max(1, _PROJ_BLOCK_ELEMS // dim)
    out = jnp.zeros((n, dim), jnp.float32)
    for leaf_index, leaf in enumerate(jax.tree.leaves(tree)):
        g = leaf.reshape(n, -1).astype(jnp.float32)  # [n, m]
        m = g.shape[1]
        leaf_key = jax.random.fold_in(key, leaf_index)
        n_blocks = -(-m // rows_per_block)
        rows = min(m, rows_per_block)
        if n_blocks == 1:  # most leaves: one block, no loop (keeps compilation short)
            r = jax.random.normal(jax.random.fold_in(leaf_key, 0), (m, dim), jnp.float32)
            out = out + g @ r  # [n, m] @ [m, dim]
            continue
        g = jnp.pad(g, ((0, 0), (0, n_blocks * rows - m))).reshape(n, n_blocks, rows)
        g = jnp.moveaxis(g, 1, 0)  # [n_blocks, n, rows]

        def block(acc, xs, leaf_key=leaf_key, rows=rows):
            j, g_block = xs  # g_block [n, rows]
            r = jax.random.normal(jax.random.fold_in(leaf_key, j), (rows, dim), jnp.float32)
            return acc + g_block @ r, None

        out, _ = jax.lax.scan(block, out, (jnp.arange(n_blocks), g))
    return out / jnp.sqrt(jnp.float32(dim))


def _chunk_map(fn: Callable[[Batch], jax.Array], batch: Batch, n: int, chunk: int) -> jax.Array:
    """``fn`` over ``batch`` in chunks of ``chunk`` examples (lax.map): [n_chunks, chunk, ...].

    The last chunk is padded by repeating the last example; callers drop the padded rows.
    """
    n_chunks = -(-n // chunk)
    idx = jnp.minimum(jnp.arange(n_chunks * chunk), n - 1).reshape(n_chunks, chunk)
    chunks = jax.tree.map(lambda x: jnp.asarray(x)[idx], batch)  # [n_chunks, chunk, ...]
    return jax.lax.map(fn, chunks)


def _make_features(
    per_example_loss: LossFn, combine: CombineFn, mode: str, proj_dim: int
) -> Callable[[PyTree, PyTree, Batch, jax.Array], jax.Array]:
    """(trainable, frozen, chunk [c, ...], key) -> f32 [c, P] (exact) or [c, proj_dim]."""

    def features(trainable: PyTree, frozen: PyTree, chunk: Batch, key: jax.Array) -> jax.Array:
        c = next(iter(chunk.values())).shape[0]
        # vmap(grad) over the examples of the chunk: leaves [c, *leaf_shape].
        grads = per_example_grads(per_example_loss, trainable, frozen, chunk, combine=combine)
        if mode == "exact":
            return _flatten(grads, c)  # [c, P]
        return _project(grads, c, key, proj_dim)  # [c, d]

    return features


@functools.lru_cache(maxsize=16)
def _make_dots_fn(
    per_example_loss: LossFn,
    combine: CombineFn,
    mode: str,
    proj_dim: int,
    chunk_size: int,
    n_train: int,
    n_test: int,
) -> Callable[..., jax.Array]:
    """Jitted (trainable, frozen, train_batch, test_batch, key) -> f32 [n_test, n_train]."""
    features = _make_features(per_example_loss, combine, mode, proj_dim)

    def dot(test_feats: jax.Array, feats: jax.Array) -> jax.Array:
        # [n_test, D] x [chunk, D] -> [n_test, chunk]; exact f32 (no TF32) for long sums.
        return jnp.einsum("td,cd->tc", test_feats, feats, precision=jax.lax.Precision.HIGHEST)

    def separate(trainable, frozen, train_batch, test_batch, key):
        """Projected mode, arrays of different shapes: test projections by one lax.map, then
        the train chunks by another (two traced copies)."""
        c_test = min(chunk_size, n_test)
        test_feats = _chunk_map(
            lambda ch: features(trainable, frozen, ch, key), test_batch, n_test, c_test
        )
        test_feats = test_feats.reshape(-1, test_feats.shape[-1])[:n_test]  # [n_test, D]
        c_train = min(chunk_size, n_train)
        out = _chunk_map(
            lambda ch: dot(test_feats, features(trainable, frozen, ch, key)),
            train_batch,
            n_train,
            c_train,
        )  # [n_chunks, n_test, chunk]
        return jnp.moveaxis(out, 0, 1).reshape(n_test, -1)[:, :n_train]

    def fused(trainable, frozen, train_batch, test_batch, key):
        """Projected mode: one lax.scan over test chunks then train chunks: the model is traced
        (and compiled) once. The test projections [n_test, d] accumulate in the carry; dots of
        the test chunks are dropped."""
        c = min(chunk_size, max(n_train, n_test))
        n_te, n_tr = -(-n_test // c), -(-n_train // c)
        idx_te = jnp.minimum(jnp.arange(n_te * c), n_test - 1).reshape(n_te, c)
        idx_tr = jnp.minimum(jnp.arange(n_tr * c), n_train - 1).reshape(n_tr, c)
        chunks = jax.tree.map(
            lambda te, tr: jnp.concatenate([jnp.asarray(te)[idx_te], jnp.asarray(tr)[idx_tr]]),
            test_batch,
            train_batch,
        )  # [n_te + n_tr, c, ...]
        width = count_params(trainable) if mode == "exact" else proj_dim
        buf = jnp.zeros((n_te * c, width), jnp.float32)  # test features [n_test (padded), D]

        def body(buf, xs):
            j, chunk = xs
            feats = features(trainable, frozen, chunk, key)  # [c, D]
            buf = jax.lax.cond(
                j < n_te,
                lambda b: jax.lax.dynamic_update_slice(b, feats, (j * c, 0)),
                lambda b: b,
                buf,
            )
            return buf, dot(buf[:n_test], feats)

        _, out = jax.lax.scan(body, buf, (jnp.arange(n_te + n_tr), chunks))
        out = out[n_te:]  # [n_tr, n_test, c]
        return jnp.moveaxis(out, 0, 1).reshape(n_test, -1)[:, :n_train]

    def stream_separate(trainable, frozen, train_batch, test_batch, key):
        """Exact mode, pool and test arrays of different shapes: for each test chunk (lax.map),
        its gradients, then a lax.map over the pool chunks (two traced copies of the model)."""
        c_test = min(chunk_size, n_test)
        c_train = min(chunk_size, n_train)

        def per_test_chunk(test_chunk):
            test_feats = features(trainable, frozen, test_chunk, key)  # [c_test, P]
            return _chunk_map(
                lambda ch: dot(test_feats, features(trainable, frozen, ch, key)),
                train_batch,
                n_train,
                c_train,
            )  # [n_tr, c_test, c_train]

        out = _chunk_map(per_test_chunk, test_batch, n_test, c_test)  # [n_te, n_tr, c_te, c_tr]
        out = jnp.moveaxis(out, 2, 1)  # [n_te, c_te, n_tr, c_tr]
        return out.reshape(out.shape[0] * c_test, -1)[:n_test, :n_train]

    def stream_fused(trainable, frozen, train_batch, test_batch, key):
        """Exact mode: one lax.scan over the items (test chunk j, pool chunk 0, ..., pool chunk
        n_tr - 1) for j = 0..n_te - 1. The carry holds the current test chunk's gradients
        [c, P], so memory is two chunks of gradients whatever n_test; the pool's gradients are
        recomputed once per test chunk. The model is traced once."""
        c = min(chunk_size, max(n_train, n_test))
        n_te, n_tr = -(-n_test // c), -(-n_train // c)
        both = jax.tree.map(
            lambda te, tr: jnp.concatenate([jnp.asarray(te), jnp.asarray(tr)]),
            test_batch,
            train_batch,
        )  # [n_test + n_train, ...]
        idx_te = jnp.minimum(jnp.arange(n_te * c), n_test - 1).reshape(n_te, 1, c)
        idx_tr = n_test + jnp.minimum(jnp.arange(n_tr * c), n_train - 1).reshape(1, n_tr, c)
        rows = jnp.concatenate([idx_te, jnp.broadcast_to(idx_tr, (n_te, n_tr, c))], axis=1).reshape(
            -1, c
        )  # [n_te * (1 + n_tr), c] example indices into `both`
        is_test = (jnp.arange(n_te * (1 + n_tr)) % (1 + n_tr)) == 0
        buf = jnp.zeros((c, count_params(trainable)), jnp.float32)  # one test chunk [c, P]

        def body(buf, xs):
            test_item, idx = xs
            chunk = jax.tree.map(lambda a: a[idx], both)  # [c, ...]
            feats = features(trainable, frozen, chunk, key)  # [c, P]
            buf = jax.lax.cond(test_item, lambda: feats, lambda: buf)
            return buf, dot(buf, feats)  # [c_test, c_train]

        _, out = jax.lax.scan(body, buf, (is_test, rows))
        out = out.reshape(n_te, 1 + n_tr, c, c)[:, 1:]  # [n_te, n_tr, c_test, c_train]
        out = jnp.moveaxis(out, 2, 1).reshape(n_te * c, n_tr * c)
        return out[:n_test, :n_train]

    def dots(trainable, frozen, train_batch, test_batch, key):
        same = jax.tree.map(
            lambda a, b: np.shape(a)[1:] == np.shape(b)[1:] and a.dtype == b.dtype,
            train_batch,
            test_batch,
        )
        shared = all(jax.tree.leaves(same))
        if mode == "exact":
            run = stream_fused if shared else stream_separate
        else:
            run = fused if shared else separate
        return run(trainable, frozen, train_batch, test_batch, key)

    return jax.jit(dots)


def compute_dots(
    per_example_loss: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    train_batch: Batch,
    test_batch: Batch,
    *,
    mode: str = "exact",
    proj_dim: int = 4096,
    seed: int = 0,
    chunk_size: int = _DEFAULT_CHUNK,
    combine: CombineFn | None = None,
) -> Float[Array, "n_test n_train"]:
    """Gradient dot products of every test example with every training example.

    ``dots[z, i] = grad_t L(z; theta) . grad_t L(z_i; theta)`` where ``grad_t`` is the gradient
    with respect to the trainable parameters only and ``theta = combine(trainable, frozen)``.
    One jitted call: per-example gradients (``finetune.model.per_example_grads``, a
    ``vmap(grad)``) over chunks of ``chunk_size`` examples in one ``lax.scan`` (the model is
    traced once), no Python loop over examples. Exact mode holds one test chunk's gradients
    and streams the pool past it, test chunk after test chunk (no ``[n_test, P]`` buffer; the
    pool's gradients are computed ``ceil(n_test / chunk_size)`` times); projected mode projects
    the test chunks first, then the pool chunks. Pool and test arrays with different trailing
    shapes take nested maps instead (the model is traced twice).
    The compiled function is cached on the identity of ``per_example_loss`` and ``combine`` plus
    the settings and batch sizes, so pass the same loss object for every checkpoint: a new
    closure (e.g. another ``make_per_example_loss(graphdef)`` call) compiles again.

    Args:
        per_example_loss: ``(params, batch) -> f32 [b]``; the loss of each example of a batch
            (for finetune: token cross-entropy averaged over the target tokens).
        trainable: pytree of the trainable parameters (IA3 vectors or everything).
        frozen: pytree of the other parameters (passed to ``combine``; may be empty).
        train_batch: dict of arrays with leading axis n_train (e.g. inputs int32 [n_train, L_in],
            targets int32 [n_train, L_tgt]).
        test_batch: same with leading axis n_test.
        mode: ``"exact"`` (flattened gradients) or ``"projected"`` (random projection to
            ``proj_dim`` dimensions; unbiased, standard deviation at most about
            ``sqrt(2 / proj_dim) * |g1| |g2|``, i.e. ``sqrt((1 + 1 / cos^2) / proj_dim)``
            relative to the dot itself, large for nearly orthogonal gradients).
        proj_dim: projection dimension d (projected mode only); at most the number of
            trainable parameters.
        seed: seed of the projection (projected mode only); the same seed gives the same
            projection for every checkpoint and run.
        chunk_size: examples per ``vmap(grad)`` chunk; memory grows with ``chunk_size * P``
            (two chunks of gradients in exact mode, one in projected mode; see
            ``estimate_memory``) plus the activations of that many examples.
        combine: ``(trainable, frozen) -> params``; defaults to ``finetune.model.combine``.

    Returns:
        f32 [n_test, n_train] dot products.

    Raises:
        ValueError: unknown mode, bad chunk_size/proj_dim, proj_dim larger than the number of
            trainable parameters, no trainable parameters, batches of inconsistent sizes, or
            train and test batches with different keys.

    References:
        Pruthi et al. 2020, https://arxiv.org/abs/2002.08484 (TracIn-CP); random projections as
        in its Section 3.2 and Park et al. 2023, https://arxiv.org/abs/2303.14186 (TRAK).
    """
    _check_mode(mode, proj_dim, chunk_size)
    n_params = count_params(trainable)
    if n_params == 0:
        raise ValueError("the trainable parameters are empty; check the trainable mask")
    if mode == "projected" and proj_dim > n_params:
        raise ValueError(
            f"proj_dim={proj_dim} exceeds the {n_params} trainable parameters; "
            f"use --proj-dim <= {n_params} or --mode exact"
        )
    n_train = _batch_size(train_batch, "train_batch")
    n_test = _batch_size(test_batch, "test_batch")
    if set(train_batch) != set(test_batch):
        raise ValueError(
            f"train_batch has keys {sorted(train_batch)} but test_batch has {sorted(test_batch)}; "
            "pass both with the same keys (drop the extra arrays)"
        )
    if combine is None:
        combine = _model_combine
    fn = _make_dots_fn(
        per_example_loss,
        combine,
        mode,
        int(proj_dim) if mode == "projected" else 0,
        int(chunk_size),
        n_train,
        n_test,
    )
    return fn(trainable, frozen, train_batch, test_batch, jax.random.key(seed))


@functools.lru_cache(maxsize=8)
def _make_projected_fn(
    per_example_loss: LossFn, combine: CombineFn, proj_dim: int, chunk_size: int, n: int
) -> Callable[..., jax.Array]:
    """Jitted (trainable, frozen, batch, key) -> f32 [n, proj_dim]."""
    features = _make_features(per_example_loss, combine, "projected", proj_dim)

    def run(trainable, frozen, batch, key):
        c = min(chunk_size, n)
        out = _chunk_map(lambda ch: features(trainable, frozen, ch, key), batch, n, c)
        return out.reshape(-1, proj_dim)[:n]

    return jax.jit(run)


def projected_gradients(
    per_example_loss: LossFn,
    trainable: PyTree,
    frozen: PyTree,
    batch: Batch,
    *,
    proj_dim: int = 4096,
    seed: int = 0,
    chunk_size: int = _DEFAULT_CHUNK,
    combine: CombineFn | None = None,
) -> Float[Array, "n proj_dim"]:
    """The projected per-example gradients of ``compute_dots``'s projected mode.

    ``compute_dots(..., mode="projected")`` returns the dot products of exactly these rows (same
    seed, same Gaussian matrix), so ``projected_gradients(test) @ projected_gradients(pool).T``
    is its output. Used as example features (`finetune.features`).

    Args:
        per_example_loss: ``(params, batch) -> f32 [b]``.
        trainable: trainable parameters; frozen: the others.
        batch: dict of arrays with leading axis n.
        proj_dim: projection dimension (at most the number of trainable parameters).
        seed: projection seed.
        chunk_size: examples per vmapped chunk.
        combine: ``(trainable, frozen) -> params``; default ``finetune.model.combine``.

    Returns:
        f32 [n, proj_dim].

    Raises:
        ValueError: bad proj_dim or chunk_size, no trainable parameters, an empty batch.

    References:
        Pruthi et al. 2020, https://arxiv.org/abs/2002.08484 (Section 3.2, projections).
    """
    _check_mode("projected", proj_dim, chunk_size)
    n_params = count_params(trainable)
    if n_params == 0:
        raise ValueError("the trainable parameters are empty; check the trainable mask")
    if proj_dim > n_params:
        raise ValueError(f"proj_dim={proj_dim} exceeds the {n_params} trainable parameters")
    n = _batch_size(batch, "batch")
    fn = _make_projected_fn(
        per_example_loss, combine or _model_combine, int(proj_dim), int(chunk_size), n
    )
    return fn(trainable, frozen, batch, jax.random.key(seed))


# --------------------------------------------------------------------------------------------
# Memory: estimated before any gradient work, refused when it cannot fit.

_F32 = 4  # bytes
# T5 configs of the paper models named by hub id, used only when their config.json is neither a
# local folder nor in the Hugging Face cache (e.g. `finetune tracin-estimate` on a machine that
# never downloaded them). Values of the published config.json files.
_KNOWN_T5 = {
    "bigscience/T0_3B": dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "google/t5-base-lm-adapt": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12),
}
_T5_V11 = dict(
    vocab_size=32128,
    d_kv=64,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    relative_attention_num_buckets=32,
    dropout_rate=0.0,
    decoder_start_token_id=0,
)


class TracinMemoryError(ValueError):
    """A TracIn-CP setting whose estimated memory exceeds the device's."""


def estimate_memory(
    *,
    n_params: int,
    n_trainable: int,
    n_train: int,
    n_test: int,
    mode: str,
    proj_dim: int,
    chunk_size: int,
    largest_leaf: int = 0,
) -> dict[str, int]:
    """A lower bound of TracIn-CP's peak memory (bytes), buffer by buffer.

    Counts the buffers ``run_tracin`` and ``compute_dots`` must hold at once, all float32:
    the loaded parameters plus a restored trainable checkpoint; in exact mode the flattened
    gradients of one test chunk (the scan's carry) and of one pool chunk, ``[c, P]`` each; in
    projected mode the per-example gradients of one chunk ``[c, P]``, the test projections
    ``[n_test (padded), d]`` and one block of the Gaussian matrix (at most
    ``_PROJ_BLOCK_ELEMS`` entries, fewer for a leaf of fewer rows); and the dot products.
    Activations and XLA's temporaries come on top, so a setting above the device's memory
    cannot run, and one below may still not.

    Args:
        n_params: all parameters of the model.
        n_trainable: the trainable ones P (the width of an exact gradient).
        n_train: pool size.
        n_test: tracked test examples.
        mode: ``"exact"`` or ``"projected"``.
        proj_dim: projection dimension d (projected mode).
        chunk_size: examples per per-example-gradient chunk (as ``compute_dots``).
        largest_leaf: entries of the largest trainable leaf (projected mode: bounds the
            Gaussian block; 0 leaves that block out).

    Returns:
        ``{"parameters", "test gradients", "pool gradients", "projection", "dots", "total"}``
        in bytes ("projection" is 0 in exact mode).
    """
    c = min(chunk_size, max(n_train, n_test))
    n_te, n_tr = -(-n_test // c), -(-n_train // c)
    out = {"parameters": _F32 * (n_params + n_trainable)}
    if mode == "exact":
        out["test gradients"] = _F32 * c * n_trainable
        out["pool gradients"] = _F32 * c * n_trainable
        out["projection"] = 0
        out["dots"] = _F32 * (n_te * (1 + n_tr) * c * c + n_test * n_train)
    else:
        out["test gradients"] = _F32 * n_te * c * proj_dim
        out["pool gradients"] = _F32 * c * n_trainable
        rows = min(largest_leaf, max(1, _PROJ_BLOCK_ELEMS // proj_dim))
        out["projection"] = _F32 * rows * proj_dim
        out["dots"] = _F32 * ((n_te + n_tr) * n_test * c + n_test * n_train)
    out["total"] = sum(out.values())
    return out


def device_memory() -> tuple[int, str]:
    """Memory of the device TracIn-CP runs on (the first local one), with its name.

    Returns:
        ``(bytes, description)``: ``memory_stats()['bytes_limit']`` where the backend reports
        it (GPU, TPU), else the host's physical RAM (the CPU backend).
    """
    dev = jax.local_devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:  # backends without memory statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"the {dev.device_kind} ({dev.platform})"
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram), "this host's RAM (CPU backend)"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _t5_config(config: Any, model_config: str | Path | None = None) -> Any:
    """The transformers.T5Config of an ExperimentConfig's model, without its weights."""
    import transformers

    from finetune import hf

    if model_config is not None:
        path = Path(model_config)
        return hf.load_config(path.parent if path.is_file() else path)
    if config.model is None:
        return transformers.T5Config(**config.random_init)
    if Path(config.model).expanduser().is_dir():
        return hf.load_config(Path(config.model).expanduser())
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(config.model), "config.json")
    except Exception:  # a name the hub library refuses
        cached = None
    if isinstance(cached, str):
        return hf.load_config(Path(cached).parent)
    if config.model in _KNOWN_T5:
        return transformers.T5Config(**_T5_V11, **_KNOWN_T5[config.model])
    try:  # only config.json (kilobytes); fails offline
        from huggingface_hub import hf_hub_download

        return hf.load_config(Path(hf_hub_download(str(config.model), "config.json")).parent)
    except Exception:  # offline, unknown repository
        pass
    raise ValueError(
        f"model {config.model}: its config.json is neither a local folder nor in the Hugging "
        "Face cache, and the hub cannot be reached; download the model first, or pass "
        "`finetune tracin-estimate --model-config PATH/config.json`"
    )


def param_counts(config: Any, model_config: str | Path | None = None) -> tuple[int, int, int]:
    """``(all parameters, trainable parameters, largest trainable leaf)`` of a config's model.

    Built with ``nnx.eval_shape`` (``jax.eval_shape``): shapes only, no weights allocated or
    read, so it is instant for a 3B model.

    Args:
        config: a ``finetune.config.ExperimentConfig``.
        model_config: a T5 ``config.json`` (or its folder) to use instead of the model's.

    Returns:
        The parameter counts; trainable as ``finetune.experiment.make_mask`` selects them.

    Raises:
        ValueError: the model's config.json cannot be found offline (see ``_t5_config``).
    """
    from flax import nnx

    from finetune import experiment as E
    from finetune.network import T5

    t5 = _t5_config(config, model_config)
    model = nnx.eval_shape(
        lambda: T5(
            t5,
            ia3=config.method == "ia3",
            rngs=nnx.Rngs(0),
            scan_layers=config.scan_layers,
            attention=config.attention,
        )
    )
    _, params = nnx.split(model)
    trainable, _ = partition(params, E.make_mask(config, params))
    largest = max((int(np.prod(np.shape(x))) for x in jax.tree.leaves(trainable)), default=0)
    return count_params(params), count_params(trainable), largest


def check_memory(
    *,
    n_params: int,
    n_trainable: int,
    n_train: int,
    n_test: int,
    mode: str,
    proj_dim: int,
    chunk_size: int,
    where: str,
    largest_leaf: int = 0,
    device_bytes: int | None = None,
    device_name: str | None = None,
    flags: tuple[str, str] = ("--chunk-size {}", "--mode projected"),
) -> dict[str, int]:
    """Estimates TracIn-CP's memory (``estimate_memory``) and refuses what cannot fit.

    Args:
        n_params, n_trainable, n_train, n_test, mode, proj_dim, chunk_size, largest_leaf: as
            ``estimate_memory``.
        where: the config or experiment, for the message.
        device_bytes: the device's memory; None: ``device_memory()``.
        device_name: its description for the message.
        flags: how the message tells the user to set a chunk size (a format string) and
            projected mode.

    Returns:
        The estimate, when it fits.

    Raises:
        TracinMemoryError: one line naming the estimate, the device's memory and the fix (a
            chunk size that fits, projected mode, or a larger device).
    """
    if device_bytes is None:
        device_bytes, device_name = device_memory()
    device_name = device_name or "the device"
    sizes = dict(
        n_params=n_params,
        n_trainable=n_trainable,
        n_train=n_train,
        n_test=n_test,
        largest_leaf=largest_leaf,
    )
    est = estimate_memory(**sizes, mode=mode, proj_dim=proj_dim, chunk_size=chunk_size)
    if est["total"] <= device_bytes:
        return est
    fixes = []
    fits = [
        c
        for c in range(min(chunk_size, max(n_train, n_test)) - 1, 0, -1)
        if estimate_memory(**sizes, mode=mode, proj_dim=proj_dim, chunk_size=c)["total"]
        <= device_bytes
    ]
    if fits:
        fixes.append(f"lower the chunk size to {fits[0]} ({flags[0].format(fits[0])})")
    if mode == "exact":
        d = min(proj_dim, n_trainable)
        for c in (chunk_size, *range(chunk_size - 1, 0, -1)):
            if estimate_memory(**sizes, mode="projected", proj_dim=d, chunk_size=c)["total"] <= (
                device_bytes
            ):
                at = "" if c == chunk_size else f" {flags[0].format(c)}"
                fixes.append(f"use projected mode ({flags[1]}{at}; d = {d})")
                break
    fix = " or ".join(fixes) if fixes else "use a device with more memory"
    what = (
        f"2 chunks of {min(chunk_size, max(n_train, n_test))} gradients x {n_trainable:,} "
        "trainable parameters"
        if mode == "exact"
        else f"a chunk of {min(chunk_size, max(n_train, n_test))} gradients x "
        f"{n_trainable:,} trainable parameters, {n_test} projections of {proj_dim}"
    )
    raise TracinMemoryError(
        f"{where}: TracIn-CP in {mode} mode needs at least {_gb(est['total'])} (parameters "
        f"{_gb(est['parameters'])}, {what}: "
        f"{_gb(est['test gradients'] + est['pool gradients'])}) but {device_name} has "
        f"{_gb(device_bytes)}; {fix}"
    )


def check_config_memory(
    config: Any,
    *,
    mode: str | None = None,
    proj_dim: int | None = None,
    chunk_size: int | None = None,
    where: str | None = None,
    device_bytes: int | None = None,
    device_name: str | None = None,
    model_config: str | Path | None = None,
    flags: tuple[str, str] = ("--chunk-size {}", "--mode projected"),
) -> dict[str, int]:
    """``check_memory`` for an ExperimentConfig (parameter counts by ``param_counts``).

    Args:
        config: the experiment config (n_train, n_test, tracin_*).
        mode: overrides ``config.tracin_mode``.
        proj_dim: overrides ``config.tracin_proj_dim``.
        chunk_size: overrides ``config.tracin_chunk_size``.
        where: names the config in the message (default: its name).
        device_bytes: the device's memory; None: ``device_memory()``.
        device_name: its description.
        model_config: see ``param_counts``.
        flags: see ``check_memory``.

    Returns:
        The estimate (``estimate_memory``) plus ``n_params`` and ``n_trainable``.

    Raises:
        TracinMemoryError: the setting cannot fit (see ``check_memory``).
        ValueError: the model's config cannot be found (see ``param_counts``); a projection
            larger than the trainable parameters.
    """
    n_params, n_trainable, largest = param_counts(config, model_config)
    mode = mode or config.tracin_mode
    proj_dim = proj_dim or config.tracin_proj_dim
    if mode == "projected" and proj_dim > n_trainable:
        raise ValueError(
            f"{where or config.name}: tracin_proj_dim={proj_dim} exceeds the {n_trainable} "
            f"trainable parameters; use a tracin_proj_dim <= {n_trainable} or tracin_mode=exact"
        )
    est = check_memory(
        n_params=n_params,
        n_trainable=n_trainable,
        largest_leaf=largest,
        n_train=config.n_train,
        n_test=config.n_test,
        mode=mode,
        proj_dim=proj_dim,
        chunk_size=chunk_size or config.tracin_chunk_size,
        where=where or f"config {config.name!r}",
        device_bytes=device_bytes,
        device_name=device_name,
        flags=flags,
    )
    return {**est, "n_params": n_params, "n_trainable": n_trainable}


# --------------------------------------------------------------------------------------------
# Over an experiment directory.


def _run_length(run_dir: Path) -> int:
    """The number of steps T of a complete run (rows of its curriculum.npy)."""
    return int(np.load(run_dir / "curriculum.npy", mmap_mode="r").shape[0])


def _lr_at_checkpoints(run_dir: Path, steps: Sequence[int]) -> np.ndarray:
    """f32 [K]: lr of step s + 1 for a checkpoint at step s (lr of step T for s == T)."""
    path = run_dir / "lr.npy"
    if not path.is_file():
        raise ValueError(
            f"{path} is missing; TracIn-CP needs the learning rate of every step "
            "(finetune run writes it); re-run training for this run"
        )
    lr = np.load(path)
    if lr.ndim != 1 or lr.size == 0:
        raise ValueError(f"{path}: expected float32 [steps], got shape {lr.shape}")
    total = lr.shape[0]
    bad = [s for s in steps if not 0 <= s <= total]
    if bad:
        raise ValueError(
            f"{run_dir}/checkpoints: steps {bad} are outside 0..{total} (the run's {total} steps "
            f"in {path}); the checkpoints do not belong to this run"
        )
    return np.asarray([lr[min(s, total - 1)] for s in steps], np.float32)


def _check_like(restored: PyTree, target: PyTree, where: str) -> None:
    """Raise ValueError at ``where`` unless ``restored`` has the structure/shapes of ``target``."""
    s_r, s_t = jax.tree.structure(restored), jax.tree.structure(target)
    if s_r != s_t:
        raise ValueError(
            f"{where}: the checkpoint's parameter tree does not match the experiment config "
            f"({s_r.num_leaves} vs {s_t.num_leaves} leaves); was it written by another config?"
        )
    for path, (a, b) in zip(
        jax.tree_util.tree_leaves_with_path(target),
        zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True),
        strict=True,
    ):
        if np.shape(a) != np.shape(b):
            name = jax.tree_util.keystr(path[0])
            raise ValueError(
                f"{where}: parameter {name} has shape {np.shape(a)} in the checkpoint but "
                f"{np.shape(b)} in the experiment config; was it written by another config?"
            )


def _restore(run_dir: Path, step: int, target: PyTree) -> PyTree:
    from finetune.experiment import checkpoint_error_reason, restore_trainable

    where = f"{run_dir / 'checkpoints'} (step {step})"
    try:
        restored = restore_trainable(run_dir, step, target)
    except Exception as e:  # orbax raises many types for a mismatched or damaged checkpoint
        raise ValueError(
            f"{where}: cannot restore it against the experiment config "
            f"({checkpoint_error_reason(e)}); it is damaged or was written by another config: "
            f"delete {run_dir} and run `finetune run` again to retrain the run"
        ) from e
    _check_like(restored, target, where)
    return restored


def _digest(tree: PyTree) -> str:
    """Content hash of a parameter tree (identical checkpoints share their dot products)."""
    h = hashlib.blake2b(digest_size=20)
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _same_widths(pool: Batch, test: Batch) -> tuple[Batch, Batch]:
    """Pad token arrays with 0 (the pad id, masked by the loss) to common trailing widths.

    The pool and the test set are padded to their own longest input; one width lets
    ``compute_dots`` trace the model once (see ``fused``) instead of twice.
    """
    out_pool, out_test = {}, {}
    for key in pool:
        a, b = np.asarray(pool[key]), np.asarray(test[key])
        if a.ndim == b.ndim == 2 and a.shape[1] != b.shape[1]:
            width = max(a.shape[1], b.shape[1])
            a = np.pad(a, ((0, 0), (0, width - a.shape[1])))
            b = np.pad(b, ((0, 0), (0, width - b.shape[1])))
        out_pool[key], out_test[key] = jnp.asarray(a), jnp.asarray(b)
    return out_pool, out_test


def _promised_steps(run_dir: Path) -> list[int] | None:
    """Checkpoint steps recorded in meta.json by finetune run, if any."""
    import json

    try:
        meta = json.loads((run_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    steps = meta.get("checkpoint_steps") if isinstance(meta, dict) else None
    return [int(s) for s in steps] if isinstance(steps, list) else None


def _select_runs(exp_dir: Path, runs: Sequence[int] | None) -> list[tuple[int, Path]]:
    from simfluence.runlog import list_runs

    found = list_runs(exp_dir)
    by_index = {i: (p, complete) for i, p, complete in found}
    wanted = sorted(by_index) if runs is None else list(dict.fromkeys(int(r) for r in runs))
    missing = [i for i in wanted if i not in by_index]
    if missing:
        raise ValueError(
            f"{exp_dir}: runs {missing} do not exist (found {sorted(by_index)}); check --runs"
        )
    selected = []
    for i in wanted:
        path, complete = by_index[i]
        if not complete:
            _LOG.warning("%s is incomplete (no meta.json with status complete); skipped", path)
            continue
        selected.append((i, Path(path)))
    if not selected:
        which = "runs" if runs is None else f"runs {wanted}"
        raise ValueError(
            f"{exp_dir}: none of its {which} is complete yet; TracIn-CP reads the checkpoints of "
            "complete runs: finish them first (`finetune run CONFIG --out EXP`, or `make runs`)"
        )
    return selected


def run_tracin(
    exp_dir: str | Path,
    *,
    runs: Sequence[int] | None = None,
    mode: str | None = None,
    proj_dim: int | None = None,
    seed: int | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    device_bytes: int | None = None,
) -> list[Path]:
    """Write ``run_XXX/tracin.npz`` for every complete run of an experiment.

    For each selected run and each of its checkpoints (see the module docstring for the step and
    learning-rate convention), restores the trainable state, computes the dot products of all
    n_train pool examples with all n_test tracked examples (``compute_dots``) and writes
    ``steps`` int32 [K], ``learning_rates`` f32 [K], ``dots`` f32 [K, n_test, n_train], ``mode``,
    ``proj_dim`` (0 for exact) and ``seed`` atomically through ``simfluence.runlog.write_tracin``.
    A checkpoint at the run's last step T is skipped, with a line on stderr (with ``progress``)
    or in the log: no step follows it, and TracIn-CP pairs step t with the latest checkpoint at
    or before step t - 1, so its dots would never be used; ``steps`` leaves it out. A run whose
    only checkpoint is at step T counts as a run without checkpoints.
    Runs whose ``tracin.npz`` already covers the checkpoints the run lists (meta.json's
    ``checkpoint_steps``, else those on disk; less step T) are skipped (resumable per run),
    even if the checkpoints have since been deleted; a ``tracin.npz`` with other steps is
    recomputed with a warning. Every other selected run is checked (checkpoints present,
    lr.npy present) before anything is computed.

    Args:
        exp_dir: experiment directory (experiment.json, run_XXX/ with checkpoints/).
        runs: run indices to process (each must have checkpoints); None processes every
            complete run that saved checkpoints (an error if none is complete or none did).
        mode: ``"exact"`` or ``"projected"`` (see ``compute_dots``); None: the experiment
            config's ``tracin_mode`` (as recorded in experiment.json).
        proj_dim: projection dimension for projected mode; None: ``tracin_proj_dim``.
        seed: projection seed for projected mode; None: ``tracin_seed``.
        chunk_size: examples per per-example-gradient chunk; None: ``tracin_chunk_size``.
        progress: show a progress bar and per-checkpoint timing lines on stderr.
        device_bytes: the device memory the estimate is compared with; None:
            ``device_memory()``.

    Returns:
        The paths of the ``tracin.npz`` files written (skipped runs excluded).

    Raises:
        ValueError: naming the file or run: a selected run without checkpoints or lr.npy, a
            checkpoint that does not match the experiment config, proj_dim larger than the number
            of trainable parameters, runs that do not exist, no selected run complete,
            non-finite dot products.
        TracinMemoryError: the estimated memory (``check_memory``) exceeds the device's;
            checked before any checkpoint is restored or gradient computed.

    References:
        Pruthi et al. 2020, https://arxiv.org/abs/2002.08484.
    """
    from finetune.experiment import checkpoint_steps, load_experiment, read_config
    from simfluence.runlog import read_tracin, write_tracin

    exp_dir = Path(exp_dir)
    config = read_config(exp_dir)
    mode = config.tracin_mode if mode is None else mode
    proj_dim = config.tracin_proj_dim if proj_dim is None else proj_dim
    seed = config.tracin_seed if seed is None else seed
    chunk_size = config.tracin_chunk_size if chunk_size is None else chunk_size
    _check_mode(mode, proj_dim, chunk_size)
    selected = _select_runs(exp_dir, runs)
    plan = []
    without = []  # complete runs that saved no checkpoints
    for index, run_dir in selected:
        steps = sorted(int(s) for s in checkpoint_steps(run_dir))
        promised = _promised_steps(run_dir)
        listed = sorted(promised) if promised is not None else steps
        n_steps = _run_length(run_dir)
        listed = [s for s in listed if s != n_steps]
        done = read_tracin(run_dir)
        if done is not None and done["steps"].tolist() == listed:
            asked = (mode, int(proj_dim) if mode == "projected" else 0, int(seed))
            have = (done["mode"], int(done["proj_dim"]), int(done["seed"]))
            message = (
                f"{run_dir / 'tracin.npz'} exists (mode={have[0]} proj_dim={have[1]} "
                f"seed={have[2]}); skipped, delete it to recompute"
            )
            if have != asked and not mode == have[0] == "exact":
                _LOG.warning("%s", message)
            elif progress:
                print(message, file=sys.stderr)
            continue
        if promised is not None and sorted(promised) != steps:
            lost = sorted(set(promised) - set(steps))
            raise ValueError(
                f"{run_dir / 'checkpoints'}: meta.json lists checkpoints at steps {promised} but "
                f"found {steps} (missing {lost}); re-run training for run {index}"
            )
        if n_steps in steps:
            message = (
                f"{run_dir.name}: checkpoint at step {n_steps}, the run's last step, skipped "
                "(TracIn-CP pairs step t with a checkpoint at or before step t - 1)"
            )
            if progress:
                print(message, file=sys.stderr)
            else:
                _LOG.info("%s", message)
            steps = [s for s in steps if s != n_steps]
        if not steps:
            without.append((index, run_dir))
            continue
        if done is not None:
            _LOG.warning(
                "%s: checkpoint steps %s differ from the run's checkpoints %s; recomputing it",
                run_dir / "tracin.npz",
                done["steps"].tolist(),
                steps,
            )
        plan.append((index, run_dir, steps, _lr_at_checkpoints(run_dir, steps)))
    if without and (runs is not None or len(without) == len(selected)):
        index, run_dir = without[0]
        names = ", ".join(p.name for _, p in without)
        raise ValueError(
            f"{run_dir}: no checkpoints before the run's last step in {run_dir / 'checkpoints'} "
            f"(runs without them: "
            f"{names}); train with checkpoint_steps set in the config (and checkpoint_runs "
            "covering these runs), or leave them out with --runs"
        )
    for _, run_dir in without:
        _LOG.info("%s saved no checkpoints (checkpoint_runs); skipped", run_dir)
    if not plan:
        return []

    n_params, n_trainable, largest = param_counts(config)
    if mode == "projected" and proj_dim > n_trainable:
        raise ValueError(
            f"{exp_dir}: --proj-dim {proj_dim} exceeds the {n_trainable} trainable parameters of "
            f"this experiment; use --proj-dim <= {n_trainable} or --mode exact"
        )
    check_memory(
        n_params=n_params,
        n_trainable=n_trainable,
        largest_leaf=largest,
        n_train=config.n_train,
        n_test=config.n_test,
        mode=mode,
        proj_dim=proj_dim,
        chunk_size=chunk_size,
        where=str(exp_dir),
        device_bytes=device_bytes,
        device_name=None if device_bytes is None else "the device (given)",
    )
    exp = load_experiment(exp_dir)
    target, frozen = partition(exp.params, exp.mask)
    if count_params(target) != n_trainable:  # param_counts and the loaded model must agree
        raise ValueError(
            f"{exp_dir}: the model has {count_params(target)} trainable parameters, not the "
            f"{n_trainable} its config describes; was it prepared by another version?"
        )
    n_train = _batch_size(exp.pool_batch, f"{exp_dir} pool")
    n_test = _batch_size(exp.test_batch, f"{exp_dir} test set")
    pool, test = _same_widths(dict(exp.pool_batch), dict(exp.test_batch))

    from tqdm.auto import tqdm

    written = []
    seen: dict[str, np.ndarray] = {}  # dots of checkpoints already computed, by content
    total = sum(len(p[2]) for p in plan)
    bar = tqdm(total=total, desc="tracin checkpoints", disable=not progress, file=sys.stderr)
    for _index, run_dir, steps, lrs in plan:
        dots = np.empty((len(steps), n_test, n_train), np.float32)
        for k, step in enumerate(steps):
            start = time.perf_counter()
            trainable = _restore(run_dir, step, target)
            digest = _digest(trainable)
            reused = digest in seen
            if reused:  # e.g. step 0, the same start state in every run
                dots[k] = seen[digest]
            else:
                d = compute_dots(
                    exp.per_example_loss,
                    trainable,
                    frozen,
                    pool,
                    test,
                    mode=mode,
                    proj_dim=proj_dim,
                    seed=seed,
                    chunk_size=chunk_size,
                    combine=_model_combine,
                )
                dots[k] = seen[digest] = np.asarray(d)
            if not np.isfinite(dots[k]).all():
                raise ValueError(
                    f"{run_dir / 'checkpoints'} (step {step}): non-finite gradient dot products; "
                    "the checkpoint or the loss is not finite"
                )
            elapsed = time.perf_counter() - start
            bar.update(1)
            if progress:
                rate = (
                    "same state as an earlier checkpoint, reused"
                    if reused
                    else f"{(n_train + n_test) / elapsed:.1f} per-example grads/s"
                    + (", includes compilation" if len(seen) == 1 else "")
                )
                bar.write(
                    f"{run_dir.name} step {step}: {n_test}x{n_train} dots in {elapsed:.2f} s "
                    f"({rate})",
                    file=sys.stderr,
                )
        write_tracin(
            run_dir,
            steps=np.asarray(steps, np.int32),
            learning_rates=lrs,
            dots=dots,
            mode=mode,
            proj_dim=int(proj_dim) if mode == "projected" else 0,
            seed=int(seed),
        )
        written.append(run_dir / "tracin.npz")
    bar.close()
    return written


if __name__ == "__main__":  # `python -m finetune.tracin EXP ...` is `finetune tracin EXP ...`
    import sys

    from finetune.cli import main

    raise SystemExit(main(["tracin", *sys.argv[1:]]))
