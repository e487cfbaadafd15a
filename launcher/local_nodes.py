"""Start N "nodes" of a multi-node job on this one machine, with DeepSpeed's own runner, and wait for all of them.

Each node is the command a cluster node would run (docs/multinode.md):

    deepspeed --hostfile H --no_ssh --node_rank R --master_addr 127.0.0.1 --master_port P launcher/run.py ARGS

With `--no_ssh` (DeepSpeed >= 0.14.5, deepspeed/launcher/runner.py) the hostfile's names are only keys, never
contacted: node R starts its own `slots` ranks through deepspeed.launcher.launch, which gives them RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_SIZE (the CPU accelerator's device count), CROSS_RANK (the node) and CROSS_SIZE (the nodes).
`form="run.py"` starts each node as `python launcher/run.py ARGS --hostfile H --node_rank R --master_addr ...`
instead: the project's own front end, which plans first, then runs the same DeepSpeed runner and passes SIGTERM
to its ranks. `form="torchrun"` uses `torchrun --nnodes N --node_rank R` (torch's launcher, no hostfile).

Every node runs in its own session (process group) and, optionally, its own working directory: a relative
training.checkpoint_dir then lands on a different folder per node, which is how tests stand in for node-local
disks (checkpoint.use_node_local_storage). `LocalNodes.stop()` kills every process group that is left: nothing
started here outlives it. Tests and `tools/local_nodes.py` both use this module.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launcher.nodes import write_hostfile

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_SCRIPT = REPO_ROOT / "launcher" / "run.py"
FORMS = ("deepspeed", "run.py", "torchrun")
_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE",
             "MASTER_ADDR", "MASTER_PORT", "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


def node_command(form: str, *, node_rank: int, num_nodes: int, ranks_per_node: int, hostfile: Path,
                 master_port: int, script: Path, args: list[str]) -> list[str]:
    """The command node `node_rank` runs in launch form `form` (see the module docstring)."""
    python = sys.executable
    if form == "deepspeed":
        return [python, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(master_port),
                str(script), *args]
    if form == "run.py":
        return [python, str(script), *args, "--num_gpus", str(ranks_per_node), "--hostfile", str(hostfile),
                "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(master_port)]
    if form == "torchrun":
        return [python, "-m", "torch.distributed.run", "--nnodes", str(num_nodes), "--node_rank", str(node_rank),
                "--nproc_per_node", str(ranks_per_node), "--master_addr", "127.0.0.1",
                "--master_port", str(master_port), str(script), *args]
    raise ValueError(f"unknown launch form {form!r}: choose one of {', '.join(FORMS)}")


@dataclass
class LocalNodes:
    """The node processes of one job (each the leader of its own process group)."""

    processes: list[subprocess.Popen]
    hostfile: Path
    logs: list[tuple[Path, Path]] = field(default_factory=list)
    """(stdout, stderr) file of each node."""

    def wait(self, timeout: float) -> list[int]:
        """Exit codes of all nodes (negative: killed by that signal); kills everything left after `timeout`
        seconds and raises TimeoutError."""
        deadline = time.monotonic() + timeout
        codes = []
        for process in self.processes:
            try:
                codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.stop()
                raise TimeoutError(f"the nodes did not end within {timeout:.0f} s; all were killed") from None
        return codes

    def alive(self) -> list[int]:
        """Node indices whose process group still has a process (the node's launcher, or a rank it left)."""
        return [i for i, p in enumerate(self.processes) if _group_alive(p.pid)]

    def signal_node(self, node: int, signum: int) -> None:
        """Send `signum` to node `node`'s top process only, as a scheduler signals the command it started."""
        self.processes[node].send_signal(signum)

    def stop(self) -> None:
        """SIGKILL every process group of every node (a no-op for groups already gone)."""
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def output(self, node: int) -> tuple[str, str]:
        out, err = self.logs[node]
        return out.read_text(errors="replace"), err.read_text(errors="replace")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader (exited, not yet reaped) still "exists": count only live members.
    return any(_pgid_of(pid) == pgid and _state_of(pid) != "Z" for pid in _pids())


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()] if os.path.isdir("/proc") else []


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def start_local_nodes(args: list[str], *, num_nodes: int, ranks_per_node: int = 1, master_port: int,
                      workdir: Path, form: str = "deepspeed", script: str | Path | None = None,
                      node_dirs: list[Path] | None = None, node_env: list[dict[str, str]] | None = None,
                      env: dict[str, str] | None = None) -> LocalNodes:
    """Start `num_nodes` nodes of `ranks_per_node` ranks each running `script args` (default launcher/run.py).

    workdir: where the hostfile and the nodes' logs go (and each node's working directory unless node_dirs).
    node_dirs: a working directory per node (node-local disks for relative paths).
    node_env: extra environment per node (e.g. a fault to inject on one node only).
    """
    if form not in FORMS:
        raise ValueError(f"unknown launch form {form!r}: choose one of {', '.join(FORMS)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    hostfile = write_hostfile(workdir / "hostfile", [f"node{i}" for i in range(num_nodes)], ranks_per_node)
    base = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    for key in _RANK_ENV:
        base.pop(key, None)  # a node must not think it is a rank of the caller's job
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), base.get("PYTHONPATH")]))
    if base.get("DS_ACCELERATOR", "cpu") == "cpu":
        base.setdefault("OMP_NUM_THREADS", "1")
    if form == "torchrun":
        base["LOCAL_SIZE"] = str(ranks_per_node)  # the CPU accelerator's device count (torchrun does not set it)
    nodes = LocalNodes(processes=[], hostfile=hostfile)
    try:
        for rank in range(num_nodes):
            cwd = Path(node_dirs[rank]) if node_dirs else workdir
            cwd.mkdir(parents=True, exist_ok=True)
            command = node_command(form, node_rank=rank, num_nodes=num_nodes, ranks_per_node=ranks_per_node,
                                   hostfile=hostfile, master_port=master_port,
                                   script=Path(script or RUN_SCRIPT).resolve(), args=list(args))
            out, err = workdir / f"node{rank}.out", workdir / f"node{rank}.err"
            with open(out, "w") as stdout, open(err, "w") as stderr:
                process = subprocess.Popen(command, cwd=cwd, env={**base, **(node_env[rank] if node_env else {})},
                                           stdout=stdout, stderr=stderr, start_new_session=True)
            nodes.processes.append(process)
            nodes.logs.append((out, err))
    except BaseException:
        nodes.stop()
        raise
    return nodes
