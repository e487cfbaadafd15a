"""SentencePiece BPE tokenizer: training from texts, and a small encode/decode wrapper."""
from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from data.errors import DataError
from data.output import staged_output

# SentencePiece silently drops training sentences over 4192 bytes (its max_sentence_length default).
MAX_LINE_BYTES = 4000
# Sentences sampled for training: ~50 MB of paragraphs, far above the embedded corpus, and it bounds the time
# and memory a later big corpus can cost.
MAX_TRAINING_SENTENCES = 500_000

# Llama's layout: unk 0, bos 1, eos 2, no pad piece (padding is masked out, it needs no token).
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def split_long_line(line: str, max_bytes: int = MAX_LINE_BYTES) -> list[str]:
    """Cut a line into pieces of at most max_bytes UTF-8 bytes, preferring to cut after a space."""
    pieces: list[str] = []
    while len(line.encode("utf-8")) > max_bytes:
        # A code point takes at most 4 bytes, so max_bytes // 4 characters always fit; then grow greedily.
        cut = max_bytes // 4
        while cut < len(line) and len(line[:cut + 1].encode("utf-8")) <= max_bytes:
            cut += 1
        space = line.rfind(" ", 0, cut)
        if space > 0:
            cut = space + 1
        pieces.append(line[:cut])
        line = line[cut:]
    pieces.append(line)
    return pieces


def training_sentences(texts: Iterable[str], max_bytes: int = MAX_LINE_BYTES) -> Iterator[str]:
    """Paragraphs of the texts, packed line by line into pieces of at most max_bytes bytes."""
    for text in texts:
        for paragraph in text.split("\n\n"):
            # Training on paragraphs, not single lines, lets BPE learn pieces that hold the newline ('.\n').
            lines = [piece for line in paragraph.split("\n") for piece in split_long_line(line, max_bytes)]
            chunk: list[str] = []
            num_bytes = 0
            for line in lines:
                size = len(line.encode("utf-8")) + 1
                if chunk and num_bytes + size > max_bytes:
                    yield "\n".join(chunk)
                    chunk, num_bytes = [], 0
                chunk.append(line)
                num_bytes += size
            if chunk and any(line.strip() for line in chunk):
                yield "\n".join(chunk)


def vocabulary_error(err: RuntimeError, vocab_size: int, *, vocab_key: str, corpus: str) -> DataError:
    """SentencePiece's RuntimeError for a vocabulary that does not fit the corpus, as one line naming the key and
    the size that works (its C++ check text is kept out: it names internal fields, not what to change)."""
    text = str(err)
    if match := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text):
        return DataError(f"{vocab_key} {vocab_size} is too small for {corpus}: it needs at least {match.group(2)} "
                         "pieces (its distinct characters, 256 byte pieces and unk/bos/eos); set "
                         f"{vocab_key} to {match.group(2)} or more")
    if match := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text):
        return DataError(f"{vocab_key} {vocab_size} is too large for {corpus}: SentencePiece can learn at most "
                         f"{match.group(2)} pieces from this text; set {vocab_key} to {match.group(2)} or less, or "
                         "train on more text")
    return DataError(f"SentencePiece could not train a tokenizer on {corpus} with {vocab_key} {vocab_size}: "
                     f"{text.strip().splitlines()[0] if text.strip() else type(err).__name__}")


def train_tokenizer(
    texts: Iterable[str], model_prefix: str | Path, vocab_size: int = 8192, *, seed: int = 0, num_threads: int = 2,
    model_type: str = "bpe", character_coverage: float = 0.9995, vocab_key: str = "the vocabulary size",
    corpus: str = "this corpus",
) -> Tokenizer:
    """Train a byte-fallback BPE (or unigram) model on texts and write `<model_prefix>.model` atomically.

    A vocabulary the corpus cannot fill, or smaller than its characters, is a DataError naming `vocab_key`."""
    model_path = Path(f"{model_prefix}.model")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    # Same texts and seed -> same model: the seed fixes the sampling of sentences beyond the limit.
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        _train(texts, model, vocab_size=vocab_size, num_threads=num_threads, model_type=model_type,
               character_coverage=character_coverage)
    except RuntimeError as err:
        raise vocabulary_error(err, vocab_size, vocab_key=vocab_key, corpus=corpus) from None
    with staged_output(model_path, overwrite=True) as temp_path:  # the caller decides about an existing output
        temp_path.write_bytes(model.getvalue())
    return Tokenizer(model_path)


def _train(texts: Iterable[str], model: io.BytesIO, *, vocab_size: int, num_threads: int, model_type: str,
           character_coverage: float) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(texts),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        # Unseen characters become UTF-8 byte pieces, so decode(encode(text)) == text for any text.
        byte_fallback=True,
        # SentencePiece's advice: 0.9995 for rich character sets (Chinese, Japanese), 1.0 for small ones.
        character_coverage=character_coverage,
        # Identity normalization and kept whitespace: without them NFKC and space-folding break round trips.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        input_sentence_size=MAX_TRAINING_SENTENCES,
        shuffle_input_sentence=True,
        max_sentence_length=MAX_LINE_BYTES + 192,
        num_threads=num_threads,
        minloglevel=2,
    )


def tokenizer_sha256(path: str | Path) -> str:
    """SHA-256 of a SentencePiece model file: shards record it so a run can tell which tokenizer made them."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Tokenizer:
    """A trained SentencePiece model: text <-> token ids."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise DataError(f"tokenizer model {self.path} is a folder: give its .model file (tokenizer.model)")
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model {self.path} does not exist")
        try:
            self._processor = spm.SentencePieceProcessor(model_file=str(self.path))
        except RuntimeError:  # "could not parse ModelProto": a text file, a JSON tokenizer, a truncated model
            raise DataError(f"{self.path} is not a SentencePiece model (it does not parse as one): give the .model "
                            "file that tools/train_tokenizer.py writes (or a Llama-style tokenizer.model)") from None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, byte and special pieces included."""
        return self._processor.get_piece_size()

    @property
    def bos_id(self) -> int:
        """Id of the beginning-of-sequence token."""
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of the end-of-sequence token, placed between documents."""
        return self._processor.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without bos/eos."""
        return self._processor.encode(text)

    def encode_batch(self, texts: list[str], *, num_threads: int = 1, add_eos: bool = False) -> list[list[int]]:
        """Token ids of several texts, encoded by num_threads threads (eos appended to each when add_eos)."""
        return self._processor.encode(texts, num_threads=num_threads, add_eos=add_eos)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; bos/eos decode to nothing."""
        return self._processor.decode([int(i) for i in ids])

    @property
    def sha256(self) -> str:
        """Hash of the model file (see tokenizer_sha256)."""
        return tokenizer_sha256(self.path)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
