"""Choice losses in the run log, the margin and accuracy, and `--metric` in the CLI."""

import json

import numpy as np
import pytest

from simfluence import choice_metrics, runlog, simulators
from simfluence.cli import main
from simfluence.evaluation import evaluate

N_TRAIN, N_TEST, C, BATCH, STEPS, RUNS = 8, 4, 2, 2, 12, 7
L2_A, L2_B = 0.3, 0.05


def test_margin_and_accuracy_on_a_hand_labelled_case():
    # 1 step, 3 examples, 3 choices; gold 0, 2, 1.
    losses = np.array([[[0.2, 0.5, 0.9], [0.4, 0.3, 0.6], [0.7, 0.7, 0.1]]], np.float32)
    gold = np.array([0, 2, 1])
    # Best wrong minus gold: 0.5 - 0.2; 0.3 - 0.6; 0.1 - 0.7 (a tie among wrong ones: 0.7, 0.1).
    np.testing.assert_allclose(
        choice_metrics.margin(losses, gold), [[0.3, -0.3, -0.6]], rtol=0, atol=1e-7
    )
    np.testing.assert_array_equal(choice_metrics.accuracy(losses, gold), [[1.0, 0.0, 0.0]])
    # A tie with the gold choice: margin 0 (not > 0), and argmin's first index decides accuracy.
    tie = np.array([[[0.5, 0.5]]], np.float32)
    assert choice_metrics.margin(tie, np.array([1]))[0, 0] == 0.0
    assert choice_metrics.accuracy(tie, np.array([0]))[0, 0] == 1.0
    assert choice_metrics.accuracy(tie, np.array([1]))[0, 0] == 0.0
    for bad in ("acc", "choice:", "choice:-1", "margin2"):
        with pytest.raises(ValueError, match="choose loss, margin or choice:K"):
            choice_metrics.check_metric(bad)
    assert choice_metrics.check_metric("choice:01") == "choice:1"


def _experiment(path, labels=True, seed=0):
    """Runs whose two choice losses drift with the examples seen (so a simulator learns)."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, C, N_TEST)
    info = {"n_train": N_TRAIN, "n_test": N_TEST}
    if labels:
        info["test_labels"] = gold.tolist()
    runlog.write_experiment(path, info)
    effect = rng.normal(0, 0.03, (N_TRAIN, N_TEST, C))
    for r in range(RUNS):
        cur = rng.integers(0, N_TRAIN, (STEPS, BATCH)).astype(np.int32)
        cl = np.empty((STEPS + 1, N_TEST, C))
        cl[0] = rng.uniform(0.5, 1.0, (N_TEST, C))
        for t in range(STEPS):
            cl[t + 1] = cl[t] + effect[cur[t]].sum(0) + rng.normal(0, 0.003, (N_TEST, C))
        cl = cl.astype(np.float32)
        losses = cl[:, np.arange(N_TEST), gold]
        runlog.write_run(runlog.run_dir(path, r), cur, losses, choice_losses=cl)
    return gold


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    path = tmp_path_factory.mktemp("choices") / "exp"
    return path, _experiment(path)


def test_choice_losses_round_trip_and_validation(exp, tmp_path):
    path, gold = exp
    runs = runlog.load_runs(path)
    r = runs[0]
    assert r.choice_losses.shape == (STEPS + 1, N_TEST, C) and r.choice_losses.dtype == np.float32
    np.testing.assert_array_equal(r.gold, gold)
    np.testing.assert_array_equal(r.choice_losses[:, np.arange(N_TEST), gold], r.losses)
    m = choice_metrics.trajectory(r, "margin")
    other = r.choice_losses[:, np.arange(N_TEST), 1 - gold]  # C = 2: the one wrong choice
    np.testing.assert_array_equal(m, other - r.losses)
    np.testing.assert_array_equal(choice_metrics.trajectory(r, "choice:1"), r.choice_losses[..., 1])
    with pytest.raises(ValueError, match="logs 2 answer choices"):
        choice_metrics.trajectory(r, "choice:2")
    # Without test_labels the gold column is found by equality with losses.npy.
    other_exp = tmp_path / "nolabels"
    _experiment(other_exp, labels=False)
    np.testing.assert_array_equal(runlog.load_runs(other_exp, [0])[0].gold, gold)
    # A gold column that is not losses.npy bitwise is refused, naming the file.
    cl = r.choice_losses.copy()
    cl[3, 1, gold[1]] += 1e-6
    with pytest.raises(runlog.RunLogError, match="no answer choice of test example 1"):
        runlog.write_run(tmp_path / "x" / "run_000", r.curriculum, r.losses, choice_losses=cl)
    info = {"n_train": N_TRAIN, "n_test": N_TEST, "test_labels": gold.tolist()}
    runlog.write_experiment(tmp_path / "x", info)
    with pytest.raises(runlog.RunLogError, match="choice_losses.npy: the gold choice"):
        runlog.write_run(tmp_path / "x" / "run_000", r.curriculum, r.losses, choice_losses=cl)
    with pytest.raises(runlog.RunLogError, match="expected"):
        runlog.write_run(tmp_path / "x" / "run_000", r.curriculum, r.losses, choice_losses=cl[1:])
    # An old run (no choice_losses.npy) still loads; --metric margin on it is one clear error.
    runlog.write_run(tmp_path / "x" / "run_000", r.curriculum, r.losses)
    old = runlog.load_runs(tmp_path / "x")[0]
    assert old.choice_losses is None and old.gold is None
    with pytest.raises(ValueError, match="needs choice_losses.npy"):
        choice_metrics.trajectory(old, "margin")


def _dense_linear_fit(curs, trajs):
    """Per test example: dense counts design, normal equations with the 1/b prior on A."""
    a0 = 1.0 / BATCH
    ids = np.concatenate(curs)
    M = np.zeros((ids.shape[0], N_TRAIN))
    for row, batch in enumerate(ids):
        for i in batch:
            M[row, i] += 1
    A, B = np.zeros((N_TEST, N_TRAIN)), np.zeros((N_TEST, N_TRAIN))
    for j in range(N_TEST):
        x = np.concatenate([t[:-1, j] for t in trajs]).astype(np.float64)
        y = np.concatenate([t[1:, j] for t in trajs]).astype(np.float64)
        X = np.concatenate([M * x[:, None], M], axis=1)
        reg = np.diag(np.r_[np.full(N_TRAIN, L2_A), np.full(N_TRAIN, L2_B)])
        rhs = X.T @ y + np.r_[np.full(N_TRAIN, L2_A * a0), np.zeros(N_TRAIN)]
        theta = np.linalg.solve(X.T @ X + reg, rhs)
        A[j], B[j] = theta[:N_TRAIN], theta[N_TRAIN:]
    return A, B


def _rollout(A, B, cur, l0):
    out = [np.asarray(l0, np.float64)]
    for batch in cur:
        out.append(A[:, batch].sum(1) * out[-1] + B[:, batch].sum(1))
    return np.stack(out)


def _margins(r, gold):
    """The margin straight from the file, C = 2: the other choice minus the gold one."""
    cl = np.load(r.path / "choice_losses.npy")
    return cl[:, np.arange(N_TEST), 1 - gold] - cl[:, np.arange(N_TEST), gold]


def test_fit_simulate_and_evaluate_on_the_margin_match_numpy(exp, tmp_path, capsys):
    path, gold = exp
    runs = runlog.load_runs(path)
    fit = runs[:4]
    dA, dB = _dense_linear_fit([r.curriculum for r in fit], [_margins(r, gold) for r in fit])
    sim_file = tmp_path / "m.npz"
    argv = ["fit", path, "--runs", "0-3", "--l2-a", L2_A, "--l2-b", L2_B, "--metric", "margin"]
    assert main([str(a) for a in [*argv, "--out", sim_file]]) == 0
    sim = simulators.load_simulator(sim_file)
    scale = max(np.abs(dA).max(), np.abs(dB).max())
    np.testing.assert_allclose(sim.A, dA, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(sim.B, dB, rtol=0, atol=1e-4 * scale)
    assert simulators.read_origin(sim_file)["metric"] == "margin"
    # simulate: the margin rollout; a loss simulator's flag on it is refused in one line.
    held = runs[5]
    np.save(tmp_path / "cur.npy", held.curriculum)
    np.save(tmp_path / "m0.npy", _margins(held, gold)[0])
    base = ["simulate", sim_file, "--curriculum", tmp_path / "cur.npy"]
    base += ["--initial-losses", tmp_path / "m0.npy", "--out", tmp_path / "p.npy"]
    assert main([str(a) for a in [*base, "--metric", "margin"]]) == 0
    want = _rollout(dA, dB, held.curriculum, _margins(held, gold)[0])
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), want, rtol=0, atol=1e-4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in base])  # default --metric loss
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "fitted on --metric margin, used with --metric loss" in err[0]
    with pytest.raises(SystemExit):
        main([str(a) for a in ["fit", path, "--runs", "0-3", "--variant", "tracin-cp",
                               "--metric", "margin", "--out", tmp_path / "t.npz"]])  # fmt: skip
    assert "loss-only" in capsys.readouterr().err
    # evaluate: the same fit, scored on held-out runs 5-6 with the sign accuracy at the end.
    res = evaluate(path, (4, 1, 2), ["linear"], L2_A, L2_B, metric="margin")
    assert res["metric"] == "margin"
    held = runs[5:7]
    preds = [_rollout(dA, dB, r.curriculum, _margins(r, gold)[0]) for r in held]
    true = [_margins(r, gold) for r in held]
    acc = [((p[-1] > 0) == (t[-1] > 0)).mean() for p, t in zip(preds, true, strict=True)]
    got = res["variants"]["linear"]
    assert got["final_sign_accuracy"]["mean"] == pytest.approx(np.mean(acc), abs=1e-12)
    mse = [np.mean((p[1:] - t[1:]) ** 2) for p, t in zip(preds, true, strict=True)]
    assert got["all_steps_mse"]["mean"] == pytest.approx(np.mean(mse), rel=1e-3)
    assert res["true_final_accuracy"]["mean"] == pytest.approx(
        np.mean([(t[-1] > 0).mean() for t in true]), abs=1e-12
    )
    json.dumps(res)  # JSON-ready
