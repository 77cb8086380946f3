"""T5 v1.1 LM-adapted base (250M), full fine-tuning on RTE: 32 runs x 1000 steps.

Command (from the repository root, with a network for the weights, or HF_HOME holding them)::

    finetune run runs/t5-base-lm-adapt-full-rte --data-dir ../shared/data --tracin
    simfluence evaluate runs/t5-base-lm-adapt-full-rte/output --split 20,2,10

Hardware it was sized for: one NVIDIA H100/H200 (80+ GB), or a TPU v4-8. Expected time: about 20-30
minutes on one H200 for 32 runs x 1000 steps (estimated from the T5-base IA3 benchmark: the per-
step test-loss logging dominates; not measured). Disk: about 1 GB per checkpoint (parameters +
Adafactor state): 20 runs x 6 = 120 GB.

Setup: pool = 1000 examples drawn from the rte training split; 100 tracked validation examples; 32
runs (20 fit / 2 validation / 10 test) of 1000 steps of batch 8 under "uniform" curricula (slots
drawn with replacement); Adafactor at a constant 1e-3 is the T5 paper's fine-tuning recipe. Runs
trained together: 8 (memory bound for full tuning). Checkpoints for TracIn-CP at steps (0, 200,
400, 600, 800, 1000) of the 20 fitting runs."""

from finetune.config import ExperimentConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="t5-base-lm-adapt-full-rte",
        task="rte",
        model="google/t5-base-lm-adapt",
        method="full",
        dtype="bfloat16",
        scan_layers=True,  # 12-24 layers per stack: compile time independent of depth
        optimizer="adafactor",
        learning_rate=1e-3,
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
        runs_together=8,
        checkpoint_steps=(0, 200, 400, 600, 800, 1000),
        checkpoint_runs=20,
        extra={"split": [20, 2, 10]},
    )
