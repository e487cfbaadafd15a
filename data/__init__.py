"""Data layer: corpus catalog, SentencePiece tokenizer, Megatron-format token shards, deterministic sampler."""
from data.config import DataConfig
from data.corpus import CORPORA, CorpusEntry, CorpusSplit, list_corpora, load_corpus, split_documents
from data.prepare import PreparedData, cache_folder, load_prepared, prepare_data
from data.sampler import TokenWindows, eval_indices, sample_indices
from data.shards import CorruptShardError, TokenShardReader, TokenShardWriter
from data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "CORPORA",
    "CorpusEntry",
    "CorpusSplit",
    "CorruptShardError",
    "DataConfig",
    "PreparedData",
    "TokenShardReader",
    "TokenShardWriter",
    "TokenWindows",
    "Tokenizer",
    "cache_folder",
    "eval_indices",
    "list_corpora",
    "load_corpus",
    "load_prepared",
    "prepare_data",
    "sample_indices",
    "split_documents",
    "train_tokenizer",
]
