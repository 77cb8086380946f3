"""The on-disk run-log format shared by `finetune` (writer) and `simfluence` (reader).

This module is deliberately light (numpy and json only, no jax) so that the fine-tuning side can
write run logs without importing the simulator stack. Layout::

    EXP/
      experiment.json   # at least {"n_train": int, "n_test": int}; plus task, model, config, ...
      examples.json     # optional: {"train": [n_train texts], "test": [n_test texts]}
      run_000/          # run_<index>, index >= 0, read in numeric order
        curriculum.npy  # int32 [steps, batch]: positions in the training pool 0..n_train-1
        losses.npy      # float32 [steps + 1, n_test]: row 0 before the first step, row t after t
        lr.npy          # optional float32 [steps]: learning rate used at step t (index t-1)
        choice_losses.npy  # optional float32 [steps + 1, n_test, C]: the loss of every answer
                        #   choice; the gold choice's column (experiment.json "test_labels", or
                        #   the column equal to losses.npy) is losses.npy bitwise
        metrics.jsonl   # optional, one line per step
        checkpoints/    # optional orbax checkpoints (finetune)
        tracin.npz      # optional: steps int32 [K], learning_rates float32 [K],
                        #   dots float32 [K, n_test, n_train], mode "exact"|"projected",
                        #   proj_dim int (0 for exact), seed int
        meta.json       # {"status": "complete", ...}, written LAST; without it a run is incomplete
      features/<kind>.npz  # optional (finetune features): pool float32 [n_train, d], test
                           #   float32 [n_test, d], outside float32 [n_out, d], outside_ids,
                           #   model_sha256, ids_sha256, settings (JSON); kind hidden | tracin

Every writer goes through a temporary name in the destination folder and `os.replace`, so a
reader never sees a half-written file. Every validation failure raises `RunLogError` with a
one-line message naming the file, the problem and the fix.

References:
    Guu et al., "Simfluence: Modeling the Influence of Individual Training Examples by
    Simulating Training Runs", 2023. https://arxiv.org/abs/2303.08114
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # shape annotations only: this module stays numpy + json at run time
    from jaxtyping import ArrayLike, Float, Int

__all__ = [
    "RunLogError",
    "Run",
    "gold_choices",
    "atomic_save_npy",
    "atomic_write_json",
    "atomic_savez",
    "atomic_write_text",
    "atomic_write_bytes",
    "write_experiment",
    "read_experiment",
    "run_dir",
    "write_run",
    "list_runs",
    "load_runs",
    "write_tracin",
    "read_tracin",
    "read_examples",
    "experiment_sha256",
    "counterfactual_dir",
    "curricula_sha256",
    "write_proposals",
    "read_proposals",
    "load_counterfactual_runs",
    "first_non_finite",
    "release_pages",
    "provenance",
    "PROVENANCE_PACKAGES",
    "describe_machine",
    "FEATURE_KINDS",
    "features_path",
    "write_features",
    "read_features",
]

EXPERIMENT_FILE = "experiment.json"
EXAMPLES_FILE = "examples.json"
CURRICULUM_FILE = "curriculum.npy"
LOSSES_FILE = "losses.npy"
LR_FILE = "lr.npy"
CHOICE_LOSSES_FILE = "choice_losses.npy"
META_FILE = "meta.json"
TRACIN_FILE = "tracin.npz"
TRACIN_MODES = ("exact", "projected")
_RUN_RE = re.compile(r"^run_(\d+)$")


class RunLogError(ValueError):
    """A run log (or a file given on the command line) is missing or malformed.

    The message is one line naming the file, the problem and the fix.
    """


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _error(message: str) -> RunLogError:
    return RunLogError(_one_line(message))


# ----------------------------------------------------------------------------------------------
# Atomic writers
# ----------------------------------------------------------------------------------------------


def _atomic_write(path: str | os.PathLike, write_fn, *, binary: bool = True) -> Path:
    """Write through a temporary file in the same folder, then `os.replace` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; outputs are not
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save_npy(path: str | os.PathLike, array: ArrayLike) -> Path:
    """Save one array as `.npy` atomically (temporary name in the same folder, then rename).

    Args:
        path: destination file; its folder is created if needed. No `.npy` is appended.
        array: anything `np.asarray` accepts (object arrays are refused).

    Returns:
        The destination path.

    Raises:
        RunLogError: `array` converts to an object array.
    """
    arr = np.asarray(array)
    if arr.dtype == object:
        raise _error(f"{path}: refusing to save an object array; convert it to numbers first")
    return _atomic_write(path, lambda fh: np.save(fh, arr, allow_pickle=False))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically.

    NaN and infinities are refused (they are not JSON); use None for undefined values.

    Args:
        path: destination file; its folder is created if needed.
        obj: JSON-serialisable object (numpy scalars/arrays and Paths are converted).

    Returns:
        The destination path.

    Raises:
        RunLogError: `obj` holds NaN/inf or something not serialisable.
    """
    try:
        text = json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise _error(f"{path}: cannot write JSON ({exc}); use None for undefined values") from exc
    return _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> Path:
    """Save several arrays as an uncompressed `.npz` atomically (no suffix is appended).

    Args:
        path: destination file; its folder is created if needed.
        **arrays: name -> array (strings become 0-d unicode arrays; object arrays are refused).

    Returns:
        The destination path.

    Raises:
        RunLogError: an array converts to an object array.
    """
    converted = {}
    for name, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype == object:
            raise _error(f"{path}: array {name!r} has dtype object; convert it to numbers first")
        converted[name] = arr
    return _atomic_write(path, lambda fh: np.savez(fh, **converted))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write raw bytes atomically (temporary name in the same folder, then rename).

    Args:
        path: destination file; its folder is created if needed.
        data: the bytes.

    Returns:
        The destination path.
    """
    return _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (temporary name in the same folder, then rename).

    Args:
        path: destination file; its folder is created if needed.
        text: the text, written as UTF-8.

    Returns:
        The destination path.
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# Provenance: what made a file (code, packages, machine, command line)
# ----------------------------------------------------------------------------------------------

# Distributions whose versions can move a result (by their installed names).
PROVENANCE_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "transformers",
    "numpy",
)
_PROVENANCE_KEY = "provenance"


def _git_state(root: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout whose top level is ``root``; (None, None) when it is
    not one (an installed package), git is missing or slow, or anything else goes wrong."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # never take the index lock
        )
        return out.stdout.strip()

    try:
        # A package installed inside another checkout (a venv in a repository) is not the
        # code of that checkout: only its own top level counts.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None, None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return commit, dirty
    except Exception:  # not a checkout, no git, a timeout: provenance never fails a command
        return None, None


def _package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in PROVENANCE_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except Exception:  # not installed (PackageNotFoundError) or broken metadata
            out[name] = None
    return out


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _devices() -> dict | None:
    """The JAX devices of this process, only when jax is imported already (never imports it)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    try:
        devices = jax.devices()
        return {
            "platform": devices[0].platform,
            "kind": devices[0].device_kind,
            "count": len(devices),
            "local_count": jax.local_device_count(),
            "processes": jax.process_count(),
        }
    except Exception:  # no backend can start: say nothing rather than fail the command
        return None


def provenance(argv: Sequence[str] | None = None) -> dict:
    """What produced a result: code version, package versions, machine and command line.

    Recorded under a ``provenance`` key in experiment.json, every run's meta.json, results.json,
    simulator files and the counterfactual report, so that two results that differ can be traced
    to a machine, a library version or a code change. It never fails: what cannot be found is
    None. Identity checks leave it out (`experiment_sha256`; counterfactual simulator hashes).

    Args:
        argv: the command line to record (default: ``sys.argv``).

    Returns:
        {"git_commit": hex str or None (None: the code is not a git checkout), "git_dirty": bool
        or None (tracked files differ from the commit), "packages": {name: version or None} for
        `PROVENANCE_PACKAGES` (from the installed metadata; nothing is imported), "device":
        {"platform", "kind", "count", "local_count", "processes"} of the JAX devices, or None
        when jax is not imported in this process, "host": {"machine", "system", "cpu",
        "cpu_count"}, "python": version, "argv": [str], "time_utc": ISO 8601 seconds}.
    """
    import datetime

    commit, dirty = _git_state(Path(__file__).resolve().parent.parent)
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "packages": _package_versions(),
        "device": _devices(),
        "host": {
            "machine": platform.machine() or None,
            "system": platform.system() or None,
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
        },
        "python": platform.python_version(),
        "argv": [str(a) for a in (sys.argv if argv is None else argv)],
        "time_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def describe_machine(prov: Any) -> str:
    """One line naming the machine and versions of a `provenance` record (for tables).

    Args:
        prov: a `provenance` dict, or None / anything else for a file that records none.

    Returns:
        E.g. ``"cpu x1 (Intel Xeon ..., 2 cores, x86_64), jax 0.10.2, commit 1a2b3c4d (dirty)"``;
        ``"not recorded"`` when ``prov`` is not a provenance dict.
    """
    if not isinstance(prov, dict):
        return "not recorded"
    dev = prov.get("device") if isinstance(prov.get("device"), dict) else {}
    host = prov.get("host") if isinstance(prov.get("host"), dict) else {}
    pkgs = prov.get("packages") if isinstance(prov.get("packages"), dict) else {}
    where = [host.get(k) for k in ("cpu",) if host.get(k)]
    if host.get("cpu_count"):
        where.append(f"{host['cpu_count']} cores")
    if host.get("machine"):
        where.append(str(host["machine"]))
    if dev:
        kind = str(dev.get("kind") or dev.get("platform") or "?")
        text = f"{kind} x{dev.get('count', '?')}"
    else:
        text = "devices not recorded"
    if where:
        text += f" ({', '.join(str(w) for w in where)})"
    if pkgs.get("jax"):
        text += f", jax {pkgs['jax']}"
    commit = prov.get("git_commit")
    if commit:
        text += f", commit {str(commit)[:8]}" + (" (dirty)" if prov.get("git_dirty") else "")
    return text


# ----------------------------------------------------------------------------------------------
# Experiment and examples
# ----------------------------------------------------------------------------------------------


def _positive_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0


def _check_info(info: Any, origin: str) -> dict:
    if not isinstance(info, dict):
        raise _error(f"{origin}: expected a JSON object with n_train and n_test, got {info!r:.80}")
    for key in ("n_train", "n_test"):
        if key not in info:
            raise _error(f"{origin}: missing key {key!r}; add it as a positive integer")
        if not _positive_int(info[key]):
            raise _error(f"{origin}: {key} must be a positive integer, got {info[key]!r}")
    return info


def write_experiment(exp_dir: str | os.PathLike, info: dict) -> Path:
    """Create `exp_dir` (if needed) and write `experiment.json` atomically.

    Args:
        exp_dir: experiment folder.
        info: dict with at least `n_train` and `n_test` (positive ints), plus anything JSON.

    Returns:
        Path of the written `experiment.json`.

    Raises:
        RunLogError: `info` lacks n_train/n_test or they are not positive integers.
    """
    exp_dir = Path(exp_dir)
    _check_info(info, f"experiment info for {exp_dir}")
    exp_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(exp_dir / EXPERIMENT_FILE, info)


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _error(f"{path}: {what} not found") from None
    except OSError as exc:
        raise _error(f"{path}: cannot read {what} ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(
            f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}); fix or rewrite it"
        ) from exc


def read_experiment(exp_dir: str | os.PathLike) -> dict:
    """Read and validate `EXP/experiment.json`.

    Args:
        exp_dir: experiment folder.

    Returns:
        The experiment dict (with positive int `n_train`, `n_test`).

    Raises:
        RunLogError: the folder or file is missing, not JSON, or lacks n_train/n_test.
    """
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise _error(
            f"{exp_dir}: experiment folder not found; pass a folder holding experiment.json "
            "(e.g. one made by `simfluence demo-data` or `finetune run`)"
        )
    path = exp_dir / EXPERIMENT_FILE
    if not path.is_file():
        raise _error(
            f"{path}: experiment.json not found; {exp_dir} is not an experiment folder "
            "(it needs experiment.json with n_train and n_test)"
        )
    return _check_info(_read_json(path, "experiment.json"), str(path))


def experiment_sha256(exp_dir: str | os.PathLike) -> str:
    """Content hash of `EXP/experiment.json` (canonical JSON), identifying the experiment.

    Simulators record it when fitted, so a simulator of another experiment (another pool or
    tracked set) is recognised even when its sizes agree. The ``provenance`` record (which
    machine and code prepared the folder) is left out: it says nothing about the pool, the
    tracked set or the config, and files written before it was recorded keep their hash.

    Args:
        exp_dir: experiment folder.

    Returns:
        Hex SHA-256 of the experiment's info, serialised with sorted keys.

    Raises:
        RunLogError: see `read_experiment`.
    """
    import hashlib

    info = {k: v for k, v in read_experiment(exp_dir).items() if k != _PROVENANCE_KEY}
    text = json.dumps(info, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def experiment_owns(exp_dir: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether `path` is one of the experiment's own files, which an output must not replace.

    Args:
        exp_dir: experiment folder.
        path: a file to be written.

    Returns:
        True for EXP/experiment.json, EXP/examples.json, EXP/data.npz (the tokenized pool of
        `finetune run`) and anything inside a run_XXX folder or EXP/counterfactual.
    """
    exp, target = Path(exp_dir).resolve(), Path(path).resolve()
    if not target.is_relative_to(exp) or target == exp:
        return False
    parts = target.relative_to(exp).parts
    if len(parts) == 1:
        return parts[0] in (EXPERIMENT_FILE, EXAMPLES_FILE, "data.npz")
    return parts[0] == COUNTERFACTUAL_DIR or bool(_RUN_RE.match(parts[0]))


def read_examples(exp_dir: str | os.PathLike) -> dict | None:
    """Read the optional `EXP/examples.json` (texts for display).

    Args:
        exp_dir: experiment folder.

    Returns:
        `{"train": [n_train str], "test": [n_test str]}`, or None when the file is absent.

    Raises:
        RunLogError: the file is malformed or its list lengths disagree with experiment.json.
    """
    exp_dir = Path(exp_dir)
    path = exp_dir / EXAMPLES_FILE
    if not path.is_file():
        return None
    data = _read_json(path, "examples.json")
    info = read_experiment(exp_dir)
    if not isinstance(data, dict):
        raise _error(f"{path}: expected an object {{'train': [...], 'test': [...]}}")
    for key, n_key in (("train", "n_train"), ("test", "n_test")):
        texts = data.get(key)
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise _error(f"{path}: {key!r} must be a list of strings")
        if len(texts) != info[n_key]:
            raise _error(
                f"{path}: {key!r} has {len(texts)} texts but experiment.json says "
                f"{n_key}={info[n_key]}; write one text per example"
            )
    return {"train": list(data["train"]), "test": list(data["test"])}


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def run_dir(exp_dir: str | os.PathLike, index: int) -> Path:
    """Folder of run `index` inside `exp_dir` (`run_%03d`); nothing is created.

    Args:
        exp_dir: experiment folder.
        index: run index, a non-negative integer.

    Returns:
        `exp_dir / f"run_{index:03d}"`.

    Raises:
        RunLogError: `index` is not a non-negative integer.
    """
    if not isinstance(index, int | np.integer) or isinstance(index, bool) or index < 0:
        raise _error(f"run index must be a non-negative integer, got {index!r}")
    return Path(exp_dir) / f"run_{int(index):03d}"


def _validate_curriculum(cur: np.ndarray, origin: str, n_train: int | None) -> np.ndarray:
    if not np.issubdtype(cur.dtype, np.integer):
        raise _error(
            f"{origin}: curriculum dtype is {cur.dtype}, expected integers (int32) "
            "[steps, batch] of training-pool positions"
        )
    if cur.ndim != 2 or cur.shape[0] < 1 or cur.shape[1] < 1:
        raise _error(
            f"{origin}: curriculum shape is {cur.shape}, expected [steps, batch] with "
            "steps >= 1 and batch >= 1"
        )
    lo, hi = int(cur.min()), int(cur.max())
    if lo < 0 or (n_train is not None and hi >= n_train):
        bad = lo if lo < 0 else hi
        where = np.argwhere(cur == bad)[0]
        limit = "n_train-1" if n_train is None else f"{n_train - 1} (n_train-1)"
        raise _error(
            f"{origin}: curriculum id {bad} at step {int(where[0]) + 1}, slot {int(where[1])} "
            f"is outside 0..{limit}; ids are positions in the training pool"
        )
    return cur.astype(np.int32, copy=False)


def _validate_losses(losses: np.ndarray, origin: str, steps: int, n_test: int | None) -> np.ndarray:
    if not np.issubdtype(losses.dtype, np.floating):
        raise _error(
            f"{origin}: losses dtype is {losses.dtype}, expected float32 [steps+1, n_test]"
        )
    if losses.ndim != 2:
        raise _error(f"{origin}: losses shape is {losses.shape}, expected [steps+1, n_test]")
    if losses.shape[0] != steps + 1:
        raise _error(
            f"{origin}: losses has {losses.shape[0]} rows but the curriculum has {steps} steps; "
            f"expected steps+1 = {steps + 1} rows (row 0 is the loss before the first step)"
        )
    if n_test is not None and losses.shape[1] != n_test:
        raise _error(
            f"{origin}: losses has {losses.shape[1]} columns but experiment.json says "
            f"n_test={n_test}; write one column per tracked test example"
        )
    out = losses.astype(np.float32, copy=False)  # a float32 file stays memory-mapped
    row, col = first_non_finite(out)
    release_pages(out)
    if row >= 0:
        raise _error(
            f"{origin}: non-finite loss {out[row, col]} at step {row}, test example {col}; "
            "the run diverged or was logged wrongly: rerun it or delete the run folder"
        )
    return out


def first_non_finite(arr: np.ndarray, rows: int = 4096) -> tuple[int, int]:
    """(row, column) of the first NaN or inf of a 2-D array, or (-1, -1); checked in blocks of
    rows so a memory-mapped log is never materialised as a whole."""
    for r0 in range(0, arr.shape[0], rows):
        finite = np.isfinite(arr[r0 : r0 + rows])
        if not finite.all():
            row, col = (int(v) for v in np.argwhere(~finite)[0])
            return r0 + row, col
    return -1, -1


def release_pages(arr: np.ndarray) -> None:
    """Drops the pages of a memory-mapped array from this process (no-op for other arrays).

    The data stays in the kernel's page cache and is read back on the next access (a minor
    page fault); the pages just stop counting towards this process's resident memory, so
    reading a large experiment's loss logs a run at a time never holds them all at once.
    """
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "_mmap", None) or getattr(base, "base", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if base is not None and advice is not None and not base.closed:
        try:
            base.madvise(advice)
        except (OSError, ValueError):  # not supported here: the pages just stay resident
            pass


def _validate_lr(lr: np.ndarray, origin: str, steps: int) -> np.ndarray:
    if not np.issubdtype(lr.dtype, np.floating):
        raise _error(f"{origin}: learning-rate dtype is {lr.dtype}, expected float32 [steps]")
    if lr.shape != (steps,):
        raise _error(
            f"{origin}: learning rates have shape {lr.shape}, expected [{steps}] (one per step)"
        )
    out = lr.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        step = int(np.argwhere(~np.isfinite(out))[0, 0]) + 1
        raise _error(f"{origin}: non-finite learning rate at step {step}")
    return out


def gold_choices(
    choice_losses: Float[np.ndarray, "T+1 n_test C"],
    losses: Float[np.ndarray, "T+1 n_test"],
    info: dict | None,
    origin: str,
) -> np.ndarray:
    """The gold choice of every tracked test example, checked against the run's losses.

    From experiment.json's ``test_labels`` when present, else the first column of
    ``choice_losses`` that equals ``losses`` at every step (runs written before the labels were
    recorded).

    Args:
        choice_losses: float32 [steps + 1, n_test, C].
        losses: float32 [steps + 1, n_test], the run's losses.npy.
        info: experiment.json's content (or None).
        origin: the choice-losses file, for messages.

    Returns:
        int64 [n_test] gold choice indices.

    Raises:
        RunLogError: bad labels, or a gold column that is not ``losses`` bitwise.
    """
    n, c = choice_losses.shape[1:]
    same = (choice_losses == losses[..., None]).all(0)  # [n_test, C]
    labels = None if info is None else info.get("test_labels")
    if labels is None:
        if not same.any(1).all():
            i = int(np.flatnonzero(~same.any(1))[0])
            raise _error(
                f"{origin}: no answer choice of test example {i} equals its losses.npy column; "
                "the gold choice's loss must be losses.npy bitwise: rewrite the run"
            )
        return same.argmax(1).astype(np.int64)
    arr = np.asarray(labels)
    if (
        arr.shape != (n,)
        or not np.issubdtype(arr.dtype, np.integer)
        or (arr < 0).any()
        or (arr >= c).any()
    ):
        raise _error(
            f"{origin}: experiment.json test_labels must be {n} integers in 0..{c - 1} (one "
            "gold choice per tracked test example); fix experiment.json"
        )
    bad = ~same[np.arange(n), arr]
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _error(
            f"{origin}: the gold choice ({int(arr[i])}) of test example {i} differs from "
            "losses.npy; the gold column must be losses.npy bitwise: rewrite the run"
        )
    return arr.astype(np.int64)


def _validate_choice_losses(
    choice: np.ndarray, origin: str, losses: np.ndarray, info: dict | None
) -> np.ndarray:
    if not np.issubdtype(choice.dtype, np.floating):
        raise _error(
            f"{origin}: choice losses dtype is {choice.dtype}, expected float32 "
            "[steps+1, n_test, C]"
        )
    if choice.ndim != 3 or choice.shape[:2] != losses.shape or choice.shape[2] < 2:
        raise _error(
            f"{origin}: choice losses shape is {choice.shape}, expected "
            f"[{losses.shape[0]}, {losses.shape[1]}, C] (steps+1, n_test, C >= 2 answer "
            "choices) as losses.npy"
        )
    out = choice.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        row, col, k = (int(v) for v in np.argwhere(~np.isfinite(out))[0])
        raise _error(
            f"{origin}: non-finite loss {out[row, col, k]} at step {row}, test example {col}, "
            f"choice {k}; rerun the run or delete choice_losses.npy"
        )
    gold_choices(out, losses, info, origin)
    return out


def _experiment_for_run(run_path: Path) -> dict | None:
    parent = run_path.parent
    if parent.name == COUNTERFACTUAL_DIR and not (parent / EXPERIMENT_FILE).is_file():
        parent = parent.parent  # EXP/counterfactual/run_XXX: validated against EXP
    path = parent / EXPERIMENT_FILE
    if path.is_file():
        return _check_info(_read_json(path, "experiment.json"), str(path))
    return None


def write_run(
    run_dir: str | os.PathLike,
    curriculum: Int[ArrayLike, "T b"],
    losses: Float[ArrayLike, "T+1 n_test"],
    meta: dict | None = None,
    lr: Float[ArrayLike, " T"] | None = None,
    choice_losses: Float[ArrayLike, "T+1 n_test C"] | None = None,
) -> Path:
    """Validate and write one complete run; `meta.json` is written last.

    An existing `meta.json` is removed first, so a run being rewritten reads as incomplete until
    the new files are all in place. When `experiment.json` exists in the parent folder, ids and
    the number of test examples are checked against it.

    Args:
        run_dir: the run folder (`run_dir(exp_dir, index)`).
        curriculum: int [steps, batch] training-pool positions.
        losses: float [steps + 1, n_test] per-test-example losses; row 0 before the first step.
        meta: extra JSON metadata; `status` is set to "complete".
        lr: optional float [steps], learning rate used at each step (None removes lr.npy).
        choice_losses: optional float [steps + 1, n_test, C], the loss of every answer choice
            (None removes choice_losses.npy); its gold column must equal ``losses`` bitwise.

    Returns:
        The run folder.

    Raises:
        RunLogError: wrong dtype/shape, ids outside 0..n_train-1, non-finite values, choice
            losses whose gold column is not ``losses``.
    """
    path = Path(run_dir)
    info = _experiment_for_run(path)
    n_train = info["n_train"] if info else None
    n_test = info["n_test"] if info else None
    cur = _validate_curriculum(np.asarray(curriculum), f"{path / CURRICULUM_FILE}", n_train)
    los = _validate_losses(np.asarray(losses), f"{path / LOSSES_FILE}", cur.shape[0], n_test)
    lr_arr = None if lr is None else _validate_lr(np.asarray(lr), f"{path / LR_FILE}", cur.shape[0])
    choice = None
    if choice_losses is not None:
        choice = _validate_choice_losses(
            np.asarray(choice_losses), str(path / CHOICE_LOSSES_FILE), los, info
        )
    meta_out = dict(meta or {})
    meta_out["status"] = "complete"
    try:
        json.dumps(meta_out, default=_json_default, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _error(f"{path / META_FILE}: meta is not JSON-serialisable ({exc})") from exc
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).unlink(missing_ok=True)
    atomic_save_npy(path / CURRICULUM_FILE, cur)
    atomic_save_npy(path / LOSSES_FILE, los)
    if lr_arr is not None:
        atomic_save_npy(path / LR_FILE, lr_arr)
    else:
        (path / LR_FILE).unlink(missing_ok=True)
    if choice is not None:
        atomic_save_npy(path / CHOICE_LOSSES_FILE, choice)
    else:
        (path / CHOICE_LOSSES_FILE).unlink(missing_ok=True)
    atomic_write_json(path / META_FILE, meta_out)
    return path


def _is_complete(path: Path) -> bool:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("status") == "complete"


def list_runs(exp_dir: str | os.PathLike) -> list[tuple[int, Path, bool]]:
    """All `run_<index>` folders of an experiment, in numeric order.

    Args:
        exp_dir: experiment folder.

    Returns:
        `[(index, path, complete), ...]`; complete means meta.json says status "complete".

    Raises:
        RunLogError: the folder is missing, or two folders share an index (run_1 and run_001).
    """
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise _error(f"{exp_dir}: experiment folder not found")
    found: dict[int, Path] = {}
    for child in exp_dir.iterdir():
        m = _RUN_RE.match(child.name)
        if not m or not child.is_dir():
            continue
        index = int(m.group(1))
        if index in found:
            raise _error(
                f"{exp_dir}: folders {found[index].name} and {child.name} both hold run {index}; "
                "remove one"
            )
        found[index] = child
    return [(i, found[i], _is_complete(found[i])) for i in sorted(found)]


@dataclass(frozen=True)
class Run:
    """One complete, validated run.

    Attributes:
        index: run index (the number in `run_<index>`).
        path: the run folder.
        curriculum: int32 [T, b] training-pool positions consumed at steps 1..T.
        losses: float32 [T + 1, n_test] test losses; row 0 before the first step.
        lr: float32 [T] learning rate per step, or None when lr.npy is absent.
        meta: contents of meta.json.
        choice_losses: float32 [T + 1, n_test, C] the loss of every answer choice, or None
            when choice_losses.npy is absent.
        gold: int64 [n_test] the gold choice of each test example (None without
            choice_losses.npy); ``choice_losses[:, i, gold[i]]`` is ``losses[:, i]``.
    """

    index: int
    path: Path
    curriculum: Int[np.ndarray, "T b"] = field(repr=False)
    losses: Float[np.ndarray, "T+1 n_test"] = field(repr=False)
    lr: Float[np.ndarray, " T"] | None = field(repr=False)
    meta: dict = field(repr=False)
    choice_losses: Float[np.ndarray, "T+1 n_test C"] | None = field(default=None, repr=False)
    gold: Int[np.ndarray, " n_test"] | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        """Number of training steps T."""
        return int(self.curriculum.shape[0])

    @property
    def batch(self) -> int:
        """Batch size b."""
        return int(self.curriculum.shape[1])


def _load_npy(path: Path, what: str) -> np.ndarray:
    """One run file, memory-mapped read-only: its pages are read on use and are the page
    cache's, so loading an experiment does not hold a second copy of its loss logs."""
    if not path.is_file():
        raise _error(f"{path}: {what} not found; the run is marked complete but lacks it, rerun it")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise _error(f"{path}: cannot read {what} as .npy ({exc}); rerun the run") from exc
    if not isinstance(arr, np.ndarray):  # an .npz archive (NpzFile), not one array
        arr.close()
        raise _error(f"{path}: holds an .npz archive, not one .npy array; rerun the run")
    return arr


def _read_run(index: int, path: Path, info: dict) -> Run:
    cur = _validate_curriculum(
        _load_npy(path / CURRICULUM_FILE, "curriculum.npy"),
        str(path / CURRICULUM_FILE),
        info["n_train"],
    )
    losses = _validate_losses(
        _load_npy(path / LOSSES_FILE, "losses.npy"),
        str(path / LOSSES_FILE),
        cur.shape[0],
        info["n_test"],
    )
    lr = None
    if (path / LR_FILE).is_file():
        lr = _validate_lr(_load_npy(path / LR_FILE, "lr.npy"), str(path / LR_FILE), cur.shape[0])
    choice = gold = None
    if (path / CHOICE_LOSSES_FILE).is_file():
        origin = str(path / CHOICE_LOSSES_FILE)
        choice = _validate_choice_losses(
            _load_npy(path / CHOICE_LOSSES_FILE, "choice_losses.npy"), origin, losses, info
        )
        gold = gold_choices(choice, losses, info, origin)
    meta = _read_json(path / META_FILE, "meta.json")
    if not isinstance(meta, dict):
        raise _error(f"{path / META_FILE}: expected a JSON object")
    for arr in (cur, losses, lr, choice, gold):
        if arr is not None:
            arr.setflags(write=False)
    return Run(
        index=index,
        path=path,
        curriculum=cur,
        losses=losses,
        lr=lr,
        meta=meta,
        choice_losses=choice,
        gold=gold,
    )


def _format_indices(indices: Iterable[int]) -> str:
    """Compact `0-3,7,9-10` form of sorted indices."""
    items = sorted(set(indices))
    parts, start, prev = [], None, None
    for i in items:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(parts) if parts else "none"


def load_runs(
    exp_dir: str | os.PathLike,
    indices: Sequence[int] | None = None,
    *,
    _folder: str | os.PathLike | None = None,
) -> list[Run]:
    """Load and validate complete runs of an experiment.

    With `indices=None`, every complete run is returned in index order and each incomplete run
    is skipped with one warning naming them. With explicit `indices`, the runs come back in the
    order given, and a missing or incomplete run is an error (you asked for it by name).

    Args:
        exp_dir: experiment folder.
        indices: run indices to load, or None for all complete runs.

    Returns:
        List of `Run`, validated against experiment.json (ids < n_train, n_test columns, finite
        losses, steps+1 loss rows) and sharing one batch size.

    Raises:
        RunLogError: missing folder/files, bad dtype/shape/ids/NaN, mixed batch sizes, or a
            requested run that does not exist or is incomplete.
    """
    info = read_experiment(exp_dir)
    # `_folder`: the run folders live elsewhere (EXP/counterfactual), validated against EXP.
    exp_dir = Path(exp_dir if _folder is None else _folder)
    listing = list_runs(exp_dir)
    by_index = {i: (p, c) for i, p, c in listing}
    if indices is None:
        incomplete = [p.name for _, p, c in listing if not c]
        if incomplete:
            warnings.warn(
                f"{exp_dir}: skipping {len(incomplete)} incomplete run(s) without a complete "
                f"meta.json: {', '.join(incomplete)}",
                UserWarning,
                stacklevel=2,
            )
        chosen = [(i, p) for i, p, c in listing if c]
    else:
        chosen = []
        complete = [i for i, _, c in listing if c]
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int | np.integer):
                raise _error(f"{exp_dir}: run index {i!r} is not an int; pass run numbers")
            i = int(i)
            if any(i == j for j, _ in chosen):
                raise _error(f"{exp_dir}: run {i} is listed twice; pass each run once")
            if i not in by_index:
                raise _error(
                    f"{exp_dir}: run {i} not found (complete runs: {_format_indices(complete)})"
                )
            p, c = by_index[i]
            if not c:
                raise _error(
                    f"{p}: run {i} is incomplete (no meta.json with status complete); "
                    "finish or rerun it, or leave it out"
                )
            chosen.append((i, p))
    runs = [_read_run(i, p, info) for i, p in chosen]
    if runs:
        b0 = runs[0].batch
        for r in runs[1:]:
            if r.batch != b0:
                raise _error(
                    f"{r.path / CURRICULUM_FILE}: batch size {r.batch} differs from "
                    f"{runs[0].path.name}'s {b0}; all runs of an experiment share one batch size"
                )
    return runs


# ----------------------------------------------------------------------------------------------
# TracIn-CP dot products
# ----------------------------------------------------------------------------------------------


def _check_tracin(
    steps: np.ndarray,
    learning_rates: np.ndarray,
    dots: np.ndarray,
    mode: Any,
    proj_dim: Any,
    seed: Any,
    origin: str,
    info: dict | None,
) -> dict:
    if not np.issubdtype(steps.dtype, np.integer) or steps.ndim != 1 or steps.size < 1:
        raise _error(
            f"{origin}: 'steps' must be integers [K] with K >= 1, got {steps.dtype} {steps.shape}"
        )
    if (steps < 0).any() or (np.diff(steps) <= 0).any():
        raise _error(
            f"{origin}: 'steps' must be non-negative and strictly increasing, got {steps.tolist()}"
        )
    k = steps.shape[0]
    if not np.issubdtype(learning_rates.dtype, np.floating) or learning_rates.shape != (k,):
        raise _error(
            f"{origin}: 'learning_rates' must be float [{k}], got {learning_rates.dtype} "
            f"{learning_rates.shape}"
        )
    if not np.isfinite(learning_rates).all():
        raise _error(f"{origin}: 'learning_rates' holds non-finite values")
    if not np.issubdtype(dots.dtype, np.floating) or dots.ndim != 3 or dots.shape[0] != k:
        raise _error(
            f"{origin}: 'dots' must be float [K={k}, n_test, n_train], "
            f"got {dots.dtype} {dots.shape}"
        )
    if info is not None and dots.shape[1:] != (info["n_test"], info["n_train"]):
        raise _error(
            f"{origin}: 'dots' has shape {dots.shape}, but experiment.json says "
            f"n_test={info['n_test']}, n_train={info['n_train']}; "
            "recompute tracin for this experiment"
        )
    dots = dots.astype(np.float32, copy=False)
    if not np.isfinite(dots).all():
        kk = int(np.argwhere(~np.isfinite(dots))[0, 0])
        raise _error(
            f"{origin}: 'dots' holds non-finite values at checkpoint step {int(steps[kk])}"
        )
    mode = str(np.asarray(mode).item()) if np.ndim(mode) == 0 else mode
    if mode not in TRACIN_MODES:
        raise _error(f"{origin}: 'mode' must be one of {TRACIN_MODES}, got {mode!r}")
    try:
        proj_dim_i = int(np.asarray(proj_dim).item())
        seed_i = int(np.asarray(seed).item())
    except (TypeError, ValueError) as exc:
        raise _error(f"{origin}: 'proj_dim' and 'seed' must be integers ({exc})") from exc
    if (
        proj_dim_i < 0
        or (mode == "exact" and proj_dim_i != 0)
        or (mode == "projected" and proj_dim_i < 1)
    ):
        raise _error(
            f"{origin}: proj_dim={proj_dim_i} does not fit mode {mode!r} "
            "(exact needs 0, projected a positive dimension)"
        )
    return {
        "steps": steps.astype(np.int32),
        "learning_rates": learning_rates.astype(np.float32),
        "dots": dots,
        "mode": mode,
        "proj_dim": proj_dim_i,
        "seed": seed_i,
    }


def write_tracin(
    run_dir: str | os.PathLike,
    steps: Int[ArrayLike, " K"],
    learning_rates: Float[ArrayLike, " K"],
    dots: Float[ArrayLike, "K n_test n_train"],
    mode: str,
    proj_dim: int,
    seed: int,
) -> Path:
    """Validate and write `run_dir/tracin.npz` atomically.

    Args:
        run_dir: the run folder.
        steps: int [K] checkpoint steps, strictly increasing.
        learning_rates: float [K] learning rate at each checkpoint.
        dots: float [K, n_test, n_train] gradient dot products grad L(z_test) . grad L(z_train).
        mode: "exact" or "projected".
        proj_dim: projection dimension (0 for exact).
        seed: projection seed.

    Returns:
        Path of the written file.

    Raises:
        RunLogError: wrong dtype/shape, non-finite values, shape disagreeing with experiment.json.

    References:
        Pruthi et al., "Estimating Training Data Influence by Tracing Gradient Descent", 2020.
        https://arxiv.org/abs/2002.08484
    """
    path = Path(run_dir)
    origin = str(path / TRACIN_FILE)
    checked = _check_tracin(
        np.asarray(steps),
        np.asarray(learning_rates),
        np.asarray(dots),
        mode,
        proj_dim,
        seed,
        origin,
        _experiment_for_run(path),
    )
    return atomic_savez(
        path / TRACIN_FILE,
        steps=checked["steps"],
        learning_rates=checked["learning_rates"],
        dots=checked["dots"],
        mode=np.array(checked["mode"]),
        proj_dim=np.array(checked["proj_dim"], dtype=np.int64),
        seed=np.array(checked["seed"], dtype=np.int64),
    )


def read_tracin(run_dir: str | os.PathLike) -> dict | None:
    """Read and validate `run_dir/tracin.npz`.

    Args:
        run_dir: the run folder.

    Returns:
        None when there is no tracin.npz; else a dict with `steps` int32 [K], `learning_rates`
        float32 [K], `dots` float32 [K, n_test, n_train], `mode` str, `proj_dim` int, `seed` int.

    Raises:
        RunLogError: unreadable file, missing keys, wrong dtype/shape or non-finite values.
    """
    path = Path(run_dir) / TRACIN_FILE
    if not path.is_file():
        return None
    origin = str(path)
    try:  # our own handle: np.load leaks its file when the archive is truncated
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            missing = [
                k
                for k in ("steps", "learning_rates", "dots", "mode", "proj_dim", "seed")
                if k not in data.files
            ]
            if missing:
                raise _error(
                    f"{origin}: missing arrays {missing}; recompute it with `finetune tracin`"
                )
            arrays = {k: data[k] for k in data.files}
    except RunLogError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        # A truncated or corrupted archive (BadZipFile) or member (zlib.error).
        raise _error(f"{origin}: cannot read as .npz ({exc}); delete it and recompute") from exc
    return _check_tracin(
        arrays["steps"],
        arrays["learning_rates"],
        arrays["dots"],
        arrays["mode"],
        arrays["proj_dim"],
        arrays["seed"],
        origin,
        _experiment_for_run(Path(run_dir)),
    )


# ----------------------------------------------------------------------------------------------
# Counterfactual proposals and runs (EXP/counterfactual/)
# ----------------------------------------------------------------------------------------------

COUNTERFACTUAL_DIR = "counterfactual"
PROPOSALS_FILE = "proposals.json"
PROPOSAL_CURRICULA_FILE = "proposals.npz"
# Written by `simfluence counterfactual score`; removed when new counterfactual runs train.
COUNTERFACTUAL_REPORT_FILES = ("report.json", "report.md", "predicted_vs_actual.png")
_PROPOSAL_KEYS = ("id", "kind", "base_run", "test", "k", "removed", "run")


def counterfactual_dir(exp_dir: str | os.PathLike) -> Path:
    """Folder of an experiment's counterfactual check (`EXP/counterfactual`); nothing is created.

    Args:
        exp_dir: experiment folder.

    Returns:
        `exp_dir / "counterfactual"`. Its `run_XXX/` folders are run logs like `EXP`'s own, with
        the proposal they train recorded in `meta.json`; `EXP`'s own readers never see them.
    """
    return Path(exp_dir) / COUNTERFACTUAL_DIR


def curricula_sha256(curricula: Int[ArrayLike, "P T b"]) -> str:
    """Content hash of proposal curricula (int32, C order, shape included).

    Args:
        curricula: int [P, T, b].

    Returns:
        Hex SHA-256 of the shape and the int32 bytes.
    """
    import hashlib

    arr = np.ascontiguousarray(np.asarray(curricula, dtype=np.int32))
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _check_proposals(proposals: Any, curricula: np.ndarray, info: dict, origin: str) -> list[dict]:
    n_train, n_test = info["n_train"], info["n_test"]
    if not isinstance(proposals, list) or not proposals:
        raise _error(f"{origin}: 'proposals' must be a non-empty list; propose again")
    if (
        curricula.ndim != 3
        or not np.issubdtype(curricula.dtype, np.integer)
        or 0 in curricula.shape
    ):
        raise _error(
            f"{origin}: proposal curricula have dtype {curricula.dtype} shape {curricula.shape}; "
            "expected int [proposals, steps, batch]; propose again"
        )
    if curricula.shape[0] != len(proposals):
        raise _error(
            f"{origin}: {len(proposals)} proposals but {curricula.shape[0]} curricula; "
            "propose again"
        )
    if curricula.min() < 0 or curricula.max() >= n_train:
        raise _error(
            f"{origin}: a proposal curriculum holds id {int(curricula.max())} or "
            f"{int(curricula.min())} outside 0..{n_train - 1} (n_train in experiment.json); "
            "propose again for this experiment"
        )
    out = []
    for pos, p in enumerate(proposals):
        where = f"{origin}: proposal {pos}"
        if not isinstance(p, dict) or any(k not in p for k in _PROPOSAL_KEYS):
            raise _error(f"{where} lacks one of {', '.join(_PROPOSAL_KEYS)}; propose again")
        if p["id"] != pos or p["run"] != f"run_{pos:03d}":
            raise _error(
                f"{where} has id {p['id']!r} and run {p['run']!r}; expected {pos} and "
                f"run_{pos:03d}; propose again"
            )
        if not isinstance(p["kind"], str) or not p["kind"]:
            raise _error(f"{where}: kind must be a non-empty string")
        for key, hi in (("base_run", None), ("test", n_test), ("k", None)):
            v = p[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (hi and v >= hi):
                rng = f"0..{hi - 1}" if hi else ">= 0"
                raise _error(f"{where}: {key}={v!r} must be an int in {rng}")
        removed = p["removed"]
        if not isinstance(removed, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_train for i in removed
        ):
            raise _error(f"{where}: removed must be a list of pool positions 0..{n_train - 1}")
        out.append(p)
    return out


def _content_sha256(data: dict) -> str:
    """Hash of a proposals.json dict without its own `content_sha256` (canonical JSON)."""
    import hashlib

    body = {k: v for k, v in data.items() if k not in ("content_sha256", "curricula")}
    text = json.dumps(body, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_proposals(
    exp_dir: str | os.PathLike,
    proposals: Sequence[dict],
    curricula: Int[ArrayLike, "P T b"],
    header: dict | None = None,
) -> Path:
    """Validate and write `EXP/counterfactual/proposals.npz`, then `proposals.json` (last).

    Args:
        exp_dir: experiment folder (holding experiment.json).
        proposals: one dict per proposal with `id` (its position), `kind`, `base_run`, `test`,
            `k`, `removed` (pool positions) and `run` (`run_{id:03d}`), plus anything JSON.
        curricula: int [P, T, b]: the curriculum proposal `id` trains, exactly.
        header: extra JSON (settings, simulator files) stored beside the proposals; the
            experiment's `experiment_sha256`, the curricula's hash and a hash of the whole
            content are added, so readers refuse proposals of another experiment or edited ones.

    Returns:
        Path of proposals.json.

    Raises:
        RunLogError: malformed proposals or curricula (ids outside the pool, counts differ).
    """
    exp_dir = Path(exp_dir)
    info = read_experiment(exp_dir)
    folder = counterfactual_dir(exp_dir)
    cur = np.asarray(curricula)
    props = _check_proposals(list(proposals), cur, info, str(folder / PROPOSALS_FILE))
    cur = cur.astype(np.int32)
    out = dict(header or {})
    out.update(
        experiment_sha256=experiment_sha256(exp_dir),
        curricula_sha256=curricula_sha256(cur),
        proposals=props,
    )
    out["content_sha256"] = _content_sha256(out)
    (folder / PROPOSALS_FILE).unlink(missing_ok=True)
    atomic_savez(folder / PROPOSAL_CURRICULA_FILE, curricula=cur)
    return atomic_write_json(folder / PROPOSALS_FILE, out)


def read_proposals(exp_dir: str | os.PathLike) -> dict | None:
    """Read and validate the counterfactual proposals of an experiment.

    Args:
        exp_dir: experiment folder.

    Returns:
        None when `EXP/counterfactual/proposals.json` does not exist; else proposals.json's
        content with `curricula` (int32 [P, T, b], read-only) added.

    Raises:
        RunLogError: unreadable or malformed files, or curricula that do not match the hash
            recorded in proposals.json.
    """
    exp_dir = Path(exp_dir)
    folder = counterfactual_dir(exp_dir)
    path = folder / PROPOSALS_FILE
    if not path.is_file():
        return None
    info = read_experiment(exp_dir)
    data = _read_json(path, "proposals.json")
    if not isinstance(data, dict) or "proposals" not in data or "curricula_sha256" not in data:
        raise _error(f"{path}: not a proposals file (no proposals or curricula_sha256)")
    if data.get("content_sha256") != _content_sha256(data):
        raise _error(
            f"{path}: its content does not match its content_sha256 (edited after proposing?); "
            f"delete {folder} and propose again"
        )
    npz = folder / PROPOSAL_CURRICULA_FILE
    if not npz.is_file():
        raise _error(f"{npz}: not found beside {path.name}; propose again")
    try:
        with open(npz, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # closed on errors
            cur = z["curricula"]
    except Exception as exc:  # OSError, BadZipFile, a missing key: one line naming the file
        raise _error(
            f"{npz}: cannot read curricula ({type(exc).__name__}: {exc}); propose again"
        ) from exc
    if curricula_sha256(cur) != data["curricula_sha256"]:
        raise _error(
            f"{npz}: its curricula do not match the hash in {path.name} (changed after "
            "proposing?); propose again"
        )
    _check_proposals(data["proposals"], cur, info, str(path))
    cur = cur.astype(np.int32)
    cur.setflags(write=False)
    return dict(data, curricula=cur)


def load_counterfactual_runs(
    exp_dir: str | os.PathLike, indices: Sequence[int] | None = None
) -> list[Run]:
    """Load complete counterfactual runs (`EXP/counterfactual/run_XXX`), validated against
    `EXP/experiment.json`, like `load_runs`.

    Args:
        exp_dir: experiment folder (not its counterfactual folder).
        indices: proposal ids to load (errors if missing or incomplete), or None for every
            complete one (incomplete ones are skipped with a warning).

    Returns:
        List of `Run`.

    Raises:
        RunLogError: as `load_runs`.
    """
    return load_runs(exp_dir, indices, _folder=counterfactual_dir(exp_dir))


# ----------------------------------------------------------------------------------------------
# Example features (EXP/features/<kind>.npz), written by `finetune features`
# ----------------------------------------------------------------------------------------------

FEATURES_DIR = "features"
# hidden: mean-pooled encoder states of input and answer; tracin: projected step-0 gradient.
FEATURE_KINDS = ("hidden", "tracin")


def features_path(exp_dir: str | os.PathLike, kind: str) -> Path:
    """`EXP/features/<kind>.npz` (nothing is created).

    Raises:
        RunLogError: an unknown kind.
    """
    if kind not in FEATURE_KINDS:
        raise _error(f"unknown feature kind {kind!r}; use one of {', '.join(FEATURE_KINDS)}")
    return Path(exp_dir) / FEATURES_DIR / f"{kind}.npz"


def _check_features(arrays: dict, origin: str, info: dict | None) -> dict:
    out = {}
    dim = None
    for key in ("pool", "test", "outside"):
        a = np.asarray(arrays[key])
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
            raise _error(
                f"{origin}: {key} has dtype {a.dtype} shape {a.shape}; expected float [n, d]"
            )
        if dim is None:
            dim = a.shape[1]
        elif a.shape[1] != dim:
            raise _error(f"{origin}: {key} has {a.shape[1]} columns, pool {dim}; recompute it")
        if not np.isfinite(a).all():
            raise _error(f"{origin}: {key} holds NaN or inf; delete it and recompute")
        out[key] = a.astype(np.float32)
    if info is not None:
        for key, n in (("pool", info["n_train"]), ("test", info["n_test"])):
            if out[key].shape[0] != n:
                raise _error(
                    f"{origin}: {key} has {out[key].shape[0]} rows but experiment.json says "
                    f"{n}; it belongs to another experiment: delete it and recompute"
                )
    ids = [str(x) for x in np.asarray(arrays["outside_ids"]).tolist()]
    if len(ids) != out["outside"].shape[0]:
        raise _error(f"{origin}: {len(ids)} outside_ids for {out['outside'].shape[0]} rows")
    out["outside_ids"] = ids
    for key in ("model_sha256", "ids_sha256"):
        out[key] = str(np.asarray(arrays[key]))
    settings = arrays["settings"]
    out["settings"] = (
        json.loads(str(np.asarray(settings))) if not isinstance(settings, dict) else settings
    )
    return out


def write_features(
    exp_dir: str | os.PathLike,
    kind: str,
    *,
    pool: Float[ArrayLike, "n_train d"],
    test: Float[ArrayLike, "n_test d"],
    outside: Float[ArrayLike, "n_out d"],
    outside_ids: Sequence[str],
    model_sha256: str,
    ids_sha256: str,
    settings: dict,
) -> Path:
    """Validate and write `EXP/features/<kind>.npz` atomically.

    Args:
        exp_dir: experiment folder.
        kind: one of `FEATURE_KINDS`.
        pool: f32 [n_train, d] features of the training pool (rows = pool positions).
        test: f32 [n_test, d] features of the tracked test examples.
        outside: f32 [n_out, d] features of training-split examples outside the pool (n_out may
            be 0).
        outside_ids: n_out dataset ids of those examples.
        model_sha256: hash of the starting model's parameters the features came from.
        ids_sha256: hash of the example ids (and tokens) the features are of.
        settings: JSON-ready dict (projection dim, seed, ...).

    Returns:
        The path written.

    Raises:
        RunLogError: bad shapes or values, or sizes disagreeing with experiment.json.
    """
    path = features_path(exp_dir, kind)
    arrays = dict(
        pool=pool,
        test=test,
        outside=outside,
        outside_ids=np.asarray(list(outside_ids), dtype=str),
        model_sha256=model_sha256,
        ids_sha256=ids_sha256,
        settings=json.dumps(settings, sort_keys=True),
    )
    checked = _check_features(arrays, str(path), read_experiment(exp_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_savez(
        path,
        pool=checked["pool"],
        test=checked["test"],
        outside=checked["outside"],
        outside_ids=np.asarray(checked["outside_ids"], dtype=str),
        model_sha256=np.array(model_sha256),
        ids_sha256=np.array(ids_sha256),
        settings=np.array(json.dumps(settings, sort_keys=True)),
    )


def read_features(exp_dir: str | os.PathLike, kind: str) -> dict | None:
    """Read and validate `EXP/features/<kind>.npz`.

    Returns:
        None when absent; else {"pool" f32 [n_train, d], "test" f32 [n_test, d], "outside"
        f32 [n_out, d], "outside_ids" list[str], "model_sha256", "ids_sha256", "settings"}.

    Raises:
        RunLogError: unreadable file, missing keys, bad shapes or values.
    """
    path = features_path(exp_dir, kind)
    if not path.is_file():
        return None
    keys = ("pool", "test", "outside", "outside_ids", "model_sha256", "ids_sha256", "settings")
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise _error(f"{path}: missing arrays {missing}; recompute it (finetune features)")
            arrays = {k: data[k] for k in keys}
    except RunLogError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _error(f"{path}: cannot read as .npz ({exc}); delete it and recompute") from exc
    return _check_features(arrays, str(path), read_experiment(exp_dir))
