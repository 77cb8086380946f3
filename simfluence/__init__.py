"""Simfluence: training-run simulators for training data attribution.

Guu et al. 2023, "Simfluence: Modeling the Influence of Individual Training Examples by
Simulating Training Runs", https://arxiv.org/abs/2303.08114.

The public surface is re-exported lazily so that `import simfluence.runlog` (the run-log schema,
numpy and json only) stays light: the fine-tuning side imports it without pulling in JAX.

    sim = simfluence.fit(curricula, losses, n_train=100, variant="linear")
    pred = simfluence.simulate(sim, curriculum, initial_losses)   # [steps + 1, n_test]
    scores = simfluence.metrics(pred, true)                       # dict of scalars

TracIn-CP as a simulator: build one with `simfluence.tracin.from_runs(runs)`, roll it out with
`simfluence.simulate_tracin` (`simfluence.fit_scale` gives the rescaled variant's scalar).
Any file `simfluence fit` writes: `simfluence.load_any_simulator(path).rollout(curriculum, l0)`.
"""

import importlib

_EXPORTS = {
    "fit": "simulators",
    "simulate": "simulators",
    "simulate_many": "simulators",
    "select_lambdas": "simulators",
    "removal_influence": "simulators",
    "save_simulator": "simulators",
    "load_simulator": "simulators",
    "batch_mismatch": "simulators",
    "lambda_edges": "simulators",
    "Simulator": "simulators",
    "ConvergenceWarning": "simulators",
    "VARIANTS": "simulators",
    "simulate_tracin": "tracin",
    "fit_scale": "tracin",
    "TracInSimulator": "tracin",
    "load_any_simulator": "loader",
    "AnySimulator": "loader",
    "metrics": "scoring",
    "all_steps_mse": "scoring",
    "final_step_mse": "scoring",
    "final_step_spearman": "scoring",
    "across_run_spearman": "scoring",
    "mean_stderr": "scoring",
    "evaluate": "evaluation",
    "evaluate_unseen": "unseen",
    "FeatSimulator": "featurized",
    "RunLogError": "runlog",
    "Run": "runlog",
    "load_runs": "runlog",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'simfluence' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"simfluence.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
