"""Small synthetic corpora written as .jsonl, .parquet and .txt files, and an independent shard-set parser."""
from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("the quick brown fox jumps over a lazy dog near river mountain king queen castle sword love war "
         "peace night day 王 国 山 水").split()


def make_documents(num: int, seed: int, *, num_duplicates: int = 0) -> list[str]:
    """num random documents of 20-120 words, then num_duplicates exact repeats of earlier ones, and one blank."""
    rng = random.Random(seed)
    documents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + f" #{seed}-{i}"
                 for i in range(num)]
    documents += [documents[rng.randrange(num)] for _ in range(num_duplicates)]
    documents.insert(num // 2, "   ")
    return documents


def write_jsonl(path: Path, documents: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: doc, "id": i}, ensure_ascii=False) + "\n"
                            for i, doc in enumerate(documents)), encoding="utf-8")
    return path


def write_parquet(path: Path, documents: list[str]) -> Path:
    pq.write_table(pa.table({"text": documents}), path)
    return path


def write_txt_folder(folder: Path, documents: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(documents):
        (folder / f"doc_{i:04d}.txt").write_text(doc, encoding="utf-8")
    return folder


def parse_megatron(prefix: Path) -> list[np.ndarray]:
    """Documents of a `.bin/.idx` pair read from the documented Megatron layout with numpy (not data.shards)."""
    raw = Path(f"{prefix}.idx").read_bytes()
    magic, version, code, num_sequences, num_docs = struct.unpack_from("<9sQBQQ", raw)
    assert magic == b"MMIDIDX\x00\x00" and version == 1
    dtype = {4: np.int32, 8: np.uint16}[code]
    lengths = np.frombuffer(raw, np.int32, num_sequences, 34)
    pointers = np.frombuffer(raw, np.int64, num_sequences, 34 + 4 * num_sequences)
    doc_index = np.frombuffer(raw, np.int64, num_docs, 34 + 12 * num_sequences)
    assert len(raw) == 34 + 12 * num_sequences + 8 * num_docs
    assert doc_index.tolist() == list(range(num_sequences + 1))
    data = Path(f"{prefix}.bin").read_bytes()
    assert len(data) == int(lengths.sum()) * np.dtype(dtype).itemsize
    return [np.frombuffer(data, dtype, int(n), int(p)) for n, p in zip(lengths, pointers)]
