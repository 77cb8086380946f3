"""The training loop: many fine-tuning runs under random curricula, logging per-step test losses.

Layer 4 of ``finetune`` (see its package docstring): data, cadence, logging, checkpoints. The runs
of an experiment differ only in their curriculum, so R of them train together in one jitted program
(`finetune.steps.make_programs`: ``vmap`` over a run axis of the trainable state, the optimizer
state and the batches, with the frozen weights shared). One device mesh (axis ``"data"``,
`finetune.distributed`) shards every batch and the tracked test set over the examples; parameters
are replicated.

Length bucketing (`finetune.data`): a training step pads its batches (all R runs) to a multiple
of ``length_multiple`` of their own longest input, and the tracked set is cut into at most
``tracked_buckets`` buckets of equal padded length (chosen to minimise padding), so jit compiles
once per distinct length instead of padding everything to the maximum. Training and logging are
separate programs: a new batch length recompiles only the training step.

Resume: re-running the same command continues. Complete runs are kept; an incomplete run
restarts from its latest checkpoint (trainable state, optimizer state and its log so far), and
ends with files identical to those of an uninterrupted run.

Counterfactual runs (`finetune.counterfactual`) start from the same set-up (`_setup`) and train
through the same `_train_group`, into EXP/counterfactual.

References:
    Simfluence: Guu et al. 2023, https://arxiv.org/abs/2303.08114
    IA3 / T-Few: Liu et al. 2022, https://arxiv.org/abs/2205.05638
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from finetune import experiment as E
from finetune.config import TRACIN_FIELDS, ExperimentConfig
from finetune.curricula import make_curriculum
from finetune.data import (
    TrackedSet,
    flat_group_lengths,
    gather_batch,
    gather_flat,
    make_tracked_set,
    put_batch,
    put_groups,
)
from finetune.distributed import make_mesh, place
from finetune.metrics import DEFAULT_LOG_EVERY, LiveMetrics, check_log_every, check_report_to
from finetune.tasks import TaskError, encode, load_split, pad, pad_choices, round_up
from simfluence import runlog

_LOG = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WARMUP_LOG = "warmup.json"
_SYNC_EVERY = 32  # steps between host syncs of the logged losses (keeps the device queue full)


class NonFiniteLossError(RuntimeError):
    """A training or tracked test loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------
# Preparing the experiment folder


def _same_config(info: dict, config: ExperimentConfig) -> list[str]:
    """Names of the config fields that differ between a workdir's experiment.json and config.

    The TracIn-CP settings (``TRACIN_FIELDS``) are not compared: they choose how the runs are
    post-processed, not the runs, and each tracin.npz records the settings it was computed with
    (so a run that does not fit in exact mode can be continued with ``--set
    tracin_mode=projected``). Experiments recorded before those fields existed hold none.
    """
    old = info.get("config", {})
    new = json.loads(json.dumps(config.to_dict(), default=str))
    # A field an older experiment.json lacks had its default then (fields added later).
    default = {f.name: f.default for f in dataclasses.fields(config) if f.name in _ADDED_FIELDS}
    keys = (set(old) | set(new)) - set(TRACIN_FIELDS)
    return sorted(k for k in keys if old.get(k, default.get(k)) != new.get(k))


# Config fields added after experiments were first written (absent from older experiment.json).
_ADDED_FIELDS = ("held_out_pool", "held_out_runs")


def _check_out(exp_dir: Path) -> None:
    """Refuses an output folder that is a file or lies under one (before anything is read)."""
    for path in (exp_dir, *exp_dir.parents):
        if path.is_dir():
            return
        if path.exists():
            raise E.ExperimentError(
                f"output folder {exp_dir}: {path} is a file, not a folder; pass another --out "
                "(a folder to create, or an experiment folder to continue)"
            )


def _tokenizer_key(name: str) -> str:
    """A tokenizer as recorded in experiment.json and compared: a local path resolved (a
    spiece.model file by its folder, which is what `load_tokenizer` reads), a hub name as is."""
    path = Path(name).expanduser()
    if not path.exists():
        return name
    path = path.resolve()
    return str(path.parent if path.is_file() else path)


def _data_key(data_dir: str | Path) -> str:
    """A data directory as recorded in experiment.json and compared (resolved)."""
    return str(Path(data_dir).resolve())


def _check_sources(
    info: dict, exp_dir: Path, tokenizer: str | None, data_dir: str | Path | None
) -> None:
    """Refuses a tokenizer or data directory that differs from the ones the workdir was
    prepared with: its data.npz is reused, so they would be silently ignored.

    A source not given on this call (None) is not compared: there is nothing to ignore.
    """
    fresh = f"to start fresh delete it (rm -r {exp_dir}) or pass another --out"
    old_tok = info.get("tokenizer")
    if tokenizer is not None and old_tok and _tokenizer_key(old_tok) != _tokenizer_key(tokenizer):
        raise E.ExperimentError(
            f"{exp_dir} holds an experiment tokenized with {old_tok}, not {tokenizer} "
            f"(--tokenizer, SIMFLUENCE_TOKENIZER or the config); pass --tokenizer {old_tok} to "
            f"continue it, or {fresh}"
        )
    if data_dir is not None and "data_dir" in info:
        old, new = info["data_dir"], _data_key(data_dir)
        if old != new:
            keep = (
                f"pass --data-dir {old}"
                if old
                else "unset --data-dir and SIMFLUENCE_DATA_DIR (the hub)"
            )
            raise E.ExperimentError(
                f"{exp_dir} holds an experiment drawn from data dir "
                f"{old or 'the Hugging Face hub'}, not {new} (--data-dir or "
                f"SIMFLUENCE_DATA_DIR); {keep} to continue it, or {fresh}"
            )


def check_workdir(
    config: ExperimentConfig,
    exp_dir: Path,
    *,
    tokenizer: str | None = None,
    data_dir: str | Path | None = None,
) -> dict | None:
    """Returns experiment.json of an existing workdir holding ``config`` (None: fresh workdir).

    Args:
        config: the experiment config.
        exp_dir: the output folder.
        tokenizer: the tokenizer this call would use (None: not compared).
        data_dir: the data directory this call would use (None: not compared).

    Raises:
        ExperimentError: ``exp_dir`` is a file or lies under one; the workdir holds a different
            config, or was prepared with another tokenizer or data directory; it holds run
            folders without experiment.json.
    """
    exp_dir = Path(exp_dir)
    _check_out(exp_dir)
    if (exp_dir / "experiment.json").is_file():
        info = runlog.read_experiment(exp_dir)
        diff = _same_config(info, config)
        if diff:
            raise E.ExperimentError(
                f"{exp_dir} holds an experiment with a different config (fields {diff}); "
                f"to start fresh delete it (rm -r {exp_dir}) or pass another --out"
            )
        _check_sources(info, exp_dir, tokenizer, data_dir)
        return info
    if exp_dir.is_dir() and any(p.name.startswith("run_") for p in exp_dir.iterdir()):
        raise E.ExperimentError(
            f"{exp_dir} holds run folders but no experiment.json; delete it (rm -r {exp_dir}) "
            "or pass another --out"
        )
    return None


def _tokenizer_name(config: ExperimentConfig, tokenizer: str | None) -> str | None:
    import os

    name = tokenizer or os.environ.get("SIMFLUENCE_TOKENIZER") or config.tokenizer or config.model
    return str(name) if name else None


def _resolve_tokenizer(config: ExperimentConfig, tokenizer: str | None) -> str:
    name = _tokenizer_name(config, tokenizer)
    if not name:
        raise TaskError(
            f"config {config.name!r} uses a random-init model and names no tokenizer; pass "
            "--tokenizer DIR (a folder with spiece.model) or set SIMFLUENCE_TOKENIZER"
        )
    return name


def prepare_experiment(
    config: ExperimentConfig,
    exp_dir: str | Path,
    *,
    data_dir: str | Path | None,
    tokenizer: str | None,
    overrides: Sequence[str] = (),
) -> dict:
    """Draws the pool and tracked test set once and writes data.npz, examples.json, then
    experiment.json (last). A workdir that already holds the config is reused unchanged.

    Everything that can fail on bad input (data files, split sizes, tokenizer, the model and its
    checkpoint, the tokenizer against the model's vocabulary) is checked before anything is
    written.

    Args:
        config: the experiment config.
        exp_dir: output folder.
        data_dir: local data directory (layout of ../shared/data); None loads from the hub.
        tokenizer: tokenizer path or name; None: SIMFLUENCE_TOKENIZER, config.tokenizer, model.
        overrides: the ``--set KEY=VALUE`` strings applied to ``config``; recorded in a fresh
            experiment.json (``overrides``).

    Returns:
        experiment.json's content.

    Raises:
        TaskError, ExperimentError, CheckpointError, TokenizerError: bad input (see
            `finetune.cli` for the exit code).
    """
    return _prepare(
        config, Path(exp_dir), data_dir=data_dir, tokenizer=tokenizer, overrides=overrides
    )[0]


def _prepare(
    config: ExperimentConfig,
    exp_dir: Path,
    *,
    data_dir: str | Path | None,
    tokenizer: str | None,
    budget: int | None = None,
    overrides: Sequence[str] = (),
) -> tuple[dict, Any]:
    """`prepare_experiment`, also returning the base model it built to check it.

    Args:
        budget: ``run_experiment``'s ``max_steps_this_call``: refused here, after the workdir
            check and before anything is written, when it would keep nothing (`_check_budget`).
        overrides: the ``--set KEY=VALUE`` strings already applied to ``config``, recorded in
            a fresh experiment.json as ``overrides``.

    Returns:
        (experiment.json's content, `E.build_base_model(config)` or None when an existing
        workdir was reused without building it).
    """
    info = check_workdir(
        config, exp_dir, tokenizer=_tokenizer_name(config, tokenizer), data_dir=data_dir
    )
    if budget is not None:
        _check_budget(config, exp_dir, budget)
    if info is not None and (exp_dir / E.DATA_FILE).is_file():
        return info, None
    train = load_split(config.task, config.train_split, data_dir)
    test = load_split(config.task, config.test_split, data_dir)
    n_warm = config.warmup.n_examples if config.warmup else 0
    # Tracked examples drawn from a training file stay out of the pool and warm-up. They are
    # matched by example id, not split name: Winogrande's "train" is "train_l", and "train_xs",
    # "train_s", "train_m" are subsets of it (qIDs are global; RTE/COPA ids are row numbers
    # within a file, so they are compared only between training files). The count here is a
    # worst case: the draw excludes the ids of the tracked examples actually drawn.
    same = config.train_split == config.test_split or (
        _is_training_split(config.train_split) and _is_training_split(config.test_split)
    )
    n_used = config.n_train + config.held_out_pool + n_warm + (config.n_test if same else 0)
    if n_used > len(train):
        extra = f" + warmup.n_examples={n_warm}" if n_warm else ""
        where = "same split" if config.train_split == config.test_split else "a training file"
        extra += f" + n_test={config.n_test} ({where})" if same else ""
        raise TaskError(
            f"config {config.name!r}: n_train={config.n_train}{extra} exceeds the "
            f"{len(train)} examples of {config.task} {config.train_split}; lower it"
        )
    if config.n_test > len(test):
        raise TaskError(
            f"config {config.name!r}: n_test={config.n_test} exceeds the {len(test)} "
            f"examples of {config.task} {config.test_split}; lower it"
        )
    tok_name = _resolve_tokenizer(config, tokenizer)
    from finetune.tokenization import TokenizerError, check_vocab, load_tokenizer

    try:
        tok = load_tokenizer(tok_name)
    except (OSError, ValueError) as e:
        raise TaskError(f"cannot load tokenizer {tok_name!r}: {str(e).splitlines()[0]}") from None
    # The model is built here, not after the files are written: a bad checkpoint or random_init
    # must not leave a prepared-looking workdir (a fixed config would then be refused as a
    # different one). The caller reuses it, so it is loaded once.
    base = E.build_base_model(config)
    n_vocab = E.vocab_size(base[1])
    model = f"model {config.model}" if config.model else f"the random_init of {config.name!r}"
    fix = "" if config.model else f", or raise random_init['vocab_size'] to {len(tok)}"
    try:  # an id past the embedding would index garbage and train into NaN
        check_vocab(tok, n_vocab)
    except TokenizerError as e:
        raise TokenizerError(f"tokenizer {tok_name} does not fit {model}: {e}{fix}") from None

    def draw(n_total, n, stream, exclude=()):
        rng = np.random.default_rng(np.random.SeedSequence([config.data_seed, stream]))
        candidates = np.setdiff1d(np.arange(n_total), np.asarray(exclude, dtype=np.int64))
        return rng.choice(candidates, size=n, replace=False)

    test_idx = draw(len(test), config.n_test, 1)
    held_ids = {test[i].uid for i in test_idx} if same else set()
    held = np.asarray([i for i, x in enumerate(train) if x.uid in held_ids], np.int64)
    pool_idx = draw(len(train), config.n_train, 0, exclude=held)
    warm_idx = (
        draw(len(train), n_warm, 2, exclude=np.concatenate([pool_idx, held]))
        if n_warm
        else np.zeros(0, int)
    )
    # Held-out pool examples: their own stream, so the pool, tracked and warm-up draws (and
    # every run that does not use them) are those of the config without them.
    extra_idx = (
        draw(
            len(train),
            config.held_out_pool,
            3,
            exclude=np.concatenate([pool_idx, held, warm_idx]),
        )
        if config.held_out_pool
        else np.zeros(0, int)
    )
    pool = [train[i] for i in np.concatenate([pool_idx, extra_idx]).astype(int)]
    tracked = [test[i] for i in test_idx]
    warm = [train[i] for i in warm_idx]
    kw = dict(max_input_length=config.max_input_length, max_target_length=config.max_target_length)
    enc = {
        name: encode(tok, exs, **kw)
        for name, exs in (("pool", pool), ("test", tracked), ("warmup", warm))
        if exs
    }
    # One target length for everything (answers are short); inputs padded per set here and
    # per batch / bucket when training.
    t_len = max(len(c) for e in enc.values() for cs in e.choices for c in cs)
    arrays: dict[str, np.ndarray] = {}
    for name, e in enc.items():
        lengths = np.asarray([len(x) for x in e.inputs], np.int32)
        arrays[f"{name}_inputs"] = pad(
            e.inputs, round_up(int(lengths.max()), config.length_multiple)
        )
        arrays[f"{name}_targets"] = pad(e.targets, t_len)
        arrays[f"{name}_choices"] = pad_choices(e.choices, t_len)
        arrays[f"{name}_labels"] = e.labels
        arrays[f"{name}_lengths"] = lengths
    ids = ("inputs", "targets", "choices")
    top = max(int(a.max()) for k, a in arrays.items() if k.endswith(ids))
    if top >= n_vocab:  # a tokenizer whose len() understates its ids
        raise TokenizerError(
            f"tokenizer {tok_name} gives token id {top} but {model} has vocab_size={n_vocab} "
            f"(ids 0..{n_vocab - 1}); use the tokenizer that belongs to the model{fix}"
        )
    exp_dir.mkdir(parents=True, exist_ok=True)
    runlog.atomic_savez(exp_dir / E.DATA_FILE, **arrays)
    runlog.atomic_write_json(
        exp_dir / "examples.json",
        {
            "train": [f"{x.input} => {x.target}" for x in pool],
            "test": [f"{x.input} => {x.target}" for x in tracked],
        },
    )
    info = {
        "n_train": config.n_train + config.held_out_pool,
        "n_test": config.n_test,
        "task": config.task,
        "model": config.model or "random-init",
        "method": config.method,
        "train_split": config.train_split,
        "test_split": config.test_split,
        "pool_ids": [x.uid for x in pool],
        "test_ids": [x.uid for x in tracked],
        "test_labels": [int(x.label) for x in tracked],  # gold column of choice_losses.npy
        "warmup_ids": [x.uid for x in warm],
        "tokenizer": _tokenizer_key(tok_name),
        "data_dir": None if data_dir is None else _data_key(data_dir),
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
        # Not part of the experiment's identity: `runlog.experiment_sha256` leaves it out.
        "provenance": runlog.provenance(),
        "overrides": list(overrides),
    }
    if config.held_out_pool:  # pool positions no fitting run uses, and the runs that do
        info["held_out_pool"] = list(range(config.n_train, config.n_train + config.held_out_pool))
        info["held_out_runs"] = list(range(config.num_runs - config.held_out_runs, config.num_runs))
    runlog.write_experiment(exp_dir, info)
    return runlog.read_experiment(exp_dir), base


def _is_training_split(split: str) -> bool:
    """Whether a split is read from a training file (every split but "validation")."""
    return split != "validation"


# ----------------------------------------------------------------------------------------------
# Schedules, the optimizer and the jitted programs


def make_schedule(config: ExperimentConfig):
    """The optax learning-rate schedule of the config (count 0 = step 1)."""
    import optax

    lr, warm, steps = config.learning_rate, config.warmup_steps, config.steps
    if config.schedule == "constant":
        body = optax.constant_schedule(lr)
    elif config.schedule == "linear":
        body = optax.linear_schedule(lr, 0.0, steps - warm)
    else:
        body = optax.cosine_decay_schedule(lr, steps - warm)
    if warm == 0:
        return body

    def schedule(count):
        # Linear warm-up: step t <= warm (count t-1) uses lr * t / warm, never 0.
        ramp = lr * (count + 1) / warm
        return jnp.where(count < warm, ramp, body(jnp.maximum(count - warm, 0)))

    return schedule


def learning_rates(config: ExperimentConfig) -> np.ndarray:
    """f32 [steps]: the learning rate of each step (lr.npy)."""
    schedule = make_schedule(config)
    values = jax.vmap(schedule)(jnp.arange(config.steps, dtype=jnp.int32))
    return np.asarray(jax.device_get(values), np.float32).reshape(config.steps)


def optimizer_for_config(config: ExperimentConfig, schedule=None):
    """The optax optimizer of an experiment config: `finetune.steps.make_optimizer` with the
    config's optimizer, schedule (``make_schedule``), weight decay and gradient clipping.

    Args:
        config: the experiment config.
        schedule: a learning-rate schedule to use instead of ``make_schedule(config)``.

    Returns:
        An ``optax.GradientTransformation`` for the trainable part.
    """
    from finetune.steps import make_optimizer as _make

    kw: dict[str, Any] = {}
    if config.optimizer == "adamw":
        kw["weight_decay"] = config.weight_decay
    return _make(
        config.optimizer,
        schedule if schedule is not None else make_schedule(config),
        grad_clip_norm=config.grad_clip_norm,
        **kw,
    )


_PROGRAM_CACHE: dict = {}


def _cached_programs(config: ExperimentConfig, exp, optimizer, mesh) -> dict:
    """`make_programs`, reused within a process for the same network, optimizer and mesh.

    The loss functions are pure functions of the graphdef, so equal graphdefs give equal programs;
    a second `run_experiment` in the same process (e.g. resuming) then compiles nothing again.
    """
    from finetune.steps import make_programs

    key = (
        exp.graphdef,
        mesh,
        config.optimizer,
        config.learning_rate,
        config.schedule,
        config.warmup_steps,
        config.steps,
        config.weight_decay,
        config.grad_clip_norm,
    )
    if key not in _PROGRAM_CACHE:
        if len(_PROGRAM_CACHE) >= 4:
            _PROGRAM_CACHE.clear()
        _PROGRAM_CACHE[key] = make_programs(
            exp.per_example_loss,
            exp.score_choices,
            optimizer,
            mesh,
            broadcast_tracked=config.attention != "einsum",
        )
    return _PROGRAM_CACHE[key]


# ----------------------------------------------------------------------------------------------
# Warm-up


def _warmup(
    config: ExperimentConfig,
    exp_dir: Path,
    graphdef,
    params,
    data,
    tracked: TrackedSet,
    mesh,
    progress: bool,
) -> None:
    """Trains all parameters on the warm-up examples and saves them in EXP/warmup."""
    from finetune.model import make_per_example_loss, make_score_choices, partition
    from finetune.model import trainable_mask as _mask
    from finetune.steps import broadcast_runs, make_programs
    from finetune.steps import make_optimizer as _make

    w = config.warmup
    start = time.perf_counter()
    loss_fn = make_per_example_loss(graphdef)
    # All weights train, the vocabulary embedding included (even when the runs freeze it): a
    # random embedding tied to the output layer makes learning the answer format very slow.
    trainable, frozen = partition(params, _mask(params, "full"))
    opt = _make("adamw", w.learning_rate)
    progs = make_programs(
        loss_fn,
        make_score_choices(graphdef),
        opt,
        mesh,
        broadcast_tracked=config.attention != "einsum",
    )
    n = len(data["warmup_lengths"])
    cur = make_curriculum(
        "epochs",
        n_train=n,
        steps=w.steps,
        batch_size=min(w.batch_size, n),
        seed=w.seed,
        run_index=0,
    )
    tr = place(broadcast_runs(trainable, 1), mesh)
    op = place(broadcast_runs(opt.init(trainable), 1), mesh)
    fr = place(frozen, mesh)
    before = _gold(_choice_rows(progs["test_losses"](tr, fr, tracked.buckets), tracked), tracked)[0]
    losses = []
    from tqdm.auto import tqdm

    for t in tqdm(range(w.steps), desc="warm-up", disable=not progress, file=sys.stderr):
        batch = gather_batch(
            data["warmup_inputs"],
            data["warmup_targets"],
            data["warmup_lengths"],
            cur[t][None],
            config.length_multiple,
        )
        tr, op, loss, _ = progs["step_nolog"](tr, op, fr, put_batch(batch, mesh), tracked.buckets)
        losses.append(loss)
    losses = np.asarray(jnp.concatenate(losses))
    if not np.isfinite(losses).all():
        step = int(np.flatnonzero(~np.isfinite(losses))[0]) + 1
        raise NonFiniteLossError(
            f"warm-up of {config.name!r}: non-finite training loss at step "
            f"{step}; lower warmup.learning_rate"
        )
    after = _gold(_choice_rows(progs["test_losses"](tr, fr, tracked.buckets), tracked), tracked)[0]
    acc = float(_accuracy(np.asarray(progs["scores"](tr, fr, tracked.buckets)), tracked)[0])
    from finetune.model import combine

    params = combine(jax.tree.map(lambda x: np.asarray(x)[0], tr), frozen)
    E.save_warmup(exp_dir, params)
    runlog.atomic_write_json(
        exp_dir / WARMUP_LOG,
        {
            "steps": w.steps,
            "train_loss": losses.tolist(),
            "test_loss_mean_before": float(before.mean()),
            "test_loss_mean_after": float(after.mean()),
            "accuracy_after": acc,
            "seconds": time.perf_counter() - start,
        },
    )


# ----------------------------------------------------------------------------------------------
# The runs


def _choice_rows(rows, tracked: TrackedSet) -> np.ndarray:
    """[..., rows, C] choice losses in bucket order -> f32 [..., n_test, C] in test order."""
    per = tracked.scatter(np.moveaxis(np.asarray(rows), -1, -2))  # [..., C, n]
    return np.ascontiguousarray(np.moveaxis(per, -2, -1))


def _gold(choice: np.ndarray, tracked: TrackedSet) -> np.ndarray:
    """[..., n_test, C] choice losses -> [..., n_test] the gold choice's (the test loss)."""
    labels = np.broadcast_to(tracked.labels, choice.shape[:-1])[..., None]
    return np.take_along_axis(choice, labels, axis=-1)[..., 0]


def _accuracy(scores_rows: np.ndarray, tracked: TrackedSet) -> np.ndarray:
    """[R, rows, C] scores -> f32 [R] rank-classification accuracy on the tracked set."""
    per = tracked.scatter(np.moveaxis(scores_rows, -1, 1))  # [R, C, n]
    return (per.argmin(1) == tracked.labels[None]).mean(1).astype(np.float32)


def _next_kept_step(
    config: ExperimentConfig, runs: Sequence[int], s0: int, checkpoints: bool = True
) -> int:
    """The first step after ``s0`` whose state a stop would keep for ``runs``: their next
    checkpoint, else the end of the runs (which writes them complete). ``checkpoints=False``:
    runs that save none (counterfactual runs)."""
    if checkpoints and all(config.saves_checkpoints(r) for r in runs):
        later = [s for s in config.checkpoint_steps if s > s0]
        if later:
            return min(later)
    return config.steps


def _groups(config: ExperimentConfig) -> list[list[int]]:
    """The runs trained together, in order: runs_together at a time."""
    return [
        list(range(g, min(g + config.runs_together, config.num_runs)))
        for g in range(0, config.num_runs, config.runs_together)
    ]


def _too_few_steps(
    config: ExperimentConfig,
    group: Sequence[int],
    s0: int,
    budget: int,
    *,
    checkpoints: bool = True,
    what: str = "runs",
) -> str:
    """Why ``budget`` steps from ``s0`` would keep nothing of ``group`` ("" when they would).

    Args:
        config: the experiment config.
        group: the runs trained together (named in the message as ``what`` first-last).
        s0: the step they continue from.
        budget: the steps left to this call.
        checkpoints: whether the runs save checkpoints (see `_next_kept_step`).
        what: what the runs are called in the message.
    """
    keep = _next_kept_step(config, group, s0, checkpoints)
    if budget >= keep - s0:
        return ""
    where = "their next checkpoint" if keep < config.steps else "the end"
    return (
        f"--max-steps {budget} is too few: {what} {group[0]}-{group[-1]} continue from step {s0} "
        f"and keep nothing before step {keep} ({where}); give --max-steps {keep - s0} or more"
    )


def _check_budget(config: ExperimentConfig, exp_dir: Path, budget: int) -> None:
    """Refuses, before anything is prepared or written, a budget too small for the first group
    that still has work (the loop checks later groups against what is left of it)."""
    status = {i: c for i, _, c in runlog.list_runs(exp_dir)} if exp_dir.is_dir() else {}
    for group in _groups(config):
        if all(status.get(r) for r in group):
            continue
        why = _too_few_steps(config, group, _resume_step(config, exp_dir, group), budget)
        if why:
            raise E.ExperimentError(why)
        return


def _resume_step(config: ExperimentConfig, exp_dir: Path, todo: Sequence[int]) -> int:
    """The latest step checkpointed by every run in ``todo`` (0: start over)."""
    common = None
    for r in todo:
        if not config.saves_checkpoints(r):
            return 0
        steps = set(E.checkpoint_steps(runlog.run_dir(exp_dir, r)))
        common = steps if common is None else common & steps
    return max(common or {0})


def run_experiment(
    config: ExperimentConfig,
    exp_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    tokenizer: str | None = None,
    devices: Sequence | None = None,
    progress: bool = True,
    max_steps_this_call: int | None = None,
    report_to: str | Sequence[str] | None = None,
    log_every: int = DEFAULT_LOG_EVERY,
    overrides: Sequence[str] = (),
) -> dict:
    """Trains (or continues) every run of an experiment.

    Args:
        config: the experiment config.
        exp_dir: output folder (created; a folder holding another config is refused).
        data_dir: local data directory; None: the hub.
        tokenizer: tokenizer path or name (see `prepare_experiment`).
        devices: devices of the data-parallel mesh (default: all).
        progress: show a tqdm bar over runs and steps (steps/s, ETA, the current mean losses);
            False: one flushed line on stderr per phase (data, model, compile, group i of n)
            and per log point instead (batch jobs).
        max_steps_this_call: stop after this many group steps (for tests of resume and for
            time-limited jobs); the runs in progress stay incomplete and resume from their latest
            checkpoint on the next call, so steps after it are redone. A group that this budget
            could not take to a checkpoint (or to its end) is not started.
        report_to: live metric sinks while groups train (`finetune.metrics`): "tensorboard"
            (event files in EXP/tensorboard/runs_<first>-<last>/), "wandb", comma-separated,
            or None / "none" for neither. Checked before anything is prepared.
        log_every: log the live metrics every this many steps (and at each group's end).
        overrides: ``--set KEY=VALUE`` strings already applied to ``config`` (see
            `finetune.config.apply_overrides`); recorded in experiment.json. Resuming compares
            the resulting config, as without overrides.

    Returns:
        {"complete": [run indices], "interrupted": bool, "seconds": float, "stop": None or
        {"runs": the group that stopped, "step": where it stopped, "kept_step": the step it
        continues from}}.

    Raises:
        TaskError, ExperimentError, RunLogError: bad input (nothing half-written), including a
            ``max_steps_this_call`` too small to keep any step of the first group it meets.
        MetricsError: an unknown ``report_to`` sink, one whose library is not installed, or
            ``log_every`` < 1 (before anything is written).
        NonFiniteLossError: a loss became non-finite (names the run and the step).
    """
    start_all = time.perf_counter()
    exp_dir = Path(exp_dir)
    sinks = check_report_to(report_to)
    metrics = LiveMetrics(
        config.name,
        exp_dir,
        # One writer of event files and wandb runs on several hosts: process 0 (as for files).
        report_to=sinks if jax.process_index() == 0 else (),
        log_every=check_log_every(log_every),
        lines=not progress,
        config=json.loads(json.dumps(config.to_dict(), default=str)),
    )
    E.check_backend(config)
    _, base = _prepare(
        config,
        exp_dir,
        data_dir=data_dir,
        tokenizer=tokenizer,
        budget=max_steps_this_call,
        overrides=overrides,
    )
    if base is None:  # an existing workdir: the model was not needed to prepare it
        base = E.build_base_model(config)
    curricula = {
        r: make_curriculum(
            config.curriculum,
            n_train=config.run_pool_size(r),
            steps=config.steps,
            batch_size=config.batch_size,
            seed=config.curriculum_seed,
            run_index=r,
            subset_size=config.subset_size,
        )
        for r in range(config.num_runs)
    }
    ctx = _setup(
        config,
        exp_dir,
        base=base,
        runs_dir=exp_dir,
        curricula=curricula,
        devices=devices,
        progress=progress,
        train_warmup=True,
        metrics=metrics,
    )
    del base
    status = {i: c for i, _, c in runlog.list_runs(exp_dir)}
    groups = _groups(config)
    done = sum(config.steps for r in range(config.num_runs) if status.get(r))
    ctx.bar = _progress_bar(config.name, config.num_runs * config.steps, done, progress)
    budget = max_steps_this_call
    interrupted, stop = False, None
    with_work = [g for g in groups if not all(status.get(r) for r in g)]
    for group in groups:
        todo = [r for r in group if not status.get(r)]
        if not todo:
            continue
        s0 = _resume_step(config, exp_dir, group)
        if budget is not None:
            # A stop keeps each run's state at its last checkpoint only: do not train a group
            # that what is left of the budget would keep nothing of (`_prepare` refused the
            # whole call when that is the first group with work).
            if _too_few_steps(config, group, s0, budget):
                interrupted = True
                stop = {"runs": group, "step": s0, "kept_step": s0}
                break
        # The whole group trains again, complete members included, so that a run resumed after
        # a crash during the group's final writes sees the same R (vmap width) as before: its
        # files stay bitwise identical. Only the incomplete members are written.
        position = (with_work.index(group), len(with_work))
        used, stopped = _train_group(ctx, group, todo, s0, budget, position=position)
        if budget is not None:
            budget -= used
        if stopped:
            interrupted = True
            kept = _resume_step(config, exp_dir, group)
            stop = {"runs": group, "step": s0 + used, "kept_step": kept}
            break
        for r in todo:
            status[r] = True
    ctx.bar.close()
    return {
        "complete": sorted(r for r, c in status.items() if c and r < config.num_runs),
        "interrupted": interrupted,
        "stop": stop,
        "seconds": time.perf_counter() - start_all,
    }


@dataclass
class _Context:
    """What every group of runs trained by one call shares (`_setup`)."""

    config: ExperimentConfig
    runs_dir: Path  # folder of the run_XXX folders: EXP, or EXP/counterfactual
    mesh: Any
    progs: dict
    tracked: TrackedSet
    trainable0: Any
    opt0: Any
    frozen: Any
    data: dict
    lrs: np.ndarray
    curricula: dict  # run key -> int [steps, batch]; a key names a folder only when written
    writer: bool
    bar: Any = None  # tqdm bar over run-steps (`_progress_bar`)
    meta: dict = field(default_factory=dict)  # run key -> meta.json fields added or overridden
    checkpoints: bool = True  # False: no run saves checkpoints (counterfactual runs)
    start_accuracy: float | None = None
    metrics: LiveMetrics | None = None  # live metric sinks and batch-log lines
    provenance: dict = field(default_factory=dict)  # `runlog.provenance()`, into meta.json
    compiled: bool = False  # the first step of this call ran (its time is the compile line)


def _setup(
    config: ExperimentConfig,
    exp_dir: Path,
    *,
    base: Any,
    runs_dir: Path,
    curricula: dict,
    devices: Sequence | None,
    progress: bool,
    train_warmup: bool,
    metrics: LiveMetrics | None = None,
) -> _Context:
    """Builds what the groups of runs of an experiment share: the mesh, the data, the tracked
    set, the starting state (after the warm-up), the optimizer and the jitted programs.

    Ordinary and counterfactual runs both start here, so they train from the same state with the
    same programs.

    Args:
        config: the experiment config.
        exp_dir: the prepared experiment folder (data.npz, and warmup/ when configured).
        base: `E.build_base_model(config)`.
        runs_dir: where the run folders go (`_Context.runs_dir`).
        curricula: run key -> int [steps, batch] curriculum.
        devices: devices of the data-parallel mesh (None: all).
        progress: show the warm-up's progress bar.
        train_warmup: train the warm-up when the config has one and EXP/warmup does not exist
            yet (False: `E.initial_params` refuses a missing warm-up).
        metrics: the call's live metrics and batch-log lines (None: none). Lines are printed
            only once nothing more can fail on bad input here (the data and model lines at
            the end, the data line before a warm-up that trains).

    Returns:
        The `_Context` (``bar`` still None).
    """
    metrics = metrics or LiveMetrics(config.name, runs_dir)
    mesh = make_mesh(devices)
    n_dev = len(mesh.devices.flat)
    data = E._load_data(exp_dir)
    # One bucketing of the tracked set serves the warm-up and the runs.
    tracked = make_tracked_set(
        data["test_inputs"],
        data["test_targets"],
        data["test_choices"],
        data["test_labels"],
        data["test_lengths"],
        multiple=config.length_multiple,
        n_devices=n_dev,
        mesh=mesh,
        max_buckets=config.tracked_buckets,
    )
    data_line = (
        f"{len(data['pool_lengths'])} pool and {len(data['test_lengths'])} tracked examples, "
        f"{len(tracked.buckets)} tracked length bucket(s), {n_dev} device(s)"
    )
    if train_warmup and config.warmup is not None and not E.warmup_path(exp_dir).is_dir():
        metrics.line(f"data: {data_line}")
        data_line = None
        metrics.line(f"warm-up: training {config.warmup.steps} steps (cached in EXP/warmup)")
        t_warm = time.perf_counter()
        _warmup(config, exp_dir, *base, data, tracked, mesh, progress)
        metrics.line(f"warm-up: done ({time.perf_counter() - t_warm:.1f} s)")
    exp = E.load_experiment(exp_dir, _params=E.initial_params(config, exp_dir, base=base))
    from finetune.model import partition

    trainable0, frozen = partition(exp.params, exp.mask)
    optimizer = optimizer_for_config(config, make_schedule(config))
    if data_line is not None:
        metrics.line(f"data: {data_line}")
    n_trainable = sum(int(np.size(x)) for x in jax.tree.leaves(trainable0))
    n_all = sum(int(np.size(x)) for x in jax.tree.leaves(exp.params))
    model = config.model or "random-init T5"
    metrics.line(
        f"model: {model}, {config.method}: {n_trainable:,} of {n_all:,} parameters trainable "
        f"({metrics.elapsed():.1f} s since the start)"
    )
    return _Context(
        config=config,
        runs_dir=runs_dir,
        mesh=mesh,
        progs=_cached_programs(config, exp, optimizer, mesh),
        tracked=tracked,
        trainable0=trainable0,
        opt0=optimizer.init(trainable0),
        frozen=place(frozen, mesh),
        data=data,
        lrs=learning_rates(config),
        curricula=curricula,
        writer=jax.process_index() == 0,
        metrics=metrics,
        provenance=runlog.provenance(),
    )


def _progress_bar(desc: str, total: int, done: int, progress: bool):
    """A tqdm bar over run-steps on stderr (disabled without ``progress``)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=done,
        desc=desc,
        unit="run-step",
        smoothing=0.1,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _train_group(
    ctx: _Context,
    group: list[int],
    write: list[int],
    s0: int,
    budget: int | None,
    *,
    position: tuple[int, int] = (0, 1),
    keys: Sequence[int] | None = None,
) -> tuple[int, bool]:
    """Trains the runs ``group`` together from step ``s0`` (their latest common checkpoint,
    ``_resume_step``) and writes the ones in ``write`` (the incomplete ones; complete members,
    and padding that `finetune.counterfactual` adds, only train alongside, so that R is that of
    an uninterrupted run).

    Args:
        ctx: the shared set-up (`_setup`); run key r is written to
            ``runlog.run_dir(ctx.runs_dir, r)`` with meta.json updated by ``ctx.meta[r]``.
        group: run keys (of ``ctx.curricula``), trained in this order on the vmapped run axis.
        write: the keys of ``group`` whose files are written.
        s0: the step to start from (0, or a checkpoint every member holds).
        budget: stop after this many steps (None: train to the end).
        position: (index, count) of this group among the groups the call trains (log lines).
        keys: the run keys that name the group in the live metrics (default: ``group``;
            counterfactual groups leave their padding out).

    Returns:
        (group steps taken, whether the step budget stopped the group before its end).
    """
    metrics = ctx.metrics or LiveMetrics(ctx.config.name, ctx.runs_dir)
    metrics.start_group(list(keys if keys is not None else group), *position, s0)
    try:
        return _train_group_body(ctx, group, write, s0, budget, metrics)
    finally:
        metrics.close_group()


def _train_group_body(
    ctx: _Context,
    group: list[int],
    write: list[int],
    s0: int,
    budget: int | None,
    metrics: LiveMetrics,
) -> tuple[int, bool]:
    """`_train_group` with its metric sinks open."""
    from finetune.steps import broadcast_runs, stack_runs, take_run

    config, progs, tracked, mesh = ctx.config, ctx.progs, ctx.tracked, ctx.mesh
    g_start = time.perf_counter()
    to_write = set(write)
    writes = [r in to_write for r in group]
    R = len(group)
    dirs = [runlog.run_dir(ctx.runs_dir, r) for r in group]
    for r, d, w in zip(group, dirs, writes, strict=True):  # curricula written before training
        path = d / "curriculum.npy"
        if path.is_file() and not np.array_equal(np.load(path), ctx.curricula[r]):
            raise E.ExperimentError(
                f"{path} differs from the curriculum of run {r}; delete {d} to retrain it"
            )
        if ctx.writer and w:
            d.mkdir(parents=True, exist_ok=True)
            runlog.atomic_save_npy(path, ctx.curricula[r])
    ctx.bar.update(len(write) * s0)  # steps an earlier call already kept
    n_choices = tracked.buckets[0]["choices"].shape[1]
    choice = np.zeros((R, config.steps + 1, config.n_test, n_choices), np.float32)
    losses = np.zeros((R, config.steps + 1, config.n_test), np.float32)
    train_loss = np.zeros((R, config.steps), np.float32)

    def run_log(i: int) -> dict:  # run i's log, as checkpoints hold it
        return {"losses": losses[i], "choice_losses": choice[i], "train_loss": train_loss[i]}

    if s0 > 0:
        restored = [E.restore_checkpoint(d, s0, ctx.trainable0, ctx.opt0, run_log(0)) for d in dirs]
        tr = place(stack_runs([x[0] for x in restored]), mesh)
        op = place(stack_runs([x[1] for x in restored]), mesh)
        for i, x in enumerate(restored):
            losses[i, : s0 + 1] = x[2]["losses"][: s0 + 1]
            choice[i, : s0 + 1] = x[2]["choice_losses"][: s0 + 1]
            train_loss[i, :s0] = x[2]["train_loss"][:s0]
    else:
        tr = place(broadcast_runs(ctx.trainable0, R), mesh)
        op = place(broadcast_runs(ctx.opt0, R), mesh)
        choice[:, 0] = _choice_rows(progs["test_losses"](tr, ctx.frozen, tracked.buckets), tracked)
        losses[:, 0] = _gold(choice[:, 0], tracked)
    if ctx.start_accuracy is None:  # same for every run; R copies reuse the end-of-run program
        tr0 = place(broadcast_runs(ctx.trainable0, R), mesh)
        ctx.start_accuracy = float(
            _accuracy(np.asarray(progs["scores"](tr0, ctx.frozen, tracked.buckets)), tracked)[0]
        )
        del tr0

    # The live metrics average over the runs this call writes: their files hold every value.
    w_idx = np.asarray([i for i in range(R) if writes[i]])
    label = f"runs {write[0]}-{write[-1]}"

    def log(t: int) -> None:
        """Live metrics and the bar's losses at step t (its losses are on the host)."""
        test = float(losses[w_idx, t].astype(np.float64).mean())
        if t == 0:
            metrics.log(0, train_loss=None, test_loss=test, lr=None, runs=R, last_step=config.steps)
            return
        train = float(train_loss[w_idx, t - 1].astype(np.float64).mean())
        metrics.log(
            t,
            train_loss=train,
            test_loss=test,
            lr=float(ctx.lrs[t - 1]),
            runs=R,
            last_step=config.steps,
        )
        ctx.bar.set_postfix_str(f"{label}, train loss {train:.4f}, test loss {test:.4f}")

    def flush(pending: list, upto: int) -> None:
        """Copies the logged losses of steps pending[0].step..upto to the host; checks them."""
        if not pending:
            return
        tl = np.asarray(jnp.stack([p[1] for p in pending], axis=1))  # [R, k]
        ce = _choice_rows(jnp.stack([p[2] for p in pending], axis=1), tracked)  # [R, k, n, C]
        te = _gold(ce, tracked)
        first = pending[0][0]
        train_loss[:, first - 1 : upto] = tl
        losses[:, first : upto + 1] = te
        choice[:, first : upto + 1] = ce
        finite = np.isfinite(tl) & np.isfinite(ce).all((2, 3))  # [R, k]
        if not finite.all():
            k = int(np.flatnonzero(~finite.all(0))[0])
            which = [group[i] for i in range(R) if not finite[i, k]]
            raise NonFiniteLossError(
                f"{config.name}: non-finite loss at step {first + k} of run(s) {which}; "
                "lower the learning rate and train into a new folder (the run stays "
                "incomplete, and this folder refuses a changed config)"
            )
        pending.clear()

    saves = [  # the members that save checkpoints
        w and ctx.checkpoints and config.saves_checkpoints(r)
        for r, w in zip(group, writes, strict=True)
    ]

    def save(step: int, tr, op) -> None:
        if not any(saves):
            return
        # One transfer of the stacked state; slicing device arrays per run would dispatch (and
        # compile) one small program per leaf and run.
        host_tr, host_op = jax.device_get((tr, op))
        for i, d in enumerate(dirs):
            if saves[i]:
                # The log so far, at full length (rows after `step` are zero).
                E.save_checkpoint(d, step, take_run(host_tr, i), take_run(host_op, i), run_log(i))

    if s0 == 0 and 0 in config.checkpoint_steps:
        save(0, tr, op)
    if s0 == 0:
        log(0)
    pending: list = []
    ctx.bar.set_postfix_str(label)
    used = 0
    n_groups = config.train_length_groups
    if n_groups:  # fixed from all steps of these runs: the same after a resume
        group_lengths = flat_group_lengths(
            ctx.data["pool_lengths"],
            np.stack([ctx.curricula[r] for r in group]),
            n_groups,
            config.length_multiple,
            ctx.data["pool_inputs"].shape[1],
        )
    pool = (ctx.data["pool_inputs"], ctx.data["pool_targets"], ctx.data["pool_lengths"])
    t_first = time.perf_counter()
    for t in range(s0 + 1, config.steps + 1):
        ids = np.stack([ctx.curricula[r][t - 1] for r in group])  # [R, b]
        if n_groups:
            groups = put_groups(gather_flat(*pool, ids, group_lengths), mesh)
            tr, op, tl, te = progs["step_flat"](tr, op, ctx.frozen, groups, tracked.buckets)
        else:
            batch = put_batch(gather_batch(*pool, ids, config.length_multiple), mesh)
            tr, op, tl, te = progs["step"](tr, op, ctx.frozen, batch, tracked.buckets)
        pending.append((t, tl, te))
        if not ctx.compiled:  # the first step of the call: compiling is most of it
            jax.block_until_ready(tl)
            ctx.compiled = True
            metrics.line(
                f"compile: first step of {label} compiled and ran in "
                f"{time.perf_counter() - t_first:.1f} s"
            )
            metrics.restart_clock(t)
        due = metrics.due(t, config.steps)
        if due or t in config.checkpoint_steps or len(pending) >= _SYNC_EVERY:
            flush(pending, t)
        if due:
            log(t)
        if t in config.checkpoint_steps:
            save(t, tr, op)
        ctx.bar.update(len(write))
        used += 1
        if budget is not None and used >= budget and t < config.steps:
            flush(pending, t)
            return used, True
    end_acc = _accuracy(np.asarray(progs["scores"](tr, ctx.frozen, tracked.buckets)), tracked)
    seconds = time.perf_counter() - g_start
    metrics.line(
        f"{label} complete: {R * (config.steps - s0) / seconds:.2f} run-steps/s over "
        f"{seconds:.1f} s, tracked accuracy {float(np.mean(end_acc[w_idx])):.3f}"
    )
    if ctx.writer:
        for i, (r, d) in enumerate(zip(group, dirs, strict=True)):
            if not writes[i]:  # complete already: its files are those of the first time
                continue
            _write_metrics(d / METRICS_FILE, train_loss[i], ctx.lrs, losses[i])
            runlog.write_run(
                d,
                ctx.curricula[r],
                losses[i],
                lr=ctx.lrs,
                choice_losses=choice[i],
                meta={
                    "run": r,
                    "curriculum_seed": [config.curriculum_seed, r],
                    "steps": config.steps,
                    "batch_size": config.batch_size,
                    "accuracy_start": ctx.start_accuracy,
                    "accuracy_end": float(end_acc[i]),
                    "test_loss_mean_start": float(losses[i, 0].mean()),
                    "test_loss_mean_end": float(losses[i, -1].mean()),
                    "train_loss_mean_last_10": float(train_loss[i, -10:].mean()),
                    "resumed_from_step": s0,
                    "runs_together": R,
                    "devices": len(mesh.devices.flat),
                    "group_seconds": seconds,
                    "run_steps_per_second": R * (config.steps - s0) / seconds,
                    "checkpoint_steps": list(config.checkpoint_steps) if saves[i] else [],
                    "provenance": ctx.provenance,
                    **ctx.meta.get(r, {}),
                },
            )
    return used, False


def _write_metrics(path: Path, train_loss: np.ndarray, lrs: np.ndarray, losses: np.ndarray) -> None:
    """metrics.jsonl: one line per step (mean train loss, lr, mean tracked test loss)."""
    lines = [
        json.dumps(
            {
                "step": t + 1,
                "train_loss": float(train_loss[t]),
                "lr": float(lrs[t]),
                "test_loss_mean": float(losses[t + 1].mean()),
            }
        )
        for t in range(len(train_loss))
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
