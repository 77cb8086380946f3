"""Every `simfluence` command end to end in tmp_path, and every bad input -> exit 2, one line."""

import json
import re
import shutil
import warnings

import numpy as np
import pytest

from simfluence import runlog, simulators
from simfluence.cli import build_parser, main

SIZES = ["--runs", "9", "--n-train", "12", "--n-test", "5", "--batch", "2", "--steps", "23"]


def _ok(argv, capsys):
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr()


def _bad(argv, capsys, match, absent=()):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("simfluence: error: ")
    assert match in lines[0], lines[0]
    for p in absent:
        assert not p.exists(), p
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A demo experiment, a fitted simulator, and one run's curriculum / initial losses."""
    d = tmp_path_factory.mktemp("cli")
    exp = d / "exp"
    assert main(["demo-data", str(exp), *SIZES, "--tracin"]) == 0
    assert (
        main(
            [
                "fit",
                str(exp),
                "--runs",
                "0-3",
                "--l2-a",
                "0.1",
                "--l2-b",
                "0.01",
                "--out",
                str(d / "sim.npz"),
            ]
        )
        == 0
    )
    run = runlog.load_runs(exp, [8])[0]
    np.save(d / "cur.npy", run.curriculum)
    np.save(d / "l0.npy", run.losses[0])
    return d, exp


def test_help_explains_every_flag(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {
        "evaluate",
        "fit",
        "simulate",
        "influence",
        "plot",
        "demo-data",
        "table",
        "figures",
        "counterfactual",
    }
    commands = [([name], p) for name, p in sub.choices.items()]
    cf = next(a for a in sub.choices["counterfactual"]._actions if a.dest == "cf_command")
    commands += [(["counterfactual", name], p) for name, p in cf.choices.items()]
    for argv, p in commands:
        for action in p._actions:
            assert action.help, f"{argv} {action.dest} has no help"
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        assert "usage:" in capsys.readouterr().out


def test_demo_data_is_deterministic_and_refuses_overwrite(tmp_path, work, capsys):
    _, exp = work
    other = tmp_path / "exp"
    _ok(["demo-data", other, *SIZES, "--tracin"], capsys)
    for f in [
        "experiment.json",
        "run_003/curriculum.npy",
        "run_003/losses.npy",
        "run_003/tracin.npz",
        "true_simulator.npz",
    ]:
        assert (exp / f).read_bytes() == (other / f).read_bytes(), f
    _bad(["demo-data", other], capsys, "already exists")
    _ok(["demo-data", other, *SIZES, "--seed", "1", "--overwrite"], capsys)
    assert (other / "run_003/losses.npy").read_bytes() != (exp / "run_003/losses.npy").read_bytes()
    (tmp_path / "notexp").mkdir()
    _bad(["demo-data", tmp_path / "notexp", "--overwrite"], capsys, "not an experiment folder")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_evaluate_and_table(work, tmp_path, capsys):
    _, exp = work
    out = tmp_path / "results.json"
    res = _ok(
        [
            "evaluate",
            exp,
            "--split",
            "4,1,3",
            "--l2-a",
            "0.1",
            "--l2-b",
            "0.01",
            "--variants",
            "linear,constant,tracin-cp",
            "--out",
            out,
        ],
        capsys,
    )
    data = json.loads(out.read_text())
    assert list(data["variants"]) == ["linear", "constant", "tracin-cp"]
    for word in ("all-steps MSE", "final-step ρ", "across-run ρ", "skill", "λ_A", "[1]"):
        assert word in res.out
    assert "ignores the curriculum" in res.out  # footnote for the constant baseline's dash
    md = tmp_path / "table.md"
    res = _ok(["table", out, out, "--out", md], capsys)
    text = md.read_text()
    assert text == res.out.split("\nwrote")[0]
    assert "| linear |" in text and "demo-synthetic (2)" in text
    tab = json.loads(md.with_suffix(".json").read_text())
    assert tab["variants"] == ["linear", "tracin-cp", "constant"]


def test_fit_simulate_influence_plot_figures(work, tmp_path, capsys):
    d, exp = work
    sim_path = tmp_path / "sim.npz"
    res = _ok(
        [
            "fit",
            exp,
            "--runs",
            "0-3",
            "--valid-runs",
            "4",
            "--variant",
            "additive",
            "--out",
            sim_path,
        ],
        capsys,
    )
    assert "additive" in res.out
    sim = simulators.load_simulator(sim_path)
    assert sim.variant == "additive" and sim.A.shape == (5, 12)
    # The file records the lambda search (the validation curve `figures` draws); the chosen
    # lambda is among its points with the lowest validation MSE (ties within 1e-4 relative).
    search = simulators.read_origin(sim_path)["lambda_search"]
    (chosen,) = [r for r in search if (r["l2_a"], r["l2_b"]) == (0.0, sim.l2_b)]
    assert chosen["valid_mse"] <= min(r["valid_mse"] for r in search) * (1 + 1e-4)
    pred_path = tmp_path / "pred.npy"
    _ok(
        [
            "simulate",
            d / "sim.npz",
            "--curriculum",
            d / "cur.npy",
            "--initial-losses",
            d / "l0.npy",
            "--out",
            pred_path,
        ],
        capsys,
    )
    pred = np.load(pred_path)
    lin = simulators.load_simulator(d / "sim.npz")
    want = simulators.simulate(lin, np.load(d / "cur.npy"), np.load(d / "l0.npy"))
    np.testing.assert_array_equal(pred, np.asarray(want))
    res = _ok(
        [
            "influence",
            d / "sim.npz",
            "--curriculum",
            d / "cur.npy",
            "--initial-losses",
            d / "l0.npy",
            "--test",
            "2",
            "--top",
            "3",
            "--exp",
            exp,
            "--out",
            tmp_path / "inf.json",
        ],
        capsys,
    )
    rows = json.loads((tmp_path / "inf.json").read_text())["top"]
    assert len(rows) == 3 and "synthetic training example" in res.out
    inf = np.asarray(
        simulators.removal_influence(lin, np.load(d / "cur.npy"), np.load(d / "l0.npy"), 2)
    )
    assert rows[0]["train_index"] == int(np.argmax(np.abs(inf)))
    _ok(
        [
            "plot",
            exp,
            "--sim",
            d / "sim.npz",
            "--runs",
            "7,8",
            "--tests",
            "0,1,2",
            "--out",
            tmp_path / "fig.png",
        ],
        capsys,
    )
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    figs = tmp_path / "figs"
    _ok(
        ["figures", exp, "--sim", d / "sim.npz", "--out", figs, "--test", "1", "--top", "4"]
        + ["--tests", "0"],
        capsys,
    )
    drawn = [
        "influence.json",
        "influence.txt",
        *(f"{stem}.{ext}" for stem in ("lds", "parameters_linear") for ext in ("pdf", "png")),
        "trajectories.pdf",
        "trajectories.png",
    ]
    assert sorted(p.name for p in figs.iterdir()) == sorted([*drawn, "figures.json"])
    assert sorted(json.loads((figs / "figures.json").read_text())["files"]) == drawn
    assert json.loads((figs / "influence.json").read_text())["run"] == 8


def test_figures_removes_only_its_own_figures_that_it_no_longer_draws(
    work, tmp_path, capsys, monkeypatch
):
    d, exp = work
    add = tmp_path / "additive.npz"
    _ok(["fit", exp, "--runs", "0-3", "--variant", "additive", "--out", add], capsys)
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "notes.txt").write_text("mine")  # a user's file: never touched
    base = ["figures", exp, "--out", figs, "--tests", "0", "--top", "2"]
    both = [*base, "--sim", f"{d / 'sim.npz'},{add}"]
    _ok(both, capsys)
    two = {p.name for p in figs.iterdir()}
    assert {"parameters_linear.png", "parameters_additive.png", "lds.png"} <= two
    # Now with one simulator and a held-out split too small for the LDS picture (every
    # complete run but one fitted or validated on).
    narrow = tmp_path / "narrow.npz"
    _ok(["fit", exp, "--runs", "0-7", "--l2-a", "0.1", "--l2-b", "0.01", "--out", narrow], capsys)
    res = _ok([*base, "--sim", narrow], capsys)
    gone = {f"{stem}.{ext}" for stem in ("parameters_additive", "lds") for ext in ("png", "pdf")}
    left = {p.name for p in figs.iterdir()}
    assert left == (two - gone) | {"notes.txt"}
    assert "removed lds.pdf, lds.png, parameters_additive.pdf, parameters_additive.png" in res.out
    assert (figs / "notes.txt").read_text() == "mine"
    listed = json.loads((figs / "figures.json").read_text())["files"]
    assert set(listed) == left - {"notes.txt", "figures.json"}

    # A listed file changed since (here: replaced by the user) is kept and no longer listed.
    _ok(both, capsys)
    (figs / "parameters_additive.png").write_bytes(b"my own picture")
    res = _ok([*base, "--sim", narrow], capsys)
    assert (figs / "parameters_additive.png").read_bytes() == b"my own picture"
    assert not (figs / "parameters_additive.pdf").exists()
    assert "kept parameters_additive.png (listed by an earlier call but changed since)" in res.out
    assert "parameters_additive.png" not in json.loads((figs / "figures.json").read_text())["files"]
    (figs / "parameters_additive.png").unlink()

    # An interrupted call: what it wrote before the stop is still removed by the next call.
    from simfluence import plots

    def stop(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_lds", stop)  # drawn after both parameters_ figures
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in both])
    assert (figs / "parameters_additive.png").exists()
    monkeypatch.undo()
    res = _ok([*base, "--sim", narrow], capsys)
    assert not (figs / "parameters_additive.png").exists()
    assert "removed parameters_additive.pdf, parameters_additive.png" in res.out

    # A list naming files outside the folder removes nothing there.
    stamp = [1, 1]
    bad_names = {"../outside.txt": stamp, "/etc/x": stamp, "..": None, "a/b": None}
    (figs / "figures.json").write_text(json.dumps({"files": bad_names}))
    (tmp_path / "outside.txt").write_text("keep")
    res = _ok([*base, "--sim", narrow], capsys)
    assert (tmp_path / "outside.txt").read_text() == "keep" and "removed" not in res.out


@pytest.mark.parametrize("kind", ["other-json", "not-json", "folder", "fifo"])
def test_figures_refuses_a_figures_json_it_did_not_write(work, tmp_path, capsys, kind):
    import os

    d, exp = work
    figs = tmp_path / "figs"
    figs.mkdir()
    target = figs / "figures.json"
    if kind == "other-json":
        target.write_text(json.dumps({"my": "paper figure list"}))
    elif kind == "not-json":
        target.write_text("[" * 100_000)
    elif kind == "folder":
        target.mkdir()
    else:
        os.mkfifo(target)  # reading it would block
    before = sorted(p.name for p in figs.iterdir())
    line = _bad(
        ["figures", exp, "--sim", d / "sim.npz", "--out", figs, "--tests", "0"],
        capsys,
        "is not the figure list of `simfluence figures`",
    )
    assert str(target) in line and "choose another --out" in line
    assert sorted(p.name for p in figs.iterdir()) == before  # nothing written
    if kind == "other-json":
        assert json.loads(target.read_text()) == {"my": "paper figure list"}


def test_lds_picture_uses_the_tables_held_out_runs():
    """The LDS picture leaves out runs with unseen pool examples and keeps the recorded split."""
    from types import SimpleNamespace

    from simfluence.cli import _held_out

    sims = [SimpleNamespace(origin={"fit_runs": [0, 1, 2, 3, 4], "valid_runs": [5]})]
    complete = list(range(12))
    info = {"held_out_runs": [10, 11]}
    assert _held_out(sims, complete, info, None) == [6, 7, 8, 9]
    assert _held_out(sims, complete, {}, None) == [6, 7, 8, 9, 10, 11]
    split = {"split": {"fit": [0, 1, 2, 3, 4], "valid": [5], "test": [6, 7, 8]}}
    assert _held_out(sims, complete, info, split) == [6, 7, 8]
    # A recorded split with fewer than 2 of these runs is ignored (another experiment's file).
    assert _held_out(sims, complete, info, {"split": {"test": [9, 30]}}) == [6, 7, 8, 9]
    assert "2 or more needed" in _held_out(sims, [0, 1, 2, 3, 4, 5, 6], info, None)


def test_bad_inputs_exit_2_with_one_line(work, tmp_path, capsys):
    d, exp = work
    out_json = tmp_path / "r.json"
    _bad(["evaluate", tmp_path / "nope", "--out", out_json], capsys, "not found", [out_json])
    _bad(
        ["evaluate", exp, "--split", "20,2,10", "--out", out_json],
        capsys,
        "needs 32 complete runs",
        [out_json],
    )
    _bad(["evaluate", exp, "--split", "4,x,3"], capsys, "--split")
    _bad(
        ["evaluate", exp, "--variants", "linear,bogus", "--out", out_json],
        capsys,
        "unknown variant 'bogus'",
        [out_json],
    )
    _bad(["evaluate", exp, "--split", "4,1,3", "--l2-a", "1"], capsys, "both l2_a and l2_b")
    _bad(["evaluate"], capsys, "required")
    sim_out = tmp_path / "s.npz"
    _bad(["fit", exp, "--runs", "0-x", "--out", sim_out], capsys, "--runs", [sim_out])
    _bad(["fit", exp, "--runs", "0-3,40", "--out", sim_out], capsys, "run 40 not found", [sim_out])
    _bad(["fit", exp, "--runs", "0-3", "--out", tmp_path / "s.txt"], capsys, ".npz")
    _bad(["fit", exp, "--runs", "0-3", "--variant", "cubic", "--out", sim_out], capsys, "cubic")
    _bad(
        ["fit", exp, "--runs", "0-3", "--valid-runs", "3", "--out", sim_out],
        capsys,
        "also appear",
        [sim_out],
    )
    # simulate: wrong dtype, ids out of range, wrong shape, NaN, missing file.
    pred = tmp_path / "p.npy"
    cur = np.load(d / "cur.npy")
    np.save(tmp_path / "fcur.npy", cur.astype(np.float32))
    np.save(tmp_path / "bigcur.npy", cur + 100)
    np.save(tmp_path / "l0short.npy", np.ones(3, np.float32))
    np.save(tmp_path / "l0nan.npy", np.full(5, np.nan, np.float32))
    base = ["simulate", d / "sim.npz", "--out", pred]
    _bad(
        [*base, "--curriculum", tmp_path / "fcur.npy", "--initial-losses", d / "l0.npy"],
        capsys,
        "fcur.npy: curriculum must be integers",
        [pred],
    )
    _bad(
        [*base, "--curriculum", tmp_path / "bigcur.npy", "--initial-losses", d / "l0.npy"],
        capsys,
        "outside 0..11",
        [pred],
    )
    _bad(
        [*base, "--curriculum", d / "cur.npy", "--initial-losses", tmp_path / "l0short.npy"],
        capsys,
        "l0short.npy: initial losses must be float [5]",
        [pred],
    )
    _bad(
        [*base, "--curriculum", d / "cur.npy", "--initial-losses", tmp_path / "l0nan.npy"],
        capsys,
        "NaN",
        [pred],
    )
    _bad(
        [
            "simulate",
            tmp_path / "none.npz",
            "--curriculum",
            d / "cur.npy",
            "--initial-losses",
            d / "l0.npy",
            "--out",
            pred,
        ],
        capsys,
        "none.npz",
        [pred],
    )
    _bad(
        [
            "influence",
            d / "sim.npz",
            "--curriculum",
            d / "cur.npy",
            "--initial-losses",
            d / "l0.npy",
            "--test",
            "5",
        ],
        capsys,
        "--test 5 is outside 0..4",
    )
    # A curriculum of another batch size than the fitted one (2): named, not "diverges".
    np.save(tmp_path / "cur4.npy", np.concatenate([cur, cur], axis=1))
    _bad(
        [*base, "--curriculum", tmp_path / "cur4.npy", "--initial-losses", d / "l0.npy"],
        capsys,
        "cur4.npy: curriculum has batch 4 but the simulator was fitted on batch 2",
        [pred],
    )
    # A single .npy array given as the simulator.
    _bad(
        [
            "simulate",
            d / "l0.npy",
            "--curriculum",
            d / "cur.npy",
            "--initial-losses",
            d / "l0.npy",
            "--out",
            pred,
        ],
        capsys,
        "l0.npy: not a simulator file (one array, not an .npz archive)",
        [pred],
    )
    # influence --exp naming a folder that is not an experiment.
    _bad(
        [
            "influence",
            d / "sim.npz",
            "--curriculum",
            d / "cur.npy",
            "--initial-losses",
            d / "l0.npy",
            "--test",
            "0",
            "--exp",
            tmp_path / "nope",
        ],
        capsys,
        "nope",
    )
    fig = tmp_path / "f.png"
    _bad(
        ["plot", exp, "--sim", d / "sim.npz", "--runs", "99", "--out", fig],
        capsys,
        "run 99 not found",
        [fig],
    )
    _bad(
        ["plot", exp, "--sim", d / "sim.npz", "--runs", "8", "--tests", "7", "--out", fig],
        capsys,
        "outside 0..4",
        [fig],
    )
    _bad(
        ["table", tmp_path / "nothing.json", "--out", tmp_path / "t.md"],
        capsys,
        "not found",
        [tmp_path / "t.md", tmp_path / "t.json"],
    )
    _bad(["table", exp, "--out", tmp_path / "t.md"], capsys, "no results.json")
    figs = tmp_path / "figs"
    _bad(
        ["figures", exp, "--sim", d / "sim.npz", "--tests", "9", "--out", figs],
        capsys,
        "outside",
        [figs],
    )
    assert not list(tmp_path.glob(".*"))  # no temporary files left


@pytest.mark.filterwarnings("default::UserWarning")  # printed by the CLI, asserted
def test_corrupted_run_is_named(tmp_path, capsys):
    exp = tmp_path / "exp"
    _ok(["demo-data", exp, *SIZES], capsys)
    losses = np.load(exp / "run_002" / "losses.npy")
    losses[3, 1] = np.nan
    np.save(exp / "run_002" / "losses.npy", losses)
    out = tmp_path / "r.json"
    line = _bad(["evaluate", exp, "--split", "4,1,3", "--out", out], capsys, "run_002", [out])
    assert "non-finite loss" in line and "step 3" in line
    (exp / "run_002" / "meta.json").unlink()  # now incomplete: skipped with one warning
    with pytest.raises(SystemExit):
        main(["evaluate", str(exp), "--split", "4,1,4"])
    err = capsys.readouterr().err
    assert "simfluence: warning:" in err and "run_002" in err
    assert "needs 9 complete runs but there are 8 (1 incomplete)" in err


@pytest.mark.filterwarnings("default::UserWarning")  # printed by the CLI, asserted
def test_evaluate_warns_in_one_line_when_a_lambda_is_at_the_cap(
    flat_validation_exp, tmp_path, capsys
):
    out = tmp_path / "r.json"
    argv = ["evaluate", flat_validation_exp, "--split", "3,1,2", "--variants", "additive"]
    res = _ok([*argv, "--out", out], capsys)
    warns = [line for line in res.err.splitlines() if line.startswith("simfluence: warning:")]
    assert len(warns) == 1, res.err
    assert "additive simulator" in warns[0] and "l2_b=1e+06 (upper cap)" in warns[0]
    entry = json.loads(out.read_text())["variants"]["additive"]
    assert entry["lambda_at_edge"] is True and entry["lambda_edges"] == {"l2_b": "upper"}
    assert re.search(r"\| 1e\+06 \[\d\] \|", res.out), res.out  # the cell has a footnote
    assert "upper cap of the extended default" in res.out


def test_plot_and_figures_work_without_examples_json(work, tmp_path, capsys):
    d, _ = work
    exp = tmp_path / "exp"
    _ok(["demo-data", exp, *SIZES], capsys)  # the same experiment as `work`'s
    (exp / "examples.json").unlink()  # optional in the run-log format
    fig = tmp_path / "fig.png"
    _ok(["plot", exp, "--sim", d / "sim.npz", "--runs", "7,8", "--out", fig], capsys)
    assert fig.read_bytes()[:4] == b"\x89PNG"
    figs = tmp_path / "figs"
    res = _ok(
        ["figures", exp, "--sim", d / "sim.npz", "--out", figs, "--top", "3", "--tests", "0"],
        capsys,
    )
    rows = json.loads((figs / "influence.json").read_text())["top"]
    assert len(rows) == 3 and all("text" not in r for r in rows)
    assert "synthetic" not in res.out  # no texts to show
    # influence --exp still asks for the texts it was given the folder for.
    _bad(
        [
            "influence",
            d / "sim.npz",
            "--curriculum",
            d / "cur.npy",
            "--initial-losses",
            d / "l0.npy",
            "--test",
            "0",
            "--exp",
            exp,
        ],
        capsys,
        "no examples.json",
    )


def test_influence_exp_must_match_the_simulator(work, tmp_path, capsys):
    d, _ = work  # sim.npz: n_test=5, n_train=12
    argv = ["influence", d / "sim.npz", "--curriculum", d / "cur.npy"]
    argv += ["--initial-losses", d / "l0.npy", "--top", "3"]
    fewer_tests = tmp_path / "fewer_tests"
    sizes = ["--runs", "2", "--n-train", "12", "--n-test", "3", "--batch", "2", "--steps", "5"]
    _ok(["demo-data", fewer_tests, *sizes], capsys)
    out = tmp_path / "inf.json"
    for test in ("2", "4"):  # a text that exists there (but is another example's), and none
        _bad(
            [*argv, "--test", test, "--exp", fewer_tests, "--out", out],
            capsys,
            f"sim.npz: simulator has n_test=5, n_train=12 but --exp {fewer_tests} has n_test=3, "
            "n_train=12; pass the experiment it was fitted on",
            [out],
        )
    other_pool = tmp_path / "other_pool"
    sizes = ["--runs", "2", "--n-train", "13", "--n-test", "5", "--batch", "2", "--steps", "5"]
    _ok(["demo-data", other_pool, *sizes], capsys)
    _bad([*argv, "--test", "0", "--exp", other_pool], capsys, "n_train=13")


def test_a_diverging_simulator_is_refused_naming_run_and_step(work, tmp_path, capsys):
    d, exp = work
    # alpha = 2 * 60 per step: float32 overflows after about 19 steps of the 23.
    n_test, n_train = 5, 12
    sim = simulators.Simulator(
        A=np.full((n_test, n_train), 60.0, np.float32),
        B=np.zeros((n_test, n_train), np.float32),
        variant="linear",
        l2_a=0.0,
        l2_b=0.0,
        a_prior=0.5,
        batch=2,
    )
    sim_path = tmp_path / "grow.npz"
    simulators.save_simulator(sim_path, sim)
    run = runlog.load_runs(exp, [8])[0]
    pred = np.asarray(simulators.simulate(sim, run.curriculum, run.losses[0]))
    step, test = np.argwhere(~np.isfinite(pred))[0]
    assert 0 < step < run.steps
    want = f"the simulated loss of test example {test} is inf at step {step}"
    fig, figs, out = tmp_path / "fig.png", tmp_path / "figs", tmp_path / "pred.npy"
    line = _bad(
        ["plot", exp, "--sim", sim_path, "--runs", "7,8", "--tests", "0,1", "--out", fig],
        capsys,
        "run 7: ",
        [fig],
    )
    assert "diverges" in line
    _bad(
        ["figures", exp, "--sim", sim_path, "--runs", "8", "--out", figs],
        capsys,
        f"run 8: {want}",
        [figs],
    )
    inputs = ["--curriculum", d / "cur.npy", "--initial-losses", d / "l0.npy"]  # run 8's
    _bad(["simulate", sim_path, *inputs, "--out", out], capsys, f"cur.npy: {want}", [out])
    _bad(["influence", sim_path, *inputs, "--test", "0"], capsys, f"cur.npy: {want}")


def test_a_file_that_is_not_a_simulator_is_named(work, tmp_path, capsys):
    d, _ = work
    results = tmp_path / "results.json"
    results.write_text("{}")
    out = tmp_path / "y.npy"
    argv = ["--curriculum", d / "cur.npy", "--initial-losses", d / "l0.npy", "--out", out]
    line = _bad(["simulate", results, *argv], capsys, "results.json: not a simulator file", [out])
    assert "pickle" not in line and "simfluence fit" in line


@pytest.mark.parametrize("runs, n_test", [(32, 3), (9, 3), (3, 3), (2, 3), (6, 1)])
def test_demo_data_suggests_a_command_that_works(tmp_path, capsys, monkeypatch, runs, n_test):
    # The hint printed by demo-data must run on the experiment it just wrote, whatever its size
    # (the default split 20,2,10 needs 32 runs; evaluate needs 3 runs and 2 test examples).
    monkeypatch.chdir(tmp_path)
    sizes = ["--runs", runs, "--n-train", 8, "--n-test", n_test, "--batch", 2, "--steps", 9]
    out = _ok(["demo-data", "exp", *sizes], capsys).out
    command = out.split("try `", 1)[1].split("`", 1)[0].split()
    assert command[:2] in (["simfluence", "evaluate"], ["simfluence", "fit"]), out
    assert (command[1] == "evaluate") == (runs >= 3 and n_test >= 2), out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lambda-cap and convergence notes on tiny experiments
        _ok(command[1:], capsys)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"A": np.full((5, 12), "a"), "B": np.full((5, 12), "b")}, "A holds <U1, not numbers"),
        ({"l2_a": np.array([1.0, 2.0])}, "l2_a must be a number, got float64 (2,)"),
        ({"l2_a": np.array("abc")}, "l2_a must be a number, got <U3 ()"),
        ({"batch": np.array(2.5)}, "batch must be an integer"),
    ],
)
def test_a_simulator_file_with_bad_values_is_named(work, tmp_path, capsys, change, needle):
    d, _ = work
    with np.load(d / "sim.npz") as z:
        arrays = {k: z[k] for k in z.files}
    bad, out = tmp_path / "bad.npz", tmp_path / "pred.npy"
    np.savez(bad, **{**arrays, **change})
    argv = ["simulate", bad, "--curriculum", d / "cur.npy", "--initial-losses", d / "l0.npy"]
    line = _bad([*argv, "--out", out], capsys, str(bad), [out])
    assert needle in line and "simfluence fit" in line


def test_an_npz_archive_as_curriculum_or_initial_losses_is_named(work, tmp_path, capsys):
    d, _ = work
    sim, cur, l0, out = d / "sim.npz", d / "cur.npy", d / "l0.npy", tmp_path / "pred.npy"
    for flags in (
        ["--curriculum", sim, "--initial-losses", l0],
        ["--curriculum", cur, "--initial-losses", sim],
    ):
        line = _bad(["simulate", sim, *flags, "--out", out], capsys, f"{sim}: ", [out])
        assert "not an .npz archive" in line and "numpy.save" in line
    _bad(
        ["influence", sim, "--curriculum", sim, "--initial-losses", l0, "--test", 0],
        capsys,
        f"{sim}: curriculum must be one array",
    )


@pytest.mark.parametrize("command", ["evaluate", "fit", "plot"])
def test_an_npz_archive_as_a_run_array_is_named(work, tmp_path, capsys, command):
    d, exp = work
    bad = tmp_path / "exp"
    shutil.copytree(exp, bad)
    for name in ("curriculum.npy", "losses.npy"):
        path = bad / "run_002" / name
        keep = path.read_bytes()
        with open(path, "wb") as f:  # np.savez on an open file keeps the .npy name
            np.savez(f, a=np.zeros(3))
        out = tmp_path / ("out.png" if command == "plot" else "out.npz")
        argv = {
            "evaluate": ["evaluate", bad, "--split", "4,1,3", "--out", tmp_path / "r.json"],
            "fit": ["fit", bad, "--runs", "0-3", "--out", out],
            "plot": ["plot", bad, "--sim", d / "sim.npz", "--runs", "2", "--out", out],
        }[command]
        line = _bad(argv, capsys, str(path), [out, tmp_path / "r.json"])
        assert "npz archive" in line and "rerun the run" in line
        path.write_bytes(keep)


def test_a_truncated_tracin_npz_is_named(work, tmp_path, capsys):
    _, exp = work
    bad = tmp_path / "exp"
    shutil.copytree(exp, bad)
    path = bad / "run_000" / "tracin.npz"
    path.write_bytes(path.read_bytes()[:400])
    out = tmp_path / "r.json"
    line = _bad(["evaluate", bad, "--split", "4,1,3", "--out", out], capsys, str(path), [out])
    assert "delete it and recompute" in line


def test_evaluate_refuses_to_overwrite_the_experiments_own_files(work, tmp_path, capsys):
    _, exp = work
    exp2 = tmp_path / "exp"
    shutil.copytree(exp, exp2)
    (exp2 / "counterfactual").mkdir()
    before = {p: p.read_bytes() for p in sorted(exp2.rglob("*")) if p.is_file()}
    owned = [
        exp2 / "experiment.json",
        exp2 / "examples.json",
        exp2 / "run_001" / "meta.json",
        exp2 / "run_001" / "results.json",
        exp2 / "counterfactual" / "report.json",
        exp2 / "run_001" / ".." / "experiment.json",
    ]
    for out in owned:
        line = _bad(["evaluate", exp2, "--split", "4,1,3", "--out", out], capsys, f"--out {out}")
        assert "one of the experiment's own files" in line and "results.json" in line
    after = {p: p.read_bytes() for p in sorted(exp2.rglob("*")) if p.is_file()}
    assert after == before


def test_demo_data_refuses_a_negative_noise(tmp_path, capsys):
    for noise in ("-1", "nan", "inf"):
        line = _bad(
            ["demo-data", tmp_path / "exp", "--noise", noise], capsys, "--noise", [tmp_path / "exp"]
        )
        assert "finite and >= 0" in line


def test_a_huge_n_train_is_refused_before_allocating(work, tmp_path, capsys, monkeypatch):
    """experiment.json claiming n_train = 2e9 used to end in a MemoryError traceback."""
    _, exp = work
    bad = tmp_path / "exp"
    shutil.copytree(exp, bad)
    info = json.loads((bad / "experiment.json").read_text())
    (bad / "experiment.json").write_text(json.dumps({**info, "n_train": 2_000_000_000}))
    # This machine's memory, fixed so the check fires on any test machine.
    monkeypatch.setattr(simulators, "_physical_memory", lambda: 8 << 30)
    out = tmp_path / "sim.npz"
    for argv in (
        ["evaluate", bad, "--split", "4,1,3", "--out", tmp_path / "r.json"],
        ["fit", bad, "--runs", "0-3", "--out", out],
        ["fit", bad, "--runs", "0-3", "--l2-a", "1", "--l2-b", "1", "--out", out],
    ):
        line = _bad(argv, capsys, "n_train=2000000000", [out, tmp_path / "r.json"])
        assert "experiment.json" in line and "more than this machine's 8.0 GiB" in line
        assert "ids up to 11" in line


def test_debug_shows_the_traceback_before_the_error(work, tmp_path, capsys, monkeypatch):
    d, _ = work
    argv = ["simulate", d / "sim.npz", "--curriculum", d / "sim.npz", "--initial-losses"]
    argv += [d / "l0.npy", "--out", tmp_path / "p.npy"]
    _bad(argv, capsys, "curriculum must be one array")  # one line without --debug
    for flags, env in ((["--debug"], None), ([], "1"), (None, None)):
        if env:
            monkeypatch.setenv("SIMFLUENCE_DEBUG", env)
        full = [*argv, *flags] if flags is not None else ["--debug", *argv]
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in full])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):"), err
        assert err.strip().splitlines()[-1].startswith("simfluence: error: ")
        monkeypatch.delenv("SIMFLUENCE_DEBUG", raising=False)


def test_influence_all_tests_matrix_equals_each_listing(work, tmp_path, capsys):
    d, exp = work
    sim = simulators.load_simulator(d / "sim.npz")
    cur, l0 = np.load(d / "cur.npy"), np.load(d / "l0.npy")
    inputs = ["--curriculum", d / "cur.npy", "--initial-losses", d / "l0.npy"]
    out = tmp_path / "scores.npy"
    _ok(["influence", d / "sim.npz", *inputs, "--all-tests", "--out", out], capsys)
    scores = np.load(out)
    assert scores.dtype == np.float32 and scores.shape == (sim.n_test, sim.n_train)
    present = np.unique(cur)
    for j in range(sim.n_test):
        want = np.asarray(simulators.removal_influence(sim, cur, l0, j))
        np.testing.assert_array_equal(scores[j], want)
        listing = tmp_path / f"t{j}.json"
        _ok(
            ["influence", d / "sim.npz", *inputs, "--test", j, "--top", 99, "--out", listing],
            capsys,
        )
        data = json.loads(listing.read_text())
        rows = data["proponents"] + data["opponents"]
        assert {r["train_index"] for r in data["top"]} == set(present.tolist())
        for r in rows + data["top"]:
            assert r["removal_change"] == float(scores[j, r["train_index"]])
        assert all(r["removal_change"] > 0 for r in data["proponents"])
        assert all(r["removal_change"] < 0 for r in data["opponents"])
    # --test and --all-tests exclusive; the matrix needs a .npy, the listing a .json.
    argv = ["influence", d / "sim.npz", *inputs]
    _bad([*argv, "--test", 0, "--all-tests", "--out", out], capsys, "not allowed with")
    _bad(
        [*argv, "--all-tests", "--out", tmp_path / "s.json"],
        capsys,
        "expected a file ending in .npy",
    )
    _bad([*argv, "--all-tests"], capsys, "pass --out SCORES.npy")
    _bad(
        [*argv, "--test", 0, "--out", tmp_path / "s.npy"], capsys, "expected a file ending in .json"
    )
    _bad(argv, capsys, "one of the arguments --test --all-tests is required")


def test_influence_all_tests_with_a_schedule_aware_simulator(work, tmp_path, capsys):
    d, _ = work
    exp = tmp_path / "exp"
    _ok(["demo-data", exp, *SIZES], capsys)  # the same experiment as `work`'s
    lr = np.linspace(1.0, 0.1, 23).astype(np.float32)
    for r in range(4):
        np.save(exp / f"run_{r:03d}" / "lr.npy", lr)
    sim_path = tmp_path / "lr.npz"
    _ok(["fit", exp, "--runs", "0-3", "--variant", "linear-lr", "--out", sim_path], capsys)
    np.save(tmp_path / "lr.npy", lr)
    out = tmp_path / "scores.npy"
    inputs = ["--curriculum", d / "cur.npy", "--initial-losses", d / "l0.npy"]
    _ok(
        ["influence", sim_path, *inputs, "--lr", tmp_path / "lr.npy", "--all-tests", "--out", out],
        capsys,
    )
    sim = simulators.load_simulator(sim_path)
    cur, l0 = np.load(d / "cur.npy"), np.load(d / "l0.npy")
    for j in range(sim.n_test):
        want = simulators.removal_influence(sim, cur, l0, j, lr=lr)
        np.testing.assert_array_equal(np.load(out)[j], np.asarray(want))
    _bad(["influence", sim_path, *inputs, "--all-tests", "--out", out], capsys, "pass --lr")


def test_influence_lists_dataset_ids_when_experiment_json_has_pool_ids(work, tmp_path, capsys):
    d, _ = work
    exp = tmp_path / "exp"
    _ok(["demo-data", exp, *SIZES], capsys)  # the same experiment as `work`'s
    info = json.loads((exp / "experiment.json").read_text())
    ids = [f"rte-train-{1000 + i}" for i in range(info["n_train"])]
    runlog.write_experiment(exp, {**info, "pool_ids": ids})
    argv = ["influence", d / "sim.npz", "--curriculum", d / "cur.npy"]
    argv += ["--initial-losses", d / "l0.npy", "--test", "1", "--top", "2", "--exp", exp]
    res = _ok([*argv, "--out", tmp_path / "inf.json"], capsys)
    data = json.loads((tmp_path / "inf.json").read_text())
    for r in data["proponents"] + data["opponents"] + data["top"]:
        assert r["id"] == ids[r["train_index"]]
        line = next(ln for ln in res.out.splitlines() if f" {ids[r['train_index']]} " in ln)
        assert line.split()[1:3] == [str(r["train_index"]), r["id"]]
    assert len(data["proponents"]) <= 2 and len(data["opponents"]) <= 2
    assert "proponents (removal raises the loss" in res.out
    # figures uses the same listing: ids there too.
    figs = tmp_path / "figs"
    _ok(
        ["figures", exp, "--sim", d / "sim.npz", "--out", figs, "--test", "1", "--top", "2"], capsys
    )
    fig_rows = json.loads((figs / "influence.json").read_text())
    assert fig_rows["proponents"][0]["id"] == ids[fig_rows["proponents"][0]["train_index"]]
    assert "rte-train-" in (figs / "influence.txt").read_text()
    # Without examples.json the ids alone label the listing.
    (exp / "examples.json").unlink()
    res = _ok(argv, capsys)
    assert "rte-train-" in res.out and "synthetic" not in res.out
    runlog.write_experiment(exp, {**info, "pool_ids": ids[:3]})
    _bad(argv, capsys, "pool_ids must be a list of 12 dataset ids")


def test_table_writes_md_csv_and_tex(work, tmp_path, capsys):
    import csv

    _, exp = work
    res_path = tmp_path / "results.json"
    argv = ["evaluate", exp, "--split", "4,1,3", "--l2-a", "0.1", "--l2-b", "0.01"]
    _ok([*argv, "--variants", "linear,additive,constant", "--out", res_path], capsys)
    data = json.loads(res_path.read_text())
    for suffix in (".md", ".csv", ".tex"):
        out = tmp_path / f"t{suffix}"
        res = _ok(["table", res_path, "--out", out], capsys)
        assert res.out.split("\nwrote")[0] == out.read_text()
        assert out.with_suffix(".json").is_file()
    assert "| variant | all-steps MSE | all-steps MSE se |" in (tmp_path / "t.md").read_text()
    assert r"\textbf{" in (tmp_path / "t.tex").read_text()
    with (tmp_path / "t.csv").open(newline="", encoding="utf-8") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    mse = {v: data["variants"][v]["all_steps_mse"]["mean"] for v in rows}
    assert {v: float(r["all-steps MSE"]) for v, r in rows.items()} == mse
    best = min(mse, key=mse.get)
    assert [v for v, r in rows.items() if r["all-steps MSE best"] == "true"] == [best]
    assert rows["constant"]["LDS (across-run ρ)"] == ""  # undefined: empty, reason in notes
    assert "ignores the curriculum" in rows["constant"]["notes"]
    # The paper layout stays available, as markdown only.
    res = _ok(["table", res_path, "--out", tmp_path / "p.md", "--layout", "paper"], capsys)
    assert "All-steps MSE ± stderr / final-step Spearman ρ" in res.out
    _bad(
        ["table", res_path, "--out", tmp_path / "p.csv", "--layout", "paper"],
        capsys,
        "the paper layout is markdown only",
        [tmp_path / "p.csv"],
    )
    _bad(["table", res_path, "--out", tmp_path / "t.txt"], capsys, "expected a .md, .csv or .tex")


def test_evaluate_takes_the_recorded_split_unless_split_is_given(work, tmp_path, capsys):
    _, exp = work
    rec = tmp_path / "rec"
    shutil.copytree(exp, rec)
    info = json.loads((rec / "experiment.json").read_text())
    info["config"] = {"extra": {"split": [4, 2, 3]}}
    runlog.write_experiment(rec, info)
    out = tmp_path / "r.json"
    _ok(["evaluate", rec, "--variants", "constant", "--out", out], capsys)
    data = json.loads(out.read_text())
    assert data["split"] == {"fit": [0, 1, 2, 3], "valid": [4, 5], "test": [6, 7, 8]}
    assert data["split_source"] == "experiment.json config.extra.split"
    _ok(["evaluate", rec, "--split", "5,1,2", "--variants", "constant", "--out", out], capsys)
    data = json.loads(out.read_text())
    assert data["split"]["test"] == [6, 7] and data["split_source"] == "given"
    info["config"]["extra"]["split"] = "4,2,3"
    runlog.write_experiment(rec, info)
    out.unlink()
    _bad(["evaluate", rec, "--out", out], capsys, "config.extra.split is '4,2,3'", [out])
