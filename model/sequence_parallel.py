"""Sequence parallelism (Ulysses, Jacobs et al. 2023, arXiv:2309.14509): one process-group setting every mixer reads.

With a sequence-parallel group of N ranks set (`set_sequence_parallel_group`), every rank of the group holds the
same samples but only its N-th of each sequence: tokens [r T/N, (r+1) T/N) on group rank r. Everything that works
token by token (embedding, norms, MLP, projections, the loss) runs unchanged on the shard. The mixers that need the
whole sequence switch layout with an all-to-all, so that each rank holds the whole sequence for 1/N of the heads,
and switch back afterwards:
- `CausalSelfAttention` (model/transformer/model.py): q, k, v through DeepSpeed's `DistributedAttention`;
- `Mamba2Mixer` (model/mamba/mixers.py): [x, B, C, dt] before the causal conv and the SSD scan, y after the scan
  (the head-sharded layout Megatron-LM uses for Mamba context parallelism, NVIDIA/Megatron-LM#1437);
- `Mamba1Mixer`: over channels, with one all-reduce for x_proj, whose output mixes every channel.
Their constructors and forward signatures do not change: a family built from these classes (the Transformer, Mamba,
a hybrid of both) gets sequence parallelism by calling `position_offset` for its RoPE positions and nothing else.

Without a group (the default, and always on one rank) every function here is the identity: the unsplit code runs.
The loss of a shard is combined by the trainer with `group_mean_loss`; gradients are then summed over the group by
DeepSpeed (given the mpu, deepspeed.initialize(mpu=...)), which makes them equal to the unsplit run's.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

_GROUP = None
"""The torch.distributed process group of this rank's sequence-parallel ranks, or None (no sequence parallelism)."""


def set_sequence_parallel_group(group) -> None:
    """Split every sequence over the ranks of `group` from now on (None: turn sequence parallelism off)."""
    global _GROUP
    if group is not None:
        # DeepSpeed's differentiable all-to-all finds its group by name; the name must be registered outside any
        # compiled region (deepspeed/sequence/layer.py register_all_to_all_group).
        from deepspeed.sequence.layer import register_all_to_all_group

        register_all_to_all_group(group)
    _GROUP = group


def get_sequence_parallel_group():
    """The sequence-parallel process group, or None."""
    return _GROUP


@contextmanager
def sequence_parallel_disabled() -> Iterator[None]:
    """Run the block with the whole sequence on this rank (generation, a single-rank export check)."""
    global _GROUP
    saved, _GROUP = _GROUP, None
    try:
        yield
    finally:
        _GROUP = saved


def world_size() -> int:
    """Ranks a sequence is split over (1 without sequence parallelism)."""
    if _GROUP is None:
        return 1
    return torch.distributed.get_world_size(_GROUP)


def rank() -> int:
    """This rank's place in its sequence-parallel group: it holds the rank-th shard of each sequence."""
    if _GROUP is None:
        return 0
    return torch.distributed.get_rank(_GROUP)


def is_active() -> bool:
    return world_size() > 1


def shard_bounds(seq_len: int, *, sp_rank: int | None = None, sp_size: int | None = None) -> tuple[int, int]:
    """[start, end) of this rank's shard of a sequence of seq_len tokens; seq_len must divide by the group size."""
    size = world_size() if sp_size is None else sp_size
    index = rank() if sp_rank is None else sp_rank
    if seq_len % size:
        raise ValueError(f"a sequence of {seq_len} tokens does not split over {size} sequence-parallel ranks: "
                         f"make model.max_seq_len a multiple of training.sequence_parallel={size}")
    local = seq_len // size
    return index * local, (index + 1) * local


def shard_sequence(tensor: Tensor, dim: int = 1) -> Tensor:
    """This rank's shard of `tensor` along its sequence dimension `dim` (the whole tensor without a group)."""
    if not is_active():
        return tensor
    start, end = shard_bounds(tensor.size(dim))
    return tensor.narrow(dim, start, end - start)


def position_offset(local_len: int) -> int:
    """Global position of this rank's first token, given its shard of local_len tokens: what RoPE tables are sliced
    from, so that every token is rotated by its position in the whole sequence."""
    return rank() * local_len


def group_mean_loss(local_mean: Tensor, num_local_tokens: int) -> Tensor:
    """Token-weighted mean loss over the sequence-parallel group, from this shard's mean over its tokens.

    The value is the group's mean (the same on every rank of the group). Its gradient is only this shard's
    contribution, d(local sum)/(group tokens): DeepSpeed sums gradients over the sequence-parallel ranks (it divides
    the sequence-data-parallel all-reduce by the data-parallel size only, runtime/engine.py
    _reduce_non_expert_gradients), so the sum is the gradient of the whole sequence's mean loss.
    """
    if not is_active():
        return local_mean
    local_sum = local_mean * num_local_tokens
    totals = torch.stack([local_sum.detach().double(),
                          torch.tensor(float(num_local_tokens), dtype=torch.float64, device=local_mean.device)])
    torch.distributed.all_reduce(totals, group=_GROUP)
    group_sum, group_tokens = totals[0].to(local_mean.dtype), totals[1].to(local_mean.dtype)
    return local_sum / group_tokens + (group_sum - local_sum.detach()) / group_tokens


# ---- layout switches for the mixers -------------------------------------------------------------------------------

def _all_to_all(stacked: Tensor) -> Tensor:
    """Differentiable all-to-all over dim 0 of (N, ...): slot j goes to group rank j; slot j of the result came from
    rank j. DeepSpeed's operator (deepspeed/sequence/layer.py, the one ALST's UlyssesSPAttentionHF uses): its backward
    is declared to autograd and torch.compile, and it runs on deepspeed.comm, so gloo serves it on CPU."""
    from deepspeed.sequence.layer import _dim_zero_all_to_all

    return _dim_zero_all_to_all(_GROUP, stacked)


def sequence_to_channels(x: Tensor, channels_of_rank: list[Tensor]) -> Tensor:
    """x (B, L/N, C) sequence-sharded -> (B, L, c) holding channels_of_rank[my rank] for the whole sequence.

    channels_of_rank[j] (c indices each, the same c for every j) are the channels group rank j works on; a channel
    in several ranks' lists is sent to each of them, and its gradients come back summed (index_select's backward).
    """
    send = torch.stack([x.index_select(-1, channels) for channels in channels_of_rank])  # (N, B, L/N, c)
    received = _all_to_all(send)  # (N, B, L/N, c): slot j = rank j's shard of the sequence
    n, b, local, c = received.shape
    return received.permute(1, 0, 2, 3).reshape(b, n * local, c)  # (B, L, c)


def channels_to_sequence(y: Tensor) -> Tensor:
    """y (B, L, c) of this rank's channel block for the whole sequence -> (B, L/N, N c): the shard of the sequence
    with the blocks of all ranks side by side, rank 0's first (the inverse of `sequence_to_channels` for disjoint,
    contiguous, rank-ordered channel blocks)."""
    n = world_size()
    b, length, c = y.shape
    send = y.reshape(b, n, length // n, c).permute(1, 0, 2, 3)  # (N, B, L/N, c): slot j = shard j of the sequence
    received = _all_to_all(send)  # (N, B, L/N, c): slot j = rank j's channels of my shard
    return received.permute(1, 2, 0, 3).reshape(b, length // n, n * c)  # (B, L/N, N c)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of x over the group, differentiable (the gradient of every copy flows back to every summand)."""
    import torch.distributed.nn.functional as distributed_functional

    return distributed_functional.all_reduce(x, group=_GROUP)


def heads_problem(num_heads: int, num_kv_heads: int | None, n: int) -> str:
    """'' when num_heads (and num_kv_heads) can be dealt to n sequence-parallel ranks, else why not (the launcher
    asks before any rank starts, the mixers when they are called).

    Query heads must divide by n; key/value heads either divide by n (each rank gets its own) or divide n (each is
    replicated on n/K ranks, as DeepSpeed's ALST does for GQA/MQA with fewer KV heads than ranks)."""
    if num_heads % n:
        return f"{num_heads} heads do not divide over {n} sequence-parallel ranks"
    if num_kv_heads is not None and num_kv_heads % n and n % num_kv_heads:
        return (f"{num_kv_heads} key/value heads neither divide over {n} sequence-parallel ranks nor divide {n} "
                "(for replication)")
    return ""
