"""The pure parts of scripts/bench_*.py: flag validation, exit codes, backend sizing, JSON.

Nothing here compiles a benchmark step: bad flags fail at parse time, failing points are
faked by monkeypatching the point runner, and the TracIn JSON test stubs the dot products.
"""

import argparse
import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = REPO_ROOT / "scripts"


@pytest.fixture
def load(monkeypatch):
    """Import a scripts/ module by name with scripts/ and the repository root on sys.path."""
    monkeypatch.setattr(sys, "path", [str(SCRIPTS), str(REPO_ROOT), *sys.path])

    def _load(name):
        return importlib.import_module(name)

    return _load


BAD_FLAGS = [
    ("bench_model", ["--iters", "0"], "--iters"),
    ("bench_model", ["--batches", "0"], "--batches"),
    ("bench_model", ["--batches", "8,x"], "--batches"),
    ("bench_model", ["--param-dtype", "float8"], "--param-dtype"),
    ("bench_model", ["--input-len", "0"], "--input-len"),
    ("bench_model", ["--dropout", "1"], "--dropout"),
    ("bench_model", ["--dropout", "-0.1"], "--dropout"),
    ("bench_model_torch", ["--iters", "0"], "--iters"),
    ("bench_model_torch", ["--warmup", "-1"], "--warmup"),
    ("bench_fit", ["--n-train", "0"], "--n-train"),
    ("bench_fit", ["--n-test", "0"], "--n-test"),
    ("bench_fit", ["--batch", "0"], "--batch"),
    ("bench_fit", ["--runs", "0"], "--runs"),
    ("bench_fit", ["--steps", "0"], "--steps"),
    ("bench_fit", ["--rollout-steps", "0"], "--rollout-steps"),
    ("bench_fit", ["--l2-a", "-1"], "--l2-a"),
    ("bench_runs", ["--synthetic", "--steps", "0"], "--steps"),
    ("bench_runs", ["--synthetic", "--batch", "0"], "--batch"),
    ("bench_runs", ["--synthetic", "--n-test", "0"], "--n-test"),
    ("bench_runs", ["--synthetic", "--length-multiple", "0"], "--length-multiple"),
    ("bench_runs", ["--synthetic", "--tracked-buckets", "0"], "--tracked-buckets"),
    ("bench_runs", ["--synthetic", "--target-length", "1"], "--target-length"),
    ("bench_runs", ["--synthetic", "--method", "ia3", "--train-groups", "0"], "--train-groups"),
    ("bench_tracin", ["--checkpoints", "0"], "--checkpoints"),
    ("bench_tracin", ["--full-checkpoints", "0"], "--full-checkpoints"),
    ("bench_tracin", ["--input-len", "0"], "--input-len"),
    ("bench_tracin", ["--chunk-size", "0"], "--chunk-size"),
    ("bench_tracin", ["--json", "/nonexistent-dir-xyz/out.json"], "does not exist"),
    ("bench_tracin_torch", ["--n-examples", "0"], "--n-examples"),
]


# The first heavy step of each script after its flags are parsed: replaced by a raiser, so a
# flag that slips through validation fails the test at once instead of running the benchmark.
_WORK = {
    "bench_model": "run_point",
    "bench_model_torch": "run_point",
    "bench_runs": "init_model",
    "bench_tracin": "_bench",
    "bench_tracin_torch": "synthetic_tokens",
}


class _PastParsing(Exception):
    pass


def _raiser(*args, **kwargs):
    raise _PastParsing("the flags were accepted")


@pytest.mark.parametrize("script,argv,needle", BAD_FLAGS, ids=lambda x: str(x))
def test_bad_flag_is_a_one_line_error(load, monkeypatch, capsys, script, argv, needle):
    module = load(script)
    if script == "bench_fit":
        monkeypatch.setattr(module.demo_data, "synthetic_simulator", _raiser)
    else:
        monkeypatch.setattr(module, _WORK[script], _raiser)
    monkeypatch.setattr(module, "_run_torch", _raiser, raising=False)
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and needle in last


def test_positive_int_message_names_value_and_fix(load):
    args = load("_bench_args")
    with pytest.raises(argparse.ArgumentTypeError, match=r"'0': pass an integer >= 1"):
        args.positive_int("0")
    assert args.positive_int_list("8,32") == [8, 32]
    assert args.rate("0") == 0.0


def test_bench_model_exits_nonzero_when_a_point_fails(load, monkeypatch, capsys):
    bm = load("bench_model")

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bm, "run_point", boom)
    assert bm.main(["--no-baseline", "--methods", "full"]) == 1
    assert "FAILED: RuntimeError" in capsys.readouterr().out


def test_bench_model_torch_exits_nonzero_when_a_point_fails(load, monkeypatch, capsys):
    bt = load("bench_model_torch")

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bt, "run_point", boom)
    assert bt.main(["--methods", "full"]) == 1
    assert "FAILED: RuntimeError" in capsys.readouterr().out


def test_point_defaults_small_on_cpu_unchanged_on_gpu(load):
    pts = load("_t5_points")
    cpu = argparse.Namespace(input_len=None, warmup=None, iters=5, dtype=None)
    filled = pts.apply_backend_defaults(cpu, on_gpu=False)
    assert (cpu.input_len, cpu.warmup, cpu.iters, cpu.dtype) == (64, 1, 5, "float32")
    assert filled == ["input-len 64", "warmup 1", "dtype float32"]
    gpu = argparse.Namespace(input_len=None, warmup=None, iters=None, dtype=None)
    assert pts.apply_backend_defaults(gpu, on_gpu=True) == []
    assert (gpu.input_len, gpu.warmup, gpu.iters, gpu.dtype) == (256, 3, 10, "bfloat16")


def test_bench_model_ratio_columns(load):
    bm = load("bench_model")
    torch_out = (
        "  size batch method   ms/step     ex/s  peak GB\n"
        " small     8   full    921.30      8.7     1.72\n"
        " small     8    ia3  FAILED: RuntimeError: oom\n"
    )
    rows = bm.parse_torch_rows(torch_out)
    assert rows == {("small", 8, "full"): 8.7, ("small", 8, "ia3"): None}
    row = " small     8   full   scan    997.41     17.4       9.1     1.45     2.54        n/a"
    assert bm._ratio_cols(row, 8.7).split() == ["8.7", "2.00x"]
    assert bm._ratio_cols(row, None).split() == ["n/a", "n/a"]


def test_bench_runs_sizes_small_on_cpu_only_when_unset(load):
    br = load("bench_runs")
    args = argparse.Namespace(runs=8, steps=None, n_test=None, n_train=None, variants=None)
    filled = br.backend_sizes(args, on_cpu=True)
    assert (args.runs, args.steps, args.n_test, args.n_train) == (8, 4, 20, 200)
    assert "--runs 8" not in filled and "--steps 4" in filled
    args = argparse.Namespace(runs=None, steps=None, n_test=None, n_train=None, variants=None)
    assert br.backend_sizes(args, on_cpu=False) == []
    assert (args.runs, args.steps, args.n_test, args.n_train) == (32, 20, 100, 1000)
    assert args.variants == "together,nolog,single,baseline,vmapped"


def test_make_bench_passes_synthetic_to_bench_runs():
    text = (REPO_ROOT / "Makefile").read_text()
    target = text[text.index("\nbench:") :].split("\n\n")[0]
    lines = [x for x in target.splitlines() if "bench_runs.py" in x]
    assert lines and all("--synthetic" in x for x in lines)


def test_bench_tracin_torch_examples_default(load):
    bt = load("bench_tracin")
    assert bt.default_torch_examples(None, "cpu") > 0
    assert bt.default_torch_examples(None, "gpu") == 0
    assert bt.default_torch_examples(100, "gpu") == 100
    assert bt.default_torch_examples(0, "cpu") == 0


def test_bench_tracin_json_records_each_runs_checkpoints(load, monkeypatch, tmp_path):
    bt = load("bench_tracin")
    import jax.numpy as jnp

    import finetune.tracin

    monkeypatch.setattr(
        finetune.tracin,
        "compute_dots",
        lambda loss, tr, fr, pool, test, **kw: jnp.zeros(
            (test["inputs"].shape[0], pool["inputs"].shape[0])
        ),
    )
    out = tmp_path / "t.json"
    argv = ["--input-len", "8", "--target-len", "2", "--n-train", "2", "--n-test", "1"]
    argv += ["--checkpoints", "3", "--full-n-train", "2", "--full-n-test", "1"]
    argv += ["--full-checkpoints", "1", "--full-mode", "exact", "--torch-examples", "0"]
    bt.main([*argv, "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["ia3"]["checkpoints"] == 3
    assert res["full"]["checkpoints"] == 1


def test_bench_tracin_torch_prints_peak_rss(load, capsys):
    bt = load("bench_tracin_torch")
    res = bt.main(["--n-examples", "2", "--warmup", "0", "--input-len", "8", "--target-len", "2"])
    out = capsys.readouterr().out
    assert res["peak_rss_bytes"] > 0
    assert re.search(r"process peak RSS \d+\.\d\d GiB", out)
    assert f"[torch {res['torch']} cpu]" in out


def test_bench_fit_warm_is_a_median(load, monkeypatch):
    bf = load("bench_fit")
    times = iter([5.0, 1.0, 3.0])
    monkeypatch.setattr(bf, "_timed", lambda fn, *a, **k: (None, next(times)))
    assert bf._median_timed(3, None) == 3.0


@pytest.mark.parametrize("n, nb", [(30, 7), (30, 30), (12, 64)])
def test_bench_fit_blocked_cholesky_is_lapacks(load, n, nb):
    """The baseline's blocked Cholesky (any block size) equals numpy's LAPACK factor."""
    bf = load("bench_fit")
    rng = np.random.default_rng(n + nb)
    A = rng.standard_normal((n, n + 3))
    G = A @ A.T + 0.1 * np.eye(n)
    want = np.linalg.cholesky(G)
    G[np.triu_indices(n, 1)] = np.nan  # only the lower triangle may be read
    got = bf._blocked_cholesky(G, nb=nb)
    assert got is G  # in place: no second n x n copy
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_bench_fit_cli_peak_is_the_cli_processs_own(load):
    """The --cli peak is the CLI's VmHWM, not ru_maxrss, which starts at the forked parent's."""
    bf = load("bench_fit")
    ballast = np.ones(256 << 20, np.uint8)  # this process holds 256 MiB more while it forks
    wall, status, usage, hwm = bf._run_cli(["--help"])
    assert status == 0 and wall > 0
    assert hwm is not None and 0 < hwm < 192 << 20, hwm  # `simfluence --help` imports no jax
    # What the benchmark used to report: at least the parent's resident set, ballast included.
    assert usage.ru_maxrss * 1024 >= 256 << 20
    del ballast
