"""The CG solver's tolerance is one constant: the solver, its callers and their docstrings."""

import inspect

from simfluence import _solvers, simulators


def test_solver_and_fit_share_one_default_tolerance():
    assert _solvers.DEFAULT_TOL == 1e-7 and _solvers.DEFAULT_MAX_ITER == 1000
    for fn in (_solvers.solve, simulators.fit, simulators._Problem.solve):
        params = inspect.signature(fn).parameters
        assert params["tol"].default == _solvers.DEFAULT_TOL, fn.__qualname__
        assert params["max_iter"].default == _solvers.DEFAULT_MAX_ITER, fn.__qualname__
