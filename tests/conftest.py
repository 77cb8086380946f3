"""Strict test set-up shared by every test.

Fake CPU devices (so sharding tests run anywhere), the Hugging Face hub forced offline (a test
that reaches for the network fails in milliseconds), and the path to ../shared.
"""

import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir() -> Path:
    return Path(os.environ.get("SIMFLUENCE_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder (data, tokenizer, tiny checkpoint); skips where absent."""
    path = _shared_dir()
    if not path.is_dir():
        pytest.skip(f"../shared not found at {path}; set SIMFLUENCE_SHARED to run this test")
    return path


@pytest.fixture(scope="session")
def data_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data"
    if not (path / "rte" / "train.jsonl").is_file():
        pytest.skip(f"task data not found under {path}")
    return path


@pytest.fixture(scope="session")
def t5_tokenizer_dir(shared_dir: Path) -> Path:
    path = shared_dir / "tokenizers" / "t5"
    if not (path / "spiece.model").is_file():
        pytest.skip(f"T5 vocabulary not found at {path}/spiece.model")
    return path


@pytest.fixture(scope="session")
def tiny_t5_dir(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "tiny-random-t5"
    if not (path / "config.json").is_file():
        pytest.skip(f"tiny T5 checkpoint not found at {path}")
    return path
