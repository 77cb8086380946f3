"""Live training metrics (TensorBoard, wandb, batch-log lines) and the runs' provenance.

The config is _tiny.TINY, as in test_cli_run (same network, optimizer and shapes), so in a full
test run its programs are already compiled in this process and these tests only execute them.
"""

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from finetune import metrics as M
from finetune import trainer
from finetune.cli import main
from simfluence import runlog

from ._tiny import run_argv, write_config

FILES = ("curriculum.npy", "losses.npy", "lr.npy", "metrics.jsonl")
RTOL = 1e-6  # event files store float32; the means are float64 of the float32 run files


def _means(out: Path):
    """Per step, over the runs: mean tracked loss [T+1], mean train loss [T], lr [T]."""
    runs = runlog.load_runs(out)
    test = np.mean([r.losses.astype(np.float64).mean(1) for r in runs], axis=0)
    train = np.mean(
        [
            [
                json.loads(x)["train_loss"]
                for x in (r.path / "metrics.jsonl").read_text().splitlines()
            ]
            for r in runs
        ],
        axis=0,
    )
    return test, train, runs[0].lr


@pytest.fixture(scope="module")
def logged(tmp_path_factory, data_dir, t5_tokenizer_dir):
    """One batch-mode call with TensorBoard every 3 steps; each log point is checked on disk
    as it happens (the run files are written only when the group ends)."""
    root = tmp_path_factory.mktemp("live")
    cfg, out = write_config(root / "tiny"), root / "out"
    seen = []

    class Probe(M.LiveMetrics):
        def log(self, step, **kw):
            super().log(step, **kw)
            events = M.read_scalars(self.runs_dir / M.TENSORBOARD_DIR / "runs_000-001")
            complete = (runlog.run_dir(self.runs_dir, 0) / "meta.json").is_file()
            seen.append((step, [s for s, _ in events["test/loss_mean"]], complete))

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer, "LiveMetrics", Probe)
    lines = []

    class Stderr:  # records each line and whether it was flushed before the next one
        def write(self, text):
            lines.append([text, False])

        def flush(self):
            lines[-1][1] = True

    mp.setattr(sys, "stderr", Stderr())
    try:
        argv = run_argv(cfg, out, data_dir, t5_tokenizer_dir, "--no-progress", "--log-every", "3")
        assert main(argv) == 0
    finally:
        mp.undo()
    return dict(root=root, cfg=cfg, out=out, seen=seen, lines=lines, argv=argv)


def test_event_files_are_written_while_the_group_trains(logged):
    # Steps 0 (before training), 3 (--log-every) and 4 (the last): each on disk when logged,
    # before any run of the group is complete.
    assert logged["seen"] == [(0, [0], False), (3, [0, 3], False), (4, [0, 3, 4], False)]


def test_event_scalars_match_the_run_files(logged):
    out = logged["out"]
    events = M.read_scalars(out / "tensorboard" / "runs_000-001")
    test, train, lr = _means(out)
    got = dict(events["test/loss_mean"])
    assert sorted(got) == [0, 3, 4]
    for step, value in got.items():
        np.testing.assert_allclose(value, test[step], rtol=RTOL)
    for tag, ref in (("train/loss", train), ("train/learning_rate", lr)):
        pairs = events[tag]
        assert [s for s, _ in pairs] == [3, 4], tag
        np.testing.assert_allclose([v for _, v in pairs], [ref[2], ref[3]], rtol=RTOL)
    rates = dict(events["perf/steps_per_second"])
    assert sorted(rates) == [3, 4] and all(v > 0 for v in rates.values())
    for s, v in events["perf/run_steps_per_second"]:
        np.testing.assert_allclose(v, 2 * rates[s], rtol=RTOL)


def test_batch_log_lines(logged):
    lines = logged["lines"]
    assert all(flushed for _, flushed in lines), lines
    text = [t for t, _ in lines]
    assert all(t.startswith("[tiny] ") and t.endswith("\n") and t.count("\n") == 1 for t in text)
    body = [t[len("[tiny] ") :].strip() for t in text]
    heads = [b.split(":")[0] for b in body]
    assert heads[:4] == ["data", "model", "group 1 of 1", "compile"], body
    test, train, lr = _means(logged["out"])
    steps = [b for b in body if b.startswith("runs 0-1 step ")]
    assert [s.split(":")[0] for s in steps] == ["runs 0-1 step 3/4", "runs 0-1 step 4/4"]
    for s, t in zip(steps, (3, 4), strict=True):
        assert f"train loss {train[t - 1]:.4f}, test loss {test[t]:.4f}" in s, s
    assert body[-1].startswith("runs 0-1 complete: ")


def test_experiment_and_meta_record_provenance(logged):
    out = logged["out"]
    prov = runlog.read_experiment(out)["provenance"]
    assert prov["packages"]["jax"] == __import__("jax").__version__
    assert prov["device"]["count"] == __import__("jax").device_count()
    for r in runlog.load_runs(out):
        meta = r.meta["provenance"]
        assert meta["argv"] == sys.argv  # the process's command line (pytest's, here)
        assert meta["device"] == prov["device"]


class _FakeWandb(types.ModuleType):
    """Records what `finetune.metrics` gives wandb."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], finished=False)
        run.log = lambda data, step: run.logged.append((step, dict(data)))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_wandb_and_the_progress_bar_log_the_same_without_changing_a_bit(
    logged, data_dir, t5_tokenizer_dir, monkeypatch, capsys
):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = logged["root"] / "wandb"
    argv = run_argv(logged["cfg"], out, data_dir, t5_tokenizer_dir, "--report-to", "wandb")
    assert main([*argv, "--log-every", "1"]) == 0
    # Logging at every step (a host sync each step) leaves every run file as it was.
    for r in range(2):
        for name in FILES:
            a = (runlog.run_dir(out, r) / name).read_bytes()
            assert a == (runlog.run_dir(logged["out"], r) / name).read_bytes(), name
    assert not (out / "tensorboard").exists()
    [run] = fake.runs
    assert run.finished and run.kwargs["name"] == "tiny runs_000-001"
    assert run.kwargs["config"]["steps"] == 4
    test, train, lr = _means(out)
    assert [s for s, _ in run.logged] == [0, 1, 2, 3, 4]
    assert run.logged[0][1] == pytest.approx({"test/loss_mean": test[0]}, rel=1e-12)
    keys = {"test/loss_mean", "train/loss", "train/learning_rate", "perf/steps_per_second"}
    for step, data in run.logged[1:]:
        assert keys | {"perf/run_steps_per_second"} == set(data)
        np.testing.assert_allclose(data["test/loss_mean"], test[step], rtol=1e-12)
        np.testing.assert_allclose(data["train/loss"], train[step - 1], rtol=1e-12)
        np.testing.assert_allclose(data["train/learning_rate"], lr[step - 1], rtol=1e-12)
    # The progress bar (this call had one) shows the current mean losses.
    err = capsys.readouterr().err
    assert f"train loss {train[-1]:.4f}, test loss {test[-1]:.4f}" in err


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--report-to", "wandb"], "--report-to wandb: wandb is not installed; pip install wandb"),
        (["--report-to", "tensorboard,foo"], "unknown 'foo'; choose from tensorboard, wandb"),
        (["--report-to", "none,wandb"], "'none' cannot be combined"),
    ],
)
def test_bad_report_to_is_one_line_exit_2_before_anything(
    tmp_path, data_dir, t5_tokenizer_dir, monkeypatch, capsys, flags, needle
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, even where it is
    cfg, out = write_config(tmp_path / "c"), tmp_path / "out"
    assert main(run_argv(cfg, out, data_dir, t5_tokenizer_dir, "--no-progress", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not out.exists()
