"""Curriculum-blind baselines against hand computation."""

import numpy as np
import pytest

from simfluence import baselines


def test_constant():
    out = baselines.constant([1.0, 2.0], 3)
    assert out.shape == (4, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1, 2]] * 4)


def test_mean_trajectory_hand_computed():
    # Two fitting runs of different length, two test examples.
    run_a = np.array([[1.0, 2.0], [0.8, 2.2], [0.6, 2.0], [0.5, 1.9]])  # T = 3
    run_b = np.array([[3.0, 1.0], [2.6, 1.0], [2.4, 0.7]])  # T = 2
    delta = baselines.fit_mean_trajectory([run_a, run_b])
    want = np.array(
        [
            [0.0, 0.0],
            [(-0.2 - 0.4) / 2, (0.2 + 0.0) / 2],
            [(-0.4 - 0.6) / 2, (0.0 - 0.3) / 2],
            [-0.5, -0.1],  # only run_a reaches step 3
        ]
    )
    np.testing.assert_allclose(delta, want, rtol=0, atol=1e-6)
    # Held-out run of 5 steps from its own L_0: steps beyond 3 hold the last value.
    pred = baselines.mean_trajectory(delta, [10.0, 20.0], 5)
    assert pred.shape == (6, 2)
    want_pred = np.array([10.0, 20.0]) + want[[0, 1, 2, 3, 3, 3]]
    np.testing.assert_allclose(pred, want_pred, rtol=0, atol=1e-5)
    # A shorter run just takes the first steps.
    np.testing.assert_allclose(baselines.mean_trajectory(delta, [0.0, 0.0], 1), want[:2], atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError):
        baselines.fit_mean_trajectory([])
    with pytest.raises(ValueError, match="n_test"):
        baselines.fit_mean_trajectory([np.zeros((3, 2)), np.zeros((3, 4))])
    with pytest.raises(ValueError, match="test examples"):
        baselines.mean_trajectory(np.zeros((3, 2)), [1.0, 2.0, 3.0], 2)
