"""The demo's model and data with a schedule shaped like the paper's: a short warm-up, then decay.

Command (from the repository root; not part of ``make demo``)::

    make runs tracin simulate counterfactual CONFIG=runs/demo-short-warmup

Hardware: a 2-core CPU, no network, no pretrained weights; the whole sequence took 7 min 46 s
there while other jobs shared the cores (115 s of runs, 264 s of counterfactual training; the
figures are in the README).

Why it exists: the demo ramps its learning rate over 20 of its 26 steps, so its last batches
dominate every run, which favours the schedule-aware simulators (`linear-lr` and friends). The
paper's fine-tuning schedules warm up over at most about 10% of the steps. This config keeps
everything of ``runs/demo`` (model, warm-up cache recipe, pool, tracked set, seeds, 32 runs split
20/2/10) except the schedule and length: 40 steps of batch 8, the learning rate ramped over the
first 4 steps (10%) to 1e-3, then decayed linearly towards 0. It shows whether the gains of the
schedule-aware variants hold beyond the demo's long ramp.
"""

import dataclasses
import importlib.util
from pathlib import Path

from finetune.config import ExperimentConfig


def _demo_config() -> ExperimentConfig:
    path = Path(__file__).resolve().parents[1] / "demo" / "config.py"
    spec = importlib.util.spec_from_file_location("_simfluence_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ExperimentConfig:
    return dataclasses.replace(
        _demo_config(),
        name="demo-short-warmup",
        schedule="linear",
        warmup_steps=4,
        steps=40,
        checkpoint_steps=(0, 20),
    )
