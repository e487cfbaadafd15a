"""Data layer: corpus catalog, SentencePiece tokenizer, Megatron-format token shards, deterministic sampler.

Names are imported on first use (PEP 562 module __getattr__): the command-line tools that only browse the
catalog or preprocess text then start without importing torch (~2-7 s on a busy machine).
"""
from __future__ import annotations

import importlib

_LOCATIONS = {
    **dict.fromkeys(["CORPORA", "CorpusEntry", "CorpusSplit", "list_corpora", "load_corpus", "split_documents"],
                    "data.corpora.embedded"),
    "CorruptShardError": "data.shards", "TokenShardReader": "data.shards", "TokenShardWriter": "data.shards",
    "DataConfig": "data.config", "DataError": "data.errors",
    "PreparedData": "data.prepare", "cache_folder": "data.prepare", "load_prepared": "data.prepare",
    "prepare_data": "data.prepare",
    "TokenWindows": "data.sampler", "eval_indices": "data.sampler", "sample_indices": "data.sampler",
    "Tokenizer": "data.tokenizer", "train_tokenizer": "data.tokenizer",
}

__all__ = sorted(_LOCATIONS)


def __getattr__(name: str):
    if name not in _LOCATIONS:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LOCATIONS[name]), name)
    globals()[name] = value
    return value
