"""`simfluence` command line: evaluate, fit, simulate, influence, plot, demo-data, table, figures.

Each command parses its flags and calls library functions. Bad input (a RunLogError or
ValueError from the library, or bad flags) prints one line `simfluence: error: ...` on stderr and
exits with code 2; outputs are written atomically, so a failed command leaves no output file.

References:
    Guu et al., "Simfluence", 2023. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simfluence.runlog import RunLogError

PROG = "simfluence"
_DEBUG_ENV = "SIMFLUENCE_DEBUG"  # set to 1: tracebacks on errors, as --debug
_EPILOG = (
    "Experiment folders use the run-log format of simfluence.runlog: EXP/experiment.json and "
    "EXP/run_XXX/{curriculum.npy, losses.npy, meta.json}."
)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line and exit with code 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _fail(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


# ----------------------------------------------------------------------------------------------
# Argument parsing helpers
# ----------------------------------------------------------------------------------------------


def _parse_indices(text: str, flag: str) -> list[int]:
    """'0-19,22,25-27' -> [0, ..., 19, 22, 25, 26, 27] (order kept, duplicates dropped)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi or lo < 0:
                    raise ValueError
                items = range(lo, hi + 1)
            else:
                v = int(part)
                if v < 0:
                    raise ValueError
                items = [v]
            out.extend(i for i in items if i not in out)
    except ValueError:
        raise ValueError(
            f"{flag} {text!r}: expected non-negative indices and ranges like 0-19,22"
        ) from None
    if not out:
        raise ValueError(f"{flag} {text!r}: no index given")
    return out


def _parse_split(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0:
        raise ValueError(f"--split {text!r}: expected three non-negative integers FIT,VALID,TEST")
    return parts  # type: ignore[return-value]


def _load_array(path: str, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise RunLogError(f"{p}: {what} file not found")
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise RunLogError(f"{p}: cannot read {what} as .npy ({exc})") from exc
    if not isinstance(arr, np.ndarray):  # an .npz archive (NpzFile), not one array
        arr.close()
        raise RunLogError(
            f"{p}: {what} must be one array saved as .npy, not an .npz archive; "
            "save it with numpy.save"
        )
    return arr


def _load_inputs(args, sim) -> tuple[np.ndarray, np.ndarray]:
    """Curriculum int [T, b] and initial losses f32 [n_test], checked against the simulator."""
    cur = _load_array(args.curriculum, "curriculum")
    if not np.issubdtype(cur.dtype, np.integer) or cur.ndim != 2 or 0 in cur.shape:
        raise RunLogError(
            f"{args.curriculum}: curriculum must be integers [steps, batch], got "
            f"{cur.dtype} {cur.shape}"
        )
    if msg := sim.batch_mismatch(cur.shape[1]):
        raise RunLogError(f"{args.curriculum}: {msg}")
    if cur.min() < 0 or cur.max() >= sim.n_train:
        bad = int(cur.min()) if cur.min() < 0 else int(cur.max())
        raise RunLogError(
            f"{args.curriculum}: curriculum id {bad} is outside 0..{sim.n_train - 1} "
            f"(the simulator's training pool)"
        )
    l0 = _load_array(args.initial_losses, "initial losses")
    if not np.issubdtype(l0.dtype, np.floating) or l0.shape != (sim.n_test,):
        raise RunLogError(
            f"{args.initial_losses}: initial losses must be float [{sim.n_test}] (one per test "
            f"example of the simulator), got {l0.dtype} {l0.shape}"
        )
    if not np.isfinite(l0).all():
        raise RunLogError(f"{args.initial_losses}: initial losses contain NaN or inf")
    return cur.astype(np.int32), l0.astype(np.float32)


def _load_lr(args, sim, steps: int) -> np.ndarray | None:
    """--lr: float [steps] learning rates; required by the schedule-aware simulators, optional
    for TracIn-CP (else its checkpoints' rates), refused by the others."""
    if sim.lr_use == "ignored":
        if args.lr is not None:
            raise ValueError(
                f"--lr: the {sim.variant} simulator ignores the learning rates; leave it out"
            )
        return None
    if args.lr is None and sim.lr_use == "optional":
        sys.stderr.write(
            f"{PROG}: note: no --lr: the {sim.variant} simulator uses its checkpoints' learning "
            "rates (pass --lr LR.npy, the run's lr.npy, to use the run's own, as evaluate does)\n"
        )
        return None
    if args.lr is None:
        raise ValueError(
            f"{args.sim}: a {sim.variant} simulator scales each step by its learning rate; pass "
            "--lr LR.npy (float [steps], e.g. a run's lr.npy)"
        )
    lr = _load_array(args.lr, "learning rates")
    if not np.issubdtype(lr.dtype, np.floating) or lr.shape != (steps,):
        raise RunLogError(
            f"{args.lr}: learning rates must be float [{steps}] (one per step of "
            f"the curriculum), got {lr.dtype} {lr.shape}"
        )
    if not (np.isfinite(lr).all() and (lr >= 0).all()):
        raise RunLogError(f"{args.lr}: learning rates must be finite and >= 0")
    return lr.astype(np.float32)


def _run_lr(sim, run) -> np.ndarray | None:
    """A run's lr.npy where the simulator uses it (schedule-aware variants, TracIn-CP)."""
    return sim.run_lr(run, "use a schedule-free simulator for this run")


def _check_out(path: str, suffixes: Sequence[str], flag: str = "--out") -> Path:
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {p}: expected a file ending in {' or '.join(suffixes)}")
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder; give a file name")
    return p


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def _cmd_evaluate(args) -> None:
    from simfluence.evaluation import check_variants, evaluate
    from simfluence.runlog import atomic_write_json, experiment_owns
    from simfluence.table import format_results

    out = _check_out(args.out, [".json"]) if args.out else None
    if out is not None and experiment_owns(args.exp, out):
        raise ValueError(
            f"--out {out} is one of the experiment's own files and would be overwritten; "
            f"choose another path (e.g. {Path(args.exp) / 'results.json'})"
        )
    if args.test_examples is not None:
        _evaluate_unseen(args, out)
        return
    if args.features is not None:
        raise ValueError("--features selects the featurized variants of --test-examples; give both")
    variants = check_variants(args.variants.split(",")) if args.variants else None
    results = evaluate(
        args.exp,
        split=_parse_split(args.split) if args.split is not None else None,
        variants=variants,
        l2_a=args.l2_a,
        l2_b=args.l2_b,
        a_prior=args.a_prior,
        progress=sys.stderr.isatty(),
        metric=args.metric,
        save_dir=args.save_simulators,
    )
    if out is not None:
        atomic_write_json(out, results)
    if results["metric"] != "loss":
        sys.stdout.write(f"metric: {results['metric']} (every column scores its trajectory)\n")
    sys.stdout.write(format_results(results))
    if results["metric"] == "margin":
        sys.stdout.write(_format_sign_accuracy(results))
    if out is not None:
        sys.stdout.write(f"\nwrote {out}\n")


def _format_sign_accuracy(results: dict) -> str:
    """`evaluate --metric margin`: each variant's accuracy of the simulated final sign."""
    true = results["true_final_accuracy"]
    lines = [
        "",
        "Final-step sign accuracy (share of test examples whose simulated final margin has the "
        f"true sign; mean ± se over held-out runs). True accuracy of the held-out runs: "
        f"{true['mean']:.3f}" + ("" if true["stderr"] is None else f" ± {true['stderr']:.3f}"),
        "",
        "| variant | final sign accuracy |",
        "|---|---|",
    ]
    for name, e in results["variants"].items():
        acc = e.get("final_sign_accuracy") or {}
        cell = "—" if acc.get("mean") is None else f"{acc['mean']:.3f}"
        if acc.get("stderr") is not None:
            cell += f" ± {acc['stderr']:.3f}"
        lines.append(f"| {name} | {cell} |")
    return "\n".join(lines) + "\n"


def _check_metric_of(sim_path: str, metric: str) -> None:
    """Refuses a simulator file fitted on another metric than --metric."""
    from simfluence import choice_metrics, simulators

    choice_metrics.check_sim_metric(sim_path, simulators.read_origin(sim_path), metric)


def _evaluate_unseen(args, out) -> None:
    from simfluence.evaluation import resolve_split
    from simfluence.runlog import FEATURE_KINDS, atomic_write_json, read_experiment
    from simfluence.unseen import evaluate_unseen, format_unseen, parse_indices

    for flag in ("variants", "l2_a", "l2_b", "a_prior", "save_simulators"):
        if getattr(args, flag) is not None:
            name = "--" + flag.replace("_", "-")
            raise ValueError(
                f"{name} does not apply with --test-examples (the featurized variants, "
                "Simfluence-Linear, TracIn-CP rescaled and the baselines are all scored, their "
                "hyperparameters chosen on the validation runs); leave it out"
            )
    if args.metric != "loss":
        raise ValueError(
            f"--metric {args.metric}: --test-examples scores the loss only; leave --metric out"
        )
    info = read_experiment(args.exp)
    tests = parse_indices(args.test_examples, info["n_test"])
    kinds = None
    if args.features is not None:
        kinds = [k.strip() for k in args.features.split(",") if k.strip()]
        bad = [k for k in kinds if k not in FEATURE_KINDS]
        if bad or not kinds:
            raise ValueError(
                f"--features {args.features!r}: use one or more of {', '.join(FEATURE_KINDS)}"
            )
    results = evaluate_unseen(
        args.exp,
        split=resolve_split(args.exp, _parse_split(args.split) if args.split else None)[0],
        test_examples=tests,
        kinds=kinds,
        progress=sys.stderr.isatty(),
    )
    if out is not None:
        atomic_write_json(out, results)
    sys.stdout.write(format_unseen(results))
    if out is not None:  # stderr: stdout is the markdown table (make unseen keeps it as .md)
        sys.stderr.write(f"wrote {out}\n")


def _cmd_fit(args) -> None:
    from simfluence import choice_metrics, momentum, scheduled, simulators
    from simfluence.baselines import BASELINES
    from simfluence.runlog import experiment_sha256, load_runs, read_experiment
    from simfluence.tracin import TRACIN_VARIANTS

    metric = choice_metrics.check_metric(args.metric)
    if metric != "loss" and args.variant in TRACIN_VARIANTS + scheduled.PRIOR_VARIANTS:
        raise ValueError(
            f"--variant {args.variant} uses TracIn-CP's loss gradients and is loss-only; use "
            f"--metric loss, or a Simfluence variant for --metric {metric}"
        )

    out = _check_out(args.out, [".npz"])
    if (args.l2_a is None) != (args.l2_b is None):
        raise ValueError("give both --l2-a and --l2-b, or neither")
    if args.valid_runs and args.l2_a is not None:
        raise ValueError("--valid-runs chooses the lambdas; do not also give --l2-a/--l2-b")
    info = read_experiment(args.exp)
    fit_idx = _parse_indices(args.runs, "--runs")
    runs = choice_metrics.with_metric(load_runs(args.exp, fit_idx), metric)
    origin = {
        "experiment_sha256": experiment_sha256(args.exp),
        "fit_runs": fit_idx,
        "valid_runs": _parse_indices(args.valid_runs, "--valid-runs") if args.valid_runs else [],
    }
    if args.decay is not None:
        momentum.check_decay(args.decay, "--decay")
        if args.variant not in (*momentum.MOMENTUM_VARIANTS, momentum.TRACIN_MOMENTUM):
            raise ValueError(
                f"--decay is for the -momentum variants; leave it out for {args.variant}"
            )
    if metric != "loss":  # files without one are loss simulators (as before)
        origin["metric"] = metric
    if args.variant in TRACIN_VARIANTS:
        _fit_tracin(args, runs, out, origin, fit_idx)
        return
    if args.variant in ("linear-feat", "additive-feat"):
        _fit_featurized(args, runs, out, origin)
        return
    if args.features is not None:
        raise ValueError("--features is for --variant linear-feat or additive-feat; leave it out")
    if args.variant in BASELINES:
        _fit_baseline(args, runs, info, out, origin)
        return
    curs, losses = [r.curriculum for r in runs], [r.losses for r in runs]
    inputs = scheduled.fit_inputs(runs, args.variant)  # lrs, b_prior of the -lr variants
    if args.variant in momentum.MOMENTUM_VARIANTS:
        inputs["decay"] = momentum.DEFAULT_DECAY if args.decay is None else args.decay
    if args.valid_runs and args.variant in momentum.MOMENTUM_VARIANTS and args.decay is None:
        valid = choice_metrics.with_metric(_valid_runs(args, fit_idx), metric)
        sys.stderr.write(
            f"{PROG}: choosing the decay and lambdas for {args.variant} on {len(valid)} "
            "validation run(s)...\n"
        )
        inputs["decay"], l2_a, l2_b, search = momentum.select(
            curs,
            losses,
            [r.curriculum for r in valid],
            [r.losses for r in valid],
            n_train=info["n_train"],
            variant=args.variant,
            a_prior=args.a_prior,
            lrs=inputs.get("lrs"),
            valid_lrs=scheduled.run_lrs(valid, args.variant) if "lrs" in inputs else None,
        )
        source = f"chosen on runs {args.valid_runs}"
        # The validation curve at the chosen decay (`simfluence figures` draws it).
        origin["lambda_search"] = [r for r in search if r["decay"] == inputs["decay"]]
    elif args.valid_runs:
        valid = choice_metrics.with_metric(_valid_runs(args, fit_idx), metric)
        sys.stderr.write(
            f"{PROG}: choosing lambdas for {args.variant} on {len(valid)} validation run(s)...\n"
        )
        l2_a, l2_b, search = simulators.select_lambdas(
            curs,
            losses,
            [r.curriculum for r in valid],
            [r.losses for r in valid],
            n_train=info["n_train"],
            variant=args.variant,
            a_prior=args.a_prior,
            valid_lrs=scheduled.run_lrs(valid, args.variant) if "lrs" in inputs else None,
            **inputs,
        )
        source = f"chosen on runs {args.valid_runs}"
        origin["lambda_search"] = search  # the validation curve `simfluence figures` draws
    elif args.l2_a is not None:
        l2_a, l2_b, source = args.l2_a, args.l2_b, "given"
    else:
        l2_a, l2_b, source = simulators.DEFAULT_L2_A, simulators.DEFAULT_L2_B, "defaults"
    sim = simulators.fit(
        curs,
        losses,
        n_train=info["n_train"],
        variant=args.variant,
        l2_a=l2_a,
        l2_b=l2_b,
        a_prior=args.a_prior,
        **inputs,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    simulators.save_simulator(out, sim, origin=origin)
    print(
        f"fitted {args.variant} to the {metric} of {len(runs)} runs (n_test={sim.n_test}, "
        f"n_train={sim.n_train}); "
        f"l2_a={sim.l2_a:g}, l2_b={sim.l2_b:g} ({source}), a_prior={sim.a_prior:g}"
        + ("" if sim.lr_max is None else f", lr_max={sim.lr_max:g}")
        + ("" if sim.decay is None else f", decay={sim.decay:g}")
        + f"; wrote {out}"
    )


def _fit_featurized(args, runs, out: Path, origin: dict) -> None:
    """`fit --variant linear-feat|additive-feat`: the featurized tables of the whole pool."""
    from simfluence import featurized, simulators
    from simfluence.runlog import FEATURE_KINDS, load_runs, read_features

    if args.l2_a is not None or args.a_prior is not None:
        raise ValueError(
            f"--variant {args.variant} chooses its feature size and lambdas on --valid-runs; "
            "leave out --l2-a, --l2-b and --a-prior"
        )
    if not args.valid_runs:
        raise ValueError(f"--variant {args.variant} needs --valid-runs (e.g. 20-21)")
    kind = args.features or "tracin"
    if kind not in FEATURE_KINDS:
        raise ValueError(f"--features {kind!r}: use one of {', '.join(FEATURE_KINDS)}")
    feats = read_features(args.exp, kind)
    if feats is None:
        raise ValueError(
            f"{Path(args.exp) / 'features' / (kind + '.npz')} not found; run `finetune features "
            f"{args.exp}` (make features) first"
        )
    valid_idx = _parse_indices(args.valid_runs, "--valid-runs")
    overlap = sorted(set(valid_idx) & set(origin["fit_runs"]))
    if overlap:
        raise ValueError(f"--valid-runs {overlap} also appear in --runs; keep them apart")
    valid = load_runs(args.exp, valid_idx)
    sim, sel = featurized.fit_runs(runs, valid, feats, variant=args.variant)
    origin = {**origin, "featurized": args.variant, "features": kind, "selection": sel}
    out.parent.mkdir(parents=True, exist_ok=True)
    simulators.save_simulator(out, sim, origin=origin)
    lam = f"l2_b={sel['l2_b']:g}" + ("" if sel["l2_a"] is None else f", l2_a={sel['l2_a']:g}")
    print(
        f"fitted {args.variant} on {len(runs)} runs with {kind} features (dim {sel['dim']}, "
        f"{lam}, chosen on runs {args.valid_runs}; tables {sim.variant}); wrote {out}"
    )


def _fit_baseline(args, runs, info: dict, out: Path, origin: dict) -> None:
    """`fit --variant constant|mean-trajectory`: a curriculum-blind baseline file."""
    from simfluence import baselines

    if args.valid_runs or args.l2_a is not None or args.a_prior is not None:
        raise ValueError(
            f"--variant {args.variant} has no lambdas or prior; leave out --valid-runs, "
            "--l2-a, --l2-b and --a-prior"
        )
    sim = baselines.fit_baseline(args.variant, [r.losses for r in runs], info["n_train"])
    baselines.save_baseline(out, sim, origin=origin)
    print(
        f"fitted the {args.variant} baseline on {len(runs)} runs (n_test={sim.n_test}; it "
        f"ignores the curriculum); wrote {out}"
    )


def _valid_runs(args, fit_idx):
    """The --valid-runs of `fit`, loaded; refused when they overlap the fitting runs."""
    from simfluence.runlog import load_runs

    valid_idx = _parse_indices(args.valid_runs, "--valid-runs")
    overlap = sorted(set(valid_idx) & set(fit_idx))
    if overlap:
        raise ValueError(f"--valid-runs {overlap} also appear in --runs; keep them apart")
    return load_runs(args.exp, valid_idx)


def _fit_tracin(args, runs, out: Path, origin: dict, fit_idx) -> None:
    """`fit --variant tracin-cp[-rescaled|-momentum]`: the averaged dots of the fitting runs
    (and the least-squares scale; the decay chosen on --valid-runs) into a TracIn-CP file."""
    from simfluence import momentum, tracin

    spread = args.variant == momentum.TRACIN_MOMENTUM
    if (args.valid_runs and not spread) or args.l2_a is not None or args.a_prior is not None:
        raise ValueError(
            f"--variant {args.variant} has no lambdas or prior; leave out "
            + ("" if spread else "--valid-runs, ")
            + "--l2-a, --l2-b and --a-prior"
        )
    if spread:
        valid = _valid_runs(args, fit_idx) if args.valid_runs and args.decay is None else []
        sim, _ = momentum.tracin_from_runs(runs, valid, decay=args.decay)
    else:
        sim = tracin.from_runs(runs, variant=args.variant)
    tracin.save_tracin_simulator(out, sim, origin=origin)
    print(
        f"built {args.variant} from the tracin.npz of runs "
        f"{','.join(map(str, sim.source_runs))} (scale {sim.scale:g}"
        + (f", decay {sim.decay:g}" if spread else "")
        + f"); wrote {out}"
    )


def _cmd_simulate(args) -> None:
    from simfluence.loader import load_any_simulator
    from simfluence.runlog import atomic_save_npy

    out = _check_out(args.out, [".npy"])
    sim = load_any_simulator(args.sim)
    _check_metric_of(args.sim, args.metric)
    cur, l0 = _load_inputs(args, sim)
    lr = _load_lr(args, sim, cur.shape[0])
    pred = np.asarray(sim.rollout(cur, l0, lr=lr), np.float32)
    _check_rollout(pred, args.curriculum)
    atomic_save_npy(out, pred)
    print(
        f"simulated {cur.shape[0]} steps for {sim.n_test} test examples; final mean loss "
        f"{float(pred[-1].mean()):.6g} (initial {float(l0.mean()):.6g}); wrote {out} "
        f"float32 {list(pred.shape)}"
    )


def _check_rollout(pred: np.ndarray, where: str) -> None:
    """Refuses a simulated trajectory [steps + 1, n_test] holding NaN or inf, naming the step."""
    from simfluence.plots import check_finite_losses

    check_finite_losses(
        [pred],
        [where],
        range(pred.shape[-1]),
        "simulated",
        "the simulator diverges on this curriculum; refit it with larger --l2-a/--l2-b or use "
        "another curriculum",
    )


def _cmd_influence(args) -> None:
    from simfluence.loader import load_any_simulator
    from simfluence.plots import format_influences, influence_listing
    from simfluence.runlog import atomic_save_npy, atomic_write_json

    if args.all_tests:
        if args.out is None:
            raise ValueError("--all-tests writes a matrix: pass --out SCORES.npy")
        if args.exp is not None:
            raise ValueError(
                "--exp labels a listing, which --all-tests does not print; leave it out"
            )
        out = _check_out(args.out, [".npy"], "--out (with --all-tests)")
    else:
        out = _check_out(args.out, [".json"]) if args.out else None
    sim = load_any_simulator(args.sim)
    _check_metric_of(args.sim, args.metric)
    sim.require_influence()  # a baseline is refused, with the reason
    cur, l0 = _load_inputs(args, sim)
    lr = _load_lr(args, sim, cur.shape[0])
    if not args.all_tests and not 0 <= args.test < sim.n_test:
        raise ValueError(f"--test {args.test} is outside 0..{sim.n_test - 1}")
    if args.top < 1:
        raise ValueError(f"--top {args.top} must be >= 1")
    texts, ids = None, None
    if args.exp is not None:
        from simfluence.runlog import read_examples, read_experiment

        info = read_experiment(args.exp)  # a wrong --exp is an error, not a listing without texts
        _check_sim_matches(
            sim, info, args.sim, f"--exp {args.exp}", "pass the experiment it was fitted on"
        )
        texts = read_examples(args.exp)
        ids = _pool_ids(info, args.exp)
        if texts is None and ids is None:
            raise RunLogError(
                f"{args.exp}: no examples.json to take the texts from and no pool_ids in its "
                "experiment.json; leave out --exp"
            )
    _check_rollout(sim.rollout(cur, l0, lr=lr), args.curriculum)
    if args.all_tests:
        scores = sim.removal_influence(cur, l0, lr=lr)
        for j in range(sim.n_test):
            _check_influence(scores[j], f"{args.curriculum} (test example {j})")
        atomic_save_npy(out, scores)
        print(
            f"removal influence of {sim.n_train} training examples on {sim.n_test} test "
            f"examples (final loss without minus with); wrote {out} float32 "
            f"{list(scores.shape)} [n_test, n_train]"
        )
        return
    inf = sim.removal_influence(cur, l0, lr=lr, test_index=args.test)
    _check_influence(inf, args.curriculum)
    listing = influence_listing(inf, cur, args.top, texts["train"] if texts else None, ids)
    if out is not None:
        atomic_write_json(out, {"test_index": args.test, **listing})
    sys.stdout.write(
        format_influences(listing, args.test, texts["test"][args.test] if texts else None)
    )


def _pool_ids(info: dict, exp) -> list | None:
    """experiment.json "pool_ids" (dataset ids by pool position, from `finetune run`), if any."""
    ids = info.get("pool_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or len(ids) != info["n_train"]:
        raise RunLogError(
            f"{exp}: experiment.json pool_ids must be a list of {info['n_train']} dataset ids "
            f"(one per training example), got {type(ids).__name__}"
            + (f" of {len(ids)}" if isinstance(ids, list) else "")
            + "; repair experiment.json or leave out --exp"
        )
    return ids


def _check_influence(inf: np.ndarray, where: str) -> None:
    if not np.isfinite(inf).all():
        i = int(np.flatnonzero(~np.isfinite(inf))[0])
        raise ValueError(
            f"{where}: the removal influence of training example {i} is {inf[i]}: the "
            "simulator diverges without it; refit it with larger --l2-a/--l2-b"
        )


def _simulate_runs(sim, runs, name_sim: bool = False) -> list[np.ndarray]:
    """Rollouts [steps + 1, n_test] of `runs` from their L_0; a diverging one is an error
    (naming the run, and the simulator file when `name_sim`)."""
    preds = [sim.rollout(r.curriculum, r.losses[0], lr=_run_lr(sim, r)) for r in runs]
    for r, p in zip(runs, preds, strict=True):
        _check_rollout(p, f"{sim.name}: run {r.index}" if name_sim else f"run {r.index}")
    return preds


def _check_sim_matches(
    sim, info: dict, sim_path: str, exp: str, fix: str = "fit it on this experiment"
) -> None:
    if (sim.n_test, sim.n_train) != (info["n_test"], info["n_train"]):
        raise ValueError(
            f"{sim_path}: simulator has n_test={sim.n_test}, n_train={sim.n_train} but {exp} "
            f"has n_test={info['n_test']}, n_train={info['n_train']}; {fix}"
        )


def _check_tests(tests: list[int], n_test: int) -> None:
    bad = [j for j in tests if j >= n_test]
    if bad:
        raise ValueError(f"--tests {bad} outside 0..{n_test - 1}")


def _load_sims(text: str, info: dict, exp: str) -> list:
    """--sim A.npz[,B.npz...]: every file loaded (any family) and checked against EXP."""
    from simfluence.loader import load_any_simulator

    paths = [x.strip() for x in text.split(",") if x.strip()]
    if not paths:
        raise ValueError(f"--sim {text!r}: no simulator file given")
    sims = []
    for path in dict.fromkeys(paths):
        sim = load_any_simulator(path)
        _check_sim_matches(sim, info, path, exp)
        sims.append(sim)
    return sims


def _sim_labels(sims) -> list[str]:
    """One legend label per simulator: its variant, or the file stem where variants repeat."""
    variants = [s.variant for s in sims]
    return [
        s.variant if variants.count(s.variant) == 1 else f"{s.variant} ({Path(s.name).stem})"
        for s in sims
    ]


def _roles(sims, runs) -> list[str | None]:
    """Each run's role for the simulators (fitted / validation / held out; None: unknown)."""
    out = []
    for r in runs:
        roles = list(dict.fromkeys(s.role(r.index) for s in sims))
        out.append(None if None in roles else "/".join(roles))
    return out


def _role_title(roles: list[str | None], indices: list[int]) -> str:
    """'held-out run 22', 'fitted run 3; held-out runs 22-29' (runs grouped by role)."""
    groups: dict[str | None, list[int]] = {}
    for i, role in zip(indices, roles, strict=True):
        groups.setdefault(role, []).append(i)
    parts = []
    for role, idx in groups.items():
        name = f"run{'s' * (len(idx) > 1)} {_ranges(idx)}"
        parts.append(f"{role.replace(' ', '-')} {name}" if role else f"{name} (role unknown)")
    return "; ".join(parts)


def _ranges(indices: list[int]) -> str:
    """[22, 23, 24, 27] -> '22-24, 27'."""
    out, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            out.append(str(i) if i == start else f"{start}-{i}")
            start = None
    return ", ".join(out)


def _trajectory_inputs(sims, runs, texts, tests) -> dict:
    """Arguments of `plots.plot_trajectories` for runs and simulators (rollouts checked)."""
    from simfluence.plots import describe_examples

    labels = _sim_labels(sims)
    many = len(sims) > 1
    preds = {
        lab: _simulate_runs(s, runs, name_sim=many) for lab, s in zip(labels, sims, strict=True)
    }
    roles = _roles(sims, runs)
    test_labels = None
    if texts is not None:
        stripped, golds, _ = describe_examples(texts["train"] + texts["test"])
        n = len(texts["train"])
        test_labels = [
            " ".join(stripped[n + j].split())
            + ("" if golds[n + j] is None else f"\ngold: {golds[n + j]}")
            for j in tests
        ]
    what = (", ".join(labels[:-1]) + " and " + labels[-1]) if many else f"{labels[0]} simulator"
    return {
        "true": [r.losses for r in runs],
        "pred": preds if many else preds[labels[0]],
        "run_labels": [
            f"run {r.index}" + ("" if role is None else f" ({role})")
            for r, role in zip(runs, roles, strict=True)
        ],
        "tests": tests,
        "test_labels": test_labels,
        "title": f"{what} vs true losses: {_role_title(roles, [r.index for r in runs])}",
    }


def _cmd_plot(args) -> None:
    from simfluence.plots import plot_trajectories
    from simfluence.runlog import load_runs, read_examples, read_experiment

    out = _check_out(args.out, [".png", ".pdf", ".svg"])
    info = read_experiment(args.exp)
    sims = _load_sims(args.sim, info, args.exp)
    tests = _parse_indices(args.tests, "--tests")
    _check_tests(tests, info["n_test"])
    runs = load_runs(args.exp, _parse_indices(args.runs, "--runs"))
    texts = read_examples(args.exp)  # optional: panel titles without texts when absent
    plot_trajectories(out, **_trajectory_inputs(sims, runs, texts, tests))
    print(f"wrote {out}")


def _cmd_demo_data(args) -> None:
    from simfluence.demo_data import make_demo_experiment

    if not (np.isfinite(args.noise) and args.noise >= 0):
        raise ValueError(
            f"--noise {args.noise}: the std of the loss noise must be finite and >= 0 "
            "(e.g. --noise 0.003)"
        )
    exp = make_demo_experiment(
        args.exp,
        n_runs=args.runs,
        n_train=args.n_train,
        n_test=args.n_test,
        batch=args.batch,
        steps=args.steps,
        seed=args.seed,
        noise=args.noise,
        tracin=args.tracin,
        overwrite=args.overwrite,
    )
    print(
        f"wrote a synthetic experiment to {exp}: {args.runs} runs x {args.steps} steps, batch "
        f"{args.batch}, n_train={args.n_train}, n_test={args.n_test}"
        + (", with tracin.npz" if args.tracin else "")
        + f"; {_next_step_hint(exp, args.runs, args.n_test)}"
    )


def _next_step_hint(exp, n_runs: int, n_test: int) -> str:
    """A command that works on a fresh demo-data experiment of these sizes."""
    fit = f"try `simfluence fit {exp} --runs 0-{n_runs - 1} --out sim.npz`"
    if n_test < 2:  # evaluate ranks test examples (final-step rho)
        return f"{fit} (evaluate needs 2 or more test examples)"
    if n_runs < 3:  # evaluate needs a fitting run and 2 held-out runs
        return f"{fit} (evaluate needs 3 or more runs)"
    if n_runs >= 32:  # the default split 20,2,10
        return f"try `simfluence evaluate {exp}`"
    # 4 or more held-out runs where there are enough: the jackknife of across-run rho needs 4.
    n_held = max(4, n_runs // 4) if n_runs >= 6 else 2
    n_valid = 1 if n_runs - n_held >= 2 else 0
    return f"try `simfluence evaluate {exp} --split {n_runs - n_held - n_valid},{n_valid},{n_held}`"


def _cmd_table(args) -> None:
    from simfluence.table import write_table

    path, json_path = write_table(args.results, args.out, layout=args.layout)
    sys.stdout.write(Path(path).read_text(encoding="utf-8"))  # the table just written
    print(f"\nwrote {path} and {json_path}")


def _figure_paths(out: Path, stem: str) -> list[Path]:
    """Every figure of `simfluence figures` is written as PNG (300 dpi) and PDF."""
    return [out / f"{stem}.png", out / f"{stem}.pdf"]


# `simfluence figures` records the files it wrote here (name, size, modification time), so that a
# later call into the same folder can remove those it no longer draws (a figure of a simulator left
# out, a skipped LDS picture) while they are unchanged.
FIGURES_MANIFEST = "figures.json"
_MANIFEST_MAX_BYTES = 1 << 20


def _file_stamp(path: Path) -> list[int] | None:
    """[size, mtime_ns] of a file, or None when it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns)]


def _figures_manifest(out: Path) -> dict[str, list[int] | None]:
    """The files an earlier `figures` call into `out` wrote: {name: [size, mtime_ns]}, or None
    for a name an interrupted call was about to write; {} when there is no list.

    Only plain file names count: a hand-edited list cannot point outside `out`.

    Raises:
        ValueError: `out/figures.json` exists but is not such a list (another file, a folder,
            unreadable JSON); nothing is written over it.
    """
    import json

    path = out / FIGURES_MANIFEST
    if not path.exists() and not path.is_symlink():
        return {}
    bad = ValueError(
        f"--out {out}: {path} is not the figure list of `simfluence figures`; move it away or "
        "choose another --out"
    )
    if path.is_symlink() or not path.is_file() or path.stat().st_size > _MANIFEST_MAX_BYTES:
        raise bad
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        items = files.items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise bad from None
    out_files: dict[str, list[int] | None] = {}
    for name, stamp in items:
        plain = isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
        ok = stamp is None or (
            isinstance(stamp, list) and len(stamp) == 2 and all(type(v) is int for v in stamp)
        )
        if plain and ok and name != FIGURES_MANIFEST:
            out_files[name] = stamp
    return out_files


def _write_figures_manifest(out: Path, files: dict[str, list[int] | None]) -> Path:
    from simfluence.runlog import atomic_write_json

    return atomic_write_json(out / FIGURES_MANIFEST, {"files": dict(sorted(files.items()))})


def _remove_stale_figures(out: Path, earlier: dict, written: list[Path]) -> tuple[list, list]:
    """Removes the files of `earlier` this call did not write, where unchanged since: a listed
    stamp that no longer matches (or a symlink, a folder) means someone else's file now.
    Returns (removed names, kept names)."""
    now = {p.name for p in written}
    removed, kept = [], []
    for name, stamp in sorted(earlier.items()):
        path = out / name
        if name in now or (not path.exists() and not path.is_symlink()):
            continue
        if path.is_symlink() or not path.is_file() or (stamp and _file_stamp(path) != stamp):
            kept.append(name)
            continue
        path.unlink()
        removed.append(name)
    return removed, kept


def _cmd_figures(args) -> None:
    from simfluence import plots
    from simfluence.runlog import (
        atomic_write_json,
        atomic_write_text,
        list_runs,
        load_runs,
        read_examples,
        read_experiment,
    )
    from simfluence.table import load_results

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    earlier = _figures_manifest(out)  # what an earlier call into --out drew
    info = read_experiment(args.exp)
    sims = _load_sims(args.sim, info, args.exp)
    complete = [i for i, _, c in list_runs(args.exp) if c]
    if args.runs:
        run_idx = _parse_indices(args.runs, "--runs")
    else:
        if not complete:
            raise RunLogError(f"{args.exp}: no complete runs")
        run_idx = [complete[-1]]
    tests = (
        _parse_indices(args.tests, "--tests") if args.tests else list(range(min(4, info["n_test"])))
    )
    _check_tests(tests, info["n_test"])
    if not 0 <= args.test < info["n_test"]:
        raise ValueError(f"--test {args.test} is outside 0..{info['n_test'] - 1}")
    if args.top < 1:
        raise ValueError(f"--top {args.top} must be >= 1")
    results_path = Path(args.results) if args.results else Path(args.exp) / "results.json"
    if args.results and not results_path.is_file():
        raise RunLogError(f"--results {results_path}: file not found")
    results = load_results([results_path])[0] if results_path.is_file() else None
    runs = load_runs(args.exp, run_idx)
    texts = read_examples(args.exp)  # optional: listings and titles without texts when absent
    labels = _sim_labels(sims)
    figures: dict[str, tuple] = {}  # stem -> (plot function, args, kwargs); drawn at the end
    skipped: list[str] = []
    traj = _trajectory_inputs(sims, runs, texts, tests)
    figures["trajectories"] = (plots.plot_trajectories, (), traj)
    golds = plots.describe_examples(texts["train"])[1] if texts else None
    for lab, sim in zip(labels, sims, strict=True):
        params = sim.parameters()
        if params is None:
            skipped.append(f"parameters of {lab} ({sim.kind} has no A and B)")
            continue
        A, B, a0 = params
        stem = sim.variant if lab == sim.variant else Path(sim.name).stem
        figures[f"parameters_{stem}"] = (
            plots.plot_parameters,
            (A, B),
            {"variant": sim.variant, "a_prior": a0, "labels": plots.example_labels(golds)},
        )
    held = _held_out(sims, complete, info, results)
    if isinstance(held, str):
        skipped.append(f"lds ({held})")
    else:
        held_runs = load_runs(args.exp, held)
        figures["lds"] = (
            plots.plot_lds,
            (
                np.stack([r.losses[-1] for r in held_runs]),
                {
                    lab: np.stack([p[-1] for p in _simulate_runs(s, held_runs, name_sim=True)])
                    for lab, s in zip(labels, sims, strict=True)
                },
                tests,
            ),
            {
                "test_labels": traj["test_labels"],
                "title": f"final loss across {len(held)} held-out runs "
                f"({', '.join(map(str, held))}): predicted against actual",
            },
        )
    if results is None:
        skipped.append(f"metrics (no {results_path}; run `simfluence evaluate --out`)")
    else:
        name = (results.get("experiment") or {}).get("name", "")
        figures["metrics"] = (
            plots.plot_metric_bars,
            (results,),
            {"title": f"{name}: held-out metrics, mean ± standard error".strip(": ")},
        )
    searches = {
        lab: (s.origin["lambda_search"], {"l2_a": s.sim.l2_a, "l2_b": s.sim.l2_b})
        for lab, s in zip(labels, sims, strict=True)
        if s.origin and s.origin.get("lambda_search")
    }
    if searches:
        figures["lambda"] = (
            plots.plot_lambda_search,
            (searches,),
            {"title": "lambda validation curve (fit --valid-runs)"},
        )
    else:
        skipped.append("lambda (no simulator recorded a search: fit it with --valid-runs)")
    inf_sim = next((s for s in sims if s.kind != "baseline"), None)
    listing = None
    if inf_sim is None:
        skipped.append("influence (the baselines ignore the curriculum: every influence is 0)")
    else:
        run0 = runs[0]
        inf = inf_sim.removal_influence(
            run0.curriculum, run0.losses[0], lr=_run_lr(inf_sim, run0), test_index=args.test
        )
        _check_influence(inf, f"run {run0.index}")
        rows = plots.influence_listing(
            inf,
            run0.curriculum,
            args.top,
            texts["train"] if texts else None,
            _pool_ids(info, args.exp),
        )
        listing = (
            f"simulator {inf_sim.name} ({inf_sim.variant}), curriculum of run {run0.index}\n"
            + plots.format_influences(rows, args.test, texts["test"][args.test] if texts else None)
        )
    # Everything is computed; only now write. The list names what is about to be written first,
    # so that files an interrupted call leaves behind are still known to the next one.
    out.mkdir(parents=True, exist_ok=True)
    planned = [p.name for stem in figures for p in _figure_paths(out, stem)]
    planned += [] if listing is None else ["influence.txt", "influence.json"]
    _write_figures_manifest(out, {**earlier, **dict.fromkeys(planned)})
    written: list[Path] = []
    for stem, (fn, fargs, kwargs) in figures.items():
        written += fn(_figure_paths(out, stem), *fargs, **kwargs)
    if listing is not None:
        written.append(atomic_write_text(out / "influence.txt", listing))
        written.append(
            atomic_write_json(
                out / "influence.json",
                {"run": run0.index, "test_index": args.test, "variant": inf_sim.variant, **rows},
            )
        )
        sys.stdout.write(listing)
    removed, kept = _remove_stale_figures(out, earlier, written)
    # The list: this call's files only (a file kept as changed is no longer this command's).
    _write_figures_manifest(out, {p.name: _file_stamp(p) for p in written})
    for what in skipped:
        print(f"skipped {what}")
    if removed:
        print(f"removed {', '.join(removed)} (drawn by an earlier call, not by this one)")
    if kept:
        print(f"kept {', '.join(kept)} (listed by an earlier call but changed since)")
    print("wrote " + ", ".join(str(p) for p in written))


def _held_out(sims, complete: list[int], info: dict, results: dict | None) -> list[int] | str:
    """The held-out runs of the LDS picture, or why there are too few to draw it.

    Complete runs none of the simulators was fitted or validated on, less the experiment's
    ``held_out_runs`` (they train on pool examples no fitting run saw: the unseen-example
    setting, scored by ``evaluate --test-examples``). Where ``results.json`` records a split,
    only its held-out runs, so the picture's runs are the table's.
    """
    if any(s.origin is None for s in sims):
        return "a simulator file records no fitting runs, so the held-out runs are unknown"
    used = {i for s in sims for k in ("fit_runs", "valid_runs") for i in s.origin.get(k, [])}
    used |= {int(i) for i in info.get("held_out_runs") or []}
    held = [i for i in complete if i not in used]
    recorded = set((results or {}).get("split", {}).get("test") or [])
    in_split = [i for i in held if i in recorded]
    if len(in_split) >= 2:
        held = in_split
    if len(held) < 2:
        return f"{len(held)} complete run(s) held out from every simulator; 2 or more needed"
    return held


def _parse_sims(text: str) -> dict[str, str]:
    """'linear=a.npz,additive=b.npz' -> {variant: path}."""
    out = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, path = part.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--sims {text!r}: expected VARIANT=FILE pairs like linear=sim.npz")
        out[name.strip()] = path.strip()
    if not out:
        raise ValueError(f"--sims {text!r}: no simulator given")
    return out


def _parse_distinct(text: str, flag: str) -> list[int]:
    """`_parse_indices`, refusing an index given twice (it would silently count once)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    values = [v for part in items for v in _parse_indices(part, flag)]
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise ValueError(f"{flag} {text!r} names {dup} more than once; give each once")
    return values


def _cmd_cf_propose(args) -> None:
    from simfluence import counterfactual as cf

    sims = _parse_sims(args.sims) if args.sims else None
    proposals, curricula, header = cf.propose(
        args.exp,
        simulator_files=sims,
        proposer=args.proposer,
        base_runs=_parse_distinct(args.base_runs, "--base-runs") if args.base_runs else None,
        tests=_parse_distinct(args.tests, "--tests") if args.tests else None,
        n_targets=args.targets,
        kinds=args.kinds.split(","),
        k=args.k,
        seed=args.seed,
        optimize_cap=args.optimize_cap,
        split=_parse_split(args.split) if args.split else None,
        metric=args.metric,
        flip_sim=args.flip_sim,
    )
    path, written = cf.write_proposals(args.exp, proposals, curricula, header)
    settings = header["settings"]
    n, n_t = len(proposals), len(settings["tests"])
    state = "wrote" if written else "kept the identical proposals already in"
    print(
        f"{n} proposal{'s' * (n != 1)} ({', '.join(settings['kinds'])}) for {n_t} target test "
        f"example{'s' * (n_t != 1)} on base runs {settings['base_runs']}, proposed by "
        f"{args.proposer}; {state} {path}; next: `finetune counterfactual {args.exp}`"
    )


def _cmd_cf_score(args) -> None:
    from simfluence import counterfactual as cf

    report = cf.score(args.exp, _parse_sims(args.sims) if args.sims else None, metric=args.metric)
    paths = cf.write_report(args.exp, report)
    sys.stdout.write(cf.format_report(report))
    print("\nwrote " + ", ".join(str(p) for p in paths))


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------


def _add_lambda_flags(p) -> None:
    p.add_argument(
        "--l2-a",
        type=float,
        default=None,
        metavar="X",
        help="ridge strength on A - a_prior (give with --l2-b; default: chosen on validation runs)",
    )
    p.add_argument(
        "--l2-b",
        type=float,
        default=None,
        metavar="Y",
        help="ridge strength on B (give with --l2-a)",
    )
    p.add_argument(
        "--a-prior",
        type=float,
        default=None,
        metavar="P",
        help="value A is shrunk towards (default 1/batch: an unseen example leaves the loss "
        "unchanged; 0 = plain ridge)",
    )


def _sim_input_flags(p) -> None:
    p.add_argument("sim", help="simulator file written by `simfluence fit` (.npz)")
    p.add_argument(
        "--curriculum", required=True, help="int .npy [steps, batch] of training-pool ids"
    )
    p.add_argument(
        "--initial-losses",
        required=True,
        help="float .npy [n_test]: the observed loss of each test example before training",
    )
    p.add_argument(
        "--lr",
        default=None,
        help="float .npy [steps]: the learning rate of every step (e.g. a run's lr.npy); "
        "required by the -lr simulators, refused by the others",
    )


def _add_metric_flag(p, what: str) -> None:
    p.add_argument(
        "--metric",
        default="loss",
        metavar="METRIC",
        help=f"{what}: loss (default; losses.npy), margin (best wrong answer's loss minus the "
        "gold one's, > 0 = correct) or choice:K (answer choice K's loss); the last two need "
        "choice_losses.npy",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `simfluence` argument parser (one subcommand per command)."""
    parser = _Parser(
        prog=PROG,
        description="Simfluence: fit, roll out and score training-run simulators "
        "(Guu et al. 2023, arXiv 2303.08114) on logged fine-tuning runs.",
        epilog=_EPILOG,
    )
    _add_debug_flag(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "evaluate",
        help="fit every variant on a split of the runs and score it on held-out runs",
        description="Fit on the first FIT complete runs (by index), choose lambdas on the next "
        "VALID, score on the next TEST; print a table and optionally write JSON.",
    )
    p.add_argument("exp", metavar="EXP", help="experiment folder")
    p.add_argument(
        "--split",
        default=None,
        help="FIT,VALID,TEST numbers of complete runs (default: the split experiment.json "
        "records, e.g. the config's extra.split, else 20,2,10)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated variants among linear, additive, multiplicative, constant, "
        "mean-trajectory, tracin-cp, tracin-cp-rescaled, tracin-cp-momentum, linear-lr, "
        "additive-lr, linear-lr-tracin-prior, linear-lr-momentum, linear-momentum (default: "
        "all; the tracin ones only when fitting runs have tracin.npz, the -lr ones only when "
        "every run has lr.npy; the -momentum ones choose their decay on VALID too)",
    )
    _add_lambda_flags(p)
    _add_metric_flag(
        p,
        "the per-example trajectory to fit and score (margin also reports the "
        "accuracy of the simulated final sign)",
    )
    p.add_argument(
        "--test-examples",
        default=None,
        metavar="IDX",
        help="tracked test examples never fitted on, e.g. 25-49 or 0,3,5-7: score the "
        "featurized simulators (linear-feat, additive-feat; needs `finetune features EXP`) in "
        "four settings (seen/seen, unseen training examples, unseen test examples, both) "
        "against Simfluence-Linear, TracIn-CP rescaled and the baselines",
    )
    p.add_argument(
        "--features",
        default=None,
        metavar="KINDS",
        help="with --test-examples: feature kinds to use, hidden and/or tracin (default: every "
        "kind EXP/features holds)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here (.json)")
    p.add_argument(
        "--save-simulators",
        metavar="DIR",
        default=None,
        help="also save every variant (the baselines too) as DIR/sim_<variant>.npz (the file "
        "`simfluence fit` writes for that variant on this split's runs)",
    )
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "fit",
        help="fit one simulator on chosen runs and save it (.npz)",
        description="Fit a Simfluence simulator on runs; lambdas from --valid-runs, from "
        "--l2-a/--l2-b, or the defaults.",
    )
    p.add_argument("exp", metavar="EXP", help="experiment folder")
    p.add_argument("--runs", required=True, help="fitting run indices, e.g. 0-19 or 0-9,12")
    p.add_argument(
        "--variant",
        default="linear",
        choices=[
            "linear",
            "additive",
            "multiplicative",
            "tracin-cp",
            "tracin-cp-rescaled",
            "linear-lr",
            "additive-lr",
            "linear-lr-tracin-prior",
            "linear-feat",
            "additive-feat",
            "linear-momentum",
            "linear-lr-momentum",
            "tracin-cp-momentum",
            "constant",
            "mean-trajectory",
        ],
        help="simulator variant (default linear); the tracin ones average the fitting runs' "
        "tracin.npz; the -lr ones scale each step by the run's learning rate (need lr.npy; "
        "linear-lr-tracin-prior also tracin.npz); the -momentum ones spread each batch's change "
        "over later steps with AdamW's first-moment weights (1-d) d^(t-s), d chosen with "
        "--valid-runs (else --decay, default 0.9); the -feat ones are featurized (tables from "
        "example features, `finetune features`; need --valid-runs), saved as per-pair tables "
        "of the whole pool; constant and mean-trajectory are the curriculum-blind baselines. "
        "Every file works with simulate, influence (not the baselines: their influences are "
        "all 0), plot and figures",
    )
    p.add_argument(
        "--features",
        default=None,
        metavar="KIND",
        help="feature kind of the -feat variants: tracin (default) or hidden",
    )
    p.add_argument(
        "--decay",
        type=float,
        default=None,
        help="first-moment decay d in [0, 1) of the -momentum variants (default: chosen on "
        "--valid-runs from 0,0.3,0.5,0.7,0.8,0.9; without them 0.9, AdamW's beta_1)",
    )
    p.add_argument(
        "--valid-runs",
        default=None,
        help="validation run indices to choose lambdas on (log grid, all-steps MSE)",
    )
    _add_lambda_flags(p)
    _add_metric_flag(p, "the per-example trajectory to fit (recorded in the file)")
    p.add_argument("--out", required=True, help="output simulator file (.npz)")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser(
        "simulate",
        help="predict the loss trajectories of a (new) curriculum",
        description="Roll a fitted simulator out along a curriculum from given initial losses.",
    )
    _sim_input_flags(p)
    p.add_argument(
        "--out", required=True, help="output .npy, float32 [steps + 1, n_test] (row 0 = initial)"
    )
    _add_metric_flag(p, "the metric the simulator was fitted on (another is refused)")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "influence",
        help="training examples whose removal changes a test example's final loss the most",
        description="For test example J, the simulated change of its final loss when each "
        "training example is removed from the curriculum (all examples at once): its slots "
        "become neutral ones (A = 1/batch, B = 0) that leave the loss unchanged. Lists the "
        "proponents (removal raises the loss: they help) and opponents (removal lowers it: "
        "they hurt) apart; --all-tests writes the whole [n_test, n_train] matrix instead.",
    )
    _sim_input_flags(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--test", type=int, default=None, metavar="J", help="list the influences on test example J"
    )
    which.add_argument(
        "--all-tests",
        action="store_true",
        help="write the whole matrix float32 [n_test, n_train] to --out (.npy); row j equals "
        "the values `--test j` lists",
    )
    p.add_argument(
        "--top",
        type=int,
        default=10,
        help="how many proponents (removal raises the loss) and how many opponents (removal "
        "lowers it) to list (default 10 each)",
    )
    p.add_argument(
        "--exp",
        default=None,
        help="experiment folder: list the texts of its examples.json and the dataset ids of "
        "its experiment.json pool_ids beside the pool positions",
    )
    p.add_argument(
        "--out",
        default=None,
        help="with --test: also write the listing as JSON (.json); with --all-tests: the "
        "matrix (.npy, required)",
    )
    _add_metric_flag(p, "the metric the simulator was fitted on (another is refused)")
    p.set_defaults(func=_cmd_influence)

    p = sub.add_parser(
        "plot",
        help="true vs simulated loss trajectories (one panel per test example)",
        description="Plot observed (solid) and simulated (dashed) trajectories of chosen runs "
        "(panel titles show the test texts when EXP has examples.json). A run on which the "
        "simulator diverges is an error.",
    )
    p.add_argument("exp", metavar="EXP", help="experiment folder")
    p.add_argument(
        "--sim",
        required=True,
        help="simulator file(s) (.npz) from `simfluence fit`, any variant; several, "
        "comma-separated (a.npz,b.npz), are drawn on the same panels with a legend",
    )
    p.add_argument("--runs", required=True, help="run indices to plot, e.g. 22 or 22,23")
    p.add_argument("--tests", default="0,1,2,3", help="test example indices (default 0,1,2,3)")
    p.add_argument("--out", required=True, help="output image (.png, .pdf or .svg)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser(
        "demo-data",
        help="write a synthetic experiment from a known linear simulator",
        description="Write a synthetic experiment (run-log format) generated by a known "
        "Simfluence-Linear simulator, so every command can be tried without a model.",
    )
    p.add_argument("exp", metavar="EXP", help="folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing experiment")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--runs", type=int, default=32, help="number of runs (default 32)")
    p.add_argument("--n-train", type=int, default=100, help="training pool size (default 100)")
    p.add_argument("--n-test", type=int, default=50, help="tracked test examples (default 50)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument(
        "--steps",
        type=int,
        default=155,
        help="steps per run (default 155; steps x batch not a multiple of the pool)",
    )
    p.add_argument(
        "--noise", type=float, default=0.003, help="std of per-step loss noise (default 0.003)"
    )
    p.add_argument(
        "--tracin",
        action="store_true",
        help="also write synthetic tracin.npz (oracle first-order dots) to try the TracIn-CP "
        "variants",
    )
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser(
        "table",
        help="all finished experiments in one table (.md, .csv or .tex) + JSON",
        description="Rows = variants, one table per experiment (an experiment column in csv); "
        "one column per metric (all-steps MSE, final-step ρ, final-step MSE, LDS (across-run "
        "ρ), skill) and one per standard error; the best value of each column marked (bold in "
        "md, \\textbf in tex, a '<metric> best' true/false column in csv). --layout paper: "
        "the paper's markdown layout (columns = experiments).",
    )
    p.add_argument(
        "results",
        nargs="+",
        metavar="RESULTS_OR_EXP",
        help="results.json files of `simfluence evaluate`, or experiment folders holding one",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output table (.md, .csv or .tex); the JSON is written beside it (same stem)",
    )
    p.add_argument(
        "--layout",
        choices=["metrics", "paper"],
        default="metrics",
        help="metrics (default): one metric per column, per experiment; paper: rows = "
        "variants, columns = experiments, cells = mean ± se (markdown only)",
    )
    p.set_defaults(func=_cmd_table)

    p = sub.add_parser(
        "figures",
        help="the figures a paper prints (PNG at 300 dpi and PDF) and top influences into a folder",
        description="Write into --out, each figure as .png (300 dpi) and .pdf: trajectories "
        "(true against simulated, every --sim on the same panels), parameters_<variant> (A/B "
        "histograms of each Simfluence simulator, prior marked, split by label), lds "
        "(predicted against actual final loss across the held-out runs), metrics (per-variant "
        "bars with standard errors from results.json), lambda (the validation curve of "
        "simulators fitted with --valid-runs); and influence.txt/.json (the first --sim that "
        "has influences). A figure whose inputs are missing is skipped with a line saying why.",
    )
    p.add_argument("exp", metavar="EXP", help="experiment folder")
    p.add_argument(
        "--sim",
        required=True,
        help="simulator file(s) (.npz) from `simfluence fit`, any variant, comma-separated",
    )
    p.add_argument(
        "--results",
        default=None,
        help="results.json of `simfluence evaluate` for the metric bars (default: "
        "EXP/results.json when it exists)",
    )
    p.add_argument(
        "--runs",
        default=None,
        help="runs to plot (default: the last complete run); the first one's curriculum is "
        "used for the influence listing",
    )
    p.add_argument("--tests", default=None, help="test examples to plot (default 0-3)")
    p.add_argument("--test", type=int, default=0, help="test example for influences (default 0)")
    p.add_argument("--top", type=int, default=10, help="influential examples to list (default 10)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_figures)

    p = sub.add_parser(
        "counterfactual",
        help="propose curricula to train, then score every simulator against the trained runs",
        description="The counterfactual check: `propose` writes EXP/counterfactual/proposals; "
        "`finetune counterfactual EXP` trains them; `score` compares every simulator's "
        "predicted change with the trained runs (report.json, report.md, a figure).",
    )
    cf_sub = p.add_subparsers(
        dest="cf_command",
        metavar="STEP",
        parser_class=_Parser,
        help="propose (before training) or score (after `finetune counterfactual EXP`)",
    )
    cf_sub.required = True
    q = cf_sub.add_parser(
        "propose",
        help="curricula proposed by a fitted simulator from base runs",
        description="One proposal per (target test example, kind). Removal kinds replace "
        "every slot of the k removed examples by a seeded draw from the rest of the pool. "
        "Rerunning with the same arguments keeps the proposals (and trained runs); other "
        "arguments or changed simulator files are refused.",
    )
    q.add_argument("exp", metavar="EXP", help="experiment folder")
    q.add_argument(
        "--sims",
        default=None,
        help="VARIANT=FILE,... the simulators to score, the proposer among them; FILE relative "
        "to EXP or absolute (default: every EXP/sim_<variant>.npz, as `make simulate` writes)",
    )
    q.add_argument(
        "--proposer",
        default="linear",
        help="the Simfluence variant that proposes: linear, additive, multiplicative, linear-lr, "
        "additive-lr or linear-lr-tracin-prior (default linear)",
    )
    q.add_argument(
        "--base-runs",
        default=None,
        help="base run indices, e.g. 22-31 or 22,25 (default: the held-out runs of --split); "
        "target i uses the i-th, cycling",
    )
    q.add_argument(
        "--split",
        default=None,
        help="FIT,VALID,TEST numbers of complete runs whose TEST part gives the default base "
        "runs (default: the config's split, else 20,2,10)",
    )
    q.add_argument(
        "--tests",
        default=None,
        help="target test examples, e.g. 0-3,7 (default: --targets drawn at random)",
    )
    q.add_argument(
        "--targets",
        type=int,
        default=None,
        help="how many target test examples to draw, at most n_test (default: 12, or n_test "
        "when smaller); not with --tests",
    )
    q.add_argument(
        "--kinds",
        default=",".join(("remove-top", "remove-bottom", "remove-random", "reorder", "optimize")),
        help="proposal kinds among remove-top, remove-bottom, remove-random, reorder, optimize, "
        "flip (the smallest top-k removal, k in 1,2,4,..,32, that the margin simulator predicts "
        "flips the target's prediction), flip-random (random removal of flip's k; needs flip) "
        "and swap-in (k base examples swapped for held-out pool examples, for experiments with "
        "held_out_pool) (default: the first five)",
    )
    q.add_argument("--k", type=int, default=10, help="examples removed per removal proposal (10)")
    q.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    q.add_argument(
        "--optimize-cap",
        type=int,
        default=None,
        help="most uses of one example in an optimize curriculum (default: the largest count "
        "in the base curriculum)",
    )
    q.add_argument(
        "--flip-sim",
        default=None,
        metavar="FILE",
        help="the proposer's simulator fitted with --metric margin, for flip proposals (default "
        "EXP/sim_<proposer>_margin.npz; with --metric margin the proposer itself)",
    )
    _add_metric_flag(
        q, "what the check predicts and scores the change of (every --sims file fitted on it)"
    )
    q.set_defaults(func=_cmd_cf_propose)
    q = cf_sub.add_parser(
        "score",
        help="predicted against actual change for every proposal and simulator",
        description="Needs every proposal trained (`finetune counterfactual EXP`). Writes "
        "EXP/counterfactual/report.json, report.md and predicted_vs_actual.png.",
    )
    q.add_argument("exp", metavar="EXP", help="experiment folder")
    q.add_argument(
        "--sims",
        default=None,
        help="VARIANT=FILE,... more simulators to score beside those recorded in the "
        "proposals (e.g. fitted after training; FILE relative to EXP or absolute); they must "
        "not be fitted on a base run",
    )
    q.add_argument(
        "--metric",
        default=None,
        metavar="METRIC",
        help="the proposals' metric (default: the one they were proposed with; another is refused)",
    )
    q.set_defaults(func=_cmd_cf_score)
    for p in [*sub.choices.values(), *cf_sub.choices.values()]:  # --debug after the command too
        _add_debug_flag(p, default=argparse.SUPPRESS)
    return parser


def _add_debug_flag(p: argparse.ArgumentParser, default) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        default=default,  # SUPPRESS on the commands: keeps a --debug given before them
        help="on an error, also print the Python traceback (for bug reports); or set "
        f"{_DEBUG_ENV}=1",
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(f"{PROG}: warning: {' '.join(str(message).split())}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `simfluence` console script.

    Args:
        argv: arguments without the program name (None -> sys.argv[1:]).

    Returns:
        0 on success. Bad input raises SystemExit(2) after one line on stderr (preceded by the
        traceback with --debug or SIMFLUENCE_DEBUG=1).
    """
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(_DEBUG_ENV, "") not in ("", "0")
    old = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        if args.func in (_cmd_fit, _cmd_evaluate):
            from simfluence import _solvers

            _solvers.initialize_distributed()  # a multi-host job: the fits use every device
        args.func(args)
    except (RunLogError, ValueError) as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc))
    except OSError as exc:
        if debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        _fail(f"{where}{exc.strerror or exc}")
    finally:
        warnings.showwarning = old
    return 0


if __name__ == "__main__":
    sys.exit(main())
