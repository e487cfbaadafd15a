"""Process-group set-up and tear-down around DeepSpeed's communication layer."""
from __future__ import annotations

import importlib
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

# A dead or stuck peer should end the job within minutes, not DeepSpeed's default of 30.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def init_distributed() -> None:
    """Join (or create) the job's process group; RANK/WORLD_SIZE/MASTER_* must be in the environment."""
    if dist.is_available() and dist.is_initialized():
        return
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed JIT-builds its shared-memory all-reduce op (35-65 s) whenever a CPU process group starts;
        # it serves only inference all-reduce, which training never calls (see shared/MACHINE_NOTES.md).
        # `import deepspeed.comm.torch as m` would bind the real torch package, hence import_module.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(timeout=COLLECTIVE_TIMEOUT)


def teardown_distributed() -> None:
    """Leave the process group cleanly (an unclean exit can abort the process after training finished)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Average a Python float over all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()
