"""One loader for every simulator file `simfluence fit` writes, behind one interface.

`simfluence fit` writes three kinds of .npz file: a Simfluence simulator (`simulators.Simulator`:
linear, additive, multiplicative and the schedule-aware -lr variants), a TracIn-CP simulator
(`tracin.TracInSimulator`: tracin-cp, tracin-cp-rescaled) and a curriculum-blind baseline
(`baselines.BaselineSimulator`: constant, mean-trajectory). `load_any_simulator` tells them apart
by their keys and returns an `AnySimulator`, whose `rollout` and `removal_influence` dispatch
to the family's own functions, so `simulate`, `influence`, `plot` and `figures` hold no
dispatch of their own.

Learning rates: the schedule-aware variants need the curriculum's rates (`lr`, a run's lr.npy);
TracIn-CP uses them when given (as `simfluence evaluate` does with each run's lr.npy) and the
checkpoints' recorded rates otherwise; the other variants ignore them.

The baselines ignore the curriculum, so the removal influence of every training example on them
is exactly 0; `removal_influence` refuses them with that reason instead of listing zeros.

References:
    Guu et al., "Simfluence", 2023. https://arxiv.org/abs/2303.08114
    Pruthi et al., "TracIn", 2020. https://arxiv.org/abs/2002.08484
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import ArrayLike, Float, Int

from simfluence import baselines, scheduled, simulators, tracin
from simfluence.runlog import Run

__all__ = ["AnySimulator", "load_any_simulator", "FITTED", "VALIDATION", "HELD_OUT"]

# The role of a run for a simulator (from the file's recorded origin).
FITTED, VALIDATION, HELD_OUT = "fitted", "validation", "held out"


@dataclass(frozen=True)
class AnySimulator:
    """A loaded simulator file of any family.

    Attributes:
        sim: the `simulators.Simulator`, `tracin.TracInSimulator` or
            `baselines.BaselineSimulator`.
        path: the file it was read from (None when built in memory).
        origin: the file's recorded origin ({"experiment_sha256", "fit_runs", "valid_runs",
            ...}) or None.
    """

    sim: simulators.Simulator | tracin.TracInSimulator | baselines.BaselineSimulator
    path: Path | None = None
    origin: dict | None = None

    @property
    def kind(self) -> str:
        """ "simfluence", "tracin" or "baseline"."""
        if isinstance(self.sim, tracin.TracInSimulator):
            return "tracin"
        if isinstance(self.sim, baselines.BaselineSimulator):
            return "baseline"
        return "simfluence"

    @property
    def variant(self) -> str:
        """The variant name (as `simfluence evaluate` names it)."""
        return self.sim.variant

    @property
    def n_test(self) -> int:
        """Number of tracked test examples."""
        return int(self.sim.dots.shape[1]) if self.kind == "tracin" else self.sim.n_test

    @property
    def n_train(self) -> int:
        """Size of the training pool."""
        return int(self.sim.dots.shape[2]) if self.kind == "tracin" else self.sim.n_train

    @property
    def lr_use(self) -> str:
        """ "required" (schedule-aware), "optional" (TracIn-CP) or "ignored" (the others)."""
        if self.variant in scheduled.SCHEDULED_VARIANTS:
            return "required"
        return "optional" if self.kind == "tracin" else "ignored"

    @property
    def name(self) -> str:
        """The file name, or the variant for a simulator built in memory."""
        return str(self.path) if self.path is not None else self.variant

    def batch_mismatch(self, batch: int) -> str | None:
        """Why curricula of `batch` examples a step cannot be simulated (None: they can)."""
        if self.kind != "simfluence":  # TracIn-CP divides by the curriculum's own batch
            return None
        return simulators.batch_mismatch(self.sim, batch)

    def run_lr(self, run: Run, fix: str) -> Float[np.ndarray, " T"] | None:
        """The learning rates a logged run is simulated with, as `simfluence evaluate` does.

        Args:
            run: a loaded run.
            fix: what to do instead, ending the message when a needed lr.npy is missing.

        Returns:
            The run's lr.npy for the schedule-aware variants (required) and for TracIn-CP (None
            when the run has none: the checkpoints' rates are used); None for the others.

        Raises:
            ValueError: a schedule-aware simulator and the run has no lr.npy.
        """
        if self.kind == "tracin":
            return run.lr
        return scheduled.run_lr(self.variant, run, fix)

    def role(self, run_index: int) -> str | None:
        """FITTED, VALIDATION or HELD_OUT for a run of the experiment; None without an origin."""
        if self.origin is None:
            return None
        if run_index in self.origin.get("fit_runs", []):
            return FITTED
        if run_index in self.origin.get("valid_runs", []):
            return VALIDATION
        return HELD_OUT

    def rollout(
        self,
        curriculum: Int[ArrayLike, "T b"],
        initial_losses: Float[ArrayLike, " n_test"],
        lr: Float[ArrayLike, " T"] | None = None,
    ) -> Float[np.ndarray, "T+1 n_test"]:
        """Simulated losses along a curriculum from observed initial losses.

        Args:
            curriculum: int [T, b] training-pool positions.
            initial_losses: float [n_test] observed L_0.
            lr: float [T] learning rates (see `lr_use`).

        Returns:
            float32 [T + 1, n_test]; row 0 is `initial_losses`.

        Raises:
            ValueError: bad inputs (as the family's own simulate function), or `lr` missing
                for a schedule-aware simulator.
        """
        if self.kind == "tracin":
            return tracin.simulate_tracin(self.sim, curriculum, initial_losses, lr)
        if self.kind == "baseline":
            cur = self._check_curriculum(curriculum)
            l0 = np.asarray(initial_losses, np.float32)
            if l0.shape != (self.n_test,):
                raise ValueError(f"initial_losses must be [{self.n_test}], got {l0.shape}")
            return baselines.rollout_baseline(self.sim, l0, cur.shape[0])
        use_lr = lr if self.variant in scheduled.SCHEDULED_VARIANTS else None
        return np.asarray(simulators.simulate(self.sim, curriculum, initial_losses, lr=use_lr))

    def removal_influence(
        self,
        curriculum: Int[ArrayLike, "T b"],
        initial_losses: Float[ArrayLike, " n_test"],
        lr: Float[ArrayLike, " T"] | None = None,
        test_index: int | None = None,
    ) -> Float[np.ndarray, "n_test n_train"] | Float[np.ndarray, " n_train"]:
        """Change of the simulated final loss when each training example is removed.

        Args:
            curriculum: int [T, b].
            initial_losses: float [n_test] observed L_0.
            lr: float [T] learning rates (see `lr_use`).
            test_index: one test example (returns [n_train]); None: all (returns
                [n_test, n_train], row j equal to the single-example result for j).

        Returns:
            float32 [n_train] or [n_test, n_train]: final loss without example i minus with all.

        Raises:
            ValueError: a baseline (it ignores the curriculum: every influence is 0), or bad
                inputs.
        """
        self.require_influence()
        if self.kind == "tracin":
            full = tracin.removal_influence(self.sim, curriculum, lr)
            return full if test_index is None else full[test_index]
        use_lr = lr if self.variant in scheduled.SCHEDULED_VARIANTS else None
        tests = range(self.n_test) if test_index is None else [test_index]
        # One jitted removal scan per test example (compiled once: the shapes do not change).
        rows = [
            np.asarray(
                simulators.removal_influence(self.sim, curriculum, initial_losses, j, lr=use_lr),
                np.float32,
            )
            for j in tests
        ]
        return rows[0] if test_index is not None else np.stack(rows)

    def require_influence(self) -> None:
        """Refuses a baseline for removal influences, with the reason.

        Raises:
            ValueError: a baseline (it ignores the curriculum: every influence is exactly 0).
        """
        if self.kind == "baseline":
            raise ValueError(
                f"{self.name}: the {self.variant} baseline ignores the curriculum, so removing a "
                "training example changes nothing (every influence is 0); use a Simfluence or "
                "TracIn-CP simulator"
            )

    def parameters(self) -> tuple[np.ndarray, np.ndarray, float] | None:
        """(A f32 [n_test, n_train], B f32 [n_test, n_train], a_prior) of a Simfluence
        simulator; None for TracIn-CP and the baselines, which have no A and B."""
        if self.kind != "simfluence":
            return None
        return np.asarray(self.sim.A), np.asarray(self.sim.B), float(self.sim.a_prior)

    def _check_curriculum(self, curriculum) -> np.ndarray:
        cur = np.asarray(curriculum)
        if cur.ndim != 2 or 0 in cur.shape or not np.issubdtype(cur.dtype, np.integer):
            raise ValueError(f"curriculum must be int [steps, batch], got {cur.dtype} {cur.shape}")
        if cur.min() < 0 or cur.max() >= self.n_train:
            raise ValueError(f"curriculum ids must lie in 0..{self.n_train - 1}")
        return cur


def load_any_simulator(path: str | os.PathLike) -> AnySimulator:
    """Reads any simulator file `simfluence fit` writes.

    Args:
        path: the .npz file (Simfluence, TracIn-CP or baseline).

    Returns:
        An `AnySimulator` with the file's origin.

    Raises:
        ValueError: missing, unreadable or malformed file, naming it (the family's loader's
            message).
    """
    path = Path(path)
    keys: list[str] = []
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files) if isinstance(z, np.lib.npyio.NpzFile) else []
    except Exception:  # simulators.load_simulator names the problem
        keys = []
    if "dots" in keys:
        sim = tracin.load_tracin_simulator(path)
    elif "delta" in keys:
        sim = baselines.load_baseline(path)
    else:
        sim = simulators.load_simulator(path)
    return AnySimulator(sim=sim, path=path, origin=simulators.read_origin(path))
