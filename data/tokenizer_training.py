"""Train a SentencePiece tokenizer on a bounded sample of a document source (local files or a Hub dataset)."""
from __future__ import annotations

import shutil
from pathlib import Path

import sentencepiece as spm

from data.errors import DataError
from data.output import staged_output
from data.corpora.sources import DocumentSource, iter_documents
from data.tokenizer import Tokenizer, train_tokenizer

# A share of CJK ideographs above this marks the corpus as Chinese-like (a rich character set).
CJK_SHARE_FOR_RICH_CHARSET = 0.1
DEFAULT_SAMPLE_BYTES = 100_000_000


def _is_cjk(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


def sample_documents(source: DocumentSource, max_bytes: int) -> list[str]:
    """The first documents of source, up to max_bytes of UTF-8 text (at least one document)."""
    documents, num_bytes = [], 0
    for text in iter_documents(source):
        if not text.strip():
            continue
        documents.append(text)
        num_bytes += len(text.encode("utf-8"))
        if num_bytes >= max_bytes:
            break
    if not documents:
        raise DataError(f"{source.name}: no documents with text to train a tokenizer on (empty input, or a wrong "
                        "--text_field)")
    return documents


def character_coverage_for(documents: list[str]) -> float:
    """SentencePiece's advice: 0.9995 for rich character sets (Chinese, Japanese), 1.0 for small ones."""
    sample = "".join(documents)[:2_000_000]
    letters = [c for c in sample if not c.isspace()]
    share = sum(map(_is_cjk, letters)) / max(1, len(letters))
    return 0.9995 if share > CJK_SHARE_FOR_RICH_CHARSET else 1.0


def train_tokenizer_on_source(source: DocumentSource, output_model: Path, *, vocab_size: int, model_type: str = "bpe",
                              sample_bytes: int = DEFAULT_SAMPLE_BYTES, seed: int = 0,
                              vocab_key: str = "--vocab_size") -> Tokenizer:
    """Train on the first sample_bytes of source and write output_model atomically."""
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"--model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if not str(output_model).endswith(".model"):
        raise DataError(f"--output must end in .model, got {output_model}")
    documents = sample_documents(source, sample_bytes)
    prefix = str(output_model)[:-len(".model")]
    return train_tokenizer(documents, prefix, vocab_size, seed=seed, model_type=model_type,
                           character_coverage=character_coverage_for(documents), vocab_key=vocab_key,
                           corpus=f"{source.name} (its first {sum(len(d.encode()) for d in documents):,} bytes)")


def adopt_tokenizer(existing: Path, output_model: Path) -> Tokenizer:
    """Use an existing SentencePiece model: check it loads, then copy it to output_model."""
    try:
        spm.SentencePieceProcessor(model_file=str(existing))
    except (OSError, RuntimeError) as err:
        raise DataError(f"{existing} is not a SentencePiece model ({err})") from None
    with staged_output(output_model, overwrite=True) as temp:  # the caller decides about an existing output
        shutil.copyfile(existing, temp)
    return Tokenizer(output_model)


