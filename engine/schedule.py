"""The learning-rate schedule: linear warm-up, then a cosine from the peak to `min_lr_ratio` of it.

For optimizer step s = 1 .. max_steps (the step the trainer reports), with peak lr, W = warmup_steps,
N = max_steps and m = min_lr_ratio:

    lr(s) = lr * s / W                                                  for s <= W
    lr(s) = lr * (m + (1 - m) * (1 + cos(pi * (s - W) / (N - W))) / 2)  for s >  W

so the first step already trains (lr / W), step W runs at the peak, and the last step N runs at exactly m * lr.

Why not DeepSpeed's WarmupCosineLR: in DeepSpeed 0.19.8 it gives lr 0 to the first two optimizer steps, does
runs the last step at 0.145 rather than `cos_min_ratio` 0.1 (10 steps, 3 warm-up), and refuses
`warmup_num_steps: 0` ("must be a positive integer"). A torch
`LambdaLR` handed to `deepspeed.initialize(lr_scheduler=...)` is saved and restored by DeepSpeed's checkpoints
like its own schedulers (engine `save_checkpoint` stores `lr_scheduler.state_dict()`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """lr(step) / peak lr for optimizer step `step` (1-based), the formula in this module's docstring."""
    if step <= warmup_steps:
        return step / warmup_steps
    if max_steps <= warmup_steps:  # past the planned end (resumed with more steps): stay at the floor
        return min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(kw_only=True)
class WarmupCosine:
    """LambdaLR's multiplier. A plain object, not a closure: LambdaLR.state_dict() saves its fields, so a
    checkpoint records the schedule it ran with."""

    warmup_steps: int
    """Linear warm-up steps."""
    max_steps: int
    """The step at which the cosine reaches min_lr_ratio."""
    min_lr_ratio: float
    """Floor of the cosine as a fraction of the peak."""

    def __call__(self, completed_steps: int) -> float:
        # LambdaLR calls this with the number of scheduler steps taken so far: 0 before the first optimizer
        # step, so the lr in effect during step s = completed_steps + 1.
        return lr_factor(completed_steps + 1, warmup_steps=self.warmup_steps, max_steps=self.max_steps,
                         min_lr_ratio=self.min_lr_ratio)


def warmup_cosine_scheduler(*, warmup_steps: int, max_steps: int,
                            min_lr_ratio: float) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """What deepspeed.initialize(lr_scheduler=...) takes: a callable from the optimizer to the scheduler."""
    multiplier = WarmupCosine(warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
