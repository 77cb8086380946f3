"""T5 v1.1 LM-adapted base (250M), full fine-tuning on Winogrande: 32 runs x 1000 steps.

Command (from the repository root, with a network for the weights, or HF_HOME holding them)::

    finetune run runs/t5-base-lm-adapt-full-winogrande --data-dir ../shared/data --tracin
    simfluence evaluate runs/t5-base-lm-adapt-full-winogrande/output --split 20,2,10

Hardware it was sized for: one NVIDIA H100/H200 (80+ GB), or a TPU v4-8. Expected time: about 20-30
minutes on one H200 for 32 runs x 1000 steps (estimated from the T5-base IA3 benchmark: the per-
step test-loss logging dominates; not measured). Disk: about 1 GB per checkpoint (parameters +
Adafactor state): 20 runs x 6 = 120 GB.

Setup: pool = 1000 examples drawn from the winogrande training split (train_l); 100 tracked
validation examples; 32 runs (20 fit / 2 validation / 10 test) of 1000 steps of batch 8 under
"uniform" curricula (slots drawn with replacement); Adafactor at a constant 1e-3 is the T5 paper's
fine-tuning recipe. Runs trained together: 8 (memory bound for full tuning). Checkpoints for
TracIn-CP at steps (0, 200, 400, 600, 800, 1000) of the 20 fitting runs.

TracIn-CP (after training, or with --tracin): projected mode (d = 4096), at least 33.7 GB on the
device (`finetune tracin-estimate runs/t5-base-lm-adapt-full-winogrande --device-memory 141e9`)."""

from finetune.config import ExperimentConfig, paper_config


def get_config() -> ExperimentConfig:
    return paper_config("t5-base-lm-adapt-full", "winogrande")
