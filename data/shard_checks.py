"""Checks a token shard must pass before training reads it: present, readable, long enough, ids in the vocabulary.

Used by the trainer at start-up on the shards it is given (and usable by tools that write shards). A bad shard
fails here with a DataError naming the file, instead of as an IndexError deep inside an embedding lookup.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data.errors import DataError
from data.shards import TokenShardReader

_CHUNK_TOKENS = 1 << 26
"""Tokens per slice of the id-range scan (128 MiB of uint16): one vectorised max per slice, bounded memory."""


def open_checked_shard(prefix: str | Path, *, vocab_size: int, min_tokens: int = 1) -> TokenShardReader:
    """Open `<prefix>.bin/.idx` and check it: both files exist, the index matches the data (TokenShardReader's
    own checks raise CorruptShardError, a DataError), at least min_tokens tokens, every id < vocab_size."""
    prefix = Path(prefix)
    try:
        reader = TokenShardReader(prefix)
    except FileNotFoundError as err:
        raise DataError(f"{err}; run the data preparation again (delete the cache folder {prefix.parent} to "
                        "rebuild it) or fix data.cache_dir") from err
    if reader.num_tokens < min_tokens:
        raise DataError(f"token shard {prefix}.bin has {reader.num_tokens} tokens, fewer than the {min_tokens} "
                        "that one training window needs: use more data, or lower model.max_seq_len")
    largest = -1
    for start in range(0, reader.num_tokens, _CHUNK_TOKENS):
        largest = max(largest, int(np.max(reader.tokens[start:start + _CHUNK_TOKENS])))
    if largest >= vocab_size:
        raise DataError(f"token shard {prefix}.bin holds token id {largest}, outside the model's vocabulary of "
                        f"{vocab_size} ids: the shard was made with another tokenizer; set model.vocab_size to "
                        "the tokenizer's size, or delete the cache folder to re-tokenize")
    return reader


def check_tokenizer_fits(tokenizer_vocab_size: int, tokenizer_path: str | Path, *, vocab_size: int) -> None:
    """DataError naming the tokenizer file when it has more ids than the model's vocabulary (checked before the
    shards, whose out-of-range ids would otherwise be the first symptom)."""
    if tokenizer_vocab_size > vocab_size:
        raise DataError(f"the tokenizer {tokenizer_path} has {tokenizer_vocab_size} tokens but model.vocab_size is "
                        f"{vocab_size}: set model.vocab_size to {tokenizer_vocab_size} or use a tokenizer of that size")
