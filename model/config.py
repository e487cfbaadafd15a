"""The model's own typed config: everything needed to rebuild a model, and nothing about training.

Checkpoints store ``ModelConfig.model_dump()`` under ``'config'`` so that the original project's load snippet
``ModelConfig(**ckpt['config'])`` rebuilds the exact architecture.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator


class ModelConfig(BaseModel):
    """Architecture of one decoder-only language model (Transformer or Mamba)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)

    model_type: str = "transformer"
    """Model family, a name from the registry: 'transformer', 'mamba' or 'hybrid'."""
    vocab_size: int = 8192
    """Number of token ids (the tokenizer's vocabulary size)."""
    max_seq_len: int = 256
    """Context length in tokens; training windows have this length."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of blocks."""
    dropout: float = 0.0
    """Dropout probability on attention weights and block outputs (0 disables it)."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""

    # Transformer
    n_heads: int = 4
    """Transformer: number of query heads."""
    n_kv_heads: int | None = None
    """Transformer: number of key/value heads for grouped-query attention (null = n_heads, plain multi-head)."""
    ffn_hidden: int | None = None
    """Transformer: SwiGLU hidden width (null = 8/3 * d_model rounded up to a multiple of 64, as in LLaMA)."""
    rope_theta: float = 10000.0
    """Transformer: base of the rotary position embedding."""

    # Mamba
    ssm_type: Literal["mamba2", "mamba1"] = "mamba2"
    """Mamba: mixer, 'mamba2' (SSD) or 'mamba1' (selective scan)."""
    d_state: int = 128
    """Mamba: SSM state size N per channel (mamba-ssm default: 128 for Mamba-2, 16 for Mamba-1)."""
    d_conv: int = 4
    """Mamba: width of the causal depthwise convolution."""
    expand: int = 2
    """Mamba: d_inner = expand * d_model."""
    headdim: int = 64
    """Mamba-2: channels per SSM head."""
    ngroups: int = 1
    """Mamba-2: number of B/C groups."""
    chunk_size: int = 256
    """Mamba-2: chunk length of the SSD scan (mamba-ssm default 256; 64 is faster for the CPU reference)."""
    dt_rank: int | None = None
    """Mamba-1: rank of the low-rank dt projection (null = ceil(d_model / 16), as mamba-ssm)."""

    # Hybrid (model/hybrid/config.py)
    layer_pattern: str | list[int] | list[str] | None = None
    """Hybrid: which layers are Mamba-2 ('M') and which attention ('A'): a string repeated to n_layers
    ("MMMMMMMA"), one letter per layer, or the attention layers' indices."""

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        problems = []
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                problems.append(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        # Rules of the attention layers (the Transformer's and the hybrid's) and of the Mamba-2 layers (Mamba-2's and
        # the hybrid's), stated once; model/hybrid/config.py adds the hybrid's own.
        attention = self.model_type in ("transformer", "hybrid")
        mamba2 = self.model_type == "hybrid" or (self.model_type == "mamba" and self.ssm_type == "mamba2")
        if attention and self.n_heads >= 1:
            if self.d_model % self.n_heads:
                problems.append(
                    f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}): "
                    "change one of them")
            elif (self.d_model // self.n_heads) % 2:
                problems.append(f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for "
                                "rotary embeddings: change model.n_heads")
            if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
                problems.append(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                                f"({self.n_kv_heads}): set n_kv_heads to a divisor of n_heads")
        if mamba2:
            d_inner = self.expand * self.d_model
            if self.headdim < 1 or d_inner % self.headdim:
                problems.append(f"expand * d_model = {d_inner} must be divisible by model.headdim ({self.headdim}): "
                                "change model.headdim")
            elif self.ngroups < 1 or (d_inner // self.headdim) % self.ngroups:
                problems.append(f"the {d_inner // self.headdim} Mamba-2 heads must split into model.ngroups "
                                f"({self.ngroups}) equal groups: set ngroups to a divisor of the head count")
        if self.model_type in ("mamba", "hybrid"):
            for name in ("d_state", "d_conv", "expand", "chunk_size"):
                if getattr(self, name) < 1:
                    problems.append(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.model_type == "hybrid":
            from model.hybrid.config import config_problems  # the family states its own rules

            problems += config_problems(self)
        elif self.layer_pattern is not None:
            problems.append(f"model.layer_pattern applies only to model_type hybrid (this is {self.model_type!r}): "
                            "remove it or set model_type hybrid")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(8 * self.d_model / 3)
        return 64 * ((hidden + 63) // 64)
