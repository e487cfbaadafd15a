"""Checkpoints: resumable DeepSpeed folders `checkpoint_step_N`, and plain `final_model.pt` / `best_model.pt`.

The DeepSpeed folders hold everything needed to resume exactly (module, ZeRO-partitioned optimizer, LR scheduler,
client state) plus the resolved run config, the ds_config and the code version. The `.pt` files keep the
original project's format: {'config': ModelConfig dict, 'model_state_dict': fp32 weights, ...}, loadable with
`torch.load(path, weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils import safe_get_full_fp32_param

from engine import distributed, universal

TAG_PATTERN = re.compile(r"^checkpoint_step_(\d+)$")


def checkpoint_tag(step: int) -> str:
    return f"checkpoint_step_{step}"


def list_checkpoint_tags(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint_step_N` folder, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
    return sorted(found)


def latest_tag(checkpoint_dir: str | Path) -> str | None:
    """The tag DeepSpeed's `latest` file points to, if it exists and its folder is there."""
    latest = Path(checkpoint_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (Path(checkpoint_dir) / tag).is_dir() else None


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a truncated file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def gather_fp32_state_dict(module: torch.nn.Module, optimizer: Any = None) -> dict[str, torch.Tensor]:
    """The full fp32 weights on every rank (a collective under ZeRO-3: all ranks must call it).

    Under mixed precision or ZeRO the module's own tensors are low-precision copies or partitions; DeepSpeed's
    safe_get_full_fp32_param assembles the fp32 master weight of ZeRO-1/2/3. ZeRO-0 with bf16/fp16 keeps its
    masters in the optimizer (`engine.optimizer`, pass it), which safe_get_full_fp32_param does not know about.
    Without a master copy (ZeRO-0 fp32) the parameter itself is the master.
    """
    unfused_masters = {id(low): high for lows, highs in zip(getattr(optimizer, "fp16_groups", None) or [],
                                                            getattr(optimizer, "fp32_groups", None) or [])
                       for low, high in zip(lows, highs)}
    by_param: dict[int, torch.Tensor] = {}
    names: dict[str, int] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in by_param:
            full = safe_get_full_fp32_param(param)
            full = unfused_masters.get(id(param)) if full is None else full
            by_param[id(param)] = (full if full is not None else param.detach()).float().cpu().clone()
        names[name] = id(param)
    state = {name: by_param[pid] for name, pid in names.items()}
    for name, buffer in module.state_dict().items():
        if name not in state:
            state[name] = buffer.detach().cpu().clone()
    return state


class CheckpointManager:
    """Saves and restores a run's checkpoints in `checkpoint_dir`."""

    def __init__(self, checkpoint_dir: str | Path, *, keep_last: int, run_record: dict[str, Any]):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.keep_last = keep_last
        self.run_record = run_record

    def save(self, engine, step: int, client_state: dict[str, Any]) -> Path:
        """Save a resumable checkpoint (all ranks call this), then prune old ones."""
        tag = checkpoint_tag(step)
        engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client_state)
        folder = self.checkpoint_dir / tag
        if distributed.is_main_process():
            self._describe(folder)
            self._prune(keep=tag)
        distributed.barrier()
        return folder

    def load_latest(self, engine) -> dict[str, Any] | None:
        """Restore the newest complete checkpoint; returns its client state, or None if there is none."""
        tag = latest_tag(self.checkpoint_dir)
        if tag is None:
            return None
        if universal.needs_universal(self.checkpoint_dir / tag, distributed.world_size()):
            path, client_state = universal.load_universal(engine, self.checkpoint_dir, tag)
        else:
            path, client_state = engine.load_checkpoint(str(self.checkpoint_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"could not load checkpoint {self.checkpoint_dir / tag}: remove it or set "
                               "training.resume=false")
        return client_state

    def export_model(self, engine, path: str | Path, *, model_config: dict[str, Any],
                     extra: dict[str, Any]) -> Path | None:
        """Write `final_model.pt` / `best_model.pt` in the original format (all ranks call; rank 0 writes)."""
        state = gather_fp32_state_dict(engine.module, engine.optimizer)
        path = self.checkpoint_dir / path
        if distributed.is_main_process():
            atomic_torch_save({"config": model_config, "model_state_dict": state,
                               "run_config": self.run_record.get("run_config", {}), **extra}, path)
        distributed.barrier()
        return path

    def _describe(self, folder: Path) -> None:
        """Make the folder self-describing: the resolved run config, the ds_config and the code version."""
        for name, key in (("run_config.json", "run_config"), ("ds_config.json", "ds_config"),
                          ("version.json", "version")):
            if key in self.run_record:
                (folder / name).write_text(json.dumps(self.run_record[key], indent=2, sort_keys=True) + "\n")

    def _prune(self, keep: str) -> None:
        tags = [p for _, p in list_checkpoint_tags(self.checkpoint_dir) if p.name != keep]
        for folder in tags[:max(0, len(tags) - (self.keep_last - 1))]:
            shutil.rmtree(folder, ignore_errors=True)
