"""Memory per rank of one training layout, predicted from the configs alone (no GPU, no model built).

Model states follow what DeepSpeed 0.19.8 allocates (runtime/zero/stage_1_and_2.py, stage3.py, fp16 and bf16
optimizers), checked against the tensors a real engine holds (tests/launcher/test_memory.py) and against DeepSpeed's
own estimators; activations are stated by each model family (model/*_costs.py, via launcher/planning/model_sizes.py). Two moments compete for the peak:
- forward/backward: weights, gradient storage, optimizer states, saved activations, logits, buckets;
- optimizer step: weights, gradients plus the fp32 copy Adam reads, optimizer states.
The peak of the two, plus a fragmentation allowance and the CUDA context, is the prediction.

Mixed precision here is DeepSpeed's: 16-bit weights and gradients, fp32 master weights and Adam moments.
fp32 training is not "4 bytes everywhere" under ZeRO: DeepSpeed's ZeRO optimizers still keep an fp32 master copy
and convert the gradient partition (a copy even when already fp32), so ZeRO-1/2 fp32 costs 4 + 20/N bytes per
parameter, against 2 + 18/N in bf16 (N = world size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from model.config import ModelConfig
from model.tiling import mlp_tiles
from launcher.planning import model_sizes

Precision = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "muon"]
Offload = Literal["none", "optimizer", "optimizer+params"]

# ---- DeepSpeed settings: the single definition launcher/ds_config.py writes into zero_optimization -------------
REDUCE_BUCKET_ELEMENTS = 50_000_000
"""reduce_bucket_size. DeepSpeed's default is 5e8; ZeRO-3 allocates one such bucket up front (stage3.py, IPG
buffer), 1 GB in bf16 at the default. 5e7 (100 MB) matches its own stage3_prefetch_bucket_size default and keeps
messages far above the size where NCCL reaches full bandwidth (~tens of MB)."""
ALLGATHER_BUCKET_ELEMENTS = 50_000_000
"""allgather_bucket_size (DeepSpeed default 5e8), same reasoning."""
STAGE3_PREFETCH_BUCKET_ELEMENTS = 50_000_000
"""stage3_prefetch_bucket_size: DeepSpeed's default (runtime/zero/config.py)."""
STAGE3_MAX_LIVE_PARAMETERS = 100_000_000
"""stage3_max_live_parameters (DeepSpeed default 1e9). With the default, a 1B model could stay gathered whole and
ZeRO-3 would save nothing; 1e8 bounds the gathered working set to ~200 MB in bf16 (DeepSpeed docs: lower values
use less memory and communicate more)."""
STAGE3_MAX_REUSE_DISTANCE = 100_000_000
"""stage3_max_reuse_distance (default 1e9): parameters reused within this many elements stay gathered; kept equal
to max_live_parameters so it cannot hold more than that bound."""
STAGE3_PARAM_PERSISTENCE_THRESHOLD = 100_000
"""stage3_param_persistence_threshold: DeepSpeed's default. Tensors this small (norm weights, SSM scalars) stay
gathered on every rank."""
SUB_GROUP_SIZE = 1_000_000_000
"""sub_group_size: DeepSpeed's default. ZeRO-3 steps the optimizer one sub-group at a time, so at most this many
fp32 gradient elements are converted at once."""

DEEPSPEED_BUCKET_ELEMENTS: dict[str, int] = {
    "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS,
    "allgather_bucket_size": ALLGATHER_BUCKET_ELEMENTS,
    "stage3_prefetch_bucket_size": STAGE3_PREFETCH_BUCKET_ELEMENTS,
    "stage3_max_live_parameters": STAGE3_MAX_LIVE_PARAMETERS,
    "stage3_max_reuse_distance": STAGE3_MAX_REUSE_DISTANCE,
    "stage3_param_persistence_threshold": STAGE3_PARAM_PERSISTENCE_THRESHOLD,
    "sub_group_size": SUB_GROUP_SIZE,
}
"""The zero_optimization keys the estimate assumes; launcher/ds_config.py merges them into every ZeRO config."""

# ---- byte sizes -------------------------------------------------------------------------------------------------
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes of weights, gradients and activations per precision (gradients accumulate in the weights' dtype:
DeepSpeed's default when data_types.grad_accum_dtype is unset)."""
MASTER_BYTES = 4
"""fp32 master weight per parameter (ZeRO paper, Rajbhandari et al. 2020, section 3: K = 12 = 4 + 4 + 4)."""
ADAM_STATE_BYTES = 8
"""fp32 Adam exp_avg and exp_avg_sq per parameter (same section)."""
FP32_GRAD_BYTES = 4
"""fp32 gradient Adam reads: DeepSpeed converts each gradient partition before the step."""
MUON_MOMENTUM_BYTES = 4
"""Muon's one state, the momentum, per Muon parameter: fp32 at ZeRO-0 and ZeRO-3 (MuonWithAuxAdam.step's
zeros_like of the fp32 weight; stage3.py _create_momentum_buffer on the fp32 partition). ZeRO-1/2 keep it in the
gradient's dtype instead, twice (see MUON_ZERO12_MOMENTUM_BUFFERS)."""
MUON_ZERO12_MOMENTUM_BUFFERS = 2
"""ZeRO-1/2 (stage_1_and_2.py `_muon_momentum_buffer`, `_muon_staging_momentum`): a committed and a staged flat
momentum per Muon group, each in the gradient's dtype and sized by the whole tensors of the partition's parameters
(a matrix that straddles two partitions has its full momentum on both)."""
NS_WORKSPACE_COPIES = 5
"""Transient fp32 tensors of one matrix's Muon update (deepspeed/runtime/zero/muon/original_muon.py): the Nesterov
blend, the normalised X, X X^T and its square (at most X's size for a wide-or-square view), the new X; counted at
the optimizer step for the largest Muon matrix, on every rank (each orthogonalizes whole matrices)."""

# ---- allowances -------------------------------------------------------------------------------------------------
CUDA_CONTEXT_BYTES = 1 << 30
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers, which torch.cuda.memory_allocated never sees: the
context alone is ~300-600 MB on recent GPUs and drivers with lazy module loading (PyTorch docs, "CUDA semantics:
memory management"; NVIDIA forums), NCCL adds tens to hundreds of MB per communicator. An allowance, not a
measurement: tools/check_memory_gpu.py prints the figure to replace it with."""
FRAGMENTATION_FRACTION = 0.10
"""Caching-allocator slack (reserved minus allocated) as a fraction of the allocated peak: blocks round up to
512 B and segments to 2 MB (PyTorch CUDACachingAllocator); 5-15% is typical, 10% is the allowance."""
CPU_PROCESS_BYTES = 1 << 30
"""Host RAM of one rank before any tensor: Python, torch, DeepSpeed and CUDA libraries mapped (~0.6-1 GB RSS)."""
CPU_BUFFER_FACTOR = 1.5
"""Slack on offloaded host memory (pinned buffers, staging copies): DeepSpeed's estimators'
additional_buffer_factor default."""
BACKWARD_WORKSPACE_LAYERS = 1
"""Gradients of a block's activations live while that block runs backward: one block's activations are added
(activation_bytes counts the activations of a block being recomputed separately)."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One way to lay a run on its ranks: everything the memory depends on besides the model."""

    world_size: int
    """Ranks: data-parallel x sequence-parallel (ZeRO partitions over all of them)."""
    sequence_parallel: int = 1
    """Ranks each sequence is split over (Ulysses, model/sequence_parallel.py): every sequence-proportional
    activation is divided by it, and its all-to-all buffers are added."""
    zero_stage: int
    """DeepSpeed ZeRO stage 0-3."""
    offload: Offload = "none"
    """CPU offload of optimizer states ('optimizer', stage >= 1) and also of weights ('optimizer+params', stage 3)."""
    precision: Precision = "bf16"
    """Training precision: 'fp32', or mixed 'bf16' / 'fp16' (16-bit weights, fp32 master and Adam states)."""
    micro_batch: int = 1
    """Sequences per rank per micro-step."""
    seq_len: int = 2048
    """Tokens per sequence."""
    num_checkpointed_blocks: int = 0
    """Blocks, from the first, recomputed in the backward pass, which keep only their inputs (Megatron-LM's block
    recompute method; 0 = none, model.n_layers = all)."""
    ranks_per_node: int | None = None
    """Ranks sharing one host's RAM (None = world_size: a single node)."""
    optimizer: Optimizer = "adamw"
    """'adamw', or 'muon': Muon's momentum for the hidden matrices, Adam's two moments for the rest."""
    fused_ssm_kernels: bool = True
    """Mamba: mamba-ssm's fused kernels run (CUDA with mamba-ssm installed); False = the PyTorch reference ops."""
    on_cuda: bool = True
    """Ranks run on CUDA GPUs (FlashAttention, fused RMSNorm, a CUDA context); False = CPU ranks in host RAM."""
    tiled_mlp: bool | int = False
    """training.tiled_mlp (model/tiling.py): the MLPs run in sequence tiles and save only their inputs."""
    tiled_loss: bool = False
    """training.tiled_loss: the chunked loss also on CPU (on CUDA it always runs, outside ZeRO-3)."""

    def __post_init__(self) -> None:
        problems = []
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"ZeRO stage must be 0-3, got {self.zero_stage}")
        if self.offload == "optimizer" and self.zero_stage == 0:
            problems.append("optimizer offload needs ZeRO stage 1-3")
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            problems.append("parameter offload needs ZeRO-3")
        if self.optimizer == "muon" and self.offload != "none":
            problems.append("Muon is planned without offload (engine/config.py refuses the combination)")
        if self.precision not in DTYPE_BYTES:
            problems.append(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if min(self.world_size, self.micro_batch, self.seq_len, self.sequence_parallel) < 1:
            problems.append("world_size, micro_batch, seq_len and sequence_parallel must be >= 1")
        elif self.world_size % self.sequence_parallel or self.seq_len % self.sequence_parallel:
            problems.append(f"sequence_parallel={self.sequence_parallel} must divide world_size={self.world_size} "
                            f"and seq_len={self.seq_len}")
        if self.num_checkpointed_blocks < 0:
            problems.append(f"num_checkpointed_blocks must be >= 0, got {self.num_checkpointed_blocks}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def local_ranks(self) -> int:
        return self.ranks_per_node or self.world_size


@dataclass(frozen=True, kw_only=True)
class ModelStateBytes:
    """Per-rank bytes of weights, gradients and optimizer states, split the way DeepSpeed allocates them."""

    weights: int
    """16-bit (or fp32) weights resident on the GPU: all of them, or this rank's ZeRO-3 partition."""
    persistent_weights: int
    """ZeRO-3 with 2+ ranks: whole copies of the tensors below the persistence threshold, kept gathered between
    steps and partitioned again during the step (stage3.py; with one rank the partition is the tensor itself)."""
    gathered_weights: int
    """ZeRO-3: the largest layer's weights gathered while it computes (DeepSpeed's estimator: 2 x largest layer)."""
    backward_gradients: int
    """Gradient storage while micro-steps accumulate: full (ZeRO 0/1), the rank's partition (ZeRO 2/3)."""
    gathered_gradients: int
    """ZeRO-3: the largest layer's full gradient before it is reduce-scattered."""
    step_gradients: int
    """Gradients at the optimizer step: the storage Adam's input is converted from, plus the fp32 copy."""
    master_weights: int
    """fp32 master weights on the GPU (0 in fp32 ZeRO-0, where the weights are the master)."""
    optimizer_states: int
    """Adam exp_avg and exp_avg_sq on the GPU."""
    persistent_gradients: int
    """Part of backward_gradients that stays allocated between steps (ZeRO-3's flat partition buffer)."""
    cpu: int
    """Bytes this rank keeps in host RAM for offload (weights, gradients, master weights, Adam states)."""

    @property
    def at_optimizer_step(self) -> int:
        """GPU bytes in DeepSpeed's estimator's scope: weights, gradients and optimizer states at the step, plus
        the ZeRO-3 largest-layer term."""
        return (self.weights + self.gathered_weights + self.step_gradients + self.gathered_gradients
                + self.master_weights + self.optimizer_states)

    @property
    def resident(self) -> int:
        """GPU bytes held between optimizer steps (after step(), gradients released)."""
        return (self.weights + self.persistent_weights + self.persistent_gradients + self.master_weights
                + self.optimizer_states)


def optimizer_state_bytes(num_params: int, layout: Layout, *, muon_params: int = 0, largest_muon: int = 0) -> int:
    """Bytes of optimizer states one rank holds for `num_params` parameters (its ZeRO partition from stage 1 on):
    AdamW's two fp32 moments for every parameter, or, with Muon, the momentum of the `muon_params` Muon elements
    and Adam's moments for the rest (largest_muon: elements of the largest Muon matrix, for ZeRO-1/2's boundary)."""
    n, stage = layout.world_size, layout.zero_stage
    share = (lambda count: count) if stage == 0 else (lambda count: -(-count // n))
    if layout.optimizer == "adamw" or muon_params == 0:
        return share(num_params) * ADAM_STATE_BYTES
    adam = share(num_params - muon_params) * ADAM_STATE_BYTES
    if stage in (1, 2):
        whole_tensors = min(muon_params, share(muon_params) + (largest_muon if n > 1 else 0))
        return adam + MUON_ZERO12_MOMENTUM_BUFFERS * whole_tensors * DTYPE_BYTES[layout.precision]
    return adam + share(muon_params) * MUON_MOMENTUM_BYTES


def muon_workspace_bytes(layout: Layout, *, muon_params: int, largest_muon: int) -> int:
    """Transient bytes of Muon's step on one rank: Newton-Schulz on the largest matrix (NS_WORKSPACE_COPIES), and
    at ZeRO-3 the full gradients and momentums of up to reduce_bucket_size elements that stage3.py
    `_apply_muon_to_accumulated_grads` all-gathers at once, in the communication dtype (the weights')."""
    if layout.optimizer != "muon" or muon_params == 0:
        return 0
    workspace = NS_WORKSPACE_COPIES * largest_muon * 4
    if layout.zero_stage == 3:
        workspace += 2 * min(muon_params, max(REDUCE_BUCKET_ELEMENTS, largest_muon)) * DTYPE_BYTES[layout.precision]
    return workspace


def model_state_bytes(num_params: int, layout: Layout, *, largest_tensor: int = 0,
                      persistent: int = 0, muon_params: int = 0, largest_muon: int = 0) -> ModelStateBytes:
    """Bytes of the model states per rank for `num_params` trainable parameters under `layout`.

    largest_tensor and persistent (elements; see model_sizes.ParameterStats) only matter for ZeRO-3, and
    largest_tensor also for ZeRO-1/2 with optimizer offload. muon_params and largest_muon (elements; see
    model_sizes.muon_stats) only matter when layout.optimizer is 'muon'.
    """
    p, n, stage = num_params, layout.world_size, layout.zero_stage
    wb = gb = DTYPE_BYTES[layout.precision]
    mixed = layout.precision != "fp32"
    part = -(-p // n)  # elements in this rank's partition (DeepSpeed pads partitions to equal size)
    off_opt = layout.offload in ("optimizer", "optimizer+params")
    off_par = layout.offload == "optimizer+params"
    gathered_w = gathered_g = persistent_g = persistent_w = cpu = 0
    if stage == 0:
        weights = p * wb
        backward = p * gb
        # fp32: torch AdamW steps the weights in place. Mixed: DeepSpeed's FP16/BF16 optimizer keeps fp32 masters
        # and flattens the 16-bit gradients into fp32 ones (runtime/fp16/*optimizer.py).
        step = p * gb + (p * FP32_GRAD_BYTES if mixed else 0)
        master = p * MASTER_BYTES if mixed else 0
        states = optimizer_state_bytes(p, layout, muon_params=muon_params, largest_muon=largest_muon)
    elif stage in (1, 2):
        weights = p * wb
        # ZeRO-1 accumulates full gradients in param.grad and reduces them at the boundary; ZeRO-2 reduce-scatters
        # during backward into a partition buffer (stage_1_and_2.py). At the step both hold the partition and
        # convert it to fp32 (flatten(...).to(fp32), a copy even in fp32).
        backward = p * gb if stage == 1 else (0 if off_opt else part * gb)
        step = 0 if off_opt else part * (gb + FP32_GRAD_BYTES)
        master = 0 if off_opt else part * MASTER_BYTES
        states = 0 if off_opt else optimizer_state_bytes(p, layout, muon_params=muon_params,
                                                         largest_muon=largest_muon)
        if off_opt:
            # ZeRO-Offload (cpu_offload in stage_1_and_2.py): gradients cross to the host through a staging buffer of
            # the largest tensor's size on each side (temp_grad_buffer_for_gpu/cpu_offload). The host keeps the fp32
            # gradient partition, master weights and Adam, a 16-bit copy of the partition that the updated weights
            # return to the GPU from (param_buffer_of_bit16_for_cpu_offload_groups) and, in ZeRO-2, the gradients
            # accumulated over micro-steps (accumulated_grads_in_cpu, weights' dtype; allocated only with gradient
            # accumulation, counted always). DeepSpeed's estimator leaves out these three.
            staging = largest_tensor * gb
            backward += staging
            persistent_g = step = staging
            cpu = (part * (FP32_GRAD_BYTES + MASTER_BYTES + ADAM_STATE_BYTES + wb + (gb if stage == 2 else 0))
                   + staging)
    else:
        # ZeRO-3 (stage3.py): a flat 16-bit gradient partition buffer allocated once (grad_partitions_flat_buffer,
        # on the optimizer's device), fp32 gradients converted one sub-group at a time, tensors below the
        # persistence threshold kept whole on every rank.
        weights = 0 if off_par else part * wb
        persistent_w = persistent * wb if n > 1 or off_par else 0
        gathered_w = largest_tensor * wb
        gathered_g = largest_tensor * gb
        if off_opt:
            backward = step = master = states = 0
            cpu = part * (gb + FP32_GRAD_BYTES + MASTER_BYTES + ADAM_STATE_BYTES) + (part * wb if off_par else 0)
        else:
            backward = persistent_g = part * gb
            step = part * gb + min(part, SUB_GROUP_SIZE) * FP32_GRAD_BYTES
            master = part * MASTER_BYTES
            states = optimizer_state_bytes(p, layout, muon_params=muon_params, largest_muon=largest_muon)
    return ModelStateBytes(weights=weights, persistent_weights=persistent_w, gathered_weights=gathered_w,
                           backward_gradients=backward, gathered_gradients=gathered_g, step_gradients=step,
                           master_weights=master, optimizer_states=states, persistent_gradients=persistent_g, cpu=cpu)


def communication_bytes(num_params: int, layout: Layout, *, largest_tensor: int = 0, persistent: int = 0) -> int:
    """GPU bytes of DeepSpeed's communication buckets and ZeRO-3's gathered working set beyond the largest layer."""
    p, stage, gb = num_params, layout.zero_stage, DTYPE_BYTES[layout.precision]
    if stage == 0:
        # engine.allreduce_gradients flattens up to 5e8 elements per all-reduce (MEMORY_OPT_ALLREDUCE_SIZE).
        return min(p, 500_000_000) * gb if layout.world_size > 1 else 0
    if stage in (1, 2):
        # One IPG bucket of reduce_bucket_size elements while gradients are reduced (setup_buckets); after the
        # step, the updated partitions are all-gathered in allgather_bucket_size pieces.
        allgather = min(p, ALLGATHER_BUCKET_ELEMENTS) * gb if layout.world_size > 1 else 0
        return REDUCE_BUCKET_ELEMENTS * gb + allgather
    # ZeRO-3: the IPG bucket is allocated up front at full size; gathered weights beyond the largest layer: the
    # live set (bounded by max_live_parameters) plus one prefetch bucket, never more than the model itself.
    gathered = min(max(p - persistent, 0), max(largest_tensor, STAGE3_MAX_LIVE_PARAMETERS)
                   + STAGE3_PREFETCH_BUCKET_ELEMENTS)
    return REDUCE_BUCKET_ELEMENTS * gb + max(gathered - largest_tensor, 0) * DTYPE_BYTES[layout.precision]


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Predicted memory of one rank; the GPU components add up to gpu_total."""

    parameters: int
    """Weights on the GPU (including ZeRO-3's gathered largest layer)."""
    gradients: int
    """Gradients on the GPU at the peak moment."""
    optimizer_states: int
    """fp32 master weights and Adam moments on the GPU."""
    activations: int
    """Tensors saved for backward (0 when the optimizer step is the peak)."""
    logits: int
    """Logits and the loss's fp32 log-softmax and gradients (0 when the optimizer step is the peak)."""
    communication: int
    """DeepSpeed buckets and ZeRO-3's gathered working set."""
    fragmentation: int
    """Allocator slack, FRAGMENTATION_FRACTION of the allocated peak."""
    cuda_context: int
    """CUDA context and library workspaces (CUDA_CONTEXT_BYTES; 0 when planning for host RAM)."""
    peak_moment: Literal["backward", "optimizer step"]
    """Which moment of a step holds the most memory."""
    cpu_total: int
    """Host RAM of this rank: process overhead, the model as built before DeepSpeed takes it, offloaded states."""
    export_host: int
    """Host RAM of the node with rank 0 while it writes final_model.pt / best_model.pt: every local rank's process
    and offloaded states, plus the full fp32 weights, 4 bytes per parameter, that rank 0 gathers
    (engine/checkpoint/manager.py: the other ranks hold one tensor at a time; the model as first built is gone by then)."""
    model_states: ModelStateBytes
    """The model-state detail the GPU components come from."""
    num_params: int
    """Trainable parameters."""
    layout: Layout
    """What was estimated."""

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated should report: the peak without slack and context."""
        return (self.parameters + self.gradients + self.optimizer_states + self.activations + self.logits
                + self.communication)

    @property
    def gpu_total(self) -> int:
        return self.allocated + self.fragmentation + self.cuda_context

    @property
    def node_host_total(self) -> int:
        """Peak host RAM of the node with rank 0: at start (every local rank's cpu_total) or at an export."""
        return max(self.layout.local_ranks * self.cpu_total, self.export_host)


def activation_bytes(model: ModelConfig, layout: Layout) -> int:
    """Saved activations plus backward workspace of one micro-batch on one rank.

    With the first N of L blocks checkpointed (Megatron-LM's block method), two moments compete:
    - the end of the forward pass: N block inputs and the L - N other blocks' saved activations;
    - the recomputation of block N - 1, the first one backward reaches: the inputs of blocks 0 to N - 2 and that
      block's activations (which hold its own input); the L - N later blocks' activations were freed by their
      backward, the later inputs with them.
    The second only decides when N = L: then checkpointing the last block saves nothing (its recomputation holds
    what keeping it would), and the plan's fewest-blocks search stops at L - 1. The first moment is checked against
    the tensors autograd saves for every N (tests/launcher/test_memory.py); the second is reasoned, not measured.
    """
    ab = DTYPE_BYTES[layout.precision]
    tokens = layout.micro_batch * layout.seq_len // layout.sequence_parallel  # this rank's shard of each sequence
    # Each block's own bytes: the hybrid's attention and Mamba layers differ (model/hybrid/costs.py). Per token, a
    # sequence-parallel block saves what the unsplit one does (its mixers hold the whole sequence for 1/N of the
    # heads); Mamba's split mixers run the separate conv and scan ops, never mamba-ssm's one-op path.
    per_layer = model_sizes.activation_bytes_per_layer(
        model, ab, seq_len=layout.seq_len, on_cuda=layout.on_cuda,
        fused_ssm_kernels=layout.fused_ssm_kernels and layout.sequence_parallel == 1)
    # Tiled MLPs (model/transformer/costs.py tiled_mlp_saved_bytes): every block saves 4 ffn x bytes per token
    # less, and one tile's recomputation plus its input gradient live while a block runs backward.
    tiles = mlp_tiles(layout.tiled_mlp, layout.seq_len // layout.sequence_parallel, model.d_model)
    tiled_workspace = 0
    if tiles > 1:
        tile_tokens = layout.micro_batch * -(-(layout.seq_len // layout.sequence_parallel) // tiles)
        saved, tiled_workspace = model_sizes.tiled_mlp_bytes(model, ab, tokens=tokens, tile_tokens=tile_tokens)
        per_layer = [b - saved for b in per_layer]
    checkpointed = layout.num_checkpointed_blocks
    if checkpointed > model.n_layers:
        raise ValueError(f"{checkpointed} checkpointed blocks, but the model has {model.n_layers} (model.n_layers)")
    block_input = model_sizes.layer_input_bytes(model, ab)
    kept = checkpointed * block_input + sum(per_layer[checkpointed:])
    if checkpointed:
        kept = max(kept, (checkpointed - 1) * block_input + per_layer[checkpointed - 1])  # block N - 1 recomputed
    head = model_sizes.head_activation_bytes(model, ab, on_cuda=layout.on_cuda)
    return tokens * (kept + BACKWARD_WORKSPACE_LAYERS * max(per_layer) + head) + tiled_workspace


def estimate_memory(model: ModelConfig, layout: Layout) -> MemoryEstimate:
    """Per-rank GPU and host memory of training `model` under `layout`."""
    stats = model_sizes.parameter_stats(model, STAGE3_PARAM_PERSISTENCE_THRESHOLD)
    zero3 = layout.zero_stage == 3
    largest = stats.largest_tensor if zero3 or layout.offload != "none" else 0
    persistent = stats.persistent if zero3 else 0
    muon_params, largest_muon = model_sizes.muon_stats(model) if layout.optimizer == "muon" else (0, 0)
    states = model_state_bytes(stats.total, layout, largest_tensor=largest, persistent=persistent,
                               muon_params=muon_params, largest_muon=largest_muon)
    comm = communication_bytes(stats.total, layout, largest_tensor=largest, persistent=persistent)
    local_tokens = layout.micro_batch * layout.seq_len // layout.sequence_parallel
    # Sequence parallelism: one block's all-to-all buffers at a time (model/*_costs.py sequence_parallel_buffer_bytes).
    comm += local_tokens * model_sizes.sequence_parallel_buffer_bytes(model, DTYPE_BYTES[layout.precision],
                                                                      layout.sequence_parallel)
    acts = activation_bytes(model, layout)
    # model/losses.py: the chunked loss runs on CUDA (on CPU with training.tiled_loss) except under ZeRO-3.
    logits = model_sizes.logits_bytes(model, DTYPE_BYTES[layout.precision],
                                      tokens=local_tokens,
                                      chunked=(layout.on_cuda or layout.tiled_loss) and not zero3)
    optimizer = states.master_weights + states.optimizer_states
    backward = dict(parameters=states.weights + states.persistent_weights + states.gathered_weights,
                    gradients=states.backward_gradients + states.gathered_gradients, optimizer_states=optimizer,
                    activations=acts, logits=logits, communication=comm)
    # At the step: ZeRO-3 keeps its up-front IPG bucket; the other stages' buckets are gone.
    # Muon's Newton-Schulz buffers live while the update is computed, at the step (ZeRO-1/2: at the last backward's
    # end, when the step's gradients are complete; counted here with the step).
    workspace = muon_workspace_bytes(layout, muon_params=muon_params, largest_muon=largest_muon)
    step = dict(parameters=states.weights, gradients=states.step_gradients, optimizer_states=optimizer + workspace,
                activations=0, logits=0, communication=REDUCE_BUCKET_ELEMENTS * DTYPE_BYTES[layout.precision]
                if zero3 else 0)
    moment, parts = max((("backward", backward), ("optimizer step", step)), key=lambda item: sum(item[1].values()))
    allocated = sum(parts.values())
    # Host: under ZeRO-3 the trainer builds the model inside deepspeed.zero.Init, which partitions each layer as it
    # is created (DeepSpeed's zero_init estimate: 4 x largest). ZeRO 0-2 on CUDA build it directly on the GPU in the
    # training dtype (model.registry.create_model_on), so no host copy; CPU ranks build it in fp32 in host RAM.
    built = stats.largest_tensor * 4 if zero3 else 0 if layout.on_cuda else stats.total * 4
    cpu = CPU_PROCESS_BYTES + int(max(built, states.cpu) * (CPU_BUFFER_FACTOR if states.cpu else 1))
    at_export = layout.local_ranks * (CPU_PROCESS_BYTES + int(states.cpu * CPU_BUFFER_FACTOR)) + 4 * stats.total
    return MemoryEstimate(**parts, fragmentation=int(allocated * FRAGMENTATION_FRACTION),
                          cuda_context=CUDA_CONTEXT_BYTES if layout.on_cuda else 0, peak_moment=moment,
                          cpu_total=cpu, export_host=at_export, model_states=states, num_params=stats.total,
                          layout=layout)
