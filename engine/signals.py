"""Stopping a run cleanly: SIGTERM/SIGINT, the time limit, and a launcher that went away.

A first SIGTERM or SIGINT only records the request; the loop finishes the current step, all ranks agree on it
(an all-reduce each step, so every rank stops after the same step), save a checkpoint and exit with
STOPPED_EXIT_CODE. A second signal, more than SECOND_SIGNAL_GRACE_S after the first, exits at once.
The grace window exists because launchers relay a stop: Ctrl+C reaches every process of the terminal's
foreground group, and DeepSpeed's launch.py then sends SIGTERM to each rank as well (deepspeed/launcher/launch.py
sigkill_handler); that relay is the same request, not a second one.

Under the DeepSpeed launcher a SIGTERM to the `deepspeed` command kills only that process (deepspeed/launcher/
runner.py forwards signals only for multi-node pdsh runs) and its launch.py child keeps the ranks running. Each
rank therefore also watches the launcher processes it was started by: when one of them ends, it stops as if
signalled.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from engine import distributed

STOPPED_EXIT_CODE = 75
"""Exit code of a run stopped early with a checkpoint (signal or time limit): relaunch to resume. 75 is
EX_TEMPFAIL in sysexits.h ("try again later")."""
SECOND_SIGNAL_GRACE_S = 3.0
"""Signals within this many seconds of the first are the same stop request (relayed by launchers)."""
STEP_DEADLINE_S = 2.0
"""A signal that arrives during a training step gives the step this many seconds plus 2x the longest step seen to
finish, or the process exits at once: a rank stuck in a collective (its peer died, and the launcher is now
terminating everyone) cannot finish its step, and waiting would only delay the job's end until the launcher's
SIGKILL 30 s later. A step in progress has at most one step's time left, hence 2x. Evaluation, saves and exports
have no deadline: they are never cut short."""

_REASONS = {1: "SIGTERM", 2: "SIGINT", 3: "the time limit training.max_runtime", 4: "the launcher ending"}
_CODES = {signal.SIGTERM: 1, signal.SIGINT: 2}
_LAUNCHER_MARKERS = ("deepspeed", "launcher/run.py", "train.py")


def _proc_parent(pid: int) -> int | None:
    """The parent pid of `pid` from /proc, or None when it is gone (or not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and ')'


def launcher_ancestors() -> list[tuple[int, int]]:
    """(pid, parent pid) of this rank and of the launcher processes above it (deepspeed, launch.py, run.py)."""
    if "WORLD_SIZE" not in os.environ or not Path("/proc/self/stat").exists():
        return []
    chain = [(os.getpid(), os.getppid())]
    pid = os.getppid()
    for _ in range(4):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            break
        parent = _proc_parent(pid)
        if parent is None or not any(marker in cmdline for marker in _LAUNCHER_MARKERS):
            break
        chain.append((pid, parent))
        pid = parent
    return chain if len(chain) > 1 else []


class StopController:
    """Collects stop requests; `agreed_stop()` is the collective the loop calls once per step."""

    def __init__(self, *, max_runtime_s: float | None = None):
        self.max_runtime_s = max_runtime_s
        self.started = time.monotonic()
        self._code = 0
        self._first_signal_at: float | None = None
        self._previous: dict[int, object] = {}
        self._ancestors = launcher_ancestors()
        self._longest_step_s = 0.0
        self._deadline: threading.Timer | None = None
        self._stepping = False
        self._signum = 0

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on (main thread only: Python's rule for signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _CODES:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        self._cancel_deadline()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self._first_signal_at is None:
            self._first_signal_at = now
            self._signum = signum
            self._code = self._code or _CODES[signum]
            print(f"\nreceived {signal.Signals(signum).name}: finishing this step, saving a checkpoint, then exiting "
                  "(send it again to exit at once, without saving)", file=sys.stderr, flush=True)
            if self._stepping:
                self._arm_deadline(signum)
        elif now - self._first_signal_at > SECOND_SIGNAL_GRACE_S:
            signal.signal(signum, signal.SIG_DFL)  # die of this signal, as an unhandled one would
            os.kill(os.getpid(), signum)

    def _local_code(self) -> int:
        if self._code:
            return self._code
        if self.max_runtime_s is not None and time.monotonic() - self.started >= self.max_runtime_s:
            return 3
        for pid, parent in self._ancestors:
            if _proc_parent(pid) != parent:
                return 4
        return 0

    @contextlib.contextmanager
    def stepping(self):
        """Around a training step: the only work a signal's deadline applies to."""
        self._stepping = True
        started = time.monotonic()
        if self._signum:
            self._arm_deadline(self._signum)
        try:
            yield
        finally:
            self._stepping = False
            self._cancel_deadline()
            self._longest_step_s = max(self._longest_step_s, time.monotonic() - started)

    def _arm_deadline(self, signum: int) -> None:
        self._cancel_deadline()
        self._deadline = threading.Timer(STEP_DEADLINE_S + 2 * self._longest_step_s, os._exit, (128 + signum,))
        self._deadline.daemon = True
        self._deadline.start()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()

    def agreed_stop(self, device) -> str | None:
        """Why all ranks stop now (the same answer on every rank), or None to go on. A collective."""
        code = distributed.all_reduce_max_int(self._local_code(), device)
        return _REASONS.get(code) if code else None
