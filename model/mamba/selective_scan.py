"""Mamba-1's selective scan: fused CUDA kernel and a chunked PyTorch reference with its own backward.

The recurrence, per channel d and state index n (Gu & Dao 2023, arXiv:2312.00752, Algorithm 2):
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t        h (D, N); A (D, N); B_t, C_t (N,)
    y_t = C_t . h_t + D u_t,  times silu(z_t)
Unlike Mamba-2, the decay exp(delta_t A[d, n]) differs per state index n, so the attention-like chunk form of SSD
(a (Q, Q) segment-sum matrix per chunk) would cost Q times the work for every (d, n); and the "divide by the
cumulative decay" trick overflows (exp(-sum delta A) passes 1e38 within a few dozen steps once trained). Every
step touches a (B, D, N) tensor whatever the algorithm, so on CPU the cost is memory traffic and per-op overhead,
not arithmetic. The reference therefore runs the exact recurrence, one fused multiply-add per step in place, over
chunks of CHUNK_SIZE steps whose (Q, B, D, N) decays and inputs are built with a few vectorised ops while they
are still in cache, and reads y out per chunk. The backward is written by hand (the reverse recurrence
g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}, chunk by chunk from the end) and recomputes each chunk's decays and
states from the state saved at its start, as mamba-ssm's kernel does: autograd would otherwise keep several
(B, D, L, N) tensors, and the time grew faster than L once they left the caches. Only products of decays <= 1
are formed, so nothing can overflow, and the result matches the step-by-step oracle to rounding.

All three functions share mamba-ssm's `selective_scan_fn` signature:
    u (B, D, L), delta (B, D, L), A (D, N), B and C (B, N, L) or (B, G, N, L), D (D,), z (B, D, L),
    delta_bias (D,), prev_state (B, D, N) -> y (B, D, L) [, last_state (B, D, N) in fp32].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.mamba.ssm_ops import fused_kernel, upcast, use_fused


def _prepare(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, delta_bias: Tensor | None,
             delta_softplus: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fp32 delta (B, D, L) after bias and softplus, and B, C as (B, G, N, L); A as (D, N) fp32."""
    delta = upcast(delta)
    if delta_bias is not None:
        delta = delta + upcast(delta_bias)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B = upcast(B) if B.dim() == 4 else upcast(B).unsqueeze(1)  # (B, G, N, L)
    C = upcast(C) if C.dim() == 4 else upcast(C).unsqueeze(1)  # (B, G, N, L)
    return delta, upcast(A), B, C


def _skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D u, times silu(z) when given; (B, D, L) fp32 math."""
    if D is not None:
        y = y + upcast(u) * upcast(D)[:, None]
    if z is not None:
        y = y * F.silu(upcast(z))
    return y


# Steps per chunk. Measured on 2 CPU cores (tools/bench/mamba_kernels.py shapes, B 2, d_inner 256, N 16, L 256 and 1024):
# 16 and 32 were 5-15% slower (more vectorised ops per step), 48-128 equal within noise; 64 keeps each of the
# chunk's four (Q, B, D, N) work tensors at 2 MiB here. A larger B*D only makes the per-op overhead matter less.
CHUNK_SIZE = 64


def _chunk_states(delta: Tensor, du: Tensor, A: Tensor, B: Tensor, state: Tensor, decay: Tensor,
                  states: Tensor) -> Tensor:
    """Fill `decay` with exp(delta A) and `states` with h_t for the Q steps of one chunk, starting from `state`
    (the state before the chunk); returns the last state (a view into `states`). Layout, state index before
    channel so the broadcasts run along contiguous channels: delta, du (Q, B, G, D/G); A (G, N, D/G);
    B (Q, B, G, N); state (B, G, N, D/G); decay, states (Q, B, G, N, D/G)."""
    torch.mul(delta[:, :, :, None, :], A, out=decay).exp_()
    torch.mul(du[:, :, :, None, :], B[..., None], out=states)  # the inputs, overwritten step by step by h_t
    for decay_t, h_t in zip(decay.unbind(0), states.unbind(0)):
        state = h_t.addcmul_(decay_t, state)  # h_t = a_t h_{t-1} + b_t
    return state


def _bmm(x: Tensor, y: Tensor, out: Tensor) -> None:
    """x @ y into out, batched over all leading dimensions."""
    torch.bmm(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]),
              out=out.view(-1, x.shape[-2], y.shape[-1]))


class _ChunkedSelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t and the last state, for delta, du = delta * u (L, B, G, D/G), A (G, N, D/G), B, C
    (L, B, G, N) and the initial state (B, G, N, D/G); saves only the inputs and each chunk's starting state."""

    @staticmethod
    def forward(ctx, delta: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor,
                state: Tensor) -> tuple[Tensor, Tensor]:
        seqlen, Q = delta.shape[0], min(CHUNK_SIZE, delta.shape[0])
        decay_buf = delta.new_empty(Q, *state.shape)  # (Q, B, G, N, D/G), reused by every chunk
        states_buf = torch.empty_like(decay_buf)
        y = torch.empty_like(delta)  # (L, B, G, D/G)
        chunk_starts = []
        for start in range(0, seqlen, Q):
            end = min(start + Q, seqlen)
            chunk_starts.append(state)
            states = states_buf[:end - start]
            state = _chunk_states(delta[start:end], du[start:end], A, B[start:end], state,
                                  decay_buf[:end - start], states).clone()
            _bmm(C[start:end, :, :, None, :], states, y[start:end])  # (Q, B, G, 1, N) @ (Q, B, G, N, D/G)
        ctx.save_for_backward(delta, du, A, B, C, *chunk_starts)
        return y, state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor, grad_last: Tensor) -> tuple[Tensor, ...]:
        delta, du, A, B, C, *chunk_starts = ctx.saved_tensors
        seqlen, Q = delta.shape[0], min(CHUNK_SIZE, delta.shape[0])
        grad_y = grad_y.contiguous()
        grad_delta, grad_du, grad_B, grad_C = (torch.empty_like(t) for t in (delta, du, B, C))
        grad_A = torch.zeros_like(A)
        decay_buf = delta.new_empty(Q, *chunk_starts[0].shape)  # (Q, B, G, N, D/G)
        states_buf, grad_h_buf, work_buf = (torch.empty_like(decay_buf) for _ in range(3))
        carry = grad_last  # dLoss/dh at the end of the current chunk, from the steps after it
        for index in reversed(range(len(chunk_starts))):
            start = index * Q
            end = min(start + Q, seqlen)
            n = end - start
            decay, states, grad_h, work = decay_buf[:n], states_buf[:n], grad_h_buf[:n], work_buf[:n]
            state_in = chunk_starts[index]
            _chunk_states(delta[start:end], du[start:end], A, B[start:end], state_in, decay, states)
            # g_t = dLoss/dh_t = C_t gy_t + a_{t+1} g_{t+1}
            torch.mul(grad_y[start:end, :, :, None, :], C[start:end, ..., None], out=grad_h)
            grad_h[-1] += carry
            for t in range(n - 2, -1, -1):
                grad_h[t].addcmul_(decay[t + 1], grad_h[t + 1])
            carry = decay[0] * grad_h[0]
            _bmm(grad_y[start:end, :, :, None, :], states.transpose(-1, -2), grad_C[start:end])  # sum over D/G
            _bmm(B[start:end, :, :, None, :], grad_h, grad_du[start:end])  # b_t = du_t B_t: sum over N
            _bmm(du[start:end, :, :, None, :], grad_h.transpose(-1, -2), grad_B[start:end])  # sum over D/G
            # dLoss/d(delta_t A) = g_t a_t h_{t-1}
            grad_dA = torch.mul(grad_h, decay, out=work)
            grad_dA[0] *= state_in
            grad_dA[1:] *= states[:-1]
            torch.sum(torch.mul(grad_dA, A, out=grad_h), -2, out=grad_delta[start:end])
            grad_A += torch.mul(grad_dA, delta[start:end, :, :, None, :], out=grad_h).sum((0, 1))
        return grad_delta, grad_du, grad_A, grad_B, grad_C, carry


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                       return_last_state: bool = False,
                       prev_state: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked selective scan (fp32 math): the CPU path and the oracle for the CUDA kernel."""
    batch, dim, seqlen = u.shape
    delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    groups, dstate = B.shape[1], B.shape[2]
    per_group = dim // groups

    def steps_first(t: Tensor) -> Tensor:  # (B, D, L) -> (L, B, G, D/G)
        return t.view(batch, groups, per_group, seqlen).permute(3, 0, 1, 2).contiguous()

    state = (delta.new_zeros(batch, groups, dstate, per_group) if prev_state is None
             else upcast(prev_state).view(batch, groups, per_group, dstate).transpose(-1, -2).contiguous())
    y, state = _ChunkedSelectiveScan.apply(
        steps_first(delta), steps_first(delta * upcast(u)),
        A.view(groups, per_group, dstate).transpose(-1, -2).contiguous(),  # (G, N, D/G)
        B.permute(3, 0, 1, 2).contiguous(), C.permute(3, 0, 1, 2).contiguous(),  # (L, B, G, N)
        state)  # y (L, B, G, D/G), state (B, G, N, D/G)
    y = y.permute(1, 2, 3, 0).reshape(batch, dim, seqlen)  # (B, D, L)
    y = _skip_and_gate(y, u, D, z).to(u.dtype)
    return (y, state.transpose(-1, -2).reshape(batch, dim, dstate)) if return_last_state else y


def selective_scan_stepwise_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                D: Tensor | None = None, z: Tensor | None = None,
                                delta_bias: Tensor | None = None, delta_softplus: bool = False,
                                return_last_state: bool = False,
                                prev_state: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The recurrence one step at a time over unbind() views: the oracle for the chunked scan."""
    batch, dim, seqlen = u.shape
    delta, A, B, C = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    per_group = dim // B.shape[1]
    decay = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # (B, D, L, N)
    Bd = B.repeat_interleave(per_group, dim=1)  # (B, D, N, L)
    Cd = C.repeat_interleave(per_group, dim=1)  # (B, D, N, L)
    inputs = (delta * upcast(u)).unsqueeze(-1) * Bd.transpose(-1, -2)  # (B, D, L, N)
    state = delta.new_zeros(batch, dim, A.shape[1]) if prev_state is None else upcast(prev_state)
    ys = []
    for decay_t, input_t, C_t in zip(decay.unbind(2), inputs.unbind(2), Cd.unbind(3)):
        state = decay_t * state + input_t  # (B, D, N)
        ys.append((state * C_t).sum(-1))  # (B, D)
    y = _skip_and_gate(torch.stack(ys, dim=-1), u, D, z).to(u.dtype)  # (B, D, L)
    return (y, state) if return_last_state else y


def selective_scan_fused(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                         z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                         return_last_state: bool = False,
                         prev_state: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's CUDA `selective_scan_fn` (nvcc-built `selective_scan_cuda`). Older mamba-ssm releases take no
    prev_state; it is passed only when given."""
    kwargs = {} if prev_state is None else {"prev_state": prev_state}
    return fused_kernel("selective_scan_fn")(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                             return_last_state, **kwargs)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, prev_state: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Fused on CUDA when the kernel imported, the chunked reference otherwise."""
    fn = selective_scan_fused if use_fused("selective_scan_fn", u) else selective_scan_ref
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, prev_state)
