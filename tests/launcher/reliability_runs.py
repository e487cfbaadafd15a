"""Helpers for the reliability tests: a small CLI run, process-group waits, file snapshots, weight comparison."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import REPO_ROOT, SMALL_MODEL, free_port


def run_args(data_cache: Path, *extra: str, max_steps: int = 6) -> list[str]:
    settings = [*SMALL_MODEL, "training.batch_size=4", "training.gradient_accumulation_steps=1",
                "training.eval_interval=2", "training.eval_batches=2", "training.save_interval=2",
                "training.warmup_steps=1", "training.sample_tokens=0", f"training.max_steps={max_steps}",
                f"data.cache_dir={data_cache}", *extra]
    return ["--preset", "tiny", *[arg for s in settings for arg in ("--set", s)]]


def clean_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def start(args: list[str], *, cwd: Path, env: dict[str, str], prefix: list[str] | None = None) -> subprocess.Popen:
    """launcher/run.py (or `prefix` + it) in its own session, so the test can find and kill the whole tree."""
    command = [*(prefix or [sys.executable]), str(REPO_ROOT / "launcher" / "run.py"), *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"run did not end within {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    return process.returncode, out, err


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model_state_dict"]


def assert_same_weights(got: Path, expected: Path) -> None:
    a, b = weights(got), weights(expected)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between {got} and {expected}"


def port_args() -> list[str]:
    return ["--master_port", str(free_port())]
