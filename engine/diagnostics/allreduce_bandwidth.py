"""All-reduce bandwidth as nccl-tests reports it (NVIDIA/nccl-tests, doc/PERFORMANCE.md):

    algbw = S / t                       S: bytes of the buffer, t: time of one all-reduce
    busbw = algbw * 2 (n - 1) / n       n: ranks; the factor makes busbw comparable to the hardware's link speed,
                                        whatever the number of ranks (a ring all-reduce moves 2(n-1)/n * S per rank)

`measure_all_reduce` runs on every rank of an existing process group; `run_all_reduce_benchmark` starts the ranks
itself (NCCL on GPUs, gloo on CPU) for a tool that runs outside a launcher.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True, kw_only=True)
class AllReduceResult:
    """One buffer size's measurement (times are the slowest rank's mean)."""

    size_bytes: int
    """Bytes of the buffer all-reduced."""
    seconds: float
    """Mean time of one all-reduce."""
    algbw_gbps: float
    """Algorithm bandwidth, GB/s (1e9 bytes)."""
    busbw_gbps: float
    """Bus bandwidth, GB/s: algbw * 2(n-1)/n."""


def bus_bandwidth(algbw: float, world_size: int) -> float:
    """nccl-tests' all-reduce bus bandwidth from the algorithm bandwidth."""
    return algbw * 2 * (world_size - 1) / world_size


def measure_all_reduce(sizes_bytes: list[int], *, device: torch.device, iterations: int = 20,
                       warmup: int = 5, dtype: torch.dtype = torch.float32, group=None) -> list[AllReduceResult]:
    """Time dist.all_reduce (sum) of each size on every rank of `group` (default: all); returns the same results on
    every rank of it."""
    world = dist.get_world_size(group)
    results = []
    for size in sizes_bytes:
        buffer = torch.ones(max(1, size // torch.tensor([], dtype=dtype).element_size()), dtype=dtype, device=device)
        for _ in range(warmup):
            dist.all_reduce(buffer, group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(iterations):
            dist.all_reduce(buffer, group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = torch.tensor([(time.perf_counter() - start) / iterations], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # as slow as its slowest rank
        seconds = elapsed.item()
        nbytes = buffer.numel() * buffer.element_size()
        algbw = nbytes / seconds / 1e9
        results.append(AllReduceResult(size_bytes=nbytes, seconds=seconds, algbw_gbps=algbw,
                                       busbw_gbps=bus_bandwidth(algbw, world)))
    return results


def _rank_main(rank: int, world_size: int, port: int, backend: str, sizes: list[int], iterations: int,
               queue) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        results = measure_all_reduce(sizes, device=device, iterations=iterations)
        if rank == 0:
            queue.put([asdict(r) for r in results])
    finally:
        dist.destroy_process_group()


def run_all_reduce_benchmark(world_size: int, sizes_bytes: list[int], *, backend: str | None = None,
                             iterations: int = 20, timeout_s: float = 300) -> list[AllReduceResult]:
    """Start world_size local ranks (NCCL on as many GPUs when there are that many, else gloo on CPU), measure,
    and return rank 0's results."""
    backend = backend or ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [context.Process(target=_rank_main, args=(rank, world_size, port, backend, sizes_bytes, iterations,
                                                          queue)) for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    stuck = [p for p in processes if p.is_alive()]
    for process in stuck:
        process.kill()
    if stuck or any(p.exitcode != 0 for p in processes) or queue.empty():
        codes = [p.exitcode for p in processes]
        raise RuntimeError(f"all-reduce benchmark failed ({'timed out' if stuck else f'exit codes {codes}'})")
    return [AllReduceResult(**r) for r in queue.get()]


def measure_across_nodes(sizes_bytes: list[int], *, ranks_per_node: int, device: torch.device,
                         iterations: int = 20) -> tuple[list[AllReduceResult], list[AllReduceResult]]:
    """Under a multi-node launcher (every rank calls): the all-reduce over all ranks, and over one rank per node.

    The second group's traffic all crosses the inter-node link, one rank per node, so its busbw is what a node can
    send to the others: the figure for the plan's --internode_bandwidth (launcher/planning/internode.py). Ranks are placed
    node by node (DeepSpeed's launcher and torchrun both give node k the ranks k * ranks_per_node onwards). Returns
    (all ranks, node leaders); the second list is empty on ranks that are not node leaders."""
    world = dist.get_world_size()
    everyone = measure_all_reduce(sizes_bytes, device=device, iterations=iterations)
    leaders = list(range(0, world, ranks_per_node))
    group = dist.new_group(leaders)  # every rank must take part in creating it
    across = []
    if dist.get_rank() in leaders and len(leaders) > 1:
        across = measure_all_reduce(sizes_bytes, device=device, iterations=iterations, group=group)
    dist.barrier()
    return everyone, across
