"""Turn a catalog corpus into a cached tokenizer and train/validation token shards."""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
from tqdm import tqdm

from data.config import DataConfig
from data.corpora.embedded import load_corpus
from data.shards import TokenShardWriter
from data.tokenizer import Tokenizer, train_tokenizer

# Bump when the documents, tokenizer settings or shard layout change, so old caches are rebuilt, not reused.
PREPARE_FORMAT_VERSION = 1
META_FILE = "meta.json"


@dataclass(frozen=True, kw_only=True)
class PreparedData:
    """Where a prepared corpus lives and how big it is."""

    tokenizer_path: Path
    """SentencePiece model file."""
    train_prefix: Path
    """Prefix of the training shard (`.bin`/`.idx`)."""
    val_prefix: Path
    """Prefix of the validation shard (`.bin`/`.idx`)."""
    vocab_size: int
    """Number of token ids of the tokenizer."""
    num_train_tokens: int
    """Tokens in the training shard, one eos per document included."""
    num_val_tokens: int
    """Tokens in the validation shard, one eos per document included."""


def cache_folder(config: DataConfig, vocab_size: int) -> Path:
    """The folder that caches config.dataset tokenized with vocab_size; its name spells out every setting."""
    name = f"{config.dataset}-v{vocab_size}-s{config.split_seed}-f{config.val_fraction:g}"
    return Path(config.cache_dir) / name


def _settings(config: DataConfig, vocab_size: int) -> dict[str, object]:
    return {
        "format_version": PREPARE_FORMAT_VERSION,
        "dataset": config.dataset,
        "vocab_size": vocab_size,
        "split_seed": config.split_seed,
        "val_fraction": config.val_fraction,
    }


def _from_meta(folder: Path, meta: dict[str, object]) -> PreparedData:
    return PreparedData(
        tokenizer_path=folder / "tokenizer.model",
        train_prefix=folder / "train",
        val_prefix=folder / "val",
        vocab_size=int(meta["vocab_size"]),
        num_train_tokens=int(meta["num_train_tokens"]),
        num_val_tokens=int(meta["num_val_tokens"]),
    )


def load_prepared(config: DataConfig, *, vocab_size: int) -> PreparedData | None:
    """The cached data for these settings, or None when the cache is missing, incomplete or stale."""
    folder = cache_folder(config, vocab_size)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    settings = _settings(config, vocab_size)
    if any(meta.get(key) != value for key, value in settings.items()):
        return None
    return _from_meta(folder, meta)


def _encode_split(
    tokenizer: Tokenizer, documents: list[str], prefix: Path, *, name: str, progress: bool
) -> int:
    with TokenShardWriter(prefix, tokenizer.vocab_size) as writer:
        for document in tqdm(documents, desc=f"encode {name}", unit="doc", disable=not progress):
            # eos closes every document, so a window that spans two documents sees where one ends.
            writer.add_document(tokenizer.encode(document) + [tokenizer.eos_id])
        return writer.num_tokens


def _build(config: DataConfig, vocab_size: int, folder: Path, *, progress: bool) -> None:
    started = time.perf_counter()
    split = load_corpus(config)
    tokenizer_started = time.perf_counter()
    # Trained on the training documents only, so validation text stays unseen.
    tokenizer = train_tokenizer(split.train, folder / "tokenizer", vocab_size, seed=config.split_seed,
                                vocab_key="model.vocab_size", corpus=f"the {config.dataset} corpus")
    tokenizer_seconds = time.perf_counter() - tokenizer_started
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces, asked for vocab_size {vocab_size}")
    encode_started = time.perf_counter()
    num_train_tokens = _encode_split(tokenizer, split.train, folder / "train", name="train", progress=progress)
    num_val_tokens = _encode_split(tokenizer, split.val, folder / "val", name="val", progress=progress)
    meta = {
        **_settings(config, vocab_size),
        "num_train_tokens": num_train_tokens,
        "num_val_tokens": num_val_tokens,
        "num_train_documents": len(split.train),
        "num_val_documents": len(split.val),
        "num_train_bytes": sum(len(doc.encode("utf-8")) for doc in split.train),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "sentencepiece_version": sentencepiece.__version__,
        "tokenizer_train_seconds": round(tokenizer_seconds, 3),
        "encode_seconds": round(time.perf_counter() - encode_started, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
    }
    # Written last: its presence is what marks the folder complete.
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def prepare_data(config: DataConfig, *, vocab_size: int, progress: bool = True) -> PreparedData:
    """Tokenizer and shards for config.dataset at vocab_size: read from the cache, else built once and cached.

    Safe to call from several processes at once: each builds in its own temporary folder and renames it into
    place; whoever renames second finds the folder taken and uses the winner's copy.
    """
    cached = load_prepared(config, vocab_size=vocab_size)
    if cached is not None:
        return cached
    folder = cache_folder(config, vocab_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        temp.mkdir()
        _build(config, vocab_size, temp, progress=progress)
        _move_into_place(temp, folder, config, vocab_size)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    prepared = load_prepared(config, vocab_size=vocab_size)
    if prepared is None:
        raise RuntimeError(f"prepared data in {folder} vanished or is incomplete right after it was built")
    return prepared


def _move_into_place(temp: Path, folder: Path, config: DataConfig, vocab_size: int) -> None:
    # A folder without a matching meta.json is a leftover of an older format or a crashed copy: set it aside.
    if folder.exists() and load_prepared(config, vocab_size=vocab_size) is None:
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            folder.rename(stale)
        except FileNotFoundError:
            pass  # another process moved it first
        else:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        # rename() of a folder onto a non-empty folder fails: the first finished build wins.
        temp.rename(folder)
    except OSError:
        if load_prepared(config, vocab_size=vocab_size) is None:
            raise
