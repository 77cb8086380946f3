"""Per-example metric trajectories of a run: the loss, the margin, or one answer choice's loss.

The simulators are metric-agnostic: they fit and roll out any [steps + 1, n_test] trajectory.
This module (not ``simfluence.metrics``: the package re-exports the scoring function
``simfluence.metrics``, which a submodule of that name would shadow) turns a run's logged losses
into the trajectory of the metric asked for:

- ``loss``: ``losses.npy`` (the gold answer's loss), as before;
- ``margin``: the best wrong choice's loss minus the gold choice's, from ``choice_losses.npy``;
  above 0 means rank classification (the lowest-loss choice) is correct;
- ``choice:K``: the loss of answer choice K (0-based), from ``choice_losses.npy``.

`accuracy` gives the 0/1 rank-classification accuracy of the same logs. A simulator file records
the metric it was fitted on (`simfluence fit` stores it in the file's origin; files without one
are ``loss``) and `check_sim_metric` refuses to use it on another.

References:
    Guu et al., "Simfluence", 2023 (Simfluence-Linear "can be used to predict the trajectory of
    any arbitrary metric"). https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float, Int

from simfluence.runlog import Run

__all__ = [
    "DEFAULT_METRIC",
    "METRICS",
    "accuracy",
    "check_metric",
    "check_sim_metric",
    "margin",
    "sim_file_name",
    "sim_metric",
    "trajectory",
    "with_metric",
]

DEFAULT_METRIC = "loss"
METRICS = ("loss", "margin", "choice:K")
_CHOICE = re.compile(r"choice:(\d+)\Z")


class MetricError(ValueError):
    """A bad --metric value, or a metric the runs or a simulator file cannot give."""


def check_metric(metric: str) -> str:
    """Validates a metric name.

    Args:
        metric: ``loss``, ``margin`` or ``choice:K`` (K a non-negative integer).

    Returns:
        The name, normalised (``choice:01`` -> ``choice:1``).

    Raises:
        MetricError: anything else, naming the choices.
    """
    if metric in ("loss", "margin"):
        return metric
    m = _CHOICE.match(str(metric))
    if m is None:
        raise MetricError(
            f"--metric {metric!r}: choose loss, margin or choice:K (K = an answer choice, 0-based)"
        )
    return f"choice:{int(m.group(1))}"


def margin(
    choice_losses: Float[np.ndarray, "... n_test C"], gold: Int[np.ndarray, " n_test"]
) -> Float[np.ndarray, "... n_test"]:
    """The best wrong choice's loss minus the gold choice's (> 0: rank classification is right).

    Args:
        choice_losses: float [..., n_test, C], the loss of every answer choice (C >= 2).
        gold: int [n_test], the gold choice of each example.

    Returns:
        float32 [..., n_test].
    """
    c = np.asarray(choice_losses)
    gold = np.asarray(gold, np.int64)
    idx = np.broadcast_to(gold[:, None], c.shape[:-1] + (1,))
    gold_loss = np.take_along_axis(c, idx, axis=-1)[..., 0]
    is_gold = np.arange(c.shape[-1]) == gold[:, None]  # [n_test, C]
    best_wrong = np.where(is_gold, np.inf, c).min(-1)
    return (best_wrong - gold_loss).astype(np.float32)


def accuracy(
    choice_losses: Float[np.ndarray, "... n_test C"], gold: Int[np.ndarray, " n_test"]
) -> Float[np.ndarray, "... n_test"]:
    """0/1 rank classification: 1 where the lowest-loss choice is the gold one.

    Ties go to the first choice, as ``argmin`` (the trainer's ``accuracy_end``) does.

    Args:
        choice_losses: float [..., n_test, C].
        gold: int [n_test].

    Returns:
        float32 [..., n_test] of 0 and 1.
    """
    c = np.asarray(choice_losses)
    return (c.argmin(-1) == np.asarray(gold)).astype(np.float32)


def trajectory(run: Run, metric: str) -> Float[np.ndarray, "T+1 n_test"]:
    """The metric's trajectory in one run.

    Args:
        run: a loaded run (`simfluence.runlog.load_runs`).
        metric: see `check_metric`.

    Returns:
        float32 [steps + 1, n_test] (``loss``: the run's losses array itself).

    Raises:
        MetricError: the run has no choice_losses.npy for ``margin``/``choice:K``, or K is not
            one of its choices.
    """
    metric = check_metric(metric)
    if metric == "loss":
        return run.losses
    if run.choice_losses is None:
        raise MetricError(
            f"{run.path}: --metric {metric} needs choice_losses.npy (the loss of every answer "
            "choice), which this run lacks; retrain it with this version of `finetune run`, or "
            "use --metric loss"
        )
    if metric == "margin":
        out = margin(run.choice_losses, run.gold)
    else:
        k = int(metric.split(":")[1])
        n_choices = run.choice_losses.shape[-1]
        if k >= n_choices:
            raise MetricError(
                f"--metric {metric}: {run.path} logs {n_choices} answer choices (0.."
                f"{n_choices - 1}); pick one of them"
            )
        out = np.ascontiguousarray(run.choice_losses[..., k])
    out.setflags(write=False)
    return out


def with_metric(runs: Sequence[Run], metric: str) -> list[Run]:
    """The runs with ``losses`` replaced by the metric's trajectory (for the simulators).

    Args:
        runs: loaded runs.
        metric: see `check_metric`.

    Returns:
        New `Run` objects (the same runs for ``loss``).

    Raises:
        MetricError: see `trajectory`.
    """
    if check_metric(metric) == "loss":
        return list(runs)
    return [dataclasses.replace(r, losses=trajectory(r, metric)) for r in runs]


def sim_metric(origin: dict | None) -> str:
    """The metric a simulator file was fitted on (its origin's ``metric``; none: ``loss``).

    Args:
        origin: the file's origin (`simfluence.simulators.read_origin`), or None.

    Returns:
        The metric name.
    """
    return str((origin or {}).get("metric", DEFAULT_METRIC))


def check_sim_metric(path, origin: dict | None, metric: str) -> None:
    """Refuses a simulator fitted on another metric than the one asked for.

    Args:
        path: the simulator file, for the message.
        origin: its origin (`simfluence.simulators.read_origin`).
        metric: the metric of this command.

    Raises:
        MetricError: the metrics differ (one line, naming both and the fix).
    """
    fitted = sim_metric(origin)
    if fitted != metric:
        raise MetricError(
            f"{path}: simulator fitted on --metric {fitted}, used with --metric {metric}; pass "
            f"--metric {fitted} or refit it with `simfluence fit ... --metric {metric}`"
        )


def sim_file_name(variant: str, metric: str = DEFAULT_METRIC) -> str:
    """The file `make simulate` saves a simulator to.

    Args:
        variant: the simulator variant.
        metric: its metric.

    Returns:
        ``sim_<variant>.npz`` for the loss, ``sim_<variant>_margin.npz`` for the margin,
        ``sim_<variant>_choiceK.npz`` for choice:K.
    """
    tag = "" if metric == "loss" else "_" + check_metric(metric).replace(":", "")
    return f"sim_{variant}{tag}.npz"


def check_runs_have(runs: Sequence[Run], metric: str) -> None:
    """Raises `MetricError` (as `trajectory`) unless every run gives the metric."""
    for r in runs:
        trajectory(r, metric)
