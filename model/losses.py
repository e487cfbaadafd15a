"""The language-model loss: output projection + cross-entropy, fused and chunked over tokens, and its reference.

`linear_cross_entropy_ref(hidden, weight, targets)` is what the models always did: logits = hidden W^T (B, T, V),
then an fp32 cross-entropy. In bf16 with V = 32000 that holds the logits, their fp32 copy, the fp32
log-softmax and, in backward, two more (B, T, V) tensors: at sequence 2048 and micro-batch 8 about 10 GiB,
more than a 1B model's weights and Adam states together.

`chunked_linear_cross_entropy` (same signature) computes the same loss and gradients without ever holding more
than `chunk_tokens` rows of logits: the forward pass walks over the tokens in chunks, and for each chunk computes
the logits in fp32, the loss, and at once the gradients of hidden and W (softmax - one_hot, scaled by 1/N, the
derivative of the mean cross-entropy), so the backward pass only scales them by the incoming gradient. This is
the approach of Liger Kernel's FusedLinearCrossEntropy (Hsu et al. 2024, arXiv:2410.10989, section 3.2), written
here in PyTorch because it is ~40 lines over two matmuls and Liger is not a dependency of this project.
No recomputation, so it costs the same FLOPs as the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_CHUNK_TOKENS = 2048
"""Rows of logits alive at once: at V = 32000 a chunk's fp32 logits are 256 MiB, while each chunk's matmul
(2048 x d x V) stays large enough to run at full tensor-core speed."""
IGNORE_INDEX = -100
"""Targets with this value add nothing to the loss (F.cross_entropy's default ignore_index)."""


def _at_least_fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                             chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    """Mean cross-entropy of logits = hidden (..., C) @ weight (V, C)^T against targets (...), in fp32.
    chunk_tokens is accepted for the shared signature and unused."""
    logits = F.linear(hidden, weight)  # (..., V)
    # fp32 loss: a bf16 log-softmax over 32k classes loses ~2 digits of the loss.
    return F.cross_entropy(_at_least_fp32(logits).reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int,
                grad_enabled: bool) -> Tensor:
        h = hidden.reshape(-1, hidden.size(-1))  # (N, C)
        t = targets.reshape(-1)  # (N,)
        num_valid = (t != IGNORE_INDEX).sum().clamp(min=1)
        # Grad mode is always off inside forward, and needs_input_grad only says the inputs require grad (a
        # parameter always does): under torch.no_grad() (evaluation) the caller's grad mode says no backward comes.
        want_h, want_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        needs_grad = want_h or want_w
        loss_sum = torch.zeros((), dtype=_at_least_fp32(h).dtype, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=_at_least_fp32(weight).dtype, device=weight.device) \
            if want_w else None
        for start in range(0, h.size(0), chunk_tokens):
            h_c, t_c = h[start:start + chunk_tokens], t[start:start + chunk_tokens]  # (n, C), (n,)
            logits = _at_least_fp32(F.linear(h_c, weight))  # (n, V) fp32
            loss_sum += F.cross_entropy(logits, t_c, ignore_index=IGNORE_INDEX, reduction="sum")
            if not needs_grad:
                continue
            # d(mean CE)/d logits = (softmax - one_hot) / num_valid; ignored rows contribute nothing.
            grad_logits = logits.softmax(dim=-1)  # (n, V)
            valid = t_c != IGNORE_INDEX
            rows = torch.arange(t_c.size(0), device=t_c.device)[valid]
            grad_logits[rows, t_c[valid]] -= 1.0
            grad_logits.mul_((valid.to(grad_logits.dtype) / num_valid).unsqueeze(-1))
            grad_logits = grad_logits.to(h.dtype)
            if grad_h is not None:
                grad_h[start:start + chunk_tokens] = grad_logits @ weight  # (n, C)
            if grad_w is not None:
                if h.dtype in (torch.float32, torch.float64):
                    grad_w.addmm_(grad_logits.t(), h_c)  # (V, C)
                else:  # 16-bit matmul, fp32 sum over chunks
                    grad_w += (grad_logits.t() @ h_c).float()  # (V, C)
        ctx.save_for_backward(grad_h.view_as(hidden) if grad_h is not None else None,
                              grad_w.to(weight.dtype) if grad_w is not None else None)
        return loss_sum / num_valid

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss
        return (grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
                grad_w * scale.to(grad_w.dtype) if grad_w is not None else None, None, None, None)


def chunked_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    """Same result as `linear_cross_entropy_ref`, holding at most chunk_tokens rows of logits at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens, torch.is_grad_enabled())


def use_chunked_loss(weight: Tensor) -> bool:
    """The models' choice: chunked on CUDA, where the logits dominate activation memory; the reference on CPU
    (same speed there, and the CPU path stays bit-identical to earlier runs). Not under ZeRO-3, whose partitioned
    weight is gathered only inside its module's forward (an `lm_head(...)` call), which this function bypasses."""
    return weight.is_cuda and not hasattr(weight, "ds_id")


def loss_peak_bytes(*, vocab_size: int, d_model: int, act_bytes: int, tokens: int, chunked: bool,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
    """Peak bytes of the output layer and loss for `tokens` tokens of one micro-batch.

    Reference: the logits (kept by the caller), the fp32 log-softmax cross-entropy saves, and in backward its
    gradient plus the fp32 gradient of the logits: V x (act_bytes + 12) per token.
    Chunked: one chunk's logits (16-bit and fp32), its fp32 softmax/gradient and the 16-bit gradient copy, the fp32
    grad-W accumulator and its cast copy, and grad-hidden for every token (held until backward)."""
    if not chunked:
        return tokens * vocab_size * (act_bytes + 12)
    rows = min(chunk_tokens, tokens)
    return (rows * vocab_size * (2 * act_bytes + 8) + vocab_size * d_model * (4 + act_bytes)
            + tokens * d_model * act_bytes)


def lm_head_and_loss(hidden: Tensor, lm_head: nn.Linear, targets: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Logits (B, T, V) of the final hidden states (B, T, C) and, with targets (B, T), the mean cross-entropy.
    On CUDA with targets the loss is chunked and the logits, never built whole, are None (`use_chunked_loss`); on CPU
    too when the trainer set `lm_head.tiled_loss` (training.tiled_loss, model/tiling.py), except under ZeRO-3."""
    chunked = use_chunked_loss(lm_head.weight) or (getattr(lm_head, "tiled_loss", False)
                                                   and not hasattr(lm_head.weight, "ds_id"))
    if targets is not None and chunked:
        return None, chunked_linear_cross_entropy(hidden, lm_head.weight, targets)
    logits = lm_head(hidden)  # (B, T, V)
    loss = None
    if targets is not None:
        # fp32 loss: a bf16 log-softmax over 32k classes loses ~2 digits of the loss.
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
    return logits, loss
