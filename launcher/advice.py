"""Which presets fit on which hardware: the memory plan (launcher/planning/plan.py) run for every preset and GPU count."""
from __future__ import annotations

from dataclasses import dataclass

from launcher.config import build_run_config
from launcher.planning.hardware import MemoryBudget, format_bytes
from launcher.planning.plan import PlanError, choose_plan
from launcher.presets import PRESETS


@dataclass(frozen=True, kw_only=True)
class Advice:
    """The plan for one preset on one number of ranks."""

    preset: str
    """Preset name."""
    num_ranks: int
    """Data-parallel ranks (GPUs, or CPU processes)."""
    fits: bool
    """Some layout fits."""
    layout: str
    """'ZeRO-2, offload none, micro-batch 8 x 4' or why nothing fits."""
    per_rank: str
    """Predicted memory per rank of the chosen layout."""


def plan_advice(budget_for: dict[int, MemoryBudget], presets: list[str] | None = None) -> list[Advice]:
    """Advice for every preset (default all) at every rank count of budget_for {num_ranks: budget}."""
    rows = []
    for preset in presets or list(PRESETS):
        run = build_run_config(preset=preset)
        for num_ranks, budget in budget_for.items():
            try:
                plan = choose_plan(run.model, run.training, num_ranks, budget)
            except PlanError as err:
                rows.append(Advice(preset=preset, num_ranks=num_ranks, fits=False, per_rank="-",
                                   layout=_nothing_fits_summary(str(err))))
                continue
            blocks, layers = plan.num_checkpointed_blocks, plan.num_layers
            checkpointing = ("" if blocks == 0 else ", activation checkpointing" if blocks == layers else
                             f", activation checkpointing of {blocks}/{layers} blocks")
            rows.append(Advice(preset=preset, num_ranks=num_ranks, fits=True,
                               layout=f"ZeRO-{plan.zero_stage}, offload {plan.offload}{checkpointing}, "
                                      f"micro-batch {plan.micro_batch} x accumulation {plan.grad_accum}",
                               per_rank=format_bytes(plan.memory.gpu_total) if plan.memory else "?"))
    return rows


def _nothing_fits_summary(message: str) -> str:
    """PlanError's message in one line: what the smallest layout lacks and the first thing that would fit."""
    lines = message.splitlines()
    smallest = lines[0].split("the smallest, ", 1)[-1].rstrip(".")
    options = [line[2:] for line in lines if line.startswith("- ")]
    return f"nothing fits ({smallest})" + (f"; would fit with {options[0]}" if options else "")


def render_advice(rows: list[Advice]) -> str:
    lines = [f"{'preset':<16} {'ranks':>5}  {'fits':<4}  {'per rank':>10}  layout"]
    for row in rows:
        lines.append(f"{row.preset:<16} {row.num_ranks:>5}  {'yes' if row.fits else 'no':<4}  {row.per_rank:>10}  "
                     f"{row.layout}")
    return "\n".join(lines)
