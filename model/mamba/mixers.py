"""The two Mamba mixers, with mamba-ssm's parameter names and layouts so weights load unchanged.

Mamba2Mixer: mamba_ssm/modules/mamba2.py (Dao & Gu 2024, arXiv:2405.21060, section 7, Figure 6): one input
projection [z, x, B, C, dt], a short causal conv over [x, B, C], the SSD scan with a scalar decay per head, a
gated RMSNorm, the output projection.
Mamba1Mixer: mamba_ssm/modules/mamba_simple.py (Gu & Dao 2023, arXiv:2312.00752, section 3.4, Figure 3): input
projection [x, z], causal conv over x, x_proj -> [dt (low rank), B, C], dt_proj, the selective scan gated by z,
the output projection.

Each mixer's forward runs a whole sequence (training, prefill) or, given a recurrent state, one token (decode);
the state is (conv_state (B, conv_dim, d_conv), ssm_state), mamba-ssm's inference-cache layout. Both go through
forward so that ZeRO-3's hooks gather the parameters; conv1d and dt_proj are used by the mixer itself, not
through their own forward, so `register_zero3_external_parameters` declares them to ZeRO-3.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import sequence_parallel
from model.config import ModelConfig
from model.mamba.selective_scan import selective_scan
from model.mamba.ssd_scan import mamba_split_conv1d_scan_combined, ssd_chunk_scan
from model.mamba.ssm_ops import (causal_conv1d, causal_conv1d_update, conv_state_from_inputs, fused_kernel, rmsnorm_gated,
                                 selective_state_update, use_fused)

# Initial step sizes are log-uniform in [DT_MIN, DT_MAX], floored at DT_FLOOR (mamba-ssm defaults; Gu & Dao 2023,
# section 3.6 and Appendix: dt in [0.001, 0.1]).
DT_MIN, DT_MAX, DT_FLOOR = 0.001, 0.1, 1e-4
# Mamba-2 draws A per head uniformly from [1, 16] (mamba_ssm Mamba2 A_init_range).
A_INIT_RANGE = (1.0, 16.0)

MixerState = tuple[Tensor, Tensor]


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (parameter `weight`, as mamba-ssm's and transformers' Mamba)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(self.weight.dtype) * self.weight


class GatedRMSNorm(RMSNorm):
    """Mamba-2's norm(x * silu(z)) over groups of d_inner / ngroups channels (mamba-ssm RMSNormGated,
    norm_before_gate=False)."""

    def __init__(self, dim: int, eps: float, group_size: int):
        super().__init__(dim, eps)
        self.group_size = group_size

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return rmsnorm_gated(x, self.weight, z, self.eps, self.group_size, norm_before_gate=False)


def inverse_softplus_dt(size: int | tuple[int, ...]) -> Tensor:
    """dt_bias such that softplus(dt_bias) is log-uniform in [DT_MIN, DT_MAX] (mamba-ssm's dt initialisation)."""
    dt = torch.exp(torch.rand(size) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_FLOOR)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus, pytorch/pytorch#72759


def register_zero3_external_parameters(mixer: nn.Module, children: list[nn.Module]) -> None:
    """Declare the child parameters the mixer reads directly (conv1d's; Mamba-2's norm and out_proj weights, which
    the one-op training path takes; Mamba-1's dt_proj) to ZeRO-3, which otherwise gathers a module's parameters
    only around that module's own forward (DeepSpeed docs, "Registering External Parameters"). A no-op unless the
    mixer was built under deepspeed.zero.Init."""
    params = [p for child in children for p in child.parameters()]
    if not any(hasattr(p, "ds_id") for p in params):
        return
    import deepspeed  # only reached when DeepSpeed built the parameters

    for p in params:
        deepspeed.zero.register_external_parameter(mixer, p)


def _no_weight_decay(*params: nn.Parameter) -> None:
    """Mark parameters as mamba-ssm does: A_log, D and dt biases are excluded from weight decay."""
    for p in params:
        p._no_weight_decay = True  # type: ignore[attr-defined]


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.d_inner = config.expand * config.d_model
        self.headdim, self.ngroups, self.d_state = config.headdim, config.ngroups, config.d_state
        self.nheads = self.d_inner // config.headdim
        self.d_conv, self.chunk_size = config.d_conv, config.chunk_size
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        # Order of the projection: [z, x, B, C, dt] (mamba-ssm).
        self.in_proj = nn.Linear(config.d_model, 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads,
                                 bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.d_conv, groups=self.conv_dim,
                                padding=config.d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, config.norm_eps, group_size=self.d_inner // self.ngroups)
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=False)
        _no_weight_decay(self.dt_bias, self.A_log, self.D)
        register_zero3_external_parameters(self, [self.conv1d, self.norm, self.out_proj])

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        self.dt_bias.copy_(inverse_softplus_dt(self.nheads))
        self.A_log.copy_(torch.empty(self.nheads).uniform_(*A_INIT_RANGE).log())
        self.D.fill_(1.0)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def forward(self, u: Tensor, state: MixerState | None = None,
                return_state: bool = False) -> Tensor | tuple[Tensor, MixerState]:
        """u (B, L, d_model) -> (B, L, d_model) [, the recurrent state after the last position]; with a state, one
        decode step: u (B, d_model) -> (B, d_model), the state updated in place."""
        if state is not None:
            return self._step(u, state)
        batch, seqlen, _ = u.shape
        zxbcdt = self.in_proj(u)  # (B, L, 2 Di + 2 G N + H)
        if not return_state and sequence_parallel.is_active():
            return self._forward_sequence_parallel(zxbcdt)
        A = -torch.exp(self.A_log.float())  # (H,); fp32 so that a bf16 A_log cannot round A to -inf
        if not return_state:  # training: the one-op form, mamba-ssm's memory-efficient path on GPU
            return mamba_split_conv1d_scan_combined(
                zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, A, self.D, self.chunk_size,
                activation="silu", rmsnorm_weight=self.norm.weight, rmsnorm_eps=self.norm.eps,
                outproj_weight=self.out_proj.weight, outproj_bias=self.out_proj.bias, headdim=self.headdim,
                ngroups=self.ngroups, norm_before_gate=False)  # (B, L, d_model)
        z, xBC, dt = self._split(zxbcdt)  # (B, L, Di), (B, L, conv_dim), (B, L, H)
        xBC_t = xBC.transpose(1, 2)  # (B, conv_dim, L)
        xBC = causal_conv1d(xBC_t, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu").transpose(1, 2)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        result = ssd_chunk_scan(
            x.reshape(batch, seqlen, self.nheads, self.headdim), dt, A,
            B.reshape(batch, seqlen, self.ngroups, self.d_state), C.reshape(batch, seqlen, self.ngroups, self.d_state),
            self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True, return_final_states=True)
        y, ssm_state = result
        y = self.norm(y.reshape(batch, seqlen, self.d_inner), z)  # (B, L, Di)
        return self.out_proj(y), (conv_state_from_inputs(xBC_t, self.d_conv), ssm_state)

    def _rank_channels(self, rank: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """What group rank `rank` of n works on: its heads (H/n, contiguous), its channels of [x, B, C] in conv
        order, and those channels plus its dt heads as indices into [x, B, C, dt] (zxbcdt without z). B/C groups
        divide over the ranks or, fewer than ranks, are replicated: heads of a rank never span two groups."""
        heads_per_rank, N = self.nheads // n, self.d_state
        heads = torch.arange(rank * heads_per_rank, (rank + 1) * heads_per_rank)
        groups = torch.arange(rank * self.ngroups // n, rank * self.ngroups // n + max(self.ngroups // n, 1))
        x = (heads[:, None] * self.headdim + torch.arange(self.headdim)).flatten()
        bc = (groups[:, None] * N + torch.arange(N)).flatten()
        conv = torch.cat([x, self.d_inner + bc, self.d_inner + self.ngroups * N + bc])
        return heads, conv, torch.cat([conv, self.conv_dim + heads])

    def _forward_sequence_parallel(self, zxbcdt: Tensor) -> Tensor:
        """Head-sharded Mamba-2 (Megatron-LM's context parallelism for Mamba, NVIDIA/Megatron-LM#1437): zxbcdt
        (B, L/n, .) of this rank's shard -> (B, L/n, d_model).

        The conv and the SSD scan run along the sequence but never mix heads: an all-to-all gives this rank the
        whole sequence of its H/n heads' [x, dt] and its groups' [B, C]; the conv and the scan run unchanged on
        them; a second all-to-all returns y to the sequence shard before the gated norm, which normalises over
        d_inner / ngroups channels and may span heads of several ranks, and out_proj. Always the unfused ops: the
        one-op kernel takes whole [z, x, B, C, dt] rows."""
        n, rank = sequence_parallel.world_size(), sequence_parallel.rank()
        if self.nheads % n or (self.ngroups % n and n % self.ngroups):
            raise ValueError(f"Mamba-2 sequence parallelism deals heads and B/C groups to ranks: {self.nheads} "
                             f"heads and {self.ngroups} groups do not split over {n} ranks; choose "
                             "training.sequence_parallel dividing the head count and dividing or divided by "
                             "model.ngroups")
        z, xbcdt = zxbcdt.split([self.d_inner, self.conv_dim + self.nheads], dim=-1)  # (B, L/n, Di), (B, L/n, .)
        device = zxbcdt.device
        sends = [self._rank_channels(j, n)[2].to(device) for j in range(n)]
        heads, conv, _ = (t.to(device) for t in self._rank_channels(rank, n))
        local = sequence_parallel.sequence_to_channels(xbcdt, sends)  # (B, L, c): the whole sequence, my channels
        xBC, dt = local.split([conv.numel(), heads.numel()], dim=-1)  # (B, L, h P + 2 g N), (B, L, h)
        weight = self.conv1d.weight.squeeze(1).index_select(0, conv)  # (c, d_conv)
        xBC = causal_conv1d(xBC.transpose(1, 2), weight, self.conv1d.bias.index_select(0, conv),
                            "silu").transpose(1, 2)  # (B, L, c)
        batch, seqlen, _ = xBC.shape
        num_heads, num_groups = heads.numel(), max(self.ngroups // n, 1)
        x, B, C = xBC.split([num_heads * self.headdim, num_groups * self.d_state, num_groups * self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float().index_select(0, heads))  # (h,)
        y = ssd_chunk_scan(
            x.reshape(batch, seqlen, num_heads, self.headdim), dt, A,
            B.reshape(batch, seqlen, num_groups, self.d_state), C.reshape(batch, seqlen, num_groups, self.d_state),
            self.chunk_size, D=self.D.index_select(0, heads), dt_bias=self.dt_bias.index_select(0, heads),
            dt_softplus=True)  # (B, L, h, P)
        y = sequence_parallel.channels_to_sequence(y.reshape(batch, seqlen, num_heads * self.headdim))  # (B, L/n, Di)
        return self.out_proj(self.norm(y, z))  # (B, L/n, d_model)

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> MixerState:
        conv_state = torch.zeros(batch, self.conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32)
        return conv_state, ssm_state

    def _step(self, u: Tensor, state: MixerState) -> Tensor:
        conv_state, ssm_state = state
        batch = u.size(0)
        z, xBC, dt = self._split(self.in_proj(u))  # (B, Di), (B, conv_dim), (B, H)
        xBC = causal_conv1d_update(xBC, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        H, P, N = self.nheads, self.headdim, self.d_state
        A = -torch.exp(self.A_log.float())[:, None, None].expand(H, P, N)  # (H, P, N)
        y = selective_state_update(
            ssm_state, x.reshape(batch, H, P), dt[:, :, None].expand(batch, H, P), A,
            B.reshape(batch, self.ngroups, N), C.reshape(batch, self.ngroups, N), D=self.D[:, None].expand(H, P),
            dt_bias=self.dt_bias[:, None].expand(H, P), dt_softplus=True)  # (B, H, P)
        return self.out_proj(self.norm(y.reshape(batch, self.d_inner), z))  # (B, d_model)


class Mamba1Mixer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.d_inner = config.expand * config.d_model
        self.d_state, self.d_conv = config.d_state, config.d_conv
        self.dt_rank = config.dt_rank or math.ceil(config.d_model / 16)
        self.in_proj = nn.Linear(config.d_model, 2 * self.d_inner, bias=False)  # [x, z]
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, config.d_conv, groups=self.d_inner,
                                padding=config.d_conv - 1, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)  # [dt, B, C]
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=False)
        _no_weight_decay(self.A_log, self.D, self.dt_proj.bias)
        register_zero3_external_parameters(self, [self.conv1d, self.dt_proj, self.x_proj, self.out_proj])

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        # S4D-real initialisation A[d, n] = -(n + 1) (Gu & Dao 2023, section 3.6), stored as its log.
        self.A_log.copy_(torch.arange(1, self.d_state + 1, dtype=torch.float32).log().expand(self.d_inner, -1))
        self.D.fill_(1.0)
        std = self.dt_rank ** -0.5  # mamba-ssm dt_init="random", dt_scale=1
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner))

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """dt (low rank -> d_inner, without bias), B, C from the conv output x (..., Di)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C  # bias goes into the scan as delta_bias, as in mamba-ssm

    def forward(self, u: Tensor, state: MixerState | None = None,
                return_state: bool = False) -> Tensor | tuple[Tensor, MixerState]:
        """u (B, L, d_model) -> (B, L, d_model) [, the recurrent state after the last position]; with a state, one
        decode step: u (B, d_model) -> (B, d_model), the state updated in place."""
        if state is not None:
            return self._step(u, state)
        if not return_state and sequence_parallel.is_active():
            return self._forward_sequence_parallel(self.in_proj(u))
        xz = self.in_proj(u).transpose(1, 2)  # (B, 2 Di, L)
        if not return_state and use_fused("mamba_inner_fn", xz):
            return self._forward_fused(xz)
        x, z = xz.chunk(2, dim=1)  # (B, Di, L) each
        x_conv = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")  # (B, Di, L)
        dt, B, C = self._ssm_inputs(x_conv.transpose(1, 2))  # (B, L, Di), (B, L, N), (B, L, N)
        A = -torch.exp(self.A_log.float())  # (Di, N)
        result = selective_scan(x_conv, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(),
                                z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                                return_last_state=return_state)
        y, ssm_state = result if return_state else (result, None)
        out = self.out_proj(y.transpose(1, 2))  # (B, L, d_model)
        if not return_state:
            return out
        return out, (conv_state_from_inputs(x, self.d_conv), ssm_state)

    def _forward_sequence_parallel(self, xz: Tensor) -> Tensor:
        """Channel-sharded Mamba-1: xz (B, L/n, 2 Di) of this rank's shard -> (B, L/n, d_model).

        The conv and the selective scan never mix channels, so an all-to-all gives this rank the whole sequence of
        Di/n channels of x and z. x_proj does mix channels (dt, B, C come from all of them): each rank projects its
        channels with its columns of the weight and one all-reduce sums the parts. dt_proj, the scan and the gate
        then run on this rank's channels, and a second all-to-all returns y to the sequence shard for out_proj."""
        n, rank = sequence_parallel.world_size(), sequence_parallel.rank()
        if self.d_inner % n:
            raise ValueError(f"Mamba-1 sequence parallelism deals d_inner = {self.d_inner} channels to {n} ranks: "
                             "choose training.sequence_parallel dividing expand * d_model")
        width = self.d_inner // n
        sends = [torch.cat([torch.arange(j * width, (j + 1) * width),
                            self.d_inner + torch.arange(j * width, (j + 1) * width)]).to(xz.device) for j in range(n)]
        mine = torch.arange(rank * width, (rank + 1) * width, device=xz.device)
        x, z = sequence_parallel.sequence_to_channels(xz, sends).transpose(1, 2).chunk(2, dim=1)  # (B, c, L) each
        x_conv = causal_conv1d(x, self.conv1d.weight.squeeze(1).index_select(0, mine),
                               self.conv1d.bias.index_select(0, mine), "silu")  # (B, c, L)
        partial = F.linear(x_conv.transpose(1, 2), self.x_proj.weight.index_select(1, mine))  # (B, L, R + 2 N)
        dt, B, C = sequence_parallel.all_reduce_sum(partial).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight.index_select(0, mine))  # (B, L, c)
        A = -torch.exp(self.A_log.float().index_select(0, mine))  # (c, N)
        y = selective_scan(x_conv, dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                           self.D.float().index_select(0, mine), z=z,
                           delta_bias=self.dt_proj.bias.float().index_select(0, mine), delta_softplus=True)  # (B, c, L)
        return self.out_proj(sequence_parallel.channels_to_sequence(y.transpose(1, 2)))  # (B, L/n, d_model)

    def _forward_fused(self, xz: Tensor) -> Tensor:
        """The training path in one autograd op: mamba-ssm's mamba_inner_fn (conv, x_proj, dt_proj, selective scan,
        gate and out_proj fused; it recomputes the conv output and delta in backward instead of saving them), called
        as mamba_ssm/modules/mamba_simple.py does. The unfused lines of `forward` are its reference."""
        A = -torch.exp(self.A_log.float())  # (Di, N)
        out = fused_kernel("mamba_inner_fn")(
            xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight, self.out_proj.weight,
            self.out_proj.bias, A, None, None, self.D.float(), delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True)
        return out  # (B, L, d_model)

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> MixerState:
        conv_state = torch.zeros(batch, self.d_inner, self.d_conv, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return conv_state, ssm_state

    def _step(self, u: Tensor, state: MixerState) -> Tensor:
        conv_state, ssm_state = state
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, Di) each
        x = causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        dt, B, C = self._ssm_inputs(x)  # (B, Di), (B, N), (B, N)
        A = -torch.exp(self.A_log.float())  # (Di, N)
        y = selective_state_update(ssm_state, x, dt, A, B, C, D=self.D, z=z, dt_bias=self.dt_proj.bias,
                                   dt_softplus=True)  # (B, Di)
        return self.out_proj(y)  # (B, d_model)
