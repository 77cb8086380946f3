"""The embedded demo: a small random-init T5 with the real T5 vocabulary on RTE, 32 runs.

Command (from the repository root; ``make demo`` runs it, then evaluate and plot)::

    SIMFLUENCE_DATA_DIR=../shared/data SIMFLUENCE_TOKENIZER=../shared/tokenizers/t5 \\
        .venv/bin/python -m finetune.cli run runs/demo --tracin

Hardware: sized for a 2-core CPU with no network and no pretrained weights; the whole
``make demo`` (warm-up, 32 runs, TracIn-CP, evaluate, plot) is meant to take under 10 minutes.
Expected time of this command: about 8-9 minutes measured on a 2-core CPU shared with other
jobs (load average 7-8, so this process got well under one core; about 3.5 minutes of CPU
time); a few minutes on an idle 2-core machine.

What it does:

- Model: T5 (relu, tied embedding) with d_model 32, d_ff 128, 4 heads, 2 encoder + 2 decoder
  layers and the real 32128-token T5 vocabulary (tokenizer from --tokenizer or
  SIMFLUENCE_TOKENIZER), randomly initialised (1.1M parameters, 1.03M of them the embedding).
- Warm-up, once per experiment and cached in ``EXP/warmup/``: 200 AdamW steps (lr 2e-3) of
  batch 16 on 1000 RTE training examples outside the pool and the tracked set, all weights, so
  the model has learned the answer format ("Yes"/"No") before the runs start (mean tracked test
  loss 10.85 -> 0.86). Without pretrained weights the model learns the format and the label
  prior, not entailment: the curriculum effects the demo shows are mostly label-mix effects.
  The paper-scale configs are the real experiments.
- Runs: 32 (split 20 fit / 2 validation / 10 test by ``simfluence evaluate --split 20,2,10``),
  pool n_train = 100 RTE training examples, n_test = 50 tracked validation examples, batch 8,
  26 steps, curriculum "uniform" (slots drawn with replacement), AdamW with the learning rate
  ramped linearly to 1e-3 over the first 20 steps, vocabulary embedding frozen (the other 66k
  weights train).
  Each pool example is seen 20 * 26 * 8 / 100 = 41.6 times on average across the 20 fitting
  runs (>= 40), and steps x batch = 208 is not a multiple of the pool size (so an example's count
  differs between runs; issue 7). The mean tracked test loss (averaged over runs) does not rise
  at any step: measured 0.856 at step 0, never above it, 0.828 at step 26. With a 4-step ramp
  it first rose to 0.872 at step 5 (fresh Adam moments take large first steps), with a 13-step
  ramp to 0.858; with a 400-step warm-up the loss instead fell steeply for every run
  (1.22 -> 0.50) and the curriculum-blind mean-trajectory baseline beat every simulator.
- Inputs are truncated to 96 tokens (the question comes first, the premise is cut) and padded
  to multiples of 32, so jit compiles a couple of shapes only.
- Checkpoints at steps 0 and 13 of the 20 fitting runs for TracIn-CP, exact, in chunks of 64:
  the 50 tracked examples are one chunk, so the pool's gradients are computed once per
  checkpoint (0.54 s per checkpoint against 1.60 s in chunks of 32, measured on this 2-core CPU
  shared with other jobs).
- Examples never seen (issue 19, featurized Simfluence): 20 more RTE training examples are
  appended to the pool (positions 100-119, ``held_out_pool``) and only 8 more runs (32-39,
  ``held_out_runs``) train on them, drawing from all 120; runs 0-31 are those without the
  option, bit for bit. ``make unseen`` scores the four settings on them.
"""

from finetune.config import ExperimentConfig, WarmupConfig


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="demo",
        task="rte",
        random_init=dict(
            vocab_size=32128,
            d_model=32,
            d_ff=128,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            num_decoder_layers=2,
            feed_forward_proj="relu",
            tie_word_embeddings=True,
            dropout_rate=0.0,
            relative_attention_num_buckets=32,
        ),
        init_seed=0,
        method="full",
        freeze_embeddings=True,
        optimizer="adamw",
        learning_rate=1e-3,
        schedule="constant",
        warmup_steps=20,
        n_train=100,
        n_test=50,
        max_input_length=96,
        max_target_length=8,
        length_multiple=32,
        data_seed=0,
        num_runs=40,
        steps=26,
        batch_size=8,
        curriculum="uniform",
        curriculum_seed=0,
        runs_together=40,
        checkpoint_steps=(0, 13),
        checkpoint_runs=20,
        held_out_pool=20,
        held_out_runs=8,
        tracin_chunk_size=64,
        warmup=WarmupConfig(steps=200, batch_size=16, n_examples=1000, learning_rate=2e-3),
        extra={"split": [20, 2, 10]},
    )
