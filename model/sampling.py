"""Choosing the next token from logits, shared by every model family's generate()."""
from __future__ import annotations

import torch
from torch import Tensor


def sample_next_token(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """One token id per row (B, 1) from logits (B, V): greedy when temperature is 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)
