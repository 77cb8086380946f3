"""The vmapped group program: R runs together == one at a time; sharded == single device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from finetune import hf
from finetune.data import (
    bucket_lengths,
    flat_group_lengths,
    gather_batch,
    gather_flat,
    make_tracked_set,
)
from finetune.distributed import batch_sharding, make_mesh, place, put, rows_sharding
from finetune.model import make_per_example_loss, make_score_choices, partition, trainable_mask
from finetune.steps import broadcast_runs, make_optimizer, make_programs
from finetune.trainer import _choice_rows, _gold

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 reassociation only; fixed before running


def _data(rng, n, vocab=60, max_len=24):
    lengths = rng.integers(3, max_len + 1, n)
    inputs = np.zeros((n, max_len), np.int32)
    for i, k in enumerate(lengths):
        inputs[i, : k - 1] = rng.integers(3, vocab, k - 1)
        inputs[i, k - 1] = 1
    choices = np.zeros((n, 2, 3), np.int32)
    choices[:, :, 0] = rng.integers(3, vocab, (n, 2))
    choices[:, :, 1] = 1
    labels = rng.integers(0, 2, n).astype(np.int32)
    return inputs, choices[np.arange(n), labels], choices, labels, lengths.astype(np.int32)


_TINY_T5 = dict(
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


@pytest.fixture(scope="module")
def setup():
    config = transformers.T5Config(**_TINY_T5)
    graphdef, params = nnx.split(hf.init_random(config, seed=0))
    trainable, frozen = partition(params, trainable_mask(params, "full"))
    rng = np.random.default_rng(0)
    pool, test = _data(rng, 16), _data(rng, 5)
    optimizer = make_optimizer("adamw", 1e-2)
    fns = (make_per_example_loss(graphdef), make_score_choices(graphdef))
    return dict(
        trainable=trainable,
        frozen=frozen,
        pool=pool,
        test=test,
        optimizer=optimizer,
        fns=fns,
        params=params,
    )


_PROGRAMS = {}


def _programs(s, devices):
    """One set of jitted programs per device count, shared by the tests (compiles are slow)."""
    key = len(devices)
    if key not in _PROGRAMS:
        mesh = make_mesh(devices)
        _PROGRAMS[key] = (mesh, make_programs(*s["fns"], s["optimizer"], mesh))
    return _PROGRAMS[key]


def _train(s, devices, curricula, multiple=24, test_multiple=8):
    """Runs curricula [R, T, b] together on a mesh; returns (train [R, T], test [R, T, n], tr).

    Batches are padded to ``multiple`` = the maximum input length (one shape, one compile per
    R); the tracked set is cut into buckets of ``test_multiple``.
    """
    mesh, progs = _programs(s, devices)
    n_dev = len(devices)
    tracked = make_tracked_set(
        *s["test"][:4], s["test"][4], multiple=multiple, n_devices=n_dev, mesh=mesh
    )
    r = curricula.shape[0]
    tr = place(broadcast_runs(s["trainable"], r), mesh)
    op = place(broadcast_runs(s["optimizer"].init(s["trainable"]), r), mesh)
    fr = place(s["frozen"], mesh)
    sharding = batch_sharding(mesh, curricula.shape[2])
    train, test = [], []
    for t in range(curricula.shape[1]):
        batch = gather_batch(s["pool"][0], s["pool"][1], s["pool"][4], curricula[:, t], multiple)
        batch = {k: put(v, sharding) for k, v in batch.items()}
        tr, op, tl, te = progs["step"](tr, op, fr, batch, tracked.buckets)
        train.append(np.asarray(tl))
        test.append(_gold(_choice_rows(te, tracked), tracked))  # the gold choice's loss
    return np.stack(train, 1), np.stack(test, 1), jax.device_get(tr), progs


def test_runs_together_equal_runs_alone(setup):
    rng = np.random.default_rng(1)
    curricula = rng.integers(0, 16, (2, 3, 8))
    dev = jax.devices()[:1]
    train, test, tr, progs = _train(setup, dev, curricula)
    # The second and third calls did not recompile (one training and one logging program).
    assert progs["advance"]._cache_size() == 1 and progs["test_losses"]._cache_size() == 1
    for r in range(2):
        train1, test1, tr1, _ = _train(setup, dev, curricula[r : r + 1])
        np.testing.assert_allclose(train1[0], train[r], **TOL)
        np.testing.assert_allclose(test1[0], test[r], **TOL)
        for a, b in zip(jax.tree.leaves(tr1), jax.tree.leaves(tr), strict=True):
            np.testing.assert_allclose(a[0], b[r], **TOL)
    # The runs differ (different curricula), so the comparison is not vacuous.
    assert np.abs(test[0] - test[1]).max() > 1e-4


def test_sharded_step_equals_single_device(setup):
    assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
    rng = np.random.default_rng(2)
    curricula = rng.integers(0, 16, (2, 2, 8))
    train1, test1, tr1, _ = _train(setup, jax.devices()[:1], curricula)
    train8, test8, tr8, _ = _train(setup, jax.devices(), curricula)
    np.testing.assert_allclose(train8, train1, **TOL)
    np.testing.assert_allclose(test8, test1, **TOL)
    for a, b in zip(jax.tree.leaves(tr8), jax.tree.leaves(tr1), strict=True):
        np.testing.assert_allclose(a, b, **TOL)


def test_bucketed_tracked_losses_match_unpadded_reference(setup):
    """The logged losses (length buckets + scatter) are each example's own loss, in test order."""
    from finetune.model import combine

    curricula = np.random.default_rng(1).integers(0, 16, (2, 3, 8))  # as in the test above
    _, test, tr, _ = _train(setup, jax.devices()[:1], curricula)
    inputs, targets = setup["test"][:2]
    for r in range(2):
        params = combine(jax.tree.map(lambda x, r=r: x[r], tr), setup["frozen"])
        # Reference: all examples in one batch padded to the maximum, in test order (no buckets).
        want = jax.jit(setup["fns"][0])(params, {"inputs": inputs, "targets": targets})
        np.testing.assert_allclose(test[r, -1], np.asarray(want), **TOL)
    assert np.unique(np.round(test[0, -1], 4)).size == len(inputs)  # distinct: order checked


def test_logged_choice_losses_are_each_choices_own_loss(setup, tmp_path):
    """choice_losses.npy: every answer choice's logged loss (length buckets, choice scoring,
    scatter) against that choice's per-example loss computed directly (one batch at full width,
    no buckets), at weights other than the initial ones; the gold column and the run-log round
    trip. The programs and shapes are those the tests above compiled (one run: the run axis is
    checked there)."""
    from finetune.model import combine
    from simfluence import runlog

    mesh, progs = _programs(setup, jax.devices()[:1])
    inputs, _, choices, labels, _ = setup["test"]
    tracked = make_tracked_set(*setup["test"], multiple=4, n_devices=1, mesh=mesh)
    assert len(tracked.buckets) > 1
    tr = jax.tree.map(lambda x: x * np.asarray(1.2, x.dtype), broadcast_runs(setup["trainable"], 1))
    te = progs["test_losses"](place(tr, mesh), place(setup["frozen"], mesh), tracked.buckets)
    choice = _choice_rows(te, tracked)[0]  # [n_test, C], as the trainer logs it
    gold = _gold(choice, tracked)
    n = len(labels)
    assert choice.shape == (n, 2) and choice.dtype == np.float32
    params = combine(jax.tree.map(lambda x: x[0], tr), setup["frozen"])
    direct = jax.jit(setup["fns"][0])
    for k in range(2):
        want = direct(params, {"inputs": inputs, "targets": choices[:, k]})
        np.testing.assert_allclose(choice[:, k], np.asarray(want), **TOL)
    np.testing.assert_array_equal(gold, choice[np.arange(n), labels])
    assert np.abs(choice[:, 0] - choice[:, 1]).min() > 1e-4  # the choices differ
    # The run log takes them: the gold column is losses.npy bitwise, the labels come back.
    exp = tmp_path / "exp"
    runlog.write_experiment(exp, {"n_train": 16, "n_test": n, "test_labels": labels.tolist()})
    cur = np.zeros((1, 2), np.int32)
    runlog.write_run(
        runlog.run_dir(exp, 0), cur, np.stack([gold] * 2), choice_losses=choice[None][[0, 0]]
    )
    np.testing.assert_array_equal(runlog.load_runs(exp)[0].gold, labels)


def test_gather_batch_pads_to_multiple_of_own_max(setup):
    pool = setup["pool"]
    ids = np.array([[0, 1], [2, 3]])
    batch = gather_batch(pool[0], pool[1], pool[4], ids, 8)
    length = batch["inputs"].shape[-1]
    assert length % 8 == 0 and length - 8 < pool[4][ids].max() <= length
    assert batch["inputs"].shape[:2] == (2, 2) and batch["targets"].shape == (2, 2, 3)


def _brute_force_padding(lengths, multiple, max_buckets, n_devices):
    """Least padded tokens over every split of the sorted distinct lengths into <= K groups."""
    import itertools

    padded = -(-np.maximum(lengths, 1) // multiple) * multiple
    values, counts = np.unique(padded, return_counts=True)
    m, best = len(values), None
    for k in range(1, min(max_buckets, m) + 1):
        for cuts in itertools.combinations(range(1, m), k - 1):
            bounds = (0, *cuts, m)
            total = 0
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                rows = counts[a:b].sum()
                total += -(-rows // n_devices) * n_devices * values[b - 1]
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_bucket_lengths_minimise_padding(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 120, rng.integers(5, 40))
    multiple, k, n_dev = [4, 8, 16][seed % 3], 1 + seed % 4, [1, 3][seed % 2]
    padded = bucket_lengths(lengths, multiple=multiple, max_buckets=k, n_devices=n_dev)
    rounded = -(-lengths // multiple) * multiple
    assert np.all(padded >= rounded) and np.all(padded % multiple == 0)
    assert len(np.unique(padded)) <= k
    # Monotone: a longer input never gets a shorter bucket.
    order = np.argsort(lengths, kind="stable")
    assert np.all(np.diff(padded[order]) >= 0)
    rows = {v: (padded == v).sum() for v in np.unique(padded)}
    got = sum(-(-n // n_dev) * n_dev * v for v, n in rows.items())
    assert got == _brute_force_padding(lengths, multiple, k, n_dev)
    # No cap (or a cap above the distinct count) keeps the plain rounding.
    np.testing.assert_array_equal(
        bucket_lengths(lengths, multiple=multiple, max_buckets=None), rounded
    )


def test_capped_buckets_log_the_same_losses_and_compile_logging_once(setup):
    """Fewer tracked buckets change only the padding: same per-example losses. A new batch
    length recompiles the training program, never the logging one."""
    dev = jax.devices()[:1]
    mesh, progs = _programs(setup, dev)
    test = setup["test"]
    tr = place(broadcast_runs(setup["trainable"], 1), mesh)
    fr = place(setup["frozen"], mesh)
    sets = [
        make_tracked_set(*test, multiple=4, n_devices=1, mesh=mesh, max_buckets=k)
        for k in (None, 1)
    ]
    assert len(sets[0].buckets) > 1 and len(sets[1].buckets) == 1
    losses = [
        s.scatter(np.moveaxis(np.asarray(progs["test_losses"](tr, fr, s.buckets)), -1, 1))
        for s in sets
    ]
    np.testing.assert_allclose(losses[1], losses[0], **TOL)

    op = place(broadcast_runs(setup["optimizer"].init(setup["trainable"]), 1), mesh)
    sharding = batch_sharding(mesh, 2)
    pool = setup["pool"]
    short, long = np.argsort(pool[4])[:2], np.argsort(pool[4])[-2:]
    n_log = progs["test_losses"]._cache_size()
    n_adv = progs["advance"]._cache_size()
    for ids in (short, long):
        batch = gather_batch(pool[0], pool[1], pool[4], ids[None], 4)
        batch = {k: put(v, sharding) for k, v in batch.items()}
        tr, op, _, te = progs["step"](tr, op, fr, batch, sets[1].buckets)
    assert progs["advance"]._cache_size() == n_adv + 2  # two batch lengths: two programs
    assert progs["test_losses"]._cache_size() == n_log  # logging reused as compiled above


def test_fused_attention_programs_log_the_same_losses(setup):
    """The programs the trainer builds for attention="xla" (tracked buckets broadcast over the
    run axis) log the losses and scores of the default einsum programs."""
    config = transformers.T5Config(**_TINY_T5)
    graphdef = nnx.split(hf.init_random(config, seed=0, attention="xla"))[0]
    mesh, ref = _programs(setup, jax.devices()[:1])
    fused = make_programs(
        make_per_example_loss(graphdef),
        make_score_choices(graphdef),
        setup["optimizer"],
        mesh,
        broadcast_tracked=True,
    )
    tracked = make_tracked_set(*setup["test"], multiple=4, n_devices=1, mesh=mesh)
    # Two runs with different trainable states, so a mix-up of the run axis would show.
    leaves = jax.tree.leaves(setup["trainable"])
    tr = place(broadcast_runs(setup["trainable"], 2), mesh)
    tr = jax.tree.map(lambda x: x.at[1].multiply(1.1), tr)
    assert len(leaves) > 0
    for name in ("test_losses", "scores"):
        got = np.asarray(fused[name](tr, place(setup["frozen"], mesh), tracked.buckets))
        want = np.asarray(ref[name](tr, place(setup["frozen"], mesh), tracked.buckets))
        np.testing.assert_allclose(got, want, **TOL)
        assert np.abs(want[0] - want[1]).max() > 1e-4


@pytest.fixture(scope="module")
def ia3_setup():
    model = hf.init_random(transformers.T5Config(**_TINY_T5), ia3=True, seed=5)
    graphdef, params = nnx.split(model)
    trainable, frozen = partition(params, trainable_mask(params, "ia3"))
    # IA3 vectors away from 1, so that a run-index mix-up changes the losses.
    rng = np.random.default_rng(7)
    trainable = jax.tree.map(lambda x: x * (1 + 0.3 * rng.standard_normal(x.shape)), trainable)
    pool, test = _data(rng, 16), _data(rng, 5)
    return dict(
        graphdef=graphdef,
        trainable=trainable,
        frozen=frozen,
        pool=pool,
        test=test,
        optimizer=make_optimizer("adamw", 3e-2),
        fns=(make_per_example_loss(graphdef), make_score_choices(graphdef)),
    )


def _train_ia3(s, devices, curricula, groups):
    """The runs' train losses, test losses and final IA3 state; length groups or vmapped runs."""
    mesh = make_mesh(devices)
    progs = make_programs(*s["fns"], s["optimizer"], mesh)
    tracked = make_tracked_set(*s["test"], multiple=8, n_devices=len(devices), mesh=mesh)
    r = curricula.shape[0]
    tr = place(broadcast_runs(s["trainable"], r), mesh)
    op = place(broadcast_runs(s["optimizer"].init(s["trainable"]), r), mesh)
    fr = place(s["frozen"], mesh)
    pool = s["pool"][0], s["pool"][1], s["pool"][4]
    lengths = flat_group_lengths(pool[2], curricula, groups or 1, 4, pool[0].shape[1])
    train, test = [], []
    for t in range(curricula.shape[1]):
        if groups:
            rows = [
                {k: put(v, rows_sharding(mesh, len(v))) for k, v in g.items()}
                for g in gather_flat(*pool, curricula[:, t], lengths)
            ]
            tr, op, tl, te = progs["step_flat"](tr, op, fr, tuple(rows), tracked.buckets)
        else:
            batch = gather_batch(*pool, curricula[:, t], 4)
            sharding = batch_sharding(mesh, curricula.shape[2])
            batch = {k: put(v, sharding) for k, v in batch.items()}
            tr, op, tl, te = progs["step"](tr, op, fr, batch, tracked.buckets)
        train.append(np.asarray(tl))
        test.append(_gold(_choice_rows(te, tracked), tracked))  # the gold choice's loss
    return np.stack(train, 1), np.stack(test, 1), jax.device_get(tr)


@pytest.mark.parametrize(("n_dev", "groups"), [(1, 3), (8, 2)])
def test_length_groups_step_equals_vmapped_runs(ia3_setup, n_dev, groups):
    """Examples of all runs in length groups, each with its own run's IA3 vectors, train the
    runs exactly as the vmap over runs does (8 devices: the group rows are sharded)."""
    curricula = np.random.default_rng(3).integers(0, 16, (4, 3, 4))  # R=4, T=3, b=4
    devices = jax.devices()[:n_dev]
    if "runs" not in ia3_setup:  # the vmapped-runs reference, once for both cases
        ia3_setup["runs"] = _train_ia3(ia3_setup, jax.devices()[:1], curricula, None)
    want = ia3_setup["runs"]
    got = _train_ia3(ia3_setup, devices, curricula, groups)
    for a, b in zip(got[:2], want[:2], strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2]), strict=True):
        np.testing.assert_allclose(a, b, **TOL)
    assert np.abs(want[1][0] - want[1][1]).max() > 1e-4  # the runs differ: not vacuous


def test_gather_flat_places_every_example_once_in_fitting_groups():
    rng = np.random.default_rng(4)
    lengths = rng.integers(1, 60, 30)
    inputs = np.zeros((30, 64), np.int32)
    for i, n in enumerate(lengths):
        inputs[i, :n] = 1 + i  # the example's id in every real position
    targets = np.arange(30, dtype=np.int32)[:, None]
    ids = rng.integers(0, 30, (3, 5, 4))  # R=3, T=5, b=4
    group_lengths = flat_group_lengths(lengths, ids, 3, 8, 64)
    assert list(group_lengths) == sorted(group_lengths)
    for t in range(5):
        groups = gather_flat(inputs, targets, lengths, ids[:, t], group_lengths)
        seen = []
        for g, length in zip(groups, group_lengths, strict=True):
            assert g["inputs"].shape[1] == length and length % 8 == 0
            for row, tgt, run in zip(g["inputs"], g["targets"], g["run"], strict=True):
                ex = int(tgt[0])
                assert lengths[ex] <= length and (row[: lengths[ex]] == 1 + ex).all()
                seen.append((int(run), ex))
        want = [(r, int(e)) for r in range(3) for e in ids[r, t]]
        assert sorted(seen) == sorted(want)
        # Sorted: no example of a later group is shorter than one of an earlier group.
        maxima = [lengths[g["targets"][:, 0]].max() for g in groups]
        minima = [lengths[g["targets"][:, 0]].min() for g in groups]
        assert all(maxima[i] <= minima[i + 1] for i in range(len(groups) - 1))


@pytest.mark.parametrize("t_len", [2, 3])
def test_cudnn_attention_traces_through_the_run_programs(monkeypatch, t_len):
    """No GPU here, so the cuDNN path is traced, not run: every run program of an IA3 model
    with attention="cudnn" passes cuDNN's shape checks and batching rules (the run vmap, the
    flat length groups) and really contains the fused kernel. An odd target length, which the
    kernel refuses with a trained-through bias, falls back to XLA in the decoder."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not hasattr(fused, "check_cudnn_version"):
        pytest.skip("this jax has no cuDNN version check to stand in for")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 90800)  # as if cuDNN 9.8
    config = transformers.T5Config(**{**_TINY_T5, "d_model": 32, "d_kv": 8})
    model = hf.init_random(config, ia3=True, seed=0, dtype=jnp.bfloat16, attention="cudnn")
    graphdef, params = nnx.split(model)
    trainable, frozen = partition(params, trainable_mask(params, "ia3"))
    optimizer = make_optimizer("adamw", 1e-3)
    mesh = make_mesh(jax.devices()[:1])
    progs = make_programs(
        make_per_example_loss(graphdef),
        make_score_choices(graphdef),
        optimizer,
        mesh,
        broadcast_tracked=True,
    )
    r, b = 2, 4
    tr, op = broadcast_runs(trainable, r), broadcast_runs(optimizer.init(trainable), r)
    ones = lambda *shape: jnp.ones(shape, jnp.int32)  # noqa: E731
    buckets = ({"inputs": ones(4, 16), "targets": ones(4, t_len), "choices": ones(4, 2, t_len)},)
    batch = {"inputs": ones(r, b, 16), "targets": ones(r, b, t_len)}
    groups = tuple(
        {"inputs": ones(4, n), "targets": ones(4, t_len), "run": jnp.array([0, 0, 1, 1])}
        for n in (16, 32)
    )
    for name, args in (
        ("test_losses", (tr, frozen, buckets)),
        ("scores", (tr, frozen, buckets)),
        ("advance", (tr, op, frozen, batch)),
        ("advance_flat", (tr, op, frozen, groups)),
    ):
        jaxpr = str(jax.make_jaxpr(progs[name])(*args))
        assert "dot_product_attention" in jaxpr, name  # the cuDNN primitive, not einsums
