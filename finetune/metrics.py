"""Live training metrics: TensorBoard event files, Weights & Biases, and batch-log lines.

While a group of runs trains, every ``log_every`` steps (and at its last step) the loop
(`finetune.trainer`) hands `LiveMetrics` the group's scalars, averaged over the runs the call
writes:

- ``train/loss``: the mean training (batch) loss of step t (metrics.jsonl's ``train_loss``);
- ``test/loss_mean``: the mean tracked test loss after step t (row t of losses.npy), also at
  step 0 when the group starts from scratch;
- ``train/learning_rate``: the rate used at step t (lr.npy);
- ``perf/steps_per_second`` and ``perf/run_steps_per_second``: group steps (and run-steps) per
  second since the previous log point (the first interval includes the compilation).

They go to TensorBoard event files (`tensorboardX`), one folder per group,
``RUNS_DIR/tensorboard/runs_<first>-<last>/`` (RUNS_DIR: EXP, or EXP/counterfactual), flushed
at every log point; to one Weights & Biases run per group (``--report-to wandb``); and, for
batch jobs (``--no-progress``), to one flushed line on stderr. Logging reads values the loop
copies to the host anyway: it changes no number and no file of the runs.

`read_scalars` reads an event folder back (tests, notebooks) without TensorBoard installed.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPORT_TO = ("tensorboard", "wandb")
DEFAULT_REPORT_TO = ("tensorboard",)
DEFAULT_LOG_EVERY = 10
TENSORBOARD_DIR = "tensorboard"
_MODULES = {"tensorboard": "tensorboardX", "wandb": "wandb"}
_INSTALL = {"tensorboard": "pip install tensorboardX", "wandb": "pip install wandb"}


class MetricsError(ValueError):
    """A --report-to or --log-every value this machine cannot honour."""


def parse_report_to(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """The metric sinks named by ``--report-to`` (comma-separated; ``none``: no sink).

    Args:
        value: e.g. ``"tensorboard,wandb"``, ``"none"``, a sequence of names, or None (none).

    Returns:
        The sinks, a subset of `REPORT_TO`, in the given order without repeats.

    Raises:
        MetricsError: an unknown name, or ``none`` together with another one.
    """
    if value is None:
        return ()
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    names = [n for n in names if n]
    if "none" in names:
        if len(names) > 1:
            raise MetricsError(f"--report-to {','.join(names)}: 'none' cannot be combined")
        return ()
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise MetricsError(
            f"--report-to {','.join(names)}: unknown {bad[0]!r}; choose from "
            f"{', '.join(REPORT_TO)} or none (comma-separated)"
        )
    return tuple(dict.fromkeys(names))


def check_report_to(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`parse_report_to`, then checks that each sink's library is installed (before training).

    Raises:
        MetricsError: see `parse_report_to`; a sink whose library is not importable (the
            message says what to install, or to leave it out of --report-to).
    """
    names = parse_report_to(value)
    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            others = ",".join(n for n in names if n != name) or "none"
            raise MetricsError(
                f"--report-to {name}: {_MODULES[name]} is not installed; {_INSTALL[name]}, "
                f"or pass --report-to {others}"
            )
    return names


def check_log_every(value: int) -> int:
    """Refuses a logging interval below 1 step (``--log-every``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MetricsError(f"--log-every {value!r}: expected a positive number of steps")
    return value


def group_name(keys: Sequence[int]) -> str:
    """The name of a group of runs: ``runs_<first>-<last>`` (its TensorBoard folder)."""
    return f"runs_{keys[0]:03d}-{keys[-1]:03d}"


class LiveMetrics:
    """The metric sinks of one training call (`finetune.trainer.run_experiment` or
    `finetune.counterfactual.run_counterfactuals`).

    Args:
        name: the experiment's name (prefix of the log lines, wandb group).
        runs_dir: folder of the run folders; event files go under ``runs_dir/tensorboard``.
        report_to: sinks from `check_report_to`.
        log_every: log every this many steps (and at each group's last step).
        lines: print one flushed line per phase and per log point on stderr (batch jobs).
        config: JSON-able config recorded by wandb.
        stream: where lines go (default: ``sys.stderr`` at the time of writing).
    """

    def __init__(
        self,
        name: str,
        runs_dir: str | os.PathLike,
        *,
        report_to: Sequence[str] = (),
        log_every: int = DEFAULT_LOG_EVERY,
        lines: bool = False,
        config: dict | None = None,
        stream: Any = None,
    ) -> None:
        self.name = name
        self.runs_dir = Path(runs_dir)
        self.report_to = tuple(report_to)
        self.log_every = check_log_every(log_every)
        self.lines = lines
        self.config = config or {}
        self._stream = stream
        self._tb = None
        self._wandb = None
        self._group = ""
        self._label = ""
        self._last = (0, 0.0)  # (step, time) of the previous log point
        self._started = time.perf_counter()

    # -- lines -------------------------------------------------------------------------------

    def line(self, text: str) -> None:
        """One flushed line ``[name] text`` on stderr (only in line mode)."""
        if not self.lines:
            return
        stream = self._stream or sys.stderr
        stream.write(f"[{self.name}] {text}\n")
        stream.flush()

    def elapsed(self) -> float:
        """Seconds since this call began (since the `LiveMetrics` was made)."""
        return time.perf_counter() - self._started

    def restart_clock(self, step: int) -> None:
        """Counts the next steps/s from now and ``step`` (after the compilation)."""
        self._last = (step, time.perf_counter())

    # -- groups ------------------------------------------------------------------------------

    def start_group(self, keys: Sequence[int], index: int, total: int, s0: int) -> None:
        """Opens the sinks of a group of runs (trained together from step ``s0``).

        Args:
            keys: the run keys of the group, in vmap order.
            index: the group's position among the groups this call trains (0-based).
            total: the number of groups this call trains.
            s0: the step the group continues from (0, or its latest checkpoint).
        """
        self.close_group()
        self._group = group_name(keys)
        what = "counterfactual runs" if self.runs_dir.name == "counterfactual" else "runs"
        self._label = f"{what} {keys[0]}-{keys[-1]}"
        self.line(
            f"group {index + 1} of {total}: {self._label}" + (f", from step {s0}" if s0 else "")
        )
        if "tensorboard" in self.report_to:
            self._tb = _EventWriter(self.runs_dir / TENSORBOARD_DIR / self._group, s0)
        if "wandb" in self.report_to:
            import wandb

            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "simfluence",
                group=self.name,
                name=f"{self.name} {self._group}",
                config=self.config,
                dir=str(self.runs_dir),
            )
        self._last = (s0, time.perf_counter())

    def due(self, step: int, last_step: int) -> bool:
        """Whether ``step`` is a log point: a multiple of ``log_every``, or the last step."""
        return step % self.log_every == 0 or step == last_step

    def log(
        self,
        step: int,
        *,
        train_loss: float | None,
        test_loss: float,
        lr: float | None,
        runs: int,
        last_step: int,
    ) -> None:
        """Writes the scalars of one log point of the current group.

        Args:
            step: the step just taken (0: before the first step; only the test loss).
            train_loss: mean training loss of that step over the runs (None at step 0).
            test_loss: mean tracked test loss after that step, over runs and examples.
            lr: learning rate of that step (None at step 0).
            runs: runs trained together (for run-steps per second).
            last_step: the runs' last step (for the line).
        """
        now = time.perf_counter()
        scalars = {"test/loss_mean": float(test_loss)}
        if step > 0:
            prev_step, prev_time = self._last
            rate = (step - prev_step) / max(now - prev_time, 1e-9)
            scalars.update(
                {
                    "train/loss": float(train_loss),
                    "train/learning_rate": float(lr),
                    "perf/steps_per_second": rate,
                    "perf/run_steps_per_second": rate * runs,
                }
            )
            self.line(
                f"{self._label} step {step}/{last_step}: train loss {train_loss:.4f}, test loss "
                f"{test_loss:.4f}, lr {lr:.3g}, {rate:.2f} steps/s"
            )
        self._last = (step, now)
        if self._tb is not None:
            self._tb.write(step, scalars)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close_group(self) -> None:
        """Flushes and closes the current group's sinks."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    close = close_group


_WRITERS = [0]  # event files opened by this process (their names must differ)


class _EventWriter:
    """One TensorBoard event file, written synchronously with tensorboardX's record writer.

    tensorboardX's ``SummaryWriter`` queues events to a background thread, and its ``flush``
    does not wait for that queue, so a point could reach the disk only after the next one.
    Here every log point is on disk when `write` returns.
    """

    def __init__(self, logdir: Path, s0: int) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        self._pb = event_pb2
        logdir.mkdir(parents=True, exist_ok=True)
        _WRITERS[0] += 1
        self._writer = EventsWriter(str(logdir / "events"), f".{os.getpid()}.{_WRITERS[0]}")
        if s0:
            # A resumed group redoes the steps after its checkpoint s0: a session START at
            # s0 + 1 makes TensorBoard drop the earlier call's events from there on (what
            # ``SummaryWriter(purge_step=...)`` writes), so the curves do not double back.
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._writer.write_event(
                event_pb2.Event(wall_time=time.time(), step=s0 + 1, session_log=start)
            )
        self._writer.flush()

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboardX.proto import summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        event = self._pb.Event(
            wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
        )
        self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Reads the scalars of every TensorBoard event file in a folder (no TensorBoard needed).

    Args:
        logdir: a group's event folder, e.g. ``EXP/tensorboard/runs_000-031``.

    Returns:
        {tag: [(step, value), ...]} in file order (files sorted by name, i.e. by creation).

    Raises:
        MetricsError: no event file in ``logdir``, or a truncated record.
    """
    from tensorboardX.proto import event_pb2

    files = sorted(Path(logdir).glob("events.out.tfevents.*"))
    if not files:
        raise MetricsError(f"{logdir}: no TensorBoard event file (events.out.tfevents.*)")
    out: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        data = path.read_bytes()
        i = 0
        while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            if i + 12 > len(data):
                raise MetricsError(f"{path}: truncated record at byte {i}")
            (n,) = struct.unpack("<Q", data[i : i + 8])
            if i + 12 + n + 4 > len(data):
                raise MetricsError(f"{path}: truncated record at byte {i}")
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out
