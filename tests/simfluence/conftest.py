"""Shared fixtures of the simfluence tests."""

import numpy as np
import pytest

from simfluence import runlog


@pytest.fixture(scope="session")
def flat_validation_exp(tmp_path_factory):
    """An experiment whose lambda search must run into the upper cap.

    Runs 0-2 (fitting) and 4-5 (held out) are pure noise around a constant loss; run 3
    (validation) never moves. Whatever a simulator learns from the noise hurts on run 3, so its
    validation MSE keeps falling as the ridge grows. n_train=6, n_test=3, batch 2, 30 steps.
    """
    exp = tmp_path_factory.mktemp("flat") / "exp"
    rng = np.random.default_rng(0)
    runlog.write_experiment(exp, {"n_train": 6, "n_test": 3, "name": "flat-validation"})
    for index in range(6):
        cur = rng.integers(0, 6, (30, 2)).astype(np.int32)
        loss = np.repeat(rng.uniform(1.5, 3.0, (1, 3)), 31, axis=0)
        if index != 3:
            loss[1:] += np.cumsum(rng.normal(0.0, 0.01, (30, 3)), axis=0)
        runlog.write_run(runlog.run_dir(exp, index), cur, loss.astype(np.float32))
    return exp
