"""GPU report: the GPUs, how they are connected, all-reduce bandwidth, and which presets fit at which GPU count.

    python tools/gpu_report.py                       # everything
    python tools/gpu_report.py --skip_config         # GPU facts and bandwidth only, no memory-plan advice
    python tools/gpu_report.py --cpu_ranks 2         # measure gloo all-reduce between CPU processes (no GPU needed)
    deepspeed --hostfile H --no_ssh --node_rank R --master_addr A --master_port P tools/gpu_report.py
                                                     # on every node: inter-node bandwidth (docs/multinode.md)

All-reduce bandwidth is reported as nccl-tests defines it (algbw = bytes / time, busbw = algbw * 2(n-1)/n), measured
with NCCL over all visible GPUs when there are two or more. Without a GPU it says so and gives the advice for
training on this machine's CPU. The original project's `test_multi_gpu.py` (`--skip_config`) did this.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engine.diagnostics.allreduce_bandwidth import run_all_reduce_benchmark  # noqa: E402
from launcher.advice import plan_advice, render_advice  # noqa: E402
from launcher.planning.hardware import (available_host_memory, detect_gpus, format_bytes, memory_budget,  # noqa: E402
                                        parse_memory_size)

GPU_COUNTS = (1, 2, 4, 8)
SIZES = [1 << 20, 16 << 20, 128 << 20]
"""1, 16 and 128 MiB: from latency-bound to the bandwidth plateau (DeepSpeed's buckets are ~100-500 MB)."""


def gpu_lines() -> list[str]:
    import torch

    lines = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        lines.append(f"GPU {i}: {props.name}, {format_bytes(props.total_memory)}, compute capability "
                     f"{props.major}.{props.minor}, {props.multi_processor_count} SMs")
    return lines


def topology() -> str:
    """`nvidia-smi topo -m` (NVLink NV#, PCIe PIX/PXB/PHB, NODE/SYS), or why it is not shown."""
    if shutil.which("nvidia-smi") is None:
        return "topology: nvidia-smi not found"
    try:
        result = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"topology: nvidia-smi failed ({err})"
    return result.stdout.rstrip() if result.returncode == 0 else f"topology: {result.stderr.strip()}"


def print_bandwidth(world_size: int, backend: str | None) -> None:
    print(f"\nall-reduce bandwidth, {world_size} ranks ({backend or 'nccl'}; busbw = algbw * 2(n-1)/n, nccl-tests):")
    results = run_all_reduce_benchmark(world_size, SIZES, backend=backend)
    print(f"{'size':>10} {'time':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}")
    for r in results:
        print(f"{format_bytes(r.size_bytes):>10} {r.seconds * 1e3:>8.2f}ms {r.algbw_gbps:>11.2f} {r.busbw_gbps:>11.2f}")


def report_across_nodes() -> int:
    """One rank of a multi-node launch: all-reduce over every rank, then over one rank per node (what crosses the
    inter-node link); rank 0 prints both."""
    import os

    import torch

    from engine.diagnostics.allreduce_bandwidth import measure_across_nodes
    from engine.distributed import init_distributed, teardown_distributed

    world = int(os.environ["WORLD_SIZE"])
    per_node = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    init_distributed()
    everyone, across = measure_across_nodes(SIZES, ranks_per_node=per_node, device=device)
    backend = torch.distributed.get_backend()
    if int(os.environ["RANK"]) == 0:
        num_nodes = world // per_node
        for title, results, ranks in ((f"all-reduce bandwidth, {world} ranks on {num_nodes} node(s)", everyone, world),
                                      (f"inter-node all-reduce bandwidth, one rank on each of {num_nodes} nodes",
                                       across, num_nodes)):
            if not results:
                continue
            print(f"\n{title} ({backend}; busbw = algbw * 2(n-1)/n, nccl-tests):")
            print(f"{'size':>10} {'time':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}")
            for r in results:
                print(f"{format_bytes(r.size_bytes):>10} {r.seconds * 1e3:>8.2f}ms {r.algbw_gbps:>11.2f} "
                      f"{r.busbw_gbps:>11.2f}")
        if across:
            print(f"\nfor the plan: --internode_bandwidth {across[-1].busbw_gbps:.1f}GB/s (busbw of the largest size, "
                  "one rank per node)")
    teardown_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu_report.py", description=__doc__.splitlines()[0])
    parser.add_argument("--skip_config", action="store_true", help="GPU facts and bandwidth only, no plan advice")
    parser.add_argument("--cpu_ranks", type=int, default=0, help="also measure gloo all-reduce over N CPU processes")
    parser.add_argument("--preset", action="append", dest="presets", help="advise on these presets only")
    parser.add_argument("--gpu_memory", metavar="SIZE", help="advise for GPUs with this much memory, e.g. 24GB "
                                                             "(default: the GPUs found)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the DeepSpeed launcher passes it
    args = parser.parse_args(argv)
    import os

    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # a rank of a (multi-node) launch
        return report_across_nodes()
    gpus = detect_gpus()
    if not gpus:
        print("no CUDA GPU visible (torch.cuda.is_available() is False): training runs on the CPU")
    else:
        print("\n".join(gpu_lines()))
        print(topology())
        if len(gpus) >= 2:
            print_bandwidth(len(gpus), "nccl")
        else:
            print("all-reduce bandwidth: needs 2 or more GPUs, 1 visible")
    if args.cpu_ranks >= 2:
        print_bandwidth(args.cpu_ranks, "gloo")
    if args.skip_config:
        return 0
    host = available_host_memory()
    if gpus or args.gpu_memory:
        try:
            smallest = parse_memory_size(args.gpu_memory) if args.gpu_memory else min(g.free_bytes for g in gpus)
        except ValueError as err:
            print(f"error: --gpu_memory: {err}", file=sys.stderr)
            return 2
        budgets = {n: memory_budget(n, smallest, host_bytes=host) for n in GPU_COUNTS}
        print(f"\nmemory plan per preset, for GPUs like these ({format_bytes(smallest)} free each) and "
              f"{format_bytes(host)} host RAM:")
    else:
        budgets = {1: memory_budget(1, gpus=[], host_bytes=host)}
        print(f"\nmemory plan per preset for CPU training on this machine ({format_bytes(host)} RAM available; "
              "`launcher/run.py --gpu_memory 24GB --dry_run` plans for GPUs you do not have):")
    print(render_advice(plan_advice(budgets, args.presets)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
