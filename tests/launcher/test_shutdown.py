"""Auto-shutdown: the decision, the countdown, Ctrl+C, the fixed command and the permission hint.

Every test injects the runner (or replaces the command by a harmless Python one): nothing here can power off.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from launcher.shutdown import (PERMISSION_HINTS, SHUTDOWN_COMMANDS, RunOutcome, count_down_and_shut_down,
                               maybe_shut_down, shutdown_decision)
from tests.conftest import REPO_ROOT, SMALL_MODEL, run_job

SUCCESS = RunOutcome(auto_shutdown=True, no_shutdown=False, dry_run=False, succeeded=True, interrupted=False, rank=0)


class Recorder:
    """A runner that records what it was asked to run and answers with a chosen exit code."""

    def __init__(self, returncode: int = 0, stderr: str = "", raises: Exception | None = None):
        self.calls: list[tuple[list[str], dict]] = []
        self.returncode, self.stderr, self.raises = returncode, stderr, raises

    def __call__(self, command, **kwargs):
        self.calls.append((command, kwargs))
        if self.raises:
            raise self.raises
        return subprocess.CompletedProcess(command, self.returncode, "", self.stderr)


@pytest.mark.parametrize("change, reason", [
    ({"auto_shutdown": False}, "auto_shutdown is false"),
    ({"no_shutdown": True}, "--no_shutdown"),
    ({"dry_run": True}, "dry run"),
    ({"succeeded": False}, "did not finish"),
    ({"interrupted": True}, "interrupted"),
    ({"rank": 1}, "rank 1"),
])
def test_never_shuts_down_unless_every_condition_holds(change, reason):
    allowed, why = shutdown_decision(replace(SUCCESS, **change))
    assert not allowed and reason in why
    runner = Recorder()
    assert maybe_shut_down(replace(SUCCESS, **change), 0, runner=runner, sleep=lambda s: None,
                           out=io.StringIO()) == "skipped"
    assert runner.calls == []
    assert shutdown_decision(SUCCESS)[0]


@pytest.mark.parametrize("system, command", [("Linux", ["shutdown", "-h", "now"]),
                                             ("Darwin", ["shutdown", "-h", "now"]),
                                             ("Windows", ["shutdown", "/s", "/t", "0"])])
def test_countdown_then_the_fixed_command_without_a_shell(system, command):
    runner, slept, out = Recorder(), [], io.StringIO()
    assert count_down_and_shut_down(3, system=system, runner=runner, sleep=slept.append, out=out) == "started"
    assert slept == [1.0, 1.0, 1.0]
    for remaining in (3, 2, 1):
        assert f"shutting down in {remaining:3d} s (Ctrl+C cancels)" in out.getvalue()
    [(ran, kwargs)] = runner.calls
    assert ran == command and kwargs["shell"] is False


def test_ctrl_c_during_the_countdown_cancels():
    runner, out = Recorder(), io.StringIO()
    ticks = []

    def sleep(seconds):
        ticks.append(seconds)
        if len(ticks) == 2:
            raise KeyboardInterrupt

    assert count_down_and_shut_down(10, system="Linux", runner=runner, sleep=sleep, out=out) == "cancelled"
    assert runner.calls == [] and "cancelled" in out.getvalue()


@pytest.mark.parametrize("runner", [Recorder(returncode=1, stderr="Failed to power off: Access denied"),
                                    Recorder(raises=PermissionError(13, "Permission denied")),
                                    Recorder(raises=FileNotFoundError(2, "No such file", "shutdown"))])
def test_without_permission_it_says_how_to_grant_it(runner):
    out = io.StringIO()
    assert count_down_and_shut_down(0, system="Linux", runner=runner, sleep=lambda s: None, out=out) == "failed"
    text = out.getvalue()
    assert "could not shut down" in text and PERMISSION_HINTS["Linux"] in text


def test_unknown_system_is_refused_without_running_anything():
    runner, out = Recorder(), io.StringIO()
    assert count_down_and_shut_down(0, system="Plan9", runner=runner, out=out) == "failed"
    assert runner.calls == [] and "not supported on 'Plan9'" in out.getvalue()


@pytest.mark.slow
def test_a_successful_cli_run_counts_down_and_runs_the_command(tmp_path, data_cache):
    """End to end through launcher/run.py with auto_shutdown on and the OS command replaced by a Python one-liner
    that writes a marker file: a run stopped by its time limit and a run with --no_shutdown write nothing; a run that
    finishes counts down and runs the command."""
    marker = tmp_path / "powered_off"
    write_marker = f"open({str(marker)!r}, 'w').write('off')"
    script = (
        "import platform, sys; import launcher.shutdown as s\n"
        f"s.SHUTDOWN_COMMANDS[platform.system()] = (sys.executable, '-c', {write_marker!r})\n"
        "from launcher.run import main\nsys.exit(main(sys.argv[1:]))\n")
    args = ["--preset", "tiny", *[f"--set={s}" for s in SMALL_MODEL],
            "--set=training.max_steps=2", "--set=training.eval_batches=1", "--set=training.sample_tokens=0",
            "--set=training.batch_size=2", "--set=training.gradient_accumulation_steps=1",
            f"--set=data.cache_dir={data_cache}", f"--set=training.checkpoint_dir={tmp_path / 'ckpt'}",
            f"--set=training.output_dir={tmp_path / 'out'}", "--set=system.auto_shutdown=true",
            "--set=system.shutdown_delay=1", f"--ds_config_dir={tmp_path / 'ds'}"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    stopped = run_job([sys.executable, "-c", script, *args, "--set=training.max_steps=100000",
                       "--set=training.max_runtime=1", f"--set=training.checkpoint_dir={tmp_path / 'stopped'}"],
                      cwd=tmp_path, env=env, timeout=300)
    assert stopped.returncode == 75, stopped.stderr[-3000:]  # the time limit: checkpoint saved, exit 75
    assert not marker.exists() and "auto-shutdown skipped: the run was interrupted" in stopped.stdout
    result = run_job([sys.executable, "-c", script, *args, "--no_shutdown"], cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists() and "auto-shutdown skipped: --no_shutdown was given" in result.stdout
    result = run_job([sys.executable, "-c", script, *args], cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shutting down in   1 s (Ctrl+C cancels)" in result.stdout
    assert marker.read_text() == "off"
    assert SHUTDOWN_COMMANDS["Linux"] == ("shutdown", "-h", "now")  # this process's table is untouched
