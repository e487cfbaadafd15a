"""Non-finite numbers: a NaN/inf loss or gradient norm stops the run before anything is saved or exported.

The step that produced it has already been applied by DeepSpeed (engine.step() updates the weights), so the live
weights may be poisoned: nothing is written after it, and the last committed checkpoint stays the newest. Under
fp16 an overflowing gradient is expected and DeepSpeed's dynamic loss scaler skips that step itself (it lowers the
scale and leaves the weights alone), so only the loss is checked there. bf16 and fp32 have no such mechanism and
skipping would need the norm before the update, which ZeRO computes inside engine.step(): they stop.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from engine.checkpoint.commit import latest_tag
from engine.errors import NonFiniteError

NONFINITE_EXIT_CODE = 3
"""Exit code of a run stopped by a NaN or infinite loss or gradient norm."""


def check_finite_step(step: int, metrics: dict[str, float], training: Any, *, fp16: bool) -> None:
    """NonFiniteError naming the step, the value and what to change, when the step's loss (or, outside fp16,
    its gradient norm) is NaN or infinite."""
    loss, grad_norm = metrics.get("loss", 0.0), metrics.get("grad_norm", math.nan)
    # DeepSpeed reports no norm (NaN in the metrics) under ZeRO-0 and without clipping, so a NaN norm is "unknown";
    # NaN gradients then show as a NaN loss one step later.
    bad_norm = not fp16 and math.isinf(grad_norm)
    if math.isfinite(loss) and not bad_norm:
        return
    last = latest_tag(training.checkpoint_dir)
    kept = f"the newest checkpoint is {training.checkpoint_dir}/{last}" if last else "no checkpoint was saved yet"
    raise NonFiniteError(
        f"step {step}: the training loss is {loss} and the gradient norm {grad_norm}; nothing was saved at this "
        f"step and {kept}. Lower training.learning_rate (now {training.learning_rate}), keep training.grad_clip "
        f"on (now {training.grad_clip}), raise training.warmup_steps (now {training.warmup_steps}), or train in "
        "bf16 instead of fp16; then relaunch (it resumes from the newest checkpoint)")


def check_finite_weights(state: dict[str, torch.Tensor], path: str) -> None:
    """NonFiniteError before `path` would be written with NaN or infinite weights."""
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteError(f"{path} was not written: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); "
                             "lower training.learning_rate and relaunch from the newest checkpoint")
