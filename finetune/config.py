"""The typed configuration of one experiment: a pool, a tracked test set and many training runs.

One file per experiment lives under ``runs/<name>/config.py`` and defines
``get_config() -> ExperimentConfig``. The config is recorded in ``experiment.json``; a workdir
holding a different config is refused (see `finetune.trainer`).

References:
    Simfluence: Guu et al. 2023, https://arxiv.org/abs/2303.08114
    IA3 / T-Few: Liu et al. 2022, https://arxiv.org/abs/2205.05638
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.curricula import KINDS
from finetune.network import ATTENTION_IMPLS
from finetune.tasks import TASKS, splits

# The TracIn-CP modes (mirrors finetune.tracin.MODES; a test pins both).
TRACIN_MODES = ("exact", "projected")
# Fields that only choose how TracIn-CP post-processes the runs: a workdir is resumed when only
# these differ (finetune.trainer); tracin.npz records the settings it was computed with.
TRACIN_FIELDS = ("tracin_mode", "tracin_proj_dim", "tracin_seed", "tracin_chunk_size")


class ConfigError(ValueError):
    """An ExperimentConfig field has a bad value."""


@dataclass(frozen=True)
class WarmupConfig:
    """A short training phase run once per experiment before the runs (for random-init models).

    It trains all parameters on training-split examples that are neither in the pool nor tracked,
    so that a random-init model has learned the answer format before the runs start (a model that
    has not gives flat, uninformative test-loss trajectories). Its result is cached in
    ``EXP/warmup/`` and is the starting point of every run.
    """

    steps: int = 300  # optimizer steps of the warm-up
    batch_size: int = 16  # examples per warm-up step
    n_examples: int = 1000  # warm-up examples drawn from the train split outside the pool
    learning_rate: float = 1e-3  # AdamW learning rate, constant
    seed: int = 0  # seed of the warm-up order (the examples come from the experiment's data_seed)

    def __post_init__(self):
        if wrong := _type_error(self, _WARMUP_TYPED_FIELDS):
            raise ConfigError(f"warmup.{wrong}")
        for name in ("steps", "batch_size", "n_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"warmup.{name}={getattr(self, name)} must be >= 1")
        if not self.learning_rate > 0:
            raise ConfigError(f"warmup.learning_rate={self.learning_rate} must be > 0")


def _type_error(obj, table) -> str | None:
    """``'field=value must be ...'`` for the first field of ``obj`` whose type ``table`` (rows of
    (field names, accepted types, what the message asks for)) refuses; None when all fit. A bool
    is only accepted where the types are exactly bool (it is an int to isinstance)."""
    for names, kinds, what in table:
        for name in names:
            value = getattr(obj, name)
            if isinstance(value, bool) is not (kinds is bool) or not isinstance(value, kinds):
                return f"{name}={value!r} must be {what}"
    return None


_WARMUP_TYPED_FIELDS = (
    (("steps", "batch_size", "n_examples", "seed"), int, "an integer"),
    (("learning_rate",), int | float, "a number"),
)

# (field names, accepted types, what the message asks for) of ExperimentConfig, checked first.
_TYPED_FIELDS = (
    (("name", "task", "tracin_mode"), str, "a string"),
    (("model", "tokenizer"), str | os.PathLike | None, "a path, a hub name or None"),
    (("random_init",), dict | None, "a dict of transformers.T5Config kwargs or None"),
    (("freeze_embeddings", "scan_layers"), bool, "True or False"),
    (("learning_rate", "weight_decay"), int | float, "a number"),
    (("grad_clip_norm",), int | float | None, "a number or None"),
    (
        (
            "init_seed",
            "n_train",
            "n_test",
            "max_input_length",
            "max_target_length",
            "length_multiple",
            "tracked_buckets",
            "data_seed",
            "num_runs",
            "steps",
            "batch_size",
            "warmup_steps",
            "curriculum_seed",
            "runs_together",
            "tracin_proj_dim",
            "tracin_seed",
            "tracin_chunk_size",
        ),
        int,
        "an integer",
    ),
    (
        ("subset_size", "train_length_groups", "checkpoint_runs"),
        int | None,
        "an integer or None",
    ),
)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines an experiment; two experiments with equal configs are identical.

    Raises:
        ConfigError: from ``__post_init__`` for any inconsistent field, naming it and the fix.
    """

    name: str  # experiment name (the runs/<name> folder)
    task: str  # "rte" | "copa" | "winogrande"
    # --- model --------------------------------------------------------------------------------
    model: str | None = None  # HF checkpoint directory or hub name; None = random init
    random_init: dict[str, Any] | None = None  # transformers.T5Config kwargs when model is None
    init_seed: int = 0  # seed of the random init (ignored for pretrained models)
    tokenizer: str | None = None  # tokenizer dir/file/hub name; None: SIMFLUENCE_TOKENIZER or model
    method: str = "full"  # "full" (all weights) or "ia3" (only the IA3 scaling vectors)
    freeze_embeddings: bool = False  # full tuning but keep the shared vocab embedding fixed
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16" (params stay float32)
    scan_layers: bool = False  # lax.scan over each stack's blocks: compile time independent of
    #   depth (set it for 12+ layers); same parameters, dropout masks differ from unrolled
    attention: str = "einsum"  # "einsum" | "xla" | "cudnn": jax.nn.dot_product_attention where
    #   no attention dropout applies (the runs train without dropout, so training, logging,
    #   scoring and TracIn all use it); "cudnn" = fused GPU kernel (bf16, IA3, no warm-up)
    # --- optimizer ----------------------------------------------------------------------------
    optimizer: str = "adamw"  # "adamw" | "adafactor"
    learning_rate: float = 1e-4  # peak learning rate (T-Few IA3: 3e-3)
    schedule: str = "constant"  # "constant" | "linear" | "cosine" (decay towards 0, see README)
    warmup_steps: int = 0  # linear lr warm-up at the start of each run (step t: lr*t/warmup_steps)
    weight_decay: float = 0.0  # decoupled weight decay (AdamW only)
    grad_clip_norm: float | None = None  # clip gradients to this global norm (T-Few: 1.0)
    # --- data ---------------------------------------------------------------------------------
    train_split: str = "train"  # split the pool is drawn from
    test_split: str = "validation"  # split the tracked test examples are drawn from
    n_train: int = 100  # pool size, drawn once per experiment from train_split
    n_test: int = 50  # tracked test examples, drawn once per experiment from test_split
    max_input_length: int = 256  # inputs are truncated to this many tokens (EOS kept)
    max_target_length: int = 32  # answers likewise
    length_multiple: int = 16  # each batch is padded to a multiple of this of its own max length
    tracked_buckets: int = 4  # at most this many padded lengths in the tracked set (one traced
    #   forward each in the logging program; see finetune.data.bucket_lengths)
    data_seed: int = 0  # seed of the pool / test draw
    # --- runs ---------------------------------------------------------------------------------
    num_runs: int = 32  # training runs, each under its own random curriculum
    steps: int = 100  # optimizer steps per run
    batch_size: int = 8  # training examples per step
    curriculum: str = "uniform"  # "epochs" | "uniform" | "subset" (see finetune.curricula)
    subset_size: int | None = None  # examples per run for curriculum "subset"
    curriculum_seed: int = 0  # run r uses seed (curriculum_seed, r)
    runs_together: int = 8  # R: runs trained together in one vmapped program (memory bound)
    train_length_groups: int | None = None  # IA3 only: sort the R x batch examples of a step
    #   by length into this many groups of fixed padded length (each example uses its own run's
    #   IA3 vectors) instead of padding all runs to the step's longest input; None: off
    held_out_pool: int = 0  # training examples appended to the pool (positions n_train..
    #   n_train + held_out_pool - 1; experiment.json's n_train counts them) that only the
    #   held-out runs train on: examples no fitting run sees (featurized Simfluence, issue 19)
    held_out_runs: int = 0  # the last held_out_runs of the num_runs runs draw their curricula
    #   from the whole pool, held-out examples included; the others from the first n_train
    checkpoint_steps: tuple[int, ...] = ()  # saved states (orbax), after that many steps; 0=start
    checkpoint_runs: int | None = None  # only runs 0..checkpoint_runs-1 save checkpoints; None=all
    warmup: WarmupConfig | None = None  # optional warm-up phase before all runs (random init)
    # --- TracIn-CP (finetune run --tracin, finetune tracin, make tracin; their flags override) ---
    tracin_mode: str = "exact"  # "exact": flattened per-example gradients, two chunks held
    #   (4 bytes x 2 x tracin_chunk_size x trainable parameters); "projected": each gradient
    #   projected to tracin_proj_dim dimensions (one chunk held; full tuning of large models)
    tracin_proj_dim: int = 4096  # projection dimension d (projected mode; <= trainable params)
    tracin_seed: int = 0  # seed of the random projection (projected mode)
    tracin_chunk_size: int = 32  # examples per vmapped per-example-gradient chunk
    output_dir: str | None = None  # default output folder; None: runs/<name>/output
    notes: str = ""  # free text recorded with the experiment
    extra: dict[str, Any] = field(default_factory=dict)  # recorded, unused (e.g. the eval split)

    def __post_init__(self):
        def bad(msg: str):
            raise ConfigError(f"config {self.name!r}: {msg}")

        # Types first: the checks below compare values, which fails with a TypeError (a traceback
        # that names no field) on e.g. learning_rate="1e-3".
        if wrong := _type_error(self, _TYPED_FIELDS):
            bad(wrong)
        if not isinstance(self.checkpoint_steps, list | tuple):
            bad(f"checkpoint_steps={self.checkpoint_steps!r} must be a tuple of integers")
        if not isinstance(self.warmup, WarmupConfig | dict | None):
            bad(f"warmup={self.warmup!r} must be a WarmupConfig (or None)")
        if self.task not in TASKS:
            bad(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        for split_field in ("train_split", "test_split"):
            value = getattr(self, split_field)
            if value not in splits(self.task):
                bad(
                    f"{split_field}={value!r} is not a split of {self.task}; choose one of "
                    f"{', '.join(splits(self.task))}"
                )
        if self.model is None and not self.random_init:
            bad("give model (checkpoint dir or hub name) or random_init (T5Config kwargs)")
        if self.model is not None and self.random_init:
            bad("give model or random_init, not both")
        if self.method not in ("full", "ia3"):
            bad(f"method={self.method!r}; choose 'full' or 'ia3'")
        if self.method == "ia3" and self.freeze_embeddings:
            bad("freeze_embeddings applies to method 'full' only")
        if self.attention not in ATTENTION_IMPLS:
            bad(f"attention={self.attention!r}; choose 'einsum', 'xla' or 'cudnn'")
        if self.attention == "cudnn" and self.dtype != "bfloat16":
            bad("attention='cudnn' needs dtype='bfloat16' (the fused kernel is bf16/fp16 only)")
        if self.attention == "cudnn" and (self.method != "ia3" or self.warmup is not None):
            # Under the vmap over runs a trained position-bias table carries the run axis,
            # which cuDNN's batching rule cannot fold into the example axis.
            bad(
                "attention='cudnn' needs method='ia3' and no warm-up (the position bias must "
                "stay frozen); use attention='xla' otherwise"
            )
        if self.train_length_groups is not None:
            if self.method != "ia3":
                bad("train_length_groups needs method='ia3' (each example gathers its run's IA3)")
            g = self.train_length_groups
            if not isinstance(g, int) or not 1 <= g <= self.batch_size:
                bad(f"train_length_groups={g!r} must be an integer in [1, {self.batch_size}]")
        if not isinstance(self.scan_layers, bool):
            bad(f"scan_layers={self.scan_layers!r} must be True or False")
        if self.dtype not in ("float32", "bfloat16"):
            bad(f"dtype={self.dtype!r}; choose 'float32' or 'bfloat16'")
        if self.optimizer not in ("adamw", "adafactor"):
            bad(f"optimizer={self.optimizer!r}; choose 'adamw' or 'adafactor'")
        if self.schedule not in ("constant", "linear", "cosine"):
            bad(f"schedule={self.schedule!r}; choose 'constant', 'linear' or 'cosine'")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            bad(f"grad_clip_norm={self.grad_clip_norm} must be > 0 or None")
        if self.weight_decay < 0:
            bad(f"weight_decay={self.weight_decay} must be >= 0")
        if not self.learning_rate > 0:
            bad(f"learning_rate={self.learning_rate} must be > 0")
        if self.curriculum not in KINDS:
            bad(f"curriculum={self.curriculum!r}; choose one of {', '.join(KINDS)}")
        for name in (
            "n_train",
            "n_test",
            "num_runs",
            "steps",
            "batch_size",
            "runs_together",
            "max_input_length",
            "max_target_length",
            "length_multiple",
            "tracked_buckets",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if not 0 <= self.warmup_steps < self.steps:
            bad(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        pool = self.subset_size if self.curriculum == "subset" else self.n_train
        if self.curriculum == "subset":
            if self.subset_size is None or not (
                min(self.batch_size, self.n_train) <= self.subset_size <= self.n_train
            ):
                bad(
                    f"subset_size={self.subset_size} must be in [batch_size={self.batch_size}, "
                    f"n_train={self.n_train}] for curriculum 'subset' (each run trains on its "
                    "own random subset of that many pool examples)"
                )
        elif self.subset_size is not None:
            bad("subset_size is only used with curriculum 'subset'; remove it")
        if self.batch_size > pool:
            bad(
                f"batch_size={self.batch_size} is larger than the pool ({pool} examples); "
                "lower batch_size or raise n_train"
            )
        steps = tuple(self.checkpoint_steps)
        if any(not isinstance(s, int) or not 0 <= s <= self.steps for s in steps):
            bad(
                f"checkpoint_steps {list(steps)} must lie in [0, steps={self.steps}] (0 is the "
                "state before the first step)"
            )
        if list(steps) != sorted(set(steps)):
            bad(f"checkpoint_steps {list(steps)} must be increasing without repeats")
        object.__setattr__(self, "checkpoint_steps", steps)
        for name in ("held_out_pool", "held_out_runs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad(f"{name}={value!r} must be an integer >= 0")
        if (self.held_out_pool > 0) != (self.held_out_runs > 0):
            bad(
                f"held_out_pool={self.held_out_pool} and held_out_runs={self.held_out_runs}: "
                "give both (examples no fitting run sees, and the runs that train on them) or "
                "neither"
            )
        if self.held_out_runs >= self.num_runs:
            bad(
                f"held_out_runs={self.held_out_runs} must be smaller than num_runs="
                f"{self.num_runs} (the other runs fit the simulators)"
            )
        if self.tracin_mode not in TRACIN_MODES:
            bad(f"tracin_mode={self.tracin_mode!r}; choose 'exact' or 'projected'")
        if self.tracin_proj_dim < 1:
            bad(f"tracin_proj_dim={self.tracin_proj_dim} must be >= 1 (e.g. 4096)")
        if self.tracin_chunk_size < 1:
            bad(f"tracin_chunk_size={self.tracin_chunk_size} must be >= 1 (e.g. 32)")
        if self.checkpoint_runs is not None and not 0 <= self.checkpoint_runs <= self.num_runs:
            bad(f"checkpoint_runs={self.checkpoint_runs} must be in [0, num_runs]")
        if isinstance(self.warmup, dict):
            object.__setattr__(self, "warmup", WarmupConfig(**self.warmup))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); `from_dict` inverts it.

        Returns:
            Every field by name (``warmup`` as a dict or None, ``checkpoint_steps`` a list).
        """
        d = dataclasses.asdict(self)
        d["checkpoint_steps"] = list(self.checkpoint_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        """Rebuilds a config from `to_dict` output.

        Args:
            d: a dict of fields, as `to_dict` (or experiment.json's ``config``) holds them.

        Returns:
            The config, checked by ``__post_init__``.

        Raises:
            ConfigError: unknown fields, or a bad value (see ``__post_init__``).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}")
        d = dict(d)
        d["checkpoint_steps"] = tuple(d.get("checkpoint_steps", ()))
        if d.get("warmup") is not None:
            d["warmup"] = WarmupConfig(**d["warmup"])
        return cls(**d)

    def run_pool_size(self, run_index: int) -> int:
        """Number of pool positions run ``run_index``'s curriculum draws from.

        Args:
            run_index: the run (0-based).

        Returns:
            n_train + held_out_pool for the last ``held_out_runs`` runs, else n_train.
        """
        held = run_index >= self.num_runs - self.held_out_runs and self.held_out_runs > 0
        return self.n_train + (self.held_out_pool if held else 0)

    def saves_checkpoints(self, run_index: int) -> bool:
        """Whether run ``run_index`` saves checkpoints.

        Args:
            run_index: the run (0-based).

        Returns:
            True when ``checkpoint_steps`` is set and the run is among the first
            ``checkpoint_runs`` (every run when that is None).
        """
        return bool(self.checkpoint_steps) and (
            self.checkpoint_runs is None or run_index < self.checkpoint_runs
        )


def load_experiment_config(path: str | os.PathLike) -> tuple[ExperimentConfig, Path]:
    """Loads ``get_config()`` from a ``runs/<name>`` folder or its ``config.py``.

    The file is executed as a module (it is user code) and its ``get_config()`` called.

    Args:
        path: a ``runs/<name>`` folder holding ``config.py``, or the ``config.py`` file itself.

    Returns:
        ``(config, folder)``: the ExperimentConfig and the folder of the config file.

    Raises:
        ConfigError: get_config() built an ExperimentConfig with a bad field (the message names
            the file and the field).
        ValueError: the file is missing, cannot be executed, defines no get_config(), or
            get_config() fails otherwise (e.g. an unknown field) or returns something else than
            an ExperimentConfig; one line naming the file.
    """
    path = Path(path)
    file = path / "config.py" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"config {path} not found; pass a runs/<name> folder holding "
            "config.py, or the config.py file itself"
        )
    spec = importlib.util.spec_from_file_location(f"_finetune_config_{file.parent.name}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a config file is user code: report any failure in one line
        raise ValueError(f"{file}: cannot load ({type(e).__name__}: {e})") from None
    get = getattr(module, "get_config", None)
    if get is None:
        raise ValueError(f"{file} defines no get_config(); it must return an ExperimentConfig")
    try:
        config = get()
    except ConfigError as e:  # names the field and the fix; add the file
        raise ConfigError(f"{file}: {e}") from None
    except Exception as e:  # config code: e.g. an unknown field (TypeError from the dataclass)
        raise ValueError(
            f"{file}: get_config() failed ({type(e).__name__}: {e}); fix the config "
            "(its fields are those of finetune.config.ExperimentConfig)"
        ) from None
    if not isinstance(config, ExperimentConfig):
        raise ValueError(
            f"{file}: get_config() returned {type(config).__name__}, not "
            "finetune.config.ExperimentConfig"
        )
    return config, file.parent


def _parse_value(text: str, hint: Any, where: str) -> Any:
    """``text`` parsed as a value of the type ``hint`` (a field annotation), else ConfigError."""
    import json
    import types
    import typing

    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            return _parse_value(text, others[0], where)
        for kind in sorted(others, key=lambda a: a is str):  # str (accepts anything) last
            try:
                return _parse_value(text, kind, where)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"{where}: cannot read {text!r} as {names}")
    if hint is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where}: {text!r} is not true or false")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: {text!r} is not an integer") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: {text!r} is not a number") from None
    if hint is str:
        return text
    if origin is tuple:  # tuple[int, ...]: "0,500,1000" (empty: no elements)
        parts = [p for p in text.replace(" ", "").strip("()[]").split(",") if p]
        return tuple(_parse_value(p, args[0], where) for p in parts)
    if origin is dict or hint is dict:
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}: {text!r} is not a JSON object (e.g. '{{\"d_model\": 32}}')"
            )
        return value
    if hint is os.PathLike:
        return text
    raise ConfigError(f"{where}: fields of type {hint} cannot be set from the command line")


def apply_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """The config with ``KEY=VALUE`` overrides applied (``finetune run CONFIG --set ...``).

    Values are parsed against the field's type: integers, numbers, ``true``/``false``, strings,
    ``none`` for optional fields, comma-separated integers for ``checkpoint_steps`` (``0,500``),
    JSON objects for dict fields. ``warmup.FIELD=VALUE`` sets a field of the warm-up (the config
    must have one), ``warmup=none`` removes it. Later overrides of one key win.

    Args:
        config: the config ``get_config()`` returned.
        overrides: ``"KEY=VALUE"`` strings, in command-line order.

    Returns:
        A new config, checked by ``__post_init__``.

    Raises:
        ConfigError: a malformed override, an unknown key, a value that does not parse as the
            field's type, or a resulting config that ``__post_init__`` refuses; the message
            names the override (``--set KEY=VALUE``).
    """
    import difflib
    import typing

    hints = typing.get_type_hints(ExperimentConfig)
    warm_hints = typing.get_type_hints(WarmupConfig)
    changes: dict[str, Any] = {}
    warm_changes: dict[str, Any] = {}
    for item in overrides:
        where = f"--set {item}"
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{where}: expected KEY=VALUE, e.g. --set learning_rate=3e-4")
        if key.startswith("warmup."):
            sub = key.removeprefix("warmup.")
            if sub not in warm_hints:
                raise ConfigError(
                    f"{where}: WarmupConfig has no field {sub!r}; choose one of "
                    f"{', '.join(warm_hints)}"
                )
            warm_changes[sub] = _parse_value(text, warm_hints[sub], where)
            continue
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{where}: ExperimentConfig has no field {key!r}; {hint}the fields are those of "
                "finetune.config.ExperimentConfig"
            )
        if key == "warmup":
            if text.strip().lower() not in ("none", "null"):
                raise ConfigError(
                    f"{where}: warmup can only be set to none here; set its "
                    "fields with --set warmup.FIELD=VALUE"
                )
            changes[key] = None
            continue
        changes[key] = _parse_value(text, hints[key], where)
    if warm_changes:
        warmup = changes.get("warmup", config.warmup)
        if warmup is None:
            raise ConfigError(
                f"--set warmup.{next(iter(warm_changes))}: config {config.name!r} has no warm-up "
                "to change; add one in its config.py"
            )
        try:
            changes["warmup"] = dataclasses.replace(warmup, **warm_changes)
        except ConfigError as e:
            items = " ".join(o for o in overrides if o.strip().startswith("warmup."))
            raise ConfigError(f"--set {items}: {e}") from None
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError as e:
        raise ConfigError(f"--set {' '.join(overrides)}: {e}") from None


# ---------------------------------------------------------------------------------------------
# The paper-scale experiments (runs/t0-3b-*, runs/t5-base-lm-adapt-full-*): one definition.

# Pool size per task: COPA's whole training split (400 examples), 1000 drawn otherwise.
PAPER_POOL = {"rte": 1000, "copa": 400, "winogrande": 1000}
# What differs between the three paper families (model, tuning method and its recipe, memory).
PAPER_FAMILIES: dict[str, dict[str, Any]] = {
    # T0-3B full tuning: 10x lower lr than T5-base (already prompted-task tuned); 2 runs at once.
    # TracIn-CP projected: one exact gradient is 11.4 GB, so chunks of 4 per-example gradients.
    "t0-3b-full": dict(
        model="bigscience/T0_3B",
        method="full",
        scan_layers=True,  # 12-24 layers per stack: compile time independent of depth
        learning_rate=1e-4,
        schedule="constant",
        warmup_steps=0,
        grad_clip_norm=None,
        runs_together=2,
        checkpoint_steps=(0, 500, 1000),
        tracin_mode="projected",
        tracin_chunk_size=4,
    ),
    # T0-3B IA3, T-Few's recipe: lr 3e-3, linear decay after a 6% warm-up, clipping at 1.0.
    "t0-3b-ia3": dict(
        model="bigscience/T0_3B",
        method="ia3",
        scan_layers=False,  # unrolled: the scan's per-layer slices and residual writes cost more
        learning_rate=3e-3,
        schedule="linear",
        warmup_steps=60,
        grad_clip_norm=1.0,
        runs_together=8,
        train_length_groups=4,  # the 64 examples of a step in 4 length groups
        checkpoint_steps=tuple(range(0, 1001, 100)),
    ),
    # T5 v1.1 LM-adapted base full tuning: Adafactor at a constant 1e-3 (the T5 paper's recipe).
    "t5-base-lm-adapt-full": dict(
        model="google/t5-base-lm-adapt",
        method="full",
        scan_layers=True,
        learning_rate=1e-3,
        schedule="constant",
        warmup_steps=0,
        grad_clip_norm=None,
        runs_together=8,
        checkpoint_steps=tuple(range(0, 1001, 200)),
        tracin_mode="projected",
    ),
}


def paper_config(family: str, task: str) -> ExperimentConfig:
    """The config of one paper-scale experiment ``runs/<family>-<task>``.

    Every paper experiment: bf16 compute, Adafactor, 100 tracked validation examples, 32 runs
    (split 20 fit / 2 validation / 10 test) of 1000 steps of batch 8 under "uniform" curricula,
    inputs up to 256 tokens, checkpoints in the 20 fitting runs. The family sets the model, the
    tuning method and its recipe (``PAPER_FAMILIES``); the task sets the pool (``PAPER_POOL``).

    Args:
        family: ``"t0-3b-full"``, ``"t0-3b-ia3"`` or ``"t5-base-lm-adapt-full"``.
        task: ``"rte"``, ``"copa"`` or ``"winogrande"``.

    Returns:
        The ExperimentConfig named ``f"{family}-{task}"``.

    Raises:
        ConfigError: an unknown family or task.
    """
    if family not in PAPER_FAMILIES:
        raise ConfigError(f"unknown paper family {family!r}; choose one of {list(PAPER_FAMILIES)}")
    if task not in PAPER_POOL:
        raise ConfigError(f"unknown paper task {task!r}; choose one of {list(PAPER_POOL)}")
    return ExperimentConfig(
        name=f"{family}-{task}",
        task=task,
        dtype="bfloat16",
        optimizer="adafactor",
        n_train=PAPER_POOL[task],
        n_test=100,
        max_input_length=256,
        max_target_length=32,
        length_multiple=16,
        num_runs=32,
        steps=1000,
        batch_size=8,
        curriculum="uniform",
        checkpoint_runs=20,
        extra={"split": [20, 2, 10]},
        **PAPER_FAMILIES[family],
    )
