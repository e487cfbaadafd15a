"""Registry of model families: name -> class, imported lazily so listing models stays cheap."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from model.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    """One registered model family."""

    target: str
    """'module:Class' of the nn.Module, built as Class(config)."""
    description: str
    """One line for --list_models."""


_REGISTRY: dict[str, ModelEntry] = {
    "transformer": ModelEntry(
        target="model.transformer:Transformer",
        description="decoder-only Transformer: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention (SDPA)"),
    "mamba": ModelEntry(
        target="model.mamba:MambaLM",
        description="Mamba state-space LM: Mamba-2 SSD (default) or Mamba-1 selective-scan mixers, recurrent decoding"),
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
