"""Scoring simulators on examples never seen: four settings of (training, test) examples.

`evaluate_unseen` fits on the fitting runs' losses of the *fitted* test examples and scores on

- ``seen/seen``: held-out runs over the fitting pool, fitted test examples;
- ``unseen-train``: runs containing pool examples no fitting or validation run contains
  (experiment.json ``held_out_pool`` and ``held_out_runs``, written by ``finetune run`` with
  ``held_out_pool_fraction``), fitted test examples;
- ``unseen-test``: held-out runs over the fitting pool, test examples given by
  ``test_examples`` (never fitted on: their losses are read only to score);
- ``both-unseen``: runs with unseen training examples, unseen test examples.

Methods: the featurized variants (`simfluence.featurized`) per feature kind, with and without
the per-pair residual (seen test examples only); Simfluence-Linear (seen test examples only; an
unseen training example keeps its prior A = 1/batch, B = 0, i.e. no effect); TracIn-CP
rescaled (dots cover every pool and tracked example; the scale is fitted on the fitted test
examples only); the constant and mean-trajectory baselines (for unseen test examples the mean
trajectory pooled over the fitted test examples). Metrics are `simfluence.evaluation`'s:
all-steps MSE, within-run final-step Spearman across test examples, across-run Spearman (LDS)
and skill against the mean trajectory, each with its standard error.

Hyperparameters (feature dimension, lambdas, residual strength) are chosen on validation runs
only. With unseen test examples the featurized variants are chosen for generalising to other
test examples: fitted on half of the fitted test examples and validated on the other half.

References:
    Guu et al. 2023, Simfluence. https://arxiv.org/abs/2303.08114
    Chai et al. 2024, GPTfluence (the four settings). https://arxiv.org/abs/2404.07840
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simfluence import baselines, featurized, scheduled, simulators, tracin
from simfluence.evaluation import DEFAULT_SPLIT, _check_split, _finite, _score, _skill
from simfluence.runlog import (
    FEATURE_KINDS,
    Run,
    RunLogError,
    load_runs,
    read_experiment,
    read_features,
)

__all__ = ["SETTINGS", "evaluate_unseen"]

SETTINGS = ("seen/seen", "unseen-train", "unseen-test", "both-unseen")


def _cols(runs: Sequence[Run], idx: np.ndarray) -> list[Run]:
    return [dataclasses.replace(r, losses=r.losses[:, idx]) for r in runs]


def _rollouts(sim: simulators.Simulator, runs: Sequence[Run]) -> list[np.ndarray]:
    """Rollouts of per-pair tables (float64 numpy, tested equal to `simulators.simulate`)."""
    lr = sim.variant in scheduled.SCHEDULED_VARIANTS
    return [
        featurized._rollout_np(sim, r.curriculum, r.losses[0], r.lr if lr else None) for r in runs
    ]


def _lrs(runs: Sequence[Run]) -> list[np.ndarray] | None:
    """The runs' lr.npy, or None when one has none (then every fit is schedule-free)."""
    return None if any(r.lr is None for r in runs) else [r.lr for r in runs]


def _entry(preds, runs, mean_scores, extra) -> dict:
    diverged = [r.index for p, r in zip(preds, runs, strict=True) if not _finite(p)]
    if diverged:
        return {"undefined_reason": f"not finite on runs {diverged}", **extra}
    scores = _score(preds, runs)
    skill, why = _skill(scores["all_steps_mse"], mean_scores["all_steps_mse"])
    out = {k: scores[k] for k in scores if k != "per_run"}
    out.update(skill_vs_mean_trajectory=skill, skill_undefined_reason=why, **extra)
    return out


def parse_indices(text: str, n: int, flag: str = "--test-examples") -> list[int]:
    """``"25-49"`` or ``"0,3,5-7"`` -> sorted indices in 0..n-1, else a one-line ValueError."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
            else:
                lo = hi = int(part)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: expected indices like 25-49 or 0,3,5-7") from None
        if lo < 0 or hi < lo or hi >= n:
            raise ValueError(f"{flag} {text!r}: {part} is outside 0..{n - 1} (n_test={n})")
        out.update(range(lo, hi + 1))
    return sorted(out)


def _held_out(info: dict, exp_dir: Path, runs: list[Run]) -> tuple[list[int], list[int]]:
    pool = [int(i) for i in info.get("held_out_pool", []) or []]
    held_runs = [int(i) for i in info.get("held_out_runs", []) or []]
    bad = [i for i in pool if not 0 <= i < info["n_train"]]
    if bad:
        raise RunLogError(
            f"{exp_dir / 'experiment.json'}: held_out_pool has positions {bad[:5]} outside "
            f"0..{info['n_train'] - 1}; the file is damaged: prepare the experiment again"
        )
    return pool, held_runs


def evaluate_unseen(
    exp_dir: str | os.PathLike,
    split: Sequence[int] = DEFAULT_SPLIT,
    test_examples: Sequence[int] | None = None,
    *,
    kinds: Sequence[str] | None = None,
    variants: Sequence[str] = featurized.FEAT_VARIANTS,
    dims: Sequence[int] = featurized.DEFAULT_DIMS,
    grid: Sequence[float] = featurized.DEFAULT_GRID,
    residual_grid: Sequence[float] = featurized.DEFAULT_RESIDUAL_GRID,
    linear_grid: Sequence[float] | None = None,
    progress: bool = False,
) -> dict:
    """Fits on the fitted test examples and scores the four settings (module docstring).

    Args:
        exp_dir: experiment folder with EXP/features/<kind>.npz (`finetune features`).
        split: (n_fit, n_valid, n_test) complete runs, in index order, among the runs that
            contain no held-out pool example.
        test_examples: tracked test examples (column indices) never fitted on; None: no
            unseen test examples (those settings are reported as undefined).
        kinds: feature kinds (default: every kind with a features file).
        variants: featurized variants.
        dims, grid, residual_grid: validation search of `featurized.select` and of the residual.
        linear_grid: lambda grid of Simfluence-Linear (None: `select_lambdas`' default search;
            a warning it gives, e.g. a lambda at a cap, is recorded under "selection").
        progress: a line per step on stderr.

    Returns:
        JSON-ready dict {"settings": {setting: {"runs", "tests", "variants": {name: scores}} or
        {"undefined_reason"}}, "selection": {...}, "split": {...}, "experiment": {...}}.

    Raises:
        RunLogError: bad run logs, too few runs, a fitting run with a held-out pool example.
        ValueError: no features, bad test_examples, fewer than 2 fitted or unseen tests.
    """
    exp_dir = Path(exp_dir)
    info = read_experiment(exp_dir)
    n_fit, n_valid, n_held = _check_split(split)
    if n_valid < 1:
        raise ValueError(
            f"--split {n_fit},{n_valid},{n_held}: the featurized variants choose their feature "
            "size and lambdas on validation runs; give VALID >= 1"
        )
    n_test, n_train = info["n_test"], info["n_train"]
    unseen_t = np.asarray(sorted(set(test_examples or [])), np.int64)
    seen_t = np.setdiff1d(np.arange(n_test), unseen_t)
    if len(seen_t) < 4 or (len(unseen_t) and len(unseen_t) < 2):
        raise ValueError(
            f"--test-examples leaves {len(seen_t)} fitted and {len(unseen_t)} unseen test "
            "examples; keep at least 4 fitted and 2 unseen"
        )
    kinds = list(kinds) if kinds else [k for k in FEATURE_KINDS if _has(exp_dir, k)]
    if not kinds:
        raise ValueError(
            f"{exp_dir}: no features/<kind>.npz; run `finetune features {exp_dir}` (make "
            "features) first"
        )
    feats = {}
    for k in kinds:
        f = read_features(exp_dir, k)
        if f is None:
            raise ValueError(f"{exp_dir}: no features/{k}.npz; run `finetune features {exp_dir}`")
        feats[k] = f
    runs = load_runs(exp_dir)
    held_pool, held_run_ids = _held_out(info, exp_dir, runs)
    regular = [r for r in runs if r.index not in set(held_run_ids)]
    held_runs = [r for r in runs if r.index in set(held_run_ids)]
    needed = n_fit + n_valid + n_held
    if needed > len(regular):
        raise RunLogError(
            f"{exp_dir}: split {n_fit},{n_valid},{n_held} needs {needed} complete runs without "
            f"held-out pool examples but there are {len(regular)}; use a smaller split"
        )
    fit_runs = regular[:n_fit]
    valid_runs = regular[n_fit : n_fit + n_valid]
    test_runs = regular[n_fit + n_valid : needed]
    held_set = np.zeros(n_train, bool)
    held_set[held_pool] = True
    for r in [*fit_runs, *valid_runs]:
        if held_set[r.curriculum].any():
            raise RunLogError(
                f"{r.path}: fitting/validation run {r.index} contains held-out pool examples "
                f"(experiment.json held_out_pool); it must not: use another --split"
            )

    def say(msg):
        if progress:
            print(f"evaluate --test-examples: {msg}", file=sys.stderr, flush=True)

    fc = [r.curriculum for r in fit_runs]
    fl = [r.losses[:, seen_t] for r in fit_runs]
    vc = [r.curriculum for r in valid_runs]
    # Schedule-aware featurized fits when every run logged its learning rates (lr.npy).
    every = [*fit_runs, *valid_runs, *test_runs, *held_runs]
    flr = _lrs(fit_runs) if _lrs(every) is not None else None
    vlr = _lrs(valid_runs) if flr is not None else None
    settings_runs = {
        "seen/seen": (test_runs, seen_t),
        "unseen-train": (held_runs, seen_t),
        "unseen-test": (test_runs, unseen_t),
        "both-unseen": (held_runs, unseen_t),
    }
    out_settings: dict[str, dict] = {}
    preds: dict[str, dict[str, list[np.ndarray]]] = {s: {} for s in SETTINGS}
    extras: dict[str, dict[str, dict]] = {s: {} for s in SETTINGS}

    def add(setting, name, p, extra=None):
        preds[setting][name] = p
        extras[setting][name] = extra or {}

    def live(setting):
        rs, idx = settings_runs[setting]
        return len(rs) > 0 and len(idx) > 0

    # Featurized variants: select on validation runs, fit on every fitted test example.
    selection = {}
    half = len(seen_t) // 2
    for kind in kinds:
        f = feats[kind]
        for v in variants:
            name = f"{v}[{kind}]"
            say(f"choosing {name} on validation runs")
            if len(unseen_t):  # choose for other test examples: fit on half, validate on half
                fit_t, valid_t = seen_t[:half], seen_t[half:]
                fit_losses = [r.losses[:, fit_t] for r in fit_runs]
                valid_feats = f["test"][valid_t]
            else:
                fit_t = valid_t = seen_t
                fit_losses, valid_feats = fl, None
            best, table = featurized.select(
                fc,
                fit_losses,
                vc,
                [r.losses[:, valid_t] for r in valid_runs],
                f["pool"],
                f["test"][fit_t],
                valid_feats,
                variant=v,
                dims=dims,
                grid=grid,
                basis_test=f["test"][seen_t],
                fit_lrs=flr,
                valid_lrs=vlr,
            )
            # The PCA bases are unsupervised: every pool example and every tracked test's
            # features (no loss of an unseen example is read).
            bphi = featurized.Basis.fit(f["pool"], best["dim"])
            bpsi = featurized.Basis.fit(f["test"], best["dim"])
            phi = bphi(f["pool"])
            fsim = featurized.fit(
                fc,
                fl,
                phi,
                bpsi(f["test"][seen_t]),
                variant=v,
                l2_a=best["l2_a"] or 0.0,
                l2_b=best["l2_b"],
                lrs=flr,
            )
            sel = {**best, "search_points": len(table), "schedule_aware": flr is not None}
            for setting in SETTINGS:
                if not live(setting):
                    continue
                rs, idx = settings_runs[setting]
                sim = fsim.tables(phi, bpsi(f["test"][idx]))
                add(setting, name, _rollouts(sim, _cols(rs, idx)), {"dim": best["dim"]})
            # The per-pair residual (seen test examples), its strength chosen on validation.
            say(f"choosing the residual of {name}")
            scores = []
            for lr_ in residual_grid:
                sim = featurized.with_residual(
                    fsim, fc, fl, phi, bpsi(f["test"][seen_t]), lr_, lrs=flr
                )
                mse = featurized._valid_mse(sim, vc, [r.losses[:, seen_t] for r in valid_runs], vlr)
                scores.append((mse, -lr_ if math.isfinite(lr_) else -math.inf, lr_, sim))
            mse, _, l2_r, rsim = min(scores, key=lambda s: (s[0], s[1]))
            sel["l2_r"] = None if math.isinf(l2_r) else l2_r
            sel["residual_valid_mse"] = mse
            selection[name] = sel
            for setting in ("seen/seen", "unseen-train"):
                if live(setting):
                    rs, idx = settings_runs[setting]
                    add(
                        setting,
                        f"{v}+res[{kind}]",
                        _rollouts(rsim, _cols(rs, idx)),
                        {"dim": best["dim"], "l2_r": sel["l2_r"]},
                    )

    # Simfluence-Linear (and its schedule-aware form) on the fitted test examples.
    for lin_variant in ("linear",) if flr is None else ("linear", "linear-lr"):
        say(f"choosing {lin_variant} on validation runs")
        kw = {} if lin_variant == "linear" else {"lrs": flr}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            la, lb, _ = simulators.select_lambdas(
                fc,
                fl,
                vc,
                [r.losses[:, seen_t] for r in valid_runs],
                n_train=n_train,
                variant=lin_variant,
                grid=linear_grid,
                valid_lrs=None if lin_variant == "linear" else vlr,
                **kw,
            )
            lin = simulators.fit(
                fc, fl, n_train=n_train, variant=lin_variant, l2_a=la, l2_b=lb, **kw
            )
        selection[lin_variant] = {
            "l2_a": la,
            "l2_b": lb,
            "warnings": sorted({str(w.message) for w in caught}),
        }
        for setting in ("seen/seen", "unseen-train"):
            if live(setting):
                rs, idx = settings_runs[setting]
                add(setting, lin_variant, _rollouts(lin, _cols(rs, idx)))

    # TracIn-CP rescaled: the scale fitted on the fitted test examples only.
    if tracin.has_tracin(fit_runs):
        tsim = tracin.from_runs(fit_runs, variant="tracin-cp")
        seen_sim = dataclasses.replace(tsim, dots=tsim.dots[:, seen_t])
        scale = tracin.fit_scale(seen_sim, _cols(fit_runs, seen_t))
        selection["tracin-cp-rescaled"] = {"scale": scale}
        for setting in SETTINGS:
            if live(setting):
                rs, idx = settings_runs[setting]
                s = dataclasses.replace(tsim, dots=tsim.dots[:, idx], scale=scale)
                add(
                    setting,
                    "tracin-cp-rescaled",
                    [tracin.simulate_tracin(s, r.curriculum, r.losses[0, idx], r.lr) for r in rs],
                )

    # Baselines, and the skill reference.
    delta = baselines.fit_mean_trajectory(fl)  # [T + 1, n_seen]
    pooled = delta.mean(axis=1, keepdims=True)  # one trajectory for a test example never fitted
    for setting in SETTINGS:
        rs, idx = settings_runs[setting]
        if not live(setting):
            why = (
                "no unseen test examples (give --test-examples)"
                if not len(idx)
                else "no runs with held-out pool examples (set held_out_pool_fraction in the "
                "experiment config)"
            )
            out_settings[setting] = {"undefined_reason": why}
            continue
        cols = _cols(rs, idx)
        d = delta if setting in ("seen/seen", "unseen-train") else np.repeat(pooled, len(idx), 1)
        mean_preds = [baselines.mean_trajectory(d, r.losses[0], r.steps) for r in cols]
        mean_scores = _score(mean_preds, cols)
        add(setting, "mean-trajectory", mean_preds)
        add(setting, "constant", [baselines.constant(r.losses[0], r.steps) for r in cols])
        entries = {
            name: _entry(p, cols, mean_scores, extras[setting][name])
            for name, p in preds[setting].items()
        }
        out_settings[setting] = {
            "runs": [r.index for r in rs],
            "tests": [int(i) for i in idx],
            "variants": entries,
        }
    return {
        "settings": out_settings,
        "selection": selection,
        "split": {
            "fit": [r.index for r in fit_runs],
            "valid": [r.index for r in valid_runs],
            "test": [r.index for r in test_runs],
            "held_out_runs": [r.index for r in held_runs],
            "fitted_tests": [int(i) for i in seen_t],
            "unseen_tests": [int(i) for i in unseen_t],
            "held_out_pool": held_pool,
        },
        "experiment": {
            "path": str(exp_dir),
            "n_train": n_train,
            "n_test": n_test,
            "batch": fit_runs[0].batch if fit_runs else None,
        },
        "metrics": {
            "all_steps_mse": "mean over runs of the mean over steps 1..T and test examples of "
            "(simulated - true loss)^2; stderr over runs",
            "final_step_spearman": "within-run: Spearman across test examples of simulated vs "
            "true loss after the last step, mean over runs; stderr over runs",
            "across_run_spearman": "LDS: per test example, Spearman across runs of simulated vs "
            "true final loss, mean over test examples; delete-one jackknife stderr over runs",
            "skill_vs_mean_trajectory": "1 - all_steps_mse / all_steps_mse(mean-trajectory)",
        },
    }


def _has(exp_dir: Path, kind: str) -> bool:
    from simfluence.runlog import features_path

    return features_path(exp_dir, kind).is_file()


def format_unseen(results: dict) -> str:
    """A markdown table per setting: MSE, within-run rho, LDS, skill (mean +- stderr)."""

    def ms(d):
        if not d or d.get("mean") is None:
            return "n/a"
        se = d.get("stderr")
        return f"{d['mean']:.4g} ± {se:.2g}" if se is not None else f"{d['mean']:.4g}"

    lines = []
    for setting, s in results["settings"].items():
        lines.append(f"### {setting}")
        if "variants" not in s:
            lines += [f"undefined: {s['undefined_reason']}", ""]
            continue
        lines.append(
            f"{len(s['runs'])} runs, {len(s['tests'])} test examples\n\n"
            "| method | all-steps MSE | within-run final-step ρ | LDS (across-run ρ) | skill |\n"
            "|---|---|---|---|---|"
        )
        for name, e in s["variants"].items():
            if "all_steps_mse" not in e:
                lines.append(f"| {name} | undefined: {e['undefined_reason']} | | | |")
                continue
            skill = e.get("skill_vs_mean_trajectory")
            lines.append(
                f"| {name} | {ms(e['all_steps_mse'])} | {ms(e['final_step_spearman'])} | "
                f"{ms(e['across_run_spearman'])} | "
                f"{'n/a' if skill is None else f'{skill:.3f}'} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"
