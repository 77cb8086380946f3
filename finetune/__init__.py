"""T5 and T0 in Flax (full or IA3 tuning) and the fine-tuning runs Simfluence learns from.

Layers, never mixed (t5x style): the network (`finetune.network`), model functions
(`finetune.model`: per-example losses, choice scoring, per-example gradients), pure steps
(`finetune.steps`) and the loop (`finetune.trainer`, its data side in `finetune.data`).
TracIn-CP (`finetune.tracin`) reuses the model functions, never the loop. The run log is written
through `simfluence.runlog`, the only piece of `simfluence` imported here.

Re-exports are lazy so that `finetune --help` starts without importing JAX.
"""

import importlib

_EXPORTS = {
    "T5": "network",
    "load_pretrained": "hf",
    "save_pretrained_safetensors": "hf",
    "init_random": "hf",
    "load_tokenizer": "tokenization",
    "check_vocab": "tokenization",
    "trainable_mask": "model",
    "partition": "model",
    "combine": "model",
    "make_per_example_loss": "model",
    "make_score_choices": "model",
    "per_example_grads": "model",
    "make_optimizer": "steps",
    "make_train_step": "steps",
    "ExperimentConfig": "config",
    "load_experiment": "experiment",
    "load_experiment_config": "config",
    "apply_overrides": "config",
    "paper_config": "config",
    "run_experiment": "trainer",
    "run_counterfactuals": "counterfactual",
    "compute_dots": "tracin",
    "run_tracin": "tracin",
    "projected_gradients": "tracin",
    "compute_features": "features",
    "estimate_memory": "tracin",
    "check_config_memory": "tracin",
}

__all__ = sorted(_EXPORTS)
_SUBMODULES = {*_EXPORTS.values(), "cli", "curricula", "data", "distributed", "tasks", "trainer"}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        if name in _SUBMODULES:  # `finetune.hf.load_pretrained` after a bare `import finetune`
            return importlib.import_module(f"finetune.{name}")
        raise AttributeError(f"module 'finetune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"finetune.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
