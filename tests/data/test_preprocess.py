"""Local corpora (.jsonl, .parquet, .txt folder, glob) through the datasets builders into Megatron shard sets with
2 workers: content against SentencePiece itself, hash split, exact dedup, bounded shards, resume, leftovers."""
from __future__ import annotations

import hashlib
import json

import pytest
import sentencepiece as spm

import data.preprocess as preprocess_module
from data.errors import DataError
from data.preprocess import PreprocessOptions, preprocess
from data.corpora.sources import iter_documents, resolve_source
from data.tokenizer import train_tokenizer
from tests.data.corpus_files import make_documents, parse_megatron, write_jsonl, write_parquet, write_txt_folder

VAL_FRACTION = 0.2
MAX_SHARD_TOKENS = 3000


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A 400-piece BPE model trained once for every data test."""
    folder = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(make_documents(200, seed=99), folder / "tok", 400).path


def expected_split(documents, model_path):
    """Independent oracle: distinct non-blank documents in order, encoded by SentencePiece + eos, split by the
    documented rule (last 8 bytes of BLAKE2b-16 of the text, little-endian, below val_fraction x 2^64)."""
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    seen, train, val = set(), [], []
    for doc in documents:
        if not doc.strip() or doc in seen:
            continue
        seen.add(doc)
        digest = hashlib.blake2b(doc.encode(), digest_size=16).digest()
        ids = processor.encode(doc) + [processor.eos_id()]
        (val if int.from_bytes(digest[8:], "little") < VAL_FRACTION * 2**64 else train).append(ids)
    return train, val


def read_shard_set(folder):
    meta = json.loads((folder / "meta.json").read_text())
    train = [doc.tolist() for name in meta["train_shards"] for doc in parse_megatron(folder / name)]
    val = [doc.tolist() for name in meta["val_shards"] for doc in parse_megatron(folder / name)]
    return meta, train, val


def options(folder, tokenizer, **overrides):
    settings = dict(output_dir=folder, tokenizer_path=tokenizer, num_workers=2, val_fraction=VAL_FRACTION,
                    max_shard_tokens=MAX_SHARD_TOKENS, task_bytes=2000, progress=False)
    return PreprocessOptions(**{**settings, **overrides})


def test_json_lines_longer_than_a_read_chunk_come_back_whole(tmp_path):
    """JSON lines are parsed 1 MB at a time (data/corpora/sources.py): documents of several MB, between short ones, must
    still come back whole and in order."""
    documents = ["short", "word " * 700_000, "b c " * 5, "x" * 3_000_000, "last"]
    assert list(iter_documents(resolve_source(str(write_jsonl(tmp_path / "big.jsonl", documents))))) == documents


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt_folder", "glob"])
def test_local_files_become_megatron_shards(tmp_path, small_tokenizer, kind):
    documents = make_documents(120, seed=1, num_duplicates=7)
    if kind == "jsonl":
        spec = str(write_jsonl(tmp_path / "c.jsonl", documents))
    elif kind == "parquet":
        spec = str(write_parquet(tmp_path / "c.parquet", documents))
    elif kind == "txt_folder":
        spec = str(write_txt_folder(tmp_path / "texts", documents))
    else:
        write_jsonl(tmp_path / "part1.jsonl", documents[:60])
        write_jsonl(tmp_path / "part2.jsonl", documents[60:])
        spec = str(tmp_path / "part*.jsonl")
    source = resolve_source(spec)
    if kind != "txt_folder":  # a folder of files is read in file-name order, which is the written order here
        assert list(iter_documents(source)) == documents

    meta = preprocess(source, options(tmp_path / "out", small_tokenizer))
    train, val = expected_split(documents, small_tokenizer)
    got_meta, got_train, got_val = read_shard_set(tmp_path / "out")
    assert got_meta == meta
    assert got_train == train and got_val == val
    assert len(val) > 0 and meta["num_train_documents"] + meta["num_val_documents"] == 120  # 7 dups + 1 blank out
    assert meta["num_documents_skipped"] == 8
    assert meta["num_shard_pairs"] > 2  # size-bounded shards
    for name in meta["train_shards"]:
        docs = parse_megatron(tmp_path / "out" / name)
        # A shard is closed before the document that would take it past the bound (unless it is its first).
        assert sum(map(len, docs)) <= MAX_SHARD_TOKENS or len(docs) == 1
    assert meta["tokenizer_sha256"] == hashlib.sha256(small_tokenizer.read_bytes()).hexdigest()
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == small_tokenizer.read_bytes()
    assert not list((tmp_path / "out").glob("*.tmp-*")) and not (tmp_path / "out" / "progress.json").exists()


NOT_TEXT = [None, 7, ["a list"], {"a": "dict"}]
"""Row values that are not text: a null, a number, a list, an object."""


@pytest.mark.parametrize("not_text_every", [0, 13], ids=["text rows", "some rows not text"])
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, small_tokenizer, monkeypatch, not_text_every):
    """Rows whose text is not a string are counted, and count as rows for the resume position: otherwise the
    resumed run skips (or repeats) as many documents as there were such rows before the interruption. With such
    rows, no duplicates and dedup off: dedup would hide documents read twice."""
    documents = make_documents(150, seed=2, num_duplicates=0 if not_text_every else 5)
    settings = {"dedup": False} if not_text_every else {}
    rows: list = list(documents)
    if not_text_every:
        for i, value in enumerate(range(not_text_every, len(rows), not_text_every)):
            rows.insert(value, NOT_TEXT[i % len(NOT_TEXT)])
    write_jsonl(tmp_path / "c.jsonl", rows)
    source = resolve_source(str(tmp_path / "c.jsonl"))
    meta = preprocess(source, options(tmp_path / "straight", small_tokenizer, **settings))
    assert meta["num_rows_not_text"] == len(rows) - len(documents)
    train, val = expected_split(documents, small_tokenizer)  # the oracle sees only the text rows
    _, got_train, got_val = read_shard_set(tmp_path / "straight")
    assert got_train == train and got_val == val

    real = preprocess_module.iter_rows

    def dies_after_100(source, *, skip=0):
        for count, text in enumerate(real(source, skip=skip)):
            if count == 100:
                raise KeyboardInterrupt("simulated Ctrl+C")
            yield text

    monkeypatch.setattr(preprocess_module, "iter_rows", dies_after_100)
    with pytest.raises(KeyboardInterrupt):
        preprocess(source, options(tmp_path / "resumed", small_tokenizer, **settings))
    assert not (tmp_path / "resumed").exists()  # published under its name only when complete
    folder = tmp_path / ".resumed.partial"  # data/output.py's staging folder, kept for the resume
    assert not (folder / "meta.json").exists() and (folder / "progress.json").exists()
    finished = sorted(p.name for p in folder.glob("train_*.idx"))
    assert finished  # some shard pairs were finished before the interruption ...
    for idx in folder.glob("*.idx"):  # ... and every shard under a final name is whole
        parse_megatron(idx.with_suffix(""))
    assert not list(folder.glob("*.tmp-*"))
    # A hard kill would also leave a temporary file and maybe a shard finalized after the last record.
    (folder / "train_00042.bin.tmp-1-abc").write_bytes(b"junk")
    (folder / "val_00099.idx").write_bytes(b"junk")

    monkeypatch.setattr(preprocess_module, "iter_rows", real)
    preprocess(source, options(tmp_path / "resumed", small_tokenizer, **settings))
    assert not folder.exists()
    folder = tmp_path / "resumed"
    straight_files = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == straight_files
    for name in straight_files:
        if name.endswith((".bin", ".idx")):
            assert (folder / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert json.loads((folder / "meta.json").read_text()) == json.loads((tmp_path / "straight" / "meta.json")
                                                                         .read_text())


def test_max_tokens_stops_early(tmp_path, small_tokenizer):
    source = resolve_source(str(write_jsonl(tmp_path / "c.jsonl", make_documents(100, seed=3))))
    meta = preprocess(source, options(tmp_path / "out", small_tokenizer, max_tokens=2000))
    total = meta["num_train_tokens"] + meta["num_val_tokens"]
    assert 2000 <= total < 2000 + 200  # stops at the document that crosses the budget


def test_reads_back_with_the_project_reader(tmp_path, small_tokenizer):
    from data.shards import TokenShardReader

    source = resolve_source(str(write_jsonl(tmp_path / "c.jsonl", make_documents(40, seed=4))))
    meta = preprocess(source, options(tmp_path / "out", small_tokenizer))
    for name in meta["train_shards"]:
        ours = TokenShardReader(tmp_path / "out" / name)
        oracle = parse_megatron(tmp_path / "out" / name)
        assert [ours.document(i).tolist() for i in range(len(ours))] == [d.tolist() for d in oracle]


@pytest.mark.parametrize("problem", ["missing", "empty", "field", "utf8", "blank_only", "unknown_name"])
def test_bad_input_is_one_data_error_and_leaves_nothing(tmp_path, small_tokenizer, problem):
    out = tmp_path / "out"
    if problem == "missing":
        spec, expected = str(tmp_path / "nope.jsonl"), "no input files"
    elif problem == "empty":
        (tmp_path / "e.jsonl").write_text("")
        spec, expected = str(tmp_path / "e.jsonl"), "no documents"
    elif problem == "field":
        spec, expected = str(write_jsonl(tmp_path / "c.jsonl", ["a b"], field="body")), "no field 'text'"
    elif problem == "utf8":
        (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
        spec, expected = str(tmp_path / "latin.txt"), "not UTF-8"
    elif problem == "blank_only":
        spec, expected = str(write_jsonl(tmp_path / "b.jsonl", ["", "  ", "\n"])), "no documents"
    else:
        spec, expected = "no-such-dataset", "unknown dataset 'no-such-dataset'"
    with pytest.raises(DataError, match=expected):
        preprocess(resolve_source(spec), options(out, small_tokenizer))
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_an_in_place_interrupted_run_of_an_earlier_version_resumes(tmp_path, small_tokenizer, monkeypatch):
    """Before the one writer, an interrupted run left progress.json in --output itself: it still resumes there
    (the folder holds only a shard set's files), to the bytes of an uninterrupted run."""
    source = resolve_source(str(write_jsonl(tmp_path / "c.jsonl", make_documents(150, seed=3))))
    preprocess(source, options(tmp_path / "straight", small_tokenizer))
    real = preprocess_module.iter_rows

    def dies_after_100(source, *, skip=0):
        for count, text in enumerate(real(source, skip=skip)):
            if count == 100:
                raise KeyboardInterrupt("simulated Ctrl+C")
            yield text

    monkeypatch.setattr(preprocess_module, "iter_rows", dies_after_100)
    with pytest.raises(KeyboardInterrupt):
        preprocess(source, options(tmp_path / "old", small_tokenizer))
    (tmp_path / ".old.partial").rename(tmp_path / "old")  # where an earlier version kept it
    monkeypatch.setattr(preprocess_module, "iter_rows", real)
    preprocess(source, options(tmp_path / "old", small_tokenizer))
    assert snapshot_shards(tmp_path / "old") == snapshot_shards(tmp_path / "straight")
    assert not (tmp_path / ".old.partial").exists()


def snapshot_shards(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".idx")}
