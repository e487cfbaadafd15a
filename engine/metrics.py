"""Training metrics on rank 0: TensorBoard scalars and a progress bar.

DeepSpeed's own monitor logs only the learning rate (see docs/machine_notes.md), so loss, grad norm,
throughput and memory are written here with tensorboard's SummaryWriter.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def peak_memory_bytes() -> int:
    """Peak accelerator memory allocated by tensors, or the process's peak RSS on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    # ru_maxrss is KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MetricsLogger:
    """Writes scalars to TensorBoard and drives the progress bar; a no-op on ranks other than 0."""

    def __init__(self, log_dir: str | Path, *, enabled: bool, start_step: int, max_steps: int):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stdout, mininterval=1.0)

    def log_step(self, step: int, metrics: dict[str, float], *, write: bool) -> None:
        """Advance the bar to `step` (1-based count of finished steps); write scalars when `write`."""
        if not self.enabled:
            return
        self.bar.update(step - self.bar.n)
        postfix = {"loss": f"{metrics['loss']:.3f}", "tok_s": f"{metrics['tokens_per_s']:.0f}"}
        if "mfu" in metrics:  # on GPUs with a known peak only (engine/trainer.py)
            postfix["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        self.bar.set_postfix(postfix, refresh=False)
        if write:
            for name, value in metrics.items():
                if value is None:  # a figure this run cannot measure (a grad norm nobody computes)
                    continue
                self.writer.add_scalar(f"train/{name}", value, step)

    def log_eval(self, step: int, val_loss: float, *, per_source: dict[str, float] | None = None,
                 num_tokens: int | None = None) -> None:
        """Write the validation loss (and, for a mixture, one loss per source); num_tokens is what it covered."""
        if not self.enabled:
            return
        self.writer.add_scalar("val/loss", val_loss, step)
        for name, loss in (per_source or {}).items():
            if len(per_source) > 1:
                self.writer.add_scalar(f"val/loss/{name}", loss, step)
        covered = f" over {num_tokens:,} tokens" if num_tokens else ""
        by_source = ", ".join(f"{name} {loss:.4f}" for name, loss in per_source.items()) \
            if per_source and len(per_source) > 1 else ""
        self.bar.write(f"step {step}: val_loss {val_loss:.4f}{covered}" + (f" ({by_source})" if by_source else ""))

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.flush()
            self.writer.close()
