"""TEST-ONLY fault injection: make this process SIGKILL itself at a named point, to test crash consistency.

Set `RAG_TEST_KILL_AT=<point>` (first time the point is reached) or `<point>@<n>` (the n-th time, 1-based) in
the environment of a training run. Never set it in a real run. Points (see where `kill_point` is called):
  train.step_done          after an optimizer step, before evaluation and saving
  checkpoint.deepspeed     inside DeepSpeed's save_checkpoint: a model/optimizer file half written
  checkpoint.publish       DeepSpeed files complete and verified, before the folder is renamed into place
  checkpoint.latest        folder published, before `latest` names it
  export.best_model.pt     inside the best_model.pt write, the temporary file half written
  export.final_model.pt    inside the final_model.pt write, the temporary file half written

`RAG_TEST_NAN_GRAD_AT=<k>` makes the gradient of one weight NaN in optimizer step k (1-based) while the loss
stays finite: what an overflow inside the backward pass does (see poison_gradient_at).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

KILL_AT_ENV = "RAG_TEST_KILL_AT"
NAN_GRAD_ENV = "RAG_TEST_NAN_GRAD_AT"
_counts: dict[str, int] = {}


def kill_point(name: str, *, half_written: str | Path | None = None) -> None:
    """SIGKILL this process if RAG_TEST_KILL_AT names this point (and occurrence); first truncate
    `half_written` to half its size, as a kill in the middle of writing it would leave it."""
    wanted = os.environ.get(KILL_AT_ENV)
    if not wanted:
        return
    point, _, occurrence = wanted.partition("@")
    if point != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] != int(occurrence or 1):
        return
    if half_written is not None and Path(half_written).is_file():
        with open(half_written, "r+b") as handle:
            handle.truncate(Path(half_written).stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def wrap_deepspeed_saves(engine) -> None:
    """Route DeepSpeed's file writes through kill_point('checkpoint.deepspeed') when the test hook is set."""
    if not os.environ.get(KILL_AT_ENV, "").startswith("checkpoint.deepspeed"):
        return
    checkpoint_engine = engine.checkpoint_engine
    original = checkpoint_engine.save

    def save(state_dict, path):
        original(state_dict, path)
        kill_point("checkpoint.deepspeed", half_written=path)

    checkpoint_engine.save = save


def poison_gradient_at(module, completed_steps) -> None:
    """If RAG_TEST_NAN_GRAD_AT=k is set: a gradient hook on the module's first weight returns NaN during step k
    (`completed_steps()` is k - 1 then). The forward pass, and so the loss, is untouched."""
    wanted = os.environ.get(NAN_GRAD_ENV)
    if not wanted:
        return
    step = int(wanted)
    param = next(module.parameters())
    param.register_hook(lambda grad: torch.full_like(grad, float("nan")) if completed_steps() + 1 == step else grad)
