"""The logged loss of every answer choice against a direct per-choice computation."""

import jax
import numpy as np
import transformers
from flax import nnx

from finetune import hf
from finetune.data import make_tracked_set
from finetune.distributed import make_mesh, place
from finetune.model import (
    combine,
    make_per_example_loss,
    make_score_choices,
    partition,
    trainable_mask,
)
from finetune.steps import broadcast_runs, make_optimizer, make_programs
from finetune.trainer import _choice_rows, _gold
from simfluence import runlog

TOL = dict(rtol=2e-5, atol=2e-6)  # float32: a batched forward against a one-batch one


def _data(rng, n, vocab=60, max_len=20):
    lengths = rng.integers(3, max_len + 1, n)
    inputs = np.zeros((n, max_len), np.int32)
    for i, k in enumerate(lengths):
        inputs[i, : k - 1] = rng.integers(3, vocab, k - 1)
        inputs[i, k - 1] = 1
    choices = np.zeros((n, 2, 4), np.int32)  # two choices of different lengths, EOS-ended
    choices[:, 0, :2] = rng.integers(3, vocab, (n, 2))
    choices[:, 0, 2] = 1
    choices[:, 1, 0] = rng.integers(3, vocab, n)
    choices[:, 1, 1] = 1
    labels = rng.integers(0, 2, n).astype(np.int32)
    return inputs, choices[np.arange(n), labels], choices, labels, lengths.astype(np.int32)


def test_logged_choice_losses_are_each_choices_own_loss(tmp_path):
    config = transformers.T5Config(
        vocab_size=64,
        d_model=16,
        d_ff=32,
        d_kv=8,
        num_heads=2,
        num_layers=1,
        num_decoder_layers=1,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
    )
    graphdef, params = nnx.split(hf.init_random(config, seed=0))
    trainable, frozen = partition(params, trainable_mask(params, "full"))
    test = _data(np.random.default_rng(0), 6)
    loss_fn = make_per_example_loss(graphdef)
    mesh = make_mesh(jax.devices()[:1])
    progs = make_programs(
        loss_fn, make_score_choices(graphdef), make_optimizer("adamw", 1e-2), mesh
    )
    tracked = make_tracked_set(*test, multiple=8, n_devices=1, mesh=mesh)
    assert len(tracked.buckets) > 1  # scattered back from several length buckets
    # Two runs with different weights (a mix-up of the run axis would show); no training step
    # is compiled: the logging program is what writes choice_losses.npy.
    tr = jax.tree.map(
        lambda x: x * np.array([1.0, 1.2], x.dtype).reshape((2,) + (1,) * (x.ndim - 1)),
        broadcast_runs(trainable, 2),
    )
    te = progs["test_losses"](place(tr, mesh), place(frozen, mesh), tracked.buckets)
    choice = _choice_rows(te, tracked)  # [R, n_test, C] as the trainer logs it
    gold = _gold(choice, tracked)
    assert choice.shape == (2, 6, 2) and choice.dtype == np.float32
    # Reference: the per-example loss of every choice as the target, all examples in one batch
    # at full width, in test order (no buckets, no choice scoring).
    direct = jax.jit(loss_fn)
    for r in range(2):
        p = combine(jax.tree.map(lambda x, r=r: x[r], tr), frozen)
        for k in range(2):
            want = direct(p, {"inputs": test[0], "targets": test[2][:, k]})
            np.testing.assert_allclose(choice[r, :, k], np.asarray(want), **TOL)
        np.testing.assert_array_equal(gold[r], choice[r, np.arange(6), test[3]])
    assert np.abs(choice[..., 0] - choice[..., 1]).min() > 1e-4  # the choices differ
    assert np.abs(choice[0] - choice[1]).max() > 1e-4  # so do the runs
    # The run log takes them: the gold column is losses.npy bitwise.
    exp = tmp_path / "exp"
    runlog.write_experiment(exp, {"n_train": 16, "n_test": 6, "test_labels": test[3].tolist()})
    cur = np.zeros((1, 4), np.int32)
    log = np.stack([choice[0], choice[0]])  # [steps + 1, n_test, C]
    runlog.write_run(runlog.run_dir(exp, 0), cur, np.stack([gold[0]] * 2), choice_losses=log)
    run = runlog.load_runs(exp)[0]
    np.testing.assert_array_equal(run.gold, test[3])
