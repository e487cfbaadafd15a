"""Mamba <-> other libraries: transformers' MambaForCausalLM / Mamba2ForCausalLM (names, config) and mamba-ssm's
MambaLMHeadModel config. The parameter layout is mamba-ssm's (see model/mamba/model.py); transformers differs only in
the embedding's name. transformers and mamba-ssm are not imported here (optional dependencies)."""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from model.config import ModelConfig


def to_transformers_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """This model's (= mamba-ssm's) keys -> transformers' Mamba/Mamba2ForCausalLM keys. The only difference is
    the embedding's name, `backbone.embedding` vs `backbone.embeddings`; every tensor keeps its layout."""
    return {key.replace("backbone.embedding.", "backbone.embeddings.", 1): value
            for key, value in state_dict.items()}


def from_transformers_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' Mamba/Mamba2ForCausalLM keys -> this model's (= mamba-ssm's) keys."""
    return {key.replace("backbone.embeddings.", "backbone.embedding.", 1): value
            for key, value in state_dict.items()}


def transformers_config_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for transformers' Mamba2Config (ssm_type mamba2) or MambaConfig (mamba1) describing the
    same architecture (transformers itself is not imported: it is an optional dependency)."""
    common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model, state_size=config.d_state,
                  num_hidden_layers=config.n_layers, layer_norm_epsilon=config.norm_eps, expand=config.expand,
                  conv_kernel=config.d_conv, use_bias=False, use_conv_bias=True, residual_in_fp32=True,
                  tie_word_embeddings=config.tie_embeddings)
    if config.ssm_type == "mamba2":
        return common | dict(num_heads=config.expand * config.d_model // config.headdim, head_dim=config.headdim,
                             n_groups=config.ngroups, chunk_size=config.chunk_size)
    return common | dict(time_step_rank=config.dt_rank or "auto")


def mamba_ssm_config_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for mamba_ssm.models.config_mamba.MambaConfig describing the same architecture.
    pad_vocab_size_multiple=1 keeps the vocabulary unpadded (mamba-ssm pads to a multiple of 8 by default)."""
    ssm_cfg: dict[str, Any] = dict(layer="Mamba2" if config.ssm_type == "mamba2" else "Mamba1",
                                   d_state=config.d_state, d_conv=config.d_conv, expand=config.expand)
    if config.ssm_type == "mamba2":
        ssm_cfg |= dict(headdim=config.headdim, ngroups=config.ngroups, chunk_size=config.chunk_size)
    elif config.dt_rank is not None:
        ssm_cfg["dt_rank"] = config.dt_rank
    return dict(d_model=config.d_model, d_intermediate=0, n_layer=config.n_layers, vocab_size=config.vocab_size,
                ssm_cfg=ssm_cfg, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                pad_vocab_size_multiple=1, tie_embeddings=config.tie_embeddings)


def model_config_from_transformers(hf: dict[str, Any]) -> ModelConfig:
    """transformers' MambaConfig / Mamba2Config (as its config.json dict, `model_type` 'mamba' or 'mamba2') -> our
    ModelConfig; ValueError naming each setting these mixers cannot express."""
    mamba2 = hf.get("model_type") == "mamba2"
    hidden, expand = hf["hidden_size"], hf.get("expand", 2)
    checks = {"use_bias": (hf.get("use_bias", False), False), "use_conv_bias": (hf.get("use_conv_bias", True), True),
              "hidden_act": (hf.get("hidden_act", "silu"), "silu")}
    if mamba2:
        checks["num_heads * head_dim"] = (hf["num_heads"] * hf["head_dim"], expand * hidden)
        # transformers writes inf into config.json as {"__float__": "Infinity"} (JSON has no infinity).
        limit = [float(x["__float__"]) if isinstance(x, dict) else float(x)
                 for x in hf.get("time_step_limit", (0.0, float("inf")))]
        checks["time_step_limit"] = (limit, [0.0, float("inf")])  # our SSD scan does not clamp dt
    else:
        checks["intermediate_size"] = (hf.get("intermediate_size", expand * hidden), expand * hidden)
    problems = [f"{key}={got!r} (this project's Mamba supports only {supported!r})"
                for key, (got, supported) in checks.items() if got != supported]
    if problems:
        raise ValueError("; ".join(problems))
    common = dict(model_type="mamba", vocab_size=hf["vocab_size"], d_model=hidden, n_layers=hf["num_hidden_layers"],
                  d_state=hf["state_size"], d_conv=hf.get("conv_kernel", 4), expand=expand,
                  norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    if mamba2:
        return ModelConfig(**common, ssm_type="mamba2", headdim=hf["head_dim"], ngroups=hf.get("n_groups", 1),
                           chunk_size=hf.get("chunk_size", 256))
    rank = hf.get("time_step_rank", "auto")
    default_rank = math.ceil(hidden / 16)  # mamba-ssm's and transformers' "auto"
    return ModelConfig(**common, ssm_type="mamba1", dt_rank=None if rank in ("auto", default_rank) else int(rank))
