"""The Makefile's install level per target, `make help`'s variables, and SPLIT's default.

Dry runs only (`make -n`): nothing is installed or executed.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Variables documented on their target's own help line (tpu-submit, aot-report).
TARGET_SPECIFIC = {"TPU_TARGET", "ACCELERATOR", "TPU_VERSION", "AOT_VENV", "AOT_ARGS"}


def _run_make(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Variables exported in the caller's shell would reach make; each test sets its own.
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "OUT", "SPLIT", "MAKEFLAGS")}
    cmd = ["make", "--no-print-directory", "-C", str(REPO), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def _make(*args: str) -> list[str]:
    return _run_make(*args).stdout.replace("\\\n", " ").splitlines()


def _pip_lines(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "pip install" in ln and "--upgrade pip" not in ln]


@pytest.mark.parametrize("target", ["simulate", "figures", "table"])
def test_simulator_targets_install_only_the_simulator_half(tmp_path, target):
    venv = tmp_path / "venv"  # no stamp there: make would install
    lines = _make("-n", target, f"VENV={venv}", "TABLE_INPUTS=results.json")
    (pip,) = _pip_lines(lines)
    assert pip.endswith("pip install -q -e ."), pip
    assert not any("finetune" in ln for ln in lines), lines  # no extra, no finetune command
    assert any("-m simfluence.cli " in ln for ln in lines), lines
    # The full install's stamp counts as the simulator's: nothing more to install.
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()
    assert _pip_lines(_make("-n", target, f"VENV={venv}", "TABLE_INPUTS=results.json")) == []


@pytest.mark.parametrize("target", ["runs", "tracin", "counterfactual"])
def test_model_targets_install_the_whole_stack(tmp_path, target):
    (pip,) = _pip_lines(_make("-n", target, f"VENV={tmp_path / 'venv'}"))
    assert pip.endswith('pip install -q -e ".[finetune,test]"'), pip


def test_help_lists_every_variable_with_its_current_value():
    text = (REPO / "Makefile").read_text()
    variables = set(re.findall(r"^([A-Z_]+) \?=", text, re.M)) - TARGET_SPECIFIC
    assert {"CONFIG", "OUT", "SPLIT", "PLOT_RUN", "TESTS", "PYTHON"} <= variables
    default = {ln.split()[0]: ln for ln in _make("help") if ln.startswith("  ")}
    given = {ln.split()[0]: ln for ln in _make("help", *(f"{v}=x{v}" for v in variables))}
    for name in sorted(variables):
        assert name in default, f"make help does not list {name}"
        assert given[name].endswith(f"[x{name}]"), given[name]
    assert default["PLOT_RUN"].endswith("[22]") and default["SPLIT"].endswith("[]")
    assert "install-sim" in default


def _command(lines: list[str], word: str) -> str:
    """Every printed recipe line that runs ``word`` (simulate runs evaluate twice)."""
    found = [ln for ln in lines if word in ln]
    assert found, f"no {word!r} in {lines}"
    return "\n".join(found)


@pytest.mark.parametrize(
    ("target", "word"),
    [("simulate", "simfluence.cli evaluate"), ("counterfactual", "counterfactual propose")],
)
def test_split_is_passed_only_when_set(target, word):
    base = ("-n", target, "INSTALL_DEP=", "PYTHON=python")
    assert "--split" not in _command(_make(*base), word)
    assert "--split" not in _command(_make(*base, "SPLIT="), word)
    assert " --split 5,1,2 " in _command(_make(*base, "SPLIT=5,1,2"), word)


def test_figures_draws_the_extra_simulators_whose_files_exist(tmp_path):
    """FIGURE_EXTRA_SIMS (spaces or commas): present files join --sim, missing ones are named."""
    for v in ("linear", "a", "b"):
        (tmp_path / f"sim_{v}.npz").write_bytes(b"")
    proc = _run_make(
        "figures",
        f"OUT={tmp_path}",
        "INSTALL_SIM_DEP=",
        "SIMFLUENCE=echo",
        "FIGURE_EXTRA_SIMS=a,missing b",
    )
    sims = proc.stdout.split("--sim ")[-1].split()[0]
    assert sims == ",".join(str(tmp_path / f"sim_{v}.npz") for v in ("linear", "a", "b"))
    assert (
        f"skipped FIGURE_EXTRA_SIMS variant missing: no {tmp_path}/sim_missing.npz" in proc.stderr
    )
