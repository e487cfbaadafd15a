"""What the memory plan needs to know about a model, asked of the model family itself.

Parameter shapes come from the model built on the meta device (no memory, no initialisation cost), so they can
never drift from the code; per-token activation bytes and FLOPs are stated by each family beside its kernels
(model/transformer/costs.py, model/mamba/costs.py), found through the registry. Adding a family or a kernel
touches the family, not this file.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from model.config import ModelConfig
from model.losses import loss_peak_bytes
from model.registry import create_model_on, family_costs


@functools.lru_cache(maxsize=32)
def _muon_shapes(model_type: str, config_json: str) -> tuple[tuple[int, ...], ...]:
    from engine.param_groups import muon_parameter_ids  # the trainer's one rule, asked of the meta-device model

    config = ModelConfig.model_validate_json(config_json)
    model = create_model_on(model_type, config, device="meta")
    muon = muon_parameter_ids(model)
    return tuple(tuple(p.shape) for p in model.parameters() if id(p) in muon)


def muon_stats(model: ModelConfig) -> tuple[int, int]:
    """(elements, largest tensor) of the parameters training.optimizer=muon gives to Muon
    (engine/param_groups.py `muon_parameter_ids`); the rest go to AdamW."""
    sizes = [math.prod(shape) for shape in _muon_shapes(model.model_type, model.model_dump_json())]
    return sum(sizes), max(sizes, default=0)


@functools.lru_cache(maxsize=32)
def _meta_shapes(model_type: str, config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    config = ModelConfig.model_validate_json(config_json)
    model = create_model_on(model_type, config, device="meta")
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())  # a tied matrix once


def parameter_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every trainable tensor of the model, by its `named_parameters()` name (a tied matrix listed once)."""
    return dict(_meta_shapes(model.model_type, model.model_dump_json()))


@dataclass(frozen=True, kw_only=True)
class ParameterStats:
    """What the memory model needs to know about a model's parameters."""

    total: int
    """Number of trainable elements (a tied matrix once): equals sum(p.numel() for p in model.parameters())."""
    largest_tensor: int
    """Elements of the largest tensor: DeepSpeed's 'largest layer' (each module here owns one weight)."""
    persistent: int
    """Elements in tensors at or below a ZeRO-3 persistence threshold (kept gathered on every rank)."""


def count_parameters(model: ModelConfig) -> int:
    """Trainable parameters of the model built from `model` (a tied matrix counted once)."""
    return sum(math.prod(shape) for shape in parameter_shapes(model).values())


def parameter_stats(model: ModelConfig, persistence_threshold: int) -> ParameterStats:
    """Total, largest tensor and the ZeRO-3 persistent elements (tensors with numel <= persistence_threshold)."""
    sizes = [math.prod(shape) for shape in parameter_shapes(model).values()]
    return ParameterStats(total=sum(sizes), largest_tensor=max(sizes),
                          persistent=sum(n for n in sizes if n <= persistence_threshold))


# ---- activations: stated by each family -------------------------------------------------------------------------

def layer_activation_bytes(m: ModelConfig, act_bytes: int, *, seq_len: int, on_cuda: bool = True,
                           fused_ssm_kernels: bool = True) -> int:
    """Bytes one block saves for backward per token. on_cuda: the family's CUDA kernels run (False: the CPU
    ones); fused_ssm_kernels: mamba-ssm's kernels run (CUDA with mamba-ssm installed)."""
    return family_costs(m.model_type).layer_activation_bytes(m, act_bytes, seq_len=seq_len, on_cuda=on_cuda,
                                                             fused_ssm_kernels=fused_ssm_kernels)


def activation_bytes_per_layer(m: ModelConfig, act_bytes: int, *, seq_len: int, on_cuda: bool = True,
                               fused_ssm_kernels: bool = True) -> list[int]:
    """Bytes each block saves for backward per token, in block order: a family whose blocks differ (the hybrid's
    attention and Mamba layers) states each; for the others every block is `layer_activation_bytes`."""
    costs = family_costs(m.model_type)
    if hasattr(costs, "activation_bytes_per_layer"):
        return costs.activation_bytes_per_layer(m, act_bytes, seq_len=seq_len, on_cuda=on_cuda,
                                                fused_ssm_kernels=fused_ssm_kernels)
    return [layer_activation_bytes(m, act_bytes, seq_len=seq_len, on_cuda=on_cuda,
                                   fused_ssm_kernels=fused_ssm_kernels)] * m.n_layers


def layer_input_bytes(m: ModelConfig, act_bytes: int) -> int:
    """Bytes per token a checkpointed block keeps: its input."""
    return family_costs(m.model_type).layer_input_bytes(m, act_bytes)


def head_activation_bytes(m: ModelConfig, act_bytes: int, *, on_cuda: bool = True) -> int:
    """Per token, outside the blocks: the final norm and its output (lm_head's input), token ids and targets."""
    return family_costs(m.model_type).head_activation_bytes(m, act_bytes, on_cuda=on_cuda)


def tiled_mlp_bytes(m: ModelConfig, act_bytes: int, *, tokens: int, tile_tokens: int) -> tuple[int, int]:
    """(bytes per token each block no longer saves, backward workspace) of tiling the MLP (model/tiling.py); (0, 0)
    for a family without an MLP."""
    costs = family_costs(m.model_type)
    if not hasattr(costs, "tiled_mlp_saved_bytes"):
        return 0, 0
    return (costs.tiled_mlp_saved_bytes(m, act_bytes),
            costs.tiled_mlp_workspace_bytes(m, act_bytes, tokens=tokens, tile_tokens=tile_tokens))


def logits_bytes(m: ModelConfig, act_bytes: int, *, tokens: int, chunked: bool) -> int:
    """Peak bytes of the output layer and loss for one micro-batch of `tokens` tokens (model/losses.py):
    the chunked loss runs on CUDA outside ZeRO-3, the reference everywhere else."""
    return loss_peak_bytes(vocab_size=m.vocab_size, d_model=m.d_model, act_bytes=act_bytes, tokens=tokens,
                           chunked=chunked)


def logits_bytes_per_token(m: ModelConfig, act_bytes: int) -> int:
    """The reference loss's peak per token: V x (bytes + 12) (see model/losses.loss_peak_bytes)."""
    return logits_bytes(m, act_bytes, tokens=1, chunked=False)


def training_flops_per_token(m: ModelConfig, seq_len: int) -> int:
    """Model FLOPs of one training token, as the family counts them (the MFU numerator)."""
    return family_costs(m.model_type).training_flops_per_token(m, seq_len)



# ---- sequence parallelism: stated by each family ----------------------------------------------------------------

def sequence_parallel_problem(m: ModelConfig, n: int) -> str:
    """'' when the family's mixers can split a sequence over n ranks, else why not."""
    if n <= 1:
        return ""
    costs = family_costs(m.model_type)
    if not hasattr(costs, "sequence_parallel_problem"):
        return f"model type {m.model_type!r} states no sequence-parallel costs (see model/transformer/costs.py)"
    problem = costs.sequence_parallel_problem(m, n)
    if not problem and m.max_seq_len % n:
        problem = f"model.max_seq_len={m.max_seq_len} does not divide into {n} shards"
    return problem


def sequence_parallel_buffer_bytes(m: ModelConfig, act_bytes: int, n: int) -> int:
    """Per local token, one block's all-to-all send and receive buffers under n-way sequence parallelism."""
    return 0 if n <= 1 else family_costs(m.model_type).sequence_parallel_buffer_bytes(m, act_bytes, n)


def sequence_parallel_traffic_bytes(m: ModelConfig, act_bytes: int, n: int) -> int:
    """Bytes one token sends to other ranks per training step under n-way sequence parallelism."""
    return 0 if n <= 1 else family_costs(m.model_type).sequence_parallel_traffic_bytes(m, act_bytes, n)
