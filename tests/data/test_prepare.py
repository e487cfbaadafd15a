"""prepare_data: cached tokenizer + shards, cache hits, rebuilt partial caches, concurrent builders."""
from __future__ import annotations

import json

import pytest

from data import prepare
from data.config import DataConfig
from data.corpora.embedded import CORPORA, CorpusEntry, load_corpus, load_shakespeare
from data.prepare import cache_folder, load_prepared, prepare_data
from data.shards import TokenShardReader
from data.tokenizer import Tokenizer

VOCAB = 1000


@pytest.fixture(autouse=True)
def small_corpus(monkeypatch):
    documents = load_shakespeare(None)[:60]
    monkeypatch.setitem(CORPORA, "small", CorpusEntry(description="60 scenes", load_documents=lambda _: documents))


def _config(tmp_path, **overrides):
    return DataConfig(dataset="small", cache_dir=str(tmp_path / "cache"), val_fraction=0.1, **overrides)


def test_builds_tokenizer_and_shards(tmp_path):
    config = _config(tmp_path)
    prepared = prepare_data(config, vocab_size=VOCAB, progress=False)
    folder = cache_folder(config, VOCAB)
    assert folder.name == "small-v1000-s1234-f0.1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json", "tokenizer.model", "train.bin", "train.idx", "val.bin", "val.idx"
    ]
    assert prepared.tokenizer_path == folder / "tokenizer.model" and prepared.vocab_size == VOCAB

    split = load_corpus(config)
    tokenizer = Tokenizer(prepared.tokenizer_path)
    for prefix, documents, num_tokens in [(prepared.train_prefix, split.train, prepared.num_train_tokens),
                                          (prepared.val_prefix, split.val, prepared.num_val_tokens)]:
        reader = TokenShardReader(prefix)
        assert reader.num_documents == len(documents) and reader.num_tokens == num_tokens
        for index in (0, len(documents) - 1):
            ids = reader.document(index).tolist()
            assert ids[-1] == tokenizer.eos_id and tokenizer.eos_id not in ids[:-1]
            assert tokenizer.decode(ids) == documents[index]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["num_val_documents"] == len(split.val) == 6
    assert list(tmp_path.joinpath("cache").iterdir()) == [folder]  # no temp folders left


def test_second_call_is_a_cache_hit(tmp_path, monkeypatch):
    config = _config(tmp_path)
    first = prepare_data(config, vocab_size=VOCAB, progress=False)
    mtime = first.tokenizer_path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("cache hit must not retrain the tokenizer")

    monkeypatch.setattr(prepare, "train_tokenizer", fail)
    assert prepare_data(config, vocab_size=VOCAB, progress=False) == first
    assert load_prepared(config, vocab_size=VOCAB) == first
    assert first.tokenizer_path.stat().st_mtime_ns == mtime
    assert load_prepared(config, vocab_size=VOCAB + 1) is None
    assert load_prepared(_config(tmp_path, split_seed=1), vocab_size=VOCAB) is None


@pytest.mark.parametrize("damage", ["no_meta", "old_format"])
def test_incomplete_or_stale_cache_is_rebuilt(tmp_path, damage):
    config = _config(tmp_path)
    folder = cache_folder(config, VOCAB)
    prepare_data(config, vocab_size=VOCAB, progress=False)
    if damage == "no_meta":
        (folder / "meta.json").unlink()
        (folder / "train.bin").write_bytes(b"half written")
    else:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    assert load_prepared(config, vocab_size=VOCAB) is None
    prepared = prepare_data(config, vocab_size=VOCAB, progress=False)
    assert TokenShardReader(prepared.train_prefix).num_tokens == prepared.num_train_tokens
    assert list(tmp_path.joinpath("cache").iterdir()) == [folder]


def test_concurrent_builder_that_finishes_first_wins(tmp_path, monkeypatch):
    config = _config(tmp_path)
    real_build = prepare._build
    folder = cache_folder(config, VOCAB)
    winner_meta = []

    def build_while_another_process_finishes(config, vocab_size, temp, *, progress):
        if not winner_meta:
            # Another process completes the same cache while this one is still building.
            winner_meta.append("building")
            prepare_data(config, vocab_size=vocab_size, progress=False)
            winner_meta[0] = (folder / "meta.json").read_text()  # holds timings: differs between builds
        real_build(config, vocab_size, temp, progress=progress)

    monkeypatch.setattr(prepare, "_build", build_while_another_process_finishes)
    prepared = prepare_data(config, vocab_size=VOCAB, progress=False)
    assert prepared == load_prepared(config, vocab_size=VOCAB)
    assert (folder / "meta.json").read_text() == winner_meta[0]  # the first finished copy was kept
    assert list(tmp_path.joinpath("cache").iterdir()) == [folder]  # the loser's temp folder is gone


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    config = _config(tmp_path)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare, "_encode_split", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_data(config, vocab_size=VOCAB, progress=False)
    assert list(tmp_path.joinpath("cache").iterdir()) == []


def test_full_shakespeare_at_vocab_32000(tmp_path):
    # The whole corpus at the largest preset vocab: ~5 s on one core.
    config = DataConfig(cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(config, vocab_size=32_000, progress=False)
    assert prepared.vocab_size == 32_000
    assert 1_100_000 < prepared.num_train_tokens < 1_500_000
    assert 40_000 < prepared.num_val_tokens < 120_000
    assert TokenShardReader(prepared.train_prefix).dtype.name == "uint16"
