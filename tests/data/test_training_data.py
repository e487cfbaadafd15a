"""Opening sources for training: a many-pair shard set (some validation shards empty) reads back every token, and
a shard written by another tool from the documented Megatron layout (documents spanning several sequences,
int32 ids) trains as a source."""
from __future__ import annotations

import struct

import numpy as np

from data.config import DataConfig
from data.preprocess import PreprocessOptions, preprocess
from data.corpora.sources import resolve_source
from data.training_data import open_training_data
from tests.data.corpus_files import make_documents, parse_megatron, write_jsonl
from tests.data.test_preprocess import small_tokenizer  # noqa: F401  (session fixture)


def windows_tokens(windows) -> list[int]:
    """Every token the windows cover, in window order (unshuffled)."""
    return [int(t) for i in range(len(windows)) for t in windows.window(i)[:-1]]


def test_many_pair_shard_set_opens_with_empty_validation_shards(tmp_path, small_tokenizer):  # noqa: F811
    source = resolve_source(str(write_jsonl(tmp_path / "c.jsonl", make_documents(120, seed=5))))
    meta = preprocess(source, PreprocessOptions(output_dir=tmp_path / "set", tokenizer_path=small_tokenizer,
                                                num_workers=2, val_fraction=0.05, max_shard_tokens=600,
                                                progress=False))
    val_sizes = [sum(map(len, parse_megatron(tmp_path / "set" / name))) for name in meta["val_shards"]]
    assert 0 in val_sizes and any(val_sizes)  # some pairs hold no validation document
    data = open_training_data(DataConfig(sources=[{"path": str(tmp_path / "set")}]), vocab_size=512, seq_len=16,
                              seed=0)
    (opened,) = data.sources
    expected = []
    for name in meta["train_shards"]:
        part = np.concatenate(parse_megatron(tmp_path / "set" / name))
        usable = (len(part) - 1) // 16 * 16
        expected += part[:usable].tolist()  # windows never cross a shard; a shard's tail shorter than one is unused
    opened.train.shuffle = False
    assert windows_tokens(opened.train) == expected


def write_foreign_megatron(prefix, documents: list[list[list[int]]]) -> None:
    """A shard as another tool writes it (int32, dtype code 4), each document split into several sequences."""
    sequences = [seq for doc in documents for seq in doc]
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * 4)]).astype(np.int64)
    doc_index = np.concatenate([[0], np.cumsum([len(doc) for doc in documents])]).astype(np.int64)
    with open(f"{prefix}.idx", "wb") as index:
        index.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4)
                    + struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(doc_index)))
        index.write(lengths.tobytes() + pointers.tobytes() + doc_index.tobytes())
    with open(f"{prefix}.bin", "wb") as data:
        data.write(np.concatenate([np.asarray(s, dtype=np.int32) for s in sequences]).tobytes())


def test_a_megatron_prefix_from_another_tool_is_a_source(tmp_path, small_tokenizer):  # noqa: F811
    rng = np.random.default_rng(0)
    documents = [[rng.integers(0, 400, size=rng.integers(5, 40)).tolist() for _ in range(3)] for _ in range(20)]
    write_foreign_megatron(tmp_path / "foreign", documents)
    flat = [t for doc in documents for seq in doc for t in seq]
    data = open_training_data(DataConfig(sources=[{"path": str(tmp_path / "foreign")}],
                                         tokenizer=str(small_tokenizer)), vocab_size=512, seq_len=8, seed=0)
    (opened,) = data.sources
    assert opened.val is None
    opened.train.shuffle = False
    assert windows_tokens(opened.train) == flat[:(len(flat) - 1) // 8 * 8]
