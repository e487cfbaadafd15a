"""Run a multi-node job on this one machine: N "nodes", each started as a cluster node would start (docs/multinode.md).

    python tools/local_nodes.py --nodes 2 -- --preset tiny --set training.max_steps=20
    python tools/local_nodes.py --nodes 2 --ranks_per_node 2 --form run.py -- --preset tiny
    python tools/local_nodes.py --nodes 2 --node_dirs -- --preset tiny     # a checkpoint folder per node
    python tools/local_nodes.py --nodes 2 --ranks_per_node 2 --script tools/gpu_report.py   # inter-node bandwidth

Everything after `--` goes to launcher/run.py on every node. Each node is
`deepspeed --hostfile H --no_ssh --node_rank R --master_addr 127.0.0.1 --master_port P launcher/run.py ARGS`
(--form deepspeed, the default), `python launcher/run.py ARGS --hostfile H --node_rank R ...` (--form run.py) or
`torchrun --nnodes N --node_rank R ...` (--form torchrun). Their output goes to WORKDIR/node<R>.out/.err; the exit
code is the first non-zero one of the nodes. Ctrl+C (or SIGTERM) is passed to node 0's command, as a scheduler
would signal one node; nothing started here outlives this command.
"""
from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from launcher.local_nodes import FORMS, start_local_nodes  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="tools/local_nodes.py", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    parser.add_argument("--ranks_per_node", type=int, default=1, help="ranks on each node (default 1)")
    parser.add_argument("--form", choices=FORMS, default="deepspeed", help="how each node starts (default deepspeed)")
    parser.add_argument("--master_port", type=int, help="rendezvous port (default: a free one)")
    parser.add_argument("--workdir", default="local_nodes", help="hostfile and logs (default ./local_nodes)")
    parser.add_argument("--node_dirs", action="store_true",
                        help="run node R in WORKDIR/node<R>: relative paths (checkpoints, outputs) become per-node "
                             "folders, like node-local disks")
    parser.add_argument("--script", help="what each rank runs instead of launcher/run.py, e.g. tools/gpu_report.py")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="kill everything after this many seconds")
    args = parser.parse_args(own)
    for name in ("nodes", "ranks_per_node"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    workdir = Path(args.workdir).resolve()
    node_dirs = [workdir / f"node{r}" for r in range(args.nodes)] if args.node_dirs else None
    nodes = start_local_nodes(run_args, num_nodes=args.nodes, ranks_per_node=args.ranks_per_node,
                              master_port=args.master_port or free_port(), workdir=workdir, form=args.form,
                              node_dirs=node_dirs, script=args.script)
    print(f"started {args.nodes} node(s) x {args.ranks_per_node} rank(s), hostfile {nodes.hostfile}; logs in "
          f"{workdir}/node<R>.out and .err", flush=True)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda s, f: nodes.signal_node(0, s))
    try:
        codes = nodes.wait(args.timeout)
    except TimeoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        nodes.stop()
    for rank, code in enumerate(codes):
        print(f"node {rank}: exit code {code}")
    return next((c for c in codes if c != 0), 0) if all(c >= 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
