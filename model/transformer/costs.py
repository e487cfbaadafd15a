"""What a Transformer costs per token: the bytes its blocks save for backward and its training FLOPs.

Stated here, beside model/transformer/model.py, because they follow its kernels: the memory plan (launcher/planning/memory.py)
and the throughput benchmark (tools/throughput.py) ask the family through the registry (`family_costs`), and
tests/launcher/test_memory.py checks the bytes against the tensors autograd saves, tests/model/test_flops.py the
FLOPs against torch's FlopCounterMode.

Activation bytes follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
arXiv:2205.05198, section 4.1), adapted to these blocks: fused attention (FlashAttention / memory-efficient SDPA)
keeps no T x T score matrix, only q, k, v, the output and a per-head log-sum-exp; SwiGLU keeps three ffn-wide
tensors plus its product; RMSNorm keeps its input and one fp32 rstd per token; there is no dropout mask (dropout 0
in every preset).
"""
from __future__ import annotations

from model.config import ModelConfig

FP32_BYTES = 4
"""Log-sum-exp, rstd and the loss's log-probabilities are fp32 whatever the training precision."""
INDEX_BYTES = 8
"""Token ids and targets are int64 (torch's default integer type)."""


def rmsnorm_saved_bytes(act_bytes: int, d: int, *, fused: bool) -> int:
    """Bytes an RMSNorm saves per token besides its output. Fused (torch's CUDA `_fused_rms_norm`, torch >= 2.8):
    its input and an fp32 rstd. Composite (CPU): an fp32 input, the fp32 normalised tensor and rstd."""
    return (act_bytes * d if fused else 2 * FP32_BYTES * d) + FP32_BYTES


def transformer_layer_activation_bytes(m: ModelConfig, act_bytes: int, *, kv_heads_repeated: bool,
                                       fused_rmsnorm: bool = True) -> int:
    """Bytes one Transformer block saves for backward, per token.

    Attention: RMSNorm (input, rstd) and its output (feeds wq, wk, wv once), q (d), k and v (2 kv), the SDPA output
    (d) and wo's input, a contiguous copy of the transposed output (d); an fp32 log-sum-exp per head.
    kv = n_kv_heads * head_dim when SDPA receives grouped heads (enable_gqa: FlashAttention in bf16/fp16 on CUDA,
    the CPU flash kernel), d when model/transformer/model.py repeats K/V heads first (other CUDA kernels). The rotary
    embedding adds nothing: model/transformer/rotary.py's op saves only the cos/sin tables (buffers), as does its eager reference, whose products each
    have a table as the other operand; q and k above are the rotated tensors SDPA keeps.
    MLP: RMSNorm and its output, w1 x, silu(w1 x), w3 x and their product (4 ffn).
    Korthikanti et al. 2022's 34 sbh bytes (GPT, 2-byte, dropout masks, s^2 scores excluded) becomes here
    (7d + 2 kv + 4 ffn) x bytes + 4 (H + 2) per token with fused norms: 39.5 d bytes for LLaMA-2-7B in bf16.
    """
    d = m.d_model
    kv = d if kv_heads_repeated else m.kv_heads * m.head_dim
    norms = 2 * rmsnorm_saved_bytes(act_bytes, d, fused=fused_rmsnorm)
    return norms + act_bytes * (5 * d + 2 * kv + 4 * m.ffn_dim) + FP32_BYTES * m.n_heads


def layer_activation_bytes(m: ModelConfig, act_bytes: int, *, seq_len: int, on_cuda: bool = True,
                           fused_ssm_kernels: bool = True) -> int:
    """Bytes one block saves for backward per token (on_cuda: FlashAttention and torch's fused RMSNorm)."""
    # CUDA FlashAttention takes grouped K/V heads only in bf16/fp16; the CPU flash kernel in every dtype
    # (model/transformer/model.py _gqa_reaches_fused_kernel).
    return transformer_layer_activation_bytes(m, act_bytes, kv_heads_repeated=on_cuda and act_bytes == 4,
                                              fused_rmsnorm=on_cuda)


def layer_input_bytes(m: ModelConfig, act_bytes: int) -> int:
    """Bytes per token a checkpointed block keeps: its input (B, T, d_model)."""
    return act_bytes * m.d_model


def head_activation_bytes(m: ModelConfig, act_bytes: int, *, on_cuda: bool = True) -> int:
    """Per token, outside the blocks: the final RMSNorm and its output (lm_head's input), token ids and targets."""
    return rmsnorm_saved_bytes(act_bytes, m.d_model, fused=on_cuda) + act_bytes * m.d_model + 2 * INDEX_BYTES


def matmul_parameters(m: ModelConfig) -> int:
    """Weights every token multiplies through: the projections of each block and lm_head (not the embedding
    lookup, not the norms)."""
    d, q, kv = m.d_model, m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * m.ffn_dim
    return m.n_layers * per_layer + m.vocab_size * d


def training_flops_per_token(m: ModelConfig, seq_len: int) -> int:
    """Model FLOPs of one training token (forward + backward), the MFU numerator.

    PaLM's count (Chowdhery et al. 2022, arXiv:2204.02311, appendix B): 6 N + 12 L H Q T, with N the matmul
    parameters (2 FLOPs per weight per token forward, twice that backward) and 12 L H Q T the attention scores
    and their product with V (2 x 2 x T x H Q forward, per layer), counted over the full T x T square as PaLM
    and Chinchilla do (causal kernels skip half: MFU counts model FLOPs, not the ones a kernel happens to run).
    Recomputation (activation checkpointing) is not counted: that is HFU, not MFU.
    """
    return 6 * matmul_parameters(m) + 12 * m.n_layers * m.n_heads * m.head_dim * seq_len


def sequence_parallel_problem(m: ModelConfig, n: int) -> str:
    """'' when Ulysses can split this model's attention over n ranks (model/sequence_parallel.heads_problem)."""
    from model.sequence_parallel import heads_problem

    return heads_problem(m.n_heads, m.kv_heads, n)


def sequence_parallel_buffer_bytes(m: ModelConfig, act_bytes: int, n: int) -> int:
    """Bytes per local token of one block's all-to-all buffers under n-way Ulysses (model/transformer/model.py
    CausalSelfAttention._sequence_parallel_attention), alive while that block's attention runs: DeepSpeed's
    _SeqAllToAll makes a contiguous send copy and a receive buffer of q (H D), k and v (K' D each, K' = max(K, n)
    after replication) and of the output (H D). Saved activations are unchanged per token: SDPA keeps the
    all-to-all outputs instead of the local q, k, v (plus the replicated K/V heads, counted here)."""
    if n <= 1:
        return 0
    kv = max(m.kv_heads, n) * m.head_dim
    return act_bytes * (2 * (2 * m.d_model + 2 * kv) + 2 * (kv - m.kv_heads * m.head_dim))


def sequence_parallel_traffic_bytes(m: ModelConfig, act_bytes: int, n: int) -> int:
    """Bytes one token sends to other ranks in one training step (forward and backward, every block) under n-way
    Ulysses: q, k, v and the output each cross once per direction, (n - 1)/n of them leave the rank."""
    if n <= 1:
        return 0
    kv = max(m.kv_heads, n) * m.head_dim
    return int(2 * m.n_layers * act_bytes * (2 * m.d_model + 2 * kv) * (n - 1) / n)


def tiled_mlp_saved_bytes(m: ModelConfig, act_bytes: int) -> int:
    """Bytes per token a block's SwiGLU no longer saves when tiled (training.tiled_mlp, model/tiling.py): w1 x,
    silu(w1 x), w3 x and their product, 4 ffn x bytes; it keeps its input, the norm's output counted above.
    A tiled block saves (7d + 2 kv) x bytes + 4 (H + 2) per token with fused norms: 18 d bytes instead of 39.5 d
    for LLaMA-2-7B in bf16."""
    return 4 * m.ffn_dim * act_bytes


def tiled_mlp_workspace_bytes(m: ModelConfig, act_bytes: int, *, tokens: int, tile_tokens: int) -> int:
    """Bytes alive while one tiled MLP runs backward, for a micro-batch of `tokens` tokens (this rank's): one tile's
    recomputed intermediates (4 ffn per tile token) and DeepSpeed TiledMLP's full-size input gradient (d per
    token). Reasoned from deepspeed/runtime/sequence_parallel/ulysses_sp.py TiledMLP.backward, not measured."""
    return act_bytes * (tile_tokens * 4 * m.ffn_dim + tokens * m.d_model)
