"""`simfluence` installs and runs without the model stack; `finetune` says what is missing.

pyproject.toml keeps flax, optax, orbax, transformers, datasets, safetensors and sentencepiece in
the `finetune` extra. Each check runs in a fresh interpreter whose import system refuses those
packages (and torch and `finetune`), as on a machine that ran `pip install -e .` only.
"""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_STACK = ("flax", "optax", "orbax", "transformers", "datasets", "safetensors", "sentencepiece")
BLOCKED = (*MODEL_STACK, "torch", "finetune")

# Prepended to each child program: a meta-path finder that refuses the blocked packages.
_BLOCKER = f"""
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None
sys.meta_path.insert(0, _Refuse())
"""


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER + code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )


def test_base_dependencies_leave_out_the_model_stack():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(meta["dependencies"])
    extra = " ".join(meta["optional-dependencies"]["finetune"])
    for name in MODEL_STACK:
        pkg = "orbax-checkpoint" if name == "orbax" else name
        assert pkg not in base, f"{pkg} is a base dependency; it belongs in the finetune extra"
        assert pkg in extra, f"{pkg} is missing from the finetune extra"


def test_simfluence_cli_runs_without_the_model_stack(tmp_path):
    code = """
from simfluence.cli import main
sizes = ["--runs", "8", "--n-train", "12", "--n-test", "5", "--batch", "2", "--steps", "20"]
assert main(["demo-data", "exp", *sizes, "--tracin"]) == 0
assert main(["evaluate", "exp", "--split", "5,1,2", "--out", "results.json"]) == 0
assert main(["fit", "exp", "--runs", "0-4", "--out", "sim.npz"]) == 0
assert main(["figures", "exp", "--sim", "sim.npz", "--runs", "7", "--out", "figs"]) == 0
loaded = sorted(m.split(".")[0] for m in sys.modules)
print("LOADED", " ".join(sorted(set(loaded))))
"""
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(next(ln for ln in out.stdout.splitlines() if ln.startswith("LOADED")).split())
    assert not loaded & set(BLOCKED), loaded & set(BLOCKED)
    assert (tmp_path / "results.json").is_file()
    assert (tmp_path / "figs" / "trajectories.png").is_file()


def test_finetune_cli_names_the_missing_extra(tmp_path):
    # finetune/cli.py loads as a plain module: the blocker also refuses the `finetune` package
    # (to prove simfluence never needs it), and the CLI's check must work without flax etc.
    cli = ROOT / "finetune" / "cli.py"
    code = f"""
import importlib.util
spec = importlib.util.spec_from_file_location("ftcli", {str(cli)!r})
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
raise SystemExit(m.main(["run", "runs/demo"]))
"""
    out = _run(code, tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: finetune needs the model stack, missing flax, optax"), lines
    assert '".[finetune]"' in lines[0]
    assert list(tmp_path.iterdir()) == []
    # --help still works there: the parser needs none of the extra.
    helped = _run(code.replace('["run", "runs/demo"]', '["run", "--help"]'), tmp_path)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "usage: finetune run" in helped.stdout


def test_integrations_import_without_torch_or_transformers(tmp_path):
    code = """
import simfluence, simfluence.integrations
import simfluence.integrations.hf as hf
assert callable(hf.mean_token_loss) and hf.CurriculumDataset([10, 11], [[1, 0]])[0] == 11
try:
    hf.SimfluenceCallback
except ImportError as exc:
    print("ERROR", exc)
print("LOADED", " ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    loaded = set(next(ln for ln in lines if ln.startswith("LOADED")).split())
    assert not loaded & set(BLOCKED), loaded & set(BLOCKED)
    error = next(ln for ln in lines if ln.startswith("ERROR"))
    assert "needs transformers and torch" in error and '".[hf]"' in error, error
