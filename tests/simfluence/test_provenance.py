"""Provenance records: what they hold, that they never fail, where they are written and read,
and that identity checks (experiment hash, counterfactual simulator hashes) leave them out."""

import hashlib
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jax
import numpy as np

from simfluence import counterfactual as cf
from simfluence import runlog, simulators, table, tracin
from simfluence.evaluation import evaluate

ROOT = Path(runlog.__file__).resolve().parents[1]  # the checkout the package runs from


def _git(*args):
    if shutil.which("git") is None:
        return None
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def test_provenance_fields_match_independent_sources():
    prov = runlog.provenance(["simfluence", "evaluate", "EXP"])
    assert prov["argv"] == ["simfluence", "evaluate", "EXP"]
    assert runlog.provenance()["argv"] == sys.argv
    commit = _git("rev-parse", "HEAD")
    top = _git("rev-parse", "--show-toplevel")
    if commit is None or Path(top).resolve() != ROOT:
        assert prov["git_commit"] is None and prov["git_dirty"] is None
    else:
        assert prov["git_commit"] == commit
        assert prov["git_dirty"] == bool(_git("status", "--porcelain", "--untracked-files=no"))
    for name in runlog.PROVENANCE_PACKAGES:
        try:
            want = metadata.version(name)
        except metadata.PackageNotFoundError:
            want = None
        assert prov["packages"][name] == want, name
    devices = jax.devices()  # jax is imported here, so the record has the devices
    assert prov["device"]["kind"] == devices[0].device_kind
    assert prov["device"]["count"] == len(devices) and prov["device"]["platform"] == "cpu"
    json.dumps(prov, allow_nan=False)  # JSON as it is


def test_provenance_never_fails(tmp_path, monkeypatch):
    assert runlog._git_state(tmp_path) == (None, None)  # not a checkout
    assert runlog._git_state(ROOT / "simfluence") == (None, None)  # inside one, not its top
    monkeypatch.setattr(runlog, "PROVENANCE_PACKAGES", ("numpy", "no-such-distribution-h3"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    prov = runlog.provenance()
    assert prov["git_commit"] is None and prov["git_dirty"] is None
    assert prov["packages"] == {"numpy": np.__version__, "no-such-distribution-h3": None}


def test_provenance_never_imports_jax():
    code = (
        "import sys; from simfluence import runlog; p = runlog.provenance(); "
        "print(p['device'] is None, 'jax' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.split() == ["True", "False"], out


def test_experiment_sha256_leaves_provenance_out(tmp_path):
    runlog.write_experiment(tmp_path, {"n_train": 3, "n_test": 2, "task": "x"})
    before = runlog.experiment_sha256(tmp_path)
    info = runlog.read_experiment(tmp_path)
    runlog.write_experiment(tmp_path, {**info, "provenance": runlog.provenance()})
    assert runlog.experiment_sha256(tmp_path) == before
    runlog.write_experiment(tmp_path, {**info, "n_train": 4, "provenance": {"argv": []}})
    assert runlog.experiment_sha256(tmp_path) != before


def _sim(a=0.5):
    rng = np.random.default_rng(0)
    A = np.full((2, 3), a, np.float32)
    return simulators.Simulator(
        A, rng.normal(size=(2, 3)).astype(np.float32), "linear", 1.0, 1.0, 0.5
    )


def test_simulator_files_record_provenance_and_older_files_still_load(tmp_path):
    sim = _sim()
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    simulators.save_simulator(one, sim, provenance={"argv": ["a"], "time_utc": "1"})
    simulators.save_simulator(two, sim, provenance={"argv": ["b"], "time_utc": "2"})
    assert simulators.read_provenance(one) == {"argv": ["a"], "time_utc": "1"}
    assert one.read_bytes() != two.read_bytes()
    # The same simulator from another command line or time: the same for counterfactual checks.
    assert cf._simulator_sha256(one) == cf._simulator_sha256(two)
    simulators.save_simulator(two, _sim(0.25), provenance={"argv": ["a"], "time_utc": "1"})
    assert cf._simulator_sha256(one) != cf._simulator_sha256(two)
    default = tmp_path / "default.npz"
    simulators.save_simulator(default, sim)  # this process's provenance
    assert simulators.read_provenance(default)["argv"] == sys.argv
    np.testing.assert_array_equal(simulators.load_simulator(default).A, sim.A)
    # A file written before provenance was recorded: loads, records none, hashes as its bytes.
    old = tmp_path / "old.npz"
    with np.load(one) as z:
        np.savez(old, **{k: z[k] for k in z.files if k != "provenance"})
    assert simulators.read_provenance(old) is None
    np.testing.assert_array_equal(simulators.load_simulator(old).B, sim.B)
    assert cf._simulator_sha256(old) == hashlib.sha256(old.read_bytes()).hexdigest()


def test_tracin_simulator_files_record_provenance(tmp_path):
    sim = tracin.TracInSimulator(
        steps=np.array([0, 2], np.int32),
        learning_rates=np.array([0.1, 0.1], np.float32),
        dots=np.ones((2, 2, 3), np.float32),
        scale=2.0,
        variant="tracin-cp-rescaled",
        source_runs=(0, 1),
    )
    path = tmp_path / "t.npz"
    tracin.save_tracin_simulator(path, sim, origin={"fit_runs": [0, 1]})
    assert simulators.read_provenance(path)["argv"] == sys.argv
    assert simulators.read_origin(path) == {"fit_runs": [0, 1]}
    assert tracin.load_tracin_simulator(path).scale == 2.0


def test_results_and_tables_say_which_machine_made_them(flat_validation_exp, tmp_path):
    res = evaluate(flat_validation_exp, split=(3, 1, 2), variants=["constant"])
    prov = res["provenance"]
    assert prov["device"]["kind"] == jax.devices()[0].device_kind
    assert prov["device"]["count"] == jax.device_count()
    machine = runlog.describe_machine(prov)
    assert machine.startswith(f"{jax.devices()[0].device_kind} x{jax.device_count()}")
    assert f"jax {jax.__version__}" in machine
    with_runs = json.loads(json.dumps(res))  # runs prepared by another machine
    with_runs["experiment"]["info"]["provenance"] = {
        **prov,
        "device": {"kind": "NVIDIA H200", "count": 1},
    }
    old = json.loads(json.dumps(res))  # written before provenance was recorded
    del old["provenance"]
    paths = []
    for name, r in (("new", res), ("gpu", with_runs), ("old", old)):
        r["experiment"]["name"] = name
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(r))
    want = [
        f"machine: evaluated on {machine}",
        f"machine: evaluated on {machine}; runs prepared on NVIDIA H200 x1",
        "machine: not recorded (results of an older version)",
    ]
    assert table.format_results(res).splitlines()[1] == want[0]
    md, js = table.write_table(paths, tmp_path / "t.md")
    lines = md.read_text().splitlines()
    for label, line in zip(("new", "gpu", "old"), want, strict=True):
        assert lines[lines.index(f"### {label}") + 2].startswith(line), label
    assert json.loads(js.read_text())["machines"]["gpu"].startswith(want[1])
    csv_path, _ = table.write_table(paths, tmp_path / "t.csv")
    import csv

    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["experiment"]: r["machine"] for r in rows} == {
        "new": want[0].removeprefix("machine: "),
        "gpu": json.loads(js.read_text())["machines"]["gpu"].removeprefix("machine: "),
        "old": want[2].removeprefix("machine: "),
    }
    tex, _ = table.write_table(paths, tmp_path / "t.tex")
    assert f"% new: {want[0]}" in tex.read_text()
