"""evaluate(): JSON schema, metrics against independent recomputation, split and input errors."""

import importlib
import json

import numpy as np
import pytest
from scipy import stats

from simfluence import runlog, simulators
from simfluence.demo_data import make_demo_experiment
from simfluence.evaluation import ALL_VARIANTS, evaluate
from simfluence.runlog import RunLogError

SIZES = dict(n_runs=9, n_train=12, n_test=5, batch=2, steps=23)
GRID = (1e-2, 1.0)


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return make_demo_experiment(tmp_path_factory.mktemp("ev") / "exp", tracin=True, **SIZES)


@pytest.fixture(scope="module")
def results(exp):
    return evaluate(exp, split=(4, 1, 4), grid=GRID)


def test_schema(results):
    assert list(results["variants"]) == list(ALL_VARIANTS)  # tracin.npz present -> all
    assert results["split"] == {"fit": [0, 1, 2, 3], "valid": [4], "test": [5, 6, 7, 8]}
    assert results["experiment"]["n_test"] == 5 and results["experiment"]["batch"] == 2
    json.dumps(results, allow_nan=False)  # no NaN anywhere
    for name, e in results["variants"].items():
        for key in ("all_steps_mse", "final_step_mse", "final_step_spearman"):
            assert set(e[key]) >= {"mean", "stderr"}, (name, key)
            assert np.isfinite(e[key]["mean"]) and np.isfinite(e[key]["stderr"])
        ar = e["across_run_spearman"]
        assert set(ar) >= {"mean", "stderr", "n_used", "n_excluded", "undefined_reason"}
        assert ar["stderr_method"] == "jackknife over held-out runs (delete-one)"
        assert ar["n_runs"] == 4
        assert e["final_step_spearman"]["n_runs"] == 4
        assert isinstance(e["skill_vs_mean_trajectory"], float)
        assert e["skill_undefined_reason"] is None
        assert "l2_a" in e and "l2_b" in e
        assert len(e["per_run"]["all_steps_mse"]) == 4
    for name in simulators.VARIANTS:
        e = results["variants"][name]
        assert e["lambda_source"] == "validation"
        assert e["l2_a"] in ((None,) if name == "additive" else GRID)
        assert e["l2_b"] in ((None,) if name == "multiplicative" else GRID)
        # A given grid is searched as given; on a two-value grid every choice is an edge.
        assert e["lambda_grid"] == "given" and {r["round"] for r in e["lambda_search"]} == {0}
        assert len(e["lambda_search"]) == (4 if name == "linear" else 2)
        edges = {k: "upper" if e[k] == max(GRID) else "lower" for k in ("l2_a", "l2_b")}
        edges = {k: side for k, side in edges.items() if e[k] is not None}
        assert e["lambda_at_edge"] is True and e["lambda_edges"] == edges


def test_curriculum_blind_baselines_have_undefined_across_run(results):
    for name in ("constant", "mean-trajectory"):
        ar = results["variants"][name]["across_run_spearman"]
        assert ar["mean"] is None and ar["stderr"] is None
        assert "ignores the curriculum" in ar["undefined_reason"]
    assert results["variants"]["linear"]["across_run_spearman"]["mean"] is not None


def test_metrics_recomputed_independently(exp, results):
    runs = runlog.load_runs(exp, [5, 6, 7, 8])
    fit_runs = runlog.load_runs(exp, [0, 1, 2, 3])
    v = results["variants"]
    # constant: L_t = L_0.
    per = [np.mean((r.losses[1:] - r.losses[0]) ** 2) for r in runs]
    assert v["constant"]["all_steps_mse"]["mean"] == pytest.approx(np.mean(per), rel=1e-5)
    assert v["constant"]["all_steps_mse"]["stderr"] == pytest.approx(
        np.std(per, ddof=1) / np.sqrt(4), rel=1e-4
    )
    # mean trajectory by hand (all runs have the same length here).
    delta = np.mean([r.losses - r.losses[0] for r in fit_runs], axis=0)
    per_mt = [np.mean((r.losses[0] + delta - r.losses)[1:] ** 2) for r in runs]
    mt = np.mean(per_mt)
    assert v["mean-trajectory"]["all_steps_mse"]["mean"] == pytest.approx(mt, rel=1e-4)
    # skill score = 1 - MSE / MSE(mean trajectory), for every variant.
    for e in v.values():
        assert e["skill_vs_mean_trajectory"] == pytest.approx(
            1 - e["all_steps_mse"]["mean"] / mt, rel=1e-4, abs=1e-6
        )
    # linear: refit with the chosen lambdas, roll out, score with numpy.
    lin = v["linear"]
    sim = simulators.fit(
        [r.curriculum for r in fit_runs],
        [r.losses for r in fit_runs],
        n_train=SIZES["n_train"],
        variant="linear",
        l2_a=lin["l2_a"],
        l2_b=lin["l2_b"],
    )
    preds = [np.asarray(simulators.simulate(sim, r.curriculum, r.losses[0])) for r in runs]
    per_lin = [np.mean((p[1:] - r.losses[1:]) ** 2) for p, r in zip(preds, runs, strict=True)]
    assert lin["all_steps_mse"]["mean"] == pytest.approx(np.mean(per_lin), rel=1e-4)
    # Across-run rho and its delete-one jackknife over the held-out runs, by a scipy loop.
    pf = np.stack([p[-1] for p in preds]).astype(np.float64)
    tf = np.stack([r.losses[-1] for r in runs]).astype(np.float64)

    def across(p, t):
        return np.mean([stats.spearmanr(p[:, j], t[:, j]).statistic for j in range(p.shape[1])])

    theta = np.array([across(np.delete(pf, k, 0), np.delete(tf, k, 0)) for k in range(4)])
    jack = np.sqrt(3 / 4 * np.sum((theta - theta.mean()) ** 2))
    assert lin["across_run_spearman"]["mean"] == pytest.approx(across(pf, tf), abs=1e-6)
    assert lin["across_run_spearman"]["stderr"] == pytest.approx(jack, abs=1e-6)
    # "lds" is the metric's name; "across_run_spearman" its alias: the same value, every variant.
    assert lin["lds"]["mean"] == pytest.approx(across(pf, tf), abs=1e-6)
    for name, entry in results["variants"].items():
        assert entry["lds"] == entry["across_run_spearman"], name


def test_default_variants_without_tracin_and_fixed_lambdas(tmp_path):
    e = make_demo_experiment(tmp_path / "e", **SIZES)
    res = evaluate(e, split=(4, 0, 3), l2_a=0.1, l2_b=0.01, variants=None)
    assert list(res["variants"]) == [
        "linear",
        "additive",
        "multiplicative",
        "constant",
        "mean-trajectory",
        "linear-momentum",
    ]
    assert res["variants"]["linear"]["lambda_source"] == "given"
    assert res["variants"]["linear-momentum"]["decay_source"] == "default"  # no validation runs
    with pytest.raises(RunLogError, match="tracin.npz"):
        evaluate(e, split=(4, 0, 3), variants=["tracin-cp"])


def test_errors(tmp_path, exp):
    with pytest.raises(RunLogError, match="needs 13 complete runs but there are 9"):
        evaluate(exp, split=(10, 1, 2))
    with pytest.raises(ValueError, match="unknown variant 'lineer'"):
        evaluate(exp, split=(4, 1, 3), variants=["lineer"])
    with pytest.raises(ValueError, match="at least 2 held-out"):
        evaluate(exp, split=(4, 1, 1))
    with pytest.raises(ValueError, match="both l2_a and l2_b"):
        evaluate(exp, split=(4, 1, 3), l2_a=1.0)
    one = make_demo_experiment(tmp_path / "one", n_runs=4, n_train=6, n_test=1, batch=2, steps=5)
    with pytest.raises(ValueError, match="at least 2 test examples"):
        evaluate(one, split=(2, 0, 2))
    with pytest.raises(RunLogError, match="not found"):
        evaluate(tmp_path / "missing")


def test_diverging_simulator_is_undefined_not_nan(exp, monkeypatch):
    ev = importlib.import_module("simfluence.evaluation")  # the module, not the function
    from simfluence.table import format_results

    real = ev._predict_simfluence

    def blow_up(sim, runs):
        preds = real(sim, runs)
        preds[1] = preds[1].copy()
        preds[1][-1, 0] = np.inf
        return preds

    monkeypatch.setattr(ev, "_predict_simfluence", blow_up)
    res = evaluate(exp, split=(4, 0, 3), variants=["linear", "constant"], l2_a=0.1, l2_b=0.01)
    json.dumps(res, allow_nan=False)
    lin = res["variants"]["linear"]
    assert lin["all_steps_mse"]["mean"] is None and lin["skill_vs_mean_trajectory"] is None
    assert "held-out run(s) 5" in lin["all_steps_mse"]["undefined_reason"]
    assert res["variants"]["constant"]["all_steps_mse"]["mean"] is not None
    text = format_results(res)
    assert "| linear | — [1] |" in text and "diverges" in text and "nan" not in text.lower()


def test_lambda_at_the_cap_is_flagged_and_warned(flat_validation_exp):
    from simfluence.table import format_results

    with pytest.warns(UserWarning, match=r"additive simulator: .* at a cap .*l2_b=1e\+06") as rec:
        res = evaluate(flat_validation_exp, split=(3, 1, 2), variants=["additive", "constant"])
    assert len([w for w in rec if "lambda search" in str(w.message)]) == 1
    json.dumps(res, allow_nan=False)
    e = res["variants"]["additive"]
    assert e["l2_b"] == simulators.DEFAULT_GRID_CAPS[1] and e["lambda_grid"] == "default"
    assert e["lambda_at_edge"] is True and e["lambda_edges"] == {"l2_b": "upper"}
    searched = sorted(row["l2_b"] for row in e["lambda_search"])
    assert searched == [float(f"1e{k}") for k in range(-4, 7)]  # every decade up to the cap
    assert "lambda_at_edge" not in res["variants"]["constant"]
    text = format_results(res)
    # Two held-out runs: the across-run rho's jackknife stderr is undefined, footnote [1].
    assert "[1] across-run ρ standard error undefined: the jackknife over held-out runs" in text
    assert "| 1e+06 [2] |" in text
    assert "[2] λ_B at the upper cap of the extended default lambda search" in text


def test_experiment_name_from_the_top_level_or_the_recorded_config(tmp_path):
    ev = importlib.import_module("simfluence.evaluation")
    out = tmp_path / "somewhere" / "output"
    assert ev._experiment_name(out, {"name": "top"}) == "top"
    # `finetune run` records the config, whose name wins over the folder's.
    assert ev._experiment_name(tmp_path / "demo_out", {"config": {"name": "demo"}}) == "demo"
    assert ev._experiment_name(out, {}) == "somewhere"  # runs/<config>/output
    assert ev._experiment_name(tmp_path / "x", {"config": {"name": ""}}) == "x"


def _growing_experiment(path):
    """Two short fitting runs whose losses grow 10% a step, three long held-out runs that
    fall: the fitted linear simulator's rollout is finite in float32 (~1e24) but its squared
    error is not."""
    rng = np.random.default_rng(0)
    runlog.write_experiment(path, {"n_train": 6, "n_test": 3, "name": "grow"})
    l0 = np.array([1.0, 2.0, 3.0])
    for index in range(5):
        steps = 30 if index < 2 else 600
        cur = rng.integers(0, 6, (steps, 2)).astype(np.int32)
        t = np.arange(steps + 1)[:, None]
        if index < 2:
            loss = l0 * 1.1**t
        else:
            loss = l0 * (0.3 + 0.7 * np.exp(-t / 200)) + rng.normal(0, 0.01, (steps + 1, 3))
        runlog.write_run(runlog.run_dir(path, index), cur, loss.astype(np.float32))
    return path


def test_huge_but_finite_rollout_is_scored_in_float64(tmp_path):
    from simfluence.table import format_results

    exp = _growing_experiment(tmp_path / "grow")
    res = evaluate(
        exp,
        split=(2, 0, 3),
        variants=["linear", "constant", "mean-trajectory"],
        l2_a=0.01,
        l2_b=0.01,
    )
    json.dumps(res, allow_nan=False)
    runs = runlog.load_runs(exp, [2, 3, 4])
    fit_runs = runlog.load_runs(exp, [0, 1])
    sim = simulators.fit(
        [r.curriculum for r in fit_runs],
        [r.losses for r in fit_runs],
        n_train=6,
        variant="linear",
        l2_a=0.01,
        l2_b=0.01,
    )
    preds = [np.asarray(simulators.simulate(sim, r.curriculum, r.losses[0])) for r in runs]
    assert all(np.isfinite(p).all() for p in preds)
    assert max(np.abs(p).max() for p in preds) > 1e20  # its squares overflow float32
    per = [
        np.mean((p[1:].astype(np.float64) - r.losses[1:]) ** 2)
        for p, r in zip(preds, runs, strict=True)
    ]
    lin = res["variants"]["linear"]
    # A float32 rollout over 600 steps vs simulate_many's: ~1e-5 relative rounding apart.
    assert lin["all_steps_mse"]["mean"] == pytest.approx(np.mean(per), rel=1e-3)
    assert lin["skill_vs_mean_trajectory"] < -1e30
    assert res["variants"]["constant"]["all_steps_mse"]["mean"] < 10.0
    text = format_results(res)
    assert "| linear |" in text and "| constant |" in text
    assert "nan" not in text.lower() and "inf" not in text.lower()


def test_non_finite_metric_is_undefined_for_that_variant_only(exp, monkeypatch):
    ev = importlib.import_module("simfluence.evaluation")
    from simfluence.table import format_results

    real = ev._predict_simfluence

    def too_big(sim, runs):
        # Finite float64 values whose squares overflow even float64.
        preds = [p.astype(np.float64) for p in real(sim, runs)]
        preds[2][3, 1] = 1e200
        return preds

    monkeypatch.setattr(ev, "_predict_simfluence", too_big)
    res = evaluate(exp, split=(4, 0, 3), variants=["linear", "constant"], l2_a=0.1, l2_b=0.01)
    json.dumps(res, allow_nan=False)
    lin = res["variants"]["linear"]
    for key in ("all_steps_mse", "final_step_spearman", "final_step_mse", "across_run_spearman"):
        assert lin[key]["mean"] is None
    reason = lin["all_steps_mse"]["undefined_reason"]
    assert "all-steps MSE is not finite on held-out run(s) 6" in reason
    assert lin["skill_vs_mean_trajectory"] is None and "not finite" in lin["skill_undefined_reason"]
    assert res["variants"]["constant"]["all_steps_mse"]["mean"] is not None
    text = format_results(res)
    assert "| linear | — [1] |" in text and "nan" not in text.lower()


def test_final_step_rho_undefined_on_some_runs_is_counted_and_footnoted(exp, monkeypatch):
    ev = importlib.import_module("simfluence.evaluation")
    from simfluence.table import format_results

    real = ev._predict_simfluence

    def flat_end(sim, runs):
        preds = real(sim, runs)
        preds[0] = preds[0].copy()
        preds[0][-1] = 0.5  # equal final losses across test examples on run 4
        return preds

    monkeypatch.setattr(ev, "_predict_simfluence", flat_end)
    res = evaluate(exp, split=(4, 0, 3), variants=["linear"], l2_a=0.1, l2_b=0.01)
    rho = res["variants"]["linear"]["final_step_spearman"]
    assert rho["n_runs"] == 3 and rho["n_undefined"] == 1 and rho["mean"] is not None
    assert "held-out run(s) 4" in rho["undefined_reason"]
    text = format_results(res)
    assert "final-step ρ averaged over the 2 of 3 held-out runs where it is defined" in text
