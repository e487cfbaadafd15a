"""Choosing the next token from logits, shared by every model family's generate()."""
from __future__ import annotations

from collections.abc import Callable

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


def decode(idx: Tensor, logits: Tensor, next_logits: Callable[[Tensor, Tensor], Tensor], *, max_new_tokens: int,
           temperature: float, top_k: int | None, eos_id: int | None) -> Tensor:
    """The sampling loop every family's generate() shares: append up to max_new_tokens tokens to idx (B, T).

    logits (B, V) predict the first new token; next_logits(next_id (B, 1), idx (B, T')) feeds the token just
    appended (idx includes it) through the model's cache or recurrent state and returns the following logits.
    Rows that emitted eos_id keep emitting it; decoding stops when all rows have.
    """
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,)
    for step in range(max_new_tokens):
        next_id = sample_next_token(logits.float(), temperature, top_k)  # (B, 1)
        if eos_id is not None:
            next_id = torch.where(finished[:, None], torch.full_like(next_id, eos_id), next_id)
            finished |= next_id[:, 0] == eos_id
        idx = torch.cat((idx, next_id), dim=1)  # (B, T + 1)
        if step == max_new_tokens - 1 or finished.all():
            break
        logits = next_logits(next_id, idx)  # (B, V)
    return idx
