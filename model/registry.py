"""Registry of model families: name -> class, imported lazily so listing models stays cheap."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from model.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One registered model family."""

    target: str
    """'module:Class' of the nn.Module, built as Class(config)."""
    description: str
    """One line for --list_models."""
    costs: str | None = None
    """Module stating the family's per-token costs beside its code: layer_activation_bytes, layer_input_bytes,
    head_activation_bytes, training_flops_per_token (see model/transformer/costs.py). None: the memory plan and
    the throughput benchmark cannot size this family and say so."""


_REGISTRY: dict[str, ModelEntry] = {
    "transformer": ModelEntry(
        target="model.transformer.model:Transformer",
        description="decoder-only Transformer: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention (SDPA)",
        costs="model.transformer.costs"),
    "mamba": ModelEntry(
        target="model.mamba.model:MambaLM",
        description="Mamba state-space LM: Mamba-2 SSD (default) or Mamba-1 selective-scan mixers, recurrent decoding",
        costs="model.mamba.costs"),
    "hybrid": ModelEntry(
        target="model.hybrid.model:HybridLM",
        description="hybrid LM: Mamba-2 and grouped-query attention layers by model.layer_pattern, SwiGLU after each "
                    "(transformers' Bamba)",
        costs="model.hybrid.costs"),
}


def register_model(name: str, entry: ModelEntry) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model type {name!r} is already registered")
    _REGISTRY[name] = entry


def list_models() -> dict[str, ModelEntry]:
    return dict(_REGISTRY)


def create_model(model_type: str, config: ModelConfig) -> nn.Module:
    """Build the model family `model_type` from `config` (the original project's entry point)."""
    if model_type not in _REGISTRY:
        raise ValueError(f"unknown model_type {model_type!r}; available: {', '.join(sorted(_REGISTRY))}")
    if config.model_type != model_type:
        config = config.model_copy(update={"model_type": model_type})
    return model_class(model_type)(config)


def model_class(model_type: str) -> type[nn.Module]:
    """The nn.Module class registered as `model_type` (imported now)."""
    if model_type not in _REGISTRY:
        raise ValueError(f"unknown model_type {model_type!r}; available: {', '.join(sorted(_REGISTRY))}")
    module_name, class_name = _REGISTRY[model_type].target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def family_costs(model_type: str) -> ModuleType:
    """The module where family `model_type` states its per-token activation bytes and FLOPs."""
    if model_type not in _REGISTRY:
        raise ValueError(f"unknown model_type {model_type!r}; available: {', '.join(sorted(_REGISTRY))}")
    costs = _REGISTRY[model_type].costs
    if costs is None:
        raise ValueError(f"model type {model_type!r} states no per-token costs: give its ModelEntry a `costs` "
                         "module (see model/transformer/costs.py)")
    return importlib.import_module(costs)


TRAINING_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype a model is built in for each training precision (None: torch's default, fp32)."""


def create_model_on(model_type: str, config: ModelConfig, *, device: torch.device | str,
                    dtype: torch.dtype | None = None) -> nn.Module:
    """Build the model directly on `device` ('meta' for shapes only), its floating-point tensors created in
    `dtype` (None: fp32), so a rank never holds an fp32 copy on the host. Buffers that ask for a dtype explicitly
    (the rotary tables, built in float64 and kept in fp32) keep theirs. Parameters tied by assignment stay tied,
    unlike `to_empty()` after a meta build, which replaces each module's parameters separately."""
    previous = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device):
            return create_model(model_type, config)
    finally:
        torch.set_default_dtype(previous)
