"""ExperimentConfig checks, the committed runs/ configs, and the demo's issue-7 regime."""

import dataclasses
import re
from pathlib import Path

import pytest

from finetune.config import (
    ConfigError,
    ExperimentConfig,
    WarmupConfig,
    load_experiment_config,
)

RUNS = Path(__file__).resolve().parents[2] / "runs"
PAPER = [
    f"{m}-{t}"
    for m in ("t5-base-lm-adapt-full", "t0-3b-full", "t0-3b-ia3")
    for t in ("rte", "copa", "winogrande")
]


def _base(**kw):
    args = dict(
        name="t",
        task="rte",
        random_init={"d_model": 8},
        n_train=10,
        n_test=4,
        num_runs=2,
        steps=5,
        batch_size=2,
    )
    args.update(kw)
    return ExperimentConfig(**args)


def test_round_trip():
    c = _base(checkpoint_steps=(0, 2, 5), warmup=WarmupConfig(steps=3))
    assert ExperimentConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown config field"):
        ExperimentConfig.from_dict({**c.to_dict(), "lr": 1.0})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"task": "mnli"}, "unknown task 'mnli'"),
        ({"test_split": "test"}, "test_split='test' is not a split of rte"),
        ({"batch_size": 11}, "batch_size=11 is larger than the pool"),
        (
            {"curriculum": "subset", "subset_size": 3, "batch_size": 4},
            r"subset_size=3 must be in \[batch_size=4",
        ),
        ({"curriculum": "subset"}, "subset_size=None"),
        ({"checkpoint_steps": (2, 6)}, r"checkpoint_steps \[2, 6\] must lie in \[0, steps=5\]"),
        ({"checkpoint_steps": (3, 2)}, "increasing"),
        ({"method": "lora"}, "method='lora'"),
        ({"optimizer": "sgd"}, "optimizer='sgd'"),
        ({"steps": 0}, "steps=0 must be an integer >= 1"),
        ({"random_init": None}, "give model"),
        ({"model": "x"}, "not both"),
        ({"learning_rate": 0.0}, "learning_rate=0.0"),
        ({"warmup_steps": 5}, "warmup_steps=5"),
        ({"tracked_buckets": 0}, "tracked_buckets=0 must be an integer >= 1"),
        ({"scan_layers": "yes"}, "scan_layers='yes' must be True or False"),
        ({"attention": "flash"}, "attention='flash'; choose"),
        ({"train_length_groups": 2}, "train_length_groups needs method='ia3'"),
        ({"method": "ia3", "train_length_groups": 3}, r"must be an integer in \[1, 2\]"),
        ({"attention": "cudnn"}, "needs dtype='bfloat16'"),
        ({"attention": "cudnn", "dtype": "bfloat16"}, "needs method='ia3' and no warm-up"),
        # Ill-typed values name the field (they used to escape as a TypeError from a comparison).
        ({"learning_rate": "1e-3"}, "learning_rate='1e-3' must be a number"),
        ({"grad_clip_norm": "1"}, "grad_clip_norm='1' must be a number or None"),
        ({"steps": "5"}, "steps='5' must be an integer"),
        ({"n_train": 10.0}, "n_train=10.0 must be an integer"),
        ({"data_seed": True}, "data_seed=True must be an integer"),
        ({"checkpoint_runs": "1"}, "checkpoint_runs='1' must be an integer or None"),
        ({"checkpoint_steps": 2}, "checkpoint_steps=2 must be a tuple of integers"),
        ({"random_init": ["d_model", 8]}, r"random_init=\['d_model', 8\] must be a dict"),
        ({"warmup": 3}, "warmup=3 must be a WarmupConfig"),
        ({"tracin_mode": "fast"}, "tracin_mode='fast'; choose 'exact' or 'projected'"),
        ({"tracin_proj_dim": 0}, "tracin_proj_dim=0 must be >= 1"),
        ({"tracin_chunk_size": 0}, "tracin_chunk_size=0 must be >= 1"),
        ({"tracin_seed": 1.5}, "tracin_seed=1.5 must be an integer"),
    ],
)
def test_bad_fields(kw, match):
    with pytest.raises(ConfigError, match=match):
        _base(**kw)


def test_bad_warmup_fields():
    with pytest.raises(ConfigError, match="warmup.learning_rate='1e-3' must be a number"):
        WarmupConfig(learning_rate="1e-3")
    with pytest.raises(ConfigError, match="warmup.steps='3' must be an integer"):
        WarmupConfig(steps="3")


def test_every_field_has_a_comment():
    source = (Path(__file__).resolve().parents[2] / "finetune" / "config.py").read_text()
    body = source.split("class ExperimentConfig")[1].split("def __post_init__")[0]
    for f in dataclasses.fields(ExperimentConfig):
        line = next(x for x in body.splitlines() if re.match(rf"\s+{f.name}: ", x))
        assert "#" in line, f"field {f.name} has no comment"


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_load_and_document_themselves(name):
    config, folder = load_experiment_config(RUNS / name)
    assert config.name == name and folder == RUNS / name
    doc = " ".join((RUNS / name / "config.py").read_text().split('"""')[1].split())
    assert f"finetune run runs/{name}" in doc
    assert "Hardware" in doc and "Expected time" in doc
    assert config.num_runs == 32 and config.steps == 1000 and config.batch_size == 8
    if config.method == "ia3":
        assert config.learning_rate == 3e-3  # T-Few


# What the paper experiments are, written from their description (docstrings, README) and the
# T-Few recipe for IA3 in ../shared/reference/simfluence-notes.md section 7 (lr 3e-3, 1000
# steps, Adafactor, linear decay after a 6% warm-up, clipping at 1, no weight decay, batch 8).
_PAPER_FAMILY = {
    "t0-3b-full": dict(
        model="bigscience/T0_3B", method="full", learning_rate=1e-4, schedule="constant",
        warmup_steps=0, grad_clip_norm=None, runs_together=2, scan_layers=True,
        checkpoint_steps=(0, 500, 1000), train_length_groups=None,
        tracin_mode="projected", tracin_chunk_size=4,
    ),
    "t0-3b-ia3": dict(
        model="bigscience/T0_3B", method="ia3", learning_rate=3e-3, schedule="linear",
        warmup_steps=60, grad_clip_norm=1.0, runs_together=8, scan_layers=False,
        checkpoint_steps=(0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000),
        train_length_groups=4, tracin_mode="exact", tracin_chunk_size=32,
    ),
    "t5-base-lm-adapt-full": dict(
        model="google/t5-base-lm-adapt", method="full", learning_rate=1e-3, schedule="constant",
        warmup_steps=0, grad_clip_norm=None, runs_together=8, scan_layers=True,
        checkpoint_steps=(0, 200, 400, 600, 800, 1000), train_length_groups=None,
        tracin_mode="projected", tracin_chunk_size=32,
    ),
}  # fmt: skip
_PAPER_COMMON = dict(
    dtype="bfloat16", optimizer="adafactor", weight_decay=0.0, n_test=100, num_runs=32,
    steps=1000, batch_size=8, curriculum="uniform", checkpoint_runs=20, max_input_length=256,
    max_target_length=32, length_multiple=16, train_split="train", test_split="validation",
    freeze_embeddings=False, attention="einsum", tracin_proj_dim=4096, tracin_seed=0,
    data_seed=0, curriculum_seed=0, extra={"split": [20, 2, 10]},
)  # fmt: skip
_PAPER_POOL = {"copa": 400, "rte": 1000, "winogrande": 1000}  # COPA: its whole training split


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_are_one_definition_with_the_papers_values(name):
    """Each runs/<name>/config.py calls finetune.config.paper_config and yields the experiment
    its docstring describes, field by field."""
    family, task = name.rsplit("-", 1)
    config, _ = load_experiment_config(RUNS / name)
    source = (RUNS / name / "config.py").read_text()
    assert f'paper_config("{family}", "{task}")' in source
    assert "ExperimentConfig(" not in source  # no copy of the definition
    want = {**_PAPER_COMMON, **_PAPER_FAMILY[family], "task": task, "n_train": _PAPER_POOL[task]}
    got = {k: getattr(config, k) for k in want}
    assert got == want
    if config.method == "ia3":  # T-Few: warm-up over 6% of the steps
        assert config.warmup_steps == round(0.06 * config.steps)
    # Every other field keeps its default (nothing else differs between the nine).
    defaults = ExperimentConfig(name=name, task=task, model="m")
    rest = {f.name for f in dataclasses.fields(ExperimentConfig)} - set(want) - {"name", "model"}
    assert {k: getattr(config, k) for k in rest} == {k: getattr(defaults, k) for k in rest}


def test_demo_is_in_the_informative_regime():
    config, _ = load_experiment_config(RUNS / "demo")
    slots = config.steps * config.batch_size
    assert slots % config.n_train != 0  # issue 7: counts must differ between runs
    fit_runs = 20
    assert fit_runs * slots / config.n_train >= 40  # each example seen >= 40x on average
    assert config.num_runs - config.held_out_runs == 32 and config.extra["split"] == [20, 2, 10]
    assert config.random_init["vocab_size"] == 32128 and config.warmup is not None
    assert config.checkpoint_runs >= fit_runs and config.checkpoint_steps


def test_scan_layers_reaches_the_network():
    from flax import nnx

    from finetune.experiment import build_base_model

    for scan in (False, True):
        model = nnx.merge(*build_base_model(_base(scan_layers=scan, random_init=_TINY)))
        assert model.encoder.scan_layers is scan and model.decoder.scan_layers is scan


_TINY = dict(vocab_size=32, d_model=8, d_ff=16, d_kv=4, num_heads=2, num_layers=2)


def test_set_overrides_parse_against_the_field_types():
    from finetune.config import apply_overrides

    c = _base(warmup=WarmupConfig(steps=3), checkpoint_steps=(0, 2))
    got = apply_overrides(
        c,
        [
            "learning_rate=3e-4",
            "steps=7",
            "grad_clip_norm=none",
            "grad_clip_norm=0.5",
            "scan_layers=true",
            "checkpoint_steps=0,5",
            "warmup.steps=4",
            'random_init={"d_model": 16}',
            "tracin_mode=projected",
            "notes=a=b",
            "steps=6",  # the last one of a key wins
        ],
    )
    want = dataclasses.replace(
        c,
        learning_rate=3e-4,
        steps=6,
        grad_clip_norm=0.5,
        scan_layers=True,
        checkpoint_steps=(0, 5),
        warmup=WarmupConfig(steps=4),
        random_init={"d_model": 16},
        tracin_mode="projected",
        notes="a=b",
    )
    assert got == want and type(got.learning_rate) is float and type(got.steps) is int
    assert apply_overrides(c, ["warmup=none"]).warmup is None
    assert apply_overrides(c, []) == c


@pytest.mark.parametrize(
    ("item", "match"),
    [
        ("lr=1", "ExperimentConfig has no field 'lr'"),
        ("learnin_rate=1", "did you mean 'learning_rate'"),
        ("steps=abc", "'abc' is not an integer"),
        ("steps", "expected KEY=VALUE"),
        ("steps=0", "steps=0 must be an integer >= 1"),
        ("scan_layers=maybe", "'maybe' is not true or false"),
        ("learning_rate=fast", "'fast' is not a number"),
        ("warmup.foo=1", "WarmupConfig has no field 'foo'"),
        ("warmup.steps=0", "warmup.steps=0 must be >= 1"),
        ("random_init=[1]", "is not a JSON object"),
        ("grad_clip_norm=x", "'x' is not a number"),
    ],
)
def test_bad_set_overrides_name_the_override(item, match):
    from finetune.config import apply_overrides

    with pytest.raises(ConfigError, match=re.escape(match)) as e:
        apply_overrides(_base(warmup=WarmupConfig(steps=3)), [item])
    assert f"--set {item}" in str(e.value) and "\n" not in str(e.value)
