"""Run-log format: round trip, atomic writes, and every kind of bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from simfluence import runlog
from simfluence.runlog import RunLogError

N_TRAIN, N_TEST = 7, 3


def _exp(tmp_path, n_runs=3, steps=(5, 4, 6), batch=2, seed=0):
    rng = np.random.default_rng(seed)
    exp = tmp_path / "exp"
    runlog.write_experiment(exp, {"n_train": N_TRAIN, "n_test": N_TEST, "task": "toy"})
    runs = []
    for i in range(n_runs):
        cur = rng.integers(0, N_TRAIN, size=(steps[i], batch)).astype(np.int32)
        los = rng.random((steps[i] + 1, N_TEST)).astype(np.float32)
        lr = np.full(steps[i], 1e-3, np.float32) if i == 0 else None
        runlog.write_run(runlog.run_dir(exp, i), cur, los, meta={"seed": i}, lr=lr)
        runs.append((cur, los, lr))
    return exp, runs


def test_round_trip(tmp_path):
    exp, written = _exp(tmp_path)
    assert runlog.read_experiment(exp)["task"] == "toy"
    runs = runlog.load_runs(exp)
    assert [r.index for r in runs] == [0, 1, 2]
    for run, (cur, los, lr) in zip(runs, written, strict=True):
        assert run.curriculum.dtype == np.int32 and run.losses.dtype == np.float32
        np.testing.assert_array_equal(run.curriculum, cur)
        np.testing.assert_array_equal(run.losses, los)
        assert run.steps == cur.shape[0] and run.batch == 2
        if lr is None:
            assert run.lr is None
        else:
            np.testing.assert_array_equal(run.lr, lr)
        assert run.meta["status"] == "complete"
    assert runs[1].meta["seed"] == 1
    sel = runlog.load_runs(exp, [2, 0])
    assert [r.index for r in sel] == [2, 0]
    assert runlog.run_dir(exp, 7).name == "run_007"
    # No temporary files left behind.
    assert not [p for p in exp.rglob("*") if p.name.endswith(".tmp")]


def test_incomplete_runs_skipped_with_warning(tmp_path):
    exp, _ = _exp(tmp_path)
    (runlog.run_dir(exp, 1) / "meta.json").unlink()
    listing = runlog.list_runs(exp)
    assert [(i, c) for i, _, c in listing] == [(0, True), (1, False), (2, True)]
    with pytest.warns(UserWarning, match="run_001"):
        runs = runlog.load_runs(exp)
    assert [r.index for r in runs] == [0, 2]
    with pytest.raises(RunLogError, match="run 1 is incomplete"):
        runlog.load_runs(exp, [1])
    with pytest.raises(RunLogError, match="run 9 not found"):
        runlog.load_runs(exp, [9])


def test_runlog_does_not_import_jax():
    # Load the module file alone (not via the package __init__): it must not pull in jax.
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('rl', {runlog.__file__!r}); "
        "m = importlib.util.module_from_spec(spec); sys.modules['rl'] = m; "
        "spec.loader.exec_module(m); "
        "print('jax' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _single_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "cur, los, match",
    [
        (np.zeros((3, 2), np.float32), np.zeros((4, N_TEST), np.float32), "dtype"),
        (np.zeros((3,), np.int32), np.zeros((4, N_TEST), np.float32), "shape"),
        (np.full((3, 2), N_TRAIN, np.int32), np.zeros((4, N_TEST), np.float32), "outside"),
        (np.full((3, 2), -1, np.int32), np.zeros((4, N_TEST), np.float32), "outside"),
        (np.zeros((3, 2), np.int32), np.zeros((3, N_TEST), np.float32), "steps\\+1"),
        (np.zeros((3, 2), np.int32), np.zeros((4, N_TEST + 1), np.float32), "n_test"),
        (np.zeros((3, 2), np.int32), np.zeros((4, N_TEST), np.int32), "dtype"),
        (np.zeros((3, 2), np.int32), np.full((4, N_TEST), np.nan, np.float32), "non-finite"),
        (np.zeros((3, 2), np.int32), np.full((4, N_TEST), np.inf, np.float32), "non-finite"),
    ],
)
def test_write_run_rejects_bad_input(tmp_path, cur, los, match):
    exp, _ = _exp(tmp_path, n_runs=0, steps=())
    with pytest.raises(RunLogError, match=match) as exc:
        runlog.write_run(runlog.run_dir(exp, 0), cur, los)
    assert "run_000" in _single_line(exc)
    assert not (runlog.run_dir(exp, 0) / "meta.json").exists()


@pytest.mark.parametrize(
    "name, array, match",
    [
        ("curriculum.npy", np.zeros((5, 2), np.float64), "dtype"),
        ("curriculum.npy", np.full((5, 2), 99, np.int32), "outside"),
        ("losses.npy", np.zeros((5, N_TEST), np.float32), "rows"),
        ("losses.npy", np.full((6, N_TEST), np.nan, np.float32), "non-finite"),
        ("losses.npy", np.zeros((6, N_TEST, 1), np.float32), "shape"),
        ("lr.npy", np.zeros(3, np.float32), "shape"),
    ],
)
def test_load_runs_rejects_corrupted_files(tmp_path, name, array, match):
    exp, _ = _exp(tmp_path)
    path = runlog.run_dir(exp, 0) / name
    np.save(path, array)
    with pytest.raises(RunLogError, match=match) as exc:
        runlog.load_runs(exp)
    assert str(path) in _single_line(exc)


def test_missing_things(tmp_path):
    with pytest.raises(RunLogError, match="not found") as exc:
        runlog.load_runs(tmp_path / "nope")
    _single_line(exc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunLogError, match="experiment.json not found"):
        runlog.read_experiment(tmp_path / "empty")
    (tmp_path / "empty" / "experiment.json").write_text("{not json")
    with pytest.raises(RunLogError, match="invalid JSON"):
        runlog.read_experiment(tmp_path / "empty")
    (tmp_path / "empty" / "experiment.json").write_text(json.dumps({"n_train": 3}))
    with pytest.raises(RunLogError, match="n_test"):
        runlog.read_experiment(tmp_path / "empty")
    with pytest.raises(RunLogError, match="n_train must be a positive integer"):
        runlog.write_experiment(tmp_path / "x", {"n_train": 0, "n_test": 2})
    exp, _ = _exp(tmp_path)
    (runlog.run_dir(exp, 2) / "losses.npy").unlink()
    with pytest.raises(RunLogError, match="losses.npy not found"):
        runlog.load_runs(exp)


def test_mixed_batch_and_duplicate_index(tmp_path):
    exp, _ = _exp(tmp_path)
    runlog.write_run(
        runlog.run_dir(exp, 3), np.zeros((2, 3), np.int32), np.zeros((3, N_TEST), np.float32)
    )
    with pytest.raises(RunLogError, match="batch size 3"):
        runlog.load_runs(exp)
    (exp / "run_3").mkdir()
    with pytest.raises(RunLogError, match="both hold run 3"):
        runlog.list_runs(exp)


def test_load_runs_takes_each_int_index_once(tmp_path):
    exp, _ = _exp(tmp_path)
    assert [r.index for r in runlog.load_runs(exp, [np.int64(1), 0])] == [1, 0]
    for bad, match in (
        ([1.7], r"run index 1\.7 is not an int"),
        ([True], "run index True"),
        ([0, 0], "run 0 is listed twice"),
    ):
        with pytest.raises(RunLogError, match=match) as exc:
            runlog.load_runs(exp, bad)
        _single_line(exc)


def test_atomic_writers_leave_no_file_on_failure(tmp_path):
    with pytest.raises(RunLogError, match="NaN|undefined"):
        runlog.atomic_write_json(tmp_path / "a.json", {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []
    runlog.atomic_save_npy(tmp_path / "a", np.arange(3))  # no suffix appended
    np.testing.assert_array_equal(np.load(tmp_path / "a"), np.arange(3))
    runlog.atomic_savez(tmp_path / "b.npz", x=np.ones(2), s="hello")
    with np.load(tmp_path / "b.npz") as z:
        assert str(z["s"]) == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.npz"]


def test_tracin_round_trip_and_validation(tmp_path):
    exp, _ = _exp(tmp_path)
    rd = runlog.run_dir(exp, 0)
    assert runlog.read_tracin(rd) is None
    dots = np.random.default_rng(0).normal(size=(2, N_TEST, N_TRAIN)).astype(np.float32)
    runlog.write_tracin(rd, [0, 3], [1e-3, 5e-4], dots, "projected", 16, 7)
    t = runlog.read_tracin(rd)
    np.testing.assert_array_equal(t["dots"], dots)
    assert t["steps"].tolist() == [0, 3] and t["mode"] == "projected"
    assert (t["proj_dim"], t["seed"]) == (16, 7)
    np.testing.assert_allclose(t["learning_rates"], [1e-3, 5e-4])
    bad = [
        (dict(steps=[3, 0]), "increasing"),
        (dict(learning_rates=[1e-3]), "learning_rates"),
        (dict(dots=dots[:, :, :-1]), "n_train"),
        (dict(dots=np.full_like(dots, np.nan)), "non-finite"),
        (dict(mode="approx"), "mode"),
        (dict(mode="exact", proj_dim=16), "proj_dim"),
    ]
    base = dict(
        steps=[0, 3], learning_rates=[1e-3, 5e-4], dots=dots, mode="projected", proj_dim=16, seed=7
    )
    for change, match in bad:
        with pytest.raises(RunLogError, match=match):
            runlog.write_tracin(runlog.run_dir(exp, 1), **{**base, **change})
    assert runlog.read_tracin(runlog.run_dir(exp, 1)) is None
    np.savez(rd / "tracin.npz", steps=np.array([0]))
    with pytest.raises(RunLogError, match="missing arrays"):
        runlog.read_tracin(rd)


def test_read_examples(tmp_path):
    exp, _ = _exp(tmp_path)
    assert runlog.read_examples(exp) is None
    ex = {"train": [f"t{i}" for i in range(N_TRAIN)], "test": ["a", "b", "c"]}
    runlog.atomic_write_json(exp / "examples.json", ex)
    assert runlog.read_examples(exp) == ex
    runlog.atomic_write_json(exp / "examples.json", {"train": ["x"], "test": ["a", "b", "c"]})
    with pytest.raises(RunLogError, match="1 texts"):
        runlog.read_examples(exp)


@pytest.mark.parametrize("name", ["curriculum.npy", "losses.npy", "lr.npy"])
def test_load_runs_names_an_npz_archive_in_place_of_an_array(tmp_path, name):
    exp, _ = _exp(tmp_path)
    path = runlog.run_dir(exp, 0) / name
    with open(path, "wb") as f:  # np.savez on an open file keeps the .npy name
        np.savez(f, a=np.zeros(3))
    with pytest.raises(RunLogError, match="npz archive") as exc:
        runlog.load_runs(exp)
    assert str(path) in _single_line(exc)


def test_read_tracin_names_a_truncated_archive(tmp_path):
    exp, _ = _exp(tmp_path)
    rd = runlog.run_dir(exp, 0)
    dots = np.zeros((2, N_TEST, N_TRAIN), np.float32)
    runlog.write_tracin(rd, [0, 3], [1e-3, 5e-4], dots, "exact", 0, 0)
    data = (rd / "tracin.npz").read_bytes()
    for cut in (400, len(data) - 100):  # the member headers, then the central directory
        (rd / "tracin.npz").write_bytes(data[:cut])
        with pytest.raises(RunLogError, match="delete it and recompute") as exc:
            runlog.read_tracin(rd)
        assert str(rd / "tracin.npz") in _single_line(exc)


def test_experiment_owns_its_own_files(tmp_path):
    exp, _ = _exp(tmp_path)
    owned = ["experiment.json", "examples.json", "data.npz", "run_000/meta.json", "run_7/x.json"]
    for rel in [*owned, "counterfactual/report.json", "counterfactual/run_003/losses.npy"]:
        assert runlog.experiment_owns(exp, exp / rel), rel
    assert runlog.experiment_owns(exp, exp / "run_000" / ".." / "experiment.json")
    for rel in ["results.json", "sim.npz", "figures/a.json", "run_x/a.json"]:
        assert not runlog.experiment_owns(exp, exp / rel), rel
    assert not runlog.experiment_owns(exp, tmp_path / "experiment.json")
    assert not runlog.experiment_owns(exp, exp)
