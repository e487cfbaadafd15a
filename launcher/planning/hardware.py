"""What the machine offers a run: GPUs and their free memory, host RAM, and memory sizes written by people.

Planning must not leave CUDA contexts behind in a process that only waits for its ranks, and every rank of a job
must plan from the same figures: `detect_gpus_in_subprocess` and `agree_across_ranks` take care of both.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, replace

GIB = 1 << 30


class HardwareError(ValueError):
    """The machine cannot host the requested ranks (too few GPUs)."""


@dataclass(frozen=True, kw_only=True)
class MemoryBudget:
    """Memory a plan may use, and where the figures come from."""

    gpu_bytes: int | None
    """Usable memory of one rank's device (the smallest free memory of the GPUs used); None = no limit."""
    cpu_bytes: int | None
    """Host RAM available on one node; None = no limit."""
    ranks_per_node: int = 1
    """Ranks sharing that host RAM."""
    on_cuda: bool = True
    """Ranks run on CUDA GPUs; False: CPU ranks, whose 'GPU memory' is the host RAM itself."""
    fused_ssm_kernels: bool = True
    """mamba-ssm's fused kernels will run (otherwise Mamba uses the PyTorch reference ops)."""
    source: str = "no memory limit given"
    """Human-readable origin of the figures, for the dry-run table."""


UNLIMITED = MemoryBudget(gpu_bytes=None, cpu_bytes=None)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory_size(text: str) -> int:
    """'24GB', '24 GiB', '80G', '512MB', '1.5TB' -> bytes. GB and GiB both mean 2**30: GPU makers' '24 GB' cards
    hold 24 GiB (a 4090 reports 24564 MiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match or (not match.group(2) and not match.group(3)):
        raise ValueError(f"cannot read memory size {text!r}: give a number and a unit, e.g. 24GB, 80GiB or 512MB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(num_bytes: float) -> str:
    """Bytes as GiB with one decimal ('11.9 GiB'), or MiB below 1 GiB."""
    if abs(num_bytes) >= GIB:
        return f"{num_bytes / GIB:.1f} GiB"
    return f"{num_bytes / (1 << 20):.0f} MiB"


def available_host_memory() -> int:
    """Host RAM available to new processes (MemAvailable), via psutil or /proc/meminfo."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise OSError("cannot read the available host memory (no psutil, no /proc/meminfo)")


@dataclass(frozen=True, kw_only=True)
class GpuInfo:
    """One CUDA device as found."""

    index: int
    name: str
    free_bytes: int
    total_bytes: int


def detect_gpus(limit: int | None = None) -> list[GpuInfo]:
    """Name and free/total memory of the visible CUDA devices, the first `limit` of them ([] without CUDA).
    Each device queried gets a CUDA context in this process."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(min(torch.cuda.device_count(), limit or torch.cuda.device_count())):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(GpuInfo(index=index, name=torch.cuda.get_device_name(index), free_bytes=free, total_bytes=total))
    return gpus


def memory_budget(ranks_per_node: int, gpu_memory: int | None = None, *, gpus: list[GpuInfo] | None = None,
                  host_bytes: int | None = None, ssm_type: str | None = None) -> MemoryBudget:
    """What this node offers each rank: --gpu_memory if given, else the GPUs found, else host RAM (CPU ranks).

    host_bytes: the node's host RAM (--cpu_memory); when omitted it is this machine's available RAM, except with
    gpu_memory (hardware you do not have), where the host is left unchecked and only reported per layout.
    ssm_type: the Mamba mixer to be trained ('mamba2' / 'mamba1'; None for other families): the fused kernels
    count as available when the ones its training path needs import.
    """
    if gpu_memory is not None:
        host_note = (f"host RAM {format_bytes(host_bytes)} (given)" if host_bytes is not None else
                     "host RAM not checked (give --cpu_memory for the machine you plan for)")
        return MemoryBudget(gpu_bytes=gpu_memory, cpu_bytes=host_bytes, ranks_per_node=ranks_per_node, on_cuda=True,
                            source=f"--gpu_memory {format_bytes(gpu_memory)} per GPU (given); {host_note}")
    host = available_host_memory() if host_bytes is None else host_bytes
    gpus = detect_gpus() if gpus is None else gpus
    if gpus:
        used = gpus[:ranks_per_node]
        if len(used) < ranks_per_node:
            raise HardwareError(f"{ranks_per_node} ranks per node requested but only {len(gpus)} GPU(s) visible: "
                                "lower --num_gpus or set CUDA_VISIBLE_DEVICES")
        smallest = min(used, key=lambda gpu: gpu.free_bytes)
        names = sorted({gpu.name for gpu in used})
        return MemoryBudget(gpu_bytes=smallest.free_bytes, cpu_bytes=host, ranks_per_node=ranks_per_node,
                            on_cuda=True, fused_ssm_kernels=_fused_ssm_kernels_available(ssm_type),
                            source=f"{len(used)} x {', '.join(names)}: smallest free memory "
                                   f"{format_bytes(smallest.free_bytes)} (GPU {smallest.index}); "
                                   f"host RAM {format_bytes(host)} available")
    return MemoryBudget(gpu_bytes=host // ranks_per_node, cpu_bytes=host, ranks_per_node=ranks_per_node,
                        on_cuda=False, fused_ssm_kernels=False,
                        source=f"no CUDA GPU: planning against host RAM, {format_bytes(host)} available, shared "
                               f"by {ranks_per_node} CPU rank(s) (pass --gpu_memory to plan for GPUs you do not have)")


def _fused_ssm_kernels_available(ssm_type: str | None) -> bool:
    """Whether the kernels of `ssm_type`'s training path import (a Triton-only mamba-ssm serves Mamba-2 but
    not Mamba-1); without a mixer (not a Mamba model) the answer does not matter to the plan."""
    from model.mamba.ssm_ops import fused_ops_status

    return fused_ops_status(ssm_type)[0]


_DETECT_SCRIPT = (
    "import json, torch\n"
    "gpus = []\n"
    "for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):\n"
    "    free, total = torch.cuda.mem_get_info(i)\n"
    "    gpus.append([i, torch.cuda.get_device_name(i), free, total])\n"
    "print(json.dumps(gpus))\n")


def detect_gpus_in_subprocess(timeout: float = 120) -> list[GpuInfo]:
    """detect_gpus() run in a child process, so that this process holds no CUDA context on any device (a launcher
    that waits for its ranks would otherwise keep ~0.5 GB on every GPU)."""
    result = subprocess.run([sys.executable, "-c", _DETECT_SCRIPT], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise HardwareError(f"GPU detection failed: {result.stderr.strip()[-500:]}")
    return [GpuInfo(index=i, name=name, free_bytes=free, total_bytes=total)
            for i, name, free, total in json.loads(result.stdout.strip().splitlines()[-1])]


def agree_across_ranks(budget: MemoryBudget) -> MemoryBudget:
    """The budget every rank of the initialised process group shares: the smallest GPU and host figures of all
    ranks (each rank measured its own GPU), so that all ranks choose the same plan."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return budget
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    unknown = torch.iinfo(torch.int64).max
    figures = torch.tensor([budget.gpu_bytes if budget.gpu_bytes is not None else unknown,
                            budget.cpu_bytes if budget.cpu_bytes is not None else unknown,
                            int(budget.fused_ssm_kernels)], dtype=torch.int64, device=device)
    dist.all_reduce(figures, op=dist.ReduceOp.MIN)
    gpu, cpu, fused = (int(v) for v in figures.tolist())
    return replace(budget, gpu_bytes=None if gpu == unknown else gpu, cpu_bytes=None if cpu == unknown else cpu,
                   fused_ssm_kernels=bool(fused),
                   source=budget.source + f"; smallest figures over {dist.get_world_size()} ranks")
