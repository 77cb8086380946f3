"""The tiny experiment and the small T5 shapes the finetune tests share: one definition each.

Tests that train TINY, or a variant with the same network and shapes, build the same programs, so
in one pytest process the later tests reuse what the first compiled: derive from these (with
`tiny_fields` and `tiny_t5`, which return new dicts) rather than writing a copy.
Imported relatively (`from ._tiny import ...`): pytest's importlib mode names the test modules
tests.finetune.<name>.
"""

from pathlib import Path

# A one-block T5 on T5's 32128-token vocabulary (the shared tokenizer's ids fit), 8 wide.
TINY_T5 = dict(
    vocab_size=32128,
    d_model=8,
    d_ff=16,
    d_kv=4,
    num_heads=2,
    num_layers=1,
    num_decoder_layers=1,
    feed_forward_proj="relu",
    dropout_rate=0.0,
    relative_attention_num_buckets=8,
)

# ExperimentConfig fields of a tiny RTE experiment of TINY_T5: 2 runs of 4 steps, trained together.
TINY = dict(
    name="tiny",
    task="rte",
    random_init=TINY_T5,
    freeze_embeddings=True,
    learning_rate=1e-2,
    n_train=8,
    n_test=4,
    max_input_length=32,
    max_target_length=4,
    length_multiple=32,
    num_runs=2,
    steps=4,
    batch_size=2,
    curriculum="epochs",
    runs_together=2,
    checkpoint_steps=(2, 4),
)

# A T5 on a 64-token vocabulary for the model-function and train-step tests (no tokenizer).
SMALL_T5 = dict(
    vocab_size=64,
    d_model=16,
    d_kv=4,
    d_ff=24,
    num_layers=1,
    num_decoder_layers=1,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    decoder_start_token_id=0,
    dropout_rate=0.0,
)


def tiny_t5(**overrides) -> dict:
    """A new dict of TINY_T5's T5Config kwargs with `overrides`."""
    return {**TINY_T5, **overrides}


def tiny_fields(**overrides) -> dict:
    """A new dict of TINY's fields with `overrides`. A dict given as random_init updates TINY's
    T5 kwargs (`random_init=dict(vocab_size=1000)`); None drops them (for a config with model=)."""
    init = overrides.pop("random_init", {})
    return {**TINY, "random_init": None if init is None else tiny_t5(**init), **overrides}


def write_config(folder: Path, **overrides) -> Path:
    """`folder`/config.py whose get_config() returns ExperimentConfig(**tiny_fields(**overrides));
    returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    args = ",\n        ".join(f"{k}={v!r}" for k, v in tiny_fields(**overrides).items())
    (folder / "config.py").write_text(
        '"""Tiny test config."""\n\nfrom finetune.config import ExperimentConfig, WarmupConfig\n\n'
        f"\ndef get_config():\n    return ExperimentConfig(\n        {args})\n"
    )
    return folder


def run_argv(config_dir, out, data_dir, tokenizer, *extra) -> list[str]:
    """`finetune run` arguments: CONFIG --out OUT --data-dir DATA --tokenizer TOK, then `extra`."""
    return [
        "run",
        str(config_dir),
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
        "--tokenizer",
        str(tokenizer),
        *extra,
    ]
