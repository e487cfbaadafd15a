"""Deterministic mixture of several sources by global sample position.

Position p of the run goes to the source s that maximises weight_s * (p + 1) - count_s, where count_s is how
many of the positions before p went to s (ties: the lower source index). This is the greedy blending of
Megatron-LM's BlendedDataset (megatron/core/datasets/helpers.cpp, build_blending_indices): each source's share
of any prefix of the run stays within one sample of its weight. It depends only on the counts, so a run that
saves the counts (per-source positions) continues with the next unseen sample of every source; and since it is a
function of the position, the number of ranks and the micro-batch split do not change what a step sees.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.errors import DataError


def normalized_weights(weights: Sequence[float], names: Sequence[str]) -> np.ndarray:
    """Weights scaled to sum to 1; a DataError names a negative weight or an all-zero set."""
    array = np.asarray(weights, dtype=np.float64)
    negative = [f"{name} ({weight:g})" for name, weight in zip(names, weights) if weight < 0 or weight != weight]
    if negative:
        raise DataError(f"data.sources weights must be >= 0; negative or NaN: {', '.join(negative)}")
    if len(array) == 0 or array.sum() <= 0:
        raise DataError("data.sources weights are all zero: give at least one source a positive weight")
    return array / array.sum()


class MixtureSampler:
    """Assigns global sample positions to sources, given the per-source counts so far."""

    def __init__(self, weights: Sequence[float], names: Sequence[str]):
        self.weights = normalized_weights(weights, names)
        self.names = list(names)

    def assign(self, counts: np.ndarray, num: int) -> tuple[np.ndarray, np.ndarray]:
        """For the next num positions after `counts`: (source of each, index within that source)."""
        counts = np.array(counts, dtype=np.int64)
        if counts.shape != self.weights.shape or np.any(counts < 0):
            raise ValueError(f"counts must be {len(self.weights)} non-negative integers, got {counts.tolist()}")
        position = int(counts.sum())
        sources = np.empty(num, dtype=np.int64)
        local = np.empty(num, dtype=np.int64)
        for offset in range(num):
            error = self.weights * (position + offset + 1) - counts
            source = int(np.argmax(error))  # argmax returns the first maximum: ties go to the lower index
            sources[offset], local[offset] = source, counts[source]
            counts[source] += 1
        return sources, local

    def counts_after(self, num_positions: int) -> np.ndarray:
        """Per-source counts after the first num_positions positions of a run."""
        sources, _ = self.assign(np.zeros(len(self.weights), dtype=np.int64), num_positions)
        return np.bincount(sources, minlength=len(self.weights)).astype(np.int64)
