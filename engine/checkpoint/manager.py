"""Checkpoints: resumable DeepSpeed folders `checkpoint_step_N`, and plain `final_model.pt` / `best_model.pt`.

The DeepSpeed folders hold everything needed to resume exactly (module, ZeRO-partitioned optimizer, LR scheduler,
client state) plus the resolved run config, the ds_config and the code version. The `.pt` files keep the
original project's format: {'config': ModelConfig dict, 'model_state_dict': fp32 weights, ...}, loadable with
`torch.load(path, weights_only=True)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from deepspeed.utils import safe_get_full_fp32_param
from torch._utils import _unflatten_dense_tensors

from data.output import staged_output
from engine import distributed
from engine.checkpoint.commit import (TAG_PATTERN, CheckpointCommitter, checkpoint_tag,  # noqa: F401 - public API
                                      latest_tag, list_checkpoint_tags)
from engine.faults import kill_point
from engine.numerics import check_finite_weights

def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through the one writer (data/output.py): a temporary name, fsync, then rename, so a crash never
    leaves a truncated file at `path` and a failed write (disk full) removes its temporary file. The run's own
    exports (`final_model.pt`, `best_model.pt`) live in its checkpoint dir and replace the run's earlier ones."""
    path = Path(path)
    with staged_output(path, overwrite=True, inside_checkpoint_ok=True, what="export") as tmp:
        torch.save(obj, tmp)
        kill_point(f"export.{path.name}", half_written=tmp)


def _unfused_master_weights(optimizer) -> dict[int, torch.Tensor]:
    """id(low-precision parameter) -> its fp32 master copy, for the optimizers DeepSpeed uses under ZeRO-0 with
    bf16/fp16: FP16_UnfusedOptimizer keeps `fp32_groups` beside `fp16_groups`, FP16_Optimizer a flat fp32 buffer
    per group (`fp32_groups_flat`). Neither has the `_hp_mapping` that safe_get_full_fp32_param reads, which
    returns None for them, and the parameter itself is only a rounded copy."""
    masters: dict[int, torch.Tensor] = {}
    low_groups = getattr(optimizer, "fp16_groups", None)
    if low_groups is None:
        return masters
    if hasattr(optimizer, "fp32_groups"):
        fp32_groups = optimizer.fp32_groups
    elif hasattr(optimizer, "fp32_groups_flat"):
        fp32_groups = [_unflatten_dense_tensors(flat, group)
                       for flat, group in zip(optimizer.fp32_groups_flat, low_groups)]
    else:
        return masters
    for low_group, fp32_group in zip(low_groups, fp32_groups):
        for low, master in zip(low_group, fp32_group):
            masters[id(low)] = master.view_as(low)
    return masters


def gather_fp32_state_dict(module: torch.nn.Module, optimizer=None, *,
                           main_process_only: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 master weights (a collective under ZeRO-1/2/3: all ranks must call it).

    Under mixed precision or ZeRO the module's own tensors are low-precision copies or partitions; DeepSpeed's
    safe_get_full_fp32_param assembles the fp32 master weight under ZeRO-1/2/3 and the bf16 optimizer; under
    ZeRO-0 with fp16/bf16 the master copy is read from `optimizer` (the engine's optimizer). Without a master
    copy (fp32 ZeRO-0) the parameter itself is the master.

    main_process_only: only rank 0 keeps a CPU copy (the others take part in each tensor's collective and drop
    it at once), so an export costs one fp32 model of host RAM on rank 0's node, not one per rank; other ranks
    get an empty dict.
    """
    keep = not main_process_only or distributed.is_main_process()
    masters = _unfused_master_weights(optimizer) if optimizer is not None else {}
    by_param: dict[int, torch.Tensor] = {}
    names: dict[str, int] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in by_param:
            full = safe_get_full_fp32_param(param)
            if full is None:
                full = masters.get(id(param), param.detach())
            by_param[id(param)] = full.float().cpu().clone() if keep else None
            del full
        names[name] = id(param)
    if not keep:
        return {}
    state = {name: by_param[pid] for name, pid in names.items()}
    for name, buffer in module.state_dict().items():
        if name not in state:
            state[name] = buffer.detach().cpu().clone()
    return state


class CheckpointManager(CheckpointCommitter):
    """Saves and restores a run's checkpoints in `checkpoint_dir`.

    How a checkpoint is committed, verified, found again after a crash and pruned is in
    engine/checkpoint/commit.py (CheckpointCommitter); this class adds the exports.
    """

    def __init__(self, checkpoint_dir: str | Path, *, keep_last: int, run_record: dict[str, Any],
                 node_local: bool = False):
        super().__init__(checkpoint_dir, keep_last=keep_last, run_record=run_record, node_local=node_local)

    def export_model(self, engine, path: str | Path, *, model_config: dict[str, Any],
                     extra: dict[str, Any]) -> Path | None:
        """Write `final_model.pt` / `best_model.pt` in the original format (all ranks call; rank 0 writes)."""
        state = gather_fp32_state_dict(engine.module, engine.optimizer, main_process_only=True)
        path = self.checkpoint_dir / path
        check_finite_weights(state, str(path))
        self.ensure_free_space(sum(t.numel() * t.element_size() for t in state.values()), what=str(path))
        if distributed.is_main_process():
            with self.storage_errors(path):
                atomic_torch_save({"config": model_config, "model_state_dict": state,
                                   "run_config": self.run_record.get("run_config", {}), **extra}, path)
        distributed.barrier()
        return path
