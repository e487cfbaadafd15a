"""The rotation of rotary position embeddings (RoPE, Su et al. 2021, arXiv:2104.09864): reference and fused op.

`apply_rotary(x, cos, sin)` is the reference: the rotation in plain PyTorch under ordinary autograd.
`apply_rotary_fused` (same signature, what the model calls) gives the same values and gradients through one
autograd Function. RoPE is a rotation, linear in x, so its backward is the same rotation by the negative angle
(dx = rotate(dy, cos, -sin)); the Function saves only the cos/sin table slices, views of
`RotaryEmbedding`'s buffers. On CUDA each rotation (forward, backward) runs through `torch.compile`, which Inductor
turns into one Triton kernel instead of the ~8 kernels and fp32 intermediates of the eager lines; on CPU it runs
eagerly (the same ops as the reference, so CPU results stay bit-identical and pay no compile time).

Memory: the reference saves nothing per token either (its products have a constant table as one operand, so
autograd keeps only the table: measured with saved_tensors_hooks, tests/model/test_rotary.py). What the fused op
removes on GPU are the transient fp32 copies of q and k in forward and backward, and the kernel launches.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + D/2) of x (..., T, D) by the angles of its T positions, in fp32; cast back."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (..., T, D/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., T, D)
    return rotated.type_as(x)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Reference: x (B, H, T, D) rotated by cos, sin (T, D/2), plain autograd."""
    return rotate(x, cos, sin)


def _rotate_back(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The inverse rotation (angle -theta): the backward of `rotate`, since a rotation's transpose is its inverse."""
    return rotate(x, cos, -sin)


# Wrapped on first CUDA use, not at import: torch.compile imports Dynamo, which a CPU run never needs.
# dynamic=True: sequence length, batch and head counts (q has H heads, k has K) are symbolic, so training,
# evaluation and decoding lengths reuse one graph (sizes 0 and 1 still get their own, Dynamo's rule).
_compiled: dict[Callable[..., Tensor], Callable[..., Tensor]] = {}
_compile_failure: str | None = None


def use_compiled(x: Tensor) -> bool:
    """Whether the rotation of x runs through torch.compile: on CUDA, unless compiling failed once, and not while
    an enclosing torch.compile traces the model (training.compile_blocks fuses the rotation into its own graph)."""
    return x.is_cuda and _compile_failure is None and not torch.compiler.is_compiling()


def _run(fn: Callable[..., Tensor], x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    global _compile_failure
    if not use_compiled(x):
        return fn(x, cos, sin)
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    try:
        return _compiled[fn](x, cos, sin)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - no Triton, an old GPU, a compiler bug: the eager op is correct
        _compile_failure = f"{type(error).__name__}: {error}"
        warnings.warn(f"torch.compile of the rotary embedding failed, running it eagerly: {_compile_failure}",
                      stacklevel=2)
        return fn(x, cos, sin)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)  # views of the tables: nothing per token
        return _run(rotate, x, cos, sin)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _run(_rotate_back, grad, cos, sin), None, None


def apply_rotary_fused(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Same values and gradient of x as `apply_rotary`; the tables get no gradient (they are never trained)."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rotary_fused gives the cos/sin tables no gradient; use apply_rotary")
    return _Rotary.apply(x, cos, sin)
