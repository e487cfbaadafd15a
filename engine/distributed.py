"""Process-group set-up and tear-down around DeepSpeed's communication layer."""
from __future__ import annotations

import importlib
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

COLLECTIVE_TIMEOUT = timedelta(minutes=10)
"""How long any collective waits for a stuck peer before it raises (and the launcher then ends the job).
torch's own default is 30 min for gloo and 10 for NCCL; DeepSpeed's is 10 (DEEPSPEED_TIMEOUT)."""


def init_distributed() -> None:
    """Join (or create) the job's process group; RANK/WORLD_SIZE/MASTER_* must be in the environment."""
    if dist.is_available() and dist.is_initialized():
        return
    if get_accelerator().device_name() == "cpu":
        # DeepSpeed JIT-builds its shared-memory all-reduce op (35-65 s) whenever a CPU process group starts;
        # it serves only inference all-reduce, which training never calls (see docs/machine_notes.md).
        # `import deepspeed.comm.torch as m` would bind the real torch package, hence import_module.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    use_timeout_for_new_groups(COLLECTIVE_TIMEOUT)
    deepspeed.init_distributed(timeout=COLLECTIVE_TIMEOUT)


def use_timeout_for_new_groups(timeout: timedelta) -> None:
    """Make `timeout` the default of every process group created from now on.

    deepspeed.init_distributed passes its timeout to the world group only. ZeRO reduces gradients on a
    data-parallel group that DeepSpeed makes with torch.distributed.new_group(ranks) and no timeout
    (deepspeed/comm/torch.py), which takes torch's default (`_get_default_timeout`: 30 min for gloo): a rank stuck
    there would outwait COLLECTIVE_TIMEOUT by 20 minutes. torch reads these module defaults at each new_group call.
    """
    c10d = dist.distributed_c10d
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):  # None when torch has no NCCL
            setattr(c10d, name, timeout)


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


def run_on_main(fn):
    """Run fn on rank 0 only and return its result on every rank; an exception it raises is raised on every rank
    (the same message), so no rank waits forever in a collective that rank 0 will never reach."""
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
            error.on_every_rank = True  # the launcher prints it once (rank 0), not once per rank
    if world_size() > 1:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def local_rank() -> int:
    """This rank's index on its node (DeepSpeed's launcher and torchrun both set LOCAL_RANK)."""
    return deepspeed.comm.get_local_rank() if dist.is_initialized() else 0


def run_on_node_leaders(fn) -> list:
    """Run fn on the first rank of every node (local rank 0) and return their results, in rank order, on every
    rank; an exception raised on any of them is raised on every rank. What run_on_main is for a shared file system,
    this is for node-local disks, where each node manages its own files."""
    leader = local_rank() == 0
    result, error = None, None
    if leader:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    everyone = [(leader, result, error)]
    if world_size() > 1:
        everyone = [None] * world_size()
        dist.all_gather_object(everyone, (leader, result, error))
    errors = [err for _, _, err in everyone if err is not None]
    if errors:
        errors[0].on_every_rank = True  # the launcher prints it once (rank 0), not once per rank
        raise errors[0]
    return [result for is_leader, result, _ in everyone if is_leader]


def all_agree(value: bool, device: torch.device | None = None) -> bool:
    """True when `value` is true on every rank (a collective)."""
    return all_reduce_max_int(0 if value else 1, device or torch.device(get_accelerator().current_device_name())) == 0


def all_reduce_max_int(value: int, device: torch.device) -> int:
    """The largest of one integer over all ranks (how ranks agree on a stop request)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def skip_single_rank_gradient_allreduce(engine) -> None:
    """Turn off the gradient all-reduce of a ZeRO-0 DeepSpeed engine that has one data-parallel rank.

    After every backward DeepSpeed's ZeRO-0 path copies all gradients into one flat buffer, all-reduces it and copies
    it back, also over a single rank, where that is an identity: two passes over the gradients, 7% of a `tiny` step at
    micro-batch 2 on CPU (docs/machine_notes.md). DeepSpeed clears the same flag itself when it has no distributed
    backend. ZeRO 1-3 are left alone: their optimizer moves the gradients into its partitions in that call.
    """
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False


def join_sequence_parallel_group(size: int):
    """Split sequences over `size` consecutive ranks from now on (model/sequence_parallel.py); return the mpu to pass
    to deepspeed.zero.Init and deepspeed.initialize, whose sequence-data-parallel group ZeRO partitions over and
    whose data-parallel size the batch divides by; None (and no split) for size 1.

    DeepSpeed's parallel_state_sp (ALST's module) builds the groups: ranks [i N, (i+1) N) form one sequence-parallel
    group, so a rank's data-parallel index is rank // N."""
    from model import sequence_parallel

    if size == 1:
        sequence_parallel.set_sequence_parallel_group(None)
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    if world_size() % size:
        raise ValueError(f"training.sequence_parallel={size} does not divide the {world_size()} ranks: choose a "
                         "divisor of the rank count")
    if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is None:  # one process may build several engines (tests, tools)
        parallel_state_sp.initialize_sequence_parallel(size)
    elif parallel_state_sp.get_sequence_parallel_world_size() != size:
        raise ValueError("this process already built sequence-parallel groups of another size")
    sequence_parallel.set_sequence_parallel_group(parallel_state_sp.get_sequence_parallel_group())
    return _SequenceParallelMpu(parallel_state_sp)


class _SequenceParallelMpu:
    """parallel_state_sp as DeepSpeed's mpu, saying that no tensor is split across ranks.

    parallel_state_sp aliases the model-parallel size to the sequence-parallel one, and DeepSpeed 0.19.8 writes that
    into every checkpoint as its tensor-parallel degree (engine.py _checkpoint_parallel_metadata) beside one
    model-state file: ds_to_universal then refuses the checkpoint ("model-state file count 1 does not match
    pp_degree=1 * tp_degree=2"), so it could not resume on another number of ranks. Everything else (the ranks
    ZeRO's gradient norm counts, the groups) is parallel_state_sp's own."""

    def __init__(self, state):
        self._state = state

    def __getattr__(self, name: str):
        return getattr(self._state, name)

    @staticmethod
    def get_tensor_model_parallel_world_size() -> int:
        return 1
