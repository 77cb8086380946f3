"""Tests of finetune.tracin: per-example gradient dot products (TracIn-CP, arXiv 2002.08484).

References are independent of the code under test: single-example ``jax.grad`` loops flattened
with ``jax.flatten_util.ravel_pytree``, exact dot products, and observed loss changes of a plain
SGD loop on a linear least-squares model (where a first-order Taylor step is exact up to
O(lr^2)). Tolerances are fixed up front.
"""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from finetune import tracin

from ._tiny import tiny_t5


def _combine(trainable, frozen):
    return {**frozen, **trainable}


# ---- a small non-linear model with several leaves (per-example loss over a batch dict) -------


def _mlp_loss(params, batch):  # batch {"x": [b, 5], "y": [b]} -> [b]
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])  # [b, 7]
    out = h @ params["w2"] + params["b2"]  # [b]
    return 0.5 * (out - batch["y"]) ** 2 + 0.1 * jnp.sum(params["w1"] ** 2)


def _mlp_setup(n_train=11, n_test=4, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    trainable = {
        "w1": jax.random.normal(k[0], (5, 7)) / 2,
        "b1": jax.random.normal(k[1], (7,)) / 2,
        "w2": jax.random.normal(k[2], (7,)),
    }
    frozen = {"b2": jnp.float32(0.3)}
    train = {"x": jax.random.normal(k[3], (n_train, 5)), "y": jax.random.normal(k[4], (n_train,))}
    test = {"x": jax.random.normal(k[5], (n_test, 5)), "y": jnp.linspace(-1, 1, n_test)}
    return trainable, frozen, train, test


def _loop_grads(loss, trainable, frozen, batch):
    """Reference: one jax.grad call per example, flattened with ravel_pytree -> [n, P]."""
    single = jax.jit(jax.grad(lambda t, f, one: loss(_combine(t, f), one)[0]))
    n = batch["y"].shape[0]
    rows = []
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in batch.items()}  # a batch of one example
        rows.append(np.asarray(ravel_pytree(single(trainable, frozen, one))[0]))
    return np.stack(rows)


def test_per_example_grads_equal_single_example_loop():
    trainable, frozen, train, _ = _mlp_setup()
    features = tracin._make_features(_mlp_loss, _combine, "exact", 0)
    got = np.asarray(jax.jit(features)(trainable, frozen, train, jax.random.key(0)))
    want = _loop_grads(_mlp_loss, trainable, frozen, train)
    assert got.shape == want.shape == (11, 5 * 7 + 7 + 7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_exact_dots_equal_loop_dots_and_do_not_recompile():
    trainable, frozen, train, test = _mlp_setup()
    g_train = _loop_grads(_mlp_loss, trainable, frozen, train)
    g_test = _loop_grads(_mlp_loss, trainable, frozen, test)
    got = tracin.compute_dots(_mlp_loss, trainable, frozen, train, test, combine=_combine)
    assert got.shape == (4, 11) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), g_test @ g_train.T, rtol=1e-4, atol=1e-5)
    # A second checkpoint (new values, same shapes) reuses the compiled function.
    moved = jax.tree.map(lambda x: x * 1.1, trainable)
    tracin.compute_dots(_mlp_loss, moved, frozen, train, test, combine=_combine)
    fn = tracin._make_dots_fn(_mlp_loss, _combine, "exact", 0, tracin._DEFAULT_CHUNK, 11, 4)
    assert fn._cache_size() == 1


@pytest.mark.parametrize("mode", ["exact", "projected"])
def test_chunked_dots_equal_unchunked(mode):
    trainable, frozen, train, test = _mlp_setup()
    kw = dict(mode=mode, proj_dim=8, seed=3, combine=_combine)
    whole = tracin.compute_dots(_mlp_loss, trainable, frozen, train, test, chunk_size=64, **kw)
    parts = tracin.compute_dots(_mlp_loss, trainable, frozen, train, test, chunk_size=3, **kw)
    np.testing.assert_allclose(np.asarray(parts), np.asarray(whole), rtol=1e-5, atol=1e-5)


def test_batches_of_different_lengths_take_the_separate_path():
    """Pool and test arrays with different trailing shapes cannot share one scan; same dots."""
    trainable, frozen, train, test = _mlp_setup()
    kw = dict(chunk_size=4, combine=_combine)
    train_s = {**train, "tokens": jnp.ones((11, 3), jnp.int32)}
    same = tracin.compute_dots(
        _mlp_loss, trainable, frozen, train_s, {**test, "tokens": jnp.ones((4, 3), jnp.int32)}, **kw
    )
    other = tracin.compute_dots(
        _mlp_loss, trainable, frozen, train_s, {**test, "tokens": jnp.ones((4, 5), jnp.int32)}, **kw
    )
    np.testing.assert_allclose(np.asarray(other), np.asarray(same), rtol=1e-5, atol=1e-6)


def test_projected_dots_unbiased_and_within_jl_scale(monkeypatch):
    # Blocks of 64 entries with d=16: the Gaussian matrix of each leaf is generated in row blocks
    # of 4 (the path of large leaves; the one-block path is covered by the chunking test).
    monkeypatch.setattr(tracin, "_PROJ_BLOCK_ELEMS", 64)
    tracin._make_dots_fn.cache_clear()
    d, n_seeds = 16, 48
    trainable, frozen, train, test = _mlp_setup(n_train=9, n_test=3, seed=1)
    g_train = _loop_grads(_mlp_loss, trainable, frozen, train)
    g_test = _loop_grads(_mlp_loss, trainable, frozen, test)
    exact = g_test @ g_train.T  # [3, 9]
    norms = np.linalg.norm(g_test, axis=1)[:, None] * np.linalg.norm(g_train, axis=1)[None, :]
    sd = np.sqrt((norms**2 + exact**2) / d)  # std of one projected dot (Gaussian projection)
    est = np.stack(
        [
            np.asarray(
                tracin.compute_dots(
                    _mlp_loss,
                    trainable,
                    frozen,
                    train,
                    test,
                    mode="projected",
                    proj_dim=d,
                    seed=s,
                    chunk_size=4,
                    combine=_combine,
                )
            )
            for s in range(n_seeds)
        ]
    )  # [seeds, 3, 9]
    # Unbiased: the mean over seeds is within 4 standard errors of the exact dot, everywhere.
    z = (est.mean(0) - exact) / (sd / np.sqrt(n_seeds))
    assert np.abs(z).max() < 4.5, np.abs(z).max()
    # Johnson-Lindenstrauss scale: the RMS error relative to |g1||g2| is about sqrt(2/d) at
    # most (sqrt((1 + cos^2)/d)); neither far above it nor collapsed to zero.
    rel_rms = np.sqrt(np.mean(((est - exact) / norms) ** 2))
    assert 0.3 / np.sqrt(d) < rel_rms < 1.25 * np.sqrt(2 / d), rel_rms
    # Seeds give different projections; the same seed gives the same one.
    assert not np.allclose(est[0], est[1])
    again = tracin.compute_dots(
        _mlp_loss,
        trainable,
        frozen,
        train,
        test,
        mode="projected",
        proj_dim=d,
        seed=0,
        chunk_size=4,
        combine=_combine,
    )
    np.testing.assert_array_equal(np.asarray(again), est[0])
    tracin._make_dots_fn.cache_clear()


def test_bad_arguments_raise():
    trainable, frozen, train, test = _mlp_setup()
    n_params = tracin.count_params(trainable)
    with pytest.raises(ValueError, match=f"proj_dim={n_params + 1} exceeds the {n_params}"):
        tracin.compute_dots(
            _mlp_loss,
            trainable,
            frozen,
            train,
            test,
            mode="projected",
            proj_dim=n_params + 1,
            combine=_combine,
        )
    with pytest.raises(ValueError, match="mode='fast'"):
        tracin.compute_dots(_mlp_loss, trainable, frozen, train, test, mode="fast")
    with pytest.raises(ValueError, match="chunk_size=0"):
        tracin.compute_dots(_mlp_loss, trainable, frozen, train, test, chunk_size=0)
    with pytest.raises(ValueError, match="leading"):
        bad = {"x": train["x"], "y": train["y"][:3]}
        tracin.compute_dots(_mlp_loss, trainable, frozen, bad, test, combine=_combine)


def test_batches_with_different_keys_raise_one_line():
    """A test batch with an extra array (e.g. ids) is named, not a raw pytree-structure error."""
    trainable, frozen, train, test = _mlp_setup()
    with pytest.raises(
        ValueError,
        match=r"train_batch has keys \['x', 'y'\] but test_batch has "
        r"\['id', 'x', 'y'\]",
    ) as e:
        tracin.compute_dots(
            _mlp_loss, trainable, frozen, train, {**test, "id": jnp.arange(4)}, combine=_combine
        )
    assert "\n" not in str(e.value)


# ---- first-order exactness on linear least squares with plain SGD ----------------------------


def _lsq_loss(params, batch):  # 0.5 * (x . w + b - y)^2 per example -> [b]
    return 0.5 * (batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2


def test_tracin_predicts_sgd_loss_changes_on_least_squares(tmp_path):
    rng = np.random.default_rng(0)
    dim, n_train, n_test, batch, steps = 6, 16, 5, 4, 12
    x_train = rng.normal(size=(n_train, dim)) / np.sqrt(dim)
    y_train = rng.normal(size=n_train)
    x_test = rng.normal(size=(n_test, dim)) / np.sqrt(dim)
    y_test = rng.normal(size=n_test)
    curriculum = rng.integers(0, n_train, size=(steps, batch))
    lr = np.linspace(2e-3, 1e-3, steps)  # tiny, decaying: lr.npy[t - 1] is the lr of step t
    bias = 0.2  # frozen

    # Plain SGD on the batch-mean loss, in float64 numpy (independent of the code under test).
    w = rng.normal(size=dim)
    checkpoints = [w.copy()]  # checkpoint at step s = weights after s steps
    for t in range(steps):
        xb, yb = x_train[curriculum[t]], y_train[curriculum[t]]
        w = w - lr[t] * xb.T @ (xb @ w + bias - yb) / batch
        checkpoints.append(w.copy())
    losses = np.stack([0.5 * (x_test @ c + bias - y_test) ** 2 for c in checkpoints])  # [T+1, m]

    run_dir = tmp_path / "run_000"
    run_dir.mkdir()
    np.save(run_dir / "lr.npy", lr.astype(np.float32))
    ckpt_steps = list(range(steps + 1))
    etas = tracin._lr_at_checkpoints(run_dir, ckpt_steps)
    np.testing.assert_array_equal(etas[:steps], lr.astype(np.float32))
    assert etas[steps] == np.float32(lr[-1])  # the final checkpoint takes the last step's lr

    train = {"x": jnp.asarray(x_train, jnp.float32), "y": jnp.asarray(y_train, jnp.float32)}
    test = {"x": jnp.asarray(x_test, jnp.float32), "y": jnp.asarray(y_test, jnp.float32)}
    frozen = {"b": jnp.float32(bias)}
    predicted = np.zeros((steps, n_test))
    for t in range(1, steps + 1):
        k = t - 1  # the step-t update uses the gradient at the checkpoint at step t - 1
        dots = tracin.compute_dots(
            _lsq_loss,
            {"w": jnp.asarray(checkpoints[k], jnp.float32)},
            frozen,
            train,
            test,
            chunk_size=5,
            combine=_combine,
        )  # [n_test, n_train]
        predicted[t - 1] = -(etas[k] / batch) * np.asarray(dots)[:, curriculum[t - 1]].sum(1)
    observed = np.diff(losses, axis=0)  # [T, n_test]
    # The second-order remainder is 0.5 * (lr * x . g)^2 ~ 1e-3 of the change here.
    err = np.abs(predicted - observed).max() / np.abs(observed).max()
    assert err < 1e-2, err
    # And the prediction is not trivially small: a sign or scale error would fail above.
    assert np.abs(observed).max() > 1e-4


def test_lr_checks(tmp_path):
    with pytest.raises(ValueError, match="lr.npy is missing"):
        tracin._lr_at_checkpoints(tmp_path, [0])
    np.save(tmp_path / "lr.npy", np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"steps \[5\] are outside 0..4"):
        tracin._lr_at_checkpoints(tmp_path, [0, 5])


# ---- CLI ---------------------------------------------------------------------------------------


def _parser():
    from finetune.cli import _parser

    return _parser()


def test_cli_mirrors_the_library_modes_and_chunk_size():
    """finetune.cli keeps its own copies (so that `--help` loads no JAX); they must agree."""
    from finetune import cli, config

    assert cli._TRACIN_MODES == tracin.MODES == config.TRACIN_MODES
    assert cli._TRACIN_CHUNK == tracin._DEFAULT_CHUNK
    fields = {f.name: f.default for f in config.dataclasses.fields(config.ExperimentConfig)}
    assert fields["tracin_chunk_size"] == tracin._DEFAULT_CHUNK


def test_cli_parses_flags_and_help_explains_each(capsys):
    args = _parser().parse_args(
        [
            "tracin",
            "exp",
            "--runs",
            "0-3,7",
            "--mode",
            "projected",
            "--proj-dim",
            "64",
            "--seed",
            "5",
            "--chunk-size",
            "8",
        ]
    )
    assert args.runs == [0, 1, 2, 3, 7] and args.mode == "projected"
    assert (args.proj_dim, args.seed, args.chunk_size) == (64, 5, 8)
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["tracin", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--runs", "--mode", "--proj-dim", "--seed", "--chunk-size", "EXP"):
        assert flag in text
    for bad in (["--runs", "3-1"], ["--runs", "x"], ["--proj-dim", "0"], ["--mode", "fast"]):
        with pytest.raises(SystemExit) as e:
            _parser().parse_args(["tracin", "exp", *bad])
        assert e.value.code == 2


# ---- end to end on a tiny experiment built through finetune.experiment / trainer ----------------

_TINY_T5 = tiny_t5(
    d_ff=8,
    relative_attention_num_buckets=4,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)


def _tiny_experiment(exp_dir, data_dir, tokenizer_dir, *, steps=3, batch=2, n_runs=4):
    """prepare_experiment (data.npz, experiment.json), then runs with hand-made checkpoints.

    No training: run r's checkpoint at step s holds the initial IA3 vectors times
    (1 + 0.1 * (r + 1) * s), the learning rate of step t is 0.01 * t; runs 0 and 1 save
    checkpoints at steps 0 and 2, the others save none.
    """
    from finetune import experiment as E
    from finetune import trainer
    from finetune.config import ExperimentConfig
    from finetune.model import partition
    from simfluence import runlog

    config = ExperimentConfig(
        name="tracin-tiny",
        task="rte",
        random_init=_TINY_T5,
        method="ia3",
        n_train=6,
        n_test=3,
        steps=steps,
        batch_size=batch,
        num_runs=n_runs,
        runs_together=1,
        max_input_length=24,
        max_target_length=4,
        length_multiple=8,
        checkpoint_steps=(0, 2),
        checkpoint_runs=2,
    )
    trainer.prepare_experiment(config, exp_dir, data_dir=data_dir, tokenizer=str(tokenizer_dir))
    exp = E.load_experiment(exp_dir)
    trainable, _ = partition(exp.params, exp.mask)
    rng = np.random.default_rng(0)
    lr = (0.01 * np.arange(1, steps + 1)).astype(np.float32)
    for r in range(n_runs):
        run_dir = runlog.run_dir(exp_dir, r)
        run_dir.mkdir(parents=True)
        if config.saves_checkpoints(r):
            for s in config.checkpoint_steps:
                moved = jax.tree.map(lambda x, r=r, s=s: x * (1 + 0.1 * (r + 1) * s), trainable)
                log = {"losses": np.zeros((steps + 1, 3), np.float32)}
                E.save_checkpoint(run_dir, s, moved, {"count": np.zeros((), np.int32)}, log)
        runlog.write_run(
            run_dir,
            rng.integers(0, 6, size=(steps, batch)).astype(np.int32),
            rng.uniform(0.5, 1.0, size=(steps + 1, 3)).astype(np.float32),
            lr=lr,
            meta={"checkpoint_steps": list(config.checkpoint_steps) if r < 2 else []},
        )
    return exp, trainable, lr


@pytest.fixture(scope="module")
def tiny_exp(tmp_path_factory, data_dir, t5_tokenizer_dir):
    """One tiny experiment per module; tests work on copies. (exp_dir, exp, trainable0, lr)."""
    exp_dir = tmp_path_factory.mktemp("tracin") / "exp"
    return (exp_dir, *_tiny_experiment(exp_dir, data_dir, t5_tokenizer_dir))


def test_run_tracin_end_to_end(tiny_exp, tmp_path, capsys):
    import json
    import shutil

    from finetune.cli import main as finetune_main
    from finetune.model import combine
    from simfluence import runlog

    exp_dir = tmp_path / "exp"
    shutil.copytree(tiny_exp[0], exp_dir)
    _, exp, trainable0, lr = tiny_exp

    # Bad input first (nothing may be written): an explicitly requested run without
    # checkpoints, and a projection larger than the trainable parameters.
    n_params = tracin.count_params(trainable0)
    assert finetune_main(["tracin", str(exp_dir), "--runs", "1-2"]) == 2
    err = capsys.readouterr().err
    assert "run_002" in err and "no checkpoints" in err and "\n" not in err.strip()
    assert (
        finetune_main(
            ["tracin", str(exp_dir), "--mode", "projected", "--proj-dim", str(n_params + 1)]
        )
        == 2
    )
    assert f"exceeds the {n_params} trainable parameters" in capsys.readouterr().err
    assert not list(exp_dir.glob("run_*/tracin.npz"))

    # Every run with checkpoints (runs 2 and 3 have none by config and are skipped).
    written = tracin.run_tracin(exp_dir, chunk_size=4, progress=False)
    assert [p.parent.name for p in written] == ["run_000", "run_001"]
    assert runlog.read_tracin(exp_dir / "run_002") is None
    got = runlog.read_tracin(exp_dir / "run_001")
    assert got["dots"].shape == (2, 3, 6) and got["dots"].dtype == np.float32
    np.testing.assert_array_equal(got["steps"], [0, 2])
    np.testing.assert_array_equal(got["learning_rates"], lr[[0, 2]])  # lr of step s + 1
    assert (got["mode"], got["proj_dim"], got["seed"]) == ("exact", 0, 0)

    # The stored dots are those of the saved checkpoint (run 1, step 2) on the experiment's data;
    # compute_dots itself is checked against single-example grad loops above.
    from finetune.model import partition

    _, frozen = partition(exp.params, exp.mask)
    pool, test = tracin._same_widths(dict(exp.pool_batch), dict(exp.test_batch))
    moved = jax.tree.map(lambda x: x * (1 + 0.1 * 2 * 2), trainable0)
    want = tracin.compute_dots(
        exp.per_example_loss, moved, frozen, pool, test, chunk_size=4, combine=combine
    )
    np.testing.assert_allclose(got["dots"][1], np.asarray(want), rtol=1e-5, atol=1e-8)
    assert np.abs(got["dots"][1]).max() > 0
    assert not np.allclose(got["dots"][0], got["dots"][1])  # the checkpoints differ
    # Step 0 is the same start state in both runs (computed once, reused).
    np.testing.assert_array_equal(
        runlog.read_tracin(exp_dir / "run_000")["dots"][0], got["dots"][0]
    )

    # Resumable: finished runs are skipped and left untouched.
    mtime = (exp_dir / "run_000" / "tracin.npz").stat().st_mtime_ns
    assert tracin.run_tracin(exp_dir, progress=False) == []
    assert (exp_dir / "run_000" / "tracin.npz").stat().st_mtime_ns == mtime

    # `simfluence evaluate` fits TracIn-CP on runs 0-1 (with tracin.npz) and scores runs 2-3.
    from simfluence.cli import main as simfluence_main

    out = tmp_path / "results.json"
    argv = ["evaluate", str(exp_dir), "--split", "2,0,2", "--out", str(out)]
    assert simfluence_main([*argv, "--variants", "tracin-cp,tracin-cp-rescaled"]) == 0
    table = json.loads(out.read_text())["variants"]
    for variant in ("tracin-cp", "tracin-cp-rescaled"):
        assert np.isfinite(table[variant]["all_steps_mse"]["mean"])


# orbax leaves its cancelled array-read coroutines behind when a restore fails (not ours).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_run_tracin_rejects_a_checkpoint_of_another_config(tiny_exp, tmp_path):
    import json
    import shutil

    exp_dir = tmp_path / "exp"
    shutil.copytree(tiny_exp[0], exp_dir)
    info = json.loads((exp_dir / "experiment.json").read_text())
    info["config"]["random_init"]["d_ff"] = 12  # the IA3 vectors of wi_1 change shape
    (exp_dir / "experiment.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"run_000/checkpoints \(step 0\).*another config"):
        tracin.run_tracin(exp_dir, progress=False)
    assert not list(exp_dir.glob("run_*/tracin.npz"))
    gc.collect()  # collect orbax's abandoned coroutines here, under this test's filter


def test_run_tracin_before_any_run_is_complete_is_an_error(tiny_exp, tmp_path):
    # `make tracin` before `make runs` has finished a run: an error naming the fix, not
    # "wrote 0 tracin.npz file(s)" and exit 0.
    import shutil

    exp_dir = tmp_path / "exp"
    shutil.copytree(tiny_exp[0], exp_dir)
    for meta in exp_dir.glob("run_*/meta.json"):
        meta.unlink()
    with pytest.raises(ValueError, match=r"none of its runs is complete yet.*finetune run"):
        tracin.run_tracin(exp_dir, progress=False)
    with pytest.raises(ValueError, match=r"none of its runs \[1\] is complete yet"):
        tracin.run_tracin(exp_dir, runs=[1], progress=False)
    assert not list(exp_dir.glob("run_*/tracin.npz"))


def _write_stale(run_dir, steps, n_test=3, n_train=6):
    from simfluence import runlog

    dots = np.full((len(steps), n_test, n_train), 7.0, np.float32)
    runlog.write_tracin(run_dir, steps, np.full(len(steps), 0.5, np.float32), dots, "exact", 0, 0)


def test_run_tracin_recomputes_a_tracin_npz_of_other_checkpoints(tiny_exp, tmp_path, caplog):
    """A tracin.npz whose steps are not the run's checkpoints (e.g. left from an earlier training
    with other checkpoint_steps) is recomputed with a one-line warning, not skipped."""
    import shutil

    from simfluence import runlog

    exp_dir = tmp_path / "exp"
    shutil.copytree(tiny_exp[0], exp_dir)
    lr = tiny_exp[3]
    _write_stale(exp_dir / "run_000", [0])  # the run's checkpoints are at steps 0 and 2
    with caplog.at_level("WARNING", logger="finetune.tracin"):
        written = tracin.run_tracin(exp_dir, runs=[0], chunk_size=4, progress=False)
    assert written == [exp_dir / "run_000" / "tracin.npz"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "\n" not in warned[0], warned
    assert "run_000/tracin.npz: checkpoint steps [0] differ" in warned[0], warned
    got = runlog.read_tracin(exp_dir / "run_000")
    np.testing.assert_array_equal(got["steps"], [0, 2])
    np.testing.assert_array_equal(got["learning_rates"], lr[[0, 2]])
    assert not (got["dots"] == 7.0).any()  # none of the stale values survive


def test_run_tracin_keeps_a_finished_tracin_npz_after_its_checkpoints_are_deleted(
    tiny_exp, tmp_path, capsys
):
    """Deleting the checkpoints once tracin.npz is written (to free disk) must not make
    `finetune tracin` fail; a tracin.npz of other steps still needs the checkpoints."""
    import shutil

    from finetune.cli import main as finetune_main

    exp_dir = tmp_path / "exp"
    shutil.copytree(tiny_exp[0], exp_dir)
    for r in (0, 1):
        _write_stale(exp_dir / f"run_{r:03d}", [0, 2])  # matches meta.json's checkpoint_steps
        shutil.rmtree(exp_dir / f"run_{r:03d}" / "checkpoints")
    path = exp_dir / "run_000" / "tracin.npz"
    mtime = path.stat().st_mtime_ns
    assert tracin.run_tracin(exp_dir, progress=False) == []
    assert finetune_main(["tracin", str(exp_dir), "--runs", "0-1"]) == 0
    assert "wrote 0 tracin.npz" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == mtime
    # With a tracin.npz that does not cover the listed checkpoints, the missing ones are an error.
    _write_stale(exp_dir / "run_000", [0])
    with pytest.raises(ValueError, match=r"meta.json lists checkpoints at steps \[0, 2\]"):
        tracin.run_tracin(exp_dir, progress=False)


def test_module_entry_point_runs_the_cli(tmp_path):
    # `python -m finetune.tracin EXP` is `finetune tracin EXP` (it used to exit 0 doing nothing).
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "finetune.tracin", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out
    assert "experiment folder not found" in out.stderr.strip().splitlines()[-1]


def test_run_tracin_skips_a_checkpoint_at_the_runs_last_step(
    tmp_path, data_dir, t5_tokenizer_dir, capsys
):
    """Checkpoints at steps 0 and 2 of 2-step runs: step 2 feeds no step (TracIn-CP pairs step t
    with a checkpoint at or before t - 1), so only step 0 is computed, and said so."""
    from simfluence import runlog

    exp_dir = tmp_path / "exp"
    _, _, lr = _tiny_experiment(exp_dir, data_dir, t5_tokenizer_dir, steps=2, n_runs=2)
    written = tracin.run_tracin(exp_dir, chunk_size=4, progress=True)
    err = capsys.readouterr().err
    assert [p.parent.name for p in written] == ["run_000", "run_001"]
    for r in range(2):
        got = runlog.read_tracin(exp_dir / f"run_{r:03d}")
        np.testing.assert_array_equal(got["steps"], [0])
        np.testing.assert_array_equal(got["learning_rates"], lr[[0]])
        assert got["dots"].shape == (1, 3, 6)
        assert f"run_{r:03d}: checkpoint at step 2, the run's last step, skipped" in err
    # The skipped step does not make the finished runs look stale: nothing is recomputed.
    assert tracin.run_tracin(exp_dir, progress=False) == []


# ---- exact mode streams; the memory estimate and the refusal (issue 16 part 1) -----------------


def _f32_sizes(jaxpr) -> list[int]:
    """Sizes of every float32 value a (closed) jaxpr and its sub-jaxprs compute."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    out = []
    for eqn in jaxpr.eqns:
        out += [int(np.prod(v.aval.shape)) for v in eqn.outvars if v.aval.dtype == jnp.float32]
        for p in eqn.params.values():
            for sub in p if isinstance(p, list | tuple) else [p]:
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    out += _f32_sizes(sub)
    return out


@pytest.mark.parametrize("same_shapes", [True, False])
def test_exact_mode_streams_and_equals_the_loop_reference(same_shapes):
    """10 test examples in chunks of 3 (4 test chunks, the pool streamed past each): the dots
    equal single-example grad loops, and no value of the program holds n_test gradients."""
    trainable, frozen, train, test = _mlp_setup(n_train=7, n_test=10, seed=1)
    if not same_shapes:  # the two-map path (pool and test of different trailing shapes)
        train = {**train, "tokens": jnp.ones((7, 3), jnp.int32)}
        test = {**test, "tokens": jnp.ones((10, 5), jnp.int32)}
    g_train = _loop_grads(_mlp_loss, trainable, frozen, train)
    g_test = _loop_grads(_mlp_loss, trainable, frozen, test)
    got = tracin.compute_dots(
        _mlp_loss, trainable, frozen, train, test, chunk_size=3, combine=_combine
    )
    np.testing.assert_allclose(np.asarray(got), g_test @ g_train.T, rtol=1e-4, atol=1e-5)
    fn = tracin._make_dots_fn(_mlp_loss, _combine, "exact", 0, 3, 7, 10)
    sizes = _f32_sizes(jax.make_jaxpr(fn)(trainable, frozen, train, test, jax.random.key(0)))
    n_params = g_train.shape[1]
    assert max(sizes) < 10 * n_params  # the old [n_test, P] buffer is gone
    assert 3 * n_params in sizes  # a chunk of flattened gradients [3, P] is there


def _wide_loss(params, batch):  # batch {"x": [b, 2000]} -> [b]; 100k weights, tiny activations
    h = jnp.tanh(batch["x"] @ params["w"])  # [b, 50]
    return jnp.sum(h * h, axis=1) + 0.0 * params["b"]


def test_memory_estimate_bounds_the_compiled_buffers():
    """On a model whose per-example gradients dominate memory, XLA's own buffer assignment
    (compiled memory_analysis: arguments + temporaries + outputs) is at least the estimate
    (it is a lower bound) and, in exact mode, within 25% of it (it counts what matters, and
    16 test examples in chunks of 8 hold one chunk of test gradients, not all 16)."""
    k = jax.random.split(jax.random.key(0), 3)
    trainable, frozen = {"w": jax.random.normal(k[0], (2000, 50)) / 40}, {"b": jnp.float32(0)}
    n_params = 2000 * 50
    train = {"x": jax.random.normal(k[1], (24, 2000))}

    def measured(mode, n_test):
        test = {"x": jax.random.normal(k[2], (n_test, 2000))}
        d = 64 if mode == "projected" else 0
        fn = tracin._make_dots_fn(_wide_loss, _combine, mode, d, 8, 24, n_test)
        m = fn.lower(trainable, frozen, train, test, jax.random.key(0)).compile()
        m = m.memory_analysis()
        est = tracin.estimate_memory(
            n_params=n_params + 1,
            n_trainable=n_params,
            n_train=24,
            n_test=n_test,
            mode=mode,
            proj_dim=64,
            chunk_size=8,
            largest_leaf=n_params,
        )
        # The estimate also counts the restored checkpoint, held outside the jitted function.
        inside = est["total"] - 4 * n_params
        total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
        return inside, total

    inside, total = measured("exact", 16)
    assert inside <= total <= 1.25 * inside  # 1.10x; a held [16, P] would add 8 x P: 1.57x
    inside, total = measured("projected", 8)
    assert inside <= total


def test_param_counts_match_the_t5_closed_form():
    """jax.eval_shape counts against the T5 v1.1 formula: embeddings, 4 attention matrices per
    attention, 3 gated-FFN matrices, layer norms, relative position biases; IA3 adds l_k, l_v
    per attention and l_ff per FFN."""
    from finetune.config import ExperimentConfig

    d, ff, inner, heads, layers, vocab, buckets = 16, 24, 8, 2, 2, 100, 8
    t5 = dict(
        vocab_size=vocab, d_model=d, d_ff=ff, d_kv=inner // heads, num_heads=heads,
        num_layers=layers, num_decoder_layers=layers, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, relative_attention_num_buckets=buckets,
    )  # fmt: skip
    enc = 4 * d * inner + 3 * d * ff + 2 * d
    dec = 8 * d * inner + 3 * d * ff + 3 * d
    total = 2 * vocab * d + layers * (enc + dec) + 2 * buckets * heads + 2 * d
    base = dict(name="n", task="rte", random_init=t5, n_train=10, n_test=4, batch_size=2)
    assert tracin.param_counts(ExperimentConfig(**base))[:2] == (total, total)
    frozen_emb = tracin.param_counts(ExperimentConfig(**base, freeze_embeddings=True))
    assert frozen_emb[:2] == (total, total - vocab * d)
    assert frozen_emb[2] == vocab * d  # largest trainable leaf: lm_head
    ia3 = layers * (2 * inner + ff) + layers * (4 * inner + ff)
    assert tracin.param_counts(ExperimentConfig(**base, method="ia3"))[:2] == (total + ia3, ia3)


def test_check_memory_refuses_with_a_fix_that_fits():
    sizes = dict(n_params=10**6, n_trainable=10**6, n_train=100, n_test=50, largest_leaf=10**6)
    est = tracin.estimate_memory(**sizes, mode="exact", proj_dim=64, chunk_size=32)
    kw = dict(**sizes, mode="exact", proj_dim=64, chunk_size=32, where="EXP")
    assert tracin.check_memory(**kw, device_bytes=est["total"]) == est
    device = est["total"] // 3
    with pytest.raises(tracin.TracinMemoryError) as e:
        tracin.check_memory(**kw, device_bytes=device, device_name="the fake device")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("EXP: TracIn-CP in exact mode needs at least")
    assert f"at least {tracin._gb(est['total'])} " in msg and f"has {tracin._gb(device)};" in msg
    c = int(msg.split("lower the chunk size to ")[1].split()[0])
    fits = [
        tracin.estimate_memory(**sizes, mode="exact", proj_dim=64, chunk_size=n)["total"] <= device
        for n in (c, c + 1)
    ]
    assert fits == [True, False] and "--chunk-size" in msg and "--mode projected" in msg


def test_finetune_tracin_honours_the_config_and_refuses_what_cannot_fit(
    tiny_exp, tmp_path, monkeypatch, capsys
):
    """The recorded config's tracin_mode/proj_dim apply unless a flag overrides them; a setting
    above the device's memory exits 2 with one line before any gradient work, writing nothing."""
    import json
    import shutil

    from finetune.cli import main as finetune_main
    from finetune.experiment import read_config

    exp_dir = tmp_path / "exp"
    shutil.copytree(tiny_exp[0], exp_dir)
    info = json.loads((exp_dir / "experiment.json").read_text())
    info["config"].update(tracin_mode="projected", tracin_proj_dim=8, tracin_chunk_size=2)
    (exp_dir / "experiment.json").write_text(json.dumps(info))
    config = read_config(exp_dir)
    est = tracin.check_config_memory(config, device_bytes=10**15)
    n_params, n_trainable, _ = tracin.param_counts(config)
    assert est["pool gradients"] == 4 * 2 * n_trainable  # the config's chunk of 2
    monkeypatch.setattr(tracin, "device_memory", lambda: (est["total"] - 1, "the fake device"))
    for flags, mode, what in [
        ([], "projected", "3 projections of 8"),
        (["--mode", "exact", "--chunk-size", "3"], "exact", "2 chunks of 3 gradients"),
    ]:
        assert finetune_main(["tracin", str(exp_dir), "--runs", "0", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {exp_dir}: TracIn-CP in {mode} mode needs at least")
        assert what in err and "the fake device has" in err and "\n" not in err
    assert not list(exp_dir.glob("run_*/tracin.npz"))  # nothing written


def test_param_counts_of_a_checkpoint_equal_the_loaded_model(tiny_t5_dir, monkeypatch):
    """eval_shape counts (no weights read) against the model load_pretrained allocates; a hub
    name whose config.json cannot be found offline is a one-line error naming it."""
    from flax import nnx

    from finetune import hf
    from finetune.config import ExperimentConfig

    base = dict(name="n", task="rte", n_train=10, n_test=4, batch_size=2)
    config = ExperimentConfig(**base, model=str(tiny_t5_dir), freeze_embeddings=True)
    model, _ = hf.load_pretrained(tiny_t5_dir)
    _, params = nnx.split(model)
    from finetune.experiment import make_mask
    from finetune.model import partition

    trainable, _ = partition(params, make_mask(config, params))
    counts = tracin.param_counts(config)
    assert counts[:2] == (tracin.count_params(params), tracin.count_params(trainable))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model nobody/no-such-t5: its config.json") as e:
        tracin.param_counts(ExperimentConfig(**base, model="nobody/no-such-t5"))
    assert "\n" not in str(e.value)
