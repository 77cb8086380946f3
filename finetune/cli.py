"""``finetune`` command line: ``finetune run CONFIG`` and ``finetune tracin EXP``.

Thin entry point: parses arguments and calls `finetune.trainer.run_experiment` (and
`finetune.tracin.run_tracin`). Bad input prints one line ``error: ...`` and exits with code 2
before anything is written; a non-finite loss exits with code 1 naming the run and step.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
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


class _UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage block) and exit with code 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see `{self.prog} --help`)\n")


def load_config(path: str | Path):
    """Loads ``get_config()`` from a ``runs/<name>`` folder or its ``config.py``.

    Returns:
        (ExperimentConfig, the config file's folder).

    Raises:
        ValueError: the file is missing, does not define get_config() -> ExperimentConfig, or
            get_config() fails (an unknown or ill-typed field: one line naming the file).
    """
    from finetune.config import ConfigError, ExperimentConfig

    path = Path(path)
    file = path / "config.py" if path.is_dir() else path
    if not file.is_file():
        raise _UsageError(
            f"config {path} not found; pass a runs/<name> folder holding "
            "config.py, or the config.py file itself"
        )
    spec = importlib.util.spec_from_file_location(f"_finetune_config_{file.parent.name}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a config file is user code: report any failure in one line
        raise _UsageError(f"{file}: cannot load ({type(e).__name__}: {e})") from None
    get = getattr(module, "get_config", None)
    if get is None:
        raise _UsageError(f"{file} defines no get_config(); it must return an ExperimentConfig")
    try:
        config = get()
    except ConfigError as e:  # names the field and the fix; add the file
        raise ConfigError(f"{file}: {e}") from None
    except Exception as e:  # config code: e.g. an unknown field (TypeError from the dataclass)
        raise _UsageError(
            f"{file}: get_config() failed ({type(e).__name__}: {e}); fix the config "
            "(its fields are those of finetune.config.ExperimentConfig)"
        ) from None
    if not isinstance(config, ExperimentConfig):
        raise _UsageError(
            f"{file}: get_config() returned {type(config).__name__}, not "
            "finetune.config.ExperimentConfig"
        )
    return config, file.parent


def _run(args: argparse.Namespace) -> int:
    from finetune import trainer

    config, folder = load_config(args.config)
    out = args.out or (Path(config.output_dir) if config.output_dir else folder / "output")
    data_dir = args.data_dir or os.environ.get("SIMFLUENCE_DATA_DIR") or None
    result = trainer.run_experiment(
        config,
        out,
        data_dir=data_dir,
        tokenizer=args.tokenizer,
        progress=not args.no_progress,
        max_steps_this_call=args.max_steps,
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

        written = tracin.run_tracin(out, progress=not args.no_progress)
        print(f"wrote {len(written)} tracin.npz file(s) under {out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from finetune import tracin

    parser = _Parser(
        prog="finetune",
        description="Fine-tuning runs under random curricula (Simfluence run logs) and TracIn-CP.",
    )
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
        "--tracin",
        action="store_true",
        help="compute TracIn-CP dot products (finetune tracin) after training",
    )
    run.add_argument(
        "--max-steps",
        type=tracin.positive_int,
        default=None,
        help="stop after this many (group) steps; run again to continue",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(handler=_run)
    tracin.add_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``finetune`` script; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    missing = _missing_model_stack()
    if missing:
        print(
            f"error: finetune needs the model stack, missing {', '.join(missing)}: "
            'pip install -e ".[finetune]" (or `make install`)',
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        from finetune import distributed

        # A no-op on a single process (see finetune.distributed).
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        handler = getattr(args, "handler", None) or args.func
        return int(handler(args) or 0)
    except ValueError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # e.g. a folder that cannot be created: one line, as simfluence does
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{' '.join(str(e.strerror or e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        from finetune.trainer import NonFiniteLossError

        if isinstance(e, NonFiniteLossError):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return EXIT_FAILED
        raise


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    raise SystemExit(main())
