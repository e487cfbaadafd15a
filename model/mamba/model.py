"""Mamba language model: Mamba-2 (SSD, the default) or Mamba-1 (selective scan) mixers in pre-norm blocks.

Layout and parameter names follow mamba-ssm's MambaLMHeadModel (mamba_ssm/models/mixer_seq_simple.py), so a
state dict moves between this model, mamba-ssm and, after `to_transformers_state_dict`, transformers'
MambaForCausalLM / Mamba2ForCausalLM:
    backbone.embedding             (V, C)
    backbone.layers.N.norm         RMSNorm before the mixer
    backbone.layers.N.mixer.*      in_proj, conv1d, [x_proj, dt_proj (Mamba-1)], dt_bias (Mamba-2), A_log, D,
                                   [norm (Mamba-2 gated RMSNorm)], out_proj
    backbone.norm_f                final RMSNorm
    lm_head                        (V, C), tied to the embedding by default
There are no positional embeddings and no attention: the mixers carry order through their recurrence, so
generation keeps a constant-size state per layer (conv: d_conv inputs, SSM: N values per channel) and costs the
same for every new token, however long the context.

The residual stream is kept in fp32, as mamba-ssm's residual_in_fp32=True: in bf16 training each block adds a
bf16 mixer output to an fp32 sum.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.block_checkpointing import BlockCheckpointing
from model.config import ModelConfig
from model.losses import chunked_linear_cross_entropy, use_chunked_loss
from model.mamba.mixers import Mamba1Mixer, Mamba2Mixer, MixerState, RMSNorm
from model.partitioned_init import gathered_for_init
from model.sampling import decode


class MambaBlock(nn.Module):
    """x + dropout(mixer(norm(x))): mamba-ssm's Block with fused_add_norm, written unfused."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = Mamba2Mixer(config) if config.ssm_type == "mamba2" else Mamba1Mixer(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, state: MixerState | None = None,
                return_state: bool = False) -> Tensor | tuple[Tensor, MixerState]:
        """x (B, T, C) fp32 -> (B, T, C) [, the state after it]; with a state, one decode step on x (B, C)."""
        out = self.mixer(self.norm(x), state=state, return_state=return_state)
        if return_state:
            out, new_state = out
            return x + out.float(), new_state
        return x + self.dropout(out).float()


class MambaBackbone(nn.Module):
    """Holds the parameters under mamba-ssm's `backbone.` names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MambaBlock(config) for _ in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)


class MambaLM(BlockCheckpointing, nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.ssm_type == "mamba2" and (config.expand * config.d_model) % config.headdim:
            raise ValueError(f"expand * d_model = {config.expand * config.d_model} must be divisible by "
                             f"model.headdim ({config.headdim})")
        self.config = config
        # Training recomputes the first num_checkpointed_blocks blocks in backward (model/block_checkpointing.py).
        self.num_checkpointed_blocks = 0
        self.backbone = MambaBackbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba-ssm's initialisation (mixer_seq_simple._init_weights with rescale_prenorm_residual=True):
        linear and conv layers at PyTorch's default, linear biases zero, embedding N(0, init_std), each out_proj
        divided by sqrt(n_layers) (GPT-2's residual scaling; one residual branch per block), and the SSM
        parameters A_log, D and dt bias as each mixer defines them."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, RMSNorm)):
                with gathered_for_init(module.parameters(recurse=False)):
                    if isinstance(module, RMSNorm):
                        module.weight.fill_(1.0)
                        continue
                    module.reset_parameters()
                    if isinstance(module, nn.Linear) and module.bias is not None:
                        nn.init.zeros_(module.bias)
        with gathered_for_init([self.backbone.embedding.weight]):  # after lm_head's reset: a tied lm_head shares it
            nn.init.normal_(self.backbone.embedding.weight, mean=0.0, std=self.config.init_std)
        for block in self.backbone.layers:
            mixer = block.mixer
            with gathered_for_init(mixer.parameters()):
                mixer.out_proj.weight.div_(self.config.n_layers ** 0.5)
                mixer.reset_ssm_parameters()  # after the biases: Mamba-1's dt_proj.bias is the dt initialisation

    def _logits(self, h: Tensor) -> Tensor:
        h = self.backbone.norm_f(h)
        return self.lm_head(h.to(self.lm_head.weight.dtype))

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) for idx (B, T); with targets (B, T), also the mean cross-entropy over all positions.
        On CUDA with targets the loss is chunked (model/losses.py) and the logits, never built whole, are None."""
        h = self.backbone.embedding(idx).float()  # (B, T, C) fp32 residual stream
        for i, block in enumerate(self.backbone.layers):
            h = self.run_block(i, block, h)  # (B, T, C)
        if targets is not None and use_chunked_loss(self.lm_head.weight):  # CUDA: logits never built whole
            hidden = self.backbone.norm_f(h).to(self.lm_head.weight.dtype)  # (B, T, C)
            return None, chunked_linear_cross_entropy(hidden, self.lm_head.weight, targets)
        logits = self._logits(h)  # (B, T, V)
        loss = None
        if targets is not None:
            # fp32 loss: a bf16 log-softmax over 32k classes loses ~2 digits of the loss.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ---- recurrent inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, idx: Tensor) -> tuple[Tensor, list[MixerState]]:
        """Logits (B, T, V) of the prompt idx (B, T), computed in parallel (chunked scan), and the per-layer
        recurrent state after its last token."""
        h = self.backbone.embedding(idx).float()  # (B, T, C)
        states = []
        for block in self.backbone.layers:
            h, state = block(h, return_state=True)
            states.append(state)
        return self._logits(h), states

    @torch.no_grad()
    def step(self, token: Tensor, states: list[MixerState]) -> Tensor:
        """Logits (B, V) of one token per row, token (B,), continuing from `states` (updated in place)."""
        h = self.backbone.embedding(token).float()  # (B, C)
        for block, state in zip(self.backbone.layers, states):
            h = block(h, state=state)  # (B, C)
        return self._logits(h)

    def allocate_states(self, batch: int, device: torch.device | None = None) -> list[MixerState]:
        """Zero recurrent states: an empty context, for decoding from the first token with `step`."""
        weight = self.lm_head.weight
        return [block.mixer.allocate_state(batch, device or weight.device, weight.dtype)
                for block in self.backbone.layers]

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 eos_id: int | None = None, top_p: float | None = None) -> Tensor:
        """Append up to max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy, top_k/top_p filter.

        The prompt runs once through the chunked scan; then each token is one recurrent step per layer, constant
        time and memory however long the sequence (there is no context window to slide). Rows that emitted
        eos_id keep emitting it; generation stops when all rows have.
        """
        logits, states = self.prefill(idx)
        return decode(idx, logits[:, -1], lambda next_id, _: self.step(next_id[:, 0], states),
                      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, eos_id=eos_id, top_p=top_p)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters, a tied matrix counted once. exclude_embeddings drops the token-embedding table (tied, that
        is also lm_head's matrix); an untied lm_head stays counted."""
        total = sum(_numel(p) for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            total -= _numel(self.backbone.embedding.weight)
        return total


def _numel(p: Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter holds an empty tensor
