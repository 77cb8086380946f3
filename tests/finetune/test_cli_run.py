"""`finetune run` end to end on a tiny config: files, resume, determinism, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from finetune import experiment as E
from finetune.cli import main
from simfluence import runlog

TINY = dict(
    name="tiny",
    task="rte",
    random_init=dict(
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
    ),
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


def _write_config(folder: Path, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fields = {**TINY, **overrides}
    args = ",\n        ".join(f"{k}={v!r}" for k, v in fields.items())
    (folder / "config.py").write_text(
        '"""Tiny test config."""\n\nfrom finetune.config import ExperimentConfig, WarmupConfig\n\n'
        f"\ndef get_config():\n    return ExperimentConfig(\n        {args})\n"
    )
    return folder


def _run(config_dir, out, data_dir, tok, *extra):
    return main(
        [
            "run",
            str(config_dir),
            "--out",
            str(out),
            "--data-dir",
            str(data_dir),
            "--tokenizer",
            str(tok),
            "--no-progress",
            *extra,
        ]
    )


FILES = ("curriculum.npy", "losses.npy", "lr.npy", "metrics.jsonl")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir, t5_tokenizer_dir):
    """One uninterrupted run of the tiny config."""
    root = tmp_path_factory.mktemp("cli")
    cfg = _write_config(root / "tiny")
    out = root / "out"
    assert _run(cfg, out, data_dir, t5_tokenizer_dir) == 0
    return root, cfg, out


def test_end_to_end_files_and_runlog(finished):
    _, _, out = finished
    runs = runlog.load_runs(out)
    assert [r.index for r in runs] == [0, 1]
    for r in runs:
        assert r.curriculum.shape == (4, 2) and r.losses.shape == (5, 4) and r.lr.shape == (4,)
        assert r.meta["status"] == "complete" and 0 <= r.meta["accuracy_end"] <= 1
        lines = (r.path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
        assert np.isclose(json.loads(lines[-1])["test_loss_mean"], r.losses[-1].mean())
        assert E.checkpoint_steps(r.path) == [2, 4]
    # Row 0 is the same initial model for every run; later rows differ between curricula.
    np.testing.assert_array_equal(runs[0].losses[0], runs[1].losses[0])
    assert not np.array_equal(runs[0].losses[-1], runs[1].losses[-1])
    info = runlog.read_experiment(out)
    assert info["config"]["name"] == "tiny" and len(info["pool_ids"]) == 8
    assert len(runlog.read_examples(out)["test"]) == 4
    exp = E.load_experiment(out)
    from finetune.model import partition

    target, _ = partition(exp.params, exp.mask)
    restored = E.restore_trainable(runs[0].path, 4, target)
    assert len(restored) == len(target)


def test_resume_is_bitwise_identical(finished, data_dir, t5_tokenizer_dir):
    root, cfg, out = finished
    out2 = root / "resumed"
    assert _run(cfg, out2, data_dir, t5_tokenizer_dir, "--max-steps", "3") == 0
    assert not (out2 / "run_000" / "meta.json").exists()  # stopped part-way: incomplete
    assert E.checkpoint_steps(out2 / "run_000") == [2]
    assert _run(cfg, out2, data_dir, t5_tokenizer_dir) == 0  # the same command continues
    for r in range(2):
        meta = json.loads((out2 / f"run_{r:03d}" / "meta.json").read_text())
        assert meta["resumed_from_step"] == 2
        for name in FILES:  # same config + seed: bitwise identical to the uninterrupted run
            a = (out / f"run_{r:03d}" / name).read_bytes()
            assert a == (out2 / f"run_{r:03d}" / name).read_bytes(), name


def test_resume_from_step_0_after_a_kill(tmp_path, data_dir, t5_tokenizer_dir):
    """A run killed before its second checkpoint resumes from step 0, which is checkpointed."""
    cfg = _write_config(tmp_path / "c0", checkpoint_steps=(0, 4))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _run(cfg, whole, data_dir, t5_tokenizer_dir) == 0
    assert _run(cfg, cut, data_dir, t5_tokenizer_dir, "--max-steps", "2") == 0
    assert E.checkpoint_steps(cut / "run_000") == [0]
    assert _run(cfg, cut, data_dir, t5_tokenizer_dir) == 0
    for r in range(2):
        assert E.checkpoint_steps(cut / f"run_{r:03d}") == [0, 4]
        for name in FILES:
            a = (whole / f"run_{r:03d}" / name).read_bytes()
            assert a == (cut / f"run_{r:03d}" / name).read_bytes(), name


def test_ia3_length_groups_end_to_end_and_resume(tmp_path, data_dir, t5_tokenizer_dir):
    """IA3 with the runs' examples in length groups: complete files, and a resumed experiment
    bitwise identical to an uninterrupted one."""
    cfg = _write_config(
        tmp_path / "g",
        method="ia3",
        freeze_embeddings=False,
        learning_rate=3e-2,
        length_multiple=8,
        train_length_groups=2,
    )
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _run(cfg, whole, data_dir, t5_tokenizer_dir) == 0
    runs = runlog.load_runs(whole)
    assert [r.index for r in runs] == [0, 1]
    assert not np.array_equal(runs[0].losses[-1], runs[0].losses[0])  # IA3 training moved it
    assert _run(cfg, cut, data_dir, t5_tokenizer_dir, "--max-steps", "3") == 0
    assert _run(cfg, cut, data_dir, t5_tokenizer_dir) == 0
    for r in range(2):
        for name in FILES:
            a = (whole / f"run_{r:03d}" / name).read_bytes()
            assert a == (cut / f"run_{r:03d}" / name).read_bytes(), name


_CUDNN = {"attention": "cudnn", "dtype": "bfloat16", "method": "ia3", "freeze_embeddings": False}


def _bad(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"task": "mnli"}, ["unknown task 'mnli'"]),
        ({"test_split": "test"}, ["test_split='test'"]),
        ({"n_test": 300}, ["n_test=300 exceeds the 277 examples"]),
        ({"batch_size": 9}, ["batch_size=9 is larger than the pool"]),
        ({"checkpoint_steps": (2, 5)}, ["checkpoint_steps [2, 5]"]),
        (_CUDNN, ["attention='cudnn' needs a GPU"]),
    ],
)
def test_bad_config_exits_2_writing_nothing(
    tmp_path, data_dir, t5_tokenizer_dir, capsys, overrides, needles
):
    cfg = _write_config(tmp_path / "bad", **overrides)
    _bad(capsys, _run(cfg, tmp_path / "out", data_dir, t5_tokenizer_dir), *needles)
    assert not (tmp_path / "out").exists()


def test_bad_data_dir_exits_2(tmp_path, data_dir, t5_tokenizer_dir, capsys):
    cfg = _write_config(tmp_path / "c")
    empty = tmp_path / "data"
    (empty / "rte").mkdir(parents=True)
    _bad(
        capsys,
        _run(cfg, tmp_path / "out", empty, t5_tokenizer_dir),
        str(empty / "rte" / "train.jsonl"),
        "expected layout",
    )
    shutil.copy(data_dir / "rte" / "train.jsonl", empty / "rte" / "train.jsonl")
    (empty / "rte" / "val.jsonl").write_text('{"premise": "a"}\n{not json\n')
    _bad(
        capsys,
        _run(cfg, tmp_path / "out", empty, t5_tokenizer_dir),
        f"{empty / 'rte' / 'val.jsonl'}:1",
    )
    assert not (tmp_path / "out").exists()


def test_workdir_with_other_config_is_refused(finished, data_dir, t5_tokenizer_dir, capsys):
    root, _, out = finished
    before = (out / "run_000" / "losses.npy").read_bytes()
    other = _write_config(root / "other", learning_rate=0.5)
    _bad(
        capsys,
        _run(other, out, data_dir, t5_tokenizer_dir),
        "different config",
        "learning_rate",
        "rm -r",
    )
    assert (out / "run_000" / "losses.npy").read_bytes() == before


def test_missing_config_exits_2(tmp_path, capsys):
    _bad(capsys, main(["run", str(tmp_path / "nope")]), "not found")


@pytest.mark.slow
def test_non_finite_loss_names_the_step(tmp_path, data_dir, t5_tokenizer_dir, capsys):
    cfg = _write_config(tmp_path / "nan", learning_rate=1e30, checkpoint_steps=())
    code = _run(cfg, tmp_path / "out", data_dir, t5_tokenizer_dir)
    err = capsys.readouterr().err.strip()
    assert code == 1 and "non-finite loss at step" in err, err
    assert not (tmp_path / "out" / "run_000" / "meta.json").exists()
