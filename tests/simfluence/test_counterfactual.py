"""The counterfactual check's simulator half: proposals, scoring against run files, bad input.

The "trained" counterfactual runs here are rollouts of the synthetic experiment's true linear
simulator (what `simfluence demo-data` generates its runs with), written as run logs; the model
half (`finetune counterfactual`) is tested in tests/finetune/test_counterfactual.py.
"""

import itertools
import json

import numpy as np
import pytest

from simfluence import counterfactual as cf
from simfluence import runlog, simulators
from simfluence.cli import main

SIZES = ["--runs", "12", "--n-train", "20", "--n-test", "6", "--batch", "4", "--steps", "15"]


def _ok(argv, capsys):
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr()


def _bad(argv, capsys, match, unchanged=()):
    before = {p: p.read_bytes() if p.is_file() else None for p in unchanged}
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simfluence: error: "), err
    assert match in err[0], err[0]
    for p, content in before.items():
        assert (p.read_bytes() if p.is_file() else None) == content, p
    return err[0]


def _numpy_rollout(A, B, cur, l0):
    """Reference: L_t = sum_i A_i L_{t-1} + sum_i B_i, float64, one step at a time."""
    loss = np.asarray(l0, np.float64).copy()
    for ids in cur:
        loss = A[:, ids].sum(1) * loss + B[:, ids].sum(1)
    return loss


def _train_with_true_simulator(exp):
    """Writes every proposal's run as the true simulator rolls it out (noise-free)."""
    true = simulators.load_simulator(exp / "true_simulator.npz")
    A, B = np.asarray(true.A, np.float64), np.asarray(true.B, np.float64)
    data = runlog.read_proposals(exp)
    folder = runlog.counterfactual_dir(exp)
    for p, cur in zip(data["proposals"], data["curricula"], strict=True):
        base = runlog.load_runs(exp, [p["base_run"]])[0]
        losses = [base.losses[0].astype(np.float64)]
        for ids in cur:
            losses.append(A[:, ids].sum(1) * losses[-1] + B[:, ids].sum(1))
        runlog.write_run(
            runlog.run_dir(folder, p["id"]),
            cur,
            np.asarray(losses, np.float32),
            meta={  # as `finetune counterfactual` records it
                "proposal_id": p["id"],
                "kind": p["kind"],
                "base_run": p["base_run"],
                "test": p["test"],
                "proposals_sha256": data["curricula_sha256"],
            },
            lr=base.lr,
        )


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    """A noise-free synthetic experiment with linear, additive and TracIn-CP simulators fitted
    on runs 0-7 (fixed lambdas: noise-free runs would drive a validation search to its cap);
    runs 8-11 are the base runs."""
    d = tmp_path_factory.mktemp("cf")
    exp = d / "exp"
    assert main(["demo-data", str(exp), *SIZES, "--noise", "0", "--tracin"]) == 0
    for v in ("linear", "additive"):
        args = ["fit", exp, "--runs", "0-7", "--l2-a", "1e-3", "--l2-b", "1e-3", "--variant", v]
        assert main([str(a) for a in [*args, "--out", exp / f"sim_{v}.npz"]]) == 0
    args = ["fit", exp, "--runs", "0-7", "--variant", "tracin-cp-rescaled"]
    assert main([str(a) for a in [*args, "--out", exp / "sim_tracin-cp-rescaled.npz"]]) == 0
    return exp


@pytest.fixture(scope="module")
def scored(exp):
    argv = ["counterfactual", "propose", exp, "--base-runs", "8-11", "--targets", "4", "--k", "3"]
    assert main([str(a) for a in argv]) == 0
    _train_with_true_simulator(exp)
    assert main(["counterfactual", "score", str(exp)]) == 0
    folder = runlog.counterfactual_dir(exp)
    return json.loads((folder / "report.json").read_text())


def test_removal_rule_replaces_exactly_the_removed_slots():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 10, size=(7, 3)).astype(np.int32)
    removed = [int(base[0, 0]), int(base[3, 1])]
    new = cf.remove_examples(base, removed, 10, np.random.default_rng(5))
    hit = np.isin(base, removed)
    assert hit.sum() >= 2
    np.testing.assert_array_equal(new[~hit], base[~hit])  # every other slot unchanged
    assert not np.isin(new, removed).any()  # no removed example anywhere
    assert new.shape == base.shape and new.dtype == np.int32
    again = cf.remove_examples(base, removed, 10, np.random.default_rng(5))
    np.testing.assert_array_equal(new, again)  # seeded
    with pytest.raises(ValueError, match="leaves none"):
        cf.remove_examples(base, range(10), 10, rng)


def test_reorder_is_a_nontrivial_permutation_of_the_batches():
    base = np.arange(24, dtype=np.int32).reshape(8, 3)
    new, perm = cf.reorder_batches(base, np.random.default_rng(1))
    assert sorted(perm.tolist()) == list(range(8)) and perm.tolist() != list(range(8))
    np.testing.assert_array_equal(new, base[perm])
    assert sorted(map(tuple, new.tolist())) == sorted(map(tuple, base.tolist()))


def test_optimize_is_the_brute_force_optimum_for_one_step_and_respects_the_cap():
    rng = np.random.default_rng(3)
    n, b = 7, 3
    A = rng.uniform(0.2, 0.4, size=(2, n)).astype(np.float32)
    B = rng.normal(0.0, 0.1, size=(2, n)).astype(np.float32)
    sim = simulators.Simulator(A=A, B=B, variant="linear", l2_a=0, l2_b=0, a_prior=1 / b, batch=b)
    one = cf.optimize_curriculum(sim, 1, 0.8, steps=1, cap=1)
    best = min(
        itertools.combinations(range(n), b),
        key=lambda c: _numpy_rollout(A, B, [list(c)], [0, 0.8])[1],
    )
    assert sorted(one[0].tolist()) == sorted(best)
    cur = cf.optimize_curriculum(sim, 1, 0.8, steps=6, cap=3)
    assert np.bincount(cur.ravel(), minlength=n).max() <= 3
    assert all(len(set(row)) == b for row in cur.tolist())  # distinct within a batch
    with pytest.raises(ValueError, match="optimize-cap"):
        cf.optimize_curriculum(sim, 1, 0.8, steps=8, cap=3)  # 24 slots > 7 x 3


def test_proposals_follow_their_kind(exp, scored):
    data = runlog.read_proposals(exp)
    props, curs = data["proposals"], data["curricula"]
    sim = simulators.load_simulator(exp / "sim_linear.npz")
    assert len(props) == 4 * len(cf.DEFAULT_KINDS)
    for p, cur in zip(props, curs, strict=True):
        base = runlog.load_runs(exp, [p["base_run"]])[0]
        assert cur.shape == base.curriculum.shape
        if p["kind"] in cf.REMOVAL_KINDS:
            assert p["k"] == 3 and len(p["removed"]) == 3
            hit = np.isin(base.curriculum, p["removed"])
            np.testing.assert_array_equal(cur[~hit], base.curriculum[~hit])
            assert not np.isin(cur, p["removed"]).any()
            assert set(p["removed"]) <= set(np.unique(base.curriculum).tolist())
        if p["kind"] in ("remove-top", "remove-bottom"):
            inf = np.asarray(
                simulators.removal_influence(sim, base.curriculum, base.losses[0], p["test"])
            )
            present = np.unique(base.curriculum)
            chosen = inf[p["removed"]]
            rest = inf[np.setdiff1d(present, p["removed"])]
            if p["kind"] == "remove-top":
                assert chosen.min() >= rest.max()
            else:
                assert chosen.max() <= rest.min()
        if p["kind"] == "reorder":
            np.testing.assert_array_equal(cur, base.curriculum[p["permutation"]])
        if p["kind"] == "optimize":
            counts = np.bincount(base.curriculum.ravel(), minlength=20)
            assert np.bincount(cur.ravel()).max() <= counts.max() == p["optimize_cap"]


def test_report_changes_come_from_the_run_files_and_linear_matches_a_numpy_rollout(exp, scored):
    A = np.asarray(np.load(exp / "sim_linear.npz")["A"], np.float64)
    B = np.asarray(np.load(exp / "sim_linear.npz")["B"], np.float64)
    folder = runlog.counterfactual_dir(exp)
    assert scored["simulator_files"]["linear"] == "sim_linear.npz"  # relative to EXP
    assert scored["simulator_files"]["constant"] is None
    for p in scored["proposals"]:
        j = p["test"]
        cf_losses = np.load(folder / p["run"] / "losses.npy")
        base_losses = np.load(exp / f"run_{p['base_run']:03d}" / "losses.npy")
        assert p["actual_change"] == pytest.approx(
            float(cf_losses[-1, j]) - float(base_losses[-1, j]), rel=0, abs=1e-7
        )
        cur = np.load(folder / p["run"] / "curriculum.npy")
        base_cur = np.load(exp / f"run_{p['base_run']:03d}" / "curriculum.npy")
        want = (
            _numpy_rollout(A, B, cur, base_losses[0])[j]
            - _numpy_rollout(A, B, base_cur, base_losses[0])[j]
        )
        assert p["predicted_change"]["linear"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert p["predicted_change"]["constant"] == 0.0
        assert p["predicted_change"]["mean-trajectory"] == 0.0
        assert set(p["side_effects"]) == set(p["predicted_change"])


def test_summary_is_honest_about_undefined_values_and_tracks_the_truth(scored):
    s = scored["summary"]
    for v in ("constant", "mean-trajectory"):
        assert s[v]["all"]["spearman"] is None and s[v]["all"]["undefined_reason"]
        assert s[v]["all"]["sign_agreement"] is None and s[v]["all"]["sign_undefined_reason"]
        assert s[v]["all"]["mae"] == pytest.approx(
            np.mean([abs(p["actual_change"]) for p in scored["proposals"]])
        )
    pred = np.array([p["predicted_change"]["linear"] for p in scored["proposals"]])
    act = np.array([p["actual_change"] for p in scored["proposals"]])
    from scipy import stats

    assert s["linear"]["all"]["spearman"] == pytest.approx(stats.spearmanr(pred, act).statistic)
    assert s["linear"]["all"]["mae"] == pytest.approx(np.abs(pred - act).mean())
    assert s["linear"]["all"]["n"] == len(act)
    # Noise-free runs of a linear simulator: the fitted linear simulator should rank the
    # trained changes well (a loose bound, far above chance).
    assert s["linear"]["all"]["spearman"] > 0.6
    top = scored["removal_effect"]["by_kind"]["remove-top"]
    assert top["mean"] == pytest.approx(
        np.mean([p["actual_change"] for p in scored["proposals"] if p["kind"] == "remove-top"])
    )
    assert scored["optimize"]["n"] == 4


def test_rerun_keeps_identical_proposals_and_report_files_exist(exp, scored, capsys):
    folder = runlog.counterfactual_dir(exp)
    for name in ("report.json", "report.md", "predicted_vs_actual.png"):
        assert (folder / name).is_file()
    before = (folder / "proposals.json").read_bytes()
    out = _ok(
        ["counterfactual", "propose", exp, "--base-runs", "8-11", "--targets", "4", "--k", "3"],
        capsys,
    )
    assert "kept the identical proposals" in out.out
    assert (folder / "proposals.json").read_bytes() == before


def test_bad_input_is_one_line_and_writes_nothing(exp, scored, capsys, tmp_path):
    folder = runlog.counterfactual_dir(exp)
    props = folder / "proposals.json"
    keep = [props, folder / "report.json"]
    base = ["counterfactual", "propose", exp, "--base-runs", "8-11", "--targets", "4"]
    _bad([*base, "--k", "4"], capsys, "differs: settings.k", keep)
    _bad([*base, "--k", "3", "--kinds", "reorder,flip"], capsys, "unknown proposal kind", keep)
    _bad([*base[:3], "--base-runs", "8,40"], capsys, "run 40 not found", keep)
    _bad([*base[:3], "--base-runs", "5"], capsys, "were fitting or validation runs", keep)
    # A fresh experiment for the rest, so the refusals are not the "other settings" one.
    other = tmp_path / "other"
    assert main(["demo-data", str(other), *SIZES, "--seed", "7"]) == 0
    fresh = ["counterfactual", "propose", other, "--base-runs", "8-11", "--targets", "2"]
    _bad([*fresh, "--sims", f"linear={exp / 'sim_linear.npz'}"], capsys, "another experiment")
    assert not runlog.counterfactual_dir(other).exists()
    fit = ["fit", other, "--runs", "0-5", "--l2-a", "1", "--l2-b", "1"]
    _ok([*fit, "--out", other / "sim_linear.npz"], capsys)
    _bad([*fresh, "--k", "19"], capsys, "distinct examples of the smallest base curriculum")
    _bad([*fresh, "--k", "20"], capsys, "leaves nothing of the pool")
    (runlog.run_dir(other, 9) / "meta.json").unlink()
    _bad([*fresh, "--k", "2"], capsys, "run 9 is incomplete")
    assert not runlog.counterfactual_dir(other).exists()
    # Score before training, and after a simulator file changed.
    _ok([*fresh[:3], "--base-runs", "8,10", "--targets", "2", "--k", "2"], capsys)
    report = runlog.counterfactual_dir(other) / "report.json"
    _bad(["counterfactual", "score", other], capsys, "are not complete", [report])
    _ok([*fit[:3], "0-6", *fit[4:], "--out", other / "sim_linear.npz"], capsys)
    _bad(["counterfactual", "score", other], capsys, "changed or disappeared", [report])


def test_order_blind_variants_predict_exactly_no_change_for_a_reorder(scored):
    for p in scored["proposals"]:
        if p["kind"] == "reorder":  # sums and products of per-step terms ignore the order
            assert p["predicted_change"]["additive"] == 0.0
    s = scored["summary"]["additive"]["reorder"]
    assert s["spearman"] is None and s["sign_agreement"] is None


def test_edits_after_proposing_are_refused(exp, scored, capsys, tmp_path):
    import shutil

    score = ["counterfactual", "score"]
    fresh = tmp_path / "copy"
    shutil.copytree(exp, fresh)
    folder = runlog.counterfactual_dir(fresh)
    report = folder / "report.json"
    # A proposal's target edited by hand.
    props = folder / "proposals.json"
    data = json.loads(props.read_text())
    data["proposals"][0]["test"] = (data["proposals"][0]["test"] + 1) % 6
    props.write_text(json.dumps(data))
    _bad([*score, fresh], capsys, "does not match its content_sha256", [report])
    _bad(
        ["counterfactual", "propose", fresh, "--base-runs", "8-11", "--targets", "4"],
        capsys,
        "does not match its content_sha256",
        [props],
    )
    shutil.rmtree(fresh)
    shutil.copytree(exp, fresh)
    # A base run changed after proposing.
    losses = fresh / "run_009" / "losses.npy"
    arr = np.load(losses)
    arr[-1] += 0.1
    np.save(losses, arr)
    _bad([*score, fresh], capsys, "changed since the proposals were made", [report])
    np.save(losses, arr - 0.1 * (arr == arr))  # restore the values, not the bytes' hash
    shutil.rmtree(fresh)
    shutil.copytree(exp, fresh)
    # A trained run whose meta.json names another target.
    meta = folder / "run_001" / "meta.json"
    m = json.loads(meta.read_text())
    m["test"] = -1
    meta.write_text(json.dumps(m))
    _bad([*score, fresh], capsys, "test disagree with proposal 1", [report])
    # A corrupt proposals.npz.
    npz = folder / "proposals.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    _bad([*score, fresh], capsys, "cannot read curricula", [report])


def test_propose_argument_refusals(exp, scored, capsys, tmp_path):
    other = tmp_path / "e"
    assert main(["demo-data", str(other), *SIZES, "--tracin"]) == 0
    fit = ["fit", other, "--runs", "0-5", "--l2-a", "1", "--l2-b", "1"]
    _ok([*fit, "--out", other / "sim_linear.npz"], capsys)
    base = ["counterfactual", "propose", other, "--base-runs", "8-11"]
    folder = runlog.counterfactual_dir(other)
    _bad([*base, "--tests", "1,1"], capsys, "more than once")
    _bad([*base[:3], "--base-runs", "8,8", "--targets", "2"], capsys, "more than once")
    _bad([*base, "--tests", "1", "--targets", "2"], capsys, "not both")
    _bad([*base, "--seed", "-1"], capsys, "--seed -1 must be an integer >= 0")
    _bad([*base, "--optimize-cap", "0", "--kinds", "reorder"], capsys, "--optimize-cap 0")
    _bad([*base, "--sims", f"foo={other / 'sim_linear.npz'}"], capsys, "unknown variant(s)")
    # A schedule-aware simulator needs the base runs' lr.npy (demo-data with --tracin has it).
    fit_lr = ["fit", other, "--runs", "0-5", "--l2-a", "1", "--l2-b", "1", "--variant"]
    _ok([*fit_lr, "linear-lr", "--out", other / "sim_linear-lr.npz"], capsys)
    (other / "run_008" / "lr.npy").unlink()
    _bad([*base, "--targets", "2"], capsys, "no lr.npy, which the linear-lr simulator needs")
    assert not folder.exists()
