"""Checks that a wrong update sign, schedule, warm-up, accuracy or nondeterminism would fail:
one step against optax applied by hand, the learning-rate schedules against hand formulas, the
rank-classification accuracy on a hand-labelled case, and a tiny experiment with a warm-up
(trained once, cached, reused, resumed, and reproduced byte for byte in a fresh folder)."""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

from finetune import experiment as E
from finetune import hf, trainer
from finetune.config import ExperimentConfig, WarmupConfig, load_experiment_config
from finetune.data import TrackedSet
from finetune.model import combine, make_per_example_loss, partition, trainable_mask
from finetune.steps import make_optimizer, make_train_step
from finetune.tracin import run_tracin
from simfluence import runlog

from ._tiny import SMALL_T5, tiny_fields

REPO_ROOT = Path(__file__).resolve().parents[2]
STEP_TOL = dict(rtol=1e-5, atol=1e-6)  # same float32 maths, another trace; fixed before running
# float32 schedule against float64 hand values: 1e-6 of the rate, or of the peak rate near the
# cosine's zero, where float32 cos has an absolute (not relative) error of a few ulps.
LR_TOL = dict(rtol=1e-6)
LR_ATOL = 1e-6  # times the peak rate


# ----------------------------------------------------------------------------------------------
# One optimizer step


def _tiny_model(ia3: bool):
    # SMALL_T5 with T5Config's defaults for these two (relu, tied embeddings)
    cfg = transformers.T5Config(
        **{**SMALL_T5, "feed_forward_proj": "relu", "tie_word_embeddings": True}
    )
    return nnx.split(hf.init_random(cfg, ia3=ia3, seed=5))


def _batch():
    rng = np.random.default_rng(11)
    inputs = rng.integers(2, 64, size=(4, 6)).astype(np.int32)
    inputs[1, 4:] = 0
    targets = rng.integers(2, 64, size=(4, 3)).astype(np.int32)
    targets[:, -1] = 1
    return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets)}


@pytest.mark.parametrize("method", ["full", "ia3"])
def test_train_step_is_optax_update_of_an_independent_gradient_and_lowers_the_loss(method):
    graphdef, params = _tiny_model(ia3=method == "ia3")
    loss_fn = make_per_example_loss(graphdef)
    trainable, frozen = partition(params, trainable_mask(params, method))
    opt = make_optimizer("adamw", 1e-2)
    state = opt.init(trainable)
    batch = _batch()

    def mean_loss(tr):
        return loss_fn(combine(tr, frozen), batch).mean()

    # The reference, computed before the (non-donating) step from the same inputs.
    grads = jax.jit(jax.grad(mean_loss))(trainable)
    updates = opt.update(grads, state, trainable)[0]
    expected = jax.tree.map(np.asarray, optax.apply_updates(trainable, updates))
    mean_loss = jax.jit(mean_loss)
    loss0 = float(mean_loss(trainable))

    new, _, loss = jax.jit(make_train_step(loss_fn, opt))(trainable, state, frozen, batch, None)
    np.testing.assert_allclose(float(loss), loss0, **STEP_TOL)
    moved = 0
    for a, b, old in zip(
        jax.tree.leaves(new), jax.tree.leaves(expected), jax.tree.leaves(trainable), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), b, **STEP_TOL)
        moved += int(np.any(np.asarray(a) != np.asarray(old)))
    assert moved > 0
    assert float(mean_loss(new)) < loss0


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules


def _base_config(**kw) -> ExperimentConfig:
    fields = dict(
        name="sched",
        task="rte",
        random_init=dict(vocab_size=64, d_model=8),
        learning_rate=3e-3,
        steps=12,
    )
    return ExperimentConfig(**{**fields, **kw})


def _hand_rate(schedule: str, lr: float, warm: int, steps: int, t: int) -> float:
    """The rate of step t (1-based) as the docs state it: t/warm of lr over the ramp, then the
    body over the remaining steps - warm steps (constant, linear to 0, cosine to 0)."""
    if t <= warm:
        return lr * t / warm
    c, n = t - 1 - warm, steps - warm
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr * (1 - c / n)
    return lr * 0.5 * (1 + math.cos(math.pi * c / n))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warm", [0, 4])
def test_learning_rates_follow_the_hand_formula(schedule, warm):
    config = _base_config(schedule=schedule, warmup_steps=warm)
    expected = np.array([_hand_rate(schedule, 3e-3, warm, 12, t) for t in range(1, 13)], np.float64)
    lrs = trainer.learning_rates(config)
    assert lrs.shape == (12,) and lrs.dtype == np.float32
    np.testing.assert_allclose(lrs, expected, atol=LR_ATOL * 3e-3, **LR_TOL)
    sched = trainer.make_schedule(config)
    np.testing.assert_allclose(
        [float(sched(c)) for c in range(12)], expected, atol=LR_ATOL * 3e-3, **LR_TOL
    )


def test_demo_learning_rate_ramps_to_its_peak_over_20_of_26_steps():
    config, _ = load_experiment_config(REPO_ROOT / "runs" / "demo")
    expected = [1e-3 * t / 20 for t in range(1, 21)] + [1e-3] * 6
    np.testing.assert_allclose(
        trainer.learning_rates(config), expected, atol=LR_ATOL * 1e-3, **LR_TOL
    )


# ----------------------------------------------------------------------------------------------
# Accuracy


def test_accuracy_picks_the_lowest_loss_choice_of_a_hand_labelled_case():
    # Scores are losses of the choices: the prediction is the choice with the lowest loss.
    # Rows are in bucket order; index maps rows to test examples 2, 0, 1.
    scores = np.array(
        [
            [[0.1, 0.9], [0.8, 0.2], [0.5, 0.4]],  # run 0 predicts 0, 1, 1 for tests 2, 0, 1
            [[0.9, 0.1], [0.3, 0.7], [0.2, 0.6]],  # run 1 predicts 1, 0, 0 for tests 2, 0, 1
        ],
        np.float32,
    )
    labels = np.array([1, 0, 0])  # tests 0, 1, 2
    tracked = TrackedSet(buckets=(), index=np.array([2, 0, 1]), labels=labels, n=3)
    # run 0: test0 -> 1 (label 1 ok), test1 -> 1 (label 0 no), test2 -> 0 (label 0 ok): 2/3
    # run 1: test0 -> 0 (no), test1 -> 0 (ok), test2 -> 1 (no): 1/3
    acc = trainer._accuracy(scores, tracked)
    assert acc.dtype == np.float32
    np.testing.assert_array_equal(acc, np.float32([2 / 3, 1 / 3]))


# ----------------------------------------------------------------------------------------------
# A tiny experiment with a warm-up: trained once, cached, resumed, reproducible

TINY = ExperimentConfig(
    **tiny_fields(
        name="tiny_warm",
        schedule="linear",
        warmup_steps=2,
        checkpoint_steps=(2,),
        warmup=WarmupConfig(steps=4, batch_size=2, n_examples=4, learning_rate=1e-2),
    )
)
RUN_FILES = ("curriculum.npy", "losses.npy", "lr.npy", "metrics.jsonl")


def _run_files(exp: Path) -> dict[str, bytes]:
    return {
        f"run_{r:03d}/{name}": (runlog.run_dir(exp, r) / name).read_bytes()
        for r in range(TINY.num_runs)
        for name in RUN_FILES
    }


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir, t5_tokenizer_dir):
    """Two fresh uninterrupted experiments of TINY in two folders."""
    root = tmp_path_factory.mktemp("tiny_warm")
    kw = dict(data_dir=data_dir, tokenizer=str(t5_tokenizer_dir), progress=False)
    results = [trainer.run_experiment(TINY, root / name, **kw) for name in ("a", "b")]
    return dict(root=root, kw=kw, a=root / "a", b=root / "b", results=results)


def test_warmup_lowers_its_losses_and_the_runs_start_from_it(tiny):
    log = json.loads((tiny["a"] / trainer.WARMUP_LOG).read_text())
    assert log["steps"] == 4 and len(log["train_loss"]) == 4
    assert log["test_loss_mean_after"] < log["test_loss_mean_before"]
    assert log["train_loss"][-1] < log["train_loss"][0]
    assert E.warmup_path(tiny["a"]).is_dir()
    # Every run's step-0 tracked losses are those of the warmed-up parameters.
    for r in range(TINY.num_runs):
        losses = np.load(runlog.run_dir(tiny["a"], r) / "losses.npy")
        np.testing.assert_allclose(losses[0].mean(), log["test_loss_mean_after"], rtol=1e-5)


def test_two_fresh_experiments_write_the_same_bytes(tiny):
    assert all(r["complete"] == [0, 1] for r in tiny["results"])
    assert _run_files(tiny["a"]) == _run_files(tiny["b"])
    assert (tiny["a"] / "data.npz").read_bytes() == (tiny["b"] / "data.npz").read_bytes()
    # The warm-up checkpoints hold their path and timestamps; its log (less the time) and the
    # runs' losses, which start from it, are compared instead.
    logs = [json.loads((tiny[k] / trainer.WARMUP_LOG).read_text()) for k in "ab"]
    assert [{k: v for k, v in x.items() if k != "seconds"} for x in logs[:1]] == [
        {k: v for k, v in x.items() if k != "seconds"} for x in logs[1:]
    ]
    lr = np.load(runlog.run_dir(tiny["a"], 0) / "lr.npy")
    np.testing.assert_allclose(lr, [5e-3, 1e-2, 1e-2, 5e-3], rtol=1e-6)


def test_cached_warmup_is_reused_not_retrained(tiny, monkeypatch):
    exp = tiny["a"]
    log = (exp / trainer.WARMUP_LOG).read_bytes()
    params = _tree(E.warmup_path(exp))
    files = _run_files(exp)

    def refuse(*args, **kwargs):
        raise AssertionError("the warm-up trained again")

    monkeypatch.setattr(trainer, "_warmup", refuse)
    # Run 1, deleted with its checkpoints, retrains from step 0 of the cached warm-up and
    # writes the same bytes as the first time.
    shutil.rmtree(runlog.run_dir(exp, 1))
    out = trainer.run_experiment(TINY, exp, **tiny["kw"])
    assert out["complete"] == [0, 1] and not out["interrupted"]
    assert (exp / trainer.WARMUP_LOG).read_bytes() == log
    assert _tree(E.warmup_path(exp)) == params
    assert _run_files(exp) == files


def test_experiment_interrupted_after_the_warmup_resumes_to_the_same_bytes(tiny):
    exp = tiny["root"] / "interrupted"
    first = trainer.run_experiment(TINY, exp, max_steps_this_call=2, **tiny["kw"])
    assert first["interrupted"] and first["stop"]["kept_step"] == 2
    assert E.warmup_path(exp).is_dir()
    log = (exp / trainer.WARMUP_LOG).read_bytes()
    second = trainer.run_experiment(TINY, exp, **tiny["kw"])
    assert second["complete"] == [0, 1] and not second["interrupted"]
    assert (exp / trainer.WARMUP_LOG).read_bytes() == log
    assert _run_files(exp) == _run_files(tiny["a"])


def test_two_fresh_experiments_give_the_same_tracin_dots(tiny):
    for key in "ab":
        assert len(run_tracin(tiny[key], progress=False)) == TINY.num_runs
    for r in range(TINY.num_runs):
        a, b = (runlog.read_tracin(runlog.run_dir(tiny[k], r)) for k in "ab")
        np.testing.assert_array_equal(a["steps"], [2])
        for key in ("steps", "learning_rates", "dots"):
            assert a[key].tobytes() == b[key].tobytes(), (r, key)
