"""Planning across nodes: what crosses the inter-node link each step, and where that changes the plan.

Within a node GPUs talk over NVLink (450 GB/s per direction on an H100); between nodes over InfiniBand or Ethernet,
typically 25-50 GB/s per node (launcher/nodes.py DEFAULT_INTERNODE_BYTES_PER_S). Per optimizer step of A
micro-batches, with S the bytes of one copy of the weights in the training dtype and f = (n - 1) / n for n nodes,
each node sends (and receives) across the link about:
  ZeRO-0 / ZeRO-1   2 S f            one gradient all-reduce (or reduce + all-gather) at the accumulation boundary:
                                     DeepSpeed's engine reduces stage 0/1 gradients there only (engine.py
                                     allreduce_gradients: "ZeRO stage >= 2 communicates during non gradient
                                     accumulation boundaries as well");
  ZeRO-2            (A + 1) S f      a gradient reduce-scatter every micro-batch, one parameter all-gather per step;
  ZeRO-3            3 A S f          every micro-batch gathers the parameters for forward and again for backward, and
                                     reduce-scatters the gradients (Rajbhandari et al. 2020, section 7: 1.5x ZeRO-2's
                                     volume at A = 1);
  ZeRO-3 + hpZ      2 A S f          ZeRO++ hierarchical partitioning (`zero_hpz_partition_size` = GPUs per node,
                                     Wang et al. 2023, section 3.2) keeps a secondary copy of the weights sharded
                                     within each node, so the backward all-gather stays on NVLink; it costs S / g more
                                     memory per GPU for g GPUs per node.
So across nodes the planner ranks ZeRO-3 after every ZeRO 0-2 layout of the same offload tier, recomputation
included (plan.py `_tier`): a recomputed forward costs about a third of a step's compute on the GPU, ZeRO-3's extra
traffic crosses the slowest link in the job 2A times a step. When only ZeRO-3 fits, hpZ is switched on if its
secondary copy fits too. The Why line of the plan gives the figures for this model and link.
"""
from __future__ import annotations

from dataclasses import replace

from engine.config import TrainingConfig
from launcher.planning.hardware import format_bytes
from launcher.nodes import NodeLayout
from launcher.planning.plan import SAFETY_MARGIN, Plan, evaluate_layouts
from model.config import ModelConfig

_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def internode_bytes_per_step(zero_stage: int, *, weight_bytes: float, grad_accum: int, num_nodes: int,
                             hpz: bool = False) -> float:
    """Bytes each node sends across the inter-node link per optimizer step (module docstring's table)."""
    share = (num_nodes - 1) / num_nodes
    if zero_stage <= 1:
        rounds = 2
    elif zero_stage == 2:
        rounds = grad_accum + 1
    else:
        rounds = (2 if hpz else 3) * grad_accum
    return rounds * weight_bytes * share


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:,.1f} GB"


def plan_across_nodes(plan: Plan, model: ModelConfig, training: TrainingConfig, nodes: NodeLayout) -> Plan:
    """`plan` (chosen with num_nodes) with hierarchical partitioning where ZeRO-3 needs it, and the inter-node
    figures in its reason and description."""
    num_nodes = nodes.num_nodes
    gpus_per_node = max(1, plan.world_size // num_nodes)
    link = nodes.internode_bytes_per_s
    description = (f"{num_nodes} nodes x {gpus_per_node} GPU(s) ({nodes.source}); inter-node bandwidth "
                   f"{link / 1e9:g} GB/s per node ({nodes.internode_source})")
    plan = replace(plan, num_nodes=num_nodes, nodes_description=description)
    if plan.memory is None:
        return plan
    weight_bytes = plan.memory.num_params * _DTYPE_BYTES[training.precision]

    def traffic(stage: int, hpz: bool = False, micro_batch: int | None = None) -> str:
        accum = plan.grad_accum  # another micro-batch keeps the global batch: accumulation scales inversely
        if micro_batch is not None and training.gradient_accumulation_steps is None:
            accum = max(1, round(plan.grad_accum * plan.micro_batch / micro_batch))
        moved = internode_bytes_per_step(stage, weight_bytes=weight_bytes, grad_accum=accum, num_nodes=num_nodes,
                                         hpz=hpz)
        at = f" at micro-batch {micro_batch}" if micro_batch not in (None, plan.micro_batch) else ""
        return f"{_gb(moved)}{at} (~{moved / link:,.1f} s)"

    where = f"across {num_nodes} nodes at {link / 1e9:g} GB/s each, per step of {plan.grad_accum} micro-batches"
    if plan.zero_stage < 3:
        zero3 = next((c for c in plan.candidates if c.fits and c.zero_stage == 3), None)
        why = (f"{where}: ZeRO-{plan.zero_stage} sends {traffic(plan.zero_stage)} between nodes, ZeRO-3 would send "
               f"{traffic(3, micro_batch=zero3.micro_batch if zero3 else None)} (parameter all-gathers every "
               "micro-batch), so ZeRO 0-2 rank before ZeRO-3 across nodes")
        one_node = _one_node_choice(plan, model, training)
        if one_node is not None and one_node.label != _label(plan):
            why += (f" (with all {plan.world_size} ranks on one node the plan would take {one_node.label} at "
                    f"micro-batch {one_node.micro_batch})")
        return replace(plan, reason=f"{plan.reason}; {why}")
    extra = weight_bytes / gpus_per_node  # the secondary copy, sharded over the node's GPUs
    budget = plan.budget
    fits = budget.gpu_bytes is None or plan.memory.gpu_total + extra <= budget.gpu_bytes * (1 - SAFETY_MARGIN)
    if budget.on_cuda and gpus_per_node > 1 and fits:
        why = (f"{where}: ZeRO-3 would send {traffic(3)} between nodes; hierarchical partitioning "
               f"zero_hpz_partition_size={gpus_per_node} keeps the backward all-gather within each node: "
               f"{traffic(3, hpz=True)}, for {format_bytes(extra)} more per GPU (a secondary copy of the weights "
               f"sharded over the node's {gpus_per_node} GPUs)")
        return replace(plan, zero_hpz_partition_size=gpus_per_node, reason=f"{plan.reason}; {why}")
    reason = ("one GPU per node" if gpus_per_node == 1 else "CPU ranks" if not budget.on_cuda else
              f"its secondary copy ({format_bytes(extra)} per GPU) does not fit")
    why = (f"{where}: ZeRO-3 sends {traffic(3)} between nodes, and hierarchical partitioning is off ({reason}); "
           "a ZeRO 0-2 layout would send far less, given the memory for one")
    return replace(plan, reason=f"{plan.reason}; {why}")


def _label(plan: Plan) -> str:
    chosen = next((c for c in plan.candidates if c.fits and c.zero_stage == plan.zero_stage
                   and c.offload == plan.offload and c.num_checkpointed_blocks == plan.num_checkpointed_blocks
                   and c.sequence_parallel == plan.sequence_parallel), None)
    return chosen.label if chosen else f"ZeRO-{plan.zero_stage}"


def _one_node_choice(plan: Plan, model: ModelConfig, training: TrainingConfig):
    """The candidate the same ranks would get if they were all on one node (the single-node ranking)."""
    ranked = evaluate_layouts(model, training, plan.world_size, plan.budget, plan.sequence_parallel, num_nodes=1)
    return next((c for c in ranked if c.fits), None)
