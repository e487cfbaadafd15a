"""Optional `torch.compile` of a model's blocks (training.compile_blocks; off by default).

Each block is compiled on its own (`nn.Module.compile`, in place), not the whole model: every block has the same
code, so Inductor compiles one graph and reuses it for all of them, compile time does not grow with depth, and
DeepSpeed's hooks on the model (ZeRO-3 parameter gathering, activation checkpointing around each block) stay
outside the compiled regions, as torchtitan compiles per TransformerBlock (torchtitan docs, "torch.compile").
On GPU Inductor fuses the elementwise chains (rotary, SwiGLU's silu * up, norms, residual adds) into Triton
kernels. On CPU it needs a C++ toolchain and compiles for minutes, which is why it is off by default.
"""
from __future__ import annotations

from typing import Any

from torch import nn


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The model's stacks of repeated blocks: every nn.ModuleList named `layers` (Transformer.layers,
    MambaLM.backbone.layers)."""
    return [module for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers"]


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile each block of `model` in place with torch.compile(**compile_kwargs); returns how many."""
    stacks = block_lists(model)
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no `layers` module list to compile")
    count = 0
    for stack in stacks:
        for block in stack:
            block.compile(**compile_kwargs)
            count += 1
    return count
