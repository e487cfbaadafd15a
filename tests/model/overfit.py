"""The overfit check both model families' tests use: a model that learns must memorise a fixed small batch."""
from __future__ import annotations

import torch


def overfit_fixed_batch(model: torch.nn.Module, *, steps: int, lr: float = 1e-2) -> tuple[float, float]:
    """Train `steps` AdamW steps on one repeated-pattern batch; returns (initial loss, final loss)."""
    pattern = torch.tensor([3, 14, 15, 9, 26, 5, 35, 8]).repeat(5)  # (40,)
    batch = torch.stack([pattern[i:i + 33] for i in range(4)])  # (4, 33)
    idx, targets = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    initial = model(idx, targets)[1].item()
    for _ in range(steps):
        _, loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return initial, model(idx, targets)[1].item()
