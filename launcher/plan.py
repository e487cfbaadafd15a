"""The training plan: ZeRO stage, offload, micro-batch, accumulation and activation checkpointing.

Placeholder until the memory-driven planner lands (issue 3): it respects explicit config values and picks
conservative defaults for 'auto'.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.config import TrainingConfig
from model.config import ModelConfig


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
    activation_checkpointing: bool
    """Recompute block activations in the backward pass."""
    world_size: int
    """Number of data-parallel ranks."""

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def choose_plan(model: ModelConfig, training: TrainingConfig, world_size: int) -> Plan:
    micro = training.batch_size or 8
    accum = training.gradient_accumulation_steps or max(
        1, round(training.tokens_per_step / (micro * model.max_seq_len * world_size)))
    offload = "none" if training.offload == "auto" else training.offload
    stage = training.zero_stage
    if stage == "auto":
        stage = 3 if offload == "optimizer+params" else 2 if offload == "optimizer" else 0 if world_size == 1 else 2
    return Plan(zero_stage=stage, offload_optimizer=offload != "none", offload_params=offload == "optimizer+params",
                micro_batch=micro, grad_accum=accum,
                activation_checkpointing=training.activation_checkpointing is True, world_size=world_size)
