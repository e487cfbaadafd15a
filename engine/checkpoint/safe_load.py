"""Checkpoint files are opened with PyTorch's weights-only unpickler before DeepSpeed opens them.

DeepSpeed's TorchCheckpointEngine.load calls `torch.load(path, weights_only=False)` (deepspeed 0.19.8,
runtime/checkpoint_engine/torch_checkpoint_engine.py), which runs any code a tampered pickle names. Every `.pt` of
a checkpoint folder is therefore first unpickled with `weights_only=True`, allowing exactly the non-tensor types
DeepSpeed writes (listed by `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO-0..3 checkpoints in
fp32, bf16 and fp16). A file naming any other global is refused, so DeepSpeed never unpickles it.

`mmap=True` maps the tensor storages instead of reading them: the check costs the pickle, not the weights
(measured in tests/engine/test_safe_load.py's benchmark line, see docs/reliability.md).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from engine.errors import CheckpointError, UnsafeCheckpointError

DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The non-tensor types found in DeepSpeed 0.19.8 checkpoints (optimizer states: loss scaler, ZeRO stage,
fp32 fragment addresses); model-state files hold none."""


def _resolve(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module), name)


def allowed_globals() -> list[type]:
    return [_resolve(name) for name in DEEPSPEED_CHECKPOINT_GLOBALS]


def verify_weights_only(path: str | Path) -> None:
    """Unpickle `path` with the weights-only unpickler; CheckpointError if it is damaged or names other code."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure means "do not hand this file to DeepSpeed"
        unsafe = []
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                      if g not in DEEPSPEED_CHECKPOINT_GLOBALS]
        except Exception:  # noqa: BLE001 - a truncated file cannot be scanned either
            pass
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path} refers to code that a checkpoint never contains ({', '.join(unsafe)}): it was not "
                "written by this trainer and is not loaded; delete this checkpoint folder or set "
                "training.resume=false with a new training.checkpoint_dir") from err
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err})") from err


def verify_folder(folder: str | Path) -> None:
    """verify_weights_only on every `.pt` file of a DeepSpeed checkpoint folder."""
    for path in sorted(Path(folder).glob("*.pt")):
        verify_weights_only(path)
