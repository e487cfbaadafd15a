"""Extending the launcher: a registered model family and a Trainer subclass, trained by launcher/run.py's main().

    python examples/custom_family.py --preset tiny --model_type residual_mlp --set training.max_steps=20
    python examples/custom_family.py --preset tiny --model_type residual_mlp --num_gpus 2   # ranks run this file

A family is an nn.Module built as Class(ModelConfig) whose forward(idx, targets=None) returns (logits, loss) and
whose generate() samples (model/sampling.py's decode loop). The memory plan reads its parameter shapes from the
model built on the meta device; the per-token costs (bytes a block saves for backward, FLOPs) are the family's
own facts, stated in a `costs` module named by its ModelEntry (here this file; the built-in families use
model/transformer/costs.py and model/mamba/costs.py, which list the functions a costs module provides).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python examples/x.py` puts examples/ on sys.path

from engine.trainer import Trainer  # noqa: E402
from launcher.run import main  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.registry import ModelEntry, list_models, register_model  # noqa: E402
from model.sampling import decode  # noqa: E402


class ResidualMLP(nn.Module):
    """A context-free LM: each position predicts the next token from its own token through n_layers residual MLPs."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(nn.Linear(config.d_model, config.d_model) for _ in range(config.n_layers))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.embedding(idx)  # (B, T, d)
        for layer in self.layers:
            x = x + F.gelu(layer(x))
        logits = self.lm_head(x)  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_id=None):
        return decode(idx, self(idx)[0][:, -1], lambda next_id, _: self(next_id)[0][:, -1],
                      max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, eos_id=eos_id)


# ---- the family's costs (ModelEntry.costs names this module) -------------------------------------------------
def layer_activation_bytes(m: ModelConfig, act_bytes: int, *, seq_len: int, on_cuda: bool = True,
                           fused_ssm_kernels: bool = True) -> int:
    """Per block and token: the Linear's input and GELU's input (both d_model wide)."""
    return 2 * act_bytes * m.d_model


def layer_input_bytes(m: ModelConfig, act_bytes: int) -> int:
    """Per token, what a checkpointed block keeps: its input."""
    return act_bytes * m.d_model


def head_activation_bytes(m: ModelConfig, act_bytes: int, *, on_cuda: bool = True) -> int:
    """Per token outside the blocks: lm_head's input, token ids and targets (int64)."""
    return act_bytes * m.d_model + 2 * 8


def training_flops_per_token(m: ModelConfig, seq_len: int) -> int:
    """6 FLOPs per matmul weight per token (forward 2, backward 4): the blocks' Linears and lm_head."""
    return 6 * (m.n_layers * m.d_model * m.d_model + m.d_model * m.vocab_size)


class CountingTrainer(Trainer):
    """A Trainer subclass: counts the steps it ran and reports them when training ends."""

    steps_run = 0

    def train_step(self):
        self.steps_run += 1
        return super().train_step()

    def train(self):
        result = super().train()
        print(f"CountingTrainer ran {self.steps_run} steps on rank {self.engine.global_rank}", flush=True)
        return result


if "residual_mlp" not in list_models():
    register_model("residual_mlp", ModelEntry(
        target=f"{__name__}:ResidualMLP", description="example: residual MLP per token (examples/custom_family.py)",
        costs=__name__))

if __name__ == "__main__":
    sys.exit(main(trainer_class=CountingTrainer, entry_script=__file__))
