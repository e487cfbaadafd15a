"""Corpus statistics used as baselines for what a model has learned."""
from __future__ import annotations

import numpy as np

from data.prepare import PreparedData
from data.shards import TokenShardReader


def unigram_cross_entropy(prepared: PreparedData) -> float:
    """Validation cross-entropy (nats/token) of a unigram model fit on the training tokens (add-one smoothed).

    A language model that has learned anything beyond token frequencies must score below this.
    """
    train = TokenShardReader(prepared.train_prefix).tokens
    val = TokenShardReader(prepared.val_prefix).tokens
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=prepared.vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[np.asarray(val, dtype=np.int64)].mean())
