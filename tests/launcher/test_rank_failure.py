"""A rank that dies or hangs ends the whole job: non-zero exit within a bounded time, the failing rank's error shown.

Two CPU ranks train the tiny preset (small model) through tests/launcher/rank_failure.py, which wraps
launcher/run.py's main() and makes rank 1 fail at step 2. The DeepSpeed launcher polls its ranks every second and
terminates the others as soon as one exits non-zero; a rank stuck in a collective is ended by the process group's
timeout (engine.distributed.COLLECTIVE_TIMEOUT, shortened here).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from engine.distributed import COLLECTIVE_TIMEOUT
from tests.conftest import REPO_ROOT, free_port, run_job
from tests.launcher import rank_failure
from tests.launcher.test_cli import small_run_args

SCRIPT = str(Path(rank_failure.__file__))
DEEPSPEED_CLI = str(Path(sys.executable).parent / "deepspeed")
JOB_TIMEOUT_S = 120
"""No job may outlive this; a hung one fails the test instead of the suite."""
HANG_TIMEOUT_S = 20
"""Collective timeout of the hang test: long enough for a slow rank to finish set-up on a busy 2-core machine."""


def run_fault_job(command: list[str], cwd: Path, **fault: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **fault}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the job must not think it is a rank of this test process's group
    started = time.monotonic()
    result = run_job(command, cwd=cwd, env=env, timeout=JOB_TIMEOUT_S)
    return result, time.monotonic() - started


def job_args(data_cache: Path) -> list[str]:
    return small_run_args(data_cache, "training.max_steps=4", "training.zero_stage=2", "training.sample_tokens=0")


LAUNCHES = {
    "deepspeed": lambda port, args: [DEEPSPEED_CLI, "--num_gpus", "2", "--master_port", str(port), SCRIPT, *args],
    # launcher/run.py starts the DeepSpeed launcher itself (start_ranks), with this script as the ranks' entry.
    "run.py": lambda port, args: [sys.executable, SCRIPT, *args, "--num_gpus", "2", "--master_port", str(port)],
}


@pytest.mark.slow
@pytest.mark.parametrize("launch", LAUNCHES)
def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path, data_cache, launch):
    result, elapsed = run_fault_job(LAUNCHES[launch](free_port(), job_args(data_cache)), tmp_path, FAULT="raise")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert rank_failure.failure_message(1, 2) in output, output[-4000:]
    assert "error: rank 1 of 2 failed at step 2: RuntimeError" in output, output[-4000:]
    assert "finished" not in output
    # Start-up (~10-20 s) plus the launcher's 1 s poll; the surviving rank dies at once on SIGTERM.
    assert elapsed < 90, elapsed


@pytest.mark.slow
def test_a_rank_that_hangs_is_ended_by_the_collective_timeout(tmp_path, data_cache):
    command = LAUNCHES["deepspeed"](free_port(), job_args(data_cache))
    result, elapsed = run_fault_job(command, tmp_path, FAULT="hang", FAULT_TIMEOUT_S=str(HANG_TIMEOUT_S))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "rank 1 hangs at step 2" in output, output[-4000:]
    assert "error: rank 0 of 2 failed at step 2" in output, output[-4000:]  # its collective timed out
    assert HANG_TIMEOUT_S < elapsed < HANG_TIMEOUT_S + 60, elapsed


def test_every_process_group_has_the_collective_timeout(process_group):
    """The world group (deepspeed.init_distributed's timeout) and groups made later without one, as DeepSpeed makes
    ZeRO's data-parallel group: torch would give those 30 minutes. The hang test shows the timeout is enforced."""
    cpu = torch.device("cpu")
    world = dist.distributed_c10d._get_default_group()
    assert world._get_backend(cpu).options._timeout == COLLECTIVE_TIMEOUT
    later = dist.new_group([0])
    assert later._get_backend(cpu).options._timeout == COLLECTIVE_TIMEOUT
    dist.destroy_process_group(later)
