"""Every simulator file `fit` writes, used by simulate, influence, plot and figures.

References are independent of the library: numpy loops over the stored parameters (or the run
files themselves) for rollouts and removals; `evaluate`'s own scores for the TracIn-CP path;
the figures' plotted data against run files, results.json and the simulator files.
"""

import json

import numpy as np
import pytest
from matplotlib.container import BarContainer
from scipy import stats

from simfluence import plots, runlog, simulators
from simfluence.cli import _trajectory_inputs, main
from simfluence.evaluation import evaluate
from simfluence.loader import load_any_simulator

N_TRAIN, N_TEST, B, STEPS = 8, 4, 2, 15
FIT, VALID, HELD = "0-2", "3", [4, 5, 6]
TEMPLATE = "Is it so? Yes or no?\n"
SIMFLUENCE = ["linear", "additive", "multiplicative", "linear-lr", "additive-lr"]
VARIANTS = [
    *SIMFLUENCE,
    "linear-lr-tracin-prior",
    "tracin-cp",
    "tracin-cp-rescaled",
    "constant",
    "mean-trajectory",
]
RTOL, ATOL = 1e-5, 1e-6  # float32 rollouts of 15 steps against float64 numpy


def _ok(argv, capsys):
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr()


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    """7 runs with a warm-up learning-rate ramp, TracIn-CP dots (at other learning rates) on the
    fitting runs, prompted texts with gold answers; a file of every variant in d/sim_<v>.npz."""
    d = tmp_path_factory.mktemp("every")
    exp = d / "exp"
    rng = np.random.default_rng(3)
    runlog.write_experiment(exp, {"n_train": N_TRAIN, "n_test": N_TEST, "name": "every"})
    gold = ["Yes", "No"]
    runlog.atomic_write_json(
        exp / "examples.json",
        {
            "train": [f"{TEMPLATE}claim {i} => {gold[i % 2]}" for i in range(N_TRAIN)],
            "test": [f"{TEMPLATE}query {j} => {gold[j // 2]}" for j in range(N_TEST)],
        },
    )
    for r in range(7):
        cur = rng.integers(0, N_TRAIN, (STEPS, B)).astype(np.int32)
        loss = 1.0 + np.cumsum(rng.normal(-0.01, 0.02, (STEPS + 1, N_TEST)), axis=0)
        lr = (1e-3 * np.minimum(1.0, np.arange(1, STEPS + 1) / 6)).astype(np.float32)
        runlog.write_run(runlog.run_dir(exp, r), cur, loss.astype(np.float32), lr=lr)
        if r < 3:
            dots = rng.normal(0.0, 20.0, (2, N_TEST, N_TRAIN)).astype(np.float32)
            runlog.write_tracin(runlog.run_dir(exp, r), [0, 7], [4e-4, 9e-4], dots, "exact", 0, 0)
    # Simfluence files: stored parameters near the prior (fitting is tested elsewhere; this
    # file tests that every command uses them), with the origin `fit` records, a lambda search
    # among it. TracIn-CP and baseline files: `fit` itself (cheap, no solver).
    origin = {
        "experiment_sha256": runlog.experiment_sha256(exp),
        "fit_runs": [0, 1, 2],
        "valid_runs": [3],
        "lambda_search": [
            {"l2_a": a, "l2_b": b, "valid_mse": 1e-3 * (1 + (a - 0.1) ** 2 + b), "round": 0}
            for a in (0.01, 0.1, 1.0)
            for b in (0.01, 0.1, 1.0)
        ],
    }
    shape = (N_TEST, N_TRAIN)
    for v in SIMFLUENCE + ["linear-lr-tracin-prior"]:
        a = np.zeros(shape) if v.startswith("additive") else rng.normal(0, 0.02, shape)
        b = np.zeros(shape) if v == "multiplicative" else rng.normal(0, 0.005, shape)
        sim = simulators.Simulator(
            A=(1 / B + a).astype(np.float32),
            B=b.astype(np.float32),
            variant=v,
            l2_a=0.1,
            l2_b=0.01,
            a_prior=1 / B,
            batch=B,
            lr_max=1e-3 if "lr" in v else None,
        )
        own = origin if v == "linear" else {k: x for k, x in origin.items() if k != "lambda_search"}
        simulators.save_simulator(d / f"sim_{v}.npz", sim, origin=own)
    for v in ("tracin-cp", "tracin-cp-rescaled", "constant", "mean-trajectory"):
        argv = ["fit", exp, "--runs", FIT, "--variant", v, "--out", d / f"sim_{v}.npz"]
        assert main([str(a) for a in argv]) == 0
    run = runlog.load_runs(exp, [6])[0]
    np.save(d / "cur.npy", run.curriculum)
    np.save(d / "l0.npy", run.losses[0])
    np.save(d / "lr.npy", run.lr)
    return d, exp


@pytest.fixture(scope="module")
def results(exp):
    """`evaluate` of the solver-free variants (fit 0-2, valid 3, held out 4-6)."""
    _, exp_dir = exp
    variants = ["tracin-cp", "tracin-cp-rescaled", "constant", "mean-trajectory"]
    return evaluate(exp_dir, split=(3, 1, 3), variants=variants)


def _reference(path, variant, cur, l0, lr, exp):
    """Numpy rollout float64 [T + 1, n_test] of a simulator file's stored parameters."""
    z = dict(np.load(path))
    loss = np.asarray(l0, np.float64).copy()
    out = [loss.copy()]
    if variant in ("constant", "mean-trajectory"):  # from the fitting runs' files themselves
        fit = [r.losses.astype(np.float64) for r in runlog.load_runs(exp, [0, 1, 2])]
        delta = np.mean([f - f[0] for f in fit], axis=0) if variant == "mean-trajectory" else 0
        return l0 + (delta if variant == "mean-trajectory" else np.zeros((STEPS + 1, 1)))
    for t in range(cur.shape[0]):
        ids = cur[t]
        if variant.startswith("tracin"):
            k = max(int(np.searchsorted(z["steps"], t, side="right")) - 1, 0)
            loss = loss - float(z["scale"]) * lr[t] / B * z["dots"][k][:, ids].sum(-1)
        else:
            A = z["A"].astype(np.float64)
            Bm = z["B"].astype(np.float64)
            a, b = A[:, ids].sum(-1), Bm[:, ids].sum(-1)
            if variant.endswith("-lr") or variant == "linear-lr-tracin-prior":
                loss = loss + lr[t] / float(z["lr_max"]) * ((a - 1.0) * loss + b)
            elif variant == "additive":
                loss = loss + b
            else:
                loss = a * loss + b
        out.append(loss.copy())
    return np.stack(out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_simulate_equals_a_numpy_rollout_of_the_stored_parameters(exp, tmp_path, capsys, variant):
    d, exp_dir = exp
    uses_lr = variant.endswith("lr") or "-lr-" in variant or variant.startswith("tracin")
    argv = ["simulate", d / f"sim_{variant}.npz", "--curriculum", d / "cur.npy"]
    argv += ["--initial-losses", d / "l0.npy", "--out", tmp_path / "p.npy"]
    _ok(argv + (["--lr", d / "lr.npy"] if uses_lr else []), capsys)
    got = np.load(tmp_path / "p.npy")
    want = _reference(
        d / f"sim_{variant}.npz",
        variant,
        np.load(d / "cur.npy"),
        np.load(d / "l0.npy"),
        np.load(d / "lr.npy"),
        exp_dir,
    )
    assert got.dtype == np.float32 and got.shape == (STEPS + 1, N_TEST)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_tracin_rollouts_equal_evaluates_and_use_the_runs_learning_rates(
    exp, results, tmp_path, capsys
):
    d, exp_dir = exp
    res = results
    run = runlog.load_runs(exp_dir, [6])[0]
    for v in ("tracin-cp", "tracin-cp-rescaled"):
        argv = ["simulate", d / f"sim_{v}.npz", "--curriculum", d / "cur.npy"]
        argv += ["--initial-losses", d / "l0.npy", "--out", tmp_path / "p.npy"]
        _ok(argv + ["--lr", d / "lr.npy"], capsys)
        pred = np.load(tmp_path / "p.npy").astype(np.float64)
        mse = np.mean((pred[1:] - run.losses[1:].astype(np.float64)) ** 2)
        # Run 6 is evaluate's third held-out run; same scale, same dots, same rates.
        assert res["variants"][v]["per_run"]["all_steps_mse"][2] == pytest.approx(mse, rel=1e-6)
        # plot and figures simulate a logged run as evaluate does: with its lr.npy.
        sim = load_any_simulator(d / f"sim_{v}.npz")
        np.testing.assert_array_equal(
            sim.rollout(run.curriculum, run.losses[0], sim.run_lr(run, "")), pred
        )
        # Without --lr the checkpoints' rates are used (a note says so): another prediction.
        err = _ok(argv, capsys).err
        assert "checkpoints' learning rates" in err
        assert np.abs(np.load(tmp_path / "p.npy") - pred).max() > 1e-4


def test_tracin_influence_matrix_equals_removing_each_example(exp, tmp_path, capsys):
    d, _ = exp
    path = d / "sim_tracin-cp-rescaled.npz"
    argv = ["influence", path, "--curriculum", d / "cur.npy", "--initial-losses", d / "l0.npy"]
    argv += ["--lr", d / "lr.npy"]
    _ok(argv + ["--all-tests", "--out", tmp_path / "s.npy"], capsys)
    scores = np.load(tmp_path / "s.npy")
    cur, l0, lr = np.load(d / "cur.npy"), np.load(d / "l0.npy"), np.load(d / "lr.npy")
    full = _reference(path, "tracin-cp-rescaled", cur, l0, lr, None)[-1]
    z = dict(np.load(path))
    for i in range(N_TRAIN):  # removal: example i's slots contribute nothing (neutral)
        zi = {**z, "dots": np.where(np.arange(N_TRAIN) == i, 0.0, z["dots"])}
        np.savez(tmp_path / "r.npz", **zi)
        without = _reference(tmp_path / "r.npz", "tracin-cp-rescaled", cur, l0, lr, None)[-1]
        np.testing.assert_allclose(scores[:, i], without - full, rtol=1e-4, atol=1e-6)
    _ok(argv + ["--test", "2", "--out", tmp_path / "l.json"], capsys)
    rows = json.loads((tmp_path / "l.json").read_text())["proponents"]
    assert rows and all(
        r["removal_change"] == pytest.approx(scores[2, r["train_index"]]) for r in rows
    )
    # A baseline ignores the curriculum: refused with the reason, exit 2, no output.
    with pytest.raises(SystemExit) as e:
        main(
            [
                str(a)
                for a in [
                    "influence",
                    d / "sim_mean-trajectory.npz",
                    *argv[2:6],
                    "--test",
                    "0",
                    "--out",
                    tmp_path / "b.json",
                ]
            ]
        )
    assert e.value.code == 2 and not (tmp_path / "b.json").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ignores the curriculum" in err[0] and "every influence is 0" in err[0]


def test_several_simulators_on_the_same_panels_name_each_and_the_runs_role(exp):
    d, exp_dir = exp
    sims = [load_any_simulator(d / f"sim_{v}.npz") for v in ("linear", "tracin-cp", "constant")]
    runs = runlog.load_runs(exp_dir, [1, 6])
    texts = runlog.read_examples(exp_dir)
    fig = plots._trajectory_figure(**_trajectory_inputs(sims, runs, texts, [0, 3]))
    (legend,) = fig.legends
    names = [t.get_text() for t in legend.get_texts()]
    assert names == [
        "run 1 (fitted)",
        "run 6 (held out)",
        "true",
        "linear",
        "tracin-cp",
        "constant",
    ]
    assert fig._suptitle.get_text() == (
        "linear, tracin-cp and constant vs true losses: fitted run 1; held-out run 6"
    )
    for ax, j in zip(fig.axes, [0, 3], strict=True):
        # the template is stripped, the gold answer shown
        assert ax.get_title() == f"test {j}: query {j}\ngold: {['Yes', 'No'][j // 2]}"
        lines = ax.get_lines()
        assert len(lines) == 2 * (1 + len(sims))
        for k, r in enumerate(runs):  # per run: true, then each simulator
            true, *sim_lines = lines[4 * k : 4 * k + 4]
            np.testing.assert_array_equal(true.get_ydata(), r.losses[:, j])
            for s, ln in zip(sims, sim_lines, strict=True):
                want = _reference(s.path, s.variant, r.curriculum, r.losses[0], r.lr, exp_dir)[:, j]
                np.testing.assert_allclose(ln.get_ydata(), want, rtol=RTOL, atol=ATOL)
            assert [ln.get_linestyle() for ln in sim_lines] == ["--", ":", "-."]


def test_figures_draw_the_run_files_results_and_lambda_search(
    exp, results, tmp_path, capsys, monkeypatch
):
    from PIL import Image

    d, exp_dir = exp
    runlog.atomic_write_json(tmp_path / "results.json", results)
    drawn = {}
    save = plots._save

    def capture(fig, path):  # rendering at 300 dpi is slow: files of one figure suffice here
        drawn[path[0].stem] = fig
        return save(fig, path) if path[0].stem == "lambda" else path

    monkeypatch.setattr(plots, "_save", capture)
    sims = ",".join(str(d / f"sim_{v}.npz") for v in ("linear", "tracin-cp", "mean-trajectory"))
    out = tmp_path / "figs"
    argv = [
        "figures",
        exp_dir,
        "--sim",
        sims,
        "--runs",
        "6",
        "--results",
        tmp_path / "results.json",
    ]
    res = _ok(argv + ["--out", out, "--tests", "0,2"], capsys)
    assert sorted(drawn) == ["lambda", "lds", "metrics", "parameters_linear", "trajectories"]
    with Image.open(out / "lambda.png") as im:
        assert im.info["dpi"] == pytest.approx((300, 300), abs=0.01)
    assert (out / "lambda.pdf").read_bytes()[:5] == b"%PDF-"
    assert "skipped parameters of tracin-cp" in res.out
    assert "skipped parameters of mean-trajectory" in res.out
    # LDS: actual final losses of the held-out runs (4-6) against each simulator's.
    held = runlog.load_runs(exp_dir, HELD)
    actual = np.stack([r.losses[-1] for r in held])
    for ax, j in zip(drawn["lds"].axes, [0, 2], strict=True):
        rhos = []
        for coll, v in zip(ax.collections, ("linear", "tracin-cp", "mean-trajectory"), strict=True):
            xy = coll.get_offsets()
            want = [
                _reference(d / f"sim_{v}.npz", v, r.curriculum, r.losses[0], r.lr, exp_dir)[-1, j]
                for r in held
            ]
            np.testing.assert_array_equal(xy[:, 0], actual[:, j])
            np.testing.assert_allclose(xy[:, 1], want, rtol=RTOL, atol=ATOL)
            rhos.append(f"{v} {stats.spearmanr(want, actual[:, j]).statistic:.2f}")
        # The rho part of the title: "rho: " then two simulators per line.
        lines = ax.get_title().splitlines()
        first = next(i for i, ln in enumerate(lines) if ln.startswith("rho: "))
        assert ", ".join(lines[first:]) == "rho: " + ", ".join(rhos)
        assert [ln.count(" ") for ln in lines[first:]] == [4, 1]  # "rho: a x, b y" / "c z"
    # Metric bars: heights and error bars are results.json's means and standard errors.
    on_file = json.loads((tmp_path / "results.json").read_text())["variants"]
    for ax, key in zip(
        drawn["metrics"].axes,
        ["all_steps_mse", "final_step_spearman", "final_step_mse", "lds"],
        strict=True,
    ):
        (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
        errs = bars.errorbar
        defined = [v for v in on_file if on_file[v][key]["mean"] is not None]  # others: n/a
        heights = [p.get_height() for p in bars.patches]
        assert heights == pytest.approx([on_file[v][key]["mean"] for v in defined], rel=1e-12)
        (segs,) = errs.lines[2]
        half = [(s[1][1] - s[0][1]) / 2 if len(s) else np.nan for s in segs.get_segments()]
        se = [on_file[v][key]["stderr"] for v in defined]  # None (undefined): no error bar
        np.testing.assert_allclose(half, [np.nan if x is None else x for x in se], rtol=1e-9)
    # Lambda curve: the search the linear file recorded, the chosen point starred.
    search = load_any_simulator(d / "sim_linear.npz").origin["lambda_search"]
    (ax,) = [a for a in drawn["lambda"].axes if a.get_visible()]
    *curves, star = ax.get_lines()
    assert len(curves) == len({r["l2_a"] for r in search})
    for ln, la in zip(curves, sorted({r["l2_a"] for r in search}), strict=True):  # one per l2_a
        rows = sorted((r for r in search if r["l2_a"] == la), key=lambda r: r["l2_b"])
        np.testing.assert_array_equal(ln.get_xdata(), [r["l2_b"] for r in rows])
        np.testing.assert_array_equal(ln.get_ydata(), [r["valid_mse"] for r in rows])
    lin = load_any_simulator(d / "sim_linear.npz").sim
    (best,) = [r for r in search if (r["l2_a"], r["l2_b"]) == (lin.l2_a, lin.l2_b)]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (best["l2_b"], best["valid_mse"])
    # A/B histograms: split by the training examples' gold answers, the prior a0 marked.
    ax_a, ax_b = drawn["parameters_linear"].axes
    A = np.asarray(lin.A, np.float64)
    edges = np.histogram_bin_edges(A.reshape(-1), bins=60)
    for patch, (label, cols) in zip(
        [p for p in ax_a.patches], [("No", [1, 3, 5, 7]), ("Yes", [0, 2, 4, 6])], strict=True
    ):
        assert patch.get_label().startswith(f"label {label} ")
        np.testing.assert_array_equal(patch.get_data().values, np.histogram(A[:, cols], edges)[0])
    (a0,) = [ln for ln in ax_a.get_lines() if ln.get_label().startswith("prior a0")]
    assert a0.get_xdata()[0] == pytest.approx(lin.a_prior) == pytest.approx(1 / B)


def _bad(argv, capsys, match, absent=()):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("simfluence: error: ") and match in lines[0]
    for p in absent:
        assert not p.exists()


def test_bad_inputs_of_the_new_files_and_flags(exp, tmp_path, capsys):
    d, exp_dir = exp
    out = tmp_path / "x.npz"
    fit = ["fit", exp_dir, "--runs", FIT, "--variant", "mean-trajectory", "--out", out]
    _bad(fit + ["--valid-runs", VALID], capsys, "has no lambdas or prior", [out])
    sim = ["simulate", d / "sim_constant.npz", "--curriculum", d / "cur.npy"]
    sim += ["--initial-losses", d / "l0.npy", "--out", tmp_path / "p.npy"]
    _bad(sim + ["--lr", d / "lr.npy"], capsys, "ignores the learning rates", [tmp_path / "p.npy"])
    many = ",".join(str(d / f"sim_{v}.npz") for v in VARIANTS)
    png = tmp_path / "f.png"
    plot = ["plot", exp_dir, "--runs", "6", "--out", png, "--sim", many]
    _bad(plot, capsys, "10 simulators on the same panels; at most 6", [png])
    figs = ["figures", exp_dir, "--sim", d / "sim_linear.npz", "--out", tmp_path / "f"]
    _bad(figs + ["--results", tmp_path / "none.json"], capsys, "none.json: file not found")
