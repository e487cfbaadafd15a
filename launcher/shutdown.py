"""Automatic shutdown after a successful run (`system.auto_shutdown`, `system.shutdown_delay`, `--no_shutdown`).

The original project powered the machine off after training so that a rented GPU stops billing. Here:
- it happens only when the run succeeded (final model saved), never after a failure, a dry run or an interrupted
  run, and only on global rank 0 after every rank has passed the final barrier (`teardown_distributed`); on a
  multi-node job that is rank 0's machine;
- a visible countdown of `shutdown_delay` seconds precedes it, and Ctrl+C cancels it;
- the command is a fixed argument list per operating system, run without a shell: nothing from the config or the
  environment ever becomes part of it;
- without permission it says how to grant it and the exit code of the run stays 0 (training did succeed).

Only the launcher reads config and argv, so this module lives here; the runner and the sleep are parameters so
that tests can inject them (no test may power anything off).
"""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

SHUTDOWN_COMMANDS: dict[str, tuple[str, ...]] = {
    # shutdown(8) from systemd or sysvinit; `-h now` halts and powers off at once.
    "Linux": ("shutdown", "-h", "now"),
    # macOS shutdown(8): the same flags.
    "Darwin": ("shutdown", "-h", "now"),
    # Windows shutdown.exe: /s shut down, /t 0 no delay of its own (ours already counted down).
    "Windows": ("shutdown", "/s", "/t", "0"),
}
"""The one command run per operating system (platform.system()), never assembled from config text."""

PERMISSION_HINTS: dict[str, str] = {
    "Linux": "run the training as root, or allow your user to power off without a password: add "
             "`youruser ALL=(ALL) NOPASSWD: /usr/sbin/shutdown` with `sudo visudo` and start training under sudo, "
             "or grant org.freedesktop.login1.power-off through polkit",
    "Darwin": "run the training with sudo, or allow it: `sudo visudo` and add "
              "`youruser ALL=(ALL) NOPASSWD: /sbin/shutdown`",
    "Windows": "run the terminal as Administrator, or grant your account 'Shut down the system' in "
               "Local Security Policy > User Rights Assignment",
}


@dataclass(frozen=True, kw_only=True)
class RunOutcome:
    """What the launcher knows about how a run ended, the facts the shutdown decision depends on."""

    auto_shutdown: bool
    """system.auto_shutdown from the config."""
    no_shutdown: bool
    """--no_shutdown was given."""
    dry_run: bool
    """--dry_run was given (nothing trained)."""
    succeeded: bool
    """The run finished and saved its final model."""
    interrupted: bool
    """The run was stopped early (Ctrl+C, a signal) even if it saved a checkpoint."""
    rank: int
    """Global rank of this process."""


def shutdown_decision(outcome: RunOutcome) -> tuple[bool, str]:
    """(whether to shut down, why or why not): every condition of the module docstring, in order."""
    if not outcome.auto_shutdown:
        return False, "system.auto_shutdown is false"
    if outcome.no_shutdown:
        return False, "--no_shutdown was given"
    if outcome.dry_run:
        return False, "this was a dry run"
    if outcome.rank != 0:
        return False, f"rank {outcome.rank} never shuts down (only rank 0, after every rank finished)"
    if outcome.interrupted:
        return False, "the run was interrupted"
    if not outcome.succeeded:
        return False, "the run did not finish successfully"
    return True, "the run finished successfully"


def shutdown_command(system: str | None = None) -> tuple[str, ...]:
    """The fixed argument list for `system` (default: this machine's); ValueError for an unknown system."""
    system = system or platform.system()
    if system not in SHUTDOWN_COMMANDS:
        raise ValueError(f"automatic shutdown is not supported on {system!r} (supported: "
                         f"{', '.join(SHUTDOWN_COMMANDS)})")
    return SHUTDOWN_COMMANDS[system]


Runner = Callable[..., subprocess.CompletedProcess]


def count_down_and_shut_down(delay_s: int, *, system: str | None = None, runner: Runner | None = None,
                             sleep: Callable[[float], None] = time.sleep, out: TextIO = sys.stdout) -> str:
    """Count down delay_s seconds on `out`, then run the shutdown command. Returns 'cancelled' (Ctrl+C during
    the countdown), 'failed' (command missing or refused; a hint was printed) or 'started'."""
    system = system or platform.system()
    try:
        command = shutdown_command(system)
    except ValueError as err:
        print(f"warning: {err}; the machine stays on", file=out, flush=True)
        return "failed"
    try:
        for remaining in range(delay_s, 0, -1):
            print(f"\rshutting down in {remaining:3d} s (Ctrl+C cancels) ", end="", file=out, flush=True)
            sleep(1.0)
        print(f"\rshutting down now: {' '.join(command)}{' ' * 20}", file=out, flush=True)
    except KeyboardInterrupt:
        print("\nshutdown cancelled; the machine stays on", file=out, flush=True)
        return "cancelled"
    try:
        # A list and shell=False: no shell parses it, whatever the environment holds.
        result = (runner or subprocess.run)(list(command), shell=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        reason = f"{type(err).__name__}: {err}"
    else:
        if result.returncode == 0:
            return "started"
        reason = (result.stderr or result.stdout or f"exit code {result.returncode}").strip()
    print(f"warning: could not shut down ({reason}). To allow it: {PERMISSION_HINTS[system]}.", file=out,
          flush=True)
    return "failed"


def maybe_shut_down(outcome: RunOutcome, delay_s: int, **kwargs) -> str:
    """Shut down if `shutdown_decision` allows; returns 'skipped' or count_down_and_shut_down's result."""
    allowed, reason = shutdown_decision(outcome)
    if not allowed:
        if outcome.auto_shutdown and outcome.rank == 0:
            print(f"auto-shutdown skipped: {reason}", file=kwargs.get("out", sys.stdout), flush=True)
        return "skipped"
    return count_down_and_shut_down(delay_s, **kwargs)
