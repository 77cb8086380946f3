"""finetune.distributed.initialize: when it calls jax.distributed.initialize, with what, and errors.

jax.distributed.initialize is replaced by a recorder: the real one would start a coordinator
service and wait for the other processes.
"""

import jax
import pytest

from finetune import distributed

_ENV = (
    "SIMFLUENCE_COORDINATOR",
    "SIMFLUENCE_NUM_PROCESSES",
    "SIMFLUENCE_PROCESS_ID",
    "SIMFLUENCE_DISTRIBUTED",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_HOSTNAMES",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_COMM_WORLD_SIZE",
)


@pytest.fixture
def calls(monkeypatch):
    """Clean environment and module state; returns the list of recorded initialize calls."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_state", None)
    recorded = []
    monkeypatch.setattr(
        jax.distributed, "initialize", lambda *args, **kwargs: recorded.append((args, kwargs))
    )
    return recorded


def test_single_process_is_a_noop(calls):
    assert distributed.initialize() is False
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1, process_id=0) is False
    assert calls == []


def test_explicit_flags_are_passed_once(calls):
    assert distributed.initialize("host0:12355", 4, 3) is True
    assert calls == [
        ((), {"coordinator_address": "host0:12355", "num_processes": 4, "process_id": 3})
    ]
    # Idempotent: the same settings again do nothing more.
    assert distributed.initialize("host0:12355", 4, 3) is True
    assert len(calls) == 1
    with pytest.raises(ValueError, match="already called"):
        distributed.initialize("host0:12355", 4, 2)


def test_environment_variables(calls, monkeypatch):
    monkeypatch.setenv("SIMFLUENCE_COORDINATOR", "10.0.0.2:9000")
    monkeypatch.setenv("SIMFLUENCE_NUM_PROCESSES", "2")
    monkeypatch.setenv("SIMFLUENCE_PROCESS_ID", "1")
    assert distributed.initialize() is True
    assert calls == [
        ((), {"coordinator_address": "10.0.0.2:9000", "num_processes": 2, "process_id": 1})
    ]


def test_flags_override_environment(calls, monkeypatch):
    monkeypatch.setenv("SIMFLUENCE_COORDINATOR", "10.0.0.2:9000")
    monkeypatch.setenv("SIMFLUENCE_NUM_PROCESSES", "2")
    monkeypatch.setenv("SIMFLUENCE_PROCESS_ID", "1")
    assert distributed.initialize(process_id=0) is True
    assert calls[0][1]["process_id"] == 0


@pytest.mark.parametrize(
    "env",
    [
        {"SIMFLUENCE_DISTRIBUTED": "1"},
        {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"},
        {"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"},
        {
            "SLURM_JOB_ID": "7",
            "SLURM_STEP_NODELIST": "n[1-2]",
            "SLURM_NTASKS": "2",
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
        },
        {"OMPI_COMM_WORLD_SIZE": "4"},
    ],
)
def test_detected_clusters_call_without_arguments(calls, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.initialize() is True
    assert calls == [((), {})]


@pytest.mark.parametrize(
    "env",
    [
        {"TPU_WORKER_HOSTNAMES": "w0"},
        {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"},
        {"OMPI_COMM_WORLD_SIZE": "1"},
        {"TPU_WORKER_HOSTNAMES": "w0,w1", "SIMFLUENCE_DISTRIBUTED": "0"},
    ],
)
def test_single_process_environments_call_nothing(calls, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.initialize() is False
    assert calls == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, "num_processes=0"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "process_id=2"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": -1}, "process_id=-1"),
        ({"coordinator_address": "host0", "num_processes": 2, "process_id": 0}, "'host0'"),
        ({"coordinator_address": "host0:port", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
        ({"coordinator_address": ":1234", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
        ({"coordinator_address": "h:70000", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
        ({"coordinator_address": "h:1", "num_processes": 2}, "process_id missing"),
        ({"num_processes": 2, "process_id": 1}, "coordinator_address missing"),
    ],
)
def test_bad_settings_raise_one_line(calls, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        distributed.initialize(**kwargs)
    assert "\n" not in str(info.value)
    assert calls == []


def test_bad_environment_values(calls, monkeypatch):
    monkeypatch.setenv("SIMFLUENCE_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="SIMFLUENCE_NUM_PROCESSES='two'"):
        distributed.initialize()
    monkeypatch.delenv("SIMFLUENCE_NUM_PROCESSES")
    monkeypatch.setenv("SIMFLUENCE_DISTRIBUTED", "maybe")
    with pytest.raises(ValueError, match="SIMFLUENCE_DISTRIBUTED='maybe'"):
        distributed.initialize()
    assert calls == []


def test_ipv6_address_is_accepted(calls):
    assert distributed.initialize("[::1]:12355", 2, 0) is True
    assert calls[0][1]["coordinator_address"] == "[::1]:12355"


def test_runtime_already_initialized_elsewhere(calls, monkeypatch):
    def already(*args, **kwargs):
        raise RuntimeError("distributed.initialize should only be called once.")

    monkeypatch.setattr(jax.distributed, "initialize", already)
    assert distributed.initialize("h:1", 2, 0) is True


def test_other_runtime_errors_propagate(calls, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("coordinator unreachable")

    monkeypatch.setattr(jax.distributed, "initialize", fails)
    with pytest.raises(RuntimeError, match="unreachable"):
        distributed.initialize("h:1", 2, 0)
    assert distributed._state is None  # a failed start can be retried
