"""How launcher/run.py ends: exit codes, one-line errors, the stop message, and signals passed on to the ranks.

| code | meaning |
|---|---|
| 0 | finished max_steps (or a listing / dry run) |
| 1 | an unexpected error (a bug): traceback printed |
| 2 | a problem you can fix (config, data, checkpoint folder, disk): one `error: ...` line |
| 3 | the loss or gradient norm became NaN/inf: nothing saved after the last good checkpoint |
| 75 | stopped early by SIGTERM/SIGINT, training.max_runtime or the launcher ending: checkpoint saved, relaunch |
| 130, 143 | killed by a second SIGINT / SIGTERM (shell convention 128 + signal), nothing saved for the current step |
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import traceback

OK, UNEXPECTED, USER_ERROR, NONFINITE, STOPPED = 0, 1, 2, 3, 75


def user_error_types() -> tuple[type[BaseException], ...]:
    from data.errors import DataError
    from engine.errors import TrainingError
    from launcher.config import ConfigError

    return ConfigError, DataError, TrainingError, OSError


def is_user_error(err: BaseException) -> bool:
    from engine.errors import is_storage_failure

    # A full disk reaches here as torch's RuntimeError too (torch.save has no errno): a storage problem, not a bug.
    return isinstance(err, user_error_types()) or (isinstance(err, RuntimeError) and is_storage_failure(err))


def _message(err: BaseException) -> str:
    from engine.errors import first_line, is_storage_failure, storage_hint

    if type(err) is RuntimeError and is_storage_failure(err):
        return f"a write failed: {first_line(err)}; {storage_hint('.', err)}"
    if isinstance(err, OSError) and not err.__class__.__module__.startswith(("data", "engine", "launcher")):
        hint = {errno.ENOSPC: "the disk is full: free space",
                errno.EROFS: "the file system is read-only: choose a writable folder",
                errno.EACCES: "permission denied: make it writable or choose another folder",
                errno.ENOENT: "it does not exist: check the path"}.get(err.errno, "check the path and the disk")
        return f"{err.filename or ''}{': ' if err.filename else ''}{err.strerror or err}; {hint}"
    return str(err)


class report_errors:  # noqa: N801 - used as a context manager, like contextlib's lower-case helpers
    """Turn a user-fixable error into `error: ...` + exit 2 (3 for NaN/inf), without a traceback unless debug."""

    def __init__(self, *, debug: bool):
        self.debug = debug
        self.code = UNEXPECTED

    def __enter__(self) -> "report_errors":
        return self

    def __exit__(self, exc_type, err, tb) -> bool:
        if err is None:
            return False
        if isinstance(err, KeyboardInterrupt):  # Ctrl+C before the trainer's handler was installed
            print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
            self.code = 128 + signal.SIGINT
            return True
        if not is_user_error(err):
            return False
        from engine.errors import NonFiniteError

        rank = int(os.environ.get("RANK", 0))
        if self.debug:
            traceback.print_exception(err)
        if rank == 0 or not getattr(err, "on_every_rank", False):
            prefix = f"rank {rank}: " if rank else ""
            print(f"error: {prefix}{_message(err)}", file=sys.stderr, flush=True)
        self.code = NONFINITE if isinstance(err, NonFiniteError) else USER_ERROR
        return True


def report_stop(result, checkpoint_dir: str) -> int:
    """The message of a run stopped early with a checkpoint; returns STOPPED."""
    from engine.distributed import is_main_process, teardown_distributed

    teardown_distributed()
    if is_main_process():
        command = " ".join(arg for arg in sys.argv if not arg.startswith("--local_rank"))
        print(f"\nstopped at step {result.final_step} by {result.stop_reason}; checkpoint saved in "
              f"{checkpoint_dir}/checkpoint_step_{result.final_step}\nto resume, run the same command again "
              f"(training.resume is true): {command}", file=sys.stderr, flush=True)
    return STOPPED


def _ranks_of(pid: int) -> list:
    """The rank processes below `pid` (the DeepSpeed launcher gives each `--local_rank=N`)."""
    import psutil  # a DeepSpeed dependency

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks = []
    for child in children:
        try:
            if any(arg.startswith("--local_rank") for arg in child.cmdline()):
                ranks.append(child)
        except psutil.Error:
            pass
    return ranks


def run_forwarding_signals(command: list[str], *, env: dict[str, str]) -> int:
    """Run the DeepSpeed launcher in its own process group; pass SIGTERM/SIGINT to the ranks themselves.

    The `deepspeed` runner dies of a SIGTERM without passing it on (it forwards only for multi-node pdsh runs), so
    the signal goes straight to the ranks: they stop together after a checkpoint, the first exit code (75) flows
    back through launch.py and the runner. When the runner has ended, anything left in its group is killed:
    nothing outlives the job.
    """
    process = subprocess.Popen(command, env=env, start_new_session=True)

    def forward(signum, frame):
        ranks = _ranks_of(process.pid)
        if not ranks:  # still starting: stop everything
            os.killpg(process.pid, signum)
        for rank in ranks:
            try:
                rank.send_signal(signum)
            except Exception:  # noqa: BLE001 - a rank that has just exited
                pass

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return 128 - code if code < 0 else code
