"""Counterfactual runs: train the curricula a simulator proposed, which the experiment never drew.

``simfluence counterfactual propose EXP`` writes proposals (``EXP/counterfactual/proposals.json``
and ``proposals.npz``, `simfluence.runlog.write_proposals`): curricula derived from the
experiment's own runs (examples removed, batches reordered, ...) whose tracked test losses a
simulator predicts. `run_counterfactuals` trains each one exactly as given into
``EXP/counterfactual/run_XXX/`` (XXX: the proposal id), so the predictions can be checked against
the truth. `simfluence.runlog.load_counterfactual_runs` reads them; ``load_runs(EXP)`` never sees
them, and nothing under ``EXP/run_XXX`` is written.

Everything but the curriculum is EXP's: the pool and tracked set (``data.npz``), the warm-up
(restored from ``EXP/warmup``, never trained again), the initial trainable state, the optimizer,
the schedule and every seed (the config in experiment.json), and the trainer's set-up and jitted
programs (`finetune.trainer`).

Vmap width: a group of runs trains in one vmapped program whose numerics may depend on its width
R (on CPU, R = 1 and R = 3 give the same step-0 losses but training steps that differ in the last
bits). Proposals train in groups as wide as their base run's group in EXP (``runs_together``, or
fewer for EXP's last group), a group short of proposals padded with copies of its last
proposal's curriculum that train but are never written (copies leave each step's padded batch
length unchanged). So a counterfactual run's step-0 losses equal its base run's bitwise. A
proposal whose curriculum is its base run's reproduces the base run's whole losses.npy bitwise
when every step pads its batches to the same length in both groups (always when
``length_multiple >= max_input_length``; with ``train_length_groups`` the length groups also
depend on the other runs of the group).

Resume: counterfactual runs save no checkpoints (a paper-scale check trains thousands).
Complete runs are kept; a group with an incomplete run trains again from step 0 with the same
members and padding, and writes its incomplete runs bitwise identical to an uninterrupted call.

References:
    Simfluence: Guu et al. 2023, https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Int

from finetune import experiment as E
from finetune import trainer as T
from finetune.config import ExperimentConfig
from finetune.metrics import DEFAULT_LOG_EVERY, LiveMetrics, check_log_every, check_report_to
from simfluence import runlog

__all__ = ["run_counterfactuals"]


@dataclass
class _Plan:
    """What a call trains, fixed by the proposals and EXP's config alone (so every call of the
    same proposals forms the same groups with the same padding)."""

    config: ExperimentConfig
    folder: Path  # EXP/counterfactual
    proposals: list[dict]  # proposals.json's list; proposal p is the run key p
    groups: list[list[int]]  # run keys trained together; keys >= len(proposals) are padding
    curricula: dict[int, np.ndarray]  # run key -> int32 [steps, batch] (padding included)
    meta: dict[int, dict]  # proposal id -> meta.json fields added to the trainer's
    complete: dict[int, bool]  # proposal id -> its run is complete


def _ids(plan: _Plan, group: Sequence[int]) -> list[int]:
    """The proposal ids of a group (its padding left out)."""
    return [k for k in group if k < len(plan.proposals)]


def _make_groups(
    widths: Sequence[int], curricula: Int[np.ndarray, "P T b"]
) -> tuple[list[list[int]], dict[int, np.ndarray]]:
    """Groups proposals by the vmap width of their base run, padded to that width.

    Args:
        widths: per proposal, the width of its base run's group in EXP.
        curricula: int32 [P, T, b], the proposals' curricula.

    Returns:
        (groups of run keys, in order of their widths (widest first) and then of the ids;
        run key -> curriculum), where keys P, P+1, ... are padding: copies of the curriculum
        of the last proposal of their group.
    """
    n = len(widths)
    by_width: dict[int, list[int]] = {}
    for p, w in enumerate(widths):
        by_width.setdefault(w, []).append(p)
    groups: list[list[int]] = []
    keys = {p: curricula[p] for p in range(n)}
    pad = n
    for w in sorted(by_width, reverse=True):
        ids = by_width[w]
        for i in range(0, len(ids), w):
            group = ids[i : i + w]
            source = curricula[group[-1]]
            for _ in range(w - len(group)):
                keys[pad] = source
                group.append(pad)
                pad += 1
            groups.append(group)
    return groups, keys


def _plan(exp_dir: Path, budget: int | None) -> _Plan:
    """Reads and checks everything a call needs; writes nothing.

    Args:
        exp_dir: the experiment folder.
        budget: ``max_steps_this_call`` (None: no limit).

    Returns:
        The `_Plan`.

    Raises:
        ExperimentError, RunLogError, ConfigError: EXP not made by ``finetune run`` (no config,
            data.npz or warm-up), no or malformed proposals, curricula of another length or
            batch size, a base run missing or incomplete in EXP, a run folder of other
            proposals in EXP/counterfactual, or a ``budget`` too small for one group.
    """
    from finetune.config import ConfigError

    try:
        config = E.read_config(exp_dir)
    except ConfigError as e:
        raise E.ExperimentError(
            f"{exp_dir / 'experiment.json'}: not an experiment made by `finetune run` (its "
            f"config is not a finetune config: {e}); counterfactual runs train finetune "
            "experiments only"
        ) from None
    E.check_backend(config)
    fix_exp = f"finish the experiment with `finetune run CONFIG --out {exp_dir}` first"
    if not (exp_dir / E.DATA_FILE).is_file():
        raise E.ExperimentError(
            f"{exp_dir / E.DATA_FILE} not found; {exp_dir} was not prepared by finetune run "
            f"({fix_exp})"
        )
    if config.warmup is not None and not E.warmup_path(exp_dir).is_dir():
        raise E.ExperimentError(
            f"{E.warmup_path(exp_dir)} not found: the warm-up of {exp_dir} has not run and "
            f"counterfactual runs never train it; {fix_exp}"
        )
    folder = runlog.counterfactual_dir(exp_dir)
    props = runlog.read_proposals(exp_dir)
    if props is None:
        raise E.ExperimentError(
            f"{folder / runlog.PROPOSALS_FILE} not found; run `simfluence counterfactual "
            f"propose {exp_dir} ...` first"
        )
    if props.get("experiment_sha256") != runlog.experiment_sha256(exp_dir):
        raise E.ExperimentError(
            f"{folder / runlog.PROPOSALS_FILE} was proposed for another experiment.json than "
            f"{exp_dir}'s; delete {folder} and propose again"
        )
    cur, sha, proposals = props["curricula"], props["curricula_sha256"], props["proposals"]
    n, steps, batch = cur.shape
    if (steps, batch) != (config.steps, config.batch_size):
        raise E.ExperimentError(
            f"{folder / runlog.PROPOSAL_CURRICULA_FILE}: proposal curricula have {steps} steps "
            f"of {batch} examples, but {exp_dir} trains steps={config.steps}, "
            f"batch_size={config.batch_size}; propose again for this experiment"
        )
    in_exp = {i: c for i, _, c in runlog.list_runs(exp_dir)}
    width = {r: len(g) for g in T._groups(config) for r in g}
    for p in proposals:
        r = p["base_run"]
        if r not in width or not in_exp.get(r):
            state = "incomplete" if r in in_exp else "missing"
            raise E.ExperimentError(
                f"{folder / runlog.PROPOSALS_FILE}: proposal {p['id']} has base_run {r}, "
                f"{state} in {exp_dir} (run_{r:03d}); finish its runs with `finetune run` or "
                "propose again"
            )
    complete = dict.fromkeys(range(n), False)
    for i, path, done in runlog.list_runs(folder):
        stale = ""
        cur_path = path / runlog.CURRICULUM_FILE
        if i >= n:
            stale = f"is not one of the {n} proposals of {folder / runlog.PROPOSALS_FILE}"
        elif cur_path.is_file() and not np.array_equal(_read_npy(cur_path), cur[i]):
            stale = f"holds another curriculum than proposal {i}"
        elif done:
            old = json.loads((path / runlog.META_FILE).read_text(encoding="utf-8"))
            old = old.get("proposals_sha256") if isinstance(old, dict) else None
            if old != sha:
                stale = (
                    f"was trained for other proposals (proposals_sha256 {str(old)[:12]}..., "
                    f"not {sha[:12]}...)"
                )
        if stale:
            raise E.ExperimentError(
                f"{path} {stale}; delete {folder} and propose again (or delete its run_* "
                "folders to train the current proposals)"
            )
        complete[i] = done
    groups, curricula = _make_groups([width[p["base_run"]] for p in proposals], cur)
    meta = {
        p["id"]: {
            "curriculum_seed": None,  # not drawn: the proposal's curriculum
            "proposal_id": p["id"],
            "kind": p["kind"],
            "base_run": p["base_run"],
            "test": p["test"],
            "proposals_sha256": sha,
        }
        for p in proposals
    }
    plan = _Plan(config, folder, proposals, groups, curricula, meta, complete)
    todo = _todo(plan)
    if budget is not None and todo:
        ids = _ids(plan, todo[0])
        why = T._too_few_steps(
            config, ids, 0, budget, checkpoints=False, what="counterfactual runs"
        )
        if why:
            raise E.ExperimentError(f"{why} (counterfactual runs save no checkpoints)")
    return plan


def _read_npy(path: Path) -> np.ndarray:
    """np.load of a run file, or a one-line error naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # truncated, object arrays, not .npy
        raise E.ExperimentError(
            f"{path}: cannot read ({type(e).__name__}: {' '.join(str(e).split())}); delete "
            f"{path.parent} to train it again"
        ) from None


def _todo(plan: _Plan) -> list[list[int]]:
    """The groups with an incomplete proposal, in training order."""
    return [g for g in plan.groups if not all(plan.complete[k] for k in _ids(plan, g))]


def run_counterfactuals(
    exp_dir: str | Path,
    *,
    devices: Sequence | None = None,
    progress: bool = True,
    max_steps_this_call: int | None = None,
    report_to: str | Sequence[str] | None = None,
    log_every: int = DEFAULT_LOG_EVERY,
) -> dict:
    """Trains (or continues) the counterfactual runs of an experiment's proposals.

    Proposal p's curriculum trains exactly as given into ``EXP/counterfactual/run_{p:03d}``
    (curriculum.npy, losses.npy, lr.npy, metrics.jsonl, meta.json last), from EXP's starting
    state with EXP's optimizer, schedule and seeds, in groups as wide as its base run's group
    (see the module docstring). Every check runs before anything is trained or written.

    Args:
        exp_dir: an experiment folder made by ``finetune run`` holding proposals written by
            `simfluence.runlog.write_proposals`.
        devices: devices of the data-parallel mesh (default: all).
        progress: show a tqdm bar over runs and steps (False: batch-log lines on stderr, see
            `finetune.trainer.run_experiment`).
        max_steps_this_call: train only the whole groups this many group steps cover (each
            group trains the config's ``steps``; no checkpoints, so a group cut short would keep
            nothing); a budget below one group is refused. Run again to continue.
        report_to: live metric sinks (`finetune.metrics`; event files in
            EXP/counterfactual/tensorboard/runs_<first>-<last>/), None or "none" for neither.
        log_every: log the live metrics every this many steps (and at each group's end).

    Returns:
        {"complete": [proposal ids], "trained": [proposal ids written by this call],
        "interrupted": bool (the budget left groups to train), "stop": None or {"runs": the
        proposal ids of the first group not trained, "step": 0, "kept_step": 0}, "seconds":
        float, "proposals": int P, "folder": Path of EXP/counterfactual}.

    Raises:
        ExperimentError, RunLogError, ConfigError: bad input, nothing written (see `_plan`).
        CheckpointError: the config's pretrained model cannot be loaded (nothing written).
        NonFiniteLossError: a loss became non-finite (names the proposals and the step).
    """
    start = time.perf_counter()
    exp_dir = Path(exp_dir)
    sinks, log_every = check_report_to(report_to), check_log_every(log_every)
    plan = _plan(exp_dir, max_steps_this_call)
    config = plan.config
    todo = _todo(plan)
    if max_steps_this_call is not None:
        n_fit = max_steps_this_call // config.steps  # >= 1 when todo (checked by _plan)
        todo, left = todo[:n_fit], todo[n_fit:]
    else:
        left = []
    trained: list[int] = []
    if todo:
        import jax

        ctx = T._setup(
            config,
            exp_dir,
            base=E.build_base_model(config),
            runs_dir=plan.folder,
            curricula=plan.curricula,
            devices=devices,
            progress=progress,
            train_warmup=False,
            metrics=LiveMetrics(
                config.name,
                plan.folder,
                report_to=sinks if jax.process_index() == 0 else (),  # one writer
                log_every=log_every,
                lines=not progress,
                config=json.loads(json.dumps(config.to_dict(), default=str)),
            ),
        )
        ctx.meta, ctx.checkpoints = plan.meta, False
        # A report of the proposals scored before this call no longer describes the folder.
        for name in runlog.COUNTERFACTUAL_REPORT_FILES:
            (plan.folder / name).unlink(missing_ok=True)
        n = len(plan.proposals)
        done = sum(plan.complete.values()) * config.steps
        ctx.bar = T._progress_bar(f"{config.name} counterfactual", n * config.steps, done, progress)
        for i, group in enumerate(todo):
            write = [k for k in _ids(plan, group) if not plan.complete[k]]
            T._train_group(
                ctx, group, write, 0, None, position=(i, len(todo)), keys=_ids(plan, group)
            )
            for k in write:
                plan.complete[k] = True
            trained += write
        ctx.bar.close()
    return {
        "complete": sorted(k for k, c in plan.complete.items() if c),
        "trained": sorted(trained),
        "interrupted": bool(left),
        "stop": {"runs": _ids(plan, left[0]), "step": 0, "kept_step": 0} if left else None,
        "seconds": time.perf_counter() - start,
        "proposals": len(plan.proposals),
        "folder": plan.folder,
    }
