"""Token shards in the Megatron-LM / GPT-NeoX indexed format (`.bin` raw tokens + `.idx` index).

Layout of `<prefix>.idx` (Megatron-LM megatron/core/datasets/indexed_dataset.py, all little-endian):
    b"MMIDIDX\\x00\\x00", u64 version (1), u8 dtype code, u64 sequence count, u64 document count,
    int32[sequence count] sequence lengths (tokens), int64[sequence count] byte offsets into .bin,
    int64[document count] document indices (sequence index where each document starts, plus a final count).
Here every document is one sequence; the reader also accepts files whose documents span several sequences.
"""
from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from data.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron's DType codes; only the two a tokenizer needs are written, the others are read.
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
# Megatron's own threshold for picking uint16 (indexed_dataset.DType.optimal_dtype).
UINT16_VOCAB_LIMIT = 65500
_HEADER = struct.Struct("<9sQBQQ")


def token_dtype(vocab_size: int) -> type[np.generic]:
    """uint16 when every id fits (vocab < 65500), else int32."""
    return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32


def _dtype_code(dtype: type[np.generic]) -> int:
    return next(code for code, candidate in DTYPE_CODES.items() if candidate == dtype)


def _temp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


class TokenShardWriter:
    """Writes documents of token ids to `<prefix>.bin/.idx`; nothing appears under those names before finalize."""

    def __init__(self, prefix: str | Path, vocab_size: int):
        self.prefix = Path(prefix)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_path = _temp_path(self.prefix.with_name(self.prefix.name + ".bin"))
        self._idx_path = _temp_path(self.prefix.with_name(self.prefix.name + ".idx"))
        self._bin = open(self._bin_path, "wb")
        self._lengths: list[int] = []
        self._num_tokens = 0  # kept as a running total: summing _lengths per call made adding documents O(n^2)
        self._closed = False

    @property
    def num_documents(self) -> int:
        """Documents added so far."""
        return len(self._lengths)

    @property
    def num_tokens(self) -> int:
        """Tokens added so far."""
        return self._num_tokens

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document (may be empty); ids must lie in [0, vocab_size)."""
        if self._closed:
            raise RuntimeError(f"shard {self.prefix} is already finalized or aborted")
        array = np.asarray(ids, dtype=np.int64)
        if array.ndim != 1:
            raise ValueError(f"a document is a 1-D sequence of ids, got shape {array.shape}")
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{array.min()}, {array.max()}]")
        self._bin.write(array.astype(self.dtype).tobytes())
        self._lengths.append(int(array.size))
        self._num_tokens += int(array.size)

    def finalize(self) -> None:
        """Write the index and move both files into place: .bin first, .idx last, so .idx marks a whole shard."""
        if self._closed:
            raise RuntimeError(f"shard {self.prefix} is already finalized or aborted")
        self._closed = True
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            lengths = np.asarray(self._lengths, dtype=np.int32)
            pointers = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1] * np.dtype(self.dtype).itemsize, out=pointers[1:])
            document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
            with open(self._idx_path, "wb") as index:
                index.write(_HEADER.pack(
                    INDEX_MAGIC, INDEX_VERSION, _dtype_code(self.dtype), len(lengths), len(document_indices)
                ))
                index.write(lengths.tobytes())
                index.write(pointers.tobytes())
                index.write(document_indices.tobytes())
                index.flush()
                os.fsync(index.fileno())
            final_idx = self.prefix.with_name(self.prefix.name + ".idx")
            # An old index beside a new .bin could look valid for a moment; remove it before replacing .bin.
            final_idx.unlink(missing_ok=True)
            os.replace(self._bin_path, self.prefix.with_name(self.prefix.name + ".bin"))
            os.replace(self._idx_path, final_idx)
        except BaseException:
            self._remove_temp_files()
            raise

    def abort(self) -> None:
        """Drop everything written so far; the shard's final names are never touched."""
        if not self._closed:
            self._closed = True
            self._bin.close()
        self._remove_temp_files()

    def _remove_temp_files(self) -> None:
        for path in (self._bin_path, self._idx_path):
            path.unlink(missing_ok=True)

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()


class CorruptShardError(DataError):
    """A shard's .idx is malformed or does not match its .bin."""


class TokenShardReader:
    """Memory-maps `<prefix>.bin/.idx` written by TokenShardWriter or by Megatron-LM's preprocess_data.py."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise FileNotFoundError(f"token shard file {path} does not exist (prepare the data first)")
        self._idx_path = idx_path
        idx_size = idx_path.stat().st_size
        if idx_size < _HEADER.size:
            raise CorruptShardError(f"{idx_path}: {idx_size} bytes, shorter than the {_HEADER.size}-byte header")
        # Memory-mapped, not read: a corpus of 100 M documents has a 2 GB index.
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        magic, version, code, num_sequences, num_document_indices = _HEADER.unpack(index[:_HEADER.size].tobytes())
        if magic != INDEX_MAGIC:
            raise CorruptShardError(f"{idx_path}: bad magic {magic!r}, expected {INDEX_MAGIC!r}")
        if version != INDEX_VERSION:
            raise CorruptShardError(f"{idx_path}: version {version}, only {INDEX_VERSION} is supported")
        if code not in DTYPE_CODES:
            raise CorruptShardError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected_size = _HEADER.size + num_sequences * (4 + 8) + num_document_indices * 8
        if idx_size != expected_size:
            raise CorruptShardError(
                f"{idx_path}: {idx_size} bytes, but {num_sequences} sequences and {num_document_indices} "
                f"document indices need {expected_size}"
            )
        # The arrays start at byte 34, unaligned: frombuffer accepts that where view() would not.
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(index, dtype=np.int32, count=num_sequences, offset=offset)
        offset += 4 * num_sequences
        self.sequence_pointers = np.frombuffer(index, dtype=np.int64, count=num_sequences, offset=offset)
        offset += 8 * num_sequences
        self.document_indices = np.frombuffer(index, dtype=np.int64, count=num_document_indices, offset=offset)
        self._check(bin_path)
        if self.num_tokens:
            self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
        else:
            self.tokens = np.empty(0, dtype=self.dtype)  # mmap refuses empty files

    def _check(self, bin_path: Path) -> None:
        lengths, pointers, starts = self.sequence_lengths, self.sequence_pointers, self.document_indices
        bin_size = bin_path.stat().st_size
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise CorruptShardError(
                f"{bin_path}: {bin_size} bytes, but the index lists {self.num_tokens} tokens of {self.dtype} "
                f"({self.num_tokens * self.dtype.itemsize} bytes)"
            )
        expected_pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize)])
        if len(lengths) and (lengths.min() < 0 or not np.array_equal(pointers, expected_pointers)):
            raise CorruptShardError(f"{self._idx_path}: sequence pointers do not match the lengths")
        if len(starts) == 0 or starts[0] != 0 or starts[-1] != len(lengths) or np.any(np.diff(starts) < 0):
            raise CorruptShardError(f"{self._idx_path}: document indices are not 0..{len(lengths)}")

    @property
    def num_documents(self) -> int:
        """Documents in the shard."""
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens in the shard, all documents together."""
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def document(self, index: int) -> np.ndarray:
        """Tokens of document index (a view into the memmap)."""
        if not -self.num_documents <= index < self.num_documents:
            raise IndexError(f"document {index} out of range for {self.num_documents} documents")
        index %= self.num_documents
        first, end = self.document_indices[index], self.document_indices[index + 1]
        if first == end:
            return self.tokens[:0]
        start = self.sequence_pointers[first] // self.dtype.itemsize
        stop = self.sequence_pointers[end - 1] // self.dtype.itemsize + self.sequence_lengths[end - 1]
        return self.tokens[start:stop]

    def __len__(self) -> int:
        return self.num_documents

    def __repr__(self) -> str:
        return f"TokenShardReader({str(self.prefix)!r}, {self.num_documents} documents, {self.num_tokens} tokens)"
