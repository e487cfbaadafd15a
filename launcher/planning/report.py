"""The dry-run table: predicted memory per rank of every layout the planner tried, and the plan it chose."""
from __future__ import annotations

from engine.config import TrainingConfig
from launcher.planning.memory import MemoryEstimate
from launcher.planning.hardware import MemoryBudget
from launcher.planning.plan import SAFETY_MARGIN, Candidate, Plan
from model.config import ModelConfig

COLUMNS = ("params", "grads", "optim", "activ", "logits", "comm", "slack")
"""Per-rank GPU components: weights, gradients, fp32 master + Adam, saved activations, logits and loss buffers,
DeepSpeed buckets and ZeRO-3 working set, fragmentation + CUDA context."""


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / (1 << 30):.1f}"


def _components(estimate: MemoryEstimate) -> list[str]:
    values = (estimate.parameters, estimate.gradients, estimate.optimizer_states, estimate.activations,
              estimate.logits, estimate.communication, estimate.fragmentation + estimate.cuda_context)
    return [_gib(v) for v in values]


def render_candidates(candidates: tuple[Candidate, ...], chosen: Candidate | None = None) -> str:
    """One row per layout: memory per rank by component (GiB) at its largest fitting micro-batch."""
    header = ["", "layout", "micro", *COLUMNS, "device", "host", "peak at", "fits"]
    rows = []
    for candidate in candidates:
        estimate = candidate.estimate
        micro = str(candidate.micro_batch) if candidate.fits else f"({estimate.layout.micro_batch})"
        verdict = "yes" if candidate.fits else f"no: {candidate.note}"
        mark = "*" if candidate is chosen else ""
        rows.append([mark, candidate.label, micro, *_components(estimate), _gib(estimate.gpu_total),
                     _gib(estimate.node_host_total), estimate.peak_moment, verdict])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(w) if i in (0, 1, len(widths) - 1) else str(cell).rjust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells) + "  " + str(row[-1]))
    return "\n".join(line.rstrip() for line in lines)


def _count(num_params: int) -> str:
    """1.10B, 48.51M: the figure README.md's preset table quotes."""
    return f"{num_params / 1e9:.2f}B" if num_params >= 1e9 else f"{num_params / 1e6:.2f}M"


def _budget_line(budget: MemoryBudget) -> str:
    return f"Planned against: {budget.source}; safety margin {SAFETY_MARGIN:.0%} of each."


def _optimizer_label(model: ModelConfig, training: TrainingConfig) -> str:
    """'optimizer AdamW', or Muon with how many parameters it takes (the rest: AdamW)."""
    if training.optimizer != "muon":
        return "optimizer AdamW"
    from launcher.planning.model_sizes import count_parameters, muon_stats
    muon, _ = muon_stats(model)
    return (f"optimizer Muon for {_count(muon)} hidden-matrix parameters + AdamW for "
            f"{_count(count_parameters(model) - muon)} (ns {training.muon_ns_method})")


def render_plan(plan: Plan, model: ModelConfig, training: TrainingConfig, *, name: str = "") -> str:
    """The full dry-run report: context, the candidate table, the chosen plan and why."""
    memory = plan.memory
    num_params = memory.num_params if memory is not None else 0
    layout = f" = {plan.num_nodes} nodes x {plan.world_size // plan.num_nodes} GPUs" if plan.num_nodes > 1 else ""
    title = (f"Memory plan{' for ' + name if name else ''}: {model.model_type}, {_count(num_params)} parameters, "
             f"{training.precision}, sequence {model.max_seq_len}, {plan.world_size} rank(s){layout}, "
             f"{_optimizer_label(model, training)}")
    chosen = next((c for c in plan.candidates if c.fits and c.zero_stage == plan.zero_stage
                   and c.offload == plan.offload and c.num_checkpointed_blocks == plan.num_checkpointed_blocks
                   and c.sequence_parallel == plan.sequence_parallel),
                  None)
    lines = [title, _budget_line(plan.budget), *([f"Nodes: {plan.nodes_description}"] if plan.nodes_description
                                                 else []), "",
             "Per rank, GiB (micro-batch in parentheses: the smallest tried, which does not fit; host = whole node):",
             render_candidates(plan.candidates, chosen), ""]
    target = training.tokens_per_step
    lines.append(f"Chosen: {chosen.label if chosen else f'ZeRO-{plan.zero_stage}'}, micro-batch {plan.micro_batch}, "
                 f"gradient accumulation {plan.grad_accum}, global batch {plan.global_batch} sequences = "
                 f"{plan.global_batch_tokens:,} tokens per step (target {target:,})")
    if memory is not None:
        device = "GPU" if plan.budget.on_cuda else "device (host RAM: CPU ranks)"
        lines.append(f"Predicted per rank: {_gib(memory.gpu_total)} GiB {device} "
                     f"({_gib(memory.allocated)} GiB allocated at the {memory.peak_moment} peak, as "
                     f"torch.cuda.max_memory_allocated counts), host RAM {_gib(memory.cpu_total)} GiB "
                     f"(node with rank 0 while it writes final_model.pt: {_gib(memory.export_host)} GiB)")
    if plan.zero_hpz_partition_size > 1:
        lines.append(f"ZeRO++ hierarchical partitioning: zero_hpz_partition_size {plan.zero_hpz_partition_size}")
    lines.append(f"Why: {plan.reason}")
    return "\n".join(lines)
