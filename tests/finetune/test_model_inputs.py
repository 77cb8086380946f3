"""Inputs the model functions cannot honour give NaN or a one-line error, never a wrong number."""

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from finetune.hf import init_random
from finetune.model import (
    combine,
    make_per_example_loss,
    make_score_choices,
    partition,
    per_example_grads,
    trainable_mask,
)
from finetune.steps import make_optimizer, make_train_step

CONFIG = dict(
    vocab_size=64,
    d_model=16,
    d_kv=4,
    d_ff=32,
    num_layers=1,
    num_decoder_layers=1,
    num_heads=4,
    relative_attention_num_buckets=8,
    initializer_factor=1.0,
    dropout_rate=0.0,
)
TOL = 1e-5  # float32: the fused ("xla") and einsum attention paths on the same rows


def _loss(attention="einsum", **kw):
    model = init_random(transformers.T5Config(**CONFIG), attention=attention, **kw)
    graphdef, params = nnx.split(model)
    return make_per_example_loss(graphdef), params, graphdef


RIGHT = [[5, 6, 7, 1, 0, 0], [8, 9, 10, 11, 12, 1]]
LEFT = [[0, 0, 5, 6, 7, 1]]  # the first row of RIGHT, padded on the left
TARGETS = [[3, 1], [4, 1]]


def test_fused_attention_matches_einsum_on_right_padding_and_refuses_the_rest():
    batch = {"inputs": np.array(RIGHT + LEFT, np.int32), "targets": np.array(TARGETS + [[3, 1]])}
    batch["targets"] = batch["targets"].astype(np.int32)
    einsum_fn, params, _ = _loss("einsum")
    xla_fn, xla_params, _ = _loss("xla")
    ref = np.asarray(einsum_fn(params, batch))
    got = np.asarray(xla_fn(xla_params, batch))
    np.testing.assert_allclose(got[:2], ref[:2], rtol=TOL, atol=TOL)
    assert np.isnan(got[2])  # left padding: the lengths the kernel sees would be wrong
    assert np.isfinite(ref[2])  # einsum masks any padding


def test_token_ids_outside_the_vocabulary_give_nan():
    fn, params, _ = _loss()
    base = {"inputs": np.array(RIGHT, np.int32), "targets": np.array(TARGETS, np.int32)}
    assert np.isfinite(np.asarray(fn(params, base))).all()
    for key, row, col, bad in (
        ("inputs", 0, 1, -1),  # used to wrap to id 63
        ("inputs", 1, 0, 64),
        ("targets", 0, 0, -100),  # Hugging Face's ignore index is not a pad
        ("targets", 1, 1, 64),  # the last target is never embedded, only scored
    ):
        batch = {k: v.copy() for k, v in base.items()}
        batch[key][row, col] = bad
        out = np.asarray(fn(params, batch))
        assert np.isnan(out[row]) and np.isfinite(out[1 - row]), (key, bad, out)


def test_bad_batches_are_one_line_errors():
    fn, params, graphdef = _loss()
    good_in, good_t = np.array(RIGHT, np.int32), np.array(TARGETS, np.int32)
    for batch, match in (
        ({"inputs": good_in}, 'with "inputs" and "targets"'),
        ([good_in, good_t], "got list"),
        ({"inputs": good_in.astype(np.float32), "targets": good_t}, "float32"),
        ({"inputs": good_in[0], "targets": good_t}, r'batch\["inputs"\] must be integer ids'),
        ({"inputs": good_in, "targets": good_t[:1]}, "differ in b"),
    ):
        with pytest.raises(ValueError, match=match) as info:
            fn(params, batch)
        assert "\n" not in str(info.value)
    score = make_score_choices(graphdef)
    with pytest.raises(ValueError, match=r"choices must be integer ids \[b, C, L_tgt\]"):
        score(params, good_in, good_t)


def test_combine_and_grads_accept_an_empty_frozen_tree():
    fn, params, _ = _loss()
    batch = {"inputs": np.array(RIGHT, np.int32), "targets": np.array(TARGETS, np.int32)}
    trainable, frozen = partition(params, trainable_mask(params, "full"))
    want = per_example_grads(fn, trainable, frozen, batch)
    full = combine(trainable, frozen)
    assert combine(full, None) is full and combine(full, {}) is full
    got = _by_path(per_example_grads(fn, full, None, batch))  # {} takes the same path
    for path, leaf in _by_path(want).items():
        np.testing.assert_array_equal(got[path], leaf)


def _by_path(tree) -> dict:
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_a_low_precision_trainable_tree_warns_when_the_step_is_traced():
    fn, params, _ = _loss(ia3=True, param_dtype=jnp.bfloat16)
    trainable, frozen = partition(params, trainable_mask(params, "ia3"))
    opt = make_optimizer("adamw", 1e-3)
    step = jax.jit(make_train_step(fn, opt))
    batch = {"inputs": np.array(RIGHT, np.int32), "targets": np.array(TARGETS, np.int32)}
    with pytest.warns(UserWarning, match="trainable parameters stored in bfloat16"):
        step(trainable, opt.init(trainable), frozen, batch, None)
    fn32, params32, _ = _loss(ia3=True)
    tr32, fr32 = partition(params32, trainable_mask(params32, "ia3"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(make_train_step(fn32, opt))(tr32, opt.init(tr32), fr32, batch, None)


def test_submodules_resolve_after_a_bare_import():
    code = "import finetune; print(finetune.hf.load_pretrained.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "load_pretrained", out.stderr
