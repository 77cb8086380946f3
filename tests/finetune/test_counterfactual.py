"""`finetune counterfactual EXP` on a tiny experiment: bitwise agreement with the base runs,
files and meta, resume, isolation from EXP's own runs, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune.cli import main
from finetune.config import ExperimentConfig, WarmupConfig
from finetune.counterfactual import run_counterfactuals
from finetune.trainer import run_experiment
from simfluence import runlog

from ._tiny import tiny_fields

# 4 runs in EXP groups [0, 1, 2] and [3] (vmap widths 3 and 1). The 5 proposals train in groups
# [0, 1, 2], [3, pad, pad] (width of their base runs' group: 3) and [4] (base run 3: width 1).
# TINY's length_multiple=32 is one padded length: a proposal's batches pad as its base run's did.
CONFIG = ExperimentConfig(
    **tiny_fields(
        name="tiny_cf",
        num_runs=4,
        runs_together=3,
        checkpoint_steps=(4,),  # EXP's runs save one; counterfactual runs must not
        warmup=WarmupConfig(steps=2, batch_size=2, n_examples=4),
    )
)
WIDTHS = [3, 3, 3, 3, 1]  # the vmap width each proposal trains in
FILES = ("curriculum.npy", "losses.npy", "lr.npy", "metrics.jsonl", "meta.json")


def _proposals(exp: Path) -> tuple[list[dict], np.ndarray]:
    """Five hand-made proposals: a base run's curriculum as is (ids 1 and 4; 1 on another lane
    of its vmapped group than run 0 had), with one slot changed (0 and 3), and with its batches
    in reverse order (2)."""
    base = {r.index: r.curriculum for r in runlog.load_runs(exp)}

    def changed(c):
        c = c.copy()
        c[0, 0] = (c[0, 0] + 1) % CONFIG.n_train
        return c

    rows = [
        (1, "swap", changed(base[1])),
        (0, "same", base[0]),
        (2, "permute", base[2][::-1]),
        (0, "swap", changed(base[0])),
        (3, "same", base[3]),
    ]
    proposals = [
        dict(
            id=p, kind=kind, base_run=b, test=p % CONFIG.n_test, k=1, removed=[], run=f"run_{p:03d}"
        )
        for p, (b, kind, _) in enumerate(rows)
    ]
    return proposals, np.stack([c for *_, c in rows]).astype(np.int32)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def cf(tmp_path_factory, data_dir, t5_tokenizer_dir):
    """EXP (4 runs), its own run files, the proposals, and one uninterrupted counterfactual call."""
    exp = tmp_path_factory.mktemp("cf") / "exp"
    run_experiment(CONFIG, exp, data_dir=data_dir, tokenizer=str(t5_tokenizer_dir), progress=False)
    own = {k: v for k, v in _tree(exp).items() if k.startswith("run_")}
    proposals, curricula = _proposals(exp)
    runlog.write_proposals(exp, proposals, curricula, header={"simulator": "by hand"})
    result = run_counterfactuals(exp, progress=False)
    return dict(exp=exp, own=own, proposals=proposals, curricula=curricula, result=result)


def _cf_run(exp: Path, p: int) -> Path:
    return runlog.counterfactual_dir(exp) / f"run_{p:03d}"


def _load(path: Path, name: str) -> np.ndarray:
    return np.load(path / name)


def test_every_proposal_trains_once(cf):
    assert cf["result"]["complete"] == cf["result"]["trained"] == [0, 1, 2, 3, 4]
    assert not cf["result"]["interrupted"] and cf["result"]["proposals"] == 5
    names = sorted(p.name for p in runlog.counterfactual_dir(cf["exp"]).iterdir())
    # The padding of group [3, pad, pad] trained but left no folder.
    assert names == ["proposals.json", "proposals.npz", *(f"run_{p:03d}" for p in range(5))]


def test_step0_losses_equal_the_base_runs_bitwise(cf):
    exp = cf["exp"]
    for p, prop in enumerate(cf["proposals"]):
        base = _load(exp / f"run_{prop['base_run']:03d}", "losses.npy")
        mine = _load(_cf_run(exp, p), "losses.npy")
        assert mine[0].tobytes() == base[0].tobytes(), p


def test_the_base_curriculum_reproduces_the_base_run_bitwise(cf):
    """Same start, optimizer, schedule, seeds and vmap width: proposals 1 and 4 (base runs 0 and
    3, the latter in EXP's narrower last group) give their base run's files byte for byte."""
    exp = cf["exp"]
    for p, r in ((1, 0), (4, 3)):
        for name in ("curriculum.npy", "losses.npy", "lr.npy", "metrics.jsonl"):
            assert (_cf_run(exp, p) / name).read_bytes() == (
                exp / f"run_{r:03d}" / name
            ).read_bytes(), (p, name)
        mine = json.loads((_cf_run(exp, p) / "meta.json").read_text())
        theirs = json.loads((exp / f"run_{r:03d}" / "meta.json").read_text())
        assert mine["accuracy_end"] == theirs["accuracy_end"]
    # The changed curricula trained something else (the proposal, not the base run).
    for p, r in ((0, 1), (2, 2), (3, 0)):
        mine, base = _load(_cf_run(exp, p), "losses.npy"), _load(exp / f"run_{r:03d}", "losses.npy")
        assert not np.array_equal(mine[-1], base[-1]), p


def test_files_and_meta(cf):
    exp, curricula = cf["exp"], cf["curricula"]
    sha = runlog.read_proposals(exp)["curricula_sha256"]
    for p, prop in enumerate(cf["proposals"]):
        d = _cf_run(exp, p)
        cur = _load(d, "curriculum.npy")
        assert cur.dtype == np.int32 and np.array_equal(cur, curricula[p])
        base = exp / f"run_{prop['base_run']:03d}"
        assert (d / "lr.npy").read_bytes() == (base / "lr.npy").read_bytes()
        assert len((d / "metrics.jsonl").read_text().splitlines()) == CONFIG.steps
        assert not (d / "checkpoints").exists()
        meta = json.loads((d / "meta.json").read_text())
        expected = dict(
            run=p,
            proposal_id=p,
            kind=prop["kind"],
            base_run=prop["base_run"],
            test=prop["test"],
            proposals_sha256=sha,
            curriculum_seed=None,
            status="complete",
            resumed_from_step=0,
            runs_together=WIDTHS[p],
            checkpoint_steps=[],
            steps=CONFIG.steps,
            batch_size=CONFIG.batch_size,
        )
        assert {k: meta[k] for k in expected} == expected
        assert 0 <= meta["accuracy_end"] <= 1


def test_not_mixed_into_the_experiments_runs(cf):
    exp = cf["exp"]
    assert {k: v for k, v in _tree(exp).items() if k.startswith("run_")} == cf["own"]
    assert [r.index for r in runlog.load_runs(exp)] == [0, 1, 2, 3]
    runs = runlog.load_counterfactual_runs(exp)
    assert [r.index for r in runs] == [0, 1, 2, 3, 4]
    for r in runs:
        assert np.array_equal(r.curriculum, cf["curricula"][r.index])
        assert r.meta["proposal_id"] == r.index


def test_resume_retrains_incomplete_groups_bitwise(cf, tmp_path, capsys):
    """Runs 1 (group [0, 1, 2]) and 3 (padded group [3, pad, pad]) lost their final files: only
    they are written again, byte for byte; the complete members are not rewritten."""
    exp = tmp_path / "exp"
    shutil.copytree(cf["exp"], exp)
    for p in (1, 3):
        for name in ("meta.json", "losses.npy", "metrics.jsonl"):
            (_cf_run(exp, p) / name).unlink()
    kept = {p: (_cf_run(exp, p) / "meta.json").read_bytes() for p in (0, 2, 4)}
    capsys.readouterr()
    assert main(["counterfactual", str(exp), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"5 of 5 counterfactual runs complete in {runlog.counterfactual_dir(exp)} ("
    ), out
    for p in range(5):
        for name in FILES[:-1]:
            assert (_cf_run(exp, p) / name).read_bytes() == (
                _cf_run(cf["exp"], p) / name
            ).read_bytes(), (p, name)
    for p, meta in kept.items():
        assert (_cf_run(exp, p) / "meta.json").read_bytes() == meta, p
    # Everything complete: a second call trains nothing and writes nothing.
    before = _tree(exp)
    again = run_counterfactuals(exp, progress=False)
    assert again["trained"] == [] and again["complete"] == [0, 1, 2, 3, 4]
    assert _tree(exp) == before


def test_max_steps_trains_whole_groups_then_continues(cf, tmp_path, capsys):
    """No checkpoints: --max-steps trains the whole groups it covers and refuses one that
    covers none; the continued call ends with the uninterrupted call's files."""
    exp = tmp_path / "exp"
    shutil.copytree(cf["exp"], exp)
    for p in range(5):
        shutil.rmtree(_cf_run(exp, p))
    before = _tree(exp)
    _bad(
        capsys,
        main(["counterfactual", str(exp), "--no-progress", "--max-steps", "3"]),
        "--max-steps 3 is too few: counterfactual runs 0-2 continue from step 0",
        "give --max-steps 4 or more",
    )
    assert _tree(exp) == before
    assert main(["counterfactual", str(exp), "--no-progress", "--max-steps", "9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stopped after --max-steps 9; 4 of 5 counterfactual runs complete")
    assert "1 not started (run the same command to continue)" in out
    assert [r.index for r in runlog.load_counterfactual_runs(exp)] == [0, 1, 2, 3]
    assert not _cf_run(exp, 4).exists()
    assert main(["counterfactual", str(exp), "--no-progress"]) == 0
    for p in range(5):
        for name in FILES[:-1]:
            assert (_cf_run(exp, p) / name).read_bytes() == (
                _cf_run(cf["exp"], p) / name
            ).read_bytes(), (p, name)


def _bad(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def _repropose(exp, **change):
    proposals, curricula = _proposals(exp)
    if "base_run" in change:
        proposals[1]["base_run"] = change["base_run"]
    if "shape" in change:
        steps, batch = change["shape"]
        curricula = np.resize(curricula, (5, steps, batch)) % CONFIG.n_train
    if "curriculum" in change:
        curricula[4, 0, 0] = (curricula[4, 0, 0] + 1) % CONFIG.n_train
    runlog.write_proposals(exp, proposals, curricula)


def _no_config(exp):
    info = runlog.read_experiment(exp)
    del info["config"]
    runlog.write_experiment(exp, info)


def _stale_curriculum(exp):
    path = _cf_run(exp, 2) / "curriculum.npy"
    np.save(path, np.load(path)[::-1])


def _other_experiment(exp):
    info = runlog.read_experiment(exp)
    info["note"] = "edited after proposing"
    runlog.write_experiment(exp, info)


BAD = {
    "proposals of another experiment.json": (
        _other_experiment,
        ["proposed for another experiment.json", "propose again"],
    ),
    "no proposals": (
        lambda exp: shutil.rmtree(runlog.counterfactual_dir(exp)),
        ["proposals.json not found", "run `simfluence counterfactual propose"],
    ),
    "no config": (_no_config, ["experiment.json has no 'config'", "finetune run"]),
    "no data": (
        lambda exp: (exp / "data.npz").unlink(),
        ["data.npz not found", "not prepared by finetune run"],
    ),
    "no warm-up": (
        lambda exp: shutil.rmtree(exp / "warmup"),
        ["warmup not found", "never train it", "finetune run CONFIG --out"],
    ),
    "other steps": (
        lambda exp: _repropose(exp, shape=(5, 2)),
        ["proposals.npz: proposal curricula have 5 steps of 2 examples", "steps=4", "propose"],
    ),
    "other batch": (
        lambda exp: _repropose(exp, shape=(4, 3)),
        ["have 4 steps of 3 examples", "batch_size=2", "propose again"],
    ),
    "base run missing": (
        lambda exp: _repropose(exp, base_run=7),
        ["proposal 1 has base_run 7, missing in", "propose again"],
    ),
    "base run incomplete": (
        lambda exp: (exp / "run_001" / "meta.json").unlink(),
        ["proposal 0 has base_run 1, incomplete in", "finetune run"],
    ),
    "stale curriculum": (
        _stale_curriculum,
        ["run_002 holds another curriculum than proposal 2", "propose again"],
    ),
    "stale proposals": (
        lambda exp: _repropose(exp, curriculum=True),
        ["run_000 was trained for other proposals (proposals_sha256", "propose again"],
    ),
    "stray run": (
        lambda exp: shutil.copytree(_cf_run(exp, 4), _cf_run(exp, 9)),
        ["run_009 is not one of the 5 proposals", "delete"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_writing_nothing(cf, tmp_path, capsys, case):
    exp = tmp_path / "exp"
    shutil.copytree(cf["exp"], exp)
    (_cf_run(exp, 1) / "meta.json").unlink()  # work left: nothing must start
    breaks, needles = BAD[case]
    breaks(exp)
    before = _tree(exp)
    _bad(capsys, main(["counterfactual", str(exp), "--no-progress"]), *needles)
    assert _tree(exp) == before


def test_not_an_experiment_exits_2(tmp_path, capsys):
    _bad(capsys, main(["counterfactual", str(tmp_path / "nope")]), str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()


def test_help_loads_no_jax_and_the_export_resolves():
    code = """
import sys
from finetune.cli import main
try:
    main(["counterfactual", "--help"])
except SystemExit as e:
    assert e.code == 0, e.code
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
    assert "--max-steps" in out.stdout and "EXP" in out.stdout
    import finetune

    assert finetune.run_counterfactuals is run_counterfactuals
