"""Deterministic sampling of token windows by global sample position.

A run consumes samples 0, 1, 2, ... in a fixed order; each rank, micro-step and batch row reads the positions
`sample_indices` assigns it. The set of samples in an optimizer step therefore depends only on the global
batch size, not on how it is divided into ranks and accumulation steps, and a resumed run continues exactly.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens (stride seq_len), visited in a fresh order each epoch."""

    def __init__(self, tokens: np.ndarray | Sequence[np.ndarray], seq_len: int, seed: int, shuffle: bool = True):
        # Several shards (parts) act as one: windows never cross a part, and are numbered part after part.
        parts = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
        if any(part.ndim != 1 for part in parts):
            raise ValueError(f"tokens must be flat 1-D arrays, got shapes {[part.shape for part in parts]}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        # A window holds seq_len inputs plus the target of the last one; consecutive windows share that token.
        windows_per_part = np.array([max(0, (len(part) - 1) // seq_len) for part in parts], dtype=np.int64)
        num_windows = int(windows_per_part.sum())
        if num_windows < 1:
            raise ValueError(
                f"corpus has {sum(len(part) for part in parts)} tokens, fewer than one window of seq_len + 1 = "
                f"{seq_len + 1}; use a shorter seq_len or a bigger corpus"
            )
        self.parts = parts
        self.tokens = parts[0]
        self._first_window = np.concatenate([[0], np.cumsum(windows_per_part)])
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.num_windows = num_windows
        self._epoch = -1
        self._permutation = np.arange(num_windows)

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of windows in epoch: a permutation seeded by (seed, epoch), or identity without shuffle."""
        if not self.shuffle:
            return np.arange(self.num_windows)
        if epoch != self._epoch:
            # Seeding with [seed, epoch] makes each epoch's order independent of how many epochs came before.
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        return self._permutation

    def window_id(self, sample_index: int) -> int:
        """Which window (numbered across parts) global sample position sample_index reads."""
        if sample_index < 0:
            raise IndexError(f"sample index must be >= 0, got {sample_index}")
        epoch, position = divmod(sample_index, self.num_windows)
        return int(self.permutation(epoch)[position]) if self.shuffle else position

    def _locate(self, window: int) -> tuple[int, int]:
        part = int(np.searchsorted(self._first_window, window, side="right")) - 1
        return part, (window - int(self._first_window[part])) * self.seq_len

    def window_start(self, sample_index: int) -> int:
        """Offset in tokens (within its part) of the window read at global sample position sample_index."""
        return self._locate(self.window_id(sample_index))[1]

    def window(self, sample_index: int) -> np.ndarray:
        """The seq_len + 1 tokens at global sample position sample_index (input w[:-1], target w[1:])."""
        part, start = self._locate(self.window_id(sample_index))
        return np.asarray(self.parts[part][start:start + self.seq_len + 1])

    def batch(self, sample_indices: Iterable[int]) -> torch.Tensor:
        """Windows of the sample positions stacked as a LongTensor of shape (B, seq_len + 1)."""
        located = [self._locate(self.window_id(i)) for i in sample_indices]
        if len(self.parts) == 1:
            starts = np.array([start for _, start in located], dtype=np.int64)
            # One fancy-index gather from the memmap: (B, 1) + (1, T+1) -> (B, T+1).
            offsets = starts[:, None] + np.arange(self.seq_len + 1, dtype=np.int64)[None, :]
            return torch.from_numpy(np.asarray(self.tokens[offsets]).astype(np.int64))
        rows = [np.asarray(self.parts[part][start:start + self.seq_len + 1]).astype(np.int64)
                for part, start in located]
        return torch.from_numpy(np.stack(rows))

    def __len__(self) -> int:
        return self.num_windows


def _check_position(**values: int) -> None:
    problems = [f"{name}={value}" for name, value in values.items() if value < 0]
    if problems:
        raise ValueError(f"sample positions need non-negative values, got {', '.join(problems)}")


def sample_indices(
    *, step: int, micro_step: int, rank: int, world_size: int, micro_batch: int, grad_accum: int
) -> range:
    """Global sample positions of one micro-batch: step-major, then micro_step, then rank, then row."""
    _check_position(step=step, micro_step=micro_step, rank=rank)
    if world_size < 1 or micro_batch < 1 or grad_accum < 1:
        raise ValueError(
            f"world_size, micro_batch, grad_accum must be >= 1, got {world_size}, {micro_batch}, {grad_accum}"
        )
    if rank >= world_size or micro_step >= grad_accum:
        raise ValueError(f"need rank < world_size and micro_step < grad_accum, got {rank}/{world_size}, "
                         f"{micro_step}/{grad_accum}")
    global_batch = micro_batch * grad_accum * world_size
    start = step * global_batch + (micro_step * world_size + rank) * micro_batch
    return range(start, start + micro_batch)


def eval_indices(*, batch_index: int, rank: int, world_size: int, micro_batch: int) -> range:
    """Positions of the batch_index-th validation micro-batch of rank; ranks read disjoint consecutive slices."""
    _check_position(batch_index=batch_index, rank=rank)
    if world_size < 1 or micro_batch < 1 or rank >= world_size:
        raise ValueError(f"need world_size, micro_batch >= 1 and rank < world_size, got {world_size}, "
                         f"{micro_batch}, rank {rank}")
    start = (batch_index * world_size + rank) * micro_batch
    return range(start, start + micro_batch)
