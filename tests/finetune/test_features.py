"""finetune features: mean-pooled encoder states and projected step-0 gradients, cached."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ._tiny import tiny_t5

# Fixed up front: float32 forward passes of the same example, batched vs alone.
RTOL, ATOL = 1e-5, 1e-6

_TINY_T5 = tiny_t5(d_ff=8, relative_attention_num_buckets=4, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def feat_exp(tmp_path_factory, data_dir, t5_tokenizer_dir):
    """A prepared tiny experiment (6 pool + 2 held-out pool examples, 3 tracked, 4 warm-up)
    whose warm-up is the initial model, saved by hand (no training)."""
    from finetune import experiment as E
    from finetune import trainer
    from finetune.config import ExperimentConfig, WarmupConfig

    exp_dir = tmp_path_factory.mktemp("features") / "exp"
    config = ExperimentConfig(
        name="features-tiny",
        task="rte",
        random_init=_TINY_T5,
        method="full",
        freeze_embeddings=True,
        n_train=6,
        n_test=3,
        steps=2,
        batch_size=2,
        num_runs=3,
        runs_together=1,
        max_input_length=24,
        max_target_length=4,
        length_multiple=8,
        held_out_pool=2,
        held_out_runs=1,
        warmup=WarmupConfig(steps=1, batch_size=2, n_examples=4),
    )
    trainer.prepare_experiment(config, exp_dir, data_dir=data_dir, tokenizer=str(t5_tokenizer_dir))
    _, params = E.build_base_model(config)
    E.save_warmup(exp_dir, params)
    return exp_dir, config


def test_held_out_pool_is_appended_and_recorded(feat_exp):
    from simfluence import runlog

    exp_dir, config = feat_exp
    info = runlog.read_experiment(exp_dir)
    assert info["n_train"] == 8 and len(info["pool_ids"]) == 8
    assert info["held_out_pool"] == [6, 7] and info["held_out_runs"] == [2]
    others = set(info["pool_ids"][:6]) | set(info["warmup_ids"]) | set(info["test_ids"])
    assert not set(info["pool_ids"][6:]) & others
    assert [config.run_pool_size(r) for r in range(3)] == [6, 6, 8]


def test_features_match_single_example_references_and_cache(feat_exp, tmp_path):
    import shutil

    from flax import nnx

    from finetune import experiment as E
    from finetune.features import compute_features, join_example
    from simfluence import runlog

    exp_dir = tmp_path / "exp"
    shutil.copytree(feat_exp[0], exp_dir)
    exp = E.load_experiment(exp_dir)
    path, reused = compute_features(exp_dir, "hidden", n_outside=2, _exp=exp)
    assert not reused and path == exp_dir / "features" / "hidden.npz"
    got = runlog.read_features(exp_dir, "hidden")
    assert got["pool"].shape == (8, 8) and got["test"].shape == (3, 8)
    assert got["outside_ids"] == [str(x) for x in exp.info["warmup_ids"][:2]]
    # Reference: each example alone, input then answer tokens without padding, plain mean.
    model = nnx.merge(exp.graphdef, exp.params)
    for name, rows, ks in (("pool", exp.pool_batch, (7,)), ("test", exp.test_batch, (2,))):
        for k in ks:  # the last rows (the last pool one is a held-out example)
            inp, tgt = rows["inputs"][k], rows["targets"][k]
            toks = np.concatenate([inp[inp != 0], tgt[tgt != 0]])[None]
            want = np.asarray(model.encode(jnp.asarray(toks)))[0].mean(0)
            np.testing.assert_allclose(got[name][k], want, rtol=RTOL, atol=ATOL)
    assert join_example(np.array([[5, 6, 0]]), np.array([[7, 0]])).tolist() == [[5, 6, 7, 0, 0]]

    # Cached: same starting model, examples and settings; other settings recompute.
    assert compute_features(exp_dir, "hidden", n_outside=2, _exp=exp)[1]
    assert not compute_features(exp_dir, "hidden", n_outside=1, _exp=exp)[1]
    assert not compute_features(exp_dir, "hidden", n_outside=2, _exp=exp)[1]
    # A new starting model (another warm-up) invalidates the cache.
    E.save_warmup(exp_dir, jax.tree.map(lambda x: x * 1.5, exp.params))
    path, reused = compute_features(exp_dir, "hidden", n_outside=2)
    assert not reused
    moved = runlog.read_features(exp_dir, "hidden")
    assert moved["model_sha256"] != got["model_sha256"]
    assert not np.allclose(moved["pool"], got["pool"])


def test_cli_features_bad_input_is_one_line(feat_exp, capsys):
    from finetune.cli import main

    assert main(["features", str(feat_exp[0]), "--kind", "pixels"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kind 'pixels'" in err[0]
    assert main(["features", str(feat_exp[0]), "--kind", "hidden", "--outside", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--outside 9" in err[0] and "<= 4" in err[0]


def test_features_file_of_another_experiment_is_refused(feat_exp, tmp_path):
    from simfluence import runlog

    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    (exp_dir / "experiment.json").write_text(json.dumps({"n_train": 5, "n_test": 3}))
    with pytest.raises(runlog.RunLogError, match="pool has 8 rows but experiment.json says 5"):
        runlog.write_features(
            exp_dir,
            "hidden",
            pool=np.zeros((8, 2)),
            test=np.zeros((3, 2)),
            outside=np.zeros((0, 2)),
            outside_ids=[],
            model_sha256="x",
            ids_sha256="y",
            settings={},
        )


def test_projected_gradients_are_the_rows_of_tracin_projected_dots():
    """On a small MLP: rows whose products are `compute_dots(mode="projected")`, same seed."""
    from finetune.tracin import compute_dots, projected_gradients

    def loss(params, batch):  # [b]
        h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
        return 0.5 * (h @ params["w2"] - batch["y"]) ** 2

    k = jax.random.split(jax.random.key(0), 5)
    params = {
        "w1": jax.random.normal(k[0], (5, 7)),
        "b1": jax.random.normal(k[1], (7,)),
        "w2": jax.random.normal(k[2], (7,)),
    }
    train = {"x": jax.random.normal(k[3], (9, 5)), "y": jnp.linspace(-1, 1, 9)}
    test = {"x": jax.random.normal(k[4], (3, 5)), "y": jnp.linspace(1, 0, 3)}
    kw = dict(proj_dim=16, seed=3, chunk_size=4, combine=lambda t, f: t)
    both = {key: jnp.concatenate([train[key], test[key]]) for key in train}  # one compile
    g = np.asarray(projected_gradients(loss, params, {}, both, **kw))  # [12, 16]
    dots = compute_dots(loss, params, {}, train, test, mode="projected", **kw)
    np.testing.assert_allclose(g[9:] @ g[:9].T, np.asarray(dots), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="proj_dim=50 exceeds the 49 trainable parameters"):
        projected_gradients(loss, params, {}, test, proj_dim=50)


@pytest.mark.slow
def test_tracin_features_of_the_t5_are_its_step0_projected_dots(feat_exp, tmp_path):
    import shutil

    from finetune import experiment as E
    from finetune.features import compute_features
    from finetune.model import partition
    from finetune.tracin import compute_dots
    from simfluence import runlog

    exp_dir = tmp_path / "exp"
    shutil.copytree(feat_exp[0], exp_dir)
    exp = E.load_experiment(exp_dir)
    compute_features(exp_dir, "tracin", proj_dim=16, seed=3, _exp=exp)
    tr = runlog.read_features(exp_dir, "tracin")
    trainable, frozen = partition(exp.params, exp.mask)
    pool, test = (
        {k: jnp.asarray(v) for k, v in b.items()} for b in (exp.pool_batch, exp.test_batch)
    )
    dots = compute_dots(
        exp.per_example_loss, trainable, frozen, pool, test, mode="projected", proj_dim=16, seed=3
    )
    np.testing.assert_allclose(tr["test"] @ tr["pool"].T, np.asarray(dots), rtol=1e-4, atol=1e-7)
    assert compute_features(exp_dir, "tracin", proj_dim=16, seed=3, _exp=exp)[1]
    assert not compute_features(exp_dir, "tracin", proj_dim=16, seed=4, _exp=exp)[1]
