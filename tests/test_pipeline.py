"""The make targets end to end on a tiny config: runs -> tracin -> simulate -> figures -> table.

Runs the real Makefile (with the test's interpreter and no install step), so the targets users
type are what is tested; then reruns everything and checks that finished work is kept as is.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .finetune._tiny import write_config

REPO = Path(__file__).resolve().parents[1]

# The shared tiny experiment (tests/finetune/_tiny.py), five uniform runs of 5 steps trained
# together, with a checkpoint at step 0 and at step 3 for TracIn-CP.
PIPELINE = dict(
    name="pipeline",
    num_runs=5,
    steps=5,
    curriculum="uniform",
    runs_together=5,
    checkpoint_steps=(0, 3),
)

VARIANTS = (
    "linear",
    "additive",
    "multiplicative",
    "linear-lr",
    "additive-lr",
    "linear-lr-tracin-prior",
    "tracin-cp",
    "tracin-cp-rescaled",
    "tracin-cp-momentum",
    "linear-lr-momentum",
    "linear-momentum",
    "constant",
    "mean-trajectory",
)
CF_ARGS = "--base-runs 3,4 --targets 2 --k 2"


def _make(target: str, config: Path, exp: Path, data_dir: Path, tok: Path, **extra) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    variables = {
        "CONFIG": str(config),
        "OUT": str(exp),
        "PYTHON": sys.executable,
        "INSTALL_DEP": "",
        "SPLIT": "2,1,2",
        "PLOT_RUN": "4",
        "TESTS": "0,1",
        **extra,
    }
    env = {
        **os.environ,
        "SIMFLUENCE_DATA_DIR": str(data_dir),
        "SIMFLUENCE_TOKENIZER": str(tok),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    cmd = ["make", "--no-print-directory", "-C", str(REPO), target]
    cmd += [f"{k}={v}" for k, v in variables.items()]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"make {target} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def _snapshot(exp: Path) -> dict[str, bytes]:
    names = ("losses.npy", "curriculum.npy", "tracin.npz")
    return {
        str(p.relative_to(exp)): p.read_bytes()
        for p in sorted(exp.glob("run_*/*"))
        if p.name in names
    }


def test_make_targets_end_to_end_and_rerun(tmp_path, data_dir, t5_tokenizer_dir):
    config = write_config(tmp_path / "pipeline", **PIPELINE)
    exp = tmp_path / "exp"
    table = tmp_path / "results" / "table.md"
    args = (config, exp, data_dir, t5_tokenizer_dir)

    for target in ("runs", "tracin", "simulate", "figures"):
        _make(target, *args)
    _make("counterfactual", *args, CF_ARGS=CF_ARGS)
    _make("table", *args, TABLE_INPUTS=str(exp / "results.json"), TABLE_OUT=str(table))

    # runs: five complete runs in the run-log format, with checkpoints and TracIn-CP dots.
    from simfluence import runlog

    runs = runlog.load_runs(exp)
    assert [r.index for r in runs] == [0, 1, 2, 3, 4]
    for r in runs:
        assert r.curriculum.shape == (5, 2) and r.losses.shape == (6, 4)
        tr = runlog.read_tracin(r.path)
        assert tr is not None and tr["dots"].shape == (2, 4, 8)
        assert list(tr["steps"]) == [0, 3]

    # simulate: every variant scored, finite wherever the metric is defined.
    results = json.loads((exp / "results.json").read_text())
    assert set(results["variants"]) == set(VARIANTS)
    for name, row in results["variants"].items():
        for metric in ("all_steps_mse", "final_step_spearman", "final_step_mse"):
            assert math.isfinite(row[metric]["mean"]), (name, metric, row[metric])
    assert results["split"]["fit"] == [0, 1] and results["split"]["test"] == [3, 4]
    for name in VARIANTS[:-2]:  # every variant but the baselines, fitted to a file
        assert (exp / f"sim_{name}.npz").is_file(), name

    # counterfactual: every proposal trained, from the base run's starting state, and scored.
    cf = exp / "counterfactual"
    report = json.loads((cf / "report.json").read_text())
    assert len(report["proposals"]) == 10 and report["step0_mismatch"] == []
    assert set(report["summary"]) == set(VARIANTS)
    for p in report["proposals"]:
        cf_losses = runlog.load_counterfactual_runs(exp, [p["id"]])[0].losses
        base = runlog.load_runs(exp, [p["base_run"]])[0].losses
        assert (cf_losses[0] == base[0]).all()
        assert p["actual_change"] == float(cf_losses[-1, p["test"]]) - float(base[-1, p["test"]])
    assert (cf / "report.md").is_file() and (cf / "predicted_vs_actual.png").is_file()

    # figures and table.
    stems = ("trajectories", "parameters_linear", "lds", "metrics", "lambda")
    names = [f"{stem}.{ext}" for stem in stems for ext in ("png", "pdf")]
    for name in (*names, "influence.txt", "influence.json"):
        assert (exp / "figures" / name).stat().st_size > 0, name
    text = table.read_text()
    for name in VARIANTS:
        assert f"| {name} |" in text
    assert json.loads(table.with_suffix(".json").read_text())

    # A second pass keeps every finished file bitwise as it was and gives the same results.
    before = _snapshot(exp)
    cf_before = {p: p.read_bytes() for p in sorted(cf.glob("run_*/*"))}
    for target in ("runs", "tracin", "simulate"):
        _make(target, *args)
    _make("counterfactual", *args, CF_ARGS=CF_ARGS)
    assert _snapshot(exp) == before
    assert {p: p.read_bytes() for p in sorted(cf.glob("run_*/*"))} == cf_before
    again = json.loads((exp / "results.json").read_text())
    assert again["variants"] == results["variants"]
    assert json.loads((cf / "report.json").read_text())["summary"] == report["summary"]


def test_make_table_without_results_fails_cleanly(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(REPO),
            "table",
            "INSTALL_DEP=",
            f"PYTHON={sys.executable}",
            "TABLE_INPUTS=",
            f"TABLE_OUT={tmp_path}/t.md",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "run make simulate first" in proc.stderr
    assert not (tmp_path / "t.md").exists()


def _dry_run(*args: str) -> list[str]:
    """`make -n` of a target: the commands it would run, one per line, nothing executed."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    cmd = ["make", "-n", "--no-print-directory", "-C", str(REPO), *args, "INSTALL_DEP="]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.replace("\\\n", " ").splitlines()


def _clean_env() -> dict[str, str]:
    # A CONFIG or OUT exported in the caller's shell would reach make; the tests set their own.
    return {k: v for k, v in os.environ.items() if k not in ("CONFIG", "OUT", "MAKEFLAGS")}


def test_make_demo_ignores_another_config():
    # `make demo CONFIG=...` (or CONFIG exported in the shell) must not write the demo into
    # that config's output folder, where it would block the config's own runs.
    lines = _dry_run("demo", "CONFIG=runs/t0-3b-ia3-rte")
    assert any("CONFIG=runs/demo OUT=runs/demo/output" in ln for ln in lines), lines
    assert not any("t0-3b-ia3-rte" in ln for ln in lines), lines


@pytest.mark.parametrize("config", ["runs/demo", "runs/demo/", "runs/demo/config.py"])
def test_make_runs_accepts_the_folder_or_its_config_file(config):
    (line,) = [ln for ln in _dry_run("runs", f"CONFIG={config}") if "finetune.cli run" in ln]
    assert line.endswith("--out runs/demo/output"), line


def test_make_train_args_reach_both_training_commands():
    lines = _dry_run("demo", "TRAIN_ARGS=--no-progress --log-every 5")
    train = [
        ln for ln in lines if "finetune.cli run " in ln or "finetune.cli counterfactual " in ln
    ]
    assert len(train) == 2, lines
    assert all(ln.endswith(" --no-progress --log-every 5") for ln in train), train
