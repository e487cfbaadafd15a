"""What the trainer reads: one tokenizer and, per source, training and validation windows plus a mixture weight.

With no `data.sources` this is the embedded/catalog corpus `data.dataset`, prepared by data/prepare.py exactly as
before. With sources, each names a shard set (tools/preprocess_data.py), a Megatron prefix, or raw local files
prepared into `cache_dir/sources/` on first use. Every shard set records its tokenizer's SHA-256; a run refuses
shard sets made with another tokenizer than the one it uses.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from data.corpora.catalog import CATALOG, DOWNLOADED_SHARDS, download_commands, find_entry
from data.config import DataConfig, DataSourceConfig
from data.corpora.embedded import CORPORA
from data.errors import DataError
from data.mixture import MixtureSampler
from data.prepare import PreparedData, prepare_data
from data.preprocess import TOKENIZER_FILE, PreprocessOptions, preprocess, read_shard_set_meta
from data.sampler import TokenWindows
from data.shard_checks import check_tokenizer_fits, open_checked_shard
from data.shards import TokenShardReader
from data.corpora.sources import resolve_source
from data.tokenizer import Tokenizer, tokenizer_sha256
from data.tokenizer_training import train_tokenizer_on_source

# Raw files prepared on first use: a tokenizer trained on this much of the first source when none is given.
FIRST_USE_TOKENIZER_SAMPLE_BYTES = 20_000_000


@dataclass(frozen=True, kw_only=True)
class SourceData:
    """One source's windows."""

    name: str
    """Name in logs and checkpoints."""
    weight: float
    """Mixture weight as configured."""
    train: TokenWindows
    """Training windows (shuffled per epoch)."""
    val: TokenWindows | None
    """Validation windows in order, or None when the source has no validation split."""


@dataclass(frozen=True, kw_only=True)
class TrainingData:
    """Everything the trainer reads."""

    tokenizer: Tokenizer
    """The tokenizer all sources were encoded with."""
    sources: list[SourceData]
    """Sources in config order."""
    mixture: MixtureSampler
    """Assigns sample positions to sources."""
    prepared: PreparedData | None
    """The prepared catalog corpus when training on data.dataset (None with data.sources)."""


def _prepared_folder(config: DataConfig, source: DataSourceConfig, vocab_size: int) -> Path:
    key = hashlib.sha256(f"{os.path.abspath(source.path)}|{source.text_field}|{vocab_size}".encode()).hexdigest()
    return Path(config.cache_dir) / "sources" / f"{source.display_name}-{key[:12]}"


def _is_shard_set(path: Path) -> bool:
    return read_shard_set_meta(path) is not None


def _is_megatron_prefix(path: str) -> bool:
    return Path(path + ".idx").is_file() and Path(path + ".bin").is_file()


def _raw_sources(config: DataConfig) -> list[DataSourceConfig]:
    return [s for s in config.sources if not _is_shard_set(Path(s.path)) and not _is_megatron_prefix(s.path)]


def resolve_dataset(config: DataConfig, *, vocab_size: int) -> DataConfig:
    """data.dataset as it enters: an embedded corpus stays; a catalog dataset ('wikitext', 'wikitext-103') becomes
    its downloaded shard set `cache_dir/shards/<name>` when that is there, else a DataError with the exact command
    that downloads it; any other name is a DataError listing both kinds."""
    if config.sources or config.dataset in CORPORA:
        return config
    entry = find_entry(config.dataset)
    if entry is None:
        raise DataError(f"data.dataset {config.dataset!r} is unknown: embedded corpora are {', '.join(CORPORA)}; "
                        f"datasets to download are {', '.join(n for n in CATALOG if n not in CORPORA)} "
                        "(tools/list_datasets.py); local files go in data.sources")
    folder = Path(config.cache_dir) / DOWNLOADED_SHARDS / entry.name
    if read_shard_set_meta(folder) is None:
        command = download_commands(entry, cache_dir=config.cache_dir, vocab_size=vocab_size,
                                    tokenizer=config.tokenizer)
        raise DataError(f"data.dataset {config.dataset!r} is the Hub dataset {entry.hub_id} ({entry.name}), which is "
                        f"downloaded, not embedded, and {folder} holds no finished shard set: run `{command}` "
                        "(add --max_tokens N for a part), then rerun this command; it trains on those shards")
    return config.model_copy(update={"sources": [DataSourceConfig(path=str(folder), name=entry.name)]})


def prepare_sources(config: DataConfig, *, vocab_size: int, progress: bool) -> None:
    """Turn raw local sources into shard sets in cache_dir (once; later runs reuse them). Local rank 0 calls it."""
    config = resolve_dataset(config, vocab_size=vocab_size)
    if not config.sources:
        prepare_data(config, vocab_size=vocab_size, progress=progress)
        return
    raw = _raw_sources(config)
    if not raw:
        return
    tokenizer_path = _given_tokenizer(config) or _existing_tokenizer(config)
    if tokenizer_path is None:
        tokenizer_path = Path(config.cache_dir) / "sources" / f"tokenizer-v{vocab_size}.model"
        if not tokenizer_path.is_file():
            train_tokenizer_on_source(resolve_source(raw[0].path, text_field=raw[0].text_field), tokenizer_path,
                                      vocab_size=vocab_size, sample_bytes=FIRST_USE_TOKENIZER_SAMPLE_BYTES,
                                      seed=config.split_seed, vocab_key="model.vocab_size")
    for source in raw:
        preprocess(resolve_source(source.path, text_field=source.text_field), PreprocessOptions(
            output_dir=_prepared_folder(config, source, vocab_size), tokenizer_path=tokenizer_path,
            num_workers=max(1, min(4, (os.cpu_count() or 1) - 1)), val_fraction=config.val_fraction,
            progress=progress))


def _given_tokenizer(config: DataConfig) -> Path | None:
    """data.tokenizer, checked where it enters: a file that loads as a SentencePiece model (None: not set)."""
    if not config.tokenizer:
        return None
    path = Path(config.tokenizer)
    try:
        Tokenizer(path)
    except (DataError, OSError) as err:
        raise DataError(f"data.tokenizer: {err}") from None
    return path


def _existing_tokenizer(config: DataConfig) -> Path | None:
    for source in config.sources:
        if _is_shard_set(Path(source.path)):
            return Path(source.path) / TOKENIZER_FILE
    return None


def _readers(folder: Path, names: list[str], vocab_size: int) -> list[TokenShardReader]:
    # min_tokens=0: a pair's validation shard may be empty; TokenWindows checks the set holds one window.
    return [open_checked_shard(folder / name, vocab_size=vocab_size, min_tokens=0) for name in names]


def open_training_data(config: DataConfig, *, vocab_size: int, seq_len: int, seed: int) -> TrainingData:
    """Open the (already prepared) data read-only; every rank calls it."""
    config = resolve_dataset(config, vocab_size=vocab_size)
    if not config.sources:
        prepared = prepare_data(config, vocab_size=vocab_size, progress=False)
        tokenizer = Tokenizer(prepared.tokenizer_path)
        check_tokenizer_fits(tokenizer.vocab_size, prepared.tokenizer_path, vocab_size=vocab_size)
        source = SourceData(
            name=config.dataset, weight=1.0,
            train=TokenWindows(open_checked_shard(prepared.train_prefix, vocab_size=vocab_size,
                                                  min_tokens=seq_len + 1).tokens, seq_len, seed=seed),
            val=TokenWindows(open_checked_shard(prepared.val_prefix, vocab_size=vocab_size,
                                                min_tokens=seq_len + 1).tokens, seq_len, seed=seed, shuffle=False))
        return TrainingData(tokenizer=tokenizer, sources=[source],
                            mixture=MixtureSampler([1.0], [source.name]), prepared=prepared)

    tokenizer_path = _given_tokenizer(config) or _existing_tokenizer(config)
    if tokenizer_path is None:
        tokenizer_path = Path(config.cache_dir) / "sources" / f"tokenizer-v{vocab_size}.model"
    if not tokenizer_path.is_file():
        raise DataError(f"tokenizer {tokenizer_path} does not exist: set data.tokenizer to the SentencePiece model "
                        "the shards were made with")
    check_tokenizer_fits(Tokenizer(tokenizer_path).vocab_size, tokenizer_path, vocab_size=vocab_size)
    expected_hash = tokenizer_sha256(tokenizer_path)
    sources = []
    for index, source in enumerate(config.sources):
        folder = Path(source.path) if _is_shard_set(Path(source.path)) else None
        if folder is None and not _is_megatron_prefix(source.path):
            folder = _prepared_folder(config, source, vocab_size)
        try:
            sources.append(_open_source(source, folder, expected_hash, tokenizer_path, seq_len=seq_len, seed=seed,
                                        index=index, vocab_size=vocab_size))
        except ValueError as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"data.sources[{index}] ({source.path}): {err}") from None
    names = [s.name for s in sources]
    return TrainingData(tokenizer=Tokenizer(tokenizer_path), sources=sources,
                        mixture=MixtureSampler([s.weight for s in sources], names), prepared=None)


def _open_source(source: DataSourceConfig, folder: Path | None, expected_hash: str, tokenizer_path: Path, *,
                 seq_len: int, seed: int, index: int, vocab_size: int) -> SourceData:
    # Each source gets its own shuffle seed, so two sources of equal size are not visited in lockstep.
    source_seed = seed + 7919 * index
    if folder is None:  # a Megatron/GPT-NeoX prefix made elsewhere: no tokenizer record, no validation split
        tokens = open_checked_shard(source.path, vocab_size=vocab_size, min_tokens=seq_len + 1).tokens
        return SourceData(name=source.display_name, weight=source.weight,
                          train=TokenWindows(tokens, seq_len, seed=source_seed), val=None)
    meta = read_shard_set_meta(folder)
    if meta is None:
        raise DataError(f"data.sources[{index}]: {folder} is not a finished shard set (no meta.json); rerun "
                        "tools/preprocess_data.py with the same arguments to finish it")
    if meta.get("tokenizer_sha256") != expected_hash:
        raise DataError(f"data.sources[{index}] ({folder}) was tokenized with another tokenizer (sha256 "
                        f"{str(meta.get('tokenizer_sha256'))[:12]}..., this run uses {tokenizer_path} with "
                        f"{expected_hash[:12]}...): re-preprocess it with --tokenizer {tokenizer_path}, or set "
                        "data.tokenizer to the one it was made with")
    train = [reader.tokens for reader in _readers(folder, meta["train_shards"], vocab_size)]
    val = [reader.tokens for reader in _readers(folder, meta["val_shards"], vocab_size)]
    val_windows = None
    if sum(max(0, (len(part) - 1) // seq_len) for part in val) > 0:
        val_windows = TokenWindows(val, seq_len, seed=source_seed, shuffle=False)
    return SourceData(name=source.display_name, weight=source.weight,
                      train=TokenWindows(train, seq_len, seed=source_seed), val=val_windows)
