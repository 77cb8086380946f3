"""Fit every simulator on one split of an experiment's runs and score it on held-out runs.

The split is by run index among the complete runs: the first `n_fit` runs fit the simulators,
the next `n_valid` choose the ridge strengths (Simfluence variants only), the next `n_test` are
scored. Scores per variant (see `simfluence.scoring`):

- the paper's metrics: all-steps MSE and final-step Spearman (mean +- stderr over held-out runs);
- final-step MSE (mean +- stderr over held-out runs);
- `lds` (the linear datamodeling score, with curricula in place of random subsets; the key
  `across_run_spearman` is kept as an alias with the same value): per test example, Spearman
  across held-out runs of simulated vs true
  final loss, averaged over test examples, i.e. does the simulator capture the curriculum; its
  stderr is a delete-one jackknife over held-out runs (`stderr_method` in the JSON), since the
  test examples share the runs and their rhos are strongly correlated;
- `skill_vs_mean_trajectory`: 1 - all-steps MSE / all-steps MSE of the mean-trajectory baseline;
- `across_run_spearman_vs_linear`: the paired difference of across-run rho, variant minus
  `linear`, on the same held-out runs, with a delete-one jackknife stderr of the difference
  (`scoring.across_run_spearman_difference`): the two rhos share the runs, so whether one
  variant beats the other is judged by this stderr, not by the two separate ones.

Metrics are computed in float64 (`scoring.host_metrics`), so a huge but finite rollout gets
huge but finite scores; a variant whose rollout or any metric is not finite is reported as
undefined (every metric None, with the reason), and the other variants are still scored.

References:
    Guu et al., "Simfluence", 2023. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from simfluence import baselines, momentum, scheduled, simulators, tracin
from simfluence.runlog import (
    Run,
    RunLogError,
    experiment_sha256,
    list_runs,
    load_runs,
    read_experiment,
)

# Names, not the module: the package may re-export the function `metrics` under the same name.
from simfluence.scoring import (
    ACROSS_RUN_STDERR_METHOD,
    across_run_spearman,
    across_run_spearman_difference,
    host_metrics,
    mean_stderr,
    skill_score,
)

__all__ = ["ALL_VARIANTS", "DEFAULT_SPLIT", "evaluate", "default_variants", "check_variants"]

ALL_VARIANTS = tuple(
    dict.fromkeys(
        simulators.VARIANTS
        + baselines.BASELINES
        + tracin.TRACIN_VARIANTS
        + scheduled.SCHEDULED_VARIANTS
        + momentum.MOMENTUM_VARIANTS
    )
)
_SIMFLUENCE = simulators.VARIANTS + scheduled.SCHEDULED_VARIANTS + momentum.MOMENTUM_VARIANTS
DEFAULT_SPLIT = (20, 2, 10)


def check_variants(variants: Sequence[str]) -> list[str]:
    """Validate variant names (order kept, duplicates dropped).

    Args:
        variants: names from `ALL_VARIANTS` (surrounding spaces are stripped).

    Returns:
        The names, in the order given, each once.

    Raises:
        ValueError: an unknown name, naming the choices.
    """
    return check_names(variants, ALL_VARIANTS, "variant")


def check_names(names: Sequence[str], choices: Sequence[str], what: str) -> list[str]:
    """Names from ``choices`` (stripped; order kept, duplicates dropped), else a one-line error.

    Args:
        names: the names given (e.g. a comma-separated flag split at the commas).
        choices: the allowed names.
        what: what a name is, for the message ("variant", "proposal kind").

    Returns:
        The names, in the order given, each once.

    Raises:
        ValueError: an unknown name, or none, naming the choices.
    """
    out: list[str] = []
    for v in names:
        v = v.strip()
        if v not in choices:
            raise ValueError(f"unknown {what} {v!r}; choose from {', '.join(choices)}")
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError(f"no {what} given; choose from {', '.join(choices)}")
    return out


def default_variants(fit_runs: Sequence[Run], other_runs: Sequence[Run] = ()) -> list[str]:
    """Simfluence variants and baselines, plus TracIn-CP and the schedule-aware variants when
    the runs allow them.

    Args:
        fit_runs: the fitting runs.
        other_runs: the validation and held-out runs (they need lr.npy for the -lr variants).

    Returns:
        Variant names in `ALL_VARIANTS` order: TracIn-CP (tracin-cp-momentum included) when a
        fitting run has tracin.npz; linear-lr, additive-lr and linear-lr-momentum when every
        run has lr.npy; linear-lr-tracin-prior when both; linear-momentum always.
    """
    out = list(simulators.VARIANTS + baselines.BASELINES)
    has_tracin = tracin.has_tracin(fit_runs)
    if has_tracin:
        out += list(tracin.TRACIN_VARIANTS)
    if all(r.lr is not None for r in [*fit_runs, *other_runs]):
        out += [v for v in scheduled.SCHEDULED_VARIANTS if v not in scheduled.PRIOR_VARIANTS]
        if has_tracin:
            out += list(scheduled.PRIOR_VARIANTS)
    out += [v for v in momentum.MOMENTUM_VARIANTS if v not in scheduled.SCHEDULED_VARIANTS]
    return [v for v in ALL_VARIANTS if v in out]


def _check_split(split: Sequence[int]) -> tuple[int, int, int]:
    try:
        parts = tuple(int(x) for x in split)
    except (TypeError, ValueError):
        raise ValueError(f"split {split!r} must be three integers FIT,VALID,TEST") from None
    if len(parts) != 3 or min(parts) < 0:
        raise ValueError(f"split {split!r} must be three non-negative integers FIT,VALID,TEST")
    n_fit, _, n_test = parts
    if n_fit < 1:
        raise ValueError(f"split {parts}: at least one fitting run is needed")
    if n_test < 2:
        raise ValueError(
            f"split {parts}: at least 2 held-out test runs are needed (standard errors and "
            "across-run Spearman need two or more)"
        )
    return parts


def _momentum_choice(name, fit_runs, valid_runs, n_train, a_prior, grid, l2_a, l2_b):
    """(l2_a, l2_b, source, search, fit inputs: {"decay": d} and the -lr variant's "lrs")
    of a momentum variant.

    The decay d is chosen with the lambdas on the validation runs, never on held-out runs
    (`momentum.select`); given lambdas fix the lambda grid to that pair. Without validation
    runs: d is `momentum.DEFAULT_DECAY` (AdamW's beta_1) with the default (or given) lambdas.
    """
    inputs = scheduled.fit_inputs(fit_runs, name)  # the -lr variant's "lrs"
    if not valid_runs:
        given = l2_a is not None
        la = float(l2_a) if given else simulators.DEFAULT_L2_A
        lb = float(l2_b) if given else simulators.DEFAULT_L2_B
        source = "given" if given else "default"
        return la, lb, source, None, {**inputs, "decay": momentum.DEFAULT_DECAY}
    fixed = None if l2_a is None else [(float(l2_a), float(l2_b))]
    d, la, lb, search = momentum.select(
        [r.curriculum for r in fit_runs],
        [r.losses for r in fit_runs],
        [r.curriculum for r in valid_runs],
        [r.losses for r in valid_runs],
        n_train=n_train,
        variant=name,
        a_prior=a_prior,
        grid=grid if fixed is None else fixed,
        valid_lrs=scheduled.run_lrs(valid_runs, name) if inputs else None,
        **inputs,
    )
    return la, lb, "validation" if fixed is None else "given", search, {**inputs, "decay": d}


def _at(search: list[dict], sim) -> list[dict]:
    """The lambda-search rows at the simulator's decay (all rows for a variant without one)."""
    return [r for r in search if r.get("decay", sim.decay) == sim.decay]


def _predict_simfluence(sim, runs: Sequence[Run]) -> list[np.ndarray]:
    """Rollouts grouped by run length (one vmapped call per length)."""
    out: dict[int, np.ndarray] = {}
    by_len: dict[int, list[int]] = {}
    for k, r in enumerate(runs):
        by_len.setdefault(r.steps, []).append(k)
    lrs = (
        scheduled.run_lrs(runs, sim.variant)
        if sim.variant in scheduled.SCHEDULED_VARIANTS
        else None
    )
    for ks in by_len.values():
        curs = np.stack([runs[k].curriculum for k in ks])
        l0 = np.stack([runs[k].losses[0] for k in ks])
        lr = None if lrs is None else np.stack([lrs[k] for k in ks])
        preds = np.asarray(simulators.simulate_many(sim, curs, l0, lr), dtype=np.float32)
        for k, p in zip(ks, preds, strict=True):
            out[k] = p
    return [out[k] for k in range(len(runs))]


def _runs_text(indices: Iterable[int]) -> str:
    return ", ".join(map(str, indices))


def _score(preds: Sequence[np.ndarray], runs: Sequence[Run]) -> dict:
    """Scores of one variant's rollouts (finite) on the held-out runs, in float64."""
    per_mse, per_rho, per_fmse = [], [], []
    for p, r in zip(preds, runs, strict=True):
        m = host_metrics(p, r.losses)
        per_mse.append(float(m["all_steps_mse"]))
        per_fmse.append(float(m["final_step_mse"]))
        rho = float(m["final_step_spearman"])
        per_rho.append(rho if math.isfinite(rho) else None)
    for name, vals in (("all-steps MSE", per_mse), ("final-step MSE", per_fmse)):
        bad = [r.index for v, r in zip(vals, runs, strict=True) if not math.isfinite(v)]
        if bad:
            return _undefined_scores(
                f"the {name} is not finite on held-out run(s) {_runs_text(bad)} (the simulated "
                "losses are too large to square even in float64: the simulator diverges)",
                len(runs),
            )
    defined = [v for v in per_rho if v is not None]
    n_undefined = len(per_rho) - len(defined)
    undefined_runs = _runs_text(r.index for v, r in zip(per_rho, runs, strict=True) if v is None)
    why = (
        "the final simulated or true losses are equal across test examples on held-out run(s) "
        f"{undefined_runs}"
    )
    if defined:
        rho = mean_stderr(defined)
        rho.update(
            n_runs=len(per_rho),
            n_undefined=n_undefined,
            undefined_reason=why if n_undefined else None,
        )
    else:
        rho = {
            "mean": None,
            "stderr": None,
            "n_runs": len(per_rho),
            "n_undefined": n_undefined,
            "undefined_reason": "the final simulated losses are equal across test examples in "
            "every held-out run"
            if all(np.ptp(p[-1]) == 0 for p in preds)
            else why,
        }
    across = across_run_spearman(
        np.stack([p[-1] for p in preds]), np.stack([r.losses[-1] for r in runs])
    )
    return {
        "all_steps_mse": mean_stderr(per_mse),
        "final_step_spearman": rho,
        "final_step_mse": mean_stderr(per_fmse),
        "across_run_spearman": across,
        "per_run": {
            "all_steps_mse": per_mse,
            "final_step_spearman": per_rho,
            "final_step_mse": per_fmse,
        },
    }


LDS_KEY = "lds"  # alias: "across_run_spearman", the same value
REFERENCE_VARIANT = "linear"  # the variant every other one is paired against
_VS_REF = f"across_run_spearman_vs_{REFERENCE_VARIANT}"


def _versus(finals: dict, name: str, ref: str, true_final: np.ndarray) -> dict:
    """`scoring.across_run_spearman_difference` of variant ``name`` minus ``ref`` on the
    held-out runs, with the reference named; undefined when either has no finite rollout."""
    missing = [v for v in dict.fromkeys((name, ref)) if v not in finals]
    if missing:
        return {
            "mean": None,
            "stderr": None,
            "stderr_method": ACROSS_RUN_STDERR_METHOD,
            "stderr_undefined_reason": None,
            "n_runs": len(true_final),
            "undefined_reason": f"no finite rollout of {' and '.join(missing)} on the held-out "
            "runs (not evaluated, or undefined)",
            "reference": ref,
        }
    out = across_run_spearman_difference(finals[name], finals[ref], true_final)
    return {**out, "reference": ref}


def _skill(mse: dict, ref: dict) -> tuple[float | None, str | None]:
    """(skill vs the mean trajectory, None) or (None, why it is undefined)."""
    if mse["mean"] is None:
        return None, f"the all-steps MSE is undefined: {mse.get('undefined_reason')}"
    if ref["mean"] is None:
        return None, (
            "the mean-trajectory baseline's all-steps MSE is undefined: "
            f"{ref.get('undefined_reason')}"
        )
    score = skill_score(mse["mean"], ref["mean"])
    if score is None:
        return None, "the mean-trajectory baseline has zero all-steps MSE"
    return score, None


def _finite(x: np.ndarray) -> bool:
    return bool(np.isfinite(x).all())


def _undefined_scores(reason: str, n_runs: int) -> dict:
    """Scores of a variant whose rollouts are not finite: every metric undefined, with why."""
    undef = {"mean": None, "stderr": None, "undefined_reason": reason}
    return {
        "all_steps_mse": dict(undef),
        "final_step_spearman": dict(undef, n_runs=n_runs, n_undefined=n_runs),
        "final_step_mse": dict(undef),
        "across_run_spearman": dict(
            undef,
            n_runs=n_runs,
            stderr_method=ACROSS_RUN_STDERR_METHOD,
            stderr_undefined_reason=None,
            n_used=0,
            n_excluded=0,
            n_constant_prediction=0,
        ),
        "per_run": {},
    }


def _experiment_name(exp_dir: Path, info: dict) -> str:
    config = info.get("config")
    for name in (info.get("name"), config.get("name") if isinstance(config, dict) else None):
        if isinstance(name, str) and name:  # top level, or the config `finetune run` records
            return name
    resolved = exp_dir.resolve()
    # `runs/<config>/output` layouts: the config folder names the experiment.
    return resolved.parent.name if resolved.name == "output" else resolved.name


def evaluate(
    exp_dir: str | os.PathLike,
    split: Sequence[int] = DEFAULT_SPLIT,
    variants: Sequence[str] | None = None,
    l2_a: float | None = None,
    l2_b: float | None = None,
    a_prior: float | None = None,
    *,
    grid=None,
    progress: bool = False,
    save_dir: str | os.PathLike | None = None,
) -> dict:
    """Fit, choose lambdas, and score every requested variant on one experiment.

    Args:
        exp_dir: experiment folder (run-log format of `simfluence.runlog`).
        split: (n_fit, n_valid, n_test) numbers of complete runs, taken in index order.
        variants: names from `ALL_VARIANTS`; None -> linear, additive, multiplicative, constant,
            mean-trajectory; tracin-cp, tracin-cp-rescaled when a fitting run has tracin.npz;
            linear-lr, additive-lr when every run of the split has lr.npy; and
            linear-lr-tracin-prior when both (see `default_variants`).
        l2_a, l2_b: fixed ridge strengths for the Simfluence variants (give both or neither);
            None -> chosen on the validation runs with `simulators.select_lambdas`, or the
            simulators' defaults when n_valid is 0.
        a_prior: value A is shrunk towards; None -> 1/batch.
        grid: lambda grid passed to `select_lambdas` (None = its default log grid, extended
            by decades while the best point lies on its edge; a given grid is used as is).
        progress: show a tqdm progress bar on stderr.
        save_dir: if given, every variant (Simfluence, TracIn-CP and the baselines) is also
            saved there as ``sim_<variant>.npz`` (with its origin: experiment hash, fitting and
            validation runs, the lambda search), the same file `simfluence fit` writes for
            that variant and split.

    Returns:
        JSON-ready dict: `{"variants": {name: {"all_steps_mse": {"mean", "stderr"},
        "final_step_spearman": {"mean", "stderr", "n_runs", "n_undefined", "undefined_reason"},
        "final_step_mse": {"mean", "stderr"}, "across_run_spearman": {"mean", "stderr",
        "stderr_method", "stderr_undefined_reason", "n_runs", "n_used", "n_excluded",
        "n_constant_prediction", "undefined_reason"}, "lds": the same as across_run_spearman
        (its name; the old key is an alias), "skill_vs_mean_trajectory": float | None,
        "skill_undefined_reason": str | None, "l2_a": float | None, "l2_b": float | None,
        "per_run": {...}, "across_run_spearman_vs_linear": {"mean", "stderr", "stderr_method",
        "stderr_undefined_reason", "n_runs", "undefined_reason", "reference"}, ...}},
        "split": {"fit": [...], "valid": [...], "test": [...]},
        "experiment": {"name", "path", "n_train", "n_test", "batch", "info"}}`.
        The stderr of the per-run metrics (all-steps MSE, final-step rho and MSE) is over
        held-out runs (ddof=1); that of `across_run_spearman` is a delete-one jackknife over
        held-out runs (see `scoring.across_run_spearman`). The final-step rho averages the
        runs where it is defined; `n_undefined` of `n_runs` are left out. A variant whose
        rollout or metrics are not finite has every metric None with `undefined_reason`.
        Simfluence variants whose lambdas were chosen on validation runs also hold
        "lambda_search" (every evaluated point, see `simulators.select_lambdas`),
        "lambda_grid" ("default": the default grid, extended at its edges up to
        `simulators.DEFAULT_GRID_CAPS`; "given": `grid` as given), "lambda_at_edge" (bool:
        a chosen lambda is the largest or smallest value searched on its axis, so the choice
        is limited by the search range) and "lambda_edges" ({"l2_a"/"l2_b": "upper"|"lower"}
        for those axes). With the default grid an edge is a cap, and a warning says so.

    Raises:
        RunLogError: bad run logs, or a split asking for more complete runs than exist.
        ValueError: fewer than 2 test examples, unknown variant, bad split or lambdas.
    """
    exp_dir = Path(exp_dir)
    n_fit, n_valid, n_heldout = _check_split(split)
    info = read_experiment(exp_dir)
    if info["n_test"] < 2:
        raise ValueError(
            f"{exp_dir / 'experiment.json'}: n_test={info['n_test']}; final-step Spearman "
            "across test examples needs at least 2 test examples"
        )
    if variants is not None:
        variants = check_variants(variants)
    if (l2_a is None) != (l2_b is None):
        raise ValueError("give both l2_a and l2_b, or neither (then they are chosen on validation)")
    runs = load_runs(exp_dir)
    needed = n_fit + n_valid + n_heldout
    if needed > len(runs):
        n_inc = sum(1 for _, _, c in list_runs(exp_dir) if not c)
        raise RunLogError(
            f"{exp_dir}: split {n_fit},{n_valid},{n_heldout} needs {needed} complete runs but "
            f"there are {len(runs)} ({n_inc} incomplete); finish more runs or use a smaller split"
        )
    fit_runs = runs[:n_fit]
    valid_runs = runs[n_fit : n_fit + n_valid]
    test_runs = runs[n_fit + n_valid : needed]
    if variants is None:
        variants = default_variants(fit_runs, [*valid_runs, *test_runs])
    n_train = info["n_train"]
    fit_c = [r.curriculum for r in fit_runs]
    fit_l = [r.losses for r in fit_runs]

    from tqdm import tqdm

    origin = None
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        origin = {
            "experiment_sha256": experiment_sha256(exp_dir),
            "fit_runs": [r.index for r in fit_runs],
            "valid_runs": [r.index for r in valid_runs],
        }

    # The mean trajectory is the reference of the skill score: always computed.
    delta = baselines.fit_mean_trajectory(fit_l)
    mean_preds = [baselines.mean_trajectory(delta, r.losses[0], r.steps) for r in test_runs]
    mean_scores = _score(mean_preds, test_runs)

    results: dict[str, dict] = {}
    finals: dict[str, np.ndarray] = {}  # variant -> [held-out runs, n_test] final losses
    bar = tqdm(variants, desc="evaluate", file=sys.stderr, disable=not progress, leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        extra: dict = {"l2_a": None, "l2_b": None}
        if name in momentum.MOMENTUM_VARIANTS:
            la, lb, source, search, inputs = _momentum_choice(
                name, fit_runs, valid_runs, n_train, a_prior, grid, l2_a, l2_b
            )
        elif name in _SIMFLUENCE:
            inputs = scheduled.fit_inputs(fit_runs, name)  # lrs, b_prior of the -lr variants
            if l2_a is not None:
                la, lb, source, search = float(l2_a), float(l2_b), "given", None
            elif n_valid > 0:
                la, lb, search = simulators.select_lambdas(
                    fit_c,
                    fit_l,
                    [r.curriculum for r in valid_runs],
                    [r.losses for r in valid_runs],
                    n_train=n_train,
                    variant=name,
                    a_prior=a_prior,
                    grid=grid,
                    valid_lrs=scheduled.run_lrs(valid_runs, name) if inputs else None,
                    **inputs,
                )
                source = "validation"
            else:
                la, lb, source, search = (
                    simulators.DEFAULT_L2_A,
                    simulators.DEFAULT_L2_B,
                    "default",
                    None,
                )
        if name in _SIMFLUENCE:
            sim = simulators.fit(
                fit_c,
                fit_l,
                n_train=n_train,
                variant=name,
                l2_a=la,
                l2_b=lb,
                a_prior=a_prior,
                **inputs,
            )
            if save_dir is not None:  # with the lambda search, as `fit --valid-runs` records it
                # (momentum variants: the search at the chosen decay, the curve `figures` draws)
                own = origin if search is None else {**origin, "lambda_search": _at(search, sim)}
                simulators.save_simulator(save_dir / f"sim_{name}.npz", sim, origin=own)
            preds = _predict_simfluence(sim, test_runs)
            # An ablation ignores one lambda: report it as None (not applicable), not 0.
            extra = {
                "l2_a": None if name in ("additive", "additive-lr") else float(sim.l2_a),
                "l2_b": None if name == "multiplicative" else float(sim.l2_b),
                "a_prior": float(sim.a_prior),
                "lambda_source": source,
            }
            if sim.lr_max is not None:
                extra["lr_max"] = float(sim.lr_max)
            if sim.decay is not None:
                extra["decay"] = float(sim.decay)
                extra["decay_source"] = "default" if search is None else "validation"
            if search is not None:
                extra["lambda_search"] = search
                # Whether the choice is limited by the searched range: with the default grid
                # an edge is a cap of its extension, with a given grid the grid's own edge.
                edges = simulators.lambda_edges(_at(search, sim), name, la, lb)
                extra["lambda_grid"] = "default" if grid is None and source != "given" else "given"
                extra["lambda_at_edge"] = bool(edges)
                extra["lambda_edges"] = edges
        elif name in baselines.BASELINES:
            if save_dir is not None:  # no lambdas: no validation runs, as `fit` records it
                baselines.save_baseline(
                    save_dir / f"sim_{name}.npz",
                    baselines.fit_baseline(name, fit_l, n_train),
                    origin={**origin, "valid_runs": []},
                )
            if name == "constant":
                preds = [baselines.constant(r.losses[0], r.steps) for r in test_runs]
            else:
                preds = mean_preds
        else:  # TracIn-CP variants
            if name == momentum.TRACIN_MOMENTUM:  # d chosen on the validation runs
                tsim, dsearch = momentum.tracin_from_runs(fit_runs, valid_runs)
                extra["decay"] = float(tsim.decay)
                extra["decay_source"] = "validation" if dsearch else "default"
                extra["decay_search"] = dsearch
            else:
                tsim, dsearch = tracin.from_runs(fit_runs, variant=name), []
            if save_dir is not None:
                # TracIn-CP has no lambdas: validation runs only where they chose the decay,
                # as `fit` records it.
                used = [r.index for r in valid_runs] if dsearch else []
                tracin.save_tracin_simulator(
                    save_dir / f"sim_{name}.npz", tsim, origin={**origin, "valid_runs": used}
                )
            preds = [
                tracin.simulate_tracin(tsim, r.curriculum, r.losses[0], r.lr) for r in test_runs
            ]
            extra["scale"] = float(tsim.scale)
            extra["tracin_runs"] = list(tsim.source_runs)
        diverged = [r.index for p, r in zip(preds, test_runs, strict=True) if not _finite(p)]
        if diverged:
            scores = _undefined_scores(
                f"the simulated losses are not finite on held-out run(s) "
                f"{', '.join(map(str, diverged))} (the simulator diverges)",
                len(test_runs),
            )
        elif name == "mean-trajectory":
            scores = mean_scores
        else:
            scores = _score(preds, test_runs)
        if not diverged and scores["all_steps_mse"]["mean"] is not None:
            finals[name] = np.stack([p[-1] for p in preds])
        entry = {k: scores[k] for k in scores if k != "per_run"}
        # The linear datamodeling score (LDS, with curricula in place of random subsets) is
        # the across-run rho; "across_run_spearman" stays as an alias of it.
        entry[LDS_KEY] = dict(entry["across_run_spearman"])
        skill, why = _skill(scores["all_steps_mse"], mean_scores["all_steps_mse"])
        entry["skill_vs_mean_trajectory"] = skill
        entry["skill_undefined_reason"] = why
        entry.update(extra)
        entry["per_run"] = scores["per_run"]
        results[name] = entry
    bar.close()
    true_final = np.stack([r.losses[-1] for r in test_runs])
    for name, entry in results.items():
        entry[_VS_REF] = _versus(finals, name, REFERENCE_VARIANT, true_final)
    return {
        "variants": results,
        "split": {
            "fit": [r.index for r in fit_runs],
            "valid": [r.index for r in valid_runs],
            "test": [r.index for r in test_runs],
        },
        "experiment": {
            "name": _experiment_name(exp_dir, info),
            "path": str(exp_dir),
            "n_train": n_train,
            "n_test": info["n_test"],
            "batch": fit_runs[0].batch,
            "n_complete_runs": len(runs),
            "info": info,
        },
        "reference": (
            "skill_vs_mean_trajectory = 1 - all_steps_mse / all_steps_mse(mean-trajectory)"
        ),
    }
