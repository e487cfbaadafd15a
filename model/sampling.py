"""Choosing the next token from logits, shared by every model family's generate()."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """logits (B, V) with every token outside the top-k and outside the nucleus set to -inf.

    Top-k keeps the k largest logits; top-p (nucleus sampling, Holtzman et al. 2020, arXiv:1904.09751) then keeps
    the smallest set of most probable tokens whose probabilities sum to at least top_p (always at least one).
    Applied in that order, after the temperature, as transformers' TopK/TopPLogitsWarper do.
    """
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # A token is dropped when the tokens ranked above it already reach top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p  # (B, V); rank 0 is never dropped
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None = None) -> Tensor:
    """One token id per row (B, 1) from logits (B, V): greedy when temperature is 0, else top-k/top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)


def decode(idx: Tensor, logits: Tensor, next_logits: Callable[[Tensor, Tensor], Tensor], *, max_new_tokens: int,
           temperature: float, top_k: int | None, eos_id: int | None, top_p: float | None = None) -> Tensor:
    """The sampling loop every family's generate() shares: append up to max_new_tokens tokens to idx (B, T).

    logits (B, V) predict the first new token; next_logits(next_id (B, 1), idx (B, T')) feeds the token just
    appended (idx includes it) through the model's cache or recurrent state and returns the following logits.
    Rows that emitted eos_id keep emitting it; decoding stops when all rows have.
    """
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,)
    for step in range(max_new_tokens):
        next_id = sample_next_token(logits.float(), temperature, top_k, top_p)  # (B, 1)
        if eos_id is not None:
            next_id = torch.where(finished[:, None], torch.full_like(next_id, eos_id), next_id)
            finished |= next_id[:, 0] == eos_id
        idx = torch.cat((idx, next_id), dim=1)  # (B, T + 1)
        if step == max_new_tokens - 1 or finished.all():
            break
        logits = next_logits(next_id, idx)  # (B, V)
    return idx
