"""Hybrid language model: Mamba-2 and grouped-query attention layers in one stack, each followed by a SwiGLU MLP.

The layout of transformers' BambaForCausalLM (IBM's Bamba, the same block as Granite-4.0-H and, without the MLP
after every mixer, Nemotron-H): a layer is x + mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)), the mixer a Mamba-2
SSD (Dao & Gu 2024, arXiv:2405.21060) or causal self-attention with rotary embeddings, chosen per layer by
`model.layer_pattern` (model/hybrid/config.py). Every piece is another family's class, reused unchanged:
    Mamba2Mixer           model/mamba/mixers.py (its fused mamba-ssm kernels on CUDA, the PyTorch SSD on CPU)
    CausalSelfAttention   model/transformer/model.py  (SDPA: FlashAttention on CUDA), RotaryEmbedding's tables
    SwiGLU, RMSNorm       model/transformer/model.py, torch.nn
Parameter names (model/hybrid/hf.py maps them to Bamba's):
    tok_embeddings                 (V, C)
    layers.N.mixer_norm            RMSNorm before the mixer
    layers.N.mamba.* | layers.N.attn.*
    layers.N.mlp_norm, layers.N.mlp.{w1,w2,w3}
    norm, lm_head                  final RMSNorm, (V, C) tied to the embedding by default
Decoding keeps both caches: a KV cache for the attention layers (slot = the layer's rank among attention layers,
so Mamba layers hold no K/V) and a conv + SSM state per Mamba layer, constant in size.
The residual stream stays in the model's dtype, as in Bamba (the Mamba family keeps it in fp32, as mamba-ssm).
Shapes: B batch, T time, C = d_model, V vocabulary.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.block_checkpointing import BlockCheckpointing
from model.config import ModelConfig
from model.hybrid.config import ATTENTION, layer_kinds
from model.losses import lm_head_and_loss
from model import sequence_parallel
from model.mamba.mixers import GatedRMSNorm, Mamba2Mixer, MixerState
from model.partitioned_init import gathered_for_init
from model.sampling import decode
from model.transformer.model import CausalSelfAttention, KVCache, RotaryEmbedding, SwiGLU


class HybridBlock(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)); the mixer is Mamba-2 ('M') or attention ('A')."""

    def __init__(self, config: ModelConfig, kind: str, attention_slot: int):
        super().__init__()
        self.kind = kind
        self.mixer_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        if kind == ATTENTION:
            self.attn = CausalSelfAttention(config, attention_slot)  # its KV-cache slot, not the layer index
        else:
            self.mamba = Mamba2Mixer(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    @property
    def mixer(self) -> nn.Module:
        return self.attn if self.kind == ATTENTION else self.mamba

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Training and plain evaluation: x (B, T, C) -> (B, T, C)."""
        h = self.mixer_norm(x)  # (B, T, C)
        mixed = self.attn(h, cos, sin) if self.kind == ATTENTION else self.mamba(h)  # (B, T, C)
        x = x + self.resid_dropout(mixed)
        return x + self.resid_dropout(self.mlp(self.mlp_norm(x)))  # (B, T, C)

    def forward_cached(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache,
                       state: MixerState | None) -> tuple[Tensor, MixerState | None]:
        """Decoding: x (B, T, C) through the KV cache (attention) or the recurrent state (Mamba). A Mamba layer
        given no state runs the chunked scan over the T positions and returns its state after them (prefill);
        given one, x holds a single position (T = 1) and the state is updated in place."""
        h = self.mixer_norm(x)  # (B, T, C)
        if self.kind == ATTENTION:
            mixed = self.attn(h, cos, sin, kv_cache)  # (B, T, C)
        elif state is None:
            mixed, state = self.mamba(h, return_state=True)  # (B, T, C), state after position T - 1
        else:
            mixed = self.mamba(h[:, 0], state=state)[:, None]  # (B, 1, C)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state  # (B, T, C)


class HybridLM(BlockCheckpointing, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Training recomputes the first num_checkpointed_blocks blocks in backward (model/block_checkpointing.py).
        self.num_checkpointed_blocks = 0
        self.layer_kinds = layer_kinds(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        # The Transformer's own tables (model/transformer/model.py), built once for the attention layers.
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        slots = [self.layer_kinds[:i].count(ATTENTION) for i in range(config.n_layers)]
        self.layers = nn.ModuleList(HybridBlock(config, kind, slot) for kind, slot in zip(self.layer_kinds, slots))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight  # Press & Wolf 2017; one (V, C) matrix
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Linear and embedding weights N(0, init_std), as the Transformer and transformers' Bamba initialise them,
        the residual outputs (attention wo, Mamba out_proj, MLP w2) scaled by 1/sqrt(2 n_layers) since each layer
        adds two branches (GPT-2, Radford et al. 2019, section 2.3); Mamba's conv at PyTorch's default and its SSM
        parameters (A_log, D, dt bias) as Mamba2Mixer defines them (mamba-ssm's); norms at one."""
        std, residual_std = self.config.init_std, self.config.init_std / math.sqrt(2 * self.config.n_layers)
        residual_outputs = {id(block.mixer.wo if block.kind == ATTENTION else block.mamba.out_proj)
                            for block in self.layers} | {id(block.mlp.w2) for block in self.layers}
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with gathered_for_init(module.weight):
                    nn.init.normal_(module.weight, std=residual_std if id(module) in residual_outputs else std)
            elif isinstance(module, nn.Conv1d):
                with gathered_for_init(module.parameters(recurse=False)):
                    module.reset_parameters()
            elif isinstance(module, (nn.RMSNorm, GatedRMSNorm)):
                with gathered_for_init(module.weight):
                    nn.init.ones_(module.weight)
        for block in self.layers:
            if block.kind != ATTENTION:
                with gathered_for_init([block.mamba.dt_bias, block.mamba.A_log, block.mamba.D]):
                    block.mamba.reset_ssm_parameters()

    def _tables(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        if start + length > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + length} tokens exceeds model.max_seq_len="
                             f"{self.config.max_seq_len}: crop the input or raise max_seq_len")
        return self.rope.cos[start:start + length], self.rope.sin[start:start + length]  # (T, D/2) each

    def _hidden(self, idx: Tensor) -> Tensor:
        """Final-norm hidden states (B, T, C) of idx (B, T); under sequence parallelism idx is this rank's shard, at
        global positions from sequence_parallel.position_offset (model/sequence_parallel.py)."""
        cos, sin = self._tables(sequence_parallel.position_offset(idx.size(1)), idx.size(1))
        x = self.tok_embeddings(idx)  # (B, T, C)
        for i, block in enumerate(self.layers):
            x = self.run_block(i, block, x, cos, sin)  # (B, T, C)
        return self.norm(x)  # (B, T, C)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) for idx (B, T); with targets (B, T), also the mean cross-entropy over all positions.
        On CUDA with targets the loss is chunked (model/losses.py) and the logits, never built whole, are None."""
        return lm_head_and_loss(self._hidden(idx), self.lm_head, targets)  # hidden (B, T, C)

    # ---- incremental decoding --------------------------------------------------------------------------------

    def allocate_kv_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """An empty KV cache with one slot per attention layer (the Transformer's KVCache, sized for them only)."""
        num_attention = max(1, self.layer_kinds.count(ATTENTION))
        # model_copy does not validate: a Transformer-shaped view with n_layers = the attention layers.
        return KVCache(self.config.model_copy(update={"n_layers": num_attention}), batch, dtype, device)

    @torch.no_grad()
    def prefill(self, idx: Tensor, kv_cache: KVCache) -> tuple[Tensor, list[MixerState | None]]:
        """Last-position logits (B, V) of the prompt idx (B, T) in one parallel pass, filling kv_cache (from
        position 0) and returning each Mamba layer's state after the prompt (None for attention layers)."""
        kv_cache.pos = 0
        cos, sin = self._tables(0, idx.size(1))
        x = self.tok_embeddings(idx)  # (B, T, C)
        states = []
        for block in self.layers:
            x, state = block.forward_cached(x, cos, sin, kv_cache, None)
            states.append(state)
        kv_cache.pos = idx.size(1)
        return self.lm_head(self.norm(x)[:, -1]), states  # (B, V)

    @torch.no_grad()
    def step(self, token: Tensor, kv_cache: KVCache, states: list[MixerState | None]) -> Tensor:
        """Logits (B, V) of one token per row, token (B, 1), at position kv_cache.pos; both caches advance."""
        cos, sin = self._tables(kv_cache.pos, 1)
        x = self.tok_embeddings(token)  # (B, 1, C)
        for block, state in zip(self.layers, states):
            x, _ = block.forward_cached(x, cos, sin, kv_cache, state)
        kv_cache.pos += 1
        return self.lm_head(self.norm(x)[:, -1])  # (B, V)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 eos_id: int | None = None, top_p: float | None = None) -> Tensor:
        """Append up to max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy, top_k/top_p filter.

        The prompt runs once in parallel; then each token is one step: attention layers read their KV cache,
        Mamba layers advance their state. The attention layers' positions end at max_seq_len: there the window
        slides, both caches refilled from the last max_seq_len tokens (a full recompute, as the Transformer does).
        Rows that emitted eos_id keep emitting it; generation stops when all rows have.
        """
        cfg = self.config
        cache = self.allocate_kv_cache(idx.size(0), idx.device, self.lm_head.weight.dtype)
        logits, states = self.prefill(idx[:, -cfg.max_seq_len:], cache)

        def next_logits(next_id: Tensor, idx: Tensor) -> Tensor:
            nonlocal states
            if cache.pos < cfg.max_seq_len:
                return self.step(next_id, cache, states)
            logits, states = self.prefill(idx[:, -cfg.max_seq_len:], cache)
            return logits

        return decode(idx, logits, next_logits, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_k=top_k, eos_id=eos_id, top_p=top_p)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters, a tied matrix counted once. exclude_embeddings drops the token-embedding table (tied, that
        is also lm_head's matrix); an untied lm_head stays counted."""
        def numel(p: nn.Parameter) -> int:
            return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter holds an empty tensor

        total = sum(numel(p) for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            total -= numel(self.tok_embeddings.weight)
        return total
