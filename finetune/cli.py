"""``finetune`` command line: ``finetune run CONFIG``, ``finetune tracin EXP``,
``finetune tracin-estimate CONFIG`` and ``finetune counterfactual EXP``.

Thin entry point: parses arguments and calls `finetune.trainer.run_experiment` (and
`finetune.tracin.run_tracin`, `finetune.counterfactual.run_counterfactuals`). Bad input prints
one line ``error: ...`` and exits with code 2 before anything is written; a non-finite loss
exits with code 1 naming the run and step.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
_DEBUG_ENV = "SIMFLUENCE_DEBUG"  # set to 1: tracebacks on errors, as --debug
# What the run generator needs beyond the simulator's own dependencies: the `finetune` extra.
_MODEL_STACK = (
    "flax",
    "optax",
    "orbax.checkpoint",
    "transformers",
    "datasets",
    "safetensors",
    "sentencepiece",
)


def _missing_model_stack() -> list[str]:
    """The modules of the `finetune` extra that cannot be imported here (none when installed)."""
    missing = []
    for name in _MODEL_STACK:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # the parent package ("orbax") is missing
            found = False
        if not found:
            missing.append(name)
    return missing


# Set, any of them makes the Hugging Face libraries use only their local cache.
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _offline_without_hub(timeout: float = 3.0) -> bool:
    """Sets the Hugging Face offline variables when the hub cannot be reached.

    Without them, on a machine without network, every hub request of transformers and datasets
    is retried five times with a logged warning (minutes of retries before the error). Skipped
    when an offline variable or a proxy is set (the proxy may reach what a direct connection
    cannot). Must run before the Hugging Face libraries are imported: they read the variables
    once.

    Returns:
        True when the hub was unreachable and the variables were set.
    """
    if any(os.environ.get(v) for v in _OFFLINE_VARS) or any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    ):
        return False
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return False
    except OSError:  # no DNS, no route, refused or timed out
        for v in _OFFLINE_VARS:
            os.environ[v] = "1"
        return True


def _quiet_abandoned_reads() -> None:
    """Drops the "Event loop is closed" errors of orbax's abandoned array reads.

    When a restore fails (a damaged checkpoint), orbax closes its event loop while tensorstore
    still finishes the other reads; each one then reports a RuntimeError traceback as an
    unraisable exception, dozens of them after the one-line error. Other unraisable exceptions
    go to the previous hook; --debug keeps them all.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_drops_abandoned_reads", False):  # installed by an earlier call
        return

    def hook(unraisable) -> None:
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == (
            "Event loop is closed"
        ):
            return
        previous(unraisable)

    hook._drops_abandoned_reads = True
    sys.unraisablehook = hook


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage block) and exit with code 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see `{self.prog} --help`)\n")


def _run(args: argparse.Namespace) -> int:
    from finetune import trainer
    from finetune.config import load_experiment_config

    config, folder = load_experiment_config(args.config)
    overrides = list(args.set or [])
    if overrides:
        from finetune.config import apply_overrides

        config = apply_overrides(config, overrides)
    out = args.out or (Path(config.output_dir) if config.output_dir else folder / "output")
    data_dir = args.data_dir or os.environ.get("SIMFLUENCE_DATA_DIR") or None
    if args.tracin:  # before any training: a setting that cannot fit is refused now
        from finetune import tracin

        tracin.check_config_memory(
            config,
            where=f"{folder} (config {config.name!r})",
            flags=("--set tracin_chunk_size={}", "--set tracin_mode=projected"),
        )
    result = trainer.run_experiment(
        config,
        out,
        data_dir=data_dir,
        tokenizer=args.tokenizer,
        progress=not args.no_progress,
        max_steps_this_call=args.max_steps,
        report_to=args.report_to,
        log_every=args.log_every,
        overrides=overrides,
    )
    if result["interrupted"]:
        stop = result["stop"]
        runs = f"runs {stop['runs'][0]}-{stop['runs'][-1]}"
        lost = stop["step"] - stop["kept_step"]
        where = (
            f"; {runs} stopped at step {stop['step']} and continue from their checkpoint at "
            f"step {stop['kept_step']} ({lost} step(s) will be redone)"
            if lost
            else f"; {runs} continue from step {stop['kept_step']}"
        )
        print(
            f"stopped after --max-steps {args.max_steps}; {len(result['complete'])} of "
            f"{config.num_runs} runs complete in {out}{where} (run the same command to continue)"
        )
        return 0
    print(
        f"{len(result['complete'])} of {config.num_runs} runs complete in {out} "
        f"({result['seconds']:.1f} s this call)"
    )
    if args.tracin:
        from finetune import tracin

        written = tracin.run_tracin(
            out,
            mode=config.tracin_mode,
            proj_dim=config.tracin_proj_dim,
            seed=config.tracin_seed,
            chunk_size=config.tracin_chunk_size,
            progress=not args.no_progress,
        )
        print(f"wrote {len(written)} tracin.npz file(s) under {out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="finetune",
        description="Fine-tuning runs under random curricula (Simfluence run logs) and TracIn-CP.",
    )
    _add_debug_flag(parser, default=False)
    dist = parser.add_argument_group("multi-host (jax.distributed; see finetune.distributed)")
    dist.add_argument(
        "--coordinator-address", default=None, help="HOST:PORT of process 0 (same on every process)"
    )
    dist.add_argument("--num-processes", type=int, default=None, help="number of processes")
    dist.add_argument("--process-id", type=int, default=None, help="index of this process")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train every run of an experiment config (resumes an interrupted one)",
        description="Train the runs of CONFIG (a runs/<name> folder or its config.py). "
        "Re-running the same command continues: complete runs are kept, incomplete "
        "ones restart from their latest checkpoint.",
    )
    run.add_argument("config", metavar="CONFIG", help="runs/<name> folder or its config.py")
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        help="experiment folder (default: the config's output_dir, else runs/<name>/output)",
    )
    run.add_argument(
        "--data-dir",
        default=None,
        help="data directory in the layout of ../shared/data (default: "
        "$SIMFLUENCE_DATA_DIR, else the Hugging Face hub)",
    )
    run.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer dir / spiece.model / hub name (default: "
        "$SIMFLUENCE_TOKENIZER, else the config's tokenizer or model)",
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=None,
        help="override a config field, e.g. --set learning_rate=3e-4 --set steps=200 (typed "
        "as the field; warmup.FIELD=VALUE for the warm-up; recorded in experiment.json)",
    )
    run.add_argument(
        "--tracin",
        action="store_true",
        help="compute TracIn-CP dot products (finetune tracin) after training, with the "
        "config's tracin_mode, tracin_proj_dim, tracin_seed and tracin_chunk_size (--set to "
        "change them); their memory is checked before training",
    )
    run.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help="stop after this many (group) steps; run again to continue",
    )
    _add_progress_flags(run, "EXP/tensorboard")
    run.set_defaults(handler=_run)
    _add_tracin(sub)
    _add_tracin_estimate(sub)
    _add_counterfactual(sub)
    _add_features(sub)
    for p in sub.choices.values():  # --debug after the command too
        _add_debug_flag(p, default=argparse.SUPPRESS)
    return parser


# Mirror finetune.metrics.DEFAULT_REPORT_TO and DEFAULT_LOG_EVERY (a test pins them): importing
# it here is cheap, but the parser imports nothing of the package.
_REPORT_TO = "tensorboard"
_LOG_EVERY = 10


def _add_progress_flags(p: argparse.ArgumentParser, events: str) -> None:
    """--no-progress, --report-to and --log-every of the training commands."""
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one flushed line per phase (data, model, compile, group i of n) "
        "and every --log-every steps on stderr, for batch jobs",
    )
    p.add_argument(
        "--report-to",
        default=_REPORT_TO,
        metavar="SINKS",
        help="live metrics while groups train, comma-separated: tensorboard (event files in "
        f"{events}/runs_<first>-<last>/), wandb (Weights & Biases, one run per group), or "
        f"none (default: {_REPORT_TO})",
    )
    p.add_argument(
        "--log-every",
        type=_positive_int,
        default=_LOG_EVERY,
        metavar="N",
        help="log the mean train and tracked test loss, learning rate and steps/s every N "
        f"steps and at each group's last step (default: {_LOG_EVERY})",
    )


def _add_debug_flag(p: argparse.ArgumentParser, default) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        default=default,  # SUPPRESS on the commands: keeps a --debug given before them
        help="on an error, also print the Python traceback (for bug reports); or set "
        f"{_DEBUG_ENV}=1",
    )


# `finetune tracin`. Mirrors finetune.tracin.MODES and its default chunk size (a test pins both):
# importing finetune.tracin would load JAX for `--help`.
_TRACIN_MODES = ("exact", "projected")
_TRACIN_CHUNK = 32


def _parse_runs(text: str) -> list[int]:
    """argparse type: ``"0-19,25"`` -> [0, ..., 19, 25], else a one-line ArgumentTypeError."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo or lo < 0:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                value = int(part)
                if value < 0:
                    raise ValueError
                out.append(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--runs {text!r}: expected indices and ranges like 0-19 or 0,3,5-7"
            ) from None
    return out


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1, else a one-line ``ArgumentTypeError``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _add_tracin(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``finetune tracin EXP ...``; its handler returns 0 (raises ValueError on bad
    input, which `main` turns into one line and exit code 2)."""
    parser = subparsers.add_parser(
        "tracin",
        help="TracIn-CP gradient dot products at every checkpoint -> run_XXX/tracin.npz",
        description=(
            "For every complete run of EXP that saved checkpoints, at every checkpoint, compute "
            "the per-example gradient dot products of all training-pool examples with all "
            "tracked test examples (trainable parameters only: IA3 vectors or the full model) "
            "and write run_XXX/tracin.npz (steps, learning_rates, dots [K, n_test, n_train]). "
            "Runs whose tracin.npz covers their checkpoints are skipped (one with other "
            "checkpoint steps is recomputed). A checkpoint at step s is the state "
            "after s steps; its learning rate is that of step s+1. "
            "TracIn: Pruthi et al. 2020, arXiv 2002.08484."
        ),
    )
    parser.add_argument("exp", type=Path, metavar="EXP", help="experiment directory")
    parser.add_argument(
        "--runs",
        type=_parse_runs,
        default=None,
        help="run indices to process, e.g. 0-19 or 0,3,5-7; each must have checkpoints "
        "(default: every complete run that saved checkpoints)",
    )
    _add_tracin_settings(parser)
    parser.set_defaults(handler=_tracin)
    return parser


def _add_tracin_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=_TRACIN_MODES,
        default=None,
        help="exact: flattened per-example gradients, streamed in chunks (IA3, small models); "
        "projected: seeded Gaussian projection of each gradient to --proj-dim dimensions, for "
        "full tuning of large models (default: the experiment config's tracin_mode)",
    )
    parser.add_argument(
        "--proj-dim",
        type=_positive_int,
        default=None,
        help="projection dimension d in projected mode; the error of a dot product g1.g2 has "
        "standard deviation about sqrt((1 + 1/cos^2)/d) times |g1.g2| (at most sqrt(2/d) "
        "|g1||g2|); must not exceed the number of trainable parameters (default: the config's "
        "tracin_proj_dim)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the random projection (default: the config's tracin_seed)",
    )
    parser.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=None,
        help="examples per vmapped per-example-gradient chunk; exact mode holds two chunks of "
        "gradients; lower it if memory runs out (default: the config's tracin_chunk_size, "
        f"{_TRACIN_CHUNK} unless set)",
    )


def _add_tracin_estimate(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``finetune tracin-estimate CONFIG ...`` (no device work, no weights)."""
    parser = subparsers.add_parser(
        "tracin-estimate",
        help="TracIn-CP's memory for a config, and whether `finetune run --tracin` / "
        "`finetune tracin` would refuse it (no weights are loaded)",
        description=(
            "Print the memory estimate that `finetune run CONFIG --tracin` and `finetune "
            "tracin` check before any gradient work (parameters counted with jax.eval_shape: "
            "no weights are loaded or allocated), against --device-memory or this machine's "
            "device, and the one-line refusal they would print. CONFIG is a runs/<name> "
            "folder, its config.py, or an experiment folder holding experiment.json."
        ),
    )
    parser.add_argument("config", metavar="CONFIG", help="runs/<name>, its config.py, or EXP")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", default=None, help="as `finetune run`"
    )
    parser.add_argument(
        "--device-memory",
        type=_positive_float,
        default=None,
        help="device memory in bytes, e.g. 141e9 for an H200 (default: this machine's first "
        "device, or its RAM on the CPU backend)",
    )
    parser.add_argument(
        "--model-config",
        type=Path,
        default=None,
        help="a T5 config.json to count parameters from (default: the config's model, from a "
        "local folder, the Hugging Face cache, or the known paper models)",
    )
    _add_tracin_settings(parser)
    parser.set_defaults(handler=_tracin_estimate)
    return parser


def _positive_float(text: str) -> float:
    """argparse type: a number > 0, else a one-line ``ArgumentTypeError``."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _tracin_estimate(args: argparse.Namespace) -> int:
    from finetune import tracin
    from finetune.config import apply_overrides, load_experiment_config

    path = Path(args.config)
    if (path / "experiment.json").is_file():
        from finetune.experiment import read_config

        config, where = read_config(path), str(path)
    else:
        config, folder = load_experiment_config(path)
        where = f"{folder} (config {config.name!r})"
    if args.set:
        config = apply_overrides(config, args.set)
    mode = args.mode or config.tracin_mode
    proj_dim = args.proj_dim or config.tracin_proj_dim
    chunk_size = args.chunk_size or config.tracin_chunk_size
    if args.device_memory is not None:
        device = (int(args.device_memory), f"the device (--device-memory {args.device_memory:g})")
    else:
        device = tracin.device_memory()
    n_params, n_trainable, largest = tracin.param_counts(config, args.model_config)
    sizes = dict(
        n_params=n_params,
        n_trainable=n_trainable,
        n_train=config.n_train,
        n_test=config.n_test,
        largest_leaf=largest,
    )
    est = tracin.estimate_memory(**sizes, mode=mode, proj_dim=proj_dim, chunk_size=chunk_size)
    print(
        f"{where}: {n_params:,} parameters, {n_trainable:,} trainable; n_train "
        f"{config.n_train}, n_test {config.n_test}; mode {mode}"
        + (f" (proj_dim {proj_dim})" if mode == "projected" else "")
        + f", chunk {chunk_size}"
    )
    for name, value in est.items():
        print(f"  {name:<15} {value / 1e9:12.3f} GB")
    print(f"  device memory   {device[0] / 1e9:12.3f} GB ({device[1]})")
    try:
        tracin.check_memory(
            **sizes,
            mode=mode,
            proj_dim=proj_dim,
            chunk_size=chunk_size,
            where=where,
            device_bytes=device[0],
            device_name=device[1],
        )
    except tracin.TracinMemoryError as e:
        print(f"refused: error: {e}")
    else:
        print("fits (a lower bound: activations and XLA temporaries come on top)")
    return 0


def _tracin(args: argparse.Namespace) -> int:
    from finetune.tracin import run_tracin

    paths = run_tracin(
        args.exp,
        runs=args.runs,
        mode=args.mode,
        proj_dim=args.proj_dim,
        seed=args.seed,
        chunk_size=args.chunk_size,
    )
    print(f"wrote {len(paths)} tracin.npz file(s) under {args.exp}")
    return 0


def _add_counterfactual(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``finetune counterfactual EXP ...``; its handler returns 0 (raises ValueError on
    bad input, which `main` turns into one line and exit code 2)."""
    parser = subparsers.add_parser(
        "counterfactual",
        help="train the curricula `simfluence counterfactual propose` wrote -> "
        "EXP/counterfactual/run_XXX",
        description=(
            "Train every proposal of EXP/counterfactual/proposals.json (written by `simfluence "
            "counterfactual propose EXP`) exactly as given into EXP/counterfactual/run_XXX "
            "(XXX: the proposal id), from EXP's starting state (its warm-up restored) with its "
            "optimizer, schedule and seeds, in vmapped groups as wide as EXP's. The runs save "
            "no checkpoints. Re-running the same command continues: complete runs are kept, a "
            "group with an incomplete run trains again from step 0 (same files as an "
            "uninterrupted call)."
        ),
    )
    parser.add_argument("exp", type=Path, metavar="EXP", help="experiment directory")
    parser.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help="step budget of this call: each group of runs trains the config's full number of "
        "steps and saves no checkpoints, so only the groups the budget covers whole are trained "
        "(e.g. 26 trains one demo group of 32 proposals); run again to continue",
    )
    _add_progress_flags(parser, "EXP/counterfactual/tensorboard")
    parser.set_defaults(handler=_counterfactual)
    return parser


def _counterfactual(args: argparse.Namespace) -> int:
    from finetune.counterfactual import run_counterfactuals

    result = run_counterfactuals(
        args.exp,
        progress=not args.no_progress,
        max_steps_this_call=args.max_steps,
        report_to=args.report_to,
        log_every=args.log_every,
    )
    done = (
        f"{len(result['complete'])} of {result['proposals']} counterfactual runs complete in "
        f"{result['folder']} ({len(result['trained'])} trained in {result['seconds']:.1f} s "
        "this call)"
    )
    if result["interrupted"]:
        left = result["proposals"] - len(result["complete"])
        print(
            f"stopped after --max-steps {args.max_steps}; {done}; {left} not started (run the "
            "same command to continue)"
        )
    else:
        print(done)
    return 0


def _add_features(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``finetune features EXP ...`` (cached example features for featurized
    Simfluence)."""
    parser = subparsers.add_parser(
        "features",
        help="example features from the starting model -> EXP/features/<kind>.npz",
        description=(
            "Compute the features of every pool and tracked test example from EXP's starting "
            "model (after its warm-up): hidden = the encoder's mean-pooled hidden states of the "
            "input followed by the answer; tracin = the projected per-example gradient at the "
            "starting model (TracIn-CP's step 0). Cached in EXP/features/<kind>.npz with a "
            "hash of the starting model and of the examples; a cached file is reused only when "
            "both and the settings match."
        ),
    )
    parser.add_argument("exp", type=Path, metavar="EXP", help="experiment directory")
    parser.add_argument(
        "--kind",
        default="hidden,tracin",
        help="comma-separated feature kinds: hidden, tracin (default: both)",
    )
    parser.add_argument(
        "--proj-dim",
        type=_positive_int,
        default=512,
        help="projection dimension of the tracin kind (default 512, at most the number of "
        "trainable parameters)",
    )
    parser.add_argument("--seed", type=int, default=0, help="projection seed (default 0)")
    parser.add_argument(
        "--outside",
        type=int,
        default=0,
        help="also the first N training examples outside the pool (the warm-up set; default 0)",
    )
    parser.set_defaults(handler=_features)
    return parser


def _features(args: argparse.Namespace) -> int:
    from finetune.features import FEATURE_KINDS, compute_features

    kinds = [k.strip() for k in args.kind.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FEATURE_KINDS]
    if bad or not kinds:
        raise ValueError(f"--kind {args.kind!r}: use one or more of {', '.join(FEATURE_KINDS)}")
    if args.outside < 0:
        raise ValueError(f"--outside {args.outside}: must be >= 0")
    for kind in kinds:
        path, reused = compute_features(
            args.exp,
            kind,
            proj_dim=args.proj_dim,
            seed=args.seed,
            n_outside=args.outside,
            progress=True,
        )
        print(f"{path}: {'up to date (cached)' if reused else 'written'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``finetune`` script.

    Args:
        argv: the arguments after the program name (None: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 (``EXIT_BAD_INPUT``) for bad input or a missing model
        stack (one line ``error: ...`` on stderr, after the traceback with ``--debug`` or
        ``SIMFLUENCE_DEBUG=1``), 1 (``EXIT_FAILED``) for a non-finite loss.

    Raises:
        SystemExit: from argparse, for ``--help`` (code 0) or a bad flag (code 2, one line).
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get(_DEBUG_ENV, "") not in ("", "0")
    # After parsing, so that --help works without the extra (the parser imports none of it).
    missing = _missing_model_stack()
    if missing:
        print(
            f"error: finetune needs the model stack, missing {', '.join(missing)}: "
            'pip install -e ".[finetune]" (or `make install`)',
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    _offline_without_hub()  # before transformers / datasets / huggingface_hub are imported
    if not debug:
        _quiet_abandoned_reads()
    try:
        from finetune import distributed

        # A no-op on a single process (see finetune.distributed).
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        return int(args.handler(args) or 0)
    except ValueError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # e.g. a folder that cannot be created: one line, as simfluence does
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{' '.join(str(e.strerror or e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        from finetune.trainer import NonFiniteLossError

        if isinstance(e, NonFiniteLossError):
            if debug:
                traceback.print_exc()
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return EXIT_FAILED
        raise


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    raise SystemExit(main())
