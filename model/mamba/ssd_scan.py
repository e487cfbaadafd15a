"""Mamba-2's structured state-space duality (SSD) scan: fused Triton kernel and chunked PyTorch reference.

The recurrence, per head h (scalar decay per head, Dao & Gu 2024, arXiv:2405.21060, section 3):
    state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T        state (P, N), x_t (P,), B_t, C_t (N,)
    y_t     = state_t C_t + D x_t
Because the decay is a scalar per head, the sequence splits into chunks of Q steps (section 6, "the SSD
algorithm"): inside a chunk the output is a masked, attention-like matrix product (L o C B^T) X; between chunks
only the (P, N) states are passed on, with one step per chunk. That costs O(L Q) instead of a Python loop of L
steps, and is what the Triton kernel computes (mamba_ssm/ops/triton/ssd_combined.py), chunk for chunk.

All three functions share mamba-ssm's `mamba_chunk_scan_combined` signature (minus its varlen arguments):
    x (B, L, H, P), dt (B, L, H), A (H,), B and C (B, L, G, N), chunk_size, D (H,) or (H, P), z (B, L, H, P),
    dt_bias (H,), initial_states (B, H, P, N) -> y (B, L, H, P) [, final_states (B, H, P, N) in fp32].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.mamba.ssm_ops import (causal_conv1d, causal_conv1d_ref, fused_kernel, rmsnorm_gated, rmsnorm_gated_ref, upcast,
                                 use_fused)

_NO_LIMIT = (0.0, float("inf"))


def _discretize_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool,
                   dt_limit: tuple[float, float]) -> Tensor:
    """The step sizes dt (B, L, H) in fp32: + bias, softplus, clamp, in mamba-ssm's order."""
    dt = upcast(dt)
    if dt_bias is not None:
        dt = dt + upcast(dt_bias)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != _NO_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D x, times silu(z) when given; y, x, z (B, L, H, P) fp32 math."""
    if D is not None:
        D = upcast(D) if D.dim() == 2 else upcast(D)[:, None]  # (H, P) or (H, 1)
        y = y + upcast(x) * D
    if z is not None:
        y = y * F.silu(upcast(z))
    return y


def ssd_chunk_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                       D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                       initial_states: Tensor | None = None, dt_softplus: bool = False,
                       dt_limit: tuple[float, float] = _NO_LIMIT,
                       return_final_states: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD in PyTorch (fp32 math): the CPU path and the test oracle for the Triton kernel."""
    batch, seqlen, heads, headdim = x.shape
    groups, dstate = B.shape[2], B.shape[3]
    per_group = heads // groups
    Q = min(chunk_size, seqlen)
    chunks = -(-seqlen // Q)
    pad = chunks * Q - seqlen

    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # (B, L, H)
    xdt = upcast(x) * dt.unsqueeze(-1)  # (B, L, H, P): the input scaled by its step, dt_t x_t
    log_decay = dt * upcast(A)  # (B, L, H): log of exp(dt A), <= 0
    Bf, Cf = upcast(B), upcast(C)
    if pad:  # zero steps at the end: decay exp(0) = 1 and no input, so the final state passes through unchanged
        xdt, log_decay = F.pad(xdt, (0, 0, 0, 0, 0, pad)), F.pad(log_decay, (0, 0, 0, pad))
        Bf, Cf = F.pad(Bf, (0, 0, 0, 0, 0, pad)), F.pad(Cf, (0, 0, 0, 0, 0, pad))

    # Chunked layouts; heads split as (G, H/G) so that B and C are shared by their group without copies.
    X = xdt.view(batch, chunks, Q, groups, per_group, headdim).permute(0, 1, 3, 4, 2, 5)  # (B, c, G, H/G, Q, P)
    Bc = Bf.view(batch, chunks, Q, groups, dstate).transpose(2, 3)  # (B, c, G, Q, N)
    Cc = Cf.view(batch, chunks, Q, groups, dstate).transpose(2, 3)  # (B, c, G, Q, N)
    cum = log_decay.view(batch, chunks, Q, groups, per_group).permute(0, 1, 3, 4, 2).cumsum(-1)  # (B, c, G, H/G, Q)

    # 1. Inside each chunk (the diagonal blocks): y_i = sum_{j<=i} exp(cum_i - cum_j) (C_i . B_j) dt_j x_j.
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    segment = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf"))  # (B, c, G, H/G, Q, Q)
    scores = (Cc @ Bc.transpose(-1, -2)).unsqueeze(3)  # (B, c, G, 1, Q, Q)
    y = (torch.exp(segment) * scores) @ X  # (B, c, G, H/G, Q, P)

    # 2. The state each chunk adds, from a zero start: sum_j exp(cum_last - cum_j) dt_j x_j B_j^T.
    to_end = torch.exp(cum[..., -1:] - cum).unsqueeze(-1)  # (B, c, G, H/G, Q, 1)
    Xw = (X * to_end).transpose(-1, -2).reshape(batch, chunks, groups, per_group * headdim, Q)
    chunk_states = (Xw @ Bc).view(batch, chunks, groups, per_group, headdim, dstate)  # (B, c, G, H/G, P, N)

    # 3. Pass states between chunks, one step per chunk (sequential, like the kernel's state passing).
    chunk_decay = torch.exp(cum[..., -1])[..., None, None]  # (B, c, G, H/G, 1, 1)
    if initial_states is None:
        state = xdt.new_zeros(batch, groups, per_group, headdim, dstate)
    else:
        state = upcast(initial_states).view(batch, groups, per_group, headdim, dstate)
    starts = []
    for decay_c, added_c in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
        starts.append(state)
        state = decay_c * state + added_c  # (B, G, H/G, P, N)
    start_states = torch.stack(starts, dim=1)  # (B, c, G, H/G, P, N)

    # 4. Each position reads its chunk's start state: y_i += exp(cum_i) C_i . state_start.
    S = start_states.view(batch, chunks, groups, per_group * headdim, dstate).transpose(-1, -2)  # (B,c,G,N,HP)
    y_off = (Cc @ S).view(batch, chunks, groups, Q, per_group, headdim).transpose(3, 4)  # (B, c, G, H/G, Q, P)
    y = y + y_off * torch.exp(cum).unsqueeze(-1)

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(batch, chunks * Q, heads, headdim)[:, :seqlen]  # (B, L, H, P)
    y = _skip_and_gate(y, x, D, z).to(x.dtype)
    if return_final_states:
        return y, state.reshape(batch, heads, headdim, dstate)
    return y


def ssd_scan_stepwise_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                          D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                          initial_states: Tensor | None = None, dt_softplus: bool = False,
                          dt_limit: tuple[float, float] = _NO_LIMIT,
                          return_final_states: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The recurrence one step at a time (chunk_size unused): the oracle for the chunked scan. Iterates over
    unbind() views; slicing x[:, t] instead would build a full-size zero gradient per step in the backward."""
    batch, seqlen, heads, headdim = x.shape
    per_group = heads // B.shape[2]
    dt = _discretize_dt(dt, dt_bias, dt_softplus, dt_limit)  # (B, L, H)
    decay = torch.exp(dt * upcast(A))[..., None, None]  # (B, L, H, 1, 1)
    xdt = (upcast(x) * dt.unsqueeze(-1)).unsqueeze(-1)  # (B, L, H, P, 1)
    Bh = upcast(B).repeat_interleave(per_group, dim=2).unsqueeze(3)  # (B, L, H, 1, N)
    Ch = upcast(C).repeat_interleave(per_group, dim=2).unsqueeze(-1)  # (B, L, H, N, 1)
    state = (xdt.new_zeros(batch, heads, headdim, B.shape[3]) if initial_states is None
             else upcast(initial_states))  # (B, H, P, N)
    ys = []
    for decay_t, xdt_t, B_t, C_t in zip(decay.unbind(1), xdt.unbind(1), Bh.unbind(1), Ch.unbind(1)):
        state = decay_t * state + xdt_t * B_t  # (B, H, P, N)
        ys.append((state @ C_t).squeeze(-1))  # (B, H, P)
    y = _skip_and_gate(torch.stack(ys, dim=1), x, D, z).to(x.dtype)  # (B, L, H, P)
    return (y, state) if return_final_states else y


def ssd_chunk_scan_fused(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                         D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                         initial_states: Tensor | None = None, dt_softplus: bool = False,
                         dt_limit: tuple[float, float] = _NO_LIMIT,
                         return_final_states: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's Triton `mamba_chunk_scan_combined` (CUDA only)."""
    return fused_kernel("mamba_chunk_scan_combined")(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states)


def ssd_chunk_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                   D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                   initial_states: Tensor | None = None, dt_softplus: bool = False,
                   dt_limit: tuple[float, float] = _NO_LIMIT,
                   return_final_states: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Fused on CUDA when the kernel imported, the chunked reference otherwise."""
    fn = ssd_chunk_scan_fused if use_fused("mamba_chunk_scan_combined", x) else ssd_chunk_scan_ref
    return fn(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit,
              return_final_states)


# --------------------------------------------------------------------------------------------------------------
# The whole Mamba-2 mixer after in_proj: split -> conv -> SSD -> gated RMSNorm -> out_proj, in one op. mamba-ssm
# trains with this fused form (Mamba2 use_mem_eff_path=True): it keeps only zxbcdt and the scan output for the
# backward and recomputes the rest, the least activation memory of any path.
# Signature: mamba-ssm's `mamba_split_conv1d_scan_combined`; zxbcdt (B, L, 2 Di + 2 G N + H) -> (B, L, d_model).
# --------------------------------------------------------------------------------------------------------------

def _split_conv1d_scan(zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None, dt_bias: Tensor,
                       A: Tensor, D: Tensor, chunk_size: int, activation: str, rmsnorm_weight: Tensor | None,
                       rmsnorm_eps: float, outproj_weight: Tensor | None, outproj_bias: Tensor | None, headdim: int,
                       ngroups: int, norm_before_gate: bool, conv, scan, norm) -> Tensor:
    batch, seqlen, _ = zxbcdt.shape
    heads = D.shape[0]
    d_inner = heads * headdim
    dstate = (conv1d_weight.shape[0] - d_inner) // (2 * ngroups)
    z, xBC, dt = zxbcdt.split([d_inner, d_inner + 2 * ngroups * dstate, heads], dim=-1)
    xBC = conv(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation).transpose(1, 2)  # (B, L, conv_dim)
    x, B, C = xBC.split([d_inner, ngroups * dstate, ngroups * dstate], dim=-1)
    y = scan(x.reshape(batch, seqlen, heads, headdim), dt, A, B.reshape(batch, seqlen, ngroups, dstate),
             C.reshape(batch, seqlen, ngroups, dstate), chunk_size, D=D, z=None if rmsnorm_weight is not None
             else z.reshape(batch, seqlen, heads, headdim), dt_bias=dt_bias, dt_softplus=True)
    y = y.reshape(batch, seqlen, d_inner)  # (B, L, Di)
    if rmsnorm_weight is not None:
        y = norm(y, rmsnorm_weight, z, rmsnorm_eps, d_inner // ngroups, norm_before_gate)
    return F.linear(y, outproj_weight, outproj_bias) if outproj_weight is not None else y


def mamba_split_conv1d_scan_combined_ref(zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None,
                                         dt_bias: Tensor, A: Tensor, D: Tensor, chunk_size: int,
                                         activation: str = "silu", rmsnorm_weight: Tensor | None = None,
                                         rmsnorm_eps: float = 1e-6, outproj_weight: Tensor | None = None,
                                         outproj_bias: Tensor | None = None, headdim: int = 64, ngroups: int = 1,
                                         norm_before_gate: bool = True) -> Tensor:
    """The composition of the reference ops (the oracle for the fused kernel)."""
    return _split_conv1d_scan(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, activation,
                              rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
                              norm_before_gate, causal_conv1d_ref, ssd_chunk_scan_ref, rmsnorm_gated_ref)


def mamba_split_conv1d_scan_combined_fused(zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None,
                                           dt_bias: Tensor, A: Tensor, D: Tensor, chunk_size: int,
                                           activation: str = "silu", rmsnorm_weight: Tensor | None = None,
                                           rmsnorm_eps: float = 1e-6, outproj_weight: Tensor | None = None,
                                           outproj_bias: Tensor | None = None, headdim: int = 64, ngroups: int = 1,
                                           norm_before_gate: bool = True) -> Tensor:
    """mamba-ssm's Triton + causal-conv1d kernel (CUDA only)."""
    return fused_kernel("mamba_split_conv1d_scan_combined")(
        zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, activation=activation,
        rmsnorm_weight=rmsnorm_weight, rmsnorm_eps=rmsnorm_eps, outproj_weight=outproj_weight,
        outproj_bias=outproj_bias, headdim=headdim, ngroups=ngroups, norm_before_gate=norm_before_gate)


def mamba_split_conv1d_scan_combined(zxbcdt: Tensor, conv1d_weight: Tensor, conv1d_bias: Tensor | None,
                                     dt_bias: Tensor, A: Tensor, D: Tensor, chunk_size: int,
                                     activation: str = "silu", rmsnorm_weight: Tensor | None = None,
                                     rmsnorm_eps: float = 1e-6, outproj_weight: Tensor | None = None,
                                     outproj_bias: Tensor | None = None, headdim: int = 64, ngroups: int = 1,
                                     norm_before_gate: bool = True) -> Tensor:
    """The fused kernel when it and causal-conv1d (which it calls) imported; otherwise the composition of the
    per-op dispatchers, so that a Triton-only install still runs the SSD scan and norm fused."""
    args = (zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, activation, rmsnorm_weight, rmsnorm_eps,
            outproj_weight, outproj_bias, headdim, ngroups, norm_before_gate)
    if use_fused("mamba_split_conv1d_scan_combined", zxbcdt) and fused_kernel("causal_conv1d_fn") is not None:
        return mamba_split_conv1d_scan_combined_fused(*args)
    return _split_conv1d_scan(*args, causal_conv1d, ssd_chunk_scan, rmsnorm_gated)
