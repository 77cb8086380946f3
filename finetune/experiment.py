"""An experiment folder: its data, its starting model and the checkpoints of its runs.

Layout written by `finetune.trainer` (run-log files through `simfluence.runlog`)::

    EXP/experiment.json   n_train, n_test, task, model, method, pool/test ids, the config
    EXP/examples.json     texts of the pool and of the tracked test examples
    EXP/data.npz          token ids of the pool, the tracked set and the warm-up examples
    EXP/warmup/           (optional) the warmed-up full parameters (orbax), start of every run
    EXP/run_XXX/          curriculum.npy, losses.npy, lr.npy, metrics.jsonl,
                          checkpoints/<step>/ (orbax: trainable, opt_state, log), meta.json last

`load_experiment` rebuilds everything a consumer (TracIn-CP, analysis) needs from the folder
alone: no data directory or tokenizer is needed once the experiment exists.

References:
    Simfluence: Guu et al. 2023, https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from finetune.config import ExperimentConfig
from simfluence import runlog

DATA_FILE = "data.npz"
WARMUP_DIR = "warmup"
CHECKPOINT_DIR = "checkpoints"


class ExperimentError(ValueError):
    """An experiment folder is missing, incomplete, or holds another config."""


@dataclass
class Experiment:
    """Everything needed to train or analyse the runs of an experiment.

    Attributes:
        config: the experiment's config (from experiment.json).
        graphdef: the nnx graph definition of the T5.
        params: initial full parameters (after the warm-up, when the config has one): nnx.State.
        mask: pytree of bool like ``params``: True for trainable leaves.
        per_example_loss: ``(params, batch) -> f32 [b]`` (mean target-token cross-entropy).
        score_choices: ``(params, inputs [b, L_in], choices [b, C, L_tgt]) -> f32 [b, C]``.
        pool_batch: {"inputs": int32 [n_train, L_in], "targets": int32 [n_train, L_tgt]}.
        test_batch: {"inputs": int32 [n_test, L_in], "targets": int32 [n_test, L_tgt]}.
        pool_texts: n_train strings (input => target).
        test_texts: n_test strings.
        data: the arrays of data.npz (also the choices and labels of the tracked set).
        info: experiment.json.
    """

    config: ExperimentConfig
    graphdef: Any
    params: Any
    mask: Any
    per_example_loss: Callable
    score_choices: Callable
    pool_batch: dict[str, np.ndarray]
    test_batch: dict[str, np.ndarray]
    pool_texts: list[str]
    test_texts: list[str]
    data: dict[str, np.ndarray]
    info: dict


# ----------------------------------------------------------------------------------------------
# Model construction


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def check_backend(config: ExperimentConfig) -> None:
    """Refuses a config this machine cannot run (before anything is written).

    Args:
        config: the experiment's config.

    Raises:
        ExperimentError: attention='cudnn' without a GPU backend.
    """
    backend = jax.default_backend()
    if config.attention == "cudnn" and backend != "gpu":
        raise ExperimentError(
            f"config {config.name!r}: attention='cudnn' needs a GPU (this backend is "
            f"{backend!r}); set attention='xla' (the same computation on XLA's kernels) "
            "or 'einsum'"
        )


def build_base_model(config: ExperimentConfig):
    """The model every run starts from, before any warm-up.

    Args:
        config: the experiment's config (model or random_init, method, dtype, scan_layers,
            attention, init_seed).

    Returns:
        (graphdef, params) of the T5: pretrained (config.model) or random (config.random_init).

    Raises:
        ExperimentError: see `check_backend`; a random_init that does not build a T5.
        CheckpointError: config.model cannot be loaded (see `finetune.hf.load_pretrained`).
    """
    check_backend(config)
    from flax import nnx

    from finetune import hf

    ia3 = config.method == "ia3"
    if config.model is not None:
        model, _ = hf.load_pretrained(
            config.model,
            ia3=ia3,
            dtype=_dtype(config.dtype),
            scan_layers=config.scan_layers,
            attention=config.attention,
        )
    else:
        import transformers

        try:
            t5_config = transformers.T5Config(**config.random_init)
            model = hf.init_random(
                t5_config,
                ia3=ia3,
                seed=config.init_seed,
                dtype=_dtype(config.dtype),
                scan_layers=config.scan_layers,
                attention=config.attention,
            )
        except (TypeError, ValueError) as e:  # e.g. d_model="16", an unknown activation
            raise ExperimentError(
                f"config {config.name!r}: random_init does not build a T5 ({type(e).__name__}: "
                f"{e}); fix random_init (transformers.T5Config kwargs)"
            ) from None
    graphdef, params = nnx.split(model)
    return graphdef, params


def vocab_size(params) -> int:
    """Rows of the vocabulary embedding (``shared``) of a T5's parameters.

    Args:
        params: the parameter tree (``nnx.State``) of a ``finetune.network.T5``.

    Returns:
        The vocabulary size the model embeds (``shared`` is [vocab, d_model]).

    Raises:
        ExperimentError: the tree has no ``shared`` embedding.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if _is_embedding(path):
            return int(np.shape(leaf)[0])
    raise ExperimentError("the model's parameters have no vocabulary embedding 'shared'")


def make_mask(config: ExperimentConfig, params):
    """Trainable mask of the config: the method's mask, minus the embedding if frozen.

    Args:
        config: the experiment's config (``method``, ``freeze_embeddings``).
        params: the parameter tree (``nnx.State``) of the T5.

    Returns:
        A tree like ``params`` with a Python bool at each leaf (True: trainable).

    Raises:
        ValueError: see `finetune.model.trainable_mask` (``"ia3"`` on a model without IA3).
    """
    from finetune.model import trainable_mask

    mask = trainable_mask(params, config.method)
    if config.freeze_embeddings:

        def drop(path, m):
            return False if _is_embedding(path) else m

        mask = jax.tree_util.tree_map_with_path(drop, mask)
    return mask


def _is_embedding(path) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return "shared" in names


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def warmup_path(exp_dir: str | Path) -> Path:
    """Folder of the cached warm-up parameters.

    Args:
        exp_dir: the experiment folder.

    Returns:
        The absolute path ``EXP/warmup`` (it may not exist yet).
    """
    return Path(exp_dir).resolve() / WARMUP_DIR


def save_warmup(exp_dir: str | Path, params) -> None:
    """Saves warmed-up full parameters (orbax; atomic: written under a temporary name).

    Args:
        exp_dir: the experiment folder; the parameters go to ``EXP/warmup``, replacing any.
        params: the full parameter tree (``nnx.State``) after the warm-up.
    """
    path = warmup_path(exp_dir)
    ckptr = _checkpointer()
    ckptr.save(path, params, force=True)
    ckptr.wait_until_finished()


def restore_warmup(exp_dir: str | Path, target):
    """Restores the warmed-up parameters against ``target`` (same structure).

    Args:
        exp_dir: the experiment folder holding ``EXP/warmup``.
        target: a parameter tree with the structure, shapes and dtypes to restore into (e.g.
            the params of `build_base_model`); only its shapes and dtypes are used.

    Returns:
        The warmed-up full parameter tree.
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    return _checkpointer().restore(warmup_path(exp_dir), abstract)


def initial_params(config: ExperimentConfig, exp_dir: str | Path, *, base=None):
    """(graphdef, params) every run starts from; the warm-up must already exist if configured.

    Args:
        config: the experiment's config.
        exp_dir: the experiment folder.
        base: `build_base_model(config)` when the caller has it already (saves loading the
            checkpoint twice); None builds it.

    Returns:
        ``(graphdef, params)``: the T5 graph definition and its full parameters, after the
        warm-up when the config has one.

    Raises:
        ExperimentError: the config has a warm-up and ``EXP/warmup`` does not exist yet.
    """
    graphdef, params = base if base is not None else build_base_model(config)
    if config.warmup is not None:
        if not warmup_path(exp_dir).is_dir():
            raise ExperimentError(
                f"{warmup_path(exp_dir)} not found; the warm-up of this experiment has not run "
                "yet (finetune run CONFIG runs it)"
            )
        params = restore_warmup(exp_dir, params)
    return graphdef, params


# ----------------------------------------------------------------------------------------------
# Loading


def _load_data(exp_dir: Path) -> dict[str, np.ndarray]:
    path = exp_dir / DATA_FILE
    if not path.is_file():
        raise ExperimentError(f"{path} not found; {exp_dir} was not prepared by finetune run")
    fix = "delete it and run `finetune run` again to tokenize the data anew"
    try:  # our own handle: np.load leaks its file when the archive is truncated
        with open(path, "rb") as f:
            z = np.load(f, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ExperimentError(f"{path}: holds one array, not an .npz archive; {fix}")
            with z:
                return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, ExperimentError):
            raise
        # Truncated or corrupted: BadZipFile (archive) or zlib.error (a member).
        raise ExperimentError(
            f"{path}: cannot read the tokenized data ({type(e).__name__}: {e}); {fix}"
        ) from e


def read_config(exp_dir: str | Path) -> ExperimentConfig:
    """The ExperimentConfig recorded in ``EXP/experiment.json``.

    Args:
        exp_dir: the experiment folder.

    Returns:
        The config the experiment was prepared with.

    Raises:
        ExperimentError: experiment.json has no ``config`` (not written by finetune run).
        RunLogError: experiment.json is missing or unreadable (see `simfluence.runlog`).
        ConfigError: the recorded config has unknown or bad fields.
    """
    info = runlog.read_experiment(exp_dir)
    if "config" not in info:
        raise ExperimentError(
            f"{Path(exp_dir) / 'experiment.json'} has no 'config'; it was not "
            "written by finetune run"
        )
    return ExperimentConfig.from_dict(info["config"])


def load_experiment(exp_dir: str | Path, *, _params=None) -> Experiment:
    """Loads an experiment prepared by ``finetune run``.

    Args:
        exp_dir: the experiment folder.

    Returns:
        The `Experiment` (initial parameters after the warm-up, data, loss functions).

    Raises:
        ExperimentError, RunLogError: missing or inconsistent files.
    """
    from finetune.model import make_per_example_loss, make_score_choices

    exp_dir = Path(exp_dir)
    info = runlog.read_experiment(exp_dir)
    config = read_config(exp_dir)
    data = _load_data(exp_dir)
    if _params is None:
        graphdef, params = initial_params(config, exp_dir)
    else:
        graphdef, params = _params
    examples = runlog.read_examples(exp_dir) or {
        "train": [""] * info["n_train"],
        "test": [""] * info["n_test"],
    }
    return Experiment(
        config=config,
        graphdef=graphdef,
        params=params,
        mask=make_mask(config, params),
        per_example_loss=make_per_example_loss(graphdef),
        score_choices=make_score_choices(graphdef),
        pool_batch={"inputs": data["pool_inputs"], "targets": data["pool_targets"]},
        test_batch={"inputs": data["test_inputs"], "targets": data["test_targets"]},
        pool_texts=examples["train"],
        test_texts=examples["test"],
        data=data,
        info=info,
    )


# ----------------------------------------------------------------------------------------------
# Run checkpoints: one orbax CheckpointManager per run, items trainable / opt_state / log.


def _manager(run_dir: str | Path, *, create: bool = False):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=create, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        Path(run_dir).resolve() / CHECKPOINT_DIR,
        options=options,
        item_names=("trainable", "opt_state", "log"),
    )


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps with a finished checkpoint in ``run_dir/checkpoints``.

    Args:
        run_dir: the run folder (run_XXX).

    Returns:
        The steps, ascending; [] when the run has no checkpoints folder or none finished.
    """
    path = Path(run_dir) / CHECKPOINT_DIR
    if not path.is_dir():
        return []
    mngr = _manager(run_dir)
    try:
        return sorted(int(s) for s in mngr.all_steps())
    finally:
        mngr.close()


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def restore_trainable(run_dir: str | Path, step: int, target_trainable):
    """Restores the trainable state saved at ``step`` of a run.

    Args:
        run_dir: the run folder (run_XXX).
        step: a step from `checkpoint_steps` (the state after that many optimizer steps).
        target_trainable: a pytree with the structure, shapes and dtypes to restore into
            (e.g. the trainable part of `Experiment.params`).

    Returns:
        The trainable pytree at that step (host-local arrays).

    Raises:
        ExperimentError: no checkpoint at that step.
    """
    import orbax.checkpoint as ocp

    steps = checkpoint_steps(run_dir)
    if step not in steps:
        raise ExperimentError(
            f"{Path(run_dir) / CHECKPOINT_DIR}: no checkpoint at step {step} (found {steps})"
        )
    mngr = _manager(run_dir)
    try:
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(_abstract(target_trainable))
            ),
        )
        return out["trainable"]
    finally:
        mngr.close()


def save_checkpoint(run_dir: str | Path, step: int, trainable, opt_state, log: dict) -> None:
    """Saves the trainable state, optimizer state and the run's log so far at ``step``.

    A run resumed from an earlier checkpoint re-reaches steps that an interrupted pass may have
    checkpointed already (step 0 always, or a step some runs of a group saved before the kill).
    Training is deterministic, so such a checkpoint holds this same state and is kept as is.

    Args:
        run_dir: the run folder (run_XXX); ``checkpoints/`` is created under it if needed.
        step: optimizer steps taken so far (the state after ``step`` steps; 0 is the start).
        trainable: the trainable part of the parameters (one run, host arrays).
        opt_state: the optimizer state of that run.
        log: the run's log so far at full length, e.g. ``{"losses": f32 [steps + 1, n_test],
            "train_loss": f32 [steps]}`` (rows after ``step`` are zero).
    """
    import orbax.checkpoint as ocp

    mngr = _manager(run_dir, create=True)
    try:
        if step in mngr.all_steps():
            return
        mngr.save(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardSave(trainable),
                opt_state=ocp.args.StandardSave(opt_state),
                log=ocp.args.StandardSave(log),
            ),
            force=True,
        )
        mngr.wait_until_finished()
    finally:
        mngr.close()


def restore_checkpoint(run_dir: str | Path, step: int, trainable, opt_state, log: dict):
    """Restores (trainable, opt_state, log) at ``step`` against the given targets.

    Args:
        run_dir: the run folder (run_XXX).
        step: a step from `checkpoint_steps`.
        trainable: target with the structure, shapes and dtypes of the saved trainable part.
        opt_state: target like the saved optimizer state.
        log: target like the saved log (see `save_checkpoint`).

    Returns:
        ``(trainable, opt_state, log)`` as saved at ``step`` (host-local arrays).

    Raises:
        ExperimentError: the checkpoint cannot be restored (damaged, or another config's).
    """
    import orbax.checkpoint as ocp

    mngr = _manager(run_dir)
    try:
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(_abstract(trainable)),
                opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
                log=ocp.args.StandardRestore(_abstract(log)),
            ),
        )
        return out["trainable"], out["opt_state"], out["log"]
    except Exception as e:  # orbax / tensorstore raise many types for a damaged checkpoint
        raise ExperimentError(
            f"{Path(run_dir) / CHECKPOINT_DIR / str(step)}: cannot restore this checkpoint "
            f"({checkpoint_error_reason(e)}); it is damaged or was written by another config: "
            f"delete {run_dir} and run `finetune run` again to retrain the run"
        ) from e
    finally:
        mngr.close()


def checkpoint_error_reason(err: Exception) -> str:
    """The reason of an orbax restore error on one line, without the tensorstore spec (about
    1.5 kB of JSON) that tensorstore appends to it."""
    reason = " ".join(str(err).split(" [tensorstore_spec=")[0].split())
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__
