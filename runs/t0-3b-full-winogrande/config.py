"""T0-3B (T5 v1.1 XL LM-adapted, prompted multitask) full tuning on Winogrande: 32 runs x 1000
steps.

Command (from the repository root, with a network for the weights, or HF_HOME holding them)::

    finetune run runs/t0-3b-full-winogrande --data-dir ../shared/data --tracin
    simfluence evaluate runs/t0-3b-full-winogrande/output --split 20,2,10

Hardware it was sized for: one NVIDIA H200 (141 GB; 2 runs at once), or a TPU v4-32 slice. Expected
time: about 3 hours on one H200 (16 groups of 2 runs x 1000 steps; estimated, not measured). Disk:
about 12 GB per checkpoint: 20 runs x 3 = 720 GB; lower checkpoint_runs if short.

Setup: pool = 1000 examples drawn from the winogrande training split (train_l); 100 tracked
validation examples; 32 runs (20 fit / 2 validation / 10 test) of 1000 steps of batch 8 under
"uniform" curricula (slots drawn with replacement); a 10x lower learning rate than T5-base: T0-3B
is already prompted-task tuned. Runs trained together: 2 (memory bound for full tuning).
Checkpoints for TracIn-CP at steps (0, 500, 1000) of the 20 fitting runs."""

from finetune.config import ExperimentConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="t0-3b-full-winogrande",
        task="winogrande",
        model="bigscience/T0_3B",
        method="full",
        dtype="bfloat16",
        scan_layers=True,  # 12-24 layers per stack: compile time independent of depth
        optimizer="adafactor",
        learning_rate=1e-4,
        schedule="constant",
        warmup_steps=0,
        grad_clip_norm=None,
        n_train=1000,
        n_test=100,
        max_input_length=256,
        max_target_length=32,
        length_multiple=16,
        num_runs=32,
        steps=1000,
        batch_size=8,
        curriculum="uniform",
        runs_together=2,
        checkpoint_steps=(0, 500, 1000),
        checkpoint_runs=20,
        extra={"split": [20, 2, 10]},
    )
