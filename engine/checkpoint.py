"""Checkpoints: resumable DeepSpeed folders `checkpoint_step_N`, and plain `final_model.pt` / `best_model.pt`.

The DeepSpeed folders hold everything needed to resume exactly (module, ZeRO-partitioned optimizer, LR scheduler,
client state) plus the resolved run config, the ds_config and the code version. The `.pt` files keep the
original project's format: {'config': ModelConfig dict, 'model_state_dict': fp32 weights, ...}, loadable with
`torch.load(path, weights_only=True)`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils import safe_get_full_fp32_param

from engine import distributed
from engine.checkpoint_commit import (TAG_PATTERN, CheckpointCommitter, checkpoint_tag,  # noqa: F401 - public API
                                      latest_tag, list_checkpoint_tags)
from engine.faults import kill_point
from engine.numerics import check_finite_weights

def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary name, fsync, then rename: a crash never leaves a truncated file at `path`,
    and a failed write (disk full) removes its temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        kill_point(f"export.{path.name}", half_written=tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def gather_fp32_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full fp32 weights on every rank (a collective under ZeRO-3: all ranks must call it).

    Under mixed precision or ZeRO the module's own tensors are low-precision copies or partitions; DeepSpeed's
    safe_get_full_fp32_param assembles the fp32 master weight. Without a master copy (ZeRO-0 fp32) the
    parameter itself is the master.
    """
    by_param: dict[int, torch.Tensor] = {}
    names: dict[str, int] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in by_param:
            full = safe_get_full_fp32_param(param)
            by_param[id(param)] = (full if full is not None else param.detach()).float().cpu().clone()
        names[name] = id(param)
    state = {name: by_param[pid] for name, pid in names.items()}
    for name, buffer in module.state_dict().items():
        if name not in state:
            state[name] = buffer.detach().cpu().clone()
    return state


class CheckpointManager(CheckpointCommitter):
    """Saves and restores a run's checkpoints in `checkpoint_dir`.

    How a checkpoint is committed, verified, found again after a crash and pruned is in
    engine/checkpoint_commit.py (CheckpointCommitter); this class adds the exports.
    """

    def __init__(self, checkpoint_dir: str | Path, *, keep_last: int, run_record: dict[str, Any]):
        super().__init__(checkpoint_dir, keep_last=keep_last, run_record=run_record)

    def export_model(self, engine, path: str | Path, *, model_config: dict[str, Any],
                     extra: dict[str, Any]) -> Path | None:
        """Write `final_model.pt` / `best_model.pt` in the original format (all ranks call; rank 0 writes)."""
        state = gather_fp32_state_dict(engine.module)
        path = self.checkpoint_dir / path
        check_finite_weights(state, str(path))
        self.ensure_free_space(sum(t.numel() * t.element_size() for t in state.values()), what=str(path))
        if distributed.is_main_process():
            with self.storage_errors(path):
                atomic_torch_save({"config": model_config, "model_state_dict": state,
                                   "run_config": self.run_record.get("run_config", {}), **extra}, path)
        distributed.barrier()
        return path
