"""The training plan: ZeRO stage, offload, micro-batch, accumulation and activation checkpointing, chosen from the
memory estimate (launcher/planning/memory.py) so that the run fits before it starts.

Every layout the config allows is evaluated at the largest micro-batch that fits; the fastest one wins:
1. no offload before optimizer offload before parameter offload (host Adam and PCIe traffic are the slowest);
2. no activation checkpointing before checkpointing (it recomputes the forward pass: ~1/3 more compute);
3. ZeRO 0-2 before ZeRO-3 (ZeRO-1/2 communicate as much as plain data parallelism, ZeRO-3 1.5x: Rajbhandari et
   al. 2020, section 7);
4. the larger micro-batch; then the lower stage;
5. with checkpointing, the fewest blocks that fit at that micro-batch (the largest that fits with every block
   checkpointed): Megatron-LM's block recompute method checkpoints the first N of L blocks, and recomputing them
   costs ~N/L of a forward pass. Memory never grows with N (launcher/planning/memory.py activation_bytes), so a binary
   search finds the fewest in log2(L) estimates; N = L holds as much as N = L - 1, so 'auto' stops at L - 1.
Sequence parallelism (training.sequence_parallel, model/sequence_parallel.py) splits each sequence over N ranks:
the activations of a rank shrink N-fold, the data-parallel ranks drop to world / N, and every block exchanges its
mixer inputs and outputs in all-to-alls. An explicit N is evaluated as above. Under 'auto' every N that divides the
ranks, the heads and the sequence is evaluated, and the layouts are ranked by offload first (1), then by the
estimated step time (`relative_step_time`): recomputing b of L blocks adds b/L of a forward pass (~1/3 of a step),
N-way sequence parallelism adds its all-to-all traffic at ALL_TO_ALL_BYTES_PER_S against the step's FLOPs at
ASSUMED_FLOPS_PER_S; so the smallest N that fits wins unless recomputing a few blocks at a smaller N is cheaper.
Gradient accumulation then brings the global batch to training.tokens_per_step. Explicit config values are kept
and checked (an explicit training.activation_checkpointing is the number of blocks, true all of them); if nothing
fits, PlanError says what would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.config import TrainingConfig
from launcher.planning import model_sizes
from launcher.planning.hardware import UNLIMITED, MemoryBudget, format_bytes
from launcher.planning.memory import DTYPE_BYTES, Layout, MemoryEstimate, estimate_memory
from model.config import ModelConfig

SAFETY_MARGIN = 0.05
"""Fraction of each GPU's (or the host's) memory the plan leaves unused, on top of the estimate's own
fragmentation and CUDA-context allowances: other processes, driver growth, estimate error."""
ALL_TO_ALL_BYTES_PER_S = 100e9
"""Per-GPU all-to-all bandwidth the plan assumes for sequence parallelism inside one NVLink node: NVLink 4 gives an
H100 450 GB/s per direction (NVIDIA H100 datasheet); all-to-all among 8 GPUs through NVSwitch reaches a fraction of
it, and DeepSpeed's Ulysses runs its all-to-alls unoverlapped with compute. An assumption, stated to weigh layouts,
not a measurement."""
ASSUMED_FLOPS_PER_S = 400e12
"""Training FLOP rate per GPU the plan weighs communication against: ~40% of an H100's 989 TFLOP/s dense bf16."""
MAX_MICRO_BATCH = 64
"""Largest micro-batch tried (powers of two up to it): beyond this, GPUs gain no throughput on these sizes."""


class PlanError(ValueError):
    """No layout fits; the message names what would."""

    def __init__(self, message: str, candidates: tuple["Candidate", ...] = ()):
        super().__init__(message)
        self.candidates = candidates


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One evaluated layout at its largest fitting micro-batch (or micro-batch 1 when none fits)."""

    zero_stage: int
    """DeepSpeed ZeRO stage."""
    offload: str
    """'none', 'optimizer' or 'optimizer+params'."""
    num_checkpointed_blocks: int
    """Blocks, from the first, recomputed in backward (the fewest that fit under 'auto')."""
    num_layers: int
    """Blocks in the model."""
    micro_batch: int | None
    """Largest micro-batch that fits; None when not even the smallest tried does."""
    estimate: MemoryEstimate
    """Memory at micro_batch (or at the smallest micro-batch tried)."""
    note: str
    """Why it does not fit, or '' when it does."""
    sequence_parallel: int = 1
    """Ranks each sequence is split over."""
    relative_time: float = 1.0
    """Estimated step time per token against the same layout without recomputation or sequence parallelism."""

    @property
    def fits(self) -> bool:
        return self.micro_batch is not None

    @property
    def label(self) -> str:
        offload = {"none": "", "optimizer": " +opt offload", "optimizer+params": " +opt+param offload"}[self.offload]
        sp = f" +SP{self.sequence_parallel}" if self.sequence_parallel > 1 else ""
        tiled = " +tiled mlp" if self.estimate.layout.tiled_mlp is not False else ""
        return (f"ZeRO-{self.zero_stage}{offload}{sp}{tiled}"
                f"{checkpointing_label(self.num_checkpointed_blocks, self.num_layers)}")


def checkpointing_label(num_checkpointed_blocks: int, num_layers: int) -> str:
    """'' (none), ' +ckpt' (every block) or ' +ckpt 6/24' (the first 6 of 24): the suffix of a layout's label."""
    if num_checkpointed_blocks == 0:
        return ""
    return " +ckpt" if num_checkpointed_blocks == num_layers else f" +ckpt {num_checkpointed_blocks}/{num_layers}"


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How one run is laid out on its ranks."""

    zero_stage: int
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool
    """Optimizer states (and fp32 master weights) live in CPU RAM, stepped by DeepSpeedCPUAdam."""
    offload_params: bool
    """ZeRO-3 parameters live in CPU RAM between uses."""
    micro_batch: int
    """Sequences per rank per micro-step."""
    grad_accum: int
    """Micro-steps per optimizer step."""
    num_checkpointed_blocks: int
    """Blocks, from the first, whose activations are recomputed in the backward pass (0 = none)."""
    num_layers: int
    """Blocks in the model."""
    world_size: int
    """Number of ranks (data-parallel x sequence-parallel)."""
    sequence_parallel: int = 1
    """Ranks each sequence is split over; world_size / sequence_parallel ranks read different samples."""
    seq_len: int = 0
    """Tokens per sequence (0 when unknown)."""
    reason: str = ""
    """Why this layout was chosen."""
    memory: MemoryEstimate | None = None
    """Predicted memory per rank of the chosen layout."""
    budget: MemoryBudget = UNLIMITED
    """What it was planned against."""
    candidates: tuple[Candidate, ...] = field(default=(), repr=False)
    """Every layout evaluated, in order of preference."""
    num_nodes: int = 1
    """Nodes the ranks are spread over (world_size / num_nodes per node); launcher/planning/internode.py plans across
    them."""
    zero_hpz_partition_size: int = 1
    """ZeRO-3 hierarchical partitioning (ZeRO++ hpZ): ranks holding a secondary copy of the weights; 1 = off."""
    nodes_description: str = ""
    """The nodes and the inter-node link, and where both figures come from ('' on one node)."""

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.sequence_parallel

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.data_parallel_size

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def offload(self) -> str:
        return "optimizer+params" if self.offload_params else "optimizer" if self.offload_optimizer else "none"

    @property
    def checkpointing_label(self) -> str:
        """'', ' +ckpt' or ' +ckpt 6/24' (checkpointing_label)."""
        return checkpointing_label(self.num_checkpointed_blocks, self.num_layers)


# ---- evaluation ----------------------------------------------------------------------------------------------------

def _fit_problem(estimate: MemoryEstimate, budget: MemoryBudget) -> str:
    """'' if the estimate fits the budget, else which memory overflows and by how much."""
    usable = 1.0 - SAFETY_MARGIN
    ranks = budget.ranks_per_node
    if not budget.on_cuda:  # CPU ranks: device and host memory are the same RAM
        need = _need(estimate, budget)
        if budget.cpu_bytes is not None and need > budget.cpu_bytes * usable:
            return (f"needs {format_bytes(need)} of host RAM for {ranks} rank(s), "
                    f"{format_bytes(budget.cpu_bytes * usable)} usable")
        return ""
    if budget.gpu_bytes is not None and estimate.gpu_total > budget.gpu_bytes * usable:
        return f"needs {format_bytes(estimate.gpu_total)}/GPU, {format_bytes(budget.gpu_bytes * usable)} usable"
    if budget.cpu_bytes is not None and estimate.node_host_total > budget.cpu_bytes * usable:
        return (f"needs {format_bytes(estimate.node_host_total)} of host RAM, "
                f"{format_bytes(budget.cpu_bytes * usable)} usable")
    return ""


def _layouts(training: TrainingConfig, num_layers: int) -> list[tuple[int, str, int | None]]:
    """(stage, offload, checkpointed blocks) the config allows, in order of preference (module docstring, 1-3);
    None stands for 'the fewest blocks, at least one, that fit' (checkpointing under 'auto')."""
    stages = [0, 1, 2, 3] if training.zero_stage == "auto" else [training.zero_stage]
    offloads = ["none", "optimizer", "optimizer+params"] if training.offload == "auto" else [training.offload]
    if training.optimizer == "muon":
        offloads = ["none"]  # engine/config.py refuses Muon with offload; 'auto' plans without it
    fixed = training.checkpointed_blocks(num_layers)
    ckpts = [0, None] if fixed is None else [fixed]
    layouts = [(s, o, c) for o in offloads for c in ckpts for s in stages
               if not (o == "optimizer" and s == 0) and not (o == "optimizer+params" and s != 3)]
    return sorted(layouts, key=lambda l: (offloads.index(l[1]), l[2] != 0, l[0] == 3))


def _micro_batches(model: ModelConfig, training: TrainingConfig, world_size: int) -> list[int]:
    """Micro-batches to try, largest first: the explicit one, or powers of two up to what one step needs
    (world_size: the data-parallel ranks, ranks / sequence_parallel)."""
    if training.batch_size is not None:
        return [training.batch_size]
    per_rank = math.ceil(training.tokens_per_step / model.max_seq_len / world_size)
    if training.gradient_accumulation_steps is not None:
        per_rank = math.ceil(per_rank / training.gradient_accumulation_steps)
    largest = min(MAX_MICRO_BATCH, max(1, per_rank))
    return [2 ** k for k in range(int(math.log2(largest)), -1, -1)]


def relative_step_time(model: ModelConfig, training: TrainingConfig, *, num_checkpointed_blocks: int,
                       sequence_parallel: int) -> float:
    """Estimated time per token against no recomputation and no sequence parallelism (module docstring)."""
    recompute = num_checkpointed_blocks / model.n_layers / 3  # a forward pass is ~1/3 of forward + backward
    traffic = model_sizes.sequence_parallel_traffic_bytes(model, DTYPE_BYTES[training.precision], sequence_parallel)
    flops = model_sizes.training_flops_per_token(model, model.max_seq_len)
    communication = (traffic / ALL_TO_ALL_BYTES_PER_S) / (flops / ASSUMED_FLOPS_PER_S) if traffic else 0.0
    return (1 + recompute) * (1 + communication)


def sequence_parallel_options(model: ModelConfig, training: TrainingConfig, world_size: int) -> list[int]:
    """The sequence-parallel sizes to plan with: the configured one (checked: PlanError naming the fix when it
    cannot split this model on these ranks), or under 'auto' 1 and every power of two that can."""
    value = training.sequence_parallel
    if value != "auto":
        problem = "" if value == 1 else (
            f"it does not divide the {world_size} ranks" if world_size % value
            else model_sizes.sequence_parallel_problem(model, value))
        if problem:
            valid = [n for n in _powers_of_two(world_size) if not model_sizes.sequence_parallel_problem(model, n)]
            raise PlanError(f"training.sequence_parallel={value} cannot split this run: {problem}; choose one of "
                            f"{', '.join(map(str, valid))} (or auto)")
        return [value]
    return [n for n in _powers_of_two(world_size) if not model_sizes.sequence_parallel_problem(model, n)]


def _powers_of_two(world_size: int) -> list[int]:
    return [n for n in (2 ** k for k in range(world_size.bit_length())) if world_size % n == 0]


def evaluate_layouts(model: ModelConfig, training: TrainingConfig, world_size: int,
                     budget: MemoryBudget = UNLIMITED, sequence_parallel: int = 1, *,
                     num_nodes: int = 1) -> list[Candidate]:
    """Every allowed layout at its largest fitting micro-batch, in order of preference (best first); across nodes
    ZeRO-3 ranks after every ZeRO 0-2 layout of its offload tier (launcher/planning/internode.py says why)."""
    layers = model.n_layers
    candidates = []
    data_parallel = world_size // sequence_parallel
    for stage, offload, blocks in _layouts(training, layers):
        def estimate(micro: int, checkpointed: int, stage=stage, offload=offload) -> MemoryEstimate:
            return estimate_memory(model, Layout(
                world_size=world_size, zero_stage=stage, offload=offload, precision=training.precision,
                micro_batch=micro, seq_len=model.max_seq_len, num_checkpointed_blocks=checkpointed,
                optimizer=training.optimizer,
                ranks_per_node=budget.ranks_per_node, on_cuda=budget.on_cuda,
                fused_ssm_kernels=budget.fused_ssm_kernels, sequence_parallel=sequence_parallel,
                tiled_mlp=training.tiled_mlp, tiled_loss=training.tiled_loss))

        # The micro-batch with every block checkpointed (the least memory), then the fewest blocks at it (rule 5).
        checkpointed = layers if blocks is None else blocks
        fitting, best, problem = None, None, ""
        for micro in _micro_batches(model, training, data_parallel):
            best = estimate(micro, checkpointed)
            problem = _fit_problem(best, budget)
            if not problem:
                fitting = micro
                break
        if fitting is not None and blocks is None:
            checkpointed, best = _fewest_blocks(lambda n: estimate(fitting, n), budget, layers, best)
            if training.sequence_parallel == "auto":
                # Weighing sequence parallelism against recomputation: a micro-batch of long sequences keeps a GPU
                # busy already, so a smaller one that recomputes fewer blocks is the faster layout.
                for micro in (m for m in _micro_batches(model, training, data_parallel) if m < fitting):
                    if checkpointed == 0:
                        break
                    at_all = estimate(micro, layers)
                    if _fit_problem(at_all, budget):
                        break
                    fewer, trial = _fewest_blocks(lambda n, micro=micro: estimate(micro, n), budget, layers, at_all)
                    if _fit_problem(estimate(micro, 0), budget) == "":
                        fewer, trial = 0, estimate(micro, 0)
                    if fewer < checkpointed:
                        fitting, checkpointed, best = micro, fewer, trial
                if checkpointed == 0:
                    continue  # recomputing nothing at a smaller micro-batch: the no-checkpointing layout's own row
        candidates.append(Candidate(
            zero_stage=stage, offload=offload, num_checkpointed_blocks=checkpointed, num_layers=layers,
            micro_batch=fitting, estimate=best, note=problem, sequence_parallel=sequence_parallel,
            relative_time=relative_step_time(model, training, num_checkpointed_blocks=checkpointed,
                                             sequence_parallel=sequence_parallel)))
    # Within one (offload, checkpointing) tier, ZeRO 0-2 cost the same communication: the larger micro-batch wins.
    ranked = sorted(enumerate(candidates), key=lambda item: (
        _tier(item[1], num_nodes), -(item[1].micro_batch or 0) if item[1].zero_stage < 3 else 0, item[0]))
    return [c for _, c in ranked]


def _fewest_blocks(estimate_at, budget: MemoryBudget, num_layers: int,
                   at_all: MemoryEstimate) -> tuple[int, MemoryEstimate]:
    """The fewest checkpointed blocks, 1 to num_layers, that fit `budget`, and their estimate; at_all (the estimate
    with every block checkpointed) fits. Memory never grows with the count, so the fitting counts are the ones from
    some N up: a binary search over them takes log2(num_layers) estimates."""
    low, high, found = 1, num_layers, at_all
    while low < high:
        middle = (low + high) // 2
        trial = estimate_at(middle)
        if _fit_problem(trial, budget):
            low = middle + 1
        else:
            high, found = middle, trial
    return high, found


def _tier(c: Candidate, num_nodes: int = 1) -> tuple[int, bool, bool]:
    offload = ["none", "optimizer", "optimizer+params"].index(c.offload)
    if num_nodes > 1:  # across nodes ZeRO-3's extra all-gathers cost more than recomputing blocks
        return (offload, c.zero_stage == 3, c.num_checkpointed_blocks > 0)
    return (offload, c.num_checkpointed_blocks > 0, c.zero_stage == 3)


def choose_plan(model: ModelConfig, training: TrainingConfig, world_size: int,
                budget: MemoryBudget = UNLIMITED, *, num_nodes: int = 1) -> Plan:
    """The fastest layout that fits `budget` (UNLIMITED: explicit values and the token target alone decide), on
    `num_nodes` nodes of world_size / num_nodes ranks."""
    options = sequence_parallel_options(model, training, world_size)
    per_size = [evaluate_layouts(model, training, world_size, budget, n, num_nodes=num_nodes) for n in options]
    candidates = tuple(c for group in per_size for c in group)
    if not any(c.fits for c in candidates):
        raise PlanError(_nothing_fits_message(model, training, world_size, budget, candidates), candidates)
    if len(options) == 1:  # one sequence-parallel size: the order of evaluate_layouts
        fitting = [next(c for c in candidates if c.fits)]
    else:  # 'auto': by offload, then estimated step time, ZeRO 0-2 before 3, the smaller size (module docstring)
        def speed(c: Candidate) -> tuple:
            return _tier(c)[0], round(c.relative_time, 3), c.zero_stage == 3, c.sequence_parallel

        fitting = [min((c for c in group if c.fits), key=speed) for group in per_size if any(c.fits for c in group)]
    best = min(fitting, key=lambda c: (_tier(c)[0], round(c.relative_time, 3), c.zero_stage == 3,
                                       c.sequence_parallel))
    data_parallel = world_size // best.sequence_parallel
    sequences = training.tokens_per_step / model.max_seq_len
    accum = training.gradient_accumulation_steps or max(1, round(sequences / (best.micro_batch * data_parallel)))
    return Plan(zero_stage=best.zero_stage, offload_optimizer=best.offload != "none",
                offload_params=best.offload == "optimizer+params", micro_batch=best.micro_batch, grad_accum=accum,
                num_checkpointed_blocks=best.num_checkpointed_blocks, num_layers=best.num_layers,
                world_size=world_size, sequence_parallel=best.sequence_parallel, seq_len=model.max_seq_len,
                reason=_reason(best, candidates, training, budget, fitting), memory=best.estimate, budget=budget,
                candidates=candidates, num_nodes=num_nodes)


def _reason(best: Candidate, candidates: tuple[Candidate, ...], training: TrainingConfig,
            budget: MemoryBudget, best_per_size: list[Candidate] = ()) -> str:
    fixed = [f"training.{key}={value}" for key, value in
             (("zero_stage", training.zero_stage), ("offload", training.offload),
              ("activation_checkpointing", training.activation_checkpointing), ("batch_size", training.batch_size),
              ("sequence_parallel", None if training.sequence_parallel in ("auto", 1) else
               training.sequence_parallel))
             if value not in ("auto", None)]
    same_size = [c for c in candidates if c.sequence_parallel == best.sequence_parallel]
    ahead = [c for c in same_size if c is not best and same_size.index(c) < same_size.index(best)]
    parts = [f"{best.label} at micro-batch {best.micro_batch} is the fastest layout that fits"]
    if training.activation_checkpointing == "auto" and 0 < best.num_checkpointed_blocks < best.num_layers:
        parts.append(f"checkpointing the first {best.num_checkpointed_blocks} of {best.num_layers} blocks, the "
                     "fewest that fit (each recomputes its forward pass)")
    if ahead:
        parts.append("faster layouts do not fit (" + "; ".join(f"{c.label}: {c.note}" for c in ahead[:3]) + ")")
    if len(best_per_size) > 1 or best.sequence_parallel > 1:
        parts.append(_sequence_parallel_reason(best, best_per_size, training, candidates))
    if budget.gpu_bytes is None:
        parts = [f"{best.label} at micro-batch {best.micro_batch}: no memory limit given, so the fastest layout"]
    if fixed:
        parts.append("kept as configured: " + ", ".join(fixed))
    return "; ".join(parts)


def _sequence_parallel_reason(best: Candidate, best_per_size: list[Candidate], training: TrainingConfig,
                              candidates: tuple[Candidate, ...]) -> str:
    """What sequence parallelism traded: the estimated step time of the best layout at each size considered."""
    def cost(c: Candidate) -> str:
        return f"{c.label} at micro-batch {c.micro_batch}: ~{(c.relative_time - 1) * 100:.0f}% slower"

    if best.sequence_parallel > 1:
        recompute = " and recomputation" if best.num_checkpointed_blocks else ""
        head = (f"each sequence is split over {best.sequence_parallel} ranks (Ulysses; its all-to-alls{recompute} "
                f"est. ~{(best.relative_time - 1) * 100:.0f}% of step time at "
                f"{ALL_TO_ALL_BYTES_PER_S / 1e9:.0f} GB/s all-to-all and {ASSUMED_FLOPS_PER_S / 1e12:.0f} TFLOP/s)")
    else:
        head = "no sequence split: the whole sequence fits one rank"
    others = [c for c in best_per_size if c is not best]
    if training.sequence_parallel == "auto" and others:
        head += "; weighed against " + "; ".join(cost(c) for c in others)
    unfit = sorted({c.sequence_parallel for c in candidates} - {c.sequence_parallel for c in best_per_size})
    if unfit:
        head += "; nothing fits " + ", ".join("unsplit" if n == 1 else f"split over {n}" for n in unfit)
    return head


# ---- when nothing fits ---------------------------------------------------------------------------------------------

def _fits(model: ModelConfig, training: TrainingConfig, world_size: int, budget: MemoryBudget) -> Candidate | None:
    return next((c for c in evaluate_layouts(model, training, world_size, budget) if c.fits), None)


def _nothing_fits_message(model: ModelConfig, training: TrainingConfig, world_size: int, budget: MemoryBudget,
                          candidates: tuple[Candidate, ...]) -> str:
    smallest = min(candidates, key=lambda c: _need(c.estimate, budget))
    lines = [f"no layout fits: {len(candidates)} tried against {budget.source}; the smallest, {smallest.label} at "
             f"micro-batch {smallest.estimate.layout.micro_batch}, {smallest.note}.", "What would fit:"]
    explicit_batch = training.batch_size is not None
    if explicit_batch:
        auto_batch = training.model_copy(update={"batch_size": None})
        found = _fits(model, auto_batch, world_size, budget)
        lines.append(f"- a smaller micro-batch: training.batch_size={training.batch_size} does not fit; "
                     + (f"set training.batch_size={found.micro_batch} (or null for automatic)" if found else
                        "not even 1 fits"))
    for key, value in (("zero_stage", "auto"), ("offload", "auto"), ("activation_checkpointing", "auto")):
        if getattr(training, key) != value:
            relaxed = training.model_copy(update={key: value})
            found = _fits(model, relaxed, world_size, budget)
            if found:
                lines.append(f"- training.{key}={value}: {found.label} fits at micro-batch {found.micro_batch}")
    if training.sequence_parallel != "auto" and world_size > 1:
        try:
            split = choose_plan(model, training.model_copy(update={"sequence_parallel": "auto"}), world_size, budget)
            chosen = next(c for c in split.candidates if c.estimate is split.memory)
            lines.append(f"- training.sequence_parallel=auto: each sequence split over {split.sequence_parallel} "
                         f"ranks, {chosen.label} fits at micro-batch {split.micro_batch}")
        except PlanError:
            pass
    for more in (2, 4, 8, 16, 32, 64):  # more nodes like this one: host RAM per node stays as it is
        ranks = world_size * more
        found = _fits(model, training, ranks, budget)
        if found:
            lines.append(f"- more GPUs: {ranks} of this size, {budget.ranks_per_node} per node ({found.label}, "
                         f"micro-batch {found.micro_batch})")
            break
    seq = model.max_seq_len // 2
    while seq >= 128:
        shorter = model.model_copy(update={"max_seq_len": seq})
        found = _fits(shorter, training, world_size, budget)
        if found:
            lines.append(f"- a shorter sequence: model.max_seq_len={seq} ({found.label}, micro-batch "
                         f"{found.micro_batch})")
            break
        seq //= 2
    usable = 1.0 - SAFETY_MARGIN
    ranks = budget.ranks_per_node
    host_fits = [c for c in candidates
                 if budget.cpu_bytes is None or c.estimate.node_host_total <= budget.cpu_bytes * usable]
    gpu_fits = [c for c in candidates if budget.gpu_bytes is None or c.estimate.gpu_total <= budget.gpu_bytes * usable]
    if budget.on_cuda and budget.gpu_bytes is not None and host_fits:
        best = min(host_fits, key=lambda c: c.estimate.gpu_total)
        lines.append(f"- GPUs with at least {format_bytes(best.estimate.gpu_total / usable)} free each "
                     f"({best.label}, micro-batch 1)")
    if budget.on_cuda and budget.cpu_bytes is not None and gpu_fits:
        best = min(gpu_fits, key=lambda c: c.estimate.node_host_total)
        lines.append(f"- host RAM of at least {format_bytes(best.estimate.node_host_total / usable)} per node "
                     f"({best.label}, micro-batch 1)")
    if not budget.on_cuda:
        need = _need(smallest.estimate, budget) / usable
        lines.append(f"- a host with at least {format_bytes(need)} of RAM for {ranks} CPU rank(s) "
                     f"({smallest.label}), or GPUs (--gpu_memory plans for GPUs you do not have)")
    return "\n".join(lines)


def _need(estimate: MemoryEstimate, budget: MemoryBudget) -> int:
    """The figure that must fit: GPU memory per rank, or for CPU ranks the host RAM of all of them."""
    if budget.on_cuda:
        return estimate.gpu_total
    at_start = budget.ranks_per_node * (estimate.allocated + estimate.fragmentation + estimate.cpu_total)
    # CPU ranks: at an export the device memory (host RAM too) still holds the weights and optimizer states.
    at_export = budget.ranks_per_node * (estimate.allocated + estimate.fragmentation) + estimate.export_host
    return max(at_start, at_export)
