"""What a Mamba LM costs per token: the bytes its blocks save for backward and its training FLOPs.

Stated here, beside model/mamba/model.py and its kernels (model/mamba/ssd_scan.py, model/mamba/selective_scan.py, mamba-ssm's
fused kernels on GPU), because they change with the kernels chosen. The memory plan (launcher/planning/memory.py) and the
throughput benchmark (tools/throughput.py) ask the family through the registry; tests/launcher/test_memory.py
counts the reference kernels' bytes with torch.autograd.graph.saved_tensors_hooks, tests/model/test_flops.py the
FLOPs with torch's FlopCounterMode.
"""
from __future__ import annotations

import math

from model.config import ModelConfig
from model.mamba.selective_scan import CHUNK_SIZE as MAMBA1_REFERENCE_CHUNK

FP32_BYTES = 4
"""rstd, dA_cumsum and the reference scans' math are fp32 whatever the training precision."""
INDEX_BYTES = 8
"""Token ids and targets are int64 (torch's default integer type)."""
MAMBA1_SCAN_CHUNK = 2048
"""mamba-ssm's selective-scan CUDA kernel saves 2 x d_state fp32 values per channel per 2048-token chunk for its
backward (csrc/selective_scan: kNThreads * kNItems = 2048)."""


def mamba_dims(m: ModelConfig) -> dict[str, int]:
    """d_inner, nheads, conv_dim, d_in_proj, dt_rank of the Mamba mixer (mamba-ssm's definitions)."""
    d_inner = m.expand * m.d_model
    if m.ssm_type == "mamba2":
        nheads = d_inner // m.headdim
        conv_dim = d_inner + 2 * m.ngroups * m.d_state
        return {"d_inner": d_inner, "nheads": nheads, "conv_dim": conv_dim, "d_in_proj": conv_dim + d_inner + nheads,
                "dt_rank": 0}
    # Mamba-1: dt_rank null = ceil(d_model / 16), mamba-ssm's "auto" (mamba_ssm/modules/mamba_simple.py)
    return {"d_inner": d_inner, "nheads": 0, "conv_dim": d_inner, "d_in_proj": 2 * d_inner,
            "dt_rank": m.dt_rank or math.ceil(m.d_model / 16)}


def mamba_layer_activation_bytes(m: ModelConfig, act_bytes: int, *, fused_kernels: bool, seq_len: int) -> int:
    """Bytes one Mamba block saves for backward, per token (fused mamba-ssm kernels or this project's reference).

    The block's RMSNorm (model/mamba/mixers.py, fp32 math on the fp32 residual stream) saves the fp32 input, rstd,
    the normalised tensor in the weight's dtype and its output.
    """
    dims, d, a = mamba_dims(m), m.d_model, act_bytes
    di, n = dims["d_inner"], m.d_state
    norm = FP32_BYTES * (d + 1) + 2 * a * d
    if m.ssm_type == "mamba2":
        return norm + mamba2_mixer_saved_bytes(m, a, seq_len=seq_len, fused_kernels=fused_kernels)
    r = dims["dt_rank"]
    if fused_kernels:
        # mamba_inner_fn (mamba_ssm/ops/selective_scan_interface.py MambaInnerFn, checkpoint_lvl=1, the default):
        # saves xz (2 di), x_dbl (r + 2n), contiguous B and C (2n), the scan output (di) and the kernel's fp32
        # (B, D, chunks, 2n) states; the conv output and delta are recomputed in backward, out_proj runs inside.
        chunks = -(-seq_len // MAMBA1_SCAN_CHUNK)
        return norm + a * (3 * di + r + 4 * n) + FP32_BYTES * 2 * n * di * chunks // seq_len
    return norm + _mamba1_reference_bytes(m, a, seq_len)


def mamba2_mixer_saved_bytes(m: ModelConfig, a: int, *, seq_len: int, fused_kernels: bool) -> int:
    """Bytes the Mamba-2 mixer saves per token beyond its input (in_proj's input, the norm output before it);
    model/hybrid/costs.py counts its Mamba layers' mixers with it too."""
    if not fused_kernels:
        return _mamba2_reference_bytes(m, a, seq_len)
    dims = mamba_dims(m)
    # in_proj output zxbcdt (kept whole: z feeds the gated norm, dt the scan, the conv reads a view), conv output xBC
    # (its x, B, C views are the scan's inputs), scan output y, gated-norm output (out_proj's input); fp32 dA_cumsum
    # per head and norm rstd per group (mamba_ssm/ops/triton/ssd_combined.py MambaChunkScanCombinedFn saves out, x,
    # dt, dA_cumsum, B, C, z; layernorm_gated.py).
    return a * (dims["d_in_proj"] + dims["conv_dim"] + 2 * dims["d_inner"]) + FP32_BYTES * (dims["nheads"] + m.ngroups)


def _mamba2_reference_bytes(m: ModelConfig, a: int, seq_len: int) -> int:
    """Mixer of Mamba-2 through model/mamba/ssd_scan.py's chunked PyTorch SSD, per token (counted tensor by tensor with
    torch.autograd.graph.saved_tensors_hooks; tests/launcher/test_memory.py keeps it honest)."""
    dims = mamba_dims(m)
    di, conv, h, n, g = dims["d_inner"], dims["conv_dim"], dims["nheads"], m.d_state, m.ngroups
    q = min(m.chunk_size, seq_len)
    pad = -(-seq_len // q) * q / seq_len  # the scan pads the sequence to whole chunks
    f = FP32_BYTES
    upcast_copies = a < f  # x.float() etc. copy 16-bit tensors; in fp32 they return the tensor itself
    conv_bytes = a * conv * (2 * seq_len + m.d_conv - 1) / seq_len  # padded conv input and conv output
    scan_x = 2 * f * di if upcast_copies else f * conv  # two fp32 copies of x, or the silu output itself
    chunked = (2 * f * h  # dt + bias, softplus(dt)
               + pad * (2 * f * h  # exp(to_end), exp(cum)
                        + 4 * f * g * n  # B and C laid out for the three chunk matmuls
                        + 2 * f * h * q + f * g * q  # exp(segment), its product with C B^T, and C B^T
                        + 4 * f * di  # dt x, its chunked copy, the weighted copy for the states, y_off
                        + 2 * f * di * n / q))  # chunk start states, in the loop and stacked
    gate = (5 * f * di if upcast_copies else 4 * f * di + f * dims["d_in_proj"]) + f * g  # gated RMSNorm, fp32
    return int(conv_bytes + scan_x + chunked + gate + a * di)  # + out_proj's input


def _mamba1_reference_bytes(m: ModelConfig, a: int, seq_len: int) -> int:
    """Mixer of Mamba-1 through model/mamba/selective_scan.py's chunked PyTorch scan, per token: its autograd Function
    saves only its inputs and the state at each chunk boundary (chunk MAMBA1_REFERENCE_CHUNK), and recomputes the
    rest in backward; counted like _mamba2_reference_bytes."""
    dims = mamba_dims(m)
    di, r, n = dims["d_inner"], dims["dt_rank"], m.d_state
    f = FP32_BYTES
    num_chunks = -(-seq_len // min(MAMBA1_REFERENCE_CHUNK, seq_len))
    front = (a * di * (2 * seq_len + m.d_conv - 1) / seq_len  # padded conv input and conv output
             + a * di + a * (r + 2 * n)  # x_proj's and dt_proj's inputs
             + 3 * f * di)  # delta + bias, softplus(delta), u in fp32 (a copy, or the conv output itself)
    scan = (2 * f * di + 2 * f * n  # delta and delta * u, B and C, laid out steps-first
            + f * n * di * (num_chunks + 1) / seq_len)  # the state entering each chunk, and the last one
    gate = 4 * f * di  # u and z in fp32 (copies, or in fp32 the z half of in_proj's output: 2 di), silu(z), y
    return int(front + scan + gate + a * di)  # + out_proj's input


def layer_activation_bytes(m: ModelConfig, act_bytes: int, *, seq_len: int, on_cuda: bool = True,
                           fused_ssm_kernels: bool = True) -> int:
    """Bytes one block saves for backward per token; fused_ssm_kernels: mamba-ssm's kernels run (CUDA with
    mamba-ssm installed)."""
    return mamba_layer_activation_bytes(m, act_bytes, fused_kernels=fused_ssm_kernels and on_cuda, seq_len=seq_len)


def layer_input_bytes(m: ModelConfig, act_bytes: int) -> int:
    """Bytes per token a checkpointed block keeps: its input, on the fp32 residual stream."""
    return FP32_BYTES * m.d_model


def head_activation_bytes(m: ModelConfig, act_bytes: int, *, on_cuda: bool = True) -> int:
    """Per token, outside the blocks: the final RMSNorm (model/mamba/mixers.RMSNorm on the fp32 stream, as in every
    block) and its output (lm_head's input), token ids and targets."""
    return FP32_BYTES * (m.d_model + 1) + act_bytes * m.d_model + act_bytes * m.d_model + 2 * INDEX_BYTES


def matmul_parameters(m: ModelConfig) -> int:
    """Weights every token multiplies through: in_proj, out_proj (and Mamba-1's x_proj, dt_proj) of each block and
    lm_head (not the embedding lookup, norms or per-channel SSM scalars)."""
    dims, d = mamba_dims(m), m.d_model
    di, r, n = dims["d_inner"], dims["dt_rank"], m.d_state
    per_layer = d * dims["d_in_proj"] + di * d
    if m.ssm_type == "mamba1":
        per_layer += di * (r + 2 * n) + r * di
    return m.n_layers * per_layer + m.vocab_size * d


def conv_forward_flops_per_token(m: ModelConfig) -> int:
    """Forward FLOPs of one layer's depthwise causal conv per token: a multiply-add per channel and tap."""
    return 2 * mamba_dims(m)["conv_dim"] * m.d_conv


def scan_forward_flops_per_token(m: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs of one layer's sequence mixing per token, besides the projections: the conv, then the scan.

    Mamba-2, the SSD algorithm's four matmuls per chunk of Q tokens (Dao & Gu 2024, arXiv:2405.21060, section 6;
    model/mamba/ssd_scan.py steps 1, 2 and 4): C B^T (2 G Q N), its masked product with X (2 H Q P), the chunk states
    X^T B (2 H P N) and the outputs C S (2 H P N); the state passing between chunks is elementwise.
    Mamba-1, the selective scan's recurrence (Gu & Dao 2023, arXiv:2312.00752, Algorithm 2; model/mamba/selective_scan.py)
    per channel and state element: delta A (1 multiply; its exp, a transcendental, is not counted, as PaLM's count
    leaves out softmax's), the input (delta u) B (1 multiply; delta u is per channel), h = a h + b (a multiply-add)
    and y = C . h (a multiply-add): 6 d_inner N. The 9 L N per channel of Gu (state-spaces/mamba#110) counts the
    CUDA kernel's parallel scan, whose prefix-sum algorithm takes 2 L associative steps where the recurrence takes
    L: MFU counts the model's arithmetic, not a kernel's (model/transformer/costs.py likewise counts attention over
    the full square whatever a causal kernel skips).
    """
    dims = mamba_dims(m)
    conv = conv_forward_flops_per_token(m)
    if m.ssm_type == "mamba2":
        q = min(m.chunk_size, seq_len)
        h, p, n, g = dims["nheads"], m.headdim, m.d_state, m.ngroups
        return conv + 2 * g * q * n + 2 * h * q * p + 4 * h * p * n
    return conv + 6 * dims["d_inner"] * m.d_state


def training_flops_per_token(m: ModelConfig, seq_len: int) -> int:
    """Model FLOPs of one training token (forward + backward, 3x forward, as for the Transformer's 6 N): the
    projections (2 per weight forward) and the sequence mixing of every layer. Recomputation is not counted."""
    return 3 * (2 * matmul_parameters(m) + m.n_layers * scan_forward_flops_per_token(m, seq_len))


def sequence_parallel_problem(m: ModelConfig, n: int) -> str:
    """'' when the mixers can split over n ranks (model/mamba/mixers.py _forward_sequence_parallel): Mamba-2 deals
    heads and B/C groups (groups divide over the ranks or are replicated), Mamba-1 deals d_inner channels."""
    dims = mamba_dims(m)
    if m.ssm_type == "mamba1":
        return f"d_inner = {dims['d_inner']} channels do not divide over {n} ranks" if dims["d_inner"] % n else ""
    if dims["nheads"] % n:
        return f"{dims['nheads']} Mamba-2 heads do not divide over {n} sequence-parallel ranks"
    if m.ngroups % n and n % m.ngroups:
        return f"{m.ngroups} B/C groups neither divide over {n} ranks nor divide {n}"
    return ""


def _exchanged_width(m: ModelConfig, n: int) -> int:
    """Channels per token one rank's all-to-alls move: [x, B, C, dt] in (B and C once per receiving rank when
    groups are replicated) and y out; Mamba-1: x and z in, y out."""
    dims = mamba_dims(m)
    if m.ssm_type == "mamba1":
        return 3 * dims["d_inner"]
    return 2 * dims["d_inner"] + 2 * max(m.ngroups, n) * m.d_state + dims["nheads"]


def sequence_parallel_buffer_bytes(m: ModelConfig, act_bytes: int, n: int) -> int:
    """Bytes per local token of one block's all-to-all send and receive buffers under n-way sequence parallelism."""
    return 0 if n <= 1 else 2 * act_bytes * _exchanged_width(m, n)


def sequence_parallel_traffic_bytes(m: ModelConfig, act_bytes: int, n: int) -> int:
    """Bytes one token sends to other ranks in one training step (forward and backward, every block)."""
    return 0 if n <= 1 else int(2 * m.n_layers * act_bytes * _exchanged_width(m, n) * (n - 1) / n)
