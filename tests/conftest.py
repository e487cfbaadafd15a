"""Shared fixtures: a CPU DeepSpeed process group, a prepared corpus, and small run configs."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Captured before any engine exists: a ZeRO-3 engine replaces torch.nn.functional.linear for the rest of the
# process (DeepSpeed's memory_efficient_linear, "this will persist unless manually reset").
NATIVE_LINEAR = torch.nn.functional.linear


@pytest.fixture
def native_linear(monkeypatch):
    """Run a test with PyTorch's own F.linear, whatever ZeRO-3 engines earlier tests built."""
    monkeypatch.setattr(torch.nn.functional, "linear", NATIVE_LINEAR)


# Set before anything imports deepspeed: the CPU accelerator explicitly, and a private JIT build folder.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
EXTENSIONS_DIR = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions")))
# JIT builds (cpu_adam for optimizer offload) run `ninja` from PATH; scripts/test.sh runs .venv/bin/python without
# activating the venv, and a fresh machine has no system ninja, only the one requirements.txt puts in .venv/bin.
# A system ninja, when there is one, stays first, as in launcher/run.py: a build made by another ninja version is
# rebuilt from scratch (~100 s for cpu_adam), so tests and training runs must pick the same one.
if shutil.which("ninja") is None:
    os.environ["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))

# Small enough that a ZeRO run of a few steps takes a second or two on two cores.
SMALL_MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
               "model.max_seq_len=64"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


STALE_BUILD_S = 600
"""A live JIT build writes into its folder at least every couple of minutes (its longest step, compiling
cpu_adam.cpp, took ~90 s on a busy 2-core machine); a lock in a folder idle for 10 minutes was left by a killed one."""


def clear_stale_build_locks() -> None:
    """A killed JIT build leaves `<op>/lock` behind and every later build then waits forever. A lock whose folder
    is still being written belongs to a live build (another test run, a training run): removing it would let a
    second build race the first, so it stays."""
    now = time.time()
    for lock in EXTENSIONS_DIR.glob("*/lock"):
        try:
            idle = now - max(path.stat().st_mtime for path in lock.parent.iterdir())
        except (FileNotFoundError, ValueError):  # the build finished meanwhile
            continue
        if idle > STALE_BUILD_S:
            lock.unlink(missing_ok=True)


def wait_for_build_locks(poll_s: float = 5.0) -> None:
    """Wait until no JIT build holds a lock: a live one finishes, a dead one's lock is removed once stale.
    (torch itself would wait on a dead build's lock forever.)"""
    while True:
        clear_stale_build_locks()
        if not any(EXTENSIONS_DIR.glob("*/lock")):
            return
        time.sleep(poll_s)


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
    return run_job(command, cwd=cwd, env=full_env, timeout=timeout)


def run_job(command: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run under a timeout that ends the whole process tree: on timeout subprocess.run kills only its
    child, and under a launcher that is the launcher, leaving the ranks running (seen: two hung ranks still alive
    half an hour later, holding both cores)."""
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher, its ranks and anything they started
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_two_ranks(script: str | Path, *args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run `script args` as a 2-rank torchrun job on CPU (one thread per rank, this suite's JIT folder, a free port),
    under run_job's timeout, which ends the ranks too; asserts a clean exit and returns the result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(EXTENSIONS_DIR),
           "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the job's ranks must not think they belong to this test process's group
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), *args]
    result = run_job(command, cwd=cwd, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
