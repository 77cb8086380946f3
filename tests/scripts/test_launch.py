"""The launch scripts against fake `gcloud`, `ssh` and `make` executables that record their argv.

Each script runs with a PATH holding only the fakes and the few real tools it needs (bash, git,
tar...), so no test can reach a real cloud, host or make target. submit.sh and worker.sh are
copied into a throw-away git repository in tmp_path with one config, runs/demo.
"""

import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBMIT = "scripts/tpu/submit.sh"
WORKER = "scripts/tpu/worker.sh"
LAUNCH = "scripts/launch_multihost.sh"
_TOOLS = (
    "bash",
    "sh",
    "env",
    "git",
    "tar",
    "gzip",
    "sed",
    "dirname",
    "basename",
    "mkdir",
    "rm",
    "touch",
    "sha256sum",
    "cut",
)
_LIBTPU = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# Records its argv (one shell-quoted line per call); `describe` answers from $FAKE_TPU_STATE
# (absent: fails like gcloud does for an unknown TPU); `scp` keeps a copy of the tarball;
# `storage ls` succeeds when $FAKE_BUCKET_EXISTS is set.
_FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf -v line '%q ' "$@"; echo "$line" >> "$FAKE_LOG/gcloud.log"  # one write: atomic
case "$*" in
  *"tpu-vm describe"*)
    if [[ -n ${FAKE_TPU_STATE:-} ]]; then printf '%s\t%s\n' "$FAKE_TPU_STATE" v4-8; exit 0; fi
    echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND" >&2; exit 1 ;;
  *"tpu-vm scp"*) /bin/cp "$5" "$FAKE_LOG/shipped.tar.gz" ;;
  *"storage ls"*) [[ -n ${FAKE_BUCKET_EXISTS:-} ]] || exit 1 ;;
esac
exit 0
"""
# Records argv and the distributed switch; exits with $FAKE_MAKE_RC.
_FAKE_MAKE = r"""#!/usr/bin/env bash
printf -v line '%q ' "$@"; echo "$line" >> "$FAKE_LOG/make.log"  # one write: atomic
echo "SIMFLUENCE_DISTRIBUTED=${SIMFLUENCE_DISTRIBUTED:-}" >> "$FAKE_LOG/make.env"
exit "${FAKE_MAKE_RC:-0}"
"""
_FAKE_SSH = r"""#!/usr/bin/env bash
printf -v line '%q ' "$@"; echo "$line" >> "$FAKE_LOG/ssh.log"  # one write: atomic
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path):
    """A git repo with the scripts and runs/demo, fake executables, and a minimal PATH."""
    repo = tmp_path / "repo"
    for script in (SUBMIT, WORKER, LAUNCH):
        (repo / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / script, repo / script)
    (repo / "runs" / "demo").mkdir(parents=True)
    (repo / "runs" / "demo" / "config.py").write_text("STEPS = 10\n")
    (repo / "Makefile").write_text("runs:\n\ttrue\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)

    tools = tmp_path / "tools"
    tools.mkdir()
    for name in _TOOLS:
        found = shutil.which(name)
        assert found, f"{name} is needed to run the launch scripts"
        (tools / name).symlink_to(found)
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    _write_exe(fakes / "gcloud", _FAKE_GCLOUD)
    _write_exe(fakes / "make", _FAKE_MAKE)
    _write_exe(fakes / "ssh", _FAKE_SSH)
    log = tmp_path / "log"
    log.mkdir()
    env = {
        "PATH": f"{fakes}:{tools}",
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path),
        "FAKE_LOG": str(log),
    }
    (tmp_path / "home").mkdir()
    return {"repo": repo, "log": log, "env": env, "tools": tools, "fakes": fakes}


def _run(sandbox, script, *args, env=None, without=(), timeout=60):
    full_env = {**sandbox["env"], **(env or {})}
    if without:  # drop fakes (e.g. gcloud) from PATH
        kept = sandbox["fakes"].parent / "kept"
        kept.mkdir(exist_ok=True)
        for fake in sandbox["fakes"].iterdir():
            if fake.name not in without and not (kept / fake.name).exists():
                (kept / fake.name).symlink_to(fake)
        full_env["PATH"] = f"{kept}:{sandbox['tools']}"
    return subprocess.run(
        ["bash", str(sandbox["repo"] / script), *args],
        cwd=sandbox["repo"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _calls(sandbox, name="gcloud"):
    log = sandbox["log"] / f"{name}.log"
    if not log.exists():
        return []
    return [shlex.split(line) for line in log.read_text().splitlines()]


_BASE = ["--tpu", "sim-v4", "--zone", "us-central2-b", "--config", "runs/demo"]
_ZONE = ["--zone", "us-central2-b"]


def _expected_tail(out="gs://bucket/exp", target="runs"):
    setup = (
        "mkdir -p simfluence && tar -xzf simfluence-src.tar.gz -C simfluence"
        f" && bash simfluence/scripts/tpu/worker.sh setup --libtpu-index {_LIBTPU}"
    )
    work = (
        f"bash simfluence/scripts/tpu/worker.sh run --target {target} --config runs/demo"
        f" --out {out}"
    )
    return [
        ["compute", "tpus", "tpu-vm", "ssh", "sim-v4", *_ZONE, "--worker=all", "--command", setup],
        ["compute", "tpus", "tpu-vm", "ssh", "sim-v4", *_ZONE, "--worker=all", "--command", work],
    ]


def _check_scp(call, tmp_dir):
    assert call[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    tarball = Path(call[4])
    assert tarball.parent == tmp_dir and tarball.name.endswith(".tar.gz")
    assert call[5:] == ["sim-v4:simfluence-src.tar.gz", *_ZONE, "--worker=all"]
    assert not tarball.exists(), "the local tarball is removed when the script ends"


_DESCRIBE = [
    "compute",
    "tpus",
    "tpu-vm",
    "describe",
    "sim-v4",
    *_ZONE,
    "--format=value(state,acceleratorType)",
]


def test_creates_an_absent_tpu_then_ships_installs_and_runs(sandbox, tmp_path):
    # An uncommitted edit of a tracked file must reach the workers.
    (sandbox["repo"] / "runs" / "demo" / "config.py").write_text("STEPS = 20\n")
    result = _run(sandbox, SUBMIT, *_BASE, "--out", "gs://bucket/exp", "--create")
    assert result.returncode == 0, result.stderr
    calls = _calls(sandbox)
    assert calls[0] == _DESCRIBE
    assert calls[1] == [
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "sim-v4",
        *_ZONE,
        "--accelerator-type",
        "v4-8",
        "--version",
        "tpu-ubuntu2204-base",
    ]
    _check_scp(calls[2], tmp_path)
    assert calls[3:] == _expected_tail()
    with tarfile.open(sandbox["log"] / "shipped.tar.gz") as tar:
        names = set(tar.getnames())
        config = tar.extractfile("runs/demo/config.py").read().decode()
    assert {"runs/demo/config.py", WORKER, SUBMIT, "Makefile"} <= names
    assert config == "STEPS = 20\n"
    # The user's checkout is untouched (no stash entry, the edit still there).
    stash = subprocess.run(
        ["git", "-C", str(sandbox["repo"]), "stash", "list"], capture_output=True, text=True
    )
    assert stash.stdout == ""
    assert (sandbox["repo"] / "runs" / "demo" / "config.py").read_text() == "STEPS = 20\n"


def test_reuses_a_ready_tpu_and_passes_project_target_and_make_vars(sandbox, tmp_path):
    result = _run(
        sandbox,
        SUBMIT,
        *_BASE,
        "--out",
        "/mnt/shared/exp",
        "--target",
        "tracin",
        "--project",
        "my-proj",
        "--make-var",
        "SIMFLUENCE_DATA_DIR=/mnt/data",
        "--create",
        env={"FAKE_TPU_STATE": "READY"},
    )
    assert result.returncode == 0, result.stderr
    calls = _calls(sandbox)
    assert len(calls) == 4  # describe, scp, ssh setup, ssh run: no create
    assert all(c[c.index("--project") + 1] == "my-proj" for c in calls)
    stripped = [[w for w in c if w not in ("--project", "my-proj")] for c in calls]
    assert stripped[0] == _DESCRIBE
    _check_scp(stripped[1], tmp_path)
    setup, work = _expected_tail(out="/mnt/shared/exp", target="tracin")
    assert stripped[2] == setup
    assert stripped[3] == work[:-1] + [work[-1] + " --make-var SIMFLUENCE_DATA_DIR=/mnt/data"]


def test_absent_tpu_without_create_stops_before_creating(sandbox):
    result = _run(sandbox, SUBMIT, *_BASE, "--out", "gs://b/x")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--create" in result.stderr
    assert [c[3] for c in _calls(sandbox)] == ["describe"]


def test_tpu_not_ready_stops(sandbox):
    result = _run(sandbox, SUBMIT, *_BASE, "--out", "gs://b/x", env={"FAKE_TPU_STATE": "STOPPED"})
    assert result.returncode == 2
    assert "STOPPED" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert [c[3] for c in _calls(sandbox)] == ["describe"]


def test_dry_run_prints_every_command_and_runs_none(sandbox):
    result = _run(sandbox, SUBMIT, *_BASE, "--out", "gs://b/x", "--create", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert _calls(sandbox) == []
    commands = [
        shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")
    ]
    assert [c[:4] for c in commands if c[0] == "gcloud"] == [
        ["gcloud", "compute", "tpus", "tpu-vm"]
    ] * 5
    assert [c[4] for c in commands if c[0] == "gcloud"] == [
        "describe",
        "create",
        "scp",
        "ssh",
        "ssh",
    ]
    assert commands[2][:2] == ["git", "-C"] and "archive" in commands[2]
    assert [c[1:] for c in commands[-2:]] == _expected_tail(out="gs://b/x")
    tarball = Path(commands[3][5])
    assert not tarball.exists(), "a dry run writes no tarball"


def test_detach_wraps_the_run_in_nohup(sandbox):
    result = _run(
        sandbox, SUBMIT, *_BASE, "--out", "gs://b/x", "--detach", env={"FAKE_TPU_STATE": "READY"}
    )
    assert result.returncode == 0, result.stderr
    command = _calls(sandbox)[-1][-1]
    work = _expected_tail(out="gs://b/x")[1][-1]
    words = shlex.split(command)
    assert words[:3] == ["nohup", "bash", "-c"] and words[3] == work
    assert words[4:] == [">", "simfluence-runs.log", "2>&1", "<", "/dev/null", "&"]
    assert "tail -f simfluence-runs.log" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--zone", "z", "--config", "runs/demo", "--out", "o"], "missing --tpu"),
        (["--tpu", "t", "--config", "runs/demo", "--out", "o"], "missing --zone"),
        (["--tpu", "t", "--zone", "z", "--config", "runs/nope", "--out", "o"], "runs/nope"),
        (["--tpu", "t", "--zone", "z", "--config", "runs/demo"], "missing --out"),
        (["--tpu", "Bad_Name", "--zone", "z", "--config", "runs/demo", "--out", "o"], "Bad_Name"),
        (["--tpu", "t", "--zone", "z", "--config", "runs/demo", "--out", "o", "--x"], "'--x'"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_gcloud_call(sandbox, args, message):
    result = _run(sandbox, SUBMIT, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert _calls(sandbox) == []


def test_untracked_config_is_refused(sandbox):
    (sandbox["repo"] / "runs" / "new").mkdir()
    (sandbox["repo"] / "runs" / "new" / "config.py").write_text("")
    args = ["--tpu", "t", "--zone", "z", "--config", "runs/new", "--out", "o"]
    result = _run(sandbox, SUBMIT, *args)
    assert result.returncode == 2 and "git add" in result.stderr
    assert _calls(sandbox) == []


def test_gcloud_absent(sandbox):
    result = _run(sandbox, SUBMIT, *_BASE, "--out", "gs://b/x", "--create", without=("gcloud",))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gcloud not found" in lines[0]
    assert _calls(sandbox) == []


# worker.sh: what each TPU worker does.


def _make_env(sandbox):
    return [line.split("=", 1)[1] for line in (sandbox["log"] / "make.env").read_text().split()]


def _staging(sandbox, out: str) -> str:
    """The worker's local copy of a bucket path: one folder per path."""
    return (
        f"{sandbox['env']['HOME']}/simfluence-out/{hashlib.sha256(out.encode()).hexdigest()[:16]}"
    )


def test_worker_run_with_bucket_pulls_runs_make_and_worker0_pushes(sandbox):
    home_out = _staging(sandbox, "gs://b/exp")
    args = ["run", "--target", "runs", "--config", "runs/demo", "--out", "gs://b/exp"]
    result = _run(
        sandbox,
        WORKER,
        *args,
        "--make-var",
        "K=V",
        env={"TPU_WORKER_ID": "0", "FAKE_BUCKET_EXISTS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert _calls(sandbox, "make") == [
        [
            "runs",
            "CONFIG=runs/demo",
            f"OUT={home_out}",
            "VENV=.venv",
            "PYTHON=.venv/bin/python",
            "HF_HUB_OFFLINE=0",
            "HF_DATASETS_OFFLINE=0",
            "K=V",
        ]
    ]
    assert _make_env(sandbox) == ["1"]
    assert _calls(sandbox) == [
        ["storage", "ls", "gs://b/exp"],
        ["storage", "rsync", "--recursive", "gs://b/exp", home_out],
        ["storage", "rsync", "--recursive", home_out, "gs://b/exp"],
    ]


def test_worker_stages_each_bucket_path_apart(sandbox):
    # Two --out paths for one config must not share a local folder: the second would start from
    # (and push) the first one's experiment.
    outs = ["gs://b/try1", "gs://b/try2"]
    for out in outs:
        args = ["run", "--target", "runs", "--config", "runs/demo", "--out", out]
        assert _run(sandbox, WORKER, *args, env={"TPU_WORKER_ID": "0"}).returncode == 0
    make_outs = [c[2] for c in _calls(sandbox, "make")]
    assert make_outs == [f"OUT={_staging(sandbox, out)}" for out in outs]
    assert len(set(make_outs)) == 2


def test_worker_failure_still_pushes_and_other_workers_do_not(sandbox):
    args = ["run", "--target", "runs", "--config", "runs/demo", "--out", "gs://b/exp"]
    failed = _run(sandbox, WORKER, *args, env={"TPU_WORKER_ID": "0", "FAKE_MAKE_RC": "3"})
    assert failed.returncode == 3
    # No bucket copy yet: nothing pulled; the partial results are still pushed.
    assert [c[:2] for c in _calls(sandbox)] == [["storage", "ls"], ["storage", "rsync"]]
    assert _calls(sandbox)[-1][-1] == "gs://b/exp"
    (sandbox["log"] / "gcloud.log").unlink()
    other = _run(sandbox, WORKER, *args, env={"TPU_WORKER_ID": "1"})
    assert other.returncode == 0
    assert _calls(sandbox) == [["storage", "ls", "gs://b/exp"]]


def test_worker_shared_path_goes_straight_to_make(sandbox):
    args = ["run", "--target", "simulate", "--config", "runs/demo", "--out", "/mnt/x"]
    result = _run(sandbox, WORKER, *args, env={"TPU_WORKER_ID": "0"})
    assert result.returncode == 0, result.stderr
    assert _calls(sandbox, "make")[0][:3] == ["simulate", "CONFIG=runs/demo", "OUT=/mnt/x"]
    assert _calls(sandbox) == []


# A python3.12 that records its argv; `-m venv DIR` makes DIR/bin/python, a copy of itself.
_FAKE_PYTHON = r"""#!/usr/bin/env bash
printf -v line '%q ' "$0" "$@"; echo "$line" >> "$FAKE_LOG/python.log"
if [[ ${1:-} == -m && ${2:-} == venv ]]; then
  mkdir -p "$3/bin" && cat "$0" > "$3/bin/python" && chmod +x "$3/bin/python"
fi
exit 0
"""


def test_worker_setup_makes_venv_and_installs_jax_tpu(sandbox):
    _write_exe(sandbox["fakes"] / "python3.12", _FAKE_PYTHON)
    (sandbox["tools"] / "cat").symlink_to(shutil.which("cat"))
    (sandbox["tools"] / "chmod").symlink_to(shutil.which("chmod"))
    result = _run(sandbox, WORKER, "setup", "--libtpu-index", "https://example.test/libtpu.html")
    assert result.returncode == 0, result.stderr
    repo = sandbox["repo"]
    calls = _calls(sandbox, "python")
    assert [Path(c[0]).name for c in calls] == ["python3.12"] * 2 + ["python"] * 3
    assert calls[1][1:] == ["-m", "venv", ".venv"]
    assert calls[2][1:] == ["-m", "pip", "install", "-q", "--upgrade", "pip"]
    assert calls[3][1:] == [
        "-m",
        "pip",
        "install",
        "-q",
        "-e",
        ".[finetune]",
        "jax[tpu]",
        "-f",
        "https://example.test/libtpu.html",
    ]
    assert calls[4][1] == "-c" and "import jax" in calls[4][2]
    assert (repo / ".venv" / ".installed").is_file()


# launch_multihost.sh


def _plus_lines(stdout):
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _split(words):
    """(launcher-set flags, finetune command line) of one process's `-m finetune.cli` words."""
    i = words.index("finetune.cli")
    assert words[i + 1 : i + 7 : 2] == ["--coordinator-address", "--num-processes", "--process-id"]
    return words[i + 1 : i + 7], words[i + 7 :]


def _flags(address, count, index):
    return [
        "--coordinator-address",
        address,
        "--num-processes",
        str(count),
        "--process-id",
        str(index),
    ]


def test_multihost_dry_run_one_ssh_command_per_host(sandbox):
    hosts = "gpu-a,gpu-b,gpu-c"
    run = ["run", "runs/demo", "--out", "/shared/x y"]
    result = _run(sandbox, LAUNCH, "--hosts", hosts, "--dry-run", "--", *run)
    assert result.returncode == 0, result.stderr
    assert _calls(sandbox, "ssh") == []
    commands = _plus_lines(result.stdout)
    assert len(commands) == 3
    for index, (command, host) in enumerate(zip(commands, hosts.split(","), strict=True)):
        assert command[:4] == ["ssh", "-o", "BatchMode=yes", host]
        remote = shlex.split(command[4])
        assert remote[:4] == ["cd", str(sandbox["repo"]), "&&", "env"]
        assert remote[4:7] == [".venv/bin/python", "-m", "finetune.cli"]
        assert _split(remote) == (_flags("gpu-a:12355", 3, index), run)


def test_multihost_runs_ssh_per_host(sandbox):
    result = _run(sandbox, LAUNCH, "--hosts", "a,b", "--port", "4000", "--", "run", "runs/demo")
    assert result.returncode == 0, result.stderr
    calls = sorted(_calls(sandbox, "ssh"), key=lambda c: c[-1])  # ran in parallel
    assert [c[2] for c in calls] == ["a", "b"]
    for index, call in enumerate(calls):
        assert _split(shlex.split(call[3])) == (_flags("a:4000", 2, index), ["run", "runs/demo"])


def test_local_gpus_dry_run(sandbox):
    env = ["--env", "SIMFLUENCE_DATA_DIR=/data"]
    result = _run(sandbox, LAUNCH, "--gpus", "0,1,2,3", *env, "--dry-run", "--", "run", "runs/demo")
    assert result.returncode == 0, result.stderr
    commands = _plus_lines(result.stdout)
    assert len(commands) == 4
    for index, words in enumerate(commands):
        assert words[:3] == ["env", f"CUDA_VISIBLE_DEVICES={index}", "SIMFLUENCE_DATA_DIR=/data"]
        assert words[3] == str(sandbox["repo"] / ".venv" / "bin" / "python")
        assert _split(words) == (_flags("localhost:12355", 4, index), ["run", "runs/demo"])


def test_hosts_times_gpus(sandbox):
    args = ["--hosts", "a,b", "--gpus", "0,1", "--dry-run", "--", "tracin", "exp"]
    result = _run(sandbox, LAUNCH, *args)
    assert result.returncode == 0, result.stderr
    placed = []
    for command in _plus_lines(result.stdout):
        remote = shlex.split(command[4])
        flags, rest = _split(remote)
        assert flags[:4] == ["--coordinator-address", "a:12355", "--num-processes", "4"]
        assert rest == ["tracin", "exp"]
        placed.append((command[3], remote[4], flags[-1]))
    assert placed == [
        ("a", "CUDA_VISIBLE_DEVICES=0", "0"),
        ("a", "CUDA_VISIBLE_DEVICES=1", "1"),
        ("b", "CUDA_VISIBLE_DEVICES=0", "2"),
        ("b", "CUDA_VISIBLE_DEVICES=1", "3"),
    ]


def test_launched_command_is_accepted_by_the_finetune_cli(sandbox):
    cli = pytest.importorskip("finetune.cli")
    if not hasattr(cli, "_parser"):
        pytest.skip("finetune.cli has no _parser() to check the command line against")
    result = _run(sandbox, LAUNCH, "--gpus", "0,1", "--dry-run", "--", "run", "runs/demo")
    words = _plus_lines(result.stdout)[1]
    args = cli._parser().parse_args(words[words.index("finetune.cli") + 1 :])
    assert (args.coordinator_address, args.num_processes, args.process_id) == (
        "localhost:12355",
        2,
        1,
    )
    assert args.command == "run" and args.config == "runs/demo"


def test_local_failure_stops_the_others_and_returns_its_code(sandbox, tmp_path):
    # process 0 fails at once; process 1 would sleep 30 s unless stopped.
    fake_python = tmp_path / "fake_python"
    _write_exe(
        fake_python,
        '#!/usr/bin/env bash\n[[ "$8" == 0 ]] && exit 5\nexec sleep 30\n',
    )
    (sandbox["tools"] / "sleep").symlink_to(shutil.which("sleep"))
    args = ["--gpus", "0,1", "--python", str(fake_python), "--", "run", "runs/demo"]
    result = _run(sandbox, LAUNCH, *args, timeout=20)
    assert result.returncode == 5


# Stands in for `python -m finetune.cli --coordinator-address A --num-processes N --process-id I
# run DIR`: joins the job through finetune.distributed and all-gathers the process ids.
_JOIN = """
import sys
from pathlib import Path
args = sys.argv[1:]
assert args[:2] == ["-m", "finetune.cli"] and args[8] == "run", args
flags = dict(zip(args[2:8:2], args[3:8:2]))
from finetune import distributed
joined = distributed.initialize(
    flags["--coordinator-address"], int(flags["--num-processes"]), int(flags["--process-id"])
)
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
ids = multihost_utils.process_allgather(jnp.array([jax.process_index()])).ravel().tolist()
out = Path(args[9]) / f"process_{jax.process_index()}.txt"
out.write_text(f"{joined} {jax.process_count()} {ids}")
"""


@pytest.mark.slow
def test_two_local_processes_form_one_jax_job(sandbox, tmp_path):
    fake_python = tmp_path / "join_python"
    _write_exe(fake_python, f"#!{sys.executable}\n{_JOIN}")
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    result = _run(
        sandbox,
        LAUNCH,
        "--gpus",
        "0,1",
        "--port",
        str(port),
        "--python",
        str(fake_python),
        "--env",
        f"PYTHONPATH={REPO_ROOT}",
        "--env",
        "JAX_PLATFORMS=cpu",
        "--",
        "run",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for index in (0, 1):
        assert (tmp_path / f"process_{index}.txt").read_text() == "True 2 [0, 1]"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-run", "--", "run", "runs/demo"], "--hosts"),
        (["--gpus", "0,x", "--dry-run", "--", "run", "runs/demo"], "'x'"),
        (["--gpus", "0", "--dry-run"], "CONFIG"),
        (["--gpus", "0", "--dry-run", "--", "runs/demo"], "subcommand"),
        (["--gpus", "0", "--dry-run", "--", "run", "r", "--process-id", "1"], "--process-id"),
        (["--gpus", "0", "--coordinator-address", "nohost", "--dry-run", "--", "run"], "HOST:PORT"),
        (["--gpus", "0", "--port", "0", "--dry-run", "--", "run", "r"], "--port"),
        (["--hosts", "a b", "--dry-run", "--", "run", "r"], "'a b'"),
    ],
)
def test_multihost_bad_input(sandbox, args, message):
    result = _run(sandbox, LAUNCH, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


def test_scripts_are_executable_and_parse():
    for script in (SUBMIT, WORKER, LAUNCH):
        path = REPO_ROOT / script
        assert os.access(path, os.X_OK), f"chmod +x {script}"
        subprocess.run(["bash", "-n", str(path)], check=True)
