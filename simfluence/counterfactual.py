"""The counterfactual check: train the curricula a simulator proposes and score every prediction.

`evaluate` scores simulators on held-out runs drawn like the fitting runs. Training data
attribution is judged by retraining, so this module closes the loop on the "what if" questions
the simulators answer:

1. `propose` (``simfluence counterfactual propose EXP``): from a fitted simulator (the
   *proposer*) and a base run (held-out runs by default), one curriculum per (target test
   example, kind) pair, written to ``EXP/counterfactual/proposals.{json,npz}`` through
   `simfluence.runlog.write_proposals`. Kinds:

   - ``remove-top``: the k pool examples whose removal the proposer predicts raises the
     target's final loss the most (its most helpful ones, by `simulators.removal_influence`);
   - ``remove-bottom``: the k whose removal it predicts lowers that loss the most;
   - ``remove-random``: k random examples of the base curriculum (the control);
   - ``reorder``: the base run's batches in a random other order (same multiset of batches);
   - ``optimize``: a greedy curriculum over the proposer (`optimize_curriculum`);
   - ``flip``: the smallest top-k removal, k in `FLIP_KS`, that the proposer fitted on the
     margin predicts flips the target's prediction (`flip_search`);
   - ``flip-random``: k random examples of the base curriculum, k that of the target's
     ``flip`` proposal (its control).
   - ``swap-in``: k random examples of the base curriculum each replaced, in every slot, by a
     distinct held-out pool example (experiment.json ``held_out_pool``: training examples no
     fitting run contains), so the featurized simulators (``sim_linear-feat.npz``,
     ``sim_additive-feat.npz``) predict examples they never saw trained.

   Removal rule, the same for every removal kind (`remove_examples`): each slot holding a
   removed example gets an example drawn uniformly (seeded) from the pool minus the removed
   set; every other slot is unchanged, so batch size and step count stay the base run's.
2. ``finetune counterfactual EXP`` trains each proposal from the experiment's starting state
   into ``EXP/counterfactual/run_XXX`` (the model half; not imported here).
3. `score` (``simfluence counterfactual score EXP``): for every proposal and every simulator
   file recorded at proposal time plus the two curriculum-blind baselines, the predicted change
   of the target's final loss (simulated on the proposal minus simulated on the base run, both
   from the base run's observed L_0) against the actual change (the trained counterfactual
   run's final loss minus the base run's, read from the run files). Summaries per variant and
   kind, the removal effect (top-k against random-k), the optimised curricula against their
   base runs, and side effects (agreement over all tracked test examples). `write_report`
   writes ``report.json``, ``report.md`` and ``predicted_vs_actual.png``.

Undefined statistics (a variant that predicts no change has no rank correlation) are None with
a reason, never NaN.

References:
    Guu et al., "Simfluence", 2023. https://arxiv.org/abs/2303.08114
    Ilyas et al., "Datamodels", 2022 and Park et al., "TRAK", 2023 (evaluation by
    retraining). https://arxiv.org/abs/2202.00622, https://arxiv.org/abs/2303.14186
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float, Int

from simfluence import baselines, choice_metrics, momentum, runlog, scheduled, simulators, tracin
from simfluence.runlog import Run, RunLogError

__all__ = [
    "KINDS",
    "REMOVAL_KINDS",
    "propose",
    "write_proposals",
    "remove_examples",
    "reorder_batches",
    "optimize_curriculum",
    "flip_search",
    "load_simulator_file",
    "predicted_changes",
    "score",
    "write_report",
]

KINDS = (
    "remove-top",
    "remove-bottom",
    "remove-random",
    "reorder",
    "optimize",
    "flip",
    "flip-random",
    "swap-in",
)
# The default proposals; swap-in needs held-out pool examples (config held_out_pool).
DEFAULT_KINDS = KINDS[:5]
# Featurized simulators (`simfluence.featurized`) are saved as per-pair tables of the whole pool.
FEATURIZED_VARIANTS = ("linear-feat", "additive-feat")
REMOVAL_KINDS = ("remove-top", "remove-bottom", "remove-random", "flip", "flip-random")
FLIP_KS = (1, 2, 4, 8, 16, 32)  # the removal sizes `flip_search` tries, smallest first
# Momentum variants are scored, not proposers: `optimize` needs per-slot terms given L_{t-1}.
PROPOSER_VARIANTS = tuple(
    v
    for v in simulators.VARIANTS + simulators.SCHEDULED_VARIANTS
    if v not in simulators.MOMENTUM_VARIANTS
)
REPORT_JSON, REPORT_MD, REPORT_PNG = runlog.COUNTERFACTUAL_REPORT_FILES
_NO_CHANGE = baselines.BASELINES  # same-length curricula: these predict a change of exactly 0


# ----------------------------------------------------------------------------------------------
# Curricula
# ----------------------------------------------------------------------------------------------


def remove_examples(
    curriculum: Int[np.ndarray, "T b"],
    removed: Sequence[int],
    n_train: int,
    rng: np.random.Generator,
) -> Int[np.ndarray, "T b"]:
    """The removal rule: every slot holding a removed example gets a seeded replacement.

    Args:
        curriculum: int [T, b] base curriculum (pool positions).
        removed: pool positions to remove.
        n_train: pool size.
        rng: the generator of the replacements.

    Returns:
        int32 [T, b]: slots of removed examples redrawn uniformly (with replacement) from the
        pool minus ``removed``, in row-major slot order; every other slot unchanged.

    Raises:
        ValueError: nothing would be left to draw from.
    """
    cur = np.array(curriculum, dtype=np.int32, copy=True)
    gone = np.zeros(n_train, bool)
    gone[np.asarray(list(removed), dtype=np.int64)] = True
    keep = np.flatnonzero(~gone)
    if keep.size == 0:
        raise ValueError(f"removing {int(gone.sum())} examples leaves none of the pool")
    slots = gone[cur]
    cur[slots] = keep[rng.integers(0, keep.size, size=int(slots.sum()))]
    return cur


def reorder_batches(
    curriculum: Int[np.ndarray, "T b"], rng: np.random.Generator
) -> tuple[Int[np.ndarray, "T b"], np.ndarray]:
    """The base run's batches in another order (a random permutation other than the identity).

    Args:
        curriculum: int [T, b] with T >= 2.
        rng: the generator of the permutation.

    Returns:
        (int32 [T, b] reordered curriculum, int [T] permutation: row t is base row perm[t]).
    """
    T = curriculum.shape[0]
    if T < 2:
        raise ValueError("reorder needs a base run of 2 or more steps")
    perm = rng.permutation(T)
    while np.array_equal(perm, np.arange(T)):
        perm = rng.permutation(T)
    return np.asarray(curriculum, np.int32)[perm], perm


def optimize_curriculum(
    sim: simulators.Simulator,
    test: int,
    initial_loss: float,
    steps: int,
    cap: int,
    lr: Float[np.ndarray, " T"] | None = None,
) -> Int[np.ndarray, "T b"]:
    """Greedy curriculum that the simulator predicts gives test example ``test`` the lowest loss.

    At each step the linear family predicts L_t = sum_{i in c_t} (A_i L_{t-1} + B_i), a sum
    of per-slot terms given L_{t-1} (the schedule-aware variants: L_{t-1} / b + w_t ((A_i -
    1/b) L_{t-1} + B_i) per slot, w_t = lr_t / lr_max); the greedy step fills the batch with the
    ``batch`` distinct examples of lowest slot term among those used fewer than ``cap`` times so
    far. The cap keeps the curriculum within counts the fitting runs have seen (a simulator
    fitted on random curricula is not asked about one example repeated 200 times).

    Args:
        sim: a Simfluence `Simulator` with its batch size.
        test: the target test example.
        initial_loss: its observed L_0.
        steps: T.
        cap: the most times any example may appear in the curriculum.
        lr: float [T] the learning rates of the steps (schedule-aware variants only).

    Returns:
        int32 [T, batch].

    Raises:
        ValueError: the pool cannot fill T batches of distinct examples under the cap.
    """
    b = int(sim.batch)
    A = np.asarray(sim.A[test], np.float64)
    B = np.asarray(sim.B[test], np.float64)
    n = A.shape[0]
    if b > n or cap * n < steps * b:
        raise ValueError(
            f"optimize: {steps} steps of {b} distinct examples need cap x n_train >= "
            f"{steps * b} (cap {cap}, n_train {n}); raise --optimize-cap"
        )
    w = np.ones(steps)
    if sim.variant in simulators.SCHEDULED_VARIANTS:
        if lr is None or np.shape(lr) != (steps,):
            raise ValueError(f"optimize with {sim.variant} needs the {steps} learning rates")
        w = np.asarray(lr, np.float64) / float(sim.lr_max)
    uses = np.zeros(n, np.int64)
    out = np.empty((steps, b), np.int32)
    loss = float(initial_loss)
    for t in range(steps):
        slot = loss / b + w[t] * ((A - 1.0 / b) * loss + B)
        slot[uses >= cap] = np.inf
        chosen = np.argsort(slot, kind="stable")[:b]
        loss = float(slot[chosen].sum())
        uses[chosen] += 1
        out[t] = chosen
    return out


def flip_search(
    sim: simulators.Simulator,
    curriculum: Int[np.ndarray, "T b"],
    initial: Float[np.ndarray, " n_test"],
    observed_final: float,
    test: int,
    n_train: int,
    make_rng,
    lr: Float[np.ndarray, " T"] | None = None,
    ks: Sequence[int] = FLIP_KS,
) -> dict:
    """The smallest top-k removal that a margin simulator predicts flips a prediction.

    The prediction is the base run's: correct when its observed final margin is > 0. The
    candidates are ranked by `simulators.removal_influence` on the margin, the examples that
    most support the current sign first (for a correct target those whose removal lowers the
    margin the most, for a wrong one those whose removal raises it the most): the ranking of
    ``remove-top`` with the sign taken into account. For each k in ``ks`` (at most the distinct
    examples of the curriculum), the top k are removed by `remove_examples` with a fresh
    ``make_rng()`` (the proposal's own generator, so the trained curriculum is the searched
    one). The predicted final margin is the observed one plus the simulated change (simulated
    final margin on the new curriculum minus on the base one, both from ``initial``), as the
    check predicts every change; the first k whose predicted final margin has the other sign is
    returned, else the largest k with ``predicted_flip`` False.

    Args:
        sim: a Simfluence simulator fitted on ``--metric margin``.
        curriculum: int [T, b] the base run's curriculum.
        initial: f32 [n_test] the base run's observed step-0 margins.
        observed_final: the base run's observed final margin of ``test``.
        test: the target test example.
        n_train: pool size.
        make_rng: () -> np.random.Generator, the proposal's generator (called once per k).
        lr: f32 [T] the base run's learning rates (schedule-aware variants only).
        ks: removal sizes to try, increasing.

    Returns:
        {"k", "removed" (sorted pool positions), "curriculum" int32 [T, b], "predicted_flip",
        "base_margin", "predicted_margin", "ks_tried"}.
    """
    cur = np.asarray(curriculum, np.int32)
    present = np.unique(cur)
    influence = np.asarray(simulators.removal_influence(sim, cur, initial, test, lr=lr), np.float64)
    if not np.isfinite(influence).all():
        raise ValueError(
            f"the removal influence on test {test} is not finite (the margin simulator "
            "diverges); refit it"
        )
    correct = observed_final > 0
    # Supporters of the current sign first: removal lowers a positive margin, raises a negative.
    key = influence[present] * (1.0 if correct else -1.0)
    order = np.argsort(key, kind="stable")
    l0 = np.asarray(initial, np.float32)[None]
    lr_p = None if lr is None else np.asarray(lr)[None]
    base = _rollout64(sim, cur[None], l0, lr_p)[0, test]
    tried = [int(k) for k in ks if k <= present.size]
    if not tried:
        raise ValueError(f"flip: the base curriculum holds {present.size} distinct examples")
    out: dict[str, Any] = {}
    for k in tried:
        removed = sorted(int(i) for i in present[order[:k]])
        new = remove_examples(cur, removed, n_train, make_rng())
        change = _rollout64(sim, new[None], l0, lr_p)[0, test] - base
        predicted = float(observed_final) + float(change)
        out = {
            "k": k,
            "removed": removed,
            "curriculum": new,
            "predicted_flip": bool((predicted > 0) != correct),
            "base_margin": float(observed_final),
            "predicted_margin": predicted,
            "ks_tried": tried[: tried.index(k) + 1],
        }
        if out["predicted_flip"]:
            break
    return out


# ----------------------------------------------------------------------------------------------
# Simulator files
# ----------------------------------------------------------------------------------------------


def load_simulator_file(path: str | os.PathLike):
    """A Simfluence (`simulators.Simulator`) or TracIn-CP (`tracin.TracInSimulator`) file.

    Args:
        path: .npz written by `simfluence fit`.

    Returns:
        The simulator.

    Raises:
        ValueError: unreadable, malformed, or a baseline file (the baselines predict no change
            and are scored always, without a file).
    """
    from simfluence.loader import load_any_simulator

    loaded = load_any_simulator(path)
    if loaded.kind == "baseline":
        raise ValueError(
            f"{path}: a {loaded.variant} baseline file; the counterfactual check scores the "
            "baselines always (they predict no change): leave it out of --sims"
        )
    return loaded.sim


def _variant(sim) -> str:
    return sim.variant


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _simulator_sha256(path: Path) -> str:
    """Hash of a simulator file's content, its ``provenance`` entry left out.

    A refit that gives the same simulator from another commit, machine or command line is the
    same simulator for scoring, so proposals made with it stay valid. A file without the entry
    (written before provenance was recorded) hashes as its bytes, as it always did.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(zf.namelist())
            if "provenance.npy" not in names:
                return _file_sha256(path)
            h = hashlib.sha256(b"simulator members without provenance")
            for name in names:
                if name != "provenance.npy":
                    h.update(name.encode() + b"\0" + hashlib.sha256(zf.read(name)).digest())
            return h.hexdigest()
    except (OSError, zipfile.BadZipFile):  # unreadable: its bytes (loading it names the error)
        return _file_sha256(path)


def default_simulator_files(exp_dir: str | os.PathLike, metric: str = "loss") -> dict[str, str]:
    """``EXP/sim_<variant>.npz`` for every variant that has one (as `make simulate` writes).

    Args:
        exp_dir: experiment folder.
        metric: the metric of the check (`sim_file_name`).

    Returns:
        {variant: file name relative to EXP}.
    """
    exp_dir = Path(exp_dir)
    names = (
        simulators.VARIANTS
        + tracin.TRACIN_VARIANTS
        + simulators.SCHEDULED_VARIANTS
        + simulators.MOMENTUM_VARIANTS
        + FEATURIZED_VARIANTS
    )
    files = {v: choice_metrics.sim_file_name(v, metric) for v in names}
    return {v: f for v, f in files.items() if (exp_dir / f).is_file()}


def _relative(path: str | os.PathLike, exp_dir: Path) -> str:
    p = Path(path)
    p = p if p.is_absolute() else Path.cwd() / p
    try:
        return os.path.relpath(p.resolve(), exp_dir.resolve())
    except ValueError:  # another drive
        return str(p.resolve())


def _load_sims(
    exp_dir: Path, files: dict[str, str], split_runs: dict, metric: str = "loss"
) -> dict[str, Any]:
    """Loads every simulator file (relative to EXP), checking it belongs to this experiment
    and was fitted on ``metric``."""
    exp_sha = runlog.experiment_sha256(exp_dir)
    info = runlog.read_experiment(exp_dir)
    sims = {}
    for variant, rel in files.items():
        path = Path(os.path.normpath(exp_dir / rel))
        if not path.is_file():
            raise ValueError(
                f"simulator file {path} ({variant}) not found; fit it with `simfluence fit "
                f"{exp_dir} --variant {variant} ...` (make simulate writes EXP/sim_<variant>.npz)"
            )
        sim = load_simulator_file(path)
        origin = simulators.read_origin(path)
        held = (origin or {}).get("featurized") if variant in FEATURIZED_VARIANTS else None
        if _variant(sim) != variant and held != variant:
            raise ValueError(f"{path} holds a {_variant(sim)} simulator, not {variant}")
        if origin is None or origin.get("experiment_sha256") != exp_sha:
            why = (
                "records no experiment it was fitted on (written by an older version or "
                "without `simfluence fit`)"
                if origin is None
                else f"was fitted on another experiment (its experiment.json hash differs "
                f"from {exp_dir}'s)"
            )
            raise ValueError(f"{path}: {why}; refit it with `simfluence fit {exp_dir} ...`")
        choice_metrics.check_sim_metric(path, origin, metric)
        tracin_sim = isinstance(sim, tracin.TracInSimulator)
        shape = sim.dots.shape[1:] if tracin_sim else (sim.n_test, sim.n_train)
        if tuple(shape) != (info["n_test"], info["n_train"]):
            raise ValueError(
                f"{path}: simulator is [n_test, n_train] = {list(shape)} but {exp_dir} has "
                f"[{info['n_test']}, {info['n_train']}]; refit it on this experiment"
            )
        used = set(origin.get("fit_runs", [])) | set(origin.get("valid_runs", []))
        leak = sorted(used & set(split_runs.get("base", [])))
        if leak:
            raise ValueError(
                f"{path}: base run(s) {leak} were fitting or validation runs of this simulator; "
                "propose from held-out runs (--base-runs) or refit without them"
            )
        sims[variant] = sim
    return sims


# ----------------------------------------------------------------------------------------------
# Proposing
# ----------------------------------------------------------------------------------------------


def default_base_runs(exp_dir: str | os.PathLike, split: Sequence[int] | None = None) -> list[int]:
    """The held-out runs of a split, as `simfluence evaluate` takes them.

    Args:
        exp_dir: experiment folder.
        split: (fit, valid, test) numbers of complete runs (None: the split experiment.json
            records, see `simfluence.evaluation.recorded_split`, else 20,2,10).

    Returns:
        Run indices: the ``test`` complete runs after the fitting and validation ones.

    Raises:
        RunLogError: fewer complete runs than the split needs (an incomplete held-out run would
            otherwise shift the choice silently).
    """
    from simfluence.evaluation import resolve_split

    n_fit, n_valid, n_test = resolve_split(exp_dir, split)[0]  # reads experiment.json
    listing = runlog.list_runs(exp_dir)
    complete = [i for i, _, c in listing if c]
    need = n_fit + n_valid + n_test
    if n_test < 1 or len(complete) < need:
        bad = [p.name for _, p, c in listing if not c]
        raise RunLogError(
            f"{exp_dir}: split {n_fit},{n_valid},{n_test} needs {need} complete runs but there "
            f"are {len(complete)}"
            + (f" (incomplete: {', '.join(bad)})" if bad else "")
            + "; finish the runs, or pass --split or --base-runs"
        )
    return complete[n_fit + n_valid : need]


def _lr(sim, run: Run) -> np.ndarray | None:
    """The base run's learning rates where the simulator needs them (schedule-aware variants)."""
    return scheduled.run_lr(
        sim.variant, run, "leave it out of --sims or use base runs that record their learning rates"
    )


def _check_kinds(kinds: Sequence[str]) -> list[str]:
    from simfluence.evaluation import check_names

    return check_names(kinds, KINDS, "proposal kind")


def propose(
    exp_dir: str | os.PathLike,
    *,
    simulator_files: dict[str, str] | None = None,
    proposer: str = "linear",
    base_runs: Sequence[int] | None = None,
    tests: Sequence[int] | None = None,
    n_targets: int | None = None,
    kinds: Sequence[str] = DEFAULT_KINDS,
    k: int = 10,
    seed: int = 0,
    optimize_cap: int | None = None,
    split: Sequence[int] | None = None,
    metric: str = "loss",
    flip_sim: str | os.PathLike | None = None,
) -> tuple[list[dict], np.ndarray, dict]:
    """Proposals of curricula to train, one per (target test example, kind).

    Target i (``tests``, else ``n_targets`` test examples drawn with ``seed``) is paired with
    base run ``base_runs[i % len(base_runs)]``. Every random choice is seeded by (seed,
    proposal id), so the same arguments give the same proposals.

    Args:
        exp_dir: experiment folder.
        simulator_files: {variant: .npz path} of the simulators to score (relative to EXP or
            absolute; None: every ``EXP/sim_<variant>.npz``). Each must record this
            experiment (`simfluence fit` does) and must not have been fitted on a base run.
        proposer: the Simfluence variant (a key of ``simulator_files``) that proposes.
        base_runs: run indices (None: the held-out runs of ``split``); only the first
            ``len(tests)`` are used when there are more.
        tests: target test examples (None: ``n_targets`` drawn; give one or the other).
        n_targets: how many targets to draw (None: min(12, n_test)).
        kinds: proposal kinds from `KINDS`.
        k: examples removed by each removal proposal (swapped out by swap-in).
        seed: seed of every draw.
        optimize_cap: most uses of one example in an ``optimize`` curriculum (None: the largest
            count of any example in the base curriculum).
        split: (fit, valid, test) numbers of complete runs whose held-out part gives the
            default base runs (None: the split experiment.json records, else 20,2,10).
        metric: what the check predicts the change of (`simfluence.choice_metrics`); every
            simulator file must have been fitted on it (default files: `sim_file_name`).
        flip_sim: for ``flip``: the proposer's simulator fitted on the margin (relative to EXP
            or absolute; None: ``EXP/sim_<proposer>_margin.npz``, or the proposer itself when
            ``metric`` is margin). The base runs need choice_losses.npy.

    Returns:
        (proposals: list of {"id", "kind", "base_run", "test", "k", "removed", "run",
        "permutation" (reorder only), "proposer_predicted_final"}, curricula int32 [P, T, b],
        header: {"experiment_sha256", "settings", "simulator_files", "simulator_sha256"}).

    Raises:
        ValueError, RunLogError: bad arguments, a missing or incomplete base run, k larger than
            the base curriculum allows, a simulator of another experiment or fitted on a base
            run; each names the value and the fix.
    """
    exp_dir = Path(exp_dir)
    info = runlog.read_experiment(exp_dir)
    n_train, n_test = info["n_train"], info["n_test"]
    # Pool positions held out of the fitting runs (issue 19) come last; removals never draw them.
    outside = [int(i) for i in info.get("held_out_pool", []) or []]
    n_fit_pool = n_train - len(outside)
    metric = choice_metrics.check_metric(metric)
    kinds = _check_kinds(kinds)
    if "swap-in" in kinds and not outside:
        raise ValueError(
            f"{Path(exp_dir) / 'experiment.json'} records no held-out pool examples; swap-in "
            "needs them (held_out_pool and held_out_runs in the experiment config): leave "
            "swap-in out of --kinds"
        )
    if "flip-random" in kinds:
        if "flip" not in kinds:
            raise ValueError("--kinds flip-random removes flip's k at random: add flip to --kinds")
        kinds.remove("flip-random")  # right after flip: it takes flip's k
        kinds.insert(kinds.index("flip") + 1, "flip-random")
    if metric == "margin" and "optimize" in kinds:
        raise ValueError(
            "--kinds optimize minimises the metric, which for --metric margin makes the target "
            "wrong; leave optimize out (flip proposes removals that change the prediction)"
        )
    for flag, value, low in (
        ("--k", k, 1),
        ("--seed", seed, 0),
        ("--optimize-cap", optimize_cap, 1),
    ):
        if value is None and flag == "--optimize-cap":
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{flag} {value!r} must be an integer >= {low}")
    if k >= n_train:
        raise ValueError(
            f"--k {k} leaves nothing of the pool (n_train={n_train}); use k <= {n_train - 1}"
        )
    if proposer not in PROPOSER_VARIANTS:
        raise ValueError(
            f"--proposer {proposer!r}: proposals come from a Simfluence simulator; use one of "
            f"{', '.join(PROPOSER_VARIANTS)}"
        )
    if tests is not None and n_targets is not None:
        raise ValueError("give --tests or --targets, not both")
    if tests is None:
        n_targets = min(12, n_test) if n_targets is None else n_targets
        if not 1 <= n_targets <= n_test:
            raise ValueError(f"--targets {n_targets} must be in 1..{n_test} (n_test)")
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
        tests = [int(j) for j in rng.choice(n_test, size=n_targets, replace=False)]
    tests = [int(j) for j in tests]
    bad = [j for j in tests if not 0 <= j < n_test]
    if not tests or bad or len(set(tests)) != len(tests):
        raise ValueError(f"--tests {tests}: give distinct test examples in 0..{n_test - 1}")
    if base_runs is not None and len(set(base_runs)) != len(base_runs):
        raise ValueError(f"--base-runs {list(base_runs)}: each run once")
    base_runs = list(base_runs) if base_runs is not None else default_base_runs(exp_dir, split)
    base_runs = base_runs[: len(tests)]  # the ones the targets use
    runs = runlog.load_runs(exp_dir, base_runs)  # missing or incomplete: an error naming it
    runs = choice_metrics.with_metric(runs, metric)  # losses: the metric's trajectories
    margins = choice_metrics.with_metric(runs, "margin") if "flip" in kinds else None
    if any(kd in REMOVAL_KINDS[:3] for kd in kinds):
        distinct = min(np.unique(r.curriculum).size for r in runs)
        if k > distinct:
            raise ValueError(
                f"--k {k} exceeds the {distinct} distinct examples of the smallest base "
                f"curriculum (runs {base_runs}); use k <= {distinct}"
            )
    if simulator_files is None:
        simulator_files = default_simulator_files(exp_dir, metric)
    known = (
        PROPOSER_VARIANTS
        + tracin.TRACIN_VARIANTS
        + simulators.MOMENTUM_VARIANTS
        + FEATURIZED_VARIANTS
    )
    unknown = sorted(set(simulator_files) - set(known))
    if unknown:
        raise ValueError(
            f"--sims: unknown variant(s) {unknown}; name files as VARIANT=FILE with VARIANT one "
            f"of {', '.join(known)}"
        )
    files = {
        v: _relative(p, exp_dir) if Path(p).is_absolute() else str(p)
        for v, p in simulator_files.items()
    }
    if proposer not in files:
        raise ValueError(
            f"no {proposer} simulator to propose with (simulators: {sorted(files) or 'none'}); "
            f"fit EXP/{choice_metrics.sim_file_name(proposer, metric)} with `simfluence fit` "
            "(make simulate) or pass --sims"
        )
    sims = _load_sims(exp_dir, files, {"base": base_runs}, metric)
    flip_file, margin_sim = None, None
    if "flip" in kinds:
        if flip_sim is None and metric == "margin":
            flip_file = files[proposer]
        else:
            given = (
                flip_sim
                if flip_sim is not None
                else choice_metrics.sim_file_name(proposer, "margin")
            )
            flip_file = _relative(given, exp_dir) if Path(given).is_absolute() else str(given)
        margin_sim = _load_sims(exp_dir, {proposer: flip_file}, {"base": base_runs}, "margin")[
            proposer
        ]
    for sm in sims.values():  # every schedule-aware simulator needs the base runs' rates
        if isinstance(sm, simulators.Simulator):
            for r in runs:
                _lr(sm, r)
    sim = sims[proposer]
    proposals, curricula = [], []
    # The flip kinds come after every other proposal, so that asking for them leaves the other
    # proposals' ids (and so their seeded draws) as they are without them.
    flip_kinds = [kd for kd in kinds if kd in ("flip", "flip-random")]
    passes = [[kd for kd in kinds if kd not in flip_kinds], flip_kinds]
    for todo, (i, j) in [(t, ij) for t in passes if t for ij in enumerate(tests)]:
        run = runs[i % len(runs)]
        if msg := simulators.batch_mismatch(sim, run.batch):
            raise ValueError(f"base run {run.index}: {msg}")
        present = np.unique(run.curriculum)
        influence = None
        flip = None
        for kind in todo:
            pid = len(proposals)
            rng = np.random.default_rng(np.random.SeedSequence([seed, 2, pid]))
            entry: dict[str, Any] = {"id": pid, "kind": kind, "base_run": run.index, "test": j}
            removed: list[int] = []
            if kind in ("remove-top", "remove-bottom"):
                if influence is None:
                    influence = np.asarray(
                        simulators.removal_influence(
                            sim, run.curriculum, run.losses[0], j, lr=_lr(sim, run)
                        ),
                        np.float64,
                    )
                    if not np.isfinite(influence).all():
                        raise ValueError(
                            f"{files[proposer]}: the removal influence on test {j} in run "
                            f"{run.index} is not finite (the simulator diverges); refit it"
                        )
                vals = influence[present]
                order = np.argsort(-vals if kind == "remove-top" else vals, kind="stable")
                removed = sorted(int(i) for i in present[order[:k]])
            elif kind == "remove-random":
                removed = sorted(int(i) for i in rng.choice(present, size=k, replace=False))
            elif kind == "flip":
                mrun = margins[i % len(runs)]
                flip = flip_search(
                    margin_sim,
                    run.curriculum,
                    mrun.losses[0],
                    float(mrun.losses[-1][j]),
                    j,
                    n_fit_pool,
                    lambda pid=pid: np.random.default_rng(np.random.SeedSequence([seed, 2, pid])),
                    lr=_lr(margin_sim, run),
                )
                removed = flip["removed"]
                entry["flip"] = {key: v for key, v in flip.items() if key != "curriculum"}
                entry["flip"].pop("removed")
            elif kind == "flip-random":
                removed = sorted(int(i) for i in rng.choice(present, size=flip["k"], replace=False))
            if kind == "flip":
                cur = flip["curriculum"]
            elif kind in REMOVAL_KINDS:
                cur = remove_examples(run.curriculum, removed, n_fit_pool, rng)
            elif kind == "swap-in":
                kk = min(k, len(outside), present.size)
                removed = sorted(int(i) for i in rng.choice(present, size=kk, replace=False))
                incoming = [int(i) for i in rng.choice(outside, size=kk, replace=False)]
                cur = np.array(run.curriculum, np.int32, copy=True)
                for out_id, in_id in zip(removed, incoming, strict=True):
                    cur[run.curriculum == out_id] = in_id
                entry["swapped_in"] = incoming
                entry["slots_replaced"] = int(np.isin(run.curriculum, removed).sum())
            elif kind == "reorder":
                cur, perm = reorder_batches(run.curriculum, rng)
                entry["permutation"] = [int(p) for p in perm]
            else:
                counts = np.bincount(run.curriculum.ravel(), minlength=n_train)
                cap = int(optimize_cap) if optimize_cap is not None else int(counts.max())
                cur = optimize_curriculum(
                    sim, j, float(run.losses[0][j]), run.steps, cap, lr=_lr(sim, run)
                )
                entry["optimize_cap"] = cap
            entry.update(k=len(removed), removed=removed, run=f"run_{pid:03d}")
            if kind in REMOVAL_KINDS:  # slots that got a replacement
                entry["slots_replaced"] = int(np.isin(run.curriculum, removed).sum())
            pred = np.asarray(simulators.simulate(sim, cur, run.losses[0], lr=_lr(sim, run)))
            pred = pred[-1, j]
            entry["proposer_predicted_final"] = float(pred)
            proposals.append(entry)
            curricula.append(cur)
    shapes = {c.shape for c in curricula}
    if len(shapes) != 1:
        raise ValueError(
            f"base runs {base_runs} differ in length ({sorted(shapes)}); pick runs of one length"
        )
    header = {
        "experiment_sha256": runlog.experiment_sha256(exp_dir),
        "settings": {
            "proposer": proposer,
            "base_runs": [int(r) for r in base_runs],
            "tests": tests,
            "kinds": kinds,
            "k": k,
            "seed": seed,
            "optimize_cap": optimize_cap,
            **({} if metric == "loss" else {"metric": metric}),
            **({} if flip_file is None else {"flip_sim": flip_file, "flip_ks": list(FLIP_KS)}),
        },
        "simulator_files": files,
        "simulator_sha256": {v: _simulator_sha256(exp_dir / p) for v, p in files.items()},
        "base_runs_sha256": {str(r.index): _run_sha256(r.path) for r in runs},
    }
    if flip_file is not None:
        header["flip_sim_sha256"] = _simulator_sha256(exp_dir / flip_file)
    return proposals, np.stack(curricula).astype(np.int32), header


def _run_sha256(run_path: Path) -> str:
    """Hash of a base run's curriculum, losses and learning rates (the files scoring reads)."""
    h = hashlib.sha256()
    names = (runlog.CURRICULUM_FILE, runlog.LOSSES_FILE, runlog.LR_FILE)
    if (run_path / runlog.CHOICE_LOSSES_FILE).is_file():  # the margins of flip and --metric
        names += (runlog.CHOICE_LOSSES_FILE,)
    for name in names:
        path = run_path / name
        h.update(name.encode())
        if path.is_file():
            h.update(_file_sha256(path).encode())
    return h.hexdigest()


def write_proposals(
    exp_dir: str | os.PathLike, proposals: list[dict], curricula: np.ndarray, header: dict
) -> tuple[Path, bool]:
    """Writes proposals, or keeps identical ones already there; refuses a different set.

    Args:
        exp_dir: experiment folder.
        proposals, curricula, header: from `propose`.

    Returns:
        (path of proposals.json, whether it was written now; False: the same proposals were
        already there, and the runs trained from them stay valid).

    Raises:
        ValueError: ``EXP/counterfactual`` holds proposals made with other settings or
            simulators, or run folders without proposals (names the difference and the fix).
    """
    exp_dir = Path(exp_dir)
    folder = runlog.counterfactual_dir(exp_dir)
    fix = f"delete {folder} (rm -r {folder}) to propose again; its trained runs go with it"
    old = runlog.read_proposals(exp_dir) if (folder / runlog.PROPOSALS_FILE).is_file() else None
    if old is None:
        if folder.is_dir() and any(p.name.startswith("run_") for p in folder.iterdir()):
            raise ValueError(f"{folder} holds run folders but no proposals.json; {fix}")
        return runlog.write_proposals(exp_dir, proposals, curricula, header), True
    differ = [key for key in header if old.get(key) != header[key]]
    if not differ and old["curricula_sha256"] != runlog.curricula_sha256(curricula):
        differ = ["curricula"]
    if differ:
        detail = []
        for key in differ:
            a, b = old.get(key), header.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                detail += [f"{key}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
            else:
                detail.append(key)
        raise ValueError(
            f"{folder / runlog.PROPOSALS_FILE} was made with other settings or simulators "
            f"(differs: {', '.join(detail)}); {fix}"
        )
    return folder / runlog.PROPOSALS_FILE, False


# ----------------------------------------------------------------------------------------------
# Predictions and scoring
# ----------------------------------------------------------------------------------------------


def _rollout64(sim: simulators.Simulator, curricula, l0, lr) -> np.ndarray:
    """Final losses [P, n_test] of a Simfluence simulator, rolled out in float64.

    The jitted rollouts compute in float32; a difference of two float32 rollouts carries
    rounding noise of about 1e-7, which would give order-blind variants (additive,
    multiplicative: sums and products of per-step terms) spurious nonzero predictions for a
    reorder. In float64 that noise is about 1e-16 and is zeroed by `_ROUNDOFF`.
    """
    if sim.variant in simulators.MOMENTUM_VARIANTS:
        w = None
        if sim.lr_max is not None:  # linear-lr-momentum
            if lr is None:
                raise ValueError(f"the {sim.variant} simulator needs the base runs' lr.npy")
            w = np.asarray(lr, np.float64) / float(sim.lr_max)  # [P, T]
        return momentum.rollout64(sim.A, sim.B, curricula, l0, float(sim.decay), w)
    A = np.asarray(sim.A, np.float64)  # [n_test, n_train]
    B = np.asarray(sim.B, np.float64)
    scheduled = sim.variant in simulators.SCHEDULED_VARIANTS
    if scheduled:
        if lr is None:
            raise ValueError(f"the {sim.variant} simulator needs the base runs' lr.npy")
        w = np.asarray(lr, np.float64) / float(sim.lr_max)  # [P, T]
    loss = np.asarray(l0, np.float64).copy()  # [P, n_test]
    for t in range(curricula.shape[1]):
        ids = curricula[:, t]  # [P, b]
        a_sum = A[:, ids].sum(-1).T  # [P, n_test]
        b_sum = B[:, ids].sum(-1).T
        if scheduled:  # L + w (sum (A - 1/b) L + sum B)
            loss = loss + w[:, t, None] * ((a_sum - 1.0) * loss + b_sum)
        elif sim.variant == "additive":
            loss = loss + b_sum
        else:
            loss = a_sum * loss + b_sum
    return loss


# Relative size below which a float64 predicted change is rounding noise (set to 0).
_ROUNDOFF = 1e-12


def _final_losses(sim, curricula: np.ndarray, l0: np.ndarray, lr: np.ndarray | None):
    """Simulated final losses [P, n_test] of curricula [P, T, b] from l0 [P, n_test]."""
    if isinstance(sim, simulators.Simulator):
        return _rollout64(sim, curricula, l0, lr)
    return np.stack(
        [
            tracin.simulate_tracin(sim, c, x, None if lr is None else lr[p])[-1]
            for p, (c, x) in enumerate(zip(curricula, l0, strict=True))
        ]
    ).astype(np.float64)


def predicted_changes(
    sim,
    curricula: Int[np.ndarray, "P T b"],
    base_curricula: Int[np.ndarray, "P T b"],
    initial_losses: Float[np.ndarray, "P n_test"],
    lr: Float[np.ndarray, "P T"] | None = None,
) -> Float[np.ndarray, "P n_test"]:
    """Simulated final losses on the proposals minus those on their base runs.

    Args:
        sim: a `simulators.Simulator` (rolled out in float64), a `tracin.TracInSimulator`, or
            a baseline name ("constant", "mean-trajectory": a curriculum of the base run's
            length gets the same prediction, so the change is exactly 0).
        curricula: int [P, T, b] proposals.
        base_curricula: int [P, T, b] their base runs' curricula.
        initial_losses: f32 [P, n_test] the base runs' observed L_0 (also the proposals').
        lr: f32 [P, T] the base runs' learning rates (schedule-aware variants and TracIn-CP;
            None: TracIn-CP uses its checkpoints' rates).

    Returns:
        float64 [P, n_test] predicted changes (both rollouts from the same L_0); changes
        within float64 rounding of the losses are exactly 0.
    """
    l0 = np.asarray(initial_losses, np.float32)
    if isinstance(sim, str):
        if sim not in _NO_CHANGE:
            raise ValueError(f"unknown baseline {sim!r}; use one of {', '.join(_NO_CHANGE)}")
        return np.zeros(l0.shape, np.float64)
    new = _final_losses(sim, np.asarray(curricula, np.int32), l0, lr)
    old = _final_losses(sim, np.asarray(base_curricula, np.int32), l0, lr)
    change = new - old
    scale = np.maximum(np.abs(new), np.abs(old))
    change[np.abs(change) <= _ROUNDOFF * np.maximum(scale, 1.0)] = 0.0
    return change


def _undefined(reason: str, **extra) -> dict:
    return {"spearman": None, "pearson": None, "undefined_reason": reason, **extra}


def _correlations(pred: np.ndarray, actual: np.ndarray) -> dict:
    """Spearman and Pearson of two float64 vectors, None with a reason where undefined."""
    from scipy import stats

    if pred.size < 3:
        return _undefined(f"{pred.size} value(s); a correlation needs 3 or more")
    if np.ptp(pred) == 0:
        return _undefined(
            "the predicted change does not vary (a variant that predicts no change: the "
            "baselines always, additive and multiplicative for a reorder)"
        )
    if np.ptp(actual) == 0:
        return _undefined("the actual change is the same for every item")
    rho = float(stats.spearmanr(pred, actual).statistic)
    r = float(stats.pearsonr(pred, actual).statistic)
    return {"spearman": rho, "pearson": r, "undefined_reason": None}


def _summary(pred: np.ndarray, actual: np.ndarray) -> dict:
    """Spearman, Pearson, sign agreement and MAE of predicted vs actual changes (float64)."""
    out = _correlations(pred, actual)
    out["n"] = int(pred.size)
    out["mae"] = float(np.abs(pred - actual).mean()) if pred.size else None
    both = (pred != 0) & (actual != 0)
    if both.any():
        out["sign_agreement"] = float((np.sign(pred[both]) == np.sign(actual[both])).mean())
        out["sign_n"] = int(both.sum())
        out["sign_undefined_reason"] = None
    else:
        out["sign_agreement"] = None
        out["sign_n"] = 0
        out["sign_undefined_reason"] = "every predicted (or actual) change is exactly 0"
    return out


def _mean_se(values: Sequence[float]) -> dict:
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return {"mean": None, "stderr": None, "n": 0}
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else None
    return {"mean": float(x.mean()), "stderr": se, "n": int(x.size)}


def score(
    exp_dir: str | os.PathLike,
    extra_files: dict[str, str] | None = None,
    metric: str | None = None,
) -> dict:
    """Scores every recorded simulator (and the baselines) against the trained proposals.

    Args:
        exp_dir: experiment folder whose ``counterfactual/`` holds proposals and, for each
            proposal, its complete trained run.
        extra_files: {variant: .npz path} of simulators to score beside the recorded ones
            (relative to EXP or absolute), e.g. variants fitted after the proposals were
            trained. They did not propose anything; like the recorded ones they must record
            this experiment and must not have been fitted on a base run. Their hashes go into
            the report (``extra_simulator_files``).
        metric: the proposals' metric (None: the one recorded with them; another is refused).

    Returns:
        The report (see ``report.json`` in the README): ``{"simulator_files", "settings",
        "proposals": [{..., "run", "actual_change", "predicted_change": {variant: float},
        "side_effects": {variant: {"spearman", "pearson", ...}}}], "summary": {variant:
        {kind: {"spearman", "pearson", "sign_agreement", "mae", "n", ...}}},
        "removal_effect", "optimize", "side_effects_summary"}``.

    Raises:
        ValueError, RunLogError: no proposals; incomplete counterfactual runs; a simulator file
            changed since the proposals were made; a counterfactual run whose curriculum or
            step-0 losses are not those it should have.
    """
    exp_dir = Path(exp_dir)
    runlog.read_experiment(exp_dir)  # a missing experiment is named as such
    folder = runlog.counterfactual_dir(exp_dir)
    data = runlog.read_proposals(exp_dir)
    if data is None:
        has_runs = folder.is_dir() and any(p.name.startswith("run_") for p in folder.iterdir())
        raise ValueError(
            f"{folder / runlog.PROPOSALS_FILE} not found"
            + (
                f" but {folder} holds run folders; delete {folder} and propose again"
                if has_runs
                else f"; run `simfluence counterfactual propose {exp_dir}` and `finetune "
                f"counterfactual {exp_dir}` first"
            )
        )
    proposals, curricula = data["proposals"], data["curricula"]
    redo = f"delete {folder} and propose again"
    if data.get("experiment_sha256") != runlog.experiment_sha256(exp_dir):
        raise ValueError(
            f"{folder / runlog.PROPOSALS_FILE} was proposed for another experiment.json; {redo}"
        )
    recorded_metric = data["settings"].get("metric", "loss")
    if metric is not None and choice_metrics.check_metric(metric) != recorded_metric:
        raise ValueError(
            f"--metric {metric}: the proposals in {folder} were made with --metric "
            f"{recorded_metric}; score them with that, or {redo}"
        )
    metric = recorded_metric
    files = dict(data.get("simulator_files", {}))
    flip_file = data["settings"].get("flip_sim")
    if flip_file is not None:
        if _simulator_sha256(Path(os.path.normpath(exp_dir / flip_file))) != data.get(
            "flip_sim_sha256"
        ):
            raise ValueError(
                f"{exp_dir / flip_file} (the flip proposals' margin simulator) changed since the "
                f"proposals were made; restore it, or {redo}"
            )
    for v, rel in files.items():
        path = Path(os.path.normpath(exp_dir / rel))
        if not path.is_file() or _simulator_sha256(path) != data["simulator_sha256"].get(v):
            raise ValueError(
                f"{path} ({v}) changed or disappeared since the proposals were made; the "
                f"report would score another simulator: restore it, or {redo}"
            )
    status = {i: c for i, _, c in runlog.list_runs(folder)} if folder.is_dir() else {}
    missing = [p["id"] for p in proposals if not status.get(p["id"])]
    if missing:
        raise RunLogError(
            f"{folder}: {len(missing)} of {len(proposals)} counterfactual runs are not complete "
            f"(e.g. run_{missing[0]:03d}); train them with `finetune counterfactual {exp_dir}`"
        )
    cf_runs = runlog.load_counterfactual_runs(exp_dir, [p["id"] for p in proposals])
    base_ids = sorted({p["base_run"] for p in proposals})
    base = {r.index: r for r in runlog.load_runs(exp_dir, base_ids)}
    recorded = data.get("base_runs_sha256", {})
    for i, r in base.items():
        if recorded.get(str(i)) != _run_sha256(r.path):
            raise ValueError(
                f"{r.path}: its curriculum, losses or lr.npy changed since the proposals were "
                f"made (or it is not a recorded base run); restore it, or {redo}"
            )
    for p, r in zip(proposals, cf_runs, strict=True):
        if not np.array_equal(r.curriculum, curricula[p["id"]]):
            raise RunLogError(
                f"{r.path / 'curriculum.npy'} is not proposal {p['id']}'s curriculum; delete "
                f"{r.path} and train it again"
            )
        meta = r.meta
        want = {
            "proposal_id": p["id"],
            "kind": p["kind"],
            "base_run": p["base_run"],
            "test": p["test"],
            "proposals_sha256": data["curricula_sha256"],
        }
        wrong = sorted(key for key, value in want.items() if meta.get(key) != value)
        if wrong:
            raise RunLogError(
                f"{r.path / 'meta.json'}: {', '.join(wrong)} disagree with proposal {p['id']}; "
                f"delete {r.path} and train it again (`finetune counterfactual {exp_dir}`)"
            )
    extra = {}
    if extra_files:
        known = PROPOSER_VARIANTS + tracin.TRACIN_VARIANTS + simulators.MOMENTUM_VARIANTS
        bad = sorted(set(extra_files) - set(known))
        again = sorted(set(extra_files) & set(files))
        if bad or again:
            raise ValueError(
                f"--sims: {bad} are unknown variants (use {', '.join(known)})"
                if bad
                else f"--sims: {again} are already recorded in the proposals; leave them out"
            )
        extra = {
            v: _relative(p, exp_dir) if Path(p).is_absolute() else str(p)
            for v, p in extra_files.items()
        }
    extra_sha = {
        v: _file_sha256(Path(os.path.normpath(exp_dir / p)))
        for v, p in extra.items()
        if Path(os.path.normpath(exp_dir / p)).is_file()
    }
    files = {**files, **extra}
    sims = _load_sims(exp_dir, files, {"base": base_ids}, metric)
    flips = None
    if any(p["kind"] in ("flip", "flip-random") for p in proposals):
        flips = _flip_summary(proposals, cf_runs, base)
    cf_runs = choice_metrics.with_metric(cf_runs, metric)
    base = {r.index: r for r in choice_metrics.with_metric(list(base.values()), metric)}
    bases = [base[p["base_run"]] for p in proposals]
    base_cur = np.stack([b.curriculum for b in bases])
    l0 = np.stack([b.losses[0] for b in bases])
    lr = None if any(b.lr is None for b in bases) else np.stack([b.lr for b in bases])
    actual = np.stack(
        [
            r.losses[-1].astype(np.float64) - b.losses[-1]
            for r, b in zip(cf_runs, bases, strict=True)
        ]
    )  # [P, n_test]
    step0 = [
        p["id"]
        for p, r, b in zip(proposals, cf_runs, bases, strict=True)
        if not np.array_equal(r.losses[0], b.losses[0])
    ]
    variants = list(sims) + list(_NO_CHANGE)
    pred = {v: predicted_changes(sims.get(v, v), curricula, base_cur, l0, lr) for v in variants}
    targets = np.array([p["test"] for p in proposals])
    rows = np.arange(len(proposals))
    out_props = []
    for i, p in enumerate(proposals):
        entry = dict(p)
        entry["actual_change"] = float(actual[i, p["test"]])
        entry["base_final"] = float(bases[i].losses[-1][p["test"]])
        entry["predicted_change"] = {v: float(pred[v][i, p["test"]]) for v in variants}
        entry["side_effects"] = {v: _correlations(pred[v][i], actual[i]) for v in variants}
        out_props.append(entry)
    kinds = [k for k in KINDS if any(p["kind"] == k for p in proposals)]
    summary: dict[str, dict] = {}
    side: dict[str, dict] = {}
    for v in variants:
        pv = pred[v][rows, targets]
        at = actual[rows, targets]
        summary[v], side[v] = {}, {}
        for kind in kinds + ["all"]:
            m = np.array([kind in ("all", p["kind"]) for p in proposals])
            summary[v][kind] = _summary(pv[m], at[m])
            vals = [out_props[i]["side_effects"][v] for i in np.flatnonzero(m)]
            rhos = [s["spearman"] for s in vals if s["spearman"] is not None]
            rs = [s["pearson"] for s in vals if s["pearson"] is not None]
            side[v][kind] = {
                "spearman": _mean_se(rhos),
                "pearson": _mean_se(rs),
                "n_undefined": len(vals) - len(rhos),
            }
    by_kind = {k: [p for p in out_props if p["kind"] == k] for k in kinds}
    removal = {
        k: dict(
            _mean_se([p["actual_change"] for p in by_kind[k]]),
            slots_replaced=float(
                np.mean([np.isin(base_cur[p["id"]], p["removed"]).sum() for p in by_kind[k]])
            ),
        )
        for k in REMOVAL_KINDS
        if k in by_kind
    }
    paired = {}
    if "remove-random" in by_kind:
        rand = {(p["test"], p["base_run"]): p["actual_change"] for p in by_kind["remove-random"]}
        for k in ("remove-top", "remove-bottom"):
            diffs = [
                p["actual_change"] - rand[(p["test"], p["base_run"])]
                for p in by_kind.get(k, [])
                if (p["test"], p["base_run"]) in rand
            ]
            if diffs:
                paired[f"{k} minus remove-random"] = _mean_se(diffs)
    optimize = None
    if "optimize" in by_kind:
        opt = by_kind["optimize"]
        optimize = {
            "actual_change": _mean_se([p["actual_change"] for p in opt]),
            "predicted_change": _mean_se(
                [p["predicted_change"][data["settings"]["proposer"]] for p in opt]
            ),
            "beats_base_run": int(sum(p["actual_change"] < 0 for p in opt)),
            "n": len(opt),
            "rows": [
                {
                    "id": p["id"],
                    "test": p["test"],
                    "base_run": p["base_run"],
                    "base_final": p["base_final"],
                    "actual_final": p["base_final"] + p["actual_change"],
                    "predicted_final": p["proposer_predicted_final"],
                }
                for p in opt
            ],
        }
    return {
        "experiment": str(exp_dir),
        "experiment_sha256": data["experiment_sha256"],
        "settings": data["settings"],
        "simulator_files": {**files, **{v: None for v in _NO_CHANGE}},
        "simulator_sha256": {**data["simulator_sha256"], **extra_sha},
        "extra_simulator_files": sorted(extra),
        "baselines": {
            v: "predicts no change for a curriculum of the base run's length" for v in _NO_CHANGE
        },
        "change": f"target's final {metric} in the counterfactual run minus in the base run",
        "step0_mismatch": step0,
        "proposals": out_props,
        "summary": summary,
        "side_effects_summary": side,
        "removal_effect": {"by_kind": removal, "paired": paired},
        "optimize": optimize,
        "metric": metric,
        "flip": flips,
        "provenance": runlog.provenance(),
    }


def _flip_summary(proposals: list[dict], cf_runs: Sequence[Run], base: dict[int, Run]) -> dict:
    """Predicted against actual flips of the targets' predictions (``flip`` and ``flip-random``).

    A flip: the target's final margin in the trained counterfactual run has the other sign
    (> 0 or not) than in its base run. Rates are split by whether the base run gets the target
    right (final margin > 0).
    """
    margins_cf = choice_metrics.with_metric(list(cf_runs), "margin")
    margins_base = {r.index: r for r in choice_metrics.with_metric(list(base.values()), "margin")}
    rows = []
    for p, r in zip(proposals, margins_cf, strict=True):
        if p["kind"] not in ("flip", "flip-random"):
            continue
        before = float(margins_base[p["base_run"]].losses[-1][p["test"]])
        after = float(r.losses[-1][p["test"]])
        rows.append(
            {
                "id": p["id"],
                "kind": p["kind"],
                "test": p["test"],
                "base_run": p["base_run"],
                "k": p["k"],
                "base_correct": bool(before > 0),
                "base_margin": before,
                "actual_margin": after,
                "actual_flip": bool((after > 0) != (before > 0)),
                "predicted_flip": p["flip"]["predicted_flip"] if p["kind"] == "flip" else None,
                "predicted_margin": p["flip"]["predicted_margin"] if p["kind"] == "flip" else None,
            }
        )
    predicted = {(r["test"], r["base_run"]) for r in rows if r["predicted_flip"]}

    def rate(sel: list[dict]) -> dict:
        n = len(sel)
        hits = sum(r["actual_flip"] for r in sel)
        return {"flipped": hits, "n": n, "rate": hits / n if n else None}

    summary = {}
    for kind in ("flip", "flip-random"):
        mine = [r for r in rows if r["kind"] == kind]
        pred = [r for r in mine if (r["test"], r["base_run"]) in predicted]
        summary[kind] = {
            "all": rate(mine),
            "predicted_flip": rate(pred),
            "not_predicted": rate([r for r in mine if (r["test"], r["base_run"]) not in predicted]),
            "base_correct": rate([r for r in pred if r["base_correct"]]),
            "base_wrong": rate([r for r in pred if not r["base_correct"]]),
        }
    return {
        "definition": "a flip: the target's final margin (best wrong answer's loss minus the "
        "gold one's) changes sign between the base run and the trained counterfactual run; "
        "'predicted_flip' rows are the targets whose flip search found a k, 'base_correct' and "
        "'base_wrong' split those by the base run's prediction; flip-random removes the same k "
        "at random",
        "n_targets": sum(r["kind"] == "flip" for r in rows),
        "n_predicted": len(predicted),
        "summary": summary,
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and (abs(x) >= 1e3 or (x != 0 and abs(x) < 1e-3)):
        return f"{x:.2e}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _pm(d: dict, digits: int = 4) -> str:
    if d.get("mean") is None:
        return "—"
    se = d.get("stderr")
    return _fmt(d["mean"], digits) + ("" if se is None else f" ± {_fmt(se, digits)}")


def format_report(report: dict) -> str:
    """The markdown of ``report.md``.

    Args:
        report: the dict from `score`.

    Returns:
        Markdown text: settings, the per-variant and per-kind summary, the removal effect, the
        optimised curricula and side effects, with undefined values as dashes and their reasons.
    """
    s = report["settings"]
    kinds = [k for k in (*KINDS, "all") if k in next(iter(report["summary"].values()))]
    n = len(report["proposals"])
    lines = [
        f"# Counterfactual check of {report['experiment']}",
        "",
        f"{n} proposals trained from the experiment's starting state (proposer: "
        f"{s['proposer']}; k = {s['k']}; base runs {s['base_runs']}; target test examples "
        f"{s['tests']}; seed {s['seed']}). A change is the target's final loss in the "
        "counterfactual run minus its final loss in the base run; predicted changes roll each "
        "simulator out on both curricula from the base run's observed initial losses. "
        "`constant` and `mean-trajectory` predict no change.",
        "",
        "## Predicted against actual change of the target's final loss",
        "",
        "Per variant (rows) and proposal kind (columns): Spearman's ρ across proposals, then "
        "sign agreement (share of proposals whose predicted and actual change have the same "
        "sign), then mean absolute error. Pearson's r is in report.json.",
    ]
    notes: dict[str, int] = {}

    def note(reason: str | None) -> str:
        if not reason:
            return ""
        notes.setdefault(reason, len(notes) + 1)
        return f" [{notes[reason]}]"

    n_kind = {k: next(iter(report["summary"].values()))[k]["n"] for k in kinds}
    head = "| variant | " + " | ".join(f"{k} (n={n_kind[k]})" for k in kinds) + " |"
    rule = "|---|" + "---|" * len(kinds)
    cells = (
        ("Spearman ρ", lambda d: _fmt(d["spearman"]) + note(d["undefined_reason"])),
        ("sign agreement", lambda d: _fmt(d["sign_agreement"]) + note(d["sign_undefined_reason"])),
        ("mean absolute error", lambda d: _fmt(d["mae"], 4)),
    )
    for title, cell in cells:
        lines += ["", f"**{title}**", "", head, rule]
        for v, per in report["summary"].items():
            lines.append(f"| {v} | " + " | ".join(cell(per[k]) for k in kinds) + " |")
    lines += [""] + [f"[{i}] {r}" for r, i in notes.items()]
    rem = report["removal_effect"]
    if rem["by_kind"]:
        lines += [
            "",
            "## Removal: actual change of the target's final loss (mean ± standard error)",
            "",
            "| kind | actual change | n | slots replaced per proposal |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {_pm(d)} | {d['n']} | {d['slots_replaced']:.1f} |"
            for k, d in rem["by_kind"].items()
        ]
        lines += [
            f"| {k} (paired by target) | {_pm(d)} | {d['n']} | |" for k, d in rem["paired"].items()
        ]
        lines += [
            "",
            "`remove-random` draws k examples of the base curriculum uniformly, so it replaces "
            "fewer slots than the informed kinds when these pick frequent examples; part of the "
            "gap to it is that.",
        ]
    opt = report.get("optimize")
    if opt:
        lines += [
            "",
            f"## Optimize: the {s['proposer']} simulator's best curriculum for the target",
            "",
            f"Actual change {_pm(opt['actual_change'])} (predicted "
            f"{_pm(opt['predicted_change'])}); lower final loss than the base run in "
            f"{opt['beats_base_run']} of {opt['n']}.",
            "",
            "| test | base run | base final | actual final | predicted final |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['test']} | {r['base_run']} | {_fmt(r['base_final'], 4)} | "
            f"{_fmt(r['actual_final'], 4)} | {_fmt(r['predicted_final'], 4)} |"
            for r in opt["rows"]
        ]
    if report.get("flip"):
        lines += _format_flip(report["flip"], s)
    lines += [
        "",
        "## Side effects: predicted against actual change over all tracked test examples",
        "",
        "Mean ± standard error over proposals of the per-proposal Spearman ρ across the tracked "
        "test examples (undefined for the baselines, which predict no change).",
        "",
        "| variant | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    for v, per in report["side_effects_summary"].items():
        lines.append(f"| {v} | " + " | ".join(_pm(per[k]["spearman"], 3) for k in kinds) + " |")
    if report.get("step0_mismatch"):
        lines += [
            "",
            f"Warning: the step-0 losses of proposals {report['step0_mismatch']} differ from "
            "their base runs' (trained on another machine or software?).",
        ]
    return "\n".join(lines) + "\n"


def _format_flip(flip: dict, settings: dict) -> list[str]:
    """The report's flip section: predicted against actual flips, beside random removal."""

    def cell(d: dict) -> str:
        return "—" if d["rate"] is None else f"{d['flipped']}/{d['n']} = {d['rate']:.2f}"

    ks = ", ".join(map(str, settings.get("flip_ks", FLIP_KS)))
    lines = [
        "",
        "## Flip: removals that the margin simulator predicts flip the target's prediction",
        "",
        f"Per target, the smallest top-k removal (k in {ks}; the examples that most support the "
        f"current sign first, by {settings['proposer']} fitted on the margin, "
        f"{settings.get('flip_sim')}) whose predicted final margin has the other sign; "
        f"flip-random removes the same k at random. The search predicted a flip for "
        f"{flip['n_predicted']} of {flip['n_targets']} targets. Actual flip: the target's final "
        "margin changes sign in the trained run.",
        "",
        "| removal | targets with a predicted flip | base run right | base run wrong | "
        "no predicted flip (k = largest) |",
        "|---|---|---|---|---|",
    ]
    for kind, d in flip["summary"].items():
        lines.append(
            f"| {kind} | {cell(d['predicted_flip'])} | {cell(d['base_correct'])} | "
            f"{cell(d['base_wrong'])} | {cell(d['not_predicted'])} |"
        )
    lines += [
        "",
        "| test | base run | k | base margin | predicted margin | actual margin (flip) | "
        "flip-random margin |",
        "|---|---|---|---|---|---|---|",
    ]
    rand = {(r["test"], r["base_run"]): r for r in flip["rows"] if r["kind"] == "flip-random"}
    for r in flip["rows"]:
        if r["kind"] != "flip":
            continue
        other = rand.get((r["test"], r["base_run"]))
        lines.append(
            f"| {r['test']} | {r['base_run']} | {r['k']} | {r['base_margin']:+.4f} | "
            f"{r['predicted_margin']:+.4f} | {r['actual_margin']:+.4f} "
            f"({'yes' if r['actual_flip'] else 'no'}) | "
            + ("—" if other is None else f"{other['actual_margin']:+.4f}")
            + " |"
        )
    return lines


def write_report(exp_dir: str | os.PathLike, report: dict) -> list[Path]:
    """Writes ``report.json``, ``report.md`` and ``predicted_vs_actual.png`` atomically.

    Args:
        exp_dir: experiment folder (the files go to ``EXP/counterfactual``).
        report: the dict from `score`.

    Returns:
        The written paths.
    """
    from simfluence.plots import plot_counterfactual

    folder = runlog.counterfactual_dir(exp_dir)
    props = report["proposals"]
    # The baselines predict no change: a vertical line at 0 in every panel; left out.
    variants = [v for v in report["summary"] if v not in _NO_CHANGE]
    titles = {v: f"{v} (ρ = {_fmt(report['summary'][v]['all']['spearman'], 2)})" for v in variants}
    png = plot_counterfactual(
        folder / REPORT_PNG,
        {titles[v]: [p["predicted_change"][v] for p in props] for v in variants},
        [p["actual_change"] for p in props],
        [p["kind"] for p in props],
        title="counterfactual check: change of the target's final loss (ρ: Spearman over all "
        "proposals; constant and mean-trajectory predict 0)",
    )
    md = runlog.atomic_write_text(folder / REPORT_MD, format_report(report))
    js = runlog.atomic_write_json(folder / REPORT_JSON, report)
    return [js, md, png]
