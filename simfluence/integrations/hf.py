"""Log a Hugging Face `transformers.Trainer` run in the Simfluence run-log format.

Simfluence needs, for every step, which training examples were in the batch, and every tracked
example's loss before the first step and after each step. A `Trainer` normally draws its batches
itself (a random sampler), so here the callback owns the order: you give it a fixed curriculum
(int [steps, batch] positions in your training pool), train on `callback.train_dataset` (the
pool's examples in curriculum order) with `callback.training_args()` (sequential sampling, that
batch size, that many steps), and the callback checks, at the start and after every step, that
the Trainer consumes exactly that order. It then writes the run with `simfluence.runlog`
(`run_XXX/curriculum.npy`, `losses.npy`, `lr.npy`, `meta.json`, and `experiment.json` when the
experiment has none yet)::

    from simfluence.integrations.hf import SimfluenceCallback

    cb = SimfluenceCallback("exp", run=0, curriculum=cur, train_pool=pool, tracked=tracked,
                            data_collator=collate)
    args = TrainingArguments("out", **cb.training_args(), learning_rate=1e-3)
    Trainer(model, args, train_dataset=cb.train_dataset, data_collator=collate,
            callbacks=[cb]).train()

Importing this module imports neither torch nor transformers; `SimfluenceCallback` (a
`transformers.TrainerCallback`) is built on first use, when both must be installed.

Design notes: the tracked losses are computed with the model in eval mode (no dropout) and under
`torch.no_grad()`, so logging draws no random numbers and does not change the run. `lr.npy`
holds the learning rate of the optimizer's first parameter group at each optimizer step. One
process and one device only (`args.world_size == 1`); gradient accumulation is fine (a step's
batch is `per_device_train_batch_size * gradient_accumulation_steps` examples). Resuming from a
Trainer checkpoint is refused: the tracked losses of the earlier steps would be missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from simfluence import runlog

if TYPE_CHECKING:
    from jaxtyping import ArrayLike, Int

# SimfluenceCallback is built on first access (module __getattr__), when transformers is there.
__all__ = ["SimfluenceCallback", "CurriculumDataset", "mean_token_loss"]  # noqa: F822

SOURCE = "simfluence.integrations.hf"
LOSS_DESCRIPTION = "mean cross-entropy over label tokens (labels -100 ignored), eval mode"


def mean_token_loss(model: Any, batch: dict) -> Any:
    """Per-example loss: mean cross-entropy over each example's label tokens.

    Labels equal to -100 are ignored, as in Hugging Face's own losses. Encoder-decoder models
    (`model.config.is_encoder_decoder`) get `labels` and score `logits` against them; other
    models get the batch without `labels` and score `logits[:, :-1]` against `labels[:, 1:]`
    (next-token prediction).

    Args:
        model: a Hugging Face model returning `.logits` [n, L, vocab].
        batch: collated tensors with `labels` [n, L] (int, -100 where ignored) and the model's
            inputs.

    Returns:
        torch float32 tensor [n].

    Raises:
        ValueError: the batch has no `labels`, or an example has no label token.
    """
    import torch

    if "labels" not in batch:
        raise ValueError("tracked batch has no 'labels'; the data collator must produce them")
    labels = batch["labels"]
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if encoder_decoder:
        logits, targets = model(**batch).logits, labels
    else:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits, targets = model(**inputs).logits[:, :-1], labels[:, 1:]
    mask = targets != -100
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("a tracked example has no label token (all labels are -100)")
    token = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none"
    )
    return (token * mask).sum(dim=1) / counts


class CurriculumDataset:
    """The training pool's examples in curriculum order: item k is `pool[curriculum.flat[k]]`.

    A map-style dataset (`__len__`, `__getitem__`) of `steps * batch` examples. Read in order
    (a sequential sampler), consecutive groups of `batch` items are the curriculum's rows. Items
    fetched in this process are recorded (`fetched`), so the callback can check the order.

    Args:
        pool: the training pool, indexable by position 0..n_train-1.
        curriculum: int [steps, batch] positions in `pool`.
    """

    def __init__(self, pool: Sequence, curriculum: Int[ArrayLike, "T b"]):
        self.pool = pool
        self.curriculum = np.asarray(curriculum)
        self._flat = self.curriculum.reshape(-1)
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return int(self._flat.shape[0])

    def __getitem__(self, k: int):
        k = int(k)
        if not 0 <= k < len(self):
            raise IndexError(f"curriculum position {k} outside 0..{len(self) - 1}")
        self.fetched.append(k)
        return self.pool[int(self._flat[k])]


class _CallbackLogic:
    """Everything of `SimfluenceCallback` but its `transformers.TrainerCallback` base."""

    def __init__(
        self,
        exp_dir: str | os.PathLike,
        run: int,
        *,
        curriculum: Int[ArrayLike, "T b"],
        train_pool: Sequence,
        tracked: Sequence,
        data_collator: Callable[[list], dict],
        loss_fn: Callable[[Any, dict], Any] | None = None,
        experiment_info: dict | None = None,
        meta: dict | None = None,
        overwrite: bool = False,
    ):
        """See `SimfluenceCallback`."""
        self.exp_dir = Path(exp_dir)
        self.run_dir = runlog.run_dir(self.exp_dir, run)
        self.run = int(run)
        n_train, n_test = len(train_pool), len(tracked)
        if n_train < 1 or n_test < 1:
            raise ValueError(
                f"SimfluenceCallback: train_pool has {n_train} and tracked {n_test} examples; "
                "both need at least one"
            )
        self.curriculum = runlog._validate_curriculum(
            np.asarray(curriculum), "SimfluenceCallback curriculum", n_train
        )
        self.steps, self.batch = (int(x) for x in self.curriculum.shape)
        self.n_train, self.n_test = n_train, n_test
        self.tracked = tracked
        self.data_collator = data_collator
        self.loss_fn = loss_fn if loss_fn is not None else mean_token_loss
        self.experiment_info = dict(experiment_info or {})
        self.meta = dict(meta or {})
        if (self.exp_dir / runlog.EXPERIMENT_FILE).is_file():
            info = runlog.read_experiment(self.exp_dir)
            if (info["n_train"], info["n_test"]) != (n_train, n_test):
                raise runlog.RunLogError(
                    f"{self.exp_dir / runlog.EXPERIMENT_FILE}: n_train={info['n_train']}, "
                    f"n_test={info['n_test']}, but this run has a pool of {n_train} and "
                    f"{n_test} tracked examples; use another experiment folder"
                )
        if not overwrite and runlog._is_complete(self.run_dir):
            raise runlog.RunLogError(
                f"{self.run_dir}: already a complete run; choose another run index or pass "
                "overwrite=True"
            )
        self.train_dataset = CurriculumDataset(train_pool, self.curriculum)
        self._losses: list[np.ndarray] = []
        self._lrs: list[float] = []

    def training_args(self) -> dict:
        """`TrainingArguments` keywords that make the Trainer consume the curriculum as is.

        Returns:
            `per_device_train_batch_size` (the curriculum's batch), `gradient_accumulation_steps`
            1, `max_steps` (its steps) and `train_sampling_strategy` "sequential".
        """
        return {
            "per_device_train_batch_size": self.batch,
            "gradient_accumulation_steps": 1,
            "max_steps": self.steps,
            "train_sampling_strategy": "sequential",
        }

    # -- losses of the tracked examples ------------------------------------------------------

    def _tracked_losses(self, model: Any, batch_size: int) -> np.ndarray:
        import torch

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = []
        try:
            with torch.no_grad():
                for lo in range(0, self.n_test, batch_size):
                    chunk = [self.tracked[i] for i in range(lo, min(lo + batch_size, self.n_test))]
                    batch = {
                        k: v.to(device) if hasattr(v, "to") else v
                        for k, v in self.data_collator(chunk).items()
                    }
                    losses = self.loss_fn(model, batch)
                    out.append(losses.detach().float().cpu().numpy().reshape(-1))
        finally:
            model.train(was_training)
        row = np.concatenate(out).astype(np.float32)
        if row.shape != (self.n_test,):
            raise ValueError(
                f"SimfluenceCallback: loss_fn gave {row.shape[0]} losses for {self.n_test} "
                "tracked examples; it must return one loss per example"
            )
        return row

    # -- Trainer events ----------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        """Check that the Trainer will consume the curriculum as is; log the step-0 losses."""
        where = f"SimfluenceCallback ({self.run_dir})"
        if state.global_step != 0:
            raise ValueError(
                f"{where}: resuming at step {state.global_step} is not supported (the tracked "
                "losses of the earlier steps are gone); train the run from the start"
            )
        if args.world_size != 1:
            raise ValueError(f"{where}: {args.world_size} processes; train on one process")
        if args.train_sampling_strategy != "sequential":
            raise ValueError(
                f"{where}: train_sampling_strategy={args.train_sampling_strategy!r} reorders the "
                "curriculum; pass **callback.training_args() to TrainingArguments"
            )
        per_step = args.train_batch_size * args.gradient_accumulation_steps
        if per_step != self.batch or state.max_steps != self.steps:
            raise ValueError(
                f"{where}: the Trainer takes {state.max_steps} steps of {per_step} examples but "
                f"the curriculum has {self.steps} steps of {self.batch}; pass "
                "**callback.training_args() to TrainingArguments (one device)"
            )
        dataset = getattr(train_dataloader, "dataset", self.train_dataset)
        if dataset is not self.train_dataset:
            raise ValueError(f"{where}: train on train_dataset=callback.train_dataset")
        self.train_dataset.fetched.clear()
        self._lrs = []
        self._losses = [self._tracked_losses(model, args.per_device_eval_batch_size)]

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        """Record the learning rate this step used (before the scheduler moves it)."""
        self._lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """Check the batch the step consumed; log the tracked losses after it."""
        t = state.global_step
        if not self._losses:
            raise ValueError("SimfluenceCallback: on_train_begin did not run before step 1")
        if t != len(self._losses) or len(self._lrs) != t:
            raise ValueError(
                f"SimfluenceCallback ({self.run_dir}): step {t} ended but {len(self._losses) - 1} "
                "steps are logged; is the callback attached to one Trainer only?"
            )
        fetched = self.train_dataset.fetched
        if fetched:  # empty when DataLoader workers (other processes) fetch the examples
            lo, n = (t - 1) * self.batch, t * self.batch  # earlier steps were checked already
            if len(fetched) < n or fetched[lo:n] != list(range(lo, n)):
                raise ValueError(
                    f"SimfluenceCallback ({self.run_dir}): step {t} did not consume the "
                    "curriculum's examples in order (a custom sampler?); train on "
                    "callback.train_dataset with **callback.training_args()"
                )
        self._losses.append(self._tracked_losses(model, args.per_device_eval_batch_size))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Write the run (and experiment.json when there is none)."""
        done = len(self._losses) - 1
        if done != self.steps:
            raise ValueError(
                f"SimfluenceCallback ({self.run_dir}): training stopped after {max(done, 0)} of "
                f"{self.steps} steps; nothing written (a run log needs every step)"
            )
        import torch
        import transformers

        if not (self.exp_dir / runlog.EXPERIMENT_FILE).is_file():
            config = getattr(model, "config", None)
            info = {
                "n_train": self.n_train,
                "n_test": self.n_test,
                "source": SOURCE,
                "model": getattr(config, "_name_or_path", None) or type(model).__name__,
                "loss": LOSS_DESCRIPTION if self.loss_fn is mean_token_loss else "loss_fn",
            }
            info.update(self.experiment_info)
            runlog.write_experiment(self.exp_dir, info)
        meta = {
            "source": SOURCE,
            "seed": args.seed,
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
            "optim": getattr(args.optim, "value", args.optim),
            "weight_decay": args.weight_decay,
            "max_grad_norm": args.max_grad_norm,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }
        meta.update(self.meta)
        runlog.write_run(
            self.run_dir,
            self.curriculum,
            np.stack(self._losses),
            meta=meta,
            lr=np.asarray(self._lrs, dtype=np.float32),
        )


_BUILT: dict[str, type] = {}


def _callback_class() -> type:
    if "SimfluenceCallback" not in _BUILT:
        try:
            from transformers import TrainerCallback
        except ImportError as exc:
            raise ImportError(
                f"simfluence.integrations.hf needs transformers and torch ({exc}); install them, "
                'e.g. pip install -e ".[hf]"'
            ) from exc

        class SimfluenceCallback(_CallbackLogic, TrainerCallback):
            """A `transformers.TrainerCallback` that trains a fixed curriculum and logs the run.

            Train on `callback.train_dataset` with `TrainingArguments(...,
            **callback.training_args())` and pass `callbacks=[callback]` to the `Trainer`; after
            `trainer.train()` the run is in `callback.run_dir`.

            Args:
                exp_dir: experiment folder; `experiment.json` is written there after the first
                    run (n_train, n_test, model, loss, plus `experiment_info`) and checked
                    against later runs.
                run: run index (the run goes to `exp_dir/run_{run:03d}`).
                curriculum: int [steps, batch] positions in `train_pool`, consumed in order.
                train_pool: the training pool (n_train examples, indexable), items as the
                    Trainer's data collator takes them.
                tracked: the tracked test examples (n_test), logged before training and after
                    every step.
                data_collator: collates a list of tracked examples into a dict of tensors with
                    `labels` (usually the Trainer's collator).
                loss_fn: `(model, batch) -> tensor [n]` per-example losses (default
                    `mean_token_loss`).
                experiment_info: extra JSON for experiment.json (e.g. {"split": [8, 1, 3]},
                    which `simfluence evaluate` then uses).
                meta: extra JSON for the run's meta.json.
                overwrite: replace a complete run of the same index.

            Raises:
                RunLogError: experiment.json disagrees with the pool or tracked sizes, or the
                    run exists (without `overwrite`).
                ValueError: a curriculum outside the pool, or (during training) a Trainer that
                    does not consume the curriculum as is.
            """

        SimfluenceCallback.__module__ = __name__
        _BUILT["SimfluenceCallback"] = SimfluenceCallback
    return _BUILT["SimfluenceCallback"]


def __getattr__(name: str):
    if name == "SimfluenceCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
