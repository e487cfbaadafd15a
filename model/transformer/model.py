"""Decoder-only Transformer in one readable file (nanoGPT layout, LLaMA architecture).

Block: x + Attention(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)): pre-norm as in LLaMA (Touvron et al. 2023),
RMSNorm of Zhang & Sennrich 2019 (arXiv:1910.07467).
Attention is grouped-query (Ainslie et al. 2023, arXiv:2305.13245) with rotary position embeddings (Su et al.
2021, arXiv:2104.09864; the rotation and its reference are model/transformer/rotary.py) through `F.scaled_dot_product_attention`,
so CUDA gets FlashAttention and the CPU gets its own kernels; `reference_attention` is the plain-PyTorch twin the
tests compare against. No biases anywhere.
Needs torch >= 2.5 (nn.RMSNorm since 2.4, SDPA's enable_gqa since 2.5).
Shapes: B batch, T time, C = d_model, H query heads, K key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.block_checkpointing import BlockCheckpointing
from model.config import ModelConfig
from model.losses import lm_head_and_loss
from model import sequence_parallel
from model.partitioned_init import gathered_for_init
from model.tiling import mlp_tiles, tiled_swiglu
from model.transformer.rotary import apply_rotary_fused
from model.sampling import decode


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE (Su et al. 2021), kept in fp32 whatever dtype the model is cast to.

    Pairing is half-split (channel i with i + D/2, as in GPT-NeoX and Hugging Face LLaMA), so LLaMA weights in
    HF layout load without permuting wq/wk. The tables are non-persistent buffers: rebuilt, never checkpointed.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables()
        self.register_buffer("cos", cos, persistent=False)  # (T_max, D/2)
        self.register_buffer("sin", sin, persistent=False)  # (T_max, D/2)

    def _tables(self) -> tuple[Tensor, Tensor]:
        # Angles in float64 on the CPU: at position 4096 an fp32 angle is already ~1e-4 rad off.
        inv_freq = self.theta ** -(torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv_freq)  # (T_max, D/2)
        return angles.cos().float(), angles.sin().float()

    def _apply(self, fn, recurse=True):
        # .half()/.bfloat16() (DeepSpeed's fp16/bf16 modes) would round the tables, and .to_empty() would leave
        # them uninitialised (nothing restores a non-persistent buffer): rebuild them in fp32 on the new device.
        super()._apply(fn, recurse)
        cos, sin = self._tables()
        self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)
        return self


def _gqa_reaches_fused_kernel(q: Tensor, attn_mask: Tensor | None) -> bool:
    # On CUDA, enable_gqa (torch >= 2.5) is served by FlashAttention only; any other CUDA backend falls back to the
    # slow math kernel (pytorch/pytorch#139586), where repeating the K/V heads lets efficient/cuDNN kernels run.
    # The CPU flash kernel takes grouped heads itself: 13% faster than repeating them (tiny's attention, fwd+bwd,
    # docs/machine_notes.md), and the repeated K/V copies are never saved.
    if q.device.type == "cpu":
        return attn_mask is None
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and attn_mask is None
            and q.size(-1) <= 256 and torch.backends.cuda.flash_sdp_enabled())


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, attn_mask: Tensor | None = None,
                            dropout_p: float = 0.0, enable_gqa: bool | None = None) -> Tensor:
    """SDPA over q (B, H, Tq, D) and k, v (B, K, Tk, D) with H a multiple of K; None picks the faster GQA path."""
    if enable_gqa is None:
        enable_gqa = _gqa_reaches_fused_kernel(q, attn_mask)
    if not enable_gqa and k.size(1) != q.size(1):
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, H, Tk, D): query head h reads kv head h // (H/K)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)  # (B, H, Tk, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          enable_gqa=enable_gqa and k.size(1) != q.size(1))


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, attn_mask: Tensor | None = None,
                        dropout_p: float = 0.0, enable_gqa: bool | None = None) -> Tensor:
    """Plain-PyTorch twin of `grouped_query_attention` (no dropout): softmax(q k^T / sqrt(D) + mask) v."""
    assert dropout_p == 0.0, "the reference has no dropout"
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, Tk, D)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    if is_causal:
        attn_mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).type_as(q)  # (B, H, Tq, D)


class KVCache:
    """Keys and values of every layer for incremental decoding; `pos` positions are filled."""

    def __init__(self, config: ModelConfig, batch_size: int, dtype: torch.dtype, device: torch.device):
        shape = (batch_size, config.kv_heads, config.max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.pos = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, K, T, D) at positions pos..pos+T-1; return all keys and values so far (B, K, pos+T, D)."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.kv_heads, self.head_dim = layer, config.n_heads, config.kv_heads, config.head_dim
        self.wq = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, config.kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, config.kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary_fused(q, cos, sin), apply_rotary_fused(k, cos, sin)  # (B, H, T, D), (B, K, T, D)
        start = kv_cache.pos if kv_cache is not None else 0
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, K, start+T, D)
        # SDPA's is_causal aligns the mask top-left, right only when queries and keys start together; a single
        # decoded token sees every cached key; a chunk after a filled cache needs the bottom-right mask.
        attn_mask = None
        if start > 0 and T > 1:
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)  # (T, start+T)
        if kv_cache is None and sequence_parallel.is_active():
            y = self._sequence_parallel_attention(q, k, v)  # (B, T, H, D): T local tokens, every head
            return self.wo(y.reshape(B, T, C))  # (B, T, C)
        y = grouped_query_attention(q, k, v, is_causal=start == 0 and T > 1, attn_mask=attn_mask,
                                    dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def _sequence_parallel_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Ulysses: q (B, H, T/N, D), k, v (B, K, T/N, D) of this rank's shard -> attention output (B, T/N, H, D).

        DeepSpeed's `DistributedAttention` (deepspeed/sequence/layer.py) does the two all-to-alls around a local
        attention we pass in; ALST's `UlyssesSPAttentionHF` does the same but is bound to transformers' attention
        signature (module.num_key_value_groups, position_ids in kwargs, a transformers version check), which this
        model does not have. What DistributedAttention lacks, replicating key/value heads when there are fewer than
        ranks (it asserts K >= N), is ALST's one line: repeat_interleave by N/K, so that query head h still meets kv
        head h // (H/K) on the rank that holds it."""
        n = sequence_parallel.world_size()
        problem = sequence_parallel.heads_problem(self.n_heads, self.kv_heads, n)
        if problem:
            raise ValueError(f"{problem}: choose training.sequence_parallel dividing model.n_heads and "
                             "model.n_kv_heads (or a multiple of n_kv_heads)")
        if self.kv_heads < n:
            k, v = k.repeat_interleave(n // self.kv_heads, dim=1), v.repeat_interleave(n // self.kv_heads, dim=1)
        group = sequence_parallel.get_sequence_parallel_group()
        if getattr(self, "_ulysses", None) is None or self._ulysses.spg is not group:
            from deepspeed.sequence.layer import DistributedAttention

            dropout = self.dropout

            def local_attention(q: Tensor, k: Tensor, v: Tensor, training: bool) -> Tensor:
                # (B, T, H/N, D) each, the whole sequence for this rank's heads -> (B, T, H/N, D)
                y = grouped_query_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                            dropout_p=dropout if training else 0.0)
                return y.transpose(1, 2)

            # Not a submodule (no parameters; kept out of state_dict and module lists): a plain attribute.
            object.__setattr__(self, "_ulysses", DistributedAttention(
                local_attention, group, scatter_idx=2, gather_idx=1))
        # batch_dim_idx=0: (B, T/N, heads, D) in, scattered over heads and gathered over the sequence.
        return self._ulysses(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, self.training)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), the gated MLP of Shazeer 2020 (arXiv:2002.05202) as used by LLaMA."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(config.d_model, config.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(config.ffn_dim, config.d_model, bias=False)  # down
        # Sequence tiles (model/tiling.py; training.tiled_mlp): False = untiled, N tiles, True = ceil(T / d_model).
        self.tiled: bool | int = False

    def forward(self, x: Tensor) -> Tensor:
        tiles = mlp_tiles(self.tiled, x.size(-2), x.size(-1))
        if tiles > 1:
            return tiled_swiglu(self, x, tiles)  # (B, T, C), hidden (B, T / tiles, ffn_dim) per tile
        return self.untiled(x)

    def untiled(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, C), hidden (B, T, ffn_dim)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        x = x + self.resid_dropout(self.attn(self.attn_norm(x), cos, sin, kv_cache))  # (B, T, C)
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))  # (B, T, C)


class Transformer(BlockCheckpointing, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Training recomputes the first num_checkpointed_blocks blocks in backward (model/block_checkpointing.py).
        self.num_checkpointed_blocks = 0
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight  # Press & Wolf 2017; one (V, C) matrix
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) weights; each block's output projections scaled by 1/sqrt(2 n_layers), since every
        block adds two branches to the residual stream (GPT-2, Radford et al. 2019, section 2.3); norms at one."""
        std, residual_std = self.config.init_std, self.config.init_std / math.sqrt(2 * self.config.n_layers)
        residual_outputs = {id(block.attn.wo) for block in self.layers} | {id(block.mlp.w2) for block in self.layers}
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with gathered_for_init(module.weight):
                    nn.init.normal_(module.weight, std=residual_std if id(module) in residual_outputs else std)
            elif isinstance(module, nn.RMSNorm):
                with gathered_for_init(module.weight):
                    nn.init.ones_(module.weight)

    def _hidden(self, idx: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """Final-norm hidden states (B, T, C) of idx (B, T), positions continuing after kv_cache.pos."""
        B, T = idx.shape
        # Under sequence parallelism idx is this rank's shard: its tokens sit at global positions offset + t.
        start = kv_cache.pos if kv_cache is not None else sequence_parallel.position_offset(T)
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.config.max_seq_len}: "
                             "crop the input or raise max_seq_len")
        cos, sin = self.rope.cos[start:start + T], self.rope.sin[start:start + T]  # (T, D/2) each
        x = self.tok_embeddings(idx)  # (B, T, C)
        for i, block in enumerate(self.layers):
            if kv_cache is None:
                x = self.run_block(i, block, x, cos, sin)  # (B, T, C)
            else:
                x = block(x, cos, sin, kv_cache)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.norm(x)  # (B, T, C)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) for idx (B, T); with targets (B, T), also the mean cross-entropy over all positions.
        On CUDA with targets the loss is chunked (model/losses.py) and the logits, never built whole, are None."""
        return lm_head_and_loss(self._hidden(idx), self.lm_head, targets)  # hidden (B, T, C)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 eos_id: int | None = None, top_p: float | None = None) -> Tensor:
        """Append up to max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy, top_k/top_p filter.

        Each step feeds one token through a KV cache. Once the context holds max_seq_len tokens the window slides:
        the cache is refilled from the last max_seq_len tokens (a full recompute, as nanoGPT does every step).
        Rows that emitted eos_id keep emitting it; generation stops when all rows have.
        """
        cfg = self.config
        cache = KVCache(cfg, idx.size(0), self.lm_head.weight.dtype, idx.device)

        def next_logits(next_id: Tensor, idx: Tensor) -> Tensor:
            if cache.pos < cfg.max_seq_len:
                step_input = next_id  # (B, 1)
            else:
                cache.pos = 0
                step_input = idx[:, -cfg.max_seq_len:]  # (B, max_seq_len)
            return self.lm_head(self._hidden(step_input, cache)[:, -1])  # (B, V)

        logits = self.lm_head(self._hidden(idx[:, -cfg.max_seq_len:], cache)[:, -1])  # (B, V)
        return decode(idx, logits, next_logits, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_k=top_k, eos_id=eos_id, top_p=top_p)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters, a tied matrix counted once. exclude_embeddings drops the token-embedding table, as in
        Kaplan et al. 2020's N (tied, that is also lm_head's matrix); an untied lm_head stays counted."""
        def numel(p: nn.Parameter) -> int:
            return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter holds an empty tensor

        total = sum(numel(p) for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            total -= numel(self.tok_embeddings.weight)
        return total
