"""Non-finite numbers: a NaN/inf loss, gradient norm or validation loss stops the run before anything is saved.

The step that produced it has already been applied by DeepSpeed (engine.step() updates the weights), so the live
weights may be poisoned: nothing is written after it, and the last committed checkpoint stays the newest. Under
fp16 an overflowing gradient is expected and DeepSpeed's dynamic loss scaler skips that step itself (it lowers the
scale and leaves the weights alone), so only the loss is checked there. bf16 and fp32 have no such mechanism and
skipping would need the norm before the update, which ZeRO computes inside engine.step(): they stop.

DeepSpeed reports no gradient norm under ZeRO-0 in fp32 (its optimizer is torch's own AdamW; measured with
DeepSpeed 0.19.8 for ZeRO 0-3 x fp32/bf16, clipping on and off: only that case returns None), so GradNormProbe
measures it there. A finite loss with NaN gradients then stops the run at that step, not one step later after
the NaN weights could have been saved. As a last guard, a checkpoint is committed only when every rank's weights
are finite (weights_finite), and a resume sets aside a checkpoint whose weights are not (one written before
these checks existed) and takes the one before it.
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
    loss, grad_norm = metrics.get("loss", 0.0), metrics.get("grad_norm")
    # grad_norm None: no norm is known (a Trainer subclass with an optimizer neither DeepSpeed nor GradNormProbe
    # measures); NaN gradients then show as a NaN loss one step later, and weights_finite guards the save.
    bad_norm = not fp16 and grad_norm is not None and not math.isfinite(grad_norm)
    if math.isfinite(loss) and not bad_norm:
        return
    raise NonFiniteError(
        f"step {step}: the training loss is {loss} and the gradient norm {grad_norm}; {_kept(training)}. Lower "
        f"training.learning_rate (now {training.learning_rate}), keep training.grad_clip on (now "
        f"{training.grad_clip}), raise training.warmup_steps (now {training.warmup_steps}), or train in bf16 "
        "instead of fp16; then relaunch (it resumes from the newest checkpoint)")


def _kept(training: Any) -> str:
    """What is on disk after a non-finite step: nothing of it, and the newest (finite) checkpoint."""
    last = latest_tag(training.checkpoint_dir)
    newest = f"the newest checkpoint is {training.checkpoint_dir}/{last}" if last else "no checkpoint was saved yet"
    return f"nothing was saved at this step and {newest}"


def check_finite_weights(state: dict[str, torch.Tensor], path: str) -> None:
    """NonFiniteError before `path` would be written with NaN or infinite weights."""
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteError(f"{path} was not written: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); "
                             "lower training.learning_rate and relaunch from the newest checkpoint")


def check_finite_val_loss(step: int, val_loss: float, training: Any, *, what: str = "the validation loss") -> None:
    """NonFiniteError when the validation loss of `step` is NaN or infinite: its weights are never saved."""
    if math.isfinite(val_loss):
        return
    raise NonFiniteError(
        f"step {step}: {what} is {val_loss}; {_kept(training)}. Lower training.learning_rate (now "
        f"{training.learning_rate}) or raise training.warmup_steps (now {training.warmup_steps}); then relaunch "
        "(it resumes from the newest checkpoint)")


def _global_norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    # fp64 accumulation: a sum of squares of many fp32 gradients must not overflow to inf on its own.
    return float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t.detach(), dtype=torch.float64) for t in tensors])))


class GradNormProbe:
    """The global gradient norm of the last optimizer step, before clipping, wherever DeepSpeed reports none.

    Under ZeRO-0 in fp32 DeepSpeed hands the step to torch's AdamW and keeps no norm (get_global_grad_norm() is
    None); every rank holds the whole averaged gradient after the all-reduce, so the norm of the local `.grad`
    tensors is the global one and needs no collective. It is one read of the gradients, cheap next to a step.
    Clipping (engine.clip_fp32_gradients) runs before optimizer.step(): the norm is taken before it, as
    DeepSpeed's other optimizers report it, and the optimizer's step pre-hook covers runs without clipping.
    """

    def __init__(self, engine):
        self.engine = engine
        self.norm: float | None = None
        self._measured = False
        optimizer = engine.optimizer
        self.active = isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "_global_grad_norm")
        if not self.active:
            return
        optimizer.register_step_pre_hook(self._before_step)
        clip = engine.clip_fp32_gradients

        def measure_then_clip() -> None:
            self._measure()
            clip()

        engine.clip_fp32_gradients = measure_then_clip  # instance attribute: this engine only

    def _measure(self) -> None:
        grads = [p.grad for group in self.engine.optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        self.norm = _global_norm(grads)
        self._measured = True

    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self._measured:  # no clipping this step: measure here
            self._measure()
        self._measured = False

    def read(self) -> float | None:
        """The norm of the last step: DeepSpeed's where it keeps one, else this probe's, else None."""
        reported = self.engine.get_global_grad_norm()
        if reported is not None:
            return float(reported)
        return self.norm if self.active else None


def weights_finite(engine) -> bool:
    """Whether every rank's weights are finite (a collective: all ranks call it). Each rank checks what it holds
    (its ZeRO-3 partition, or the whole module under ZeRO 0-2), so the cost is one read of the local weights."""
    local = True
    for param in engine.module.parameters():
        tensor = getattr(param, "ds_tensor", None)
        tensor = param if tensor is None else tensor
        if tensor.numel() and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            local = False
            break
    flag = torch.tensor([0 if local else 1], dtype=torch.int32, device=engine.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item()) == 0
