"""One door between this project's model families and Hugging Face `transformers` architectures.

Each family states its own mapping beside its code (model/transformer/hf.py, model/mamba/hf.py,
model/hybrid/hf.py); this module only picks the family: Transformer <-> LlamaForCausalLM, Mamba-2 <->
Mamba2ForCausalLM, Mamba-1 <-> MambaForCausalLM, hybrid <-> BambaForCausalLM.
transformers is not imported here (it is needed only to load the result).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from model.hybrid import hf as hybrid_hf
from model.mamba import hf as mamba_hf
from model.transformer import hf as transformer_hf
from model.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class HFMapping:
    """How one of our configurations appears in transformers."""

    architecture: str
    """The transformers class, e.g. 'LlamaForCausalLM' (config.json 'architectures')."""
    config_class: str
    """The transformers config class, e.g. 'LlamaConfig'."""
    config_kwargs: dict[str, Any]
    """Arguments of config_class describing the same architecture."""
    to_hf_name: Callable[[str], str]
    """Our parameter name -> transformers'."""


# transformers' config.json 'model_type' -> (architecture, config class)
SUPPORTED_HF_TYPES = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "mamba2": ("Mamba2ForCausalLM", "Mamba2Config"),
                      "mamba": ("MambaForCausalLM", "MambaConfig"),
                      "bamba": (hybrid_hf.HF_ARCHITECTURE, hybrid_hf.HF_CONFIG_CLASS)}


def _mamba_to_hf_name(name: str) -> str:
    return next(iter(mamba_hf.to_transformers_state_dict({name: None})))


def _mamba_from_hf_name(name: str) -> str:
    return next(iter(mamba_hf.from_transformers_state_dict({name: None})))


def hf_mapping(config: ModelConfig) -> HFMapping:
    if config.model_type == "transformer":
        return HFMapping(architecture=transformer_hf.HF_ARCHITECTURE, config_class="LlamaConfig",
                         config_kwargs=transformer_hf.transformers_config_kwargs(config),
                         to_hf_name=transformer_hf.to_transformers_name)
    if config.model_type == "mamba":
        hf_type = "mamba2" if config.ssm_type == "mamba2" else "mamba"
        architecture, config_class = SUPPORTED_HF_TYPES[hf_type]
        return HFMapping(architecture=architecture, config_class=config_class,
                         config_kwargs=mamba_hf.transformers_config_kwargs(config), to_hf_name=_mamba_to_hf_name)
    if config.model_type == "hybrid":
        return HFMapping(architecture=hybrid_hf.HF_ARCHITECTURE, config_class=hybrid_hf.HF_CONFIG_CLASS,
                         config_kwargs=hybrid_hf.transformers_config_kwargs(config),
                         to_hf_name=hybrid_hf.to_transformers_name)
    raise ValueError(f"model_type {config.model_type!r} has no transformers counterpart")


def model_config_from_hf(hf_config: dict[str, Any]) -> tuple[ModelConfig, Callable[[str], str]]:
    """A transformers config.json dict -> our ModelConfig and the name map transformers' -> ours; ValueError
    for an architecture or a setting this project cannot express (the message names it)."""
    hf_type = hf_config.get("model_type")
    if hf_type not in SUPPORTED_HF_TYPES:
        raise ValueError(f"config.json model_type is {hf_type!r}; this project imports "
                         f"{', '.join(sorted(SUPPORTED_HF_TYPES))} ({', '.join(a for a, _ in SUPPORTED_HF_TYPES.values())})")
    if hf_type == "llama":
        return transformer_hf.model_config_from_transformers(hf_config), transformer_hf.from_transformers_name
    if hf_type == "bamba":
        return hybrid_hf.model_config_from_transformers(hf_config), hybrid_hf.from_transformers_name
    return mamba_hf.model_config_from_transformers(hf_config), _mamba_from_hf_name


def to_hf_state_dict(state_dict: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    rename = hf_mapping(config).to_hf_name
    return {rename(k): v for k, v in state_dict.items()}
