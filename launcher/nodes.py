"""Which nodes a job runs on: from a DeepSpeed hostfile, or from Slurm's environment; and the inter-node link.

Only the launcher reads hostfiles and environment variables; the plan receives a `NodeLayout`.

A DeepSpeed hostfile has one `hostname slots=N` line per node (deepspeed/launcher/runner.py `fetch_hostfile`;
`#` starts a comment). Under Slurm the allocation is `SLURM_NNODES` nodes named by `SLURM_JOB_NODELIST` (compressed,
e.g. `gpu[01-04,07]`), this node being `SLURM_NODEID` (0-based); `SLURM_GPUS_ON_NODE` counts this node's GPUs when
the job asked for GPUs (Slurm's sbatch/srun "OUTPUT ENVIRONMENT VARIABLES").
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

DEFAULT_INTERNODE_BYTES_PER_S = 25e9
"""Inter-node bandwidth per node assumed when none is given: 25 GB/s = one 200 Gb/s InfiniBand HDR port (NVIDIA
ConnectX-6 HDR spec) or 2 x 100 Gb/s Ethernet. Within a node NVLink 4 gives an H100 450 GB/s per direction (NVIDIA
H100 datasheet, 900 GB/s bidirectional): across nodes every byte is 10-20x slower, which is what the plan weighs.
Measure yours with `deepspeed --hostfile H tools/gpu_report.py --skip_config` (docs/multinode.md) and pass
--internode_bandwidth."""


SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000
"""Under Slurm without --master_port every node derives the port from the job id, in 20000-39999: below Linux's
ephemeral range (32768-60999 by default) would be safer still, but too narrow to keep jobs apart."""


class NodeError(ValueError):
    """A hostfile or a scheduler environment the launcher cannot use; the message names the fix."""


@dataclass(frozen=True, kw_only=True)
class NodeLayout:
    """The nodes of one job, as the launcher found them."""

    hosts: tuple[str, ...] = ("localhost",)
    """Node names, in node-rank order."""
    slots: int | None = None
    """Ranks (GPUs) each node offers (hostfile slots, SLURM_GPUS_ON_NODE), or None: from num_gpus."""
    node_rank: int | None = None
    """This node's rank when this command starts one node's ranks (--node_rank), else None."""
    source: str = "one node"
    """Where the layout comes from, for the dry-run report."""
    internode_bytes_per_s: float = DEFAULT_INTERNODE_BYTES_PER_S
    """Bandwidth between nodes per node, bytes/s."""
    internode_source: str = "assumed: one 200 Gb/s InfiniBand HDR port per node (give --internode_bandwidth)"
    """Where internode_bytes_per_s comes from."""
    master_addr: str | None = None
    """Where rank 0 listens, when the scheduler says (Slurm: the first node)."""
    master_port: int | None = None
    """The rendezvous port every node agrees on, when the scheduler gives one (Slurm: from SLURM_JOB_ID)."""

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)


SINGLE_NODE = NodeLayout()


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """(host, slots) per line of a DeepSpeed hostfile, in order; NodeError naming the line when one is malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise NodeError(f"--hostfile {path}: cannot read it ({err.strerror or err}); give an existing file of "
                        "'hostname slots=N' lines") from None
    hosts: list[tuple[str, int]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if match is None or int(match.group(2)) < 1:
            raise NodeError(f"--hostfile {path} line {number}: {line!r} is not 'hostname slots=N' with N >= 1")
        if match.group(1) in {host for host, _ in hosts}:
            raise NodeError(f"--hostfile {path} line {number}: host {match.group(1)!r} is listed twice; list each "
                            "node once (with --no_ssh the names are only keys, but they must differ)")
        hosts.append((match.group(1), int(match.group(2))))
    if not hosts:
        raise NodeError(f"--hostfile {path} lists no host: write one 'hostname slots=N' line per node")
    return hosts


def write_hostfile(path: str | Path, hosts: list[str], slots: int) -> Path:
    """A DeepSpeed hostfile with `slots` ranks on each of `hosts`."""
    path = Path(path)
    path.write_text("".join(f"{host} slots={slots}\n" for host in hosts), encoding="utf-8")
    return path


def expand_nodelist(text: str) -> list[str]:
    """Slurm's compressed host list ('gpu[01-03,07],login1') as names ('gpu01', 'gpu02', 'gpu03', 'gpu07',
    'login1'). `scontrol show hostnames` does this where Slurm is installed and is used when found; the parser
    below (one bracket group per name, the form Slurm prints for node names with one numeric field) serves
    where it is not, e.g. a dry run on a laptop with the variables copied from a job."""
    if shutil.which("scontrol"):
        try:
            result = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True,
                                    timeout=30)
            if result.returncode == 0 and result.stdout.split():
                return result.stdout.split()
        except (OSError, subprocess.SubprocessError):
            pass
    names: list[str] = []
    for prefix, ranges, suffix in re.findall(r"([^,\[\]]*)(?:\[([^\]]*)\])?([^,\[\]]*),?", text):
        if not ranges:
            if prefix + suffix:
                names.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not low.isdigit() or (high and not high.isdigit()):
                raise NodeError(f"SLURM_JOB_NODELIST {text!r}: cannot read the range {part!r}")
            for number in range(int(low), int(high or low) + 1):
                names.append(f"{prefix}{number:0{len(low)}d}{suffix}")
    return names


def slurm_layout(environ: Mapping[str, str]) -> NodeLayout | None:
    """The job's nodes from Slurm's variables, or None outside a Slurm job (or in a one-node job)."""
    count = environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES")
    if not count:
        return None
    if not count.isdigit() or int(count) < 1:
        raise NodeError(f"SLURM_NNODES={count!r} is not a node count")
    num_nodes = int(count)
    if num_nodes == 1:
        return None
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    hosts = expand_nodelist(nodelist) if nodelist else [f"node{i}" for i in range(num_nodes)]
    if len(hosts) != num_nodes:
        raise NodeError(f"SLURM_JOB_NODELIST {nodelist!r} names {len(hosts)} hosts but SLURM_NNODES is "
                        f"{num_nodes}: run inside the job's allocation (sbatch/salloc), or give --hostfile")
    node_id = environ.get("SLURM_NODEID")
    gpus = environ.get("SLURM_GPUS_ON_NODE")
    job_id = environ.get("SLURM_JOB_ID", "")
    return NodeLayout(hosts=tuple(hosts), slots=int(gpus) if gpus and gpus.isdigit() else None,
                      master_addr=hosts[0],
                      # The same on every node of the job and unlikely to meet another job's on a shared first node.
                      master_port=SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN if job_id.isdigit() else None,
                      source=f"Slurm: SLURM_NNODES={num_nodes}, SLURM_JOB_NODELIST={nodelist or '(unset)'}"
                             + (f", this node SLURM_NODEID={node_id}" if node_id else ""))


def node_layout(hostfile: str | None, environ: Mapping[str, str] | None = None, *,
                internode_bandwidth: float | None = None) -> NodeLayout:
    """The job's nodes: the hostfile if given, else Slurm's environment, else this one node.

    internode_bandwidth: bytes/s between nodes as the user measured it (--internode_bandwidth); else the assumption
    DEFAULT_INTERNODE_BYTES_PER_S, named as such in the plan."""
    environ = os.environ if environ is None else environ
    if hostfile:
        entries = read_hostfile(hostfile)
        slots = {s for _, s in entries}
        if len(slots) > 1:
            raise NodeError(f"--hostfile {hostfile}: the hosts offer different slot counts ({sorted(slots)}); the "
                            "plan gives every rank the same share, so give every node the same slots=N")
        layout = NodeLayout(hosts=tuple(h for h, _ in entries), slots=slots.pop(),
                            source=f"hostfile {hostfile}: {len(entries)} node(s)")
    else:
        layout = slurm_layout(environ) or SINGLE_NODE
    if internode_bandwidth is not None:
        layout = replace(layout, internode_bytes_per_s=internode_bandwidth,
                         internode_source="given with --internode_bandwidth")
    return layout


def parse_bandwidth(text: str) -> float:
    """'25GB/s', '200Gb/s', '400 Gbit/s' -> bytes per second (GB = 1e9 bytes, as link speeds are quoted)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])(B|b|bit)(?:/s|ps)?\s*", text)
    if not match:
        raise ValueError(f"cannot read bandwidth {text!r}: give e.g. 25GB/s (bytes) or 200Gb/s (bits)")
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[match.group(2)]
    return float(match.group(1)) * scale / (1 if match.group(3) == "B" else 8)


def job_nodes(args, num_gpus: int, *, launched: bool, environ: Mapping[str, str] | None = None) -> NodeLayout:
    """The nodes of the job launcher/run.py is part of (`args`: its parsed command line).

    Under a launcher the ranks learn the node count from DeepSpeed's CROSS_SIZE (deepspeed/launcher/launch.py) or
    torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE; before it, from --hostfile or Slurm. With --node_rank (under Slurm:
    --node_rank $SLURM_NODEID) this command is one node of a job whose nodes each start their own ranks: every node
    must name the same first node and port."""
    environ = os.environ if environ is None else environ
    bandwidth = parse_bandwidth(args.internode_bandwidth) if args.internode_bandwidth else None
    if launched:
        world = int(environ.get("WORLD_SIZE", 1))
        local = int(environ.get("LOCAL_SIZE", environ.get("LOCAL_WORLD_SIZE", world)))
        count = int(environ.get("CROSS_SIZE", max(1, world // max(1, local))))
        layout = NodeLayout(hosts=tuple(f"node{i}" for i in range(count)), slots=local,
                            source=f"launcher: {count} node(s) x {local} rank(s)")
        return layout if bandwidth is None else replace(layout, internode_bytes_per_s=bandwidth,
                                                        internode_source="given with --internode_bandwidth")
    layout = node_layout(args.hostfile, environ, internode_bandwidth=bandwidth)
    if layout.slots is not None and layout.slots < num_gpus:
        raise NodeError(f"num_gpus is {num_gpus} but each node offers {layout.slots} ({layout.source}): set "
                        f"--num_gpus {layout.slots} or fewer, or raise the slots")
    if args.node_rank is None and layout.num_nodes > 1 and not args.hostfile and not args.dry_run:
        # Started once, in the batch script rather than once per node: this node alone would wait for the others.
        raise NodeError(f"this is a {layout.num_nodes}-node Slurm job: start one runner per node, e.g. `srun "
                        "--ntasks-per-node=1 python launcher/run.py ... --node_rank $SLURM_NODEID` "
                        "(examples/multinode.sbatch, docs/multinode.md), or give --hostfile to start every node "
                        "from here over ssh")
    if args.node_rank is not None and not 0 <= args.node_rank < layout.num_nodes:
        raise NodeError(f"--node_rank {args.node_rank} is not a node of {layout.source}: give 0 to "
                        f"{layout.num_nodes - 1}")
    layout = replace(layout, node_rank=args.node_rank)  # SLURM_NODEID only counts where --node_rank passes it
    if layout.node_rank is not None and layout.num_nodes > 1 and not args.dry_run:
        if not (args.master_addr or layout.master_addr):
            raise NodeError("--master_addr is required with --node_rank: give the address of the first node of the "
                            "hostfile (where rank 0 listens), the same on every node")
        if not (args.master_port or layout.master_port):
            raise NodeError("--master_port is required with --node_rank: give every node the same free port")
    return layout


def multinode_runner_args(args, nodes: NodeLayout, num_gpus: int) -> tuple[list[str], int]:
    """The DeepSpeed runner's arguments that make it start this node's ranks only (--no_ssh), and the port.

    Without --hostfile (Slurm) the hostfile is written from the node names to a file of this node's temporary
    folder: nodes write nothing shared."""
    import hashlib
    import tempfile

    hostfile = args.hostfile
    if not hostfile:  # named by its content: a relaunch of the same job rewrites the same small file
        key = hashlib.sha1(f"{nodes.hosts} {num_gpus}".encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"rag_hostfile_{os.getuid()}_{key}"
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        write_hostfile(temp, list(nodes.hosts), num_gpus)
        hostfile = str(temp.replace(path))
    return (["--hostfile", hostfile, "--no_ssh", "--node_rank", str(nodes.node_rank),
             "--master_addr", args.master_addr or nodes.master_addr],
            args.master_port or nodes.master_port)
