"""SimfluenceCallback with a real `transformers.Trainer` on the tiny PyTorch T5.

The logged losses are checked against each tracked example's own Hugging Face loss (one example
per forward pass, no padding) on the model at step 0 (a fresh load), after every step (a second
callback), and after the last step (the trained model); the curriculum against the batches the
Trainer's collator actually received; the learning rates against the linear schedule's formula.
"""

import json

import numpy as np
import pytest

from simfluence import runlog

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it (the test and hf extras have it)

N_TRAIN, N_TEST, STEPS, BATCH = 6, 3, 4, 2
LR = 1e-2
RTOL, ATOL = 1e-5, 1e-6  # float32 batched-and-padded against one unpadded example at a time


def _example(rng, n_in, n_out):
    # Distinct token ids (2..1301 of the tiny vocabulary) so that a batch row names its example.
    ids = rng.choice(np.arange(2, 1302), n_in, replace=False).tolist()
    return {"input_ids": ids, "labels": rng.integers(2, 1302, n_out).tolist() + [1]}


def collate(features):
    width = max(len(f["input_ids"]) for f in features)
    width_out = max(len(f["labels"]) for f in features)
    ids = [f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]
    mask = [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
    labels = [f["labels"] + [-100] * (width_out - len(f["labels"])) for f in features]
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def _reference_losses(model, tracked):
    """Each tracked example's loss alone: Hugging Face's own mean token loss, eval mode."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = [
            float(
                model(
                    input_ids=torch.tensor([ex["input_ids"]]),
                    labels=torch.tensor([ex["labels"]]),
                ).loss
            )
            for ex in tracked
        ]
    model.train(was)
    return np.array(out)


@pytest.fixture(scope="module")
def setup(tiny_t5_dir):
    rng = np.random.default_rng(0)
    pool = [_example(rng, int(rng.integers(3, 9)), int(rng.integers(1, 4))) for _ in range(N_TRAIN)]
    tracked = [_example(rng, n_in, n_out) for n_in, n_out in ((4, 1), (9, 3), (6, 2))]
    # One thread: this model is tiny, and two threads on a busy 2-core machine are ~30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield pool, tracked, tiny_t5_dir
    torch.set_num_threads(threads)


def _train(
    setup, exp, run, curriculum, extra_callbacks=(), trainer_cls=None, attach=True, **arg_overrides
):
    from transformers import T5ForConditionalGeneration, Trainer, TrainingArguments

    from simfluence.integrations.hf import SimfluenceCallback

    pool, tracked, model_dir = setup
    torch.manual_seed(0)
    model = T5ForConditionalGeneration.from_pretrained(model_dir)
    cb = SimfluenceCallback(
        exp,
        run,
        curriculum=curriculum,
        train_pool=pool,
        tracked=tracked,
        data_collator=collate,
        experiment_info={"split": [1, 0, 2]},
    )
    seen = []

    def recording_collate(features):
        seen.append([tuple(f["input_ids"]) for f in features])
        return collate(features)

    args = TrainingArguments(
        str(exp / "trainer"),
        **{**cb.training_args(), **arg_overrides},
        learning_rate=LR,
        lr_scheduler_type="linear",
        per_device_eval_batch_size=2,  # the tracked set is logged in two padded batches
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=run,
    )
    trainer = (trainer_cls or Trainer)(
        model=model,
        args=args,
        train_dataset=cb.train_dataset,
        data_collator=recording_collate,
        callbacks=[cb, *extra_callbacks] if attach else list(extra_callbacks),
    )
    trainer.train()
    by_ids = {tuple(ex["input_ids"]): i for i, ex in enumerate(pool)}
    return cb, trainer, [[by_ids[ids] for ids in batch] for batch in seen]


def test_callback_logs_a_run_that_loads_and_fits(setup, tmp_path, capsys):
    from transformers import T5ForConditionalGeneration, TrainerCallback

    pool, tracked, model_dir = setup
    exp = tmp_path / "exp"
    rng = np.random.default_rng(1)
    curricula = [rng.integers(0, N_TRAIN, (STEPS, BATCH)) for _ in range(2)]

    class Reference(TrainerCallback):
        def __init__(self):
            self.rows = []

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.rows.append(_reference_losses(model, tracked))

        def on_step_end(self, args, state, control, model=None, **kw):
            self.rows.append(_reference_losses(model, tracked))

    ref = Reference()
    cb, trainer, batches = _train(setup, exp, 0, curricula[0], extra_callbacks=[ref])
    _train(setup, exp, 1, curricula[1])

    runs = runlog.load_runs(exp)
    assert [r.index for r in runs] == [0, 1]
    run = runs[0]
    # The batches the Trainer's collator received are the curriculum's rows, in order.
    assert batches == curricula[0].tolist()
    np.testing.assert_array_equal(run.curriculum, curricula[0])
    assert run.losses.shape == (STEPS + 1, N_TEST)
    # Step 0 on a fresh load, every step by the reference callback, the last on the trained model.
    fresh = T5ForConditionalGeneration.from_pretrained(model_dir)
    np.testing.assert_allclose(run.losses[0], _reference_losses(fresh, tracked), RTOL, ATOL)
    np.testing.assert_allclose(run.losses, np.stack(ref.rows), RTOL, ATOL)
    np.testing.assert_allclose(
        run.losses[-1], _reference_losses(trainer.model, tracked), RTOL, ATOL
    )
    assert not np.allclose(run.losses[0], run.losses[-1])  # training moved the tracked losses
    # Logging draws no random numbers (dropout is on in training): the same weights without it.
    _, plain, _ = _train(setup, tmp_path / "plain", 0, curricula[0], attach=False)
    trained, untouched = trainer.model.state_dict(), plain.model.state_dict()
    assert list(trained) == list(untouched)
    for name, value in trained.items():
        assert torch.equal(value, untouched[name]), name
    # Linear decay from LR to 0 over STEPS steps: step t uses LR * (1 - (t - 1) / STEPS).
    np.testing.assert_allclose(run.lr, LR * (1 - np.arange(STEPS) / STEPS), rtol=1e-6)
    info = runlog.read_experiment(exp)
    assert (info["n_train"], info["n_test"], info["split"]) == (N_TRAIN, N_TEST, [1, 0, 2])
    assert run.meta["source"] == "simfluence.integrations.hf" and run.meta["seed"] == 0

    from simfluence.cli import main

    assert main(["fit", str(exp), "--runs", "0-1", "--out", str(tmp_path / "sim.npz")]) == 0
    assert (tmp_path / "sim.npz").is_file()
    assert json.loads((exp / "run_001" / "meta.json").read_text())["status"] == "complete"

    # Refusals, before any training: the same run again, sizes that disagree with experiment.json.
    from simfluence.integrations.hf import SimfluenceCallback

    kw = dict(curriculum=curricula[0], train_pool=pool, tracked=tracked, data_collator=collate)
    with pytest.raises(runlog.RunLogError, match="run_001: already a complete run"):
        SimfluenceCallback(exp, 1, **kw)
    with pytest.raises(runlog.RunLogError, match="n_train=6, n_test=3, but this run has a pool"):
        SimfluenceCallback(exp, 2, **{**kw, "tracked": tracked[:2]})
    with pytest.raises(ValueError, match="curriculum id 6 at step 1"):
        SimfluenceCallback(exp, 2, **{**kw, "curriculum": np.full((2, 2), 6)})


def test_callback_refuses_a_trainer_that_reorders_the_curriculum(setup, tmp_path):
    from transformers import Trainer

    class ReversedOrder(Trainer):  # a custom sampler behind train_sampling_strategy="sequential"
        def _get_train_sampler(self, train_dataset=None):
            return list(reversed(range(len(self.train_dataset))))

    class OtherDataset(Trainer):  # the same examples, not through callback.train_dataset
        def get_train_dataloader(self):
            self.train_dataset = list(self.train_dataset.pool)
            return super().get_train_dataloader()

    cur = np.arange(STEPS * BATCH).reshape(STEPS, BATCH) % N_TRAIN
    exp = tmp_path / "exp"
    with pytest.raises(ValueError, match="train_sampling_strategy='random' reorders"):
        _train(setup, exp, 0, cur, train_sampling_strategy="random")
    with pytest.raises(ValueError, match="takes 4 steps of 4 examples but the curriculum has 4"):
        _train(setup, exp, 0, cur, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="step 1 did not consume the curriculum's examples"):
        _train(setup, exp, 0, cur, trainer_cls=ReversedOrder)
    with pytest.raises(ValueError, match="train on train_dataset=callback.train_dataset"):
        _train(setup, exp, 0, cur, trainer_cls=OtherDataset)
    assert not (exp / "experiment.json").exists() and not list(exp.glob("run_*"))


# Printed without use_cpu=True: on a machine without an accelerator torch says pinning is off.
@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
def test_readme_example_runs_as_printed(setup, tmp_path):
    import re
    from pathlib import Path

    from transformers import T5ForConditionalGeneration

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("\n### Hugging Face `Trainer`\n")
    section = text[start : text.index("\n## ", start)]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    pool, tracked, model_dir = setup
    cur = np.arange(STEPS * BATCH).reshape(STEPS, BATCH) % N_TRAIN
    model = T5ForConditionalGeneration.from_pretrained(model_dir)
    scope = dict(cur=cur, pool=pool, tracked=tracked, collate=collate, model=model)
    exec(code.replace("my_exp", str(tmp_path / "my_exp")), scope)
    (run,) = runlog.load_runs(tmp_path / "my_exp")
    np.testing.assert_array_equal(run.curriculum, cur)
    np.testing.assert_allclose(run.losses[-1], _reference_losses(model, tracked), RTOL, ATOL)
    np.testing.assert_allclose(run.lr, 1e-4 * (1 - np.arange(STEPS) / STEPS), rtol=1e-6)
