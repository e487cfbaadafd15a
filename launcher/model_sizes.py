"""Parameter shapes and activation bytes of each model family, computed from ModelConfig alone (no model built).

Parameter shapes mirror model/transformer.py and model/mamba.py (mamba-ssm's Mamba2/Mamba layout) tensor by
tensor; tests compare them with the built models. Activation bytes count the tensors autograd saves for the
backward pass, per layer and token, following Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", arXiv:2205.05198, section 4.1), adapted to this project's blocks:
fused attention (FlashAttention / memory-efficient SDPA) keeps no T x T score matrix, only q, k, v, the output and
a per-head log-sum-exp; SwiGLU keeps three ffn-wide tensors plus its product; RMSNorm keeps its input and one fp32
rstd per token; there is no dropout mask (dropout 0 in every preset).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from model.config import ModelConfig
from model.selective_scan import CHUNK_SIZE as MAMBA1_REFERENCE_CHUNK

FP32_BYTES = 4
"""Log-sum-exp, rstd and the loss's log-probabilities are fp32 whatever the training precision."""
INDEX_BYTES = 8
"""Token ids and targets are int64 (torch's default integer type)."""
MAMBA1_SCAN_CHUNK = 2048
"""mamba-ssm's selective-scan CUDA kernel saves 2 x d_state fp32 values per channel per 2048-token chunk for its
backward (csrc/selective_scan: kNThreads * kNItems = 2048)."""


def parameter_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every trainable tensor of the model, by its `named_parameters()` name (a tied matrix listed once)."""
    if model.model_type == "transformer":
        return _transformer_shapes(model)
    if model.model_type == "mamba":
        return _mamba_shapes(model)
    return registered_family_shapes(model)


def registered_family_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """A family registered with model.registry.register_model: its shapes read from the model itself, built on
    the meta device (no memory, no initialisation cost)."""
    import torch

    from model.registry import create_model

    with torch.device("meta"):
        built = create_model(model.model_type, model)
    return {name: tuple(p.shape) for name, p in built.named_parameters() if p.requires_grad}


def _transformer_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, kv = m.d_model, m.kv_heads * m.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (m.vocab_size, d)}
    for i in range(m.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attn_norm.weight": (d,),
            p + "attn.wq.weight": (m.n_heads * m.head_dim, d),
            p + "attn.wk.weight": (kv, d),
            p + "attn.wv.weight": (kv, d),
            p + "attn.wo.weight": (d, m.n_heads * m.head_dim),
            p + "mlp_norm.weight": (d,),
            p + "mlp.w1.weight": (m.ffn_dim, d),
            p + "mlp.w3.weight": (m.ffn_dim, d),
            p + "mlp.w2.weight": (d, m.ffn_dim),
        })
    shapes["norm.weight"] = (d,)
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, d)
    return shapes


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


def _mamba_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    dims, d = mamba_dims(m), m.d_model
    di, conv = dims["d_inner"], dims["conv_dim"]
    shapes: dict[str, tuple[int, ...]] = {"backbone.embedding.weight": (m.vocab_size, d)}
    for i in range(m.n_layers):
        p = f"backbone.layers.{i}."
        shapes[p + "norm.weight"] = (d,)
        x = p + "mixer."
        shapes[x + "in_proj.weight"] = (dims["d_in_proj"], d)
        shapes[x + "conv1d.weight"] = (conv, 1, m.d_conv)
        shapes[x + "conv1d.bias"] = (conv,)
        if m.ssm_type == "mamba2":
            h = dims["nheads"]
            shapes.update({x + "dt_bias": (h,), x + "A_log": (h,), x + "D": (h,), x + "norm.weight": (di,)})
        else:
            r = dims["dt_rank"]
            shapes.update({x + "x_proj.weight": (r + 2 * m.d_state, di), x + "dt_proj.weight": (di, r),
                           x + "dt_proj.bias": (di,), x + "A_log": (di, m.d_state), x + "D": (di,)})
        shapes[x + "out_proj.weight"] = (d, di)
    shapes["backbone.norm_f.weight"] = (d,)
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, d)
    return shapes


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


# ---- activations ------------------------------------------------------------------------------------------------

def rmsnorm_saved_bytes(act_bytes: int, d: int, *, fused: bool) -> int:
    """Bytes an RMSNorm saves per token besides its output. Fused (torch's CUDA `_fused_rms_norm`, torch >= 2.8):
    its input and an fp32 rstd. Composite (CPU): an fp32 input, the fp32 normalised tensor and rstd."""
    return (act_bytes * d if fused else 2 * FP32_BYTES * d) + FP32_BYTES


def transformer_layer_activation_bytes(m: ModelConfig, act_bytes: int, *, kv_heads_repeated: bool,
                                       fused_rmsnorm: bool = True) -> int:
    """Bytes one Transformer block saves for backward, per token.

    Attention: RMSNorm (input, rstd) and its output (feeds wq, wk, wv once), q (d), k and v (2 kv), the SDPA output
    (d) and wo's input, a contiguous copy of the transposed output (d); an fp32 log-sum-exp per head.
    kv = n_kv_heads * head_dim when SDPA receives grouped heads (FlashAttention's enable_gqa, bf16/fp16 on CUDA),
    d when model/transformer.py repeats K/V heads first (every other kernel).
    MLP: RMSNorm and its output, w1 x, silu(w1 x), w3 x and their product (4 ffn).
    Korthikanti et al. 2022's 34 sbh bytes (GPT, 2-byte, dropout masks, s^2 scores excluded) becomes here
    (7d + 2 kv + 4 ffn) x bytes + 4 (H + 2) per token with fused norms: 39.5 d bytes for LLaMA-2-7B in bf16.
    """
    d = m.d_model
    kv = d if kv_heads_repeated else m.kv_heads * m.head_dim
    norms = 2 * rmsnorm_saved_bytes(act_bytes, d, fused=fused_rmsnorm)
    return norms + act_bytes * (5 * d + 2 * kv + 4 * m.ffn_dim) + FP32_BYTES * m.n_heads


def mamba_layer_activation_bytes(m: ModelConfig, act_bytes: int, *, fused_kernels: bool, seq_len: int) -> int:
    """Bytes one Mamba block saves for backward, per token (fused mamba-ssm kernels or this project's reference).

    The block's RMSNorm (model/mamba_mixers.py, fp32 math on the fp32 residual stream) saves the fp32 input, rstd,
    the normalised tensor in the weight's dtype and its output.
    """
    dims, d, a = mamba_dims(m), m.d_model, act_bytes
    di, conv, n = dims["d_inner"], dims["conv_dim"], m.d_state
    norm = FP32_BYTES * (d + 1) + 2 * a * d
    if m.ssm_type == "mamba2":
        h, g = dims["nheads"], m.ngroups
        if fused_kernels:
            # in_proj output zxbcdt (kept whole: z feeds the gated norm, dt the scan, the conv reads a view), conv
            # output xBC (its x, B, C views are the scan's inputs), scan output y, gated-norm output (out_proj's
            # input); fp32 dA_cumsum per head and norm rstd per group (mamba_ssm/ops/triton/ssd_combined.py
            # MambaChunkScanCombinedFn saves out, x, dt, dA_cumsum, B, C, z; layernorm_gated.py).
            return norm + a * (dims["d_in_proj"] + conv + 2 * di) + FP32_BYTES * (h + g)
        return norm + _mamba2_reference_bytes(m, a, seq_len)
    r = dims["dt_rank"]
    if fused_kernels:
        # in_proj output xz (2 di; z and the conv input are views of it), conv output, x_proj's input (a copy of
        # the transposed conv output), x_dbl (r + 2n), delta, contiguous B and C (2n), scan output, out_proj's
        # input (a copy); the kernel's fp32 (B, D, chunks, 2n) states (mamba_ssm/ops/selective_scan_interface.py).
        chunks = -(-seq_len // MAMBA1_SCAN_CHUNK)
        return norm + a * (7 * di + r + 4 * n) + FP32_BYTES * 2 * n * di * chunks // seq_len
    return norm + _mamba1_reference_bytes(m, a, seq_len)


def _mamba2_reference_bytes(m: ModelConfig, a: int, seq_len: int) -> int:
    """Mixer of Mamba-2 through model/ssd_scan.py's chunked PyTorch SSD, per token (counted tensor by tensor with
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
    """Mixer of Mamba-1 through model/selective_scan.py's chunked PyTorch scan, per token: its autograd Function
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
    """Bytes one block saves for backward per token. on_cuda: FlashAttention and torch's fused RMSNorm run
    (False: the CPU kernels); fused_ssm_kernels: mamba-ssm's kernels run (CUDA with mamba-ssm installed)."""
    if m.model_type not in ("transformer", "mamba"):
        return registered_family_activation_bytes(m, act_bytes)
    if m.model_type == "transformer":
        # FlashAttention takes grouped K/V heads only in bf16/fp16 (model/transformer.py _gqa_reaches_fused_kernel).
        return transformer_layer_activation_bytes(m, act_bytes, kv_heads_repeated=act_bytes == 4 or not on_cuda,
                                                  fused_rmsnorm=on_cuda)
    return mamba_layer_activation_bytes(m, act_bytes, fused_kernels=fused_ssm_kernels and on_cuda, seq_len=seq_len)


def registered_family_activation_bytes(m: ModelConfig, act_bytes: int) -> int:
    """A registered family states its own per-block, per-token saved bytes as a static method
    `activation_bytes_per_token(config, act_bytes)` on its class; without one, the Transformer block of the same
    config is assumed (a stated guess, shown in the plan as any other figure)."""
    from model.registry import model_class

    stated = getattr(model_class(m.model_type), "activation_bytes_per_token", None)
    if stated is not None:
        return int(stated(m, act_bytes))
    return transformer_layer_activation_bytes(m, act_bytes, kv_heads_repeated=True, fused_rmsnorm=False)


def layer_input_bytes(m: ModelConfig, act_bytes: int) -> int:
    """Bytes per token a checkpointed block keeps: its input (B, T, d_model); Mamba's residual stream is fp32."""
    return (FP32_BYTES if m.model_type == "mamba" else act_bytes) * m.d_model


def head_activation_bytes(m: ModelConfig, act_bytes: int, *, on_cuda: bool = True) -> int:
    """Per token, outside the blocks: the final RMSNorm and its output (lm_head's input), token ids and targets."""
    if m.model_type == "mamba":  # model/mamba_mixers.RMSNorm on the fp32 stream, as in every block
        norm = FP32_BYTES * (m.d_model + 1) + act_bytes * m.d_model
    else:
        norm = rmsnorm_saved_bytes(act_bytes, m.d_model, fused=on_cuda)
    return norm + act_bytes * m.d_model + 2 * INDEX_BYTES


def logits_bytes_per_token(m: ModelConfig, act_bytes: int) -> int:
    """Peak bytes of the output layer and loss per token: logits (kept by the caller), the fp32 log-softmax that
    cross-entropy saves, and in backward its gradient plus the fp32 gradient of the logits: V x (bytes + 12).
    (Both models compute the loss as F.cross_entropy(logits.float(), ...).)"""
    return m.vocab_size * (act_bytes + 3 * FP32_BYTES)
