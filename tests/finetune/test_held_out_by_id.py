"""Tracked examples drawn from a training file stay out of the pool and the warm-up by example
id, on the real Winogrande files, whose "train" is "train_l" and "train_xs" a subset of it."""

import json

import pytest

from finetune.config import ExperimentConfig, WarmupConfig
from finetune.tasks import load_split
from finetune.trainer import prepare_experiment

from ._tiny import TINY_T5

# TINY_T5, leaving feed_forward_proj to T5Config's default (relu, the same network)
_T5 = {k: v for k, v in TINY_T5.items() if k != "feed_forward_proj"}


@pytest.mark.parametrize("train_split,test_split", [("train", "train_xs"), ("train", "train_l")])
def test_tracked_training_examples_are_excluded_by_id(
    tmp_path, data_dir, t5_tokenizer_dir, train_split, test_split
):
    train = {x.uid for x in load_split("winogrande", train_split, data_dir)}
    test = {x.uid for x in load_split("winogrande", test_split, data_dir)}
    assert test <= train  # the premise: the test file's examples are training examples
    # 160 tracked of 10234: a draw of 2000 + 500 blind to them would hit ~39 of them.
    config = ExperimentConfig(
        name="wg",
        task="winogrande",
        random_init=_T5,
        train_split=train_split,
        test_split=test_split,
        n_train=2000,
        n_test=160,
        max_input_length=32,
        max_target_length=4,
        warmup=WarmupConfig(steps=1, batch_size=2, n_examples=500),
    )
    prepare_experiment(config, tmp_path / "exp", data_dir=data_dir, tokenizer=str(t5_tokenizer_dir))
    info = json.loads((tmp_path / "exp" / "experiment.json").read_text())
    pool, warm, tracked = (set(info[k]) for k in ("pool_ids", "warmup_ids", "test_ids"))
    assert (len(pool), len(warm), len(tracked)) == (2000, 500, 160)
    assert not pool & tracked and not warm & tracked and not pool & warm
    assert pool | warm <= train and tracked <= test
