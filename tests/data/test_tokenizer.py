"""SentencePiece BPE tokenizer: training, byte-fallback round trips, determinism, long lines."""
from __future__ import annotations

import pytest

from data.corpora.embedded import load_shakespeare
from data.tokenizer import Tokenizer, split_long_line, train_tokenizer, training_sentences

UNUSUAL = "Ber.\nWho's there?\n\n  Nay,\tanswer me 😀 — naïve Ωμέγα 中文 e\u0301 ﬁ ①\x00 trailing  \n"


@pytest.fixture(scope="module")
def small_texts():
    return load_shakespeare(None)[:40]  # ~200 KB: trains in well under a second


@pytest.fixture(scope="module")
def tokenizer(small_texts, tmp_path_factory):
    return train_tokenizer(small_texts, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=1000)


def test_train_encode_decode(tokenizer, small_texts):
    assert tokenizer.vocab_size == 1000
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.path.name == "tokenizer.model" and tokenizer.path.is_file()
    ids = tokenizer.encode(small_texts[0])
    assert all(isinstance(i, int) and 0 <= i < 1000 for i in ids)
    assert tokenizer.decode(ids) == small_texts[0]
    # BPE merges must compress: bytes per token well above 1 even at this tiny vocab.
    assert len(ids) < len(small_texts[0].encode()) / 2
    assert tokenizer.encode_batch(small_texts[:3]) == [tokenizer.encode(t) for t in small_texts[:3]]
    assert tokenizer.decode([tokenizer.eos_id] + ids[:5]) == tokenizer.decode(ids[:5])


def test_byte_fallback_round_trips_unusual_unicode(tokenizer):
    ids = tokenizer.encode(UNUSUAL)
    assert tokenizer.decode(ids) == UNUSUAL
    assert tokenizer.decode(tokenizer.encode("😀")) == "😀"
    assert 0 not in ids  # no unknown tokens: unseen characters become byte pieces


def test_training_is_deterministic(small_texts, tmp_path, tokenizer):
    again = train_tokenizer(small_texts, tmp_path / "again", vocab_size=1000)
    assert again.path.read_bytes() == tokenizer.path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["again.model"]  # no temp files left


def test_reload_from_path(tokenizer):
    reloaded = Tokenizer(tokenizer.path)
    assert reloaded.encode(UNUSUAL) == tokenizer.encode(UNUSUAL)
    with pytest.raises(FileNotFoundError):
        Tokenizer(tokenizer.path.with_name("missing.model"))


def test_long_lines_are_cut_under_the_sentencepiece_limit():
    line = ("word ☃ " * 3000) + "x" * 9000
    pieces = split_long_line(line)
    assert "".join(pieces) == line
    assert all(len(piece.encode()) <= 4000 for piece in pieces)
    paragraph = "\n".join(["a line of verse"] * 1000)
    sentences = list(training_sentences([line, paragraph + "\n\n" + "short"]))
    assert all(len(sentence.encode()) <= 4000 for sentence in sentences)
    assert sentences[-1] == "short"
    assert sum(sentence.count("a line of verse") for sentence in sentences) == 1000
