"""Multi-process start-up, the device mesh, and placing host arrays on it.

Start-up: one call before any JAX computation, a no-op on a single process.

Every process of a multi-host (or one-process-per-GPU) job calls :func:`initialize` first; it
calls ``jax.distributed.initialize`` once, with the coordinator address, process count and
process id taken from, in order of precedence:

1. the arguments (the ``finetune run`` flags ``--coordinator-address``, ``--num-processes``,
   ``--process-id``; ``scripts/launch_multihost.sh`` passes them);
2. the environment variables ``SIMFLUENCE_COORDINATOR`` (``HOST:PORT``),
   ``SIMFLUENCE_NUM_PROCESSES`` and ``SIMFLUENCE_PROCESS_ID``;
3. automatic detection by JAX (``jax.distributed.initialize()`` with no arguments) when
   ``SIMFLUENCE_DISTRIBUTED=1`` (``scripts/tpu/worker.sh`` sets it on Cloud TPU VMs, where the
   workers find each other through the metadata server), or when the environment shows a
   launcher with several processes: a TPU slice on GKE (``TPU_WORKER_HOSTNAMES`` or
   ``TPU_PROCESS_ADDRESSES`` listing several hosts), a Slurm step with ``SLURM_NTASKS > 1``, or
   Open MPI with ``OMPI_COMM_WORLD_SIZE > 1``.

``SIMFLUENCE_DISTRIBUTED=0`` switches detection (3) off. With none of these, or with a single
process, nothing is called and the program runs as a plain single-process JAX program.

Mesh and placement: one 1-D data-parallel mesh (axis ``"data"``, :func:`make_mesh`) even on one
device, so the same code runs on fake CPU devices in tests and on a pod. Host arrays, identical
on every process, become global arrays through :func:`put` (multi-host safe); parameters and
optimizer states are replicated (:func:`place`); batch rows are split over ``"data"`` when they
divide evenly over the devices (:func:`batch_sharding`, :func:`rows_sharding`), else replicated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["batch_sharding", "initialize", "make_mesh", "place", "put", "rows_sharding"]

_log = logging.getLogger(__name__)

_ENV_COORDINATOR = "SIMFLUENCE_COORDINATOR"
_ENV_NUM_PROCESSES = "SIMFLUENCE_NUM_PROCESSES"
_ENV_PROCESS_ID = "SIMFLUENCE_PROCESS_ID"
_ENV_DISTRIBUTED = "SIMFLUENCE_DISTRIBUTED"
_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)

# The settings of the first call: None before it, then ("single",), ("auto",) or
# ("explicit", address, num_processes, process_id). Later calls compare against it.
_state: tuple | None = None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts the JAX distributed runtime when this process is one of several.

    Call it once at start-up, before any other JAX call (``jax.devices()`` included): JAX
    refuses to join a distributed job after its backends exist. Calling it again with the same
    settings returns the first result without doing anything.

    Args:
        coordinator_address: ``HOST:PORT`` of process 0's coordinator service (any free port,
            the same on every process). ``None``: ``SIMFLUENCE_COORDINATOR``, else detection.
        num_processes: Total number of processes, >= 1. ``None``: ``SIMFLUENCE_NUM_PROCESSES``,
            else detection.
        process_id: This process's index in ``[0, num_processes)``. ``None``:
            ``SIMFLUENCE_PROCESS_ID``, else detection.

    Returns:
        True when ``jax.distributed.initialize`` has been called (now or by an earlier call), so
        that ``jax.process_count()`` may exceed 1; False for a single process (nothing called).

    Raises:
        ValueError: A setting is malformed (address not ``HOST:PORT``, ``num_processes < 1``,
            ``process_id`` outside ``[0, num_processes)``, an environment variable that is not
            an integer), only some of the three settings are given, or a second call asks for
            different settings than the first.
    """
    global _state
    settings = _resolve(coordinator_address, num_processes, process_id)
    if _state is not None:
        if settings != _state:
            raise ValueError(
                f"finetune.distributed.initialize was already called with {_describe(_state)}; "
                f"cannot switch to {_describe(settings)} in the same process (restart it)"
            )
        return _state[0] != "single"
    if settings[0] == "single":
        _state = settings
        return False
    try:
        if settings[0] == "auto":
            _log.info("jax.distributed.initialize() with automatic cluster detection")
            jax.distributed.initialize()
        else:
            _, address, count, index = settings
            _log.info("jax.distributed.initialize(%s, %d, %d)", address, count, index)
            jax.distributed.initialize(
                coordinator_address=address, num_processes=count, process_id=index
            )
    except RuntimeError as error:
        # Someone (a launcher, a notebook cell) already initialized the runtime: use it.
        if "only be called once" not in str(error):
            raise
        _log.info("jax.distributed was already initialized; using it")
    _state = settings
    return True


def _resolve(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> tuple:
    """Merges arguments, explicit environment variables and detection into one setting."""
    env = os.environ
    address = coordinator_address
    if address is None and env.get(_ENV_COORDINATOR):
        address = env[_ENV_COORDINATOR]
    count = num_processes
    if count is None and env.get(_ENV_NUM_PROCESSES):
        count = _env_int(_ENV_NUM_PROCESSES)
    index = process_id
    if index is None and env.get(_ENV_PROCESS_ID):
        index = _env_int(_ENV_PROCESS_ID)

    given = {"coordinator_address": address, "num_processes": count, "process_id": index}
    if any(value is not None for value in given.values()):
        _check_count(count, index)
        if count == 1:
            return ("single",)
        missing = [name for name, value in given.items() if value is None]
        if missing:
            present = ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None)
            raise ValueError(
                f"multi-process settings incomplete: {present} given but {', '.join(missing)} "
                "missing; pass all three flags (--coordinator-address HOST:PORT "
                "--num-processes N --process-id I) or set "
                f"{_ENV_COORDINATOR}, {_ENV_NUM_PROCESSES}, {_ENV_PROCESS_ID}"
            )
        _check_address(address)
        return ("explicit", address, count, index)

    flag = env.get(_ENV_DISTRIBUTED, "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return ("single",)
    if flag in ("1", "true", "yes", "on", "auto"):
        return ("auto",)
    if flag:
        raise ValueError(
            f"{_ENV_DISTRIBUTED}={env[_ENV_DISTRIBUTED]!r} is not understood; "
            "set it to 1 (detect the cluster) or 0 (single process), or unset it"
        )
    return ("auto",) if _cluster_detected(env) else ("single",)


def _cluster_detected(env: os._Environ | dict) -> bool:
    """True when a launcher's environment shows several processes that JAX can detect."""
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in env.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return True
    if all(name in env for name in _SLURM_VARS) and _int_or_zero(env["SLURM_NTASKS"]) > 1:
        return True
    return _int_or_zero(env.get("OMPI_COMM_WORLD_SIZE", "")) > 1


def _int_or_zero(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer; set it to a whole number") from None


def _check_count(count: int | None, index: int | None) -> None:
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"num_processes={count!r} must be an integer >= 1 (--num-processes)")
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"process_id={index!r} must be an integer >= 0 (--process-id)")
        if count is not None and index >= count:
            raise ValueError(
                f"process_id={index} is out of range for num_processes={count}; "
                f"use 0..{count - 1} (--process-id)"
            )


def _check_address(address: str) -> None:
    host, sep, port = str(address).rpartition(":")
    host = host.strip("[]")  # [::1]:1234
    ok = bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
    if not ok or any(c.isspace() for c in str(address)):
        raise ValueError(
            f"coordinator_address={address!r} is not HOST:PORT; pass e.g. "
            "--coordinator-address host0:12355 (process 0's host, a free port)"
        )


def _describe(settings: tuple) -> str:
    if settings[0] == "single":
        return "a single process"
    if settings[0] == "auto":
        return "automatic cluster detection"
    _, address, count, index = settings
    return f"coordinator_address={address!r}, num_processes={count}, process_id={index}"


# ----------------------------------------------------------------------------------------------
# The mesh and placement


def make_mesh(devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh ("data",) over the given devices (default: all)."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh(
        (len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
    )


def put(x, sharding: NamedSharding) -> jax.Array:
    """Places a host array (identical on every process) with ``sharding`` (works multi-host)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def place(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """A tree of host arrays replicated on every device of ``mesh`` (parameters, states)."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: put(x, replicated), tree)


def rows_sharding(mesh: jax.sharding.Mesh, rows: int) -> NamedSharding:
    """Rows split over the "data" axis when they divide evenly, else replicated."""
    n_dev = len(mesh.devices.flat)
    return NamedSharding(mesh, P("data") if rows % n_dev == 0 else P())


def batch_sharding(mesh: jax.sharding.Mesh, batch_size: int) -> NamedSharding:
    """``[R, batch, ...]`` batches of R runs: the batch axis split over "data" when it divides
    evenly over the devices, else replicated."""
    n_dev = len(mesh.devices.flat)
    spec = P(None, "data") if batch_size % n_dev == 0 else P()
    return NamedSharding(mesh, spec)
