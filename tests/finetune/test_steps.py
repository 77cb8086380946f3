"""Optimizers and the jitted train step (finetune.steps)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

transformers = pytest.importorskip("transformers")

from finetune.hf import init_random  # noqa: E402
from finetune.model import combine, make_per_example_loss, partition, trainable_mask  # noqa: E402
from finetune.steps import make_optimizer, make_train_step  # noqa: E402

from ._tiny import SMALL_T5  # noqa: E402


def _model():
    cfg = transformers.T5Config(**{**SMALL_T5, "dropout_rate": 0.1})
    return nnx.split(init_random(cfg, ia3=True, seed=3))


def _batch(seed):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, 64, size=(4, 6)).astype(np.int32)
    inputs[0, 3:] = 0
    targets = rng.integers(2, 64, size=(4, 3)).astype(np.int32)
    targets[:, -1] = 1
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


@pytest.mark.parametrize(
    "method,opt", [("ia3", "adamw"), ("full", "adafactor")], ids=["ia3-adamw", "full-adafactor"]
)
def test_step_trains_only_the_trainable_part_and_compiles_once(method, opt):
    graphdef, params = _model()
    before = _copy(params)
    mask = trainable_mask(params, method)
    trainable, frozen = partition(params, mask)
    optimizer = make_optimizer(opt, 1e-2, grad_clip_norm=1.0)
    opt_state = optimizer.init(trainable)
    traces = []
    loss_fn = make_per_example_loss(graphdef)

    def counted(p, b, dropout_rng=None):
        traces.append(1)  # runs only while tracing
        return loss_fn(p, b, dropout_rng=dropout_rng)

    step = jax.jit(make_train_step(counted, optimizer), donate_argnums=(0, 1))
    losses = []
    for i in range(4):
        rng = jax.random.fold_in(jax.random.key(0), i) if method == "ia3" else None
        trainable, opt_state, loss = step(trainable, opt_state, frozen, _batch(i % 2), rng)
        losses.append(float(loss))
    assert len(traces) == 1 and step._cache_size() == 1  # no recompile after the first call
    assert all(np.isfinite(losses))
    after = combine(trainable, frozen)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(after)]
    changed = []
    for path, m, a, b in zip(
        paths, jax.tree.leaves(mask), jax.tree.leaves(after), jax.tree.leaves(before), strict=True
    ):
        if not m:  # frozen: bitwise unchanged
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=path)
        else:
            changed.append(not np.array_equal(np.asarray(a), b))
    assert all(changed) if method == "ia3" else sum(changed) == len(changed)


def test_make_optimizer_rejects_bad_input():
    with pytest.raises(ValueError, match="sgd"):
        make_optimizer("sgd", 1e-3)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        make_optimizer("adamw", 1e-3, grad_clip_norm=0.0)
    with pytest.raises(ValueError, match="adafactor"):
        make_optimizer("adafactor", 1e-3, no_such_option=1)
    sched = optax.linear_schedule(1e-3, 0.0, 10)
    assert isinstance(make_optimizer("adafactor", sched), optax.GradientTransformation)
