"""T0-3B with IA3 (T-Few) on Winogrande: 32 runs x 1000 steps.

Command (from the repository root, with a network for the weights, or HF_HOME holding them)::

    finetune run runs/t0-3b-ia3-winogrande --data-dir ../shared/data --tracin
    simfluence evaluate runs/t0-3b-ia3-winogrande/output --split 20,2,10

Hardware it was sized for: one NVIDIA H200 (8 runs at once, 4 groups), or a TPU v4-8. Expected
time: target under 90 minutes on one H200 for 32 runs x 1000 steps (issue 4); time it with
scripts/bench_runs.py --model-size t0-3b first. No GPU has run it yet. The deviceless H200 model
(scripts/aot_gpu_report.py --program runs --size t0-3b --runs 8 --num-runs 32 --train-groups 4
--optimizer adafactor, RTE-like lengths) gives 46 min with unrolled layers against 56 min scanned,
and 39 GiB against 79 GiB for the group step; the model ran optimistic where a GPU measured it.
Disk: under 1 MB per checkpoint (the IA3 vectors and their optimizer state).

Setup: pool = 1000 examples drawn from the winogrande training split (train_l); 100 tracked
validation examples; 32 runs (20 fit / 2 validation / 10 test) of 1000 steps of batch 8 under
"uniform" curricula (slots drawn with replacement); T-Few's IA3 recipe (Liu et al. 2022):
Adafactor, lr 3e-3, 1000 steps, batch 8, linear decay after a 6% warm-up, gradient clipping at 1.0;
plain cross-entropy (T-Few's unlikelihood and length-normalised losses are not used). Runs trained
together: 8 (activation memory bound). The 64 examples of a step train in 4 length groups of
fixed padded length (train_length_groups). Checkpoints for TracIn-CP at steps (0, 100, 200, 300,
400, 500, 600, 700, 800, 900, 1000) of the 20 fitting runs."""

from finetune.config import ExperimentConfig, paper_config


def get_config() -> ExperimentConfig:
    return paper_config("t0-3b-ia3", "winogrande")
