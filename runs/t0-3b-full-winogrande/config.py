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
Checkpoints for TracIn-CP at steps (0, 500, 1000) of the 20 fitting runs.

TracIn-CP (after training, or with --tracin): projected mode (d = 4096) in chunks of 4 examples, at
least 68.5 GB on the device (`finetune tracin-estimate runs/t0-3b-full-winogrande --device-memory
141e9`); exact mode in chunks of 32 would need 752 GB and is refused before training."""

from finetune.config import ExperimentConfig, paper_config


def get_config() -> ExperimentConfig:
    return paper_config("t0-3b-full", "winogrande")
