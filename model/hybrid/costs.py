"""What a hybrid LM costs per token: the bytes its layers save for backward and its training FLOPs.

Each layer is counted as what it is, from the family that owns its kernels: an attention layer exactly as a
Transformer block (model/transformer/costs.py: the same CausalSelfAttention, SwiGLU and nn.RMSNorm), a Mamba layer
as model/mamba/costs.py counts the Mamba-2 mixer's own tensors (fused mamba-ssm kernels or the PyTorch SSD) plus the
pre-norm and the SwiGLU MLP that follows it here. The layers differ, so the memory plan asks for the bytes of each
(`activation_bytes_per_layer`); `layer_activation_bytes` is the largest, the size of the backward workspace and of
a recomputed block. tests/launcher/test_memory.py checks the bytes against the tensors autograd saves,
tests/model/test_flops.py the FLOPs against torch's FlopCounterMode.
"""
from __future__ import annotations

from model.config import ModelConfig
from model.hybrid.config import ATTENTION, layer_kinds
from model.mamba.costs import mamba2_mixer_saved_bytes, mamba_dims, scan_forward_flops_per_token
from model.transformer.costs import INDEX_BYTES, rmsnorm_saved_bytes, transformer_layer_activation_bytes
# Every hybrid layer (attention or Mamba) ends in the Transformer's SwiGLU, so its tiling costs are the same.
from model.transformer.costs import tiled_mlp_saved_bytes, tiled_mlp_workspace_bytes  # noqa: F401


def _attention_layer_bytes(m: ModelConfig, act_bytes: int, on_cuda: bool) -> int:
    # CUDA FlashAttention takes grouped K/V heads only in bf16/fp16; the CPU flash kernel in every dtype.
    return transformer_layer_activation_bytes(m, act_bytes, kv_heads_repeated=on_cuda and act_bytes == 4,
                                              fused_rmsnorm=on_cuda)


def _mamba_layer_bytes(m: ModelConfig, act_bytes: int, *, seq_len: int, on_cuda: bool, fused_kernels: bool) -> int:
    """Pre-norm (input, rstd) and its output (in_proj's input), the Mamba-2 mixer's own tensors, then the MLP:
    its norm and output, w1 x, silu(w1 x), w3 x and their product."""
    a, d = act_bytes, m.d_model
    mixer = mamba2_mixer_saved_bytes(m, a, seq_len=seq_len, fused_kernels=fused_kernels)
    norms = 2 * (rmsnorm_saved_bytes(a, d, fused=on_cuda) + a * d)
    return norms + mixer + 4 * a * m.ffn_dim


def activation_bytes_per_layer(m: ModelConfig, act_bytes: int, *, seq_len: int, on_cuda: bool = True,
                               fused_ssm_kernels: bool = True) -> list[int]:
    """Bytes each layer saves for backward per token, in layer order (on_cuda: FlashAttention and torch's fused
    RMSNorm; fused_ssm_kernels: mamba-ssm's kernels, CUDA with mamba-ssm installed)."""
    attention = _attention_layer_bytes(m, act_bytes, on_cuda)
    mamba = _mamba_layer_bytes(m, act_bytes, seq_len=seq_len, on_cuda=on_cuda,
                               fused_kernels=fused_ssm_kernels and on_cuda)
    return [attention if kind == ATTENTION else mamba for kind in layer_kinds(m)]


def layer_activation_bytes(m: ModelConfig, act_bytes: int, *, seq_len: int, on_cuda: bool = True,
                           fused_ssm_kernels: bool = True) -> int:
    """The largest layer's bytes per token (the backward workspace; a recomputed block)."""
    return max(activation_bytes_per_layer(m, act_bytes, seq_len=seq_len, on_cuda=on_cuda,
                                          fused_ssm_kernels=fused_ssm_kernels))


def layer_input_bytes(m: ModelConfig, act_bytes: int) -> int:
    """Bytes per token a checkpointed block keeps: its input, the residual stream in the model's dtype."""
    return act_bytes * m.d_model


def head_activation_bytes(m: ModelConfig, act_bytes: int, *, on_cuda: bool = True) -> int:
    """Per token, outside the blocks: the final RMSNorm and its output (lm_head's input), token ids and targets."""
    return rmsnorm_saved_bytes(act_bytes, m.d_model, fused=on_cuda) + act_bytes * m.d_model + 2 * INDEX_BYTES


def matmul_parameters(m: ModelConfig) -> int:
    """Weights every token multiplies through: each layer's mixer projections (attention wq, wk, wv, wo or Mamba
    in_proj, out_proj) and MLP, and lm_head (not the embedding lookup, norms, conv or per-head SSM scalars)."""
    d, q, kv = m.d_model, m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    dims = mamba_dims(m)
    attention = d * q + 2 * d * kv + q * d
    mamba = d * dims["d_in_proj"] + dims["d_inner"] * d
    mixers = sum(attention if kind == ATTENTION else mamba for kind in layer_kinds(m))
    return mixers + m.n_layers * 3 * d * m.ffn_dim + m.vocab_size * d


def training_flops_per_token(m: ModelConfig, seq_len: int) -> int:
    """Model FLOPs of one training token (forward + backward, 3x forward): 6 per matmul weight, plus each attention
    layer's scores and their product with V over the full T x T square (PaLM's 12 H Q T, as
    model/transformer/costs.py) and each Mamba layer's conv and SSD chunk matmuls (model/mamba/costs.py).
    Recomputation is not counted (MFU, not HFU)."""
    kinds = layer_kinds(m)
    num_attention = kinds.count(ATTENTION)
    attention = 12 * num_attention * m.n_heads * m.head_dim * seq_len
    mamba = 3 * (len(kinds) - num_attention) * scan_forward_flops_per_token(m, seq_len)
    return 6 * matmul_parameters(m) + attention + mamba



# ---- sequence parallelism: each layer's mixer splits as in its own family (model/sequence_parallel.py) ----------

def sequence_parallel_problem(m: ModelConfig, n: int) -> str:
    """'' when both mixers can split over n ranks: attention's heads (Ulysses) and Mamba-2's heads and groups."""
    from model.mamba import costs as mamba
    from model.transformer import costs as transformer

    kinds = set(layer_kinds(m))
    problems = ([transformer.sequence_parallel_problem(m, n)] if ATTENTION in kinds else []) + \
        ([mamba.sequence_parallel_problem(m, n)] if kinds - {ATTENTION} else [])
    return "; ".join(p for p in problems if p)


def sequence_parallel_buffer_bytes(m: ModelConfig, act_bytes: int, n: int) -> int:
    """One block's all-to-all buffers per local token: the larger of the two mixers'."""
    from model.mamba import costs as mamba
    from model.transformer import costs as transformer

    return max(transformer.sequence_parallel_buffer_bytes(m, act_bytes, n),
               mamba.sequence_parallel_buffer_bytes(m, act_bytes, n))


def sequence_parallel_traffic_bytes(m: ModelConfig, act_bytes: int, n: int) -> int:
    """Bytes one token sends per training step: each family's per-layer traffic times its layer count."""
    from model.mamba import costs as mamba
    from model.transformer import costs as transformer

    kinds = layer_kinds(m)
    attention = sum(kind == ATTENTION for kind in kinds)
    per_attention = transformer.sequence_parallel_traffic_bytes(m, act_bytes, n) / m.n_layers
    per_mamba = mamba.sequence_parallel_traffic_bytes(m, act_bytes, n) / m.n_layers
    return int(attention * per_attention + (len(kinds) - attention) * per_mamba)
