"""The README's library examples run as printed (paths pointed at test fixtures)."""

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
