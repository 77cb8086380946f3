"""`finetune run` end to end on a tiny config: files, resume, determinism, bad input."""

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune import experiment as E
from finetune.cli import main
from simfluence import runlog

from ._tiny import run_argv, tiny_fields, tiny_t5, write_config


def _run(config_dir, out, data_dir, tok, *extra):
    return main(run_argv(config_dir, out, data_dir, tok, "--no-progress", *extra))


FILES = ("curriculum.npy", "losses.npy", "lr.npy", "metrics.jsonl")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir, t5_tokenizer_dir):
    """One uninterrupted run of the tiny config."""
    root = tmp_path_factory.mktemp("cli")
    cfg = write_config(root / "tiny")
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


def test_resume_from_step_0_after_a_kill(tmp_path, data_dir, t5_tokenizer_dir, capsys):
    """A run killed before its second checkpoint resumes from step 0, which is checkpointed."""
    cfg = write_config(tmp_path / "c0", checkpoint_steps=(0, 4))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _run(cfg, whole, data_dir, t5_tokenizer_dir) == 0
    # A budget that cannot reach the next checkpoint would be thrown away: refused up front.
    capsys.readouterr()
    _bad(
        capsys,
        _run(cfg, cut, data_dir, t5_tokenizer_dir, "--max-steps", "2"),
        "--max-steps 2 is too few: runs 0-1 continue from step 0",
        "give --max-steps 4 or more",
    )
    assert not cut.exists()  # refused before the workdir was prepared: nothing written
    # The kill: everything after the step-0 checkpoint is gone.
    shutil.copytree(whole, cut, dirs_exist_ok=True)
    for r in range(2):
        d = cut / f"run_{r:03d}"
        shutil.rmtree(d / E.CHECKPOINT_DIR / "4")
        for name in ("meta.json", *FILES[1:]):
            (d / name).unlink()
    assert E.checkpoint_steps(cut / "run_000") == [0]
    assert _run(cfg, cut, data_dir, t5_tokenizer_dir) == 0
    for r in range(2):
        assert E.checkpoint_steps(cut / f"run_{r:03d}") == [0, 4]
        for name in FILES:
            a = (whole / f"run_{r:03d}" / name).read_bytes()
            assert a == (cut / f"run_{r:03d}" / name).read_bytes(), name


def test_a_kill_during_a_groups_final_writes_resumes_bitwise(finished, data_dir, t5_tokenizer_dir):
    """Run 0 of the group was written, run 1 not: run 1 trains again beside run 0 (the same
    vmap width), and its files equal the uninterrupted ones."""
    root, cfg, out = finished
    cut = root / "killed_in_writes"
    shutil.copytree(out, cut)
    for name in ("meta.json", "losses.npy", "metrics.jsonl"):
        (cut / "run_001" / name).unlink()
    before = {n: (cut / "run_000" / n).read_bytes() for n in ("meta.json", *FILES)}
    assert _run(cfg, cut, data_dir, t5_tokenizer_dir) == 0
    meta = json.loads((cut / "run_001" / "meta.json").read_text())
    assert meta["runs_together"] == 2 and meta["resumed_from_step"] == 4
    for name in FILES:
        assert (out / "run_001" / name).read_bytes() == (cut / "run_001" / name).read_bytes()
    for name, data in before.items():  # the complete member is not rewritten
        assert (cut / "run_000" / name).read_bytes() == data, name


def test_ia3_length_groups_end_to_end_and_resume(tmp_path, data_dir, t5_tokenizer_dir):
    """IA3 with the runs' examples in length groups: complete files, and a resumed experiment
    bitwise identical to an uninterrupted one."""
    cfg = write_config(
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
        (
            {"curriculum": "subset", "subset_size": 1},
            ["subset_size=1 must be in [batch_size=2, n_train=8]"],
        ),
        ({"checkpoint_steps": (2, 5)}, ["checkpoint_steps [2, 5]"]),
        (_CUDNN, ["attention='cudnn' needs a GPU"]),
    ],
)
def test_bad_config_exits_2_writing_nothing(
    tmp_path, data_dir, t5_tokenizer_dir, capsys, overrides, needles
):
    cfg = write_config(tmp_path / "bad", **overrides)
    _bad(capsys, _run(cfg, tmp_path / "out", data_dir, t5_tokenizer_dir), *needles)
    assert not (tmp_path / "out").exists()


def test_bad_data_dir_exits_2(tmp_path, data_dir, t5_tokenizer_dir, capsys):
    cfg = write_config(tmp_path / "c")
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
    other = write_config(root / "other", learning_rate=0.5)
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
    cfg = write_config(tmp_path / "nan", learning_rate=1e30, checkpoint_steps=())
    code = _run(cfg, tmp_path / "out", data_dir, t5_tokenizer_dir)
    err = capsys.readouterr().err.strip()
    assert code == 1 and "non-finite loss at step" in err, err
    assert not (tmp_path / "out" / "run_000" / "meta.json").exists()


def test_help_loads_no_jax():
    """`finetune --help` (and each subcommand's) starts without JAX or the model stack, as
    finetune/__init__.py promises; run in a fresh interpreter so this process's imports don't
    count."""
    code = """
import sys
from finetune.cli import main
for argv in (["--help"], ["run", "--help"], ["tracin", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
    else:
        raise AssertionError(argv)
heavy = ("jax", "jaxlib", "flax", "optax", "transformers", "torch", "numpy")
print("LOADED", *sorted({m.split(".")[0] for m in sys.modules} & set(heavy)))
"""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = next(ln for ln in out.stdout.splitlines() if ln.startswith("LOADED")).split()[1:]
    assert loaded == [], f"--help imported {loaded}"
    for flag in ("--runs", "--mode", "--proj-dim", "--chunk-size", "--max-steps", "--tracin"):
        assert flag in out.stdout


def test_package_reexports_resolve():
    """Every name `finetune` re-exports loads (lazily) from its module; `run_experiment`, the
    training entry point, is among them."""
    import finetune
    from finetune import trainer

    for name in finetune.__all__:
        assert getattr(finetune, name) is not None, name
    assert finetune.run_experiment is trainer.run_experiment
    assert finetune.data.__name__ == "finetune.data"


# ---- bad input found before anything is written ---------------------------------------------


def test_config_file_errors_name_the_file(tmp_path, capsys):
    """get_config() raising (unknown field, ill-typed value) is one line naming config.py, not a
    traceback with exit code 1."""
    cfg = write_config(tmp_path / "unknown", bogus_field=1)
    code = main(["run", str(cfg), "--out", str(tmp_path / "out")])
    _bad(capsys, code, f"{cfg / 'config.py'}: get_config() failed", "bogus_field")
    cfg = write_config(tmp_path / "typed", learning_rate="1e-3")
    code = main(["run", str(cfg), "--out", str(tmp_path / "out")])
    _bad(capsys, code, f"{cfg / 'config.py'}: ", "learning_rate='1e-3' must be a number")
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_exits_2(tmp_path, data_dir, t5_tokenizer_dir, capsys):
    cfg = write_config(tmp_path / "c")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "sub"):
        _bad(capsys, _run(cfg, out, data_dir, t5_tokenizer_dir), f"{afile} is a file", "--out")
    assert afile.read_text() == "keep me"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A pretrained-style checkpoint of TINY's T5 with two decoder blocks (32128-token vocab)."""
    import transformers

    from finetune import hf

    config = transformers.T5Config(**tiny_t5(num_decoder_layers=2))
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained_safetensors(hf.init_random(config, seed=0), config, path)
    return path


def test_pretrained_checkpoint_trains_loading_it_once(
    tmp_path, tiny_checkpoint, data_dir, t5_tokenizer_dir, monkeypatch
):
    """The model is built (and checked) before the workdir is written, and that same model is
    the one the runs start from: the checkpoint is read once."""
    calls = []
    build = E.build_base_model
    monkeypatch.setattr(E, "build_base_model", lambda c: calls.append(c.model) or build(c))
    cfg = write_config(
        tmp_path / "p", model=str(tiny_checkpoint), random_init=None, steps=2, checkpoint_steps=()
    )
    assert _run(cfg, tmp_path / "out", data_dir, t5_tokenizer_dir) == 0
    assert calls == [str(tiny_checkpoint)]
    assert [r.index for r in runlog.load_runs(tmp_path / "out")] == [0, 1]


def _break_checkpoint(src, dst, how):
    shutil.copytree(src, dst)
    if how == "no config.json":
        (dst / "config.json").unlink()
    elif how == "truncated weights":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:  # fewer decoder layers than the weights hold
        cfg = json.loads((dst / "config.json").read_text())
        cfg["num_decoder_layers"] = 1
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("no config.json", "config.json not found"),
        ("truncated weights", "model.safetensors: cannot read the weights"),
        ("fewer layers", "config.json says num_decoder_layers=1"),
        ("bad random_init", "random_init does not build a T5"),
    ],
)
def test_bad_model_exits_2_writing_nothing(
    tmp_path, tiny_checkpoint, data_dir, t5_tokenizer_dir, capsys, how, needle
):
    """A bad checkpoint or random_init used to be found after data.npz, examples.json and
    experiment.json were written (and a fixed config was then refused as a different one)."""
    if how == "bad random_init":
        cfg = write_config(tmp_path / "c", random_init=dict(feed_forward_proj="gated-swishy"))
    else:
        model = _break_checkpoint(tiny_checkpoint, tmp_path / "model", how)
        cfg = write_config(tmp_path / "c", model=str(model), random_init=None)
    _bad(capsys, _run(cfg, tmp_path / "out", data_dir, t5_tokenizer_dir), needle)
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_embedding_exits_2(
    tmp_path, data_dir, t5_tokenizer_dir, capsys, monkeypatch
):
    """A 32100-token tokenizer on a 1000-row embedding used to train into NaN and blame the
    learning rate (exit code 1, run folders left)."""
    cfg = write_config(tmp_path / "c", random_init=dict(vocab_size=1000))
    out = tmp_path / "out"
    _bad(
        capsys,
        _run(cfg, out, data_dir, t5_tokenizer_dir),
        "tokenizer has 32100 tokens but the model's embedding has vocab_size=1000",
        str(t5_tokenizer_dir),
        "raise random_init['vocab_size'] to 32100",
    )
    assert not out.exists()
    # The ids themselves are checked too (a tokenizer whose len() understates them).
    from finetune import tokenization

    monkeypatch.setattr(tokenization, "check_vocab", lambda tok, config: None)
    _bad(capsys, _run(cfg, out, data_dir, t5_tokenizer_dir), "gives token id", "vocab_size=1000")
    assert not out.exists()


def test_rerun_with_other_tokenizer_or_data_is_refused(
    finished, tmp_path, data_dir, t5_tokenizer_dir, tiny_t5_dir, capsys, monkeypatch
):
    """--tokenizer / --data-dir differing from the ones the workdir was prepared with used to be
    ignored silently (data.npz is reused); the same sources given as relative paths resume."""
    root, cfg, out = finished
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert runlog.read_experiment(out)["tokenizer"] == str(t5_tokenizer_dir.resolve())
    _bad(
        capsys,
        _run(cfg, out, data_dir, tiny_t5_dir),
        f"tokenized with {t5_tokenizer_dir.resolve()}, not {tiny_t5_dir}",
        "rm -r",
    )
    other = tmp_path / "data"
    shutil.copytree(data_dir / "rte", other / "rte")
    _bad(
        capsys,
        _run(cfg, out, other, t5_tokenizer_dir),
        f"drawn from data dir {data_dir.resolve()}, not {other.resolve()}",
        "rm -r",
    )
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    monkeypatch.chdir(root)
    rel = [
        os.path.relpath(p, root) for p in (cfg, out, data_dir, t5_tokenizer_dir / "spiece.model")
    ]
    assert _run(*rel) == 0
    assert capsys.readouterr().out.startswith("2 of 2 runs complete")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "CFG", "--max-steps", "0"], "--max-steps: '0' is not a positive integer"),
        (["run", "CFG", "--max-steps", "-3"], "'-3' is not a positive integer"),
        (["tracin", "EXP", "--mode", "foo"], "invalid choice: 'foo'"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_flag_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, argv, needle):
    cfg = write_config(tmp_path / "c")
    argv = [str(cfg) if a == "CFG" else str(tmp_path / "e") if a == "EXP" else a for a in argv]
    with pytest.raises(SystemExit) as exc:
        main([*argv[:2], "--out", str(tmp_path / "out"), *argv[2:]] if argv[0] == "run" else argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_tracked_examples_from_the_train_split_stay_out_of_pool_and_warmup(
    tmp_path, data_dir, t5_tokenizer_dir
):
    from finetune.config import ExperimentConfig, WarmupConfig
    from finetune.trainer import prepare_experiment

    # RTE train has 2490 examples: this draw leaves no room for overlap to hide by chance.
    config = ExperimentConfig(
        **tiny_fields(n_train=2400, n_test=80, test_split="train"),
        warmup=WarmupConfig(steps=1, batch_size=2, n_examples=10),
    )
    info = prepare_experiment(
        config, tmp_path / "same", data_dir=data_dir, tokenizer=str(t5_tokenizer_dir)
    )
    pool, test, warm = (set(info[k]) for k in ("pool_ids", "test_ids", "warmup_ids"))
    assert (len(pool), len(test), len(warm)) == (2400, 80, 10)
    assert not pool & test and not warm & test and not warm & pool
    too_many = ExperimentConfig(**tiny_fields(n_train=2420, n_test=80, test_split="train"))
    with pytest.raises(ValueError, match=r"n_train=2420 \+ n_test=80 \(same split\) exceeds"):
        prepare_experiment(
            too_many, tmp_path / "big", data_dir=data_dir, tokenizer=str(t5_tokenizer_dir)
        )


def _one_error_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_truncated_data_npz_exits_2_naming_it(
    finished, tmp_path, data_dir, t5_tokenizer_dir, capsys
):
    root, cfg, out = finished
    work = tmp_path / "out"
    shutil.copytree(out, work)
    for run in ("run_000", "run_001"):  # incomplete: the runs need data.npz again
        (work / run / "meta.json").unlink()
    data = work / E.DATA_FILE
    data.write_bytes(data.read_bytes()[:400])
    before = {p: p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}
    _bad(
        capsys, _run(cfg, work, data_dir, t5_tokenizer_dir), str(data), "delete it", "finetune run"
    )
    assert {p: p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()} == before


def test_unparsable_spiece_model_exits_2_naming_it(tmp_path, data_dir, capfd):
    """Random bytes used to print a transformers log line, then advice to install tiktoken."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "spiece.model").write_bytes(np.random.default_rng(0).bytes(5000))
    cfg = write_config(tmp_path / "c")
    code = _run(cfg, tmp_path / "out", data_dir, tok)
    err = capfd.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert f"{tok / 'spiece.model'}: not a SentencePiece model" in err and "tiktoken" not in err
    assert not (tmp_path / "out").exists()


# orbax leaves its cancelled array-read coroutines behind when a restore fails (not ours).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_exits_2_naming_it(
    finished, tmp_path, data_dir, t5_tokenizer_dir, capsys
):
    """A corrupted checkpoint used to print about 1.5 kB of tensorstore spec and no fix."""
    _, cfg, out = finished
    work = tmp_path / "out"
    shutil.copytree(out, work)
    for run in ("run_000", "run_001"):  # stopped at step 3: resumes from the step-2 checkpoint
        (work / run / "meta.json").unlink()
        shutil.rmtree(work / run / "checkpoints" / "4")
    for f in (work / "run_000" / "checkpoints" / "2" / "trainable").rglob("d/*"):
        f.write_bytes(b"\0" * 100)
    code = _run(cfg, work, data_dir, t5_tokenizer_dir)
    err = capsys.readouterr().err
    assert code == 2, err
    line = _one_error_line(err)
    assert line.startswith(f"error: {work / 'run_000' / 'checkpoints' / '2'}: cannot restore")
    assert f"delete {work / 'run_000'} and run `finetune run` again" in line
    assert "tensorstore_spec" not in line and len(line) < 1000
    gc.collect()  # collect orbax's abandoned coroutines here, under this test's filter


def test_the_hub_is_offline_when_unreachable(monkeypatch):
    """Without network and the offline variables, every hub request used to be retried five
    times with a logged warning (minutes, hundreds of lines) before the error."""
    import socket

    from finetune import cli

    calls = []

    def refuse(address, timeout=None):
        calls.append(address)
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)  # never the real network
    for var in (*cli._OFFLINE_VARS, "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert cli._offline_without_hub()
    assert calls == [("huggingface.co", 443)]
    assert all(os.environ[v] == "1" for v in cli._OFFLINE_VARS)
    assert not cli._offline_without_hub()  # already offline: no second probe
    assert len(calls) == 1
    for var in cli._OFFLINE_VARS:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # a proxy may reach the hub
    assert not cli._offline_without_hub() and len(calls) == 1


def test_debug_shows_the_traceback_before_the_error(tmp_path, capsys, monkeypatch):
    argv = ["run", str(tmp_path / "nope")]
    _bad(capsys, main(argv), "not found")
    for full, env in ((["--debug", *argv], None), ([*argv, "--debug"], None), (argv, "1")):
        if env:
            monkeypatch.setenv("SIMFLUENCE_DEBUG", env)
        code = main(full)
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith("Traceback (most recent call last):"), err
        assert err.strip().splitlines()[-1].startswith("error: ") and "not found" in err


def test_set_overrides_reach_the_run_and_are_recorded(
    finished, data_dir, t5_tokenizer_dir, capsys, monkeypatch
):
    """`--set` changes the config run_experiment trains and is recorded in a fresh
    experiment.json; an existing workdir is refused when an override changes a training field
    (as a changed config.py is), not when it changes only a TracIn-CP setting."""
    from finetune import trainer
    from finetune.config import apply_overrides, load_experiment_config

    root, cfg, out = finished
    before = (out / "run_000" / "losses.npy").read_bytes()
    sets = ["--set", "learning_rate=0.5", "--set", "steps=5"]
    _bad(capsys, _run(cfg, out, data_dir, t5_tokenizer_dir, *sets), "different config", "steps")
    assert (out / "run_000" / "losses.npy").read_bytes() == before
    config, _ = load_experiment_config(cfg)
    other = apply_overrides(config, ["tracin_mode=projected", "tracin_chunk_size=2"])
    assert trainer.check_workdir(other, out) is not None  # accepted: only TracIn-CP differs

    seen = {}

    def fake_run_experiment(config, out, **kw):
        seen.update(config=config, overrides=kw["overrides"])
        return {"complete": [], "interrupted": False, "seconds": 0.0}

    monkeypatch.setattr(trainer, "run_experiment", fake_run_experiment)
    assert _run(cfg, root / "fresh", data_dir, t5_tokenizer_dir, *sets) == 0
    assert (seen["config"].learning_rate, seen["config"].steps) == (0.5, 5)
    assert seen["overrides"] == ["learning_rate=0.5", "steps=5"]
    monkeypatch.undo()
    fresh = root / "fresh2"
    trainer.prepare_experiment(
        seen["config"], fresh, data_dir=data_dir, tokenizer=str(t5_tokenizer_dir),
        overrides=seen["overrides"],
    )  # fmt: skip
    info = runlog.read_experiment(fresh)
    assert info["overrides"] == ["learning_rate=0.5", "steps=5"]
    assert (info["config"]["learning_rate"], info["config"]["steps"]) == (0.5, 5)
    with pytest.raises(E.ExperimentError, match=r"different config \(fields \['learning_rate'"):
        trainer.check_workdir(config, fresh)  # the config.py without the overrides


def test_bad_set_is_one_line_exit_2_writing_nothing(tmp_path, data_dir, t5_tokenizer_dir, capsys):
    cfg = write_config(tmp_path / "c")
    for item, needle in [("nope=1", "has no field 'nope'"), ("steps=x", "'x' is not an integer")]:
        code = _run(cfg, tmp_path / "out", data_dir, t5_tokenizer_dir, "--set", item)
        _bad(capsys, code, f"--set {item}", needle)
    assert not (tmp_path / "out").exists()


def test_run_tracin_refuses_before_training_what_cannot_fit(
    tmp_path, data_dir, t5_tokenizer_dir, capsys, monkeypatch
):
    from finetune import tracin
    from finetune.config import load_experiment_config

    cfg = write_config(tmp_path / "c")
    config, _ = load_experiment_config(cfg)
    est = tracin.check_config_memory(config, device_bytes=10**15)
    monkeypatch.setattr(tracin, "device_memory", lambda: (est["total"] - 1, "the fake device"))
    code = _run(cfg, tmp_path / "out", data_dir, t5_tokenizer_dir, "--tracin")
    _bad(capsys, code, "TracIn-CP in exact mode needs at least", "the fake device has")
    sets = ["--set", "tracin_mode=projected", "--set", "tracin_proj_dim=5000"]
    code = _run(cfg, tmp_path / "out", data_dir, t5_tokenizer_dir, "--tracin", *sets)
    _bad(capsys, code, "tracin_proj_dim=5000 exceeds the 1368 trainable parameters")
    assert not (tmp_path / "out").exists()  # refused before anything was prepared or trained


def test_tracin_estimate_prints_the_refusal_without_a_device(tmp_path, capsys):
    from finetune import tracin
    from finetune.config import load_experiment_config

    cfg = write_config(tmp_path / "c")
    est = tracin.check_config_memory(load_experiment_config(cfg)[0], device_bytes=10**15)
    small = est["total"] - 1
    assert main(["tracin-estimate", str(cfg), "--device-memory", str(small)]) == 0
    out = capsys.readouterr().out
    total = next(x.split() for x in out.splitlines() if x.strip().startswith("total"))
    assert total[1:] == [f"{est['total'] / 1e9:.3f}", "GB"]
    refusal = next(x for x in out.splitlines() if x.startswith("refused: error: "))
    assert "TracIn-CP in exact mode needs at least" in refusal
    assert f"(--device-memory {float(small):g}) has" in refusal
    assert main(["tracin-estimate", str(cfg), "--device-memory", "1e15", "--set", "n_test=2"]) == 0
    assert "fits" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["tracin-estimate", str(cfg), "--device-memory", "-1"])
    _bad(capsys, e.value.code, "--device-memory", "'-1' is not a positive number")
    assert not (tmp_path / "c" / "output").exists()
