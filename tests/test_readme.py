"""The README's library examples run as printed (paths pointed at test fixtures)."""

import json
import re
from pathlib import Path

import jax
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

SECTION = "## Using the library from your own JAX code"


def _blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index(SECTION) : text.index("\n## ", text.index(SECTION) + 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "expected the simulator example and the model example"
    return blocks


def test_simulator_example_runs_on_a_demo_data_experiment(tmp_path):
    from simfluence.demo_data import make_demo_experiment

    exp = make_demo_experiment(tmp_path / "exp", n_runs=32, n_train=100, n_test=6, steps=40)
    code = _blocks()[0]
    assert '"runs/demo/output"' in code
    scope: dict = {}
    exec(code.replace('"runs/demo/output"', repr(str(exp))), scope)
    assert scope["pred"].shape == (41, 6)
    assert scope["preds"].shape == (10, 41, 6)
    np.testing.assert_allclose(scope["preds"][3], scope["pred"], rtol=1e-6, atol=1e-7)
    assert set(scope["scores"]) >= {"all_steps_mse", "final_step_spearman"}


def test_model_example_runs_on_the_tiny_checkpoint(tiny_t5_dir):
    code = _blocks()[1]
    assert '"../shared/models/tiny-random-t5"' in code
    scope: dict = {}
    exec(code.replace('"../shared/models/tiny-random-t5"', repr(str(tiny_t5_dir))), scope)
    assert scope["losses"].shape == (2,)
    leaves = jax.tree.leaves(scope["grads"])
    assert leaves and all(leaf.shape[0] == 2 for leaf in leaves)


def _section_blocks(title: str) -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(f"\n{title}\n")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


BYO = "## Bring your own runs"


def test_bring_your_own_runs_recipe_runs_loads_and_fits(tmp_path, capsys):
    from simfluence import runlog
    from simfluence.cli import main

    code = _section_blocks(BYO)[0]
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 15
    assert '"my_exp"' in code
    # "Your own code": SGD on a least-squares model; the tracked losses are 10 test examples'.
    rng = np.random.default_rng(0)
    x_pool, x_test, w_true = rng.normal(size=(50, 5)), rng.normal(size=(10, 5)), rng.normal(size=5)
    y_pool, y_test = x_pool @ w_true, x_test @ w_true

    def init_model():
        return {"w": np.zeros(5), "t": 0}

    def tracked_losses(model):
        return (x_test @ model["w"] - y_test) ** 2

    def train_step(model, ids):
        model["t"] += 1
        lr = 0.05 * min(1.0, model["t"] / 10)  # a warm-up, so lr.npy is not constant
        err = x_pool[ids] @ model["w"] - y_pool[ids]
        model["w"] = model["w"] - lr * 2 * x_pool[ids].T @ err / len(ids)
        return lr

    exp = tmp_path / "my_exp"
    scope = dict(init_model=init_model, tracked_losses=tracked_losses, train_step=train_step)
    exec(code.replace('"my_exp"', repr(str(exp))), scope)

    runs = runlog.load_runs(exp)
    assert [r.index for r in runs] == list(range(10))
    for r in runs:
        cur = np.random.default_rng(r.index).integers(0, 50, (30, 4))
        np.testing.assert_array_equal(r.curriculum, cur)
        model, rows = init_model(), [tracked_losses(init_model())]
        for ids in cur:
            train_step(model, ids)
            rows.append(tracked_losses(model))
        np.testing.assert_allclose(r.losses, np.array(rows, np.float32), rtol=1e-6)
        np.testing.assert_allclose(r.lr, 0.05 * np.minimum(1.0, np.arange(1, 31) / 10), rtol=1e-6)

    assert main(["fit", str(exp), "--runs", "0-5", "--out", str(tmp_path / "sim.npz")]) == 0
    out = tmp_path / "results.json"
    assert main(["evaluate", str(exp), "--variants", "constant", "--out", str(out)]) == 0
    capsys.readouterr()
    results = json.loads(out.read_text())
    assert results["split"] == {"fit": [0, 1, 2, 3, 4, 5], "valid": [6], "test": [7, 8, 9]}
    assert results["split_source"] == "experiment.json split"


def test_top_level_sections_come_in_the_user_order():
    text = (REPO_ROOT / "README.md").read_text()
    titles = re.findall(r"(?m)^## (.*)$", text)
    order = [
        "Set-up",
        "Quick start without a model",
        "The pipeline",
        "Using the library",
        "Bring your own runs",
    ]
    idx = [next(i for i, t in enumerate(titles) if t.startswith(o)) for o in order]
    assert idx == sorted(idx), titles


QUICK = "## Quick start without a model"


def test_quick_start_commands_run_as_printed(tmp_path, monkeypatch, capsys):
    import shlex
    import subprocess
    import sys

    from simfluence.cli import main

    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(f"\n{QUICK}\n")
    section = text[start : text.index("\n## ", start + 1)]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for line in block.splitlines():
        cmd = line.split("  #")[0].strip()
        if cmd.startswith("simfluence "):
            assert main(shlex.split(cmd)[1:]) == 0, cmd
        else:
            subprocess.run([sys.executable, *shlex.split(cmd)[1:]], check=True)
        if cmd.startswith("simfluence evaluate"):
            assert "| linear |" in capsys.readouterr().out
        if cmd.startswith("simfluence influence"):
            assert "opponents" in capsys.readouterr().out
    assert len(list(tmp_path.glob("exp/run_*"))) == 32
    for f in ["exp/experiment.json", "exp/results.json", "sim.npz", "figs/trajectories.png"]:
        assert (tmp_path / f).exists(), f
    assert (tmp_path / "figs/influence.txt").exists()


def test_implementation_notes_live_in_docs_and_links_resolve():
    readme = (REPO_ROOT / "README.md").read_text()
    impl = (REPO_ROOT / "docs" / "implementation.md").read_text()
    for phrase in ["counter-based hash", "dynamic\n  program", "batching rule"]:
        assert phrase not in readme, phrase
    for phrase in ["counter-based hash", "dynamic", "batching rule"]:
        assert phrase in impl, phrase
    for path, anchor in re.findall(r"\((docs/[\w.-]+\.md)(?:#([\w-]+))?\)", readme):
        doc = REPO_ROOT / path
        assert doc.exists(), path
        if anchor:
            heads = re.findall(r"(?m)^#+ (.*)$", doc.read_text())
            slugs = {re.sub(r"[^\w -]", "", h).strip().lower().replace(" ", "-") for h in heads}
            assert anchor in slugs, (path, anchor)
