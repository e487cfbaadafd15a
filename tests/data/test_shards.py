"""Megatron-format token shards: round trip, header bytes, atomic writes, corruption errors."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from data.shards import (
    INDEX_MAGIC,
    CorruptShardError,
    TokenShardReader,
    TokenShardWriter,
    token_dtype,
)

DOCUMENTS = [[5, 6, 7], [], [0], list(range(100)), [9] * 17]


def _write(prefix, vocab_size, documents=DOCUMENTS):
    with TokenShardWriter(prefix, vocab_size) as writer:
        for document in documents:
            writer.add_document(document)


def _parse_index(path):
    """Independent parse of the Megatron layout, to check the writer against the format, not against itself."""
    raw = path.read_bytes()
    magic, version, code, num_sequences, num_docs = struct.unpack_from("<9sQBQQ", raw)
    offset = 34
    lengths = np.frombuffer(raw, np.int32, num_sequences, offset)
    offset += 4 * num_sequences
    pointers = np.frombuffer(raw, np.int64, num_sequences, offset)
    offset += 8 * num_sequences
    doc_indices = np.frombuffer(raw, np.int64, num_docs, offset)
    assert offset + 8 * num_docs == len(raw)
    return magic, version, code, lengths, pointers, doc_indices


@pytest.mark.parametrize(("vocab_size", "dtype", "code"), [(1000, np.uint16, 8), (70_000, np.int32, 4)])
def test_round_trip_and_megatron_header(tmp_path, vocab_size, dtype, code):
    documents = [[d % vocab_size for d in doc] for doc in DOCUMENTS] + [[vocab_size - 1, 0]]
    _write(tmp_path / "shard", vocab_size, documents)

    magic, version, dtype_code, lengths, pointers, doc_indices = _parse_index(tmp_path / "shard.idx")
    assert magic == b"MMIDIDX\x00\x00" == INDEX_MAGIC
    assert (tmp_path / "shard.idx").read_bytes()[:9] == b"MMIDIDX\x00\x00"
    assert version == 1
    assert dtype_code == code
    assert lengths.tolist() == [len(doc) for doc in documents]
    itemsize = np.dtype(dtype).itemsize
    assert pointers.tolist() == np.concatenate([[0], np.cumsum([len(d) * itemsize for d in documents])[:-1]]).tolist()
    assert doc_indices.tolist() == list(range(len(documents) + 1))
    flat = [token for doc in documents for token in doc]
    assert (tmp_path / "shard.bin").read_bytes() == np.array(flat, dtype=dtype).tobytes()

    reader = TokenShardReader(tmp_path / "shard")
    assert reader.dtype == dtype
    assert reader.num_documents == len(documents)
    assert reader.num_tokens == len(flat)
    assert reader.tokens.ndim == 1 and reader.tokens.tolist() == flat
    for index, document in enumerate(documents):
        assert reader.document(index).tolist() == document
    assert reader.document(-1).tolist() == documents[-1]
    with pytest.raises(IndexError):
        reader.document(len(documents))


def test_dtype_threshold():
    assert token_dtype(65_499) == np.uint16
    assert token_dtype(65_500) == np.int32


def test_empty_shard_is_readable(tmp_path):
    _write(tmp_path / "empty", 100, [])
    reader = TokenShardReader(tmp_path / "empty")
    assert reader.num_documents == 0 and reader.num_tokens == 0 and len(reader.tokens) == 0


def test_reads_documents_of_several_sequences(tmp_path):
    # Megatron's preprocess_data.py may split a document into sentences: documents 0 = seqs 0..1, 1 = seq 2.
    lengths = np.array([2, 3, 1], dtype=np.int32)
    pointers = np.array([0, 4, 10], dtype=np.int64)
    doc_indices = np.array([0, 2, 3], dtype=np.int64)
    (tmp_path / "m.idx").write_bytes(
        struct.pack("<9sQBQQ", INDEX_MAGIC, 1, 8, 3, 3) + lengths.tobytes() + pointers.tobytes() + doc_indices.tobytes()
    )
    (tmp_path / "m.bin").write_bytes(np.array([1, 2, 3, 4, 5, 6], dtype=np.uint16).tobytes())
    reader = TokenShardReader(tmp_path / "m")
    assert reader.num_documents == 2
    assert reader.document(0).tolist() == [1, 2, 3, 4, 5]
    assert reader.document(1).tolist() == [6]


def test_nothing_visible_before_finalize_and_exception_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with TokenShardWriter(tmp_path / "shard", 100) as writer:
            writer.add_document([1, 2, 3])
            assert not (tmp_path / "shard.bin").exists() and not (tmp_path / "shard.idx").exists()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_old_shard(tmp_path):
    _write(tmp_path / "shard", 100, [[1, 2], [3]])
    with pytest.raises(RuntimeError):
        with TokenShardWriter(tmp_path / "shard", 100) as writer:
            writer.add_document([7] * 50)
            raise RuntimeError("crash")
    reader = TokenShardReader(tmp_path / "shard")
    assert reader.tokens.tolist() == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin", "shard.idx"]


def test_rejects_out_of_range_ids_and_use_after_finalize(tmp_path):
    writer = TokenShardWriter(tmp_path / "shard", 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        writer.add_document([3, 10])
    with pytest.raises(ValueError):
        writer.add_document([-1])
    writer.finalize()
    with pytest.raises(RuntimeError):
        writer.add_document([1])


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="shard.idx"):
        TokenShardReader(tmp_path / "shard")
    _write(tmp_path / "shard", 100)
    (tmp_path / "shard.bin").unlink()
    with pytest.raises(FileNotFoundError, match="shard.bin"):
        TokenShardReader(tmp_path / "shard")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda idx, bin_: idx.write_bytes(b"XXIDIDX\x00\x00" + idx.read_bytes()[9:]), "bad magic"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:9] + struct.pack("<Q", 2) + idx.read_bytes()[17:]),
         "version"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:-8]), "need"),
        (lambda idx, bin_: idx.write_bytes(idx.read_bytes()[:20]), "header"),
        (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes()[:-2]), "bytes, but the index lists"),
        (lambda idx, bin_: bin_.write_bytes(bin_.read_bytes() + b"\x00\x00"), "bytes, but the index lists"),
    ],
)
def test_corrupt_index_is_reported(tmp_path, corrupt, message):
    _write(tmp_path / "shard", 100)
    corrupt(tmp_path / "shard.idx", tmp_path / "shard.bin")
    with pytest.raises(CorruptShardError, match=message):
        TokenShardReader(tmp_path / "shard")


def test_inconsistent_pointers_are_reported(tmp_path):
    _write(tmp_path / "shard", 100, [[1, 2], [3, 4]])
    raw = bytearray((tmp_path / "shard.idx").read_bytes())
    # The second sequence pointer lives after the header (34 bytes), 2 lengths (8) and the first pointer (8).
    raw[50:58] = struct.pack("<q", 2)
    (tmp_path / "shard.idx").write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError, match="pointers"):
        TokenShardReader(tmp_path / "shard")
