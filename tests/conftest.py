"""Shared fixtures: a CPU DeepSpeed process group, a prepared corpus, and small run configs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS_DIR = REPO_ROOT / ".torch_extensions"

# Set before anything imports deepspeed: the CPU accelerator explicitly, and a private JIT build folder.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))

# Small enough that a ZeRO run of a few steps takes a second or two on two cores.
SMALL_MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
               "model.max_seq_len=64"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clear_stale_build_locks() -> None:
    """A killed JIT build leaves `<op>/lock` behind and every later build then waits forever."""
    for lock in EXTENSIONS_DIR.glob("*/lock"):
        lock.unlink(missing_ok=True)


clear_stale_build_locks()


@pytest.fixture(scope="session")
def process_group():
    """One single-rank gloo process group shared by every in-process engine test."""
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    from engine.distributed import init_distributed, teardown_distributed

    init_distributed()
    yield
    teardown_distributed()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """The embedded corpus prepared once (tokenizer + shards) for every test that trains."""
    from data import DataConfig, prepare_data

    cache = tmp_path_factory.mktemp("data_cache")
    prepare_data(DataConfig(cache_dir=str(cache)), vocab_size=8192, progress=False)
    return cache


def run_cli(args: list[str], *, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run launcher/run.py in a subprocess under a timeout (never hangs the suite)."""
    command = [*(launcher or [sys.executable]), str(REPO_ROOT / "launcher" / "run.py"), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)  # the child must not think it is a rank of this test process's group
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
